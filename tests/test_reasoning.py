"""Reasoning models: thought parser, template detection, think on/off, constraints after the thought.

The tiny models here are random Qwen 3 and Qwen 2 (DeepSeek-R1-distill) GGUFs with a planted
"successor table": the output matrix maps each scripted token to the next one, so greedy and
sampled generation alike write a known script (attention and MLP weights are random but small):

    Qwen 3 (ChatML, ``enable_thinking``):  ...assistant\\n -> <think> THOUGHT_1 THOUGHT_2 </think> ANSWER <|im_end|>
    R1 distill (``<think>\\n`` in the prompt):  ...<think>\\n -> THOUGHT_1 THOUGHT_2 </think> ANSWER <eos>

``\\n\\n`` (what a prompt with a closed, empty thought ends with) is followed by ANSWER: thinking off
answers at once. The builders are shared with ``tests/server/test_reasoning_api.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from localllm import reasoning
from localllm.reasoning import (ReasoningFormat, ReasoningStreamParser, ThinkingNotSupported, split_thought,
                                thinking_request, thinking_support)
from localllm.tokenizer import bytes_to_unicode

THOUGHT_1, THOUGHT_2 = "Hmm, 2+2.", " That is 4."
THOUGHT = THOUGHT_1 + THOUGHT_2
ANSWER = '{"answer": 4}'
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
                 "additionalProperties": False}
R1_BOS, R1_USER, R1_ASSISTANT, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", R1_BOS, R1_USER, R1_ASSISTANT, R1_EOS)
USER_TOKENS = ("<think>", "</think>", "\n\n", THOUGHT_1, THOUGHT_2, ANSWER)

# Qwen 3's template, shortened: thoughts of assistant turns after the last user turn are rendered from
# reasoning_content (or split out of the content), earlier ones dropped; enable_thinking=false closes an
# empty thought in the generation prompt.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- set thought = message.reasoning_content if message.reasoning_content is string else '' %}"
    "{%- if '</think>' in content %}"
    "{%- set thought = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query and thought %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + thought.strip('\\n') + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# DeepSeek-R1-Distill-Qwen's template, shortened: earlier thoughts dropped, the thought opened in the prompt.
R1_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}{{- message.content }}"
    "{%- elif message.role == 'user' %}{{- '<｜User｜>' + message.content }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)
PLAIN_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def vocabulary() -> tuple[list[str], list[int]]:
    byte_to_char = bytes_to_unicode()
    tokens = [byte_to_char[b] for b in range(256)] + list(CONTROL_TOKENS) + list(USER_TOKENS)
    return tokens, [1] * 256 + [3] * len(CONTROL_TOKENS) + [4] * len(USER_TOKENS)   # NORMAL, CONTROL, USER_DEFINED


def token_id(text: str) -> int:
    if len(text.encode()) == 1:
        return text.encode()[0]
    return vocabulary()[0].index(text)


def script(kind: str) -> dict[str, str]:
    """The planted successor of each scripted token (its text -> the next token's text)."""
    start = {"qwen3": "<think>", "r1": THOUGHT_1}[kind]
    eos = {"qwen3": "<|im_end|>", "r1": R1_EOS}[kind]
    return {"\n": start, "<think>": THOUGHT_1, THOUGHT_1: THOUGHT_2, THOUGHT_2: "</think>", "</think>": ANSWER,
            "\n\n": ANSWER, ANSWER: eos}


def write_thinking_model(path: str | Path, kind: str, dim: int = 128, seed: int = 0) -> Path:
    """A tiny random ``qwen3`` (kind "qwen3") or ``qwen2`` (kind "r1") GGUF that writes the script."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, token_types = vocabulary()
    vocab_size, n_heads, n_kv_heads, head_dim, hidden_dim = len(tokens), 4, 2, 32, 96
    architecture = {"qwen3": "qwen3", "r1": "qwen2"}[kind]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny-thinking-{kind}")
    writer.add_context_length(1024)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(hidden_dim)
    writer.add_block_count(2)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(1000000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if kind == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([])
    if kind == "qwen3":
        writer.add_bos_token_id(tokens.index("<|endoftext|>"))
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_chat_template(QWEN3_TEMPLATE)
    else:
        writer.add_bos_token_id(tokens.index(R1_BOS))
        writer.add_eos_token_id(tokens.index(R1_EOS))
        writer.add_chat_template(R1_TEMPLATE)
    writer.add_add_bos_token(False)

    embeddings = rng.standard_normal((vocab_size, dim)).astype(np.float32)
    directions = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    output = (0.05 * rng.standard_normal((vocab_size, dim))).astype(np.float32)
    for before, after in script(kind).items():       # logit of `after` ~ 10 * sqrt(dim) when `before` is last
        output[token_id(after)] += 10.0 * directions[token_id(before)]

    def small(rows, cols):
        return ((0.02 / np.sqrt(cols)) * rng.standard_normal((rows, cols))).astype(np.float32)

    writer.add_tensor("token_embd.weight", embeddings)
    writer.add_tensor("output.weight", output)
    writer.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    for i in range(2):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(dim, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(dim, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", small(n_heads * head_dim, dim))
        writer.add_tensor(f"blk.{i}.attn_k.weight", small(n_kv_heads * head_dim, dim))
        writer.add_tensor(f"blk.{i}.attn_v.weight", small(n_kv_heads * head_dim, dim))
        if kind == "qwen3":
            writer.add_tensor(f"blk.{i}.attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
            writer.add_tensor(f"blk.{i}.attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
        else:
            for name, rows in (("q", n_heads), ("k", n_kv_heads), ("v", n_kv_heads)):
                writer.add_tensor(f"blk.{i}.attn_{name}.bias",
                                  0.01 * rng.standard_normal(rows * head_dim).astype(np.float32))
        writer.add_tensor(f"blk.{i}.attn_output.weight", small(dim, n_heads * head_dim))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", small(hidden_dim, dim))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", small(hidden_dim, dim))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", small(dim, hidden_dim))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def thinking_models(tmp_path_factory):
    import localllm

    folder = tmp_path_factory.mktemp("thinking")
    return {kind: localllm.load(write_thinking_model(folder / f"{kind}.gguf", kind), num_ctx=1024)
            for kind in ("qwen3", "r1")}


USER = [{"role": "user", "content": "What is 2+2?"}]


# ----------------------------------------------------------------------------- detection


def test_thinking_support_from_templates():
    qwen3 = thinking_support(QWEN3_TEMPLATE)
    assert (qwen3.open_tag, qwen3.close_tag, qwen3.has_switch) == ("<think>", "</think>", True)
    r1 = thinking_support(R1_TEMPLATE)
    assert (r1.open_tag, r1.close_tag, r1.has_switch) == ("<think>", "</think>", False)
    assert thinking_support("{{ '[THINK]' }}{{ x }}{{ '[/THINK]' }}").open_tag == "[THINK]"
    assert thinking_support("{% if enable_thinking %}x{% endif %}").close_tag == "</think>"
    assert thinking_support(PLAIN_CHATML) is None and thinking_support(None) is None


@pytest.mark.parametrize("think, expected", [(None, None), (True, True), (False, False), ("none", False),
                                             ("low", "low"), ("medium", "medium"), ("high", "high")])
def test_think_values(think, expected):
    assert reasoning.normalize_think(think) == expected


@pytest.mark.parametrize("bad", ["yes", 1, "max", {"effort": "high"}])
def test_bad_think_values_name_the_parameter(bad):
    with pytest.raises(ValueError, match="reasoning_effort must be true, false or one of"):
        reasoning.normalize_think(bad, "reasoning_effort")


def test_thinking_request_switch_and_prompt_closing():
    on = thinking_request(QWEN3_TEMPLATE, True)
    assert on.template_extra == {"enable_thinking": True}
    assert on.finish("<|im_start|>assistant\n") == ("<|im_start|>assistant\n", ReasoningFormat())
    off = thinking_request(QWEN3_TEMPLATE, "none")
    assert off.template_extra == {"enable_thinking": False}
    assert off.finish("x<think>\n\n</think>\n\n") == ("x<think>\n\n</think>\n\n", None)  # the switch closed it
    assert thinking_request(QWEN3_TEMPLATE, "high").template_extra == {"enable_thinking": True,
                                                                       "reasoning_effort": "high"}
    assert thinking_request(QWEN3_TEMPLATE).template_extra == {}
    r1 = thinking_request(R1_TEMPLATE)
    assert r1.finish("<｜Assistant｜><think>\n")[1] == ReasoningFormat(starts_open=True)
    assert thinking_request(R1_TEMPLATE, False).finish("<｜Assistant｜><think>\n") == \
        ("<｜Assistant｜><think>\n\n</think>\n\n", None)                       # the opened thought closed
    assert thinking_request("{{ '<think>' }}", False).finish("A:") == ("A:<think>\n\n</think>\n\n", None)
    with pytest.raises(ThinkingNotSupported, match="does not support thinking"):
        thinking_request(PLAIN_CHATML, True)
    assert thinking_request(PLAIN_CHATML, False).finish("p") == ("p", None)


# ----------------------------------------------------------------------------- the parser

PARSER_CASES = [
    # (output, starts_open, thinking, content)
    ("<think>\nI add.\n</think>\n\nThe answer is 4.", False, "I add.", "The answer is 4."),
    ("  <think>a < b </thin k></think>x", False, "a < b </thin k>", "x"),
    ("I add.\n</think>\n\n4", True, "I add.", "4"),
    ("No thought, just < an answer.", False, "", "No thought, just < an answer."),
    ("<think>cut short by max_tokens <", False, "cut short by max_tokens <", ""),
    ("still thinking", True, "still thinking", ""),
    ("<thi", False, "", "<thi"),
    ("", False, "", ""),
    ("<think></think>", False, "", ""),
    ("\n\nAnswer with </think> inside", False, "", "\n\nAnswer with </think> inside"),
    ("<think>a</think>b</think>c", False, "a", "b</think>c"),
]


@pytest.mark.parametrize("output, starts_open, thinking, content", PARSER_CASES)
def test_parser_whole_output(output, starts_open, thinking, content):
    assert split_thought(output, ReasoningFormat(starts_open=starts_open)) == (thinking, content)


@pytest.mark.parametrize("output, starts_open, thinking, content", PARSER_CASES)
def test_parser_any_chunking_gives_the_same_split(output, starts_open, thinking, content):
    rng = np.random.default_rng(len(output))
    for chunk in (1, 2, 3, None):
        parser = ReasoningStreamParser(ReasoningFormat(starts_open=starts_open))
        pieces_thinking, pieces_content, pos = [], [], 0
        while pos < len(output):
            size = chunk or int(rng.integers(1, 6))
            t, c = parser.push(output[pos:pos + size])
            pieces_thinking.append(t)
            pieces_content.append(c)
            pos += size
        t, c = parser.finish()
        assert ("".join(pieces_thinking) + t, "".join(pieces_content) + c) == (thinking, content)
        assert (parser.thinking, parser.content) == (thinking, content)


def test_parser_streams_the_thought_as_it_comes():
    parser = ReasoningStreamParser(ReasoningFormat())
    assert parser.push("<thi") == ("", "")                        # maybe the tag: held
    assert parser.push("nk>\nStep one") == ("Step one", "")
    assert parser.push(" then two</th") == (" then two", "")     # a beginning of the close tag: held
    assert parser.push("ink>\n\nDone") == ("", "Done")
    assert parser.finish() == ("", "")
    with pytest.raises(ValueError, match="after finish"):
        parser.push("x")


# ----------------------------------------------------------------------------- the library


def test_library_models_list_thinking_among_their_capabilities(thinking_models, tiny_llama_path):
    import localllm
    assert "thinking" in thinking_models["qwen3"].capabilities and "thinking" in thinking_models["r1"].capabilities
    assert localllm.load(tiny_llama_path).capabilities == ("completion",)     # ChatML without a thought block


def test_qwen3_thinks_by_default_and_the_thought_is_separated(thinking_models):
    model = thinking_models["qwen3"]
    result = model.chat(USER, details=True, max_tokens=20, temperature=0)
    assert (result.thinking, result.text, result.finish_reason) == (THOUGHT, ANSWER, "stop")
    assert result.usage.reasoning_tokens == 4                      # <think>, two thought tokens, </think>
    assert result.usage.completion_tokens == 5
    assert model.chat(USER, max_tokens=20) == ANSWER                # the plain reply: the answer only


def test_qwen3_think_false_uses_the_template_switch(thinking_models):
    model = thinking_models["qwen3"]
    assert model.render_chat(USER, enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    result = model.chat(USER, details=True, think=False, max_tokens=20)
    assert (result.thinking, result.text, result.usage.completion_tokens) == ("", ANSWER, 1)
    assert result.usage.reasoning_tokens is None
    assert model.chat(USER, details=True, think="none", max_tokens=20).thinking == ""


def test_r1_thought_opened_by_the_template(thinking_models):
    model = thinking_models["r1"]
    assert model.render_chat(USER).endswith("<think>\n")
    result = model.chat(USER, details=True, think=True, max_tokens=20)
    assert (result.thinking, result.text, result.usage.reasoning_tokens) == (THOUGHT, ANSWER, 3)
    off = model.chat(USER, details=True, think=False, max_tokens=20)   # no switch: the thought closed in the prompt
    assert (off.thinking, off.text) == ("", ANSWER)


@pytest.mark.parametrize("kind", ["qwen3", "r1"])
def test_thought_cut_by_max_tokens_is_reasoning_with_finish_length(thinking_models, kind):
    result = thinking_models[kind].chat(USER, details=True, max_tokens=2)
    assert result.finish_reason == "length" and result.text == ""
    assert result.thinking == (THOUGHT_1 if kind == "qwen3" else THOUGHT)


@pytest.mark.parametrize("kind", ["qwen3", "r1"])
def test_streamed_events_carry_the_thought_apart(thinking_models, kind):
    events = list(thinking_models[kind].chat(USER, stream=True, details=True, max_tokens=20))
    assert "".join(e.thinking for e in events) == THOUGHT
    assert "".join(e.text for e in events) == ANSWER
    assert all(not (e.thinking and e.text) for e in events)
    assert events[-1].usage.reasoning_tokens == (4 if kind == "qwen3" else 3)
    assert "".join(thinking_models[kind].chat(USER, stream=True, max_tokens=20)) == ANSWER


@pytest.mark.parametrize("kind", ["qwen3", "r1"])
@pytest.mark.parametrize("schema", [ANSWER_SCHEMA, {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 5}, "n": {"type": "integer"}},
    "required": ["city", "n"], "additionalProperties": False}])
def test_json_schema_applies_after_the_free_thought(thinking_models, kind, schema):
    from localllm import constrain
    import jsonschema

    result = thinking_models[kind].chat(USER, details=True, max_tokens=60,
                                        constraint=constrain.json_schema(schema))
    assert result.thinking == THOUGHT                                # not constrained: the script's thought
    jsonschema.validate(json.loads(result.text), schema)
    if schema is ANSWER_SCHEMA:
        assert result.text == ANSWER


def test_json_with_thinking_off_and_cut_thought(thinking_models):
    from localllm import constrain

    model = thinking_models["qwen3"]
    off = model.chat(USER, details=True, think=False, max_tokens=30, constraint=constrain.json_object())
    assert (off.thinking, json.loads(off.text)) == ("", {"answer": 4})
    cut = model.chat(USER, details=True, max_tokens=3, constraint=constrain.json_object())
    assert (cut.thinking, cut.text, cut.finish_reason) == (THOUGHT, "", "length")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_call_after_the_thought(thinking_models, tool_choice):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}}]
    result = thinking_models["qwen3"].chat(USER, details=True, tools=tools, tool_choice=tool_choice, max_tokens=120,
                                           temperature=0)
    [choice] = result.choices
    assert choice.thinking == THOUGHT
    [call] = choice.tool_calls
    assert call.name == "add" and set(json.loads(call.arguments_json)) == {"a", "b"}
    assert choice.finish_reason == "tool_calls"


def test_earlier_thoughts_reach_the_template_as_it_expects(thinking_models):
    model = thinking_models["qwen3"]
    for key in ("reasoning_content", "thinking", "reasoning"):
        last_turn = USER + [{"role": "assistant", "content": "4", key: "I added."}]
        assert "<think>\nI added.\n</think>\n\n4<|im_end|>" in model.render_chat(last_turn, add_generation_prompt=False)
        earlier = last_turn + [{"role": "user", "content": "And 3+3?"}]
        assert "I added." not in model.render_chat(earlier)              # Qwen 3 drops thoughts of earlier turns
    r1 = thinking_models["r1"]
    assert "I added." not in r1.render_chat(USER + [{"role": "assistant", "content": "4", "thinking": "I added."}])


def test_think_on_a_model_that_does_not_think(tmp_path):
    import localllm
    from tests.tiny_models import write_tiny_llama

    model = localllm.load(write_tiny_llama(tmp_path / "plain.gguf"))
    with pytest.raises(ThinkingNotSupported, match="does not support thinking"):
        model.chat(USER, think=True, max_tokens=2)
    result = model.chat(USER, details=True, think=False, max_tokens=3)
    assert result.thinking == "" and result.usage.reasoning_tokens is None and len(result.token_ids) <= 3


# ----------------------------------------------------------------------------- the CLI


def test_cli_run_flags():
    from localllm import cli

    parser = cli.build_parser()
    assert parser.parse_args(["run", "m"]).think is None
    args = parser.parse_args(cli.run_flags_first(["run", "m", "--no-think", "hi", "--hide-thinking", "there"]))
    assert (args.think, args.hide_thinking, args.model, args.prompt) == (False, True, "m", ["hi", "there"])
    assert cli.run_flags_first(["run", "m", "--", "--think"]) == ["run", "m", "--", "--think"]
    assert parser.parse_args(["run", "m", "--think"]).think is True
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "m", "--think", "--no-think"])


def test_cli_prints_the_thought_apart_or_hides_it(thinking_models):
    import io

    from localllm import cli

    model = thinking_models["qwen3"]
    out = io.StringIO()
    assert cli.stream_reply(model, USER, {"num_predict": 20}, out) == ANSWER
    assert out.getvalue() == f"Thinking...\n{THOUGHT}\n...done thinking.\n\n{ANSWER}\n"
    hidden = io.StringIO()
    assert cli.stream_reply(model, USER, {"num_predict": 20}, hidden, hide_thinking=True) == ANSWER
    assert hidden.getvalue() == ANSWER + "\n"
    off = io.StringIO()
    cli.stream_reply(thinking_models["r1"], USER, {"num_predict": 20}, off, think=False)
    assert off.getvalue() == ANSWER + "\n"
    lines = iter(["/set nothink", "What is 2+2?", "/bye"])
    session_out = io.StringIO()
    session = cli.ChatSession(model, input_fn=lambda prompt: next(lines), out=session_out, think=True)
    session.loop()
    assert session.think is False and "Thinking..." not in session_out.getvalue()
    assert session.messages[-1] == {"role": "assistant", "content": ANSWER}


# ----------------------------------------------------------------------------- the grammar gate, token by token


class _Vocabulary:
    """A tokenizer stand-in: the token bytes are all the gate reads."""

    PIECES = [b"<think>", b"</think>", b"</think>{", b"nk>", b"nk> x", b"nk>\n", b"</thi", b"a", b"{", b"<think>hm"]
    vocab_size = len(PIECES)

    def token_bytes(self, token_id: int) -> bytes:
        return self.PIECES[token_id]


class _RecordingConstraint:
    """A constraint whose processor records what it is given and lowers every logit by 1."""

    def __init__(self):
        self.budgets, self.seen = [], []

    def make_processor(self, tokenizer, max_new_tokens=None):
        self.budgets.append(max_new_tokens)

        def processor(logits, history, n_prompt):
            self.seen.append(list(history[n_prompt:]))
            return logits - 1.0
        return processor


def _ids(*pieces: bytes) -> list[int]:
    return [_Vocabulary.PIECES.index(p) for p in pieces]


def test_gate_first_token_is_the_grammars_or_opens_the_thought():
    constraint = _RecordingConstraint()
    gate = reasoning.ConstraintAfterThought(ReasoningFormat(), constraint, _Vocabulary(), max_new_tokens=10)
    logits = np.zeros(_Vocabulary.vocab_size)
    out = gate(logits, [7, 7], 2)                                    # prompt of two tokens, nothing generated
    opening = _ids(b"<think>", b"<think>hm")
    assert np.all(out[opening] == 0) and np.all(np.delete(out, opening) == -1)
    gate(logits, [7, 7] + _ids(b"{"), 2)                              # not a thought: the grammar saw "{"
    assert constraint.seen[-1] == _ids(b"{") and constraint.budgets == [10]


def test_gate_thought_split_tag_and_glued_text():
    constraint = _RecordingConstraint()
    gate = reasoning.ConstraintAfterThought(ReasoningFormat(starts_open=True), constraint, _Vocabulary(),
                                            max_new_tokens=10)
    logits = np.zeros(_Vocabulary.vocab_size)
    out = gate(logits, _ids(b"a", b"</thi"), 0)                       # inside the thought, the tag half written
    forbidden = _ids(b"</think>{", b"nk> x")                          # would glue answer text to the tag
    assert np.all(out[forbidden] == -np.inf)
    assert np.all(np.delete(out, forbidden) == 0) and constraint.seen == []   # free otherwise, no grammar yet
    history = _ids(b"a", b"</thi", b"nk>\n", b"{")
    gate(logits, history, 0)
    assert constraint.seen == [_ids(b"{")] and constraint.budgets == [7]      # the answer, with the budget left
