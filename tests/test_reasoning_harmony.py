"""gpt-oss's Harmony channel format in the reasoning support.

gpt-oss writes its thought and answer as messages in channels, not between ``<think>`` tags::

    <|channel|>analysis<|message|>THOUGHT<|end|><|start|>assistant<|channel|>final<|message|>ANSWER<|return|>

The tiny model here is a random ``qwen2`` GGUF with the Harmony special tokens whose output weights
play that script from the generation prompt ``<|start|>assistant``. The same tokens follow each
other in the thought's header and the answer's (``<|channel|>`` is followed by ``analysis`` first,
then by ``final``; ``<|message|>`` by the thought, then by the answer), so a successor table on the
last token alone cannot play it: one attention head of the first layer looks for the last thought
token (a marker dimension of its embedding that no other token has) and, once it is in the
context, writes a direction ``seen`` into the residual stream; the answer's successors are planted
on ``seen``, the thought's on the token alone. The script's tokens have orthogonal embeddings, so
the planted logits do not leak into each other. The builder is shared with
``tests/server/test_reasoning_api.py``.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from localllm import reasoning
from localllm.reasoning import HARMONY, ReasoningFormat, ReasoningStreamParser, split_thought, thinking_request, \
    thinking_support
from localllm.tokenizer import bytes_to_unicode

THOUGHT_1, THOUGHT_2 = "Hmm, 2+2.", " That is 4."
THOUGHT = THOUGHT_1 + THOUGHT_2
ANSWER = '{"answer": 4}'
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
                 "additionalProperties": False}
HARMONY_CONTROL = ("<|startoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>",
                   "<|return|>", "<|call|>", "<|endoftext|>")
HARMONY_WORDS = ("assistant", "analysis", "final", THOUGHT_1, THOUGHT_2, ANSWER)
# What the model writes after the generation prompt "<|start|>assistant", token by token.
SCRIPT = ["<|channel|>", "analysis", "<|message|>", THOUGHT_1, THOUGHT_2, "<|end|>",
          "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", ANSWER]          # then <|return|>
SCRIPT_TEXT = "".join(SCRIPT)
# The successors: before the thought's last token is in the context, and after.
BEFORE_SEEN = {"assistant": "<|channel|>", "<|channel|>": "analysis", "analysis": "<|message|>",
               "<|message|>": THOUGHT_1, THOUGHT_1: THOUGHT_2, THOUGHT_2: "<|end|>"}
AFTER_SEEN = {"<|end|>": "<|start|>", "<|start|>": "assistant", "assistant": "<|channel|>", "<|channel|>": "final",
              "final": "<|message|>", "<|message|>": ANSWER, ANSWER: "<|return|>", THOUGHT_2: "<|end|>"}

# gpt-oss's template (models/templates/openai-gpt-oss-120b.jinja in llama.cpp), trimmed: the builtin
# tools and the TypeScript rendering of nested parameter types are left out; the system message
# (reasoning_effort, default "medium"), the developer message, the tools namespace, the assistant turns
# (thinking kept only before a tool call, content with channel tags refused), tool results and the
# generation prompt are as in the real one.
GPT_OSS_TEMPLATE = (
    "{%- macro render_tool_namespace(namespace_name, tools) -%}"
    "{{- '## ' + namespace_name + '\\n\\n' }}{{- 'namespace ' + namespace_name + ' {\\n\\n' }}"
    "{%- for tool in tools %}{%- set tool = tool.function %}"
    "{{- '// ' + (tool.description or '') + '\\n' }}{{- 'type ' + tool.name + ' = ' }}"
    "{%- if tool.parameters and tool.parameters.properties %}{{- '(_: {\\n' }}"
    "{%- for param_name, param_spec in tool.parameters.properties.items() %}"
    "{{- param_name }}{%- if param_name not in (tool.parameters.required or []) -%}{{- '?' }}{%- endif -%}"
    "{{- ': ' }}{%- if param_spec.type in ('integer', 'number') %}{{- 'number' }}"
    "{%- elif param_spec.type in ('string', 'boolean') %}{{- param_spec.type }}{%- else %}{{- 'any' }}{%- endif %}"
    "{{- ',\\n' }}{%- endfor %}{{- '}) => any;\\n\\n' }}"
    "{%- else -%}{{- '() => any;\\n\\n' }}{%- endif -%}{%- endfor %}"
    "{{- '} // namespace ' + namespace_name }}"
    "{%- endmacro -%}"
    "{%- macro build_system_message() -%}"
    "{%- if model_identity is not defined %}"
    "{%- set model_identity = 'You are ChatGPT, a large language model trained by OpenAI.' %}{%- endif %}"
    "{{- model_identity + '\\n' }}{{- 'Knowledge cutoff: 2024-06\\n' }}"
    "{{- 'Current date: ' + strftime_now('%Y-%m-%d') + '\\n\\n' }}"
    "{%- if reasoning_effort is not defined %}{%- set reasoning_effort = 'medium' %}{%- endif %}"
    "{{- 'Reasoning: ' + reasoning_effort + '\\n\\n' }}"
    "{{- '# Valid channels: analysis, commentary, final. Channel must be included for every message.' }}"
    "{%- if tools -%}{{- '\\nCalls to these tools must go to the commentary channel: \\'functions\\'.' }}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- '<|start|>system<|message|>' }}{{- build_system_message() }}{{- '<|end|>' }}"
    "{%- if messages[0].role == 'developer' or messages[0].role == 'system' %}"
    "{%- set developer_message = messages[0].content %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set developer_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if developer_message or tools %}{{- '<|start|>developer<|message|>' }}"
    "{%- if developer_message %}{{- '# Instructions\\n\\n' }}{{- developer_message }}{{- '\\n\\n' }}{%- endif %}"
    "{%- if tools -%}{{- '# Tools\\n\\n' }}{{- render_tool_namespace('functions', tools) }}{%- endif -%}"
    "{{- '<|end|>' }}{%- endif %}"
    "{%- set last_tool_call = namespace(name=none) %}"
    "{%- for message in loop_messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{%- if 'content' in message %}"
    "{%- if '<|channel|>analysis<|message|>' in message.content or '<|channel|>final<|message|>' in message.content %}"
    "{{- raise_exception('You have passed a message containing <|channel|> tags in the content field.') }}"
    "{%- endif %}{%- endif %}"
    "{%- if 'tool_calls' in message %}"
    "{%- set future_final_message = namespace(found=false) %}"
    "{%- for future_message in loop_messages[loop.index:] %}"
    "{%- if future_message.role == 'assistant' and 'tool_calls' not in future_message %}"
    "{%- set future_final_message.found = true %}{%- endif %}{%- endfor %}"
    "{%- set tool_call = message.tool_calls[0] %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if message.content and message.thinking %}"
    "{{- raise_exception('Cannot pass both content and thinking in an assistant message with tool calls!') }}"
    "{%- elif message.content and not future_final_message.found %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.content + '<|end|>' }}"
    "{%- elif message.thinking and not future_final_message.found %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}"
    "{%- endif %}"
    "{{- '<|start|>assistant to=' }}{{- 'functions.' + tool_call.name + '<|channel|>commentary ' }}"
    "{{- (tool_call.content_type if tool_call.content_type is defined else 'json') + '<|message|>' }}"
    "{{- tool_call.arguments|tojson }}{{- '<|call|>' }}{%- set last_tool_call.name = tool_call.name %}"
    "{%- elif loop.last and not add_generation_prompt %}"
    "{%- if 'thinking' in message %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}{%- endif %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|return|>' }}"
    "{%- else %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}"
    "{%- set last_tool_call.name = none %}{%- endif %}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if last_tool_call.name is none %}"
    "{{- raise_exception('Message has tool role, but there was no previous assistant message with a tool call!') }}"
    "{%- endif %}"
    "{{- '<|start|>functions.' + last_tool_call.name }}"
    "{{- ' to=assistant<|channel|>commentary<|message|>' + message.content|tojson + '<|end|>' }}"
    "{%- elif message.role == 'user' -%}{{- '<|start|>user<|message|>' + message.content + '<|end|>' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)


def vocabulary() -> tuple[list[str], list[int]]:
    byte_to_char = bytes_to_unicode()
    tokens = [byte_to_char[b] for b in range(256)] + list(HARMONY_CONTROL) + list(HARMONY_WORDS)
    return tokens, [1] * 256 + [3] * len(HARMONY_CONTROL) + [4] * len(HARMONY_WORDS)  # NORMAL, CONTROL, USER_DEFINED


def token_id(text: str) -> int:
    return vocabulary()[0].index(text)


def write_harmony_model(path: str | Path, dim: int = 128, seed: int = 0) -> Path:
    """A tiny random ``qwen2`` GGUF with gpt-oss's special tokens and template that writes SCRIPT."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, token_types = vocabulary()
    vocab_size, n_heads, n_kv_heads, head_dim, hidden_dim = len(tokens), 4, 2, 32, 96
    marker = dim - 1                             # the embedding dimension only the thought's last token has
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny-harmony")
    writer.add_context_length(1024)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(hidden_dim)
    writer.add_block_count(2)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(1000000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([])
    writer.add_bos_token_id(tokens.index("<|startoftext|>"))
    writer.add_eos_token_id(tokens.index("<|return|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(GPT_OSS_TEMPLATE)

    # Embeddings: random, the scripted tokens' orthogonal to each other and to `seen`, none on the marker
    # dimension but the thought's last token.
    embeddings = rng.standard_normal((vocab_size, dim)).astype(np.float64)
    embeddings[:, marker] = 0.0
    scripted = sorted({token_id(t) for t in list(BEFORE_SEEN) + list(AFTER_SEEN)
                       + list(BEFORE_SEEN.values()) + list(AFTER_SEEN.values())})
    basis, _ = np.linalg.qr(rng.standard_normal((dim - 1, len(scripted) + 1)))       # orthonormal columns
    for column, token in enumerate(scripted):
        embeddings[token, :marker] = np.sqrt(dim) * basis[:, column]
    seen = np.zeros(dim)
    seen[:marker] = basis[:, -1]                  # unit vector the attention head writes once the marker is seen
    embeddings[token_id(THOUGHT_2), marker] = 8.0
    directions = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)

    output = 0.05 * rng.standard_normal((vocab_size, dim))
    for before, after in BEFORE_SEEN.items():      # logit of `after` ~ 20 * sqrt(dim) when `before` is last
        output[token_id(after)] += 20.0 * directions[token_id(before)]
    for before, after in AFTER_SEEN.items():       # half the token's pull, and `seen`'s
        if BEFORE_SEEN.get(before) != after:
            output[token_id(after)] += 10.0 * directions[token_id(before)] + 9.0 * seen

    def small(rows, cols):
        return (0.02 / np.sqrt(cols)) * rng.standard_normal((rows, cols))

    writer.add_tensor("token_embd.weight", embeddings.astype(np.float32))
    writer.add_tensor("output.weight", output.astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    for i in range(2):
        q, k, v, o = (small(n_heads * head_dim, dim), small(n_kv_heads * head_dim, dim),
                      small(n_kv_heads * head_dim, dim), small(dim, n_heads * head_dim))
        q_bias = np.zeros(n_heads * head_dim)
        if i == 0:
            # head 0 looks for the marker: a constant query and a key on the marker, in the slowest RoPE
            # pair (dimension 15 of 32, NEOX halves; it turns 2e-6 radians a position), so the score does
            # not depend on the distance; the value carries the marker and the output writes `seen`.
            slow = head_dim // 2 - 1
            q_bias[slow] = 4.0
            k[slow] = 0.0
            k[slow, marker] = 4.0
            v[0] = 0.0
            v[0, marker] = 1.0
            o[:, 0] = 3.0 * seen
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(dim, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(dim, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", q.astype(np.float32))
        writer.add_tensor(f"blk.{i}.attn_k.weight", k.astype(np.float32))
        writer.add_tensor(f"blk.{i}.attn_v.weight", v.astype(np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.bias", q_bias.astype(np.float32))
        writer.add_tensor(f"blk.{i}.attn_k.bias", np.zeros(n_kv_heads * head_dim, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_v.bias", np.zeros(n_kv_heads * head_dim, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_output.weight", o.astype(np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", small(hidden_dim, dim).astype(np.float32))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", small(hidden_dim, dim).astype(np.float32))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", small(dim, hidden_dim).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def harmony_model(tmp_path_factory):
    import localllm

    return localllm.load(write_harmony_model(tmp_path_factory.mktemp("harmony") / "gpt-oss-tiny.gguf"), num_ctx=1024)


USER = [{"role": "user", "content": "What is 2+2?"}]


# ----------------------------------------------------------------------------- detection and the think switch


def test_a_template_with_channels_thinks_in_harmony():
    support = thinking_support(GPT_OSS_TEMPLATE)
    assert support.format == HARMONY and not support.can_disable and not support.has_switch
    assert thinking_support("{{ '<|start|>assistant<|channel|>final<|message|>' }}").format == HARMONY
    assert thinking_support("{{ '<think>' }}").format == ReasoningFormat()       # the tag formats are unchanged


@pytest.mark.parametrize("think, effort", [(None, None), (True, None), (False, None), ("none", None),
                                           ("minimal", "low"), ("low", "low"), ("medium", "medium"),
                                           ("high", "high")])
def test_think_values_become_the_templates_effort(think, effort):
    request = thinking_request(GPT_OSS_TEMPLATE, think)
    assert request.template_extra == ({} if effort is None else {"reasoning_effort": effort})
    assert request.enabled                                       # gpt-oss always thinks, as in Ollama and llama.cpp
    assert request.finish("p<|start|>assistant") == ("p<|start|>assistant", HARMONY)


def test_effort_is_written_into_the_system_message(harmony_model):
    for think, line in ((None, "Reasoning: medium"), (False, "Reasoning: medium"), ("low", "Reasoning: low"),
                        ("high", "Reasoning: high")):
        prompt = harmony_model.render_chat(USER, **thinking_request(harmony_model.template, think).template_extra)
        assert line in prompt and prompt.endswith("<|start|>assistant")


# ----------------------------------------------------------------------------- the parser

HARMONY_CASES = [
    # (output, thinking, content)
    (SCRIPT_TEXT, THOUGHT, ANSWER),
    (SCRIPT_TEXT + "<|end|><|start|>assistant<|channel|>final<|message|>more", THOUGHT, ANSWER),   # ends at <|end|>
    ("<|channel|>final<|message|>4", "", "4"),                                  # the answer with no analysis first
    ("<|channel|>analysis<|message|>cut by max_tokens <|en", "cut by max_tokens <|en", ""),
    ("<|channel|>analysis<|message|>\nI add.\n<|end|>\n<|start|>assistant<|channel|>final<|message|> 4 ", "I add.",
     "4 "),
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>analysis<|message|>b<|end|>"
     "<|start|>assistant<|channel|>final<|message|>c", "a\n\nb", "c"),               # two analysis messages
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>commentary to=functions.add "
     "<|constrain|>json<|message|>{\"a\": 1}", "a",
     "<|start|>assistant<|channel|>commentary to=functions.add <|constrain|>json<|message|>{\"a\": 1}"),
    ("Plain text, no channel.", "", "Plain text, no channel."),
    ("<|channel|>analysis<|message|>a<|end|>", "a", ""),
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>fi", "a", ""),   # a header cut short
    ("<|chan", "", "<|chan"),
    ("", "", ""),
]


@pytest.mark.parametrize("output, thinking, content", HARMONY_CASES)
def test_parser_whole_output(output, thinking, content):
    assert split_thought(output, HARMONY) == (thinking, content)


def _split_in_pieces(pieces: list[str]) -> tuple[str, str]:
    parser = ReasoningStreamParser(HARMONY)
    thinking, content = [], []
    for piece in pieces:
        t, c = parser.push(piece)
        thinking.append(t)
        content.append(c)
    t, c = parser.finish()
    assert (parser.thinking, parser.content) == ("".join(thinking) + t, "".join(content) + c)
    return parser.thinking, parser.content


@pytest.mark.parametrize("output, thinking, content", HARMONY_CASES)
def test_parser_any_chunking_gives_the_same_split(output, thinking, content):
    for size in (1, 2, 3, 5, 7):
        assert _split_in_pieces([output[i:i + size] for i in range(0, len(output), size)]) == (thinking, content)
    for cut in range(len(output) + 1):                             # every cut in two
        assert _split_in_pieces([output[:cut], output[cut:]]) == (thinking, content)


def test_parser_every_chunking_of_the_scripted_tokens():
    """All 2**11 ways to group the script's 12 tokens into pushes, and every cut of its text in three."""
    for grouping in itertools.product((False, True), repeat=len(SCRIPT) - 1):
        pieces, current = [], SCRIPT[0]
        for token, joined in zip(SCRIPT[1:], grouping):
            if joined:
                current += token
            else:
                pieces.append(current)
                current = token
        assert _split_in_pieces(pieces + [current]) == (THOUGHT, ANSWER)
    text = SCRIPT_TEXT
    for a in range(len(text) + 1):
        for b in range(a, len(text) + 1, 3):
            assert _split_in_pieces([text[:a], text[a:b], text[b:]]) == (THOUGHT, ANSWER)


def test_parser_streams_the_thought_as_it_comes():
    parser = ReasoningStreamParser(HARMONY)
    assert parser.push("<|channel|>analy") == ("", "")                     # maybe the thought's header: held
    assert parser.push("sis<|message|>Step one") == ("Step one", "")
    assert parser.push(" then two<|e") == (" then two", "")               # a beginning of <|end|>: held
    assert parser.push("nd|><|start|>assistant<|channel|>fin") == ("", "")
    assert parser.push("al<|message|>Done") == ("", "Done")
    assert parser.in_thought is False and parser.finish() == ("", "")


# ----------------------------------------------------------------------------- the grammar gate, token by token


class _HarmonyVocabulary:
    """A tokenizer stand-in: the token bytes are all the gate reads."""

    PIECES = [b"<|channel|>", b"analysis", b"<|message|>", b"<|end|>", b"<|start|>", b"assistant", b"final",
              b"fin", b"al", b"{", b"a", b"<|channel|>analysis<|message|>", b"<|end|>x", b" "]
    vocab_size = len(PIECES)

    def token_bytes(self, token_id: int) -> bytes:
        return self.PIECES[token_id]


def _ids(*pieces: bytes) -> list[int]:
    return [_HarmonyVocabulary.PIECES.index(p) for p in pieces]


def _allowed(out: np.ndarray) -> set[bytes]:
    return {_HarmonyVocabulary.PIECES[i] for i in np.flatnonzero(np.isfinite(out))}


def test_gate_spells_the_headers_then_runs_the_grammar():
    from tests.test_reasoning import _RecordingConstraint

    constraint = _RecordingConstraint()
    gate = reasoning.ConstraintAfterThought(HARMONY, constraint, _HarmonyVocabulary(), max_new_tokens=20)
    logits = np.zeros(_HarmonyVocabulary.vocab_size)
    assert _allowed(gate(logits, [9], 1)) == {b"<|channel|>", b"<|channel|>analysis<|message|>"}
    assert _allowed(gate(logits, [9] + _ids(b"<|channel|>"), 1)) == {b"analysis", b"a", b"fin", b"final"}
    thought = _ids(b"<|channel|>", b"analysis", b"<|message|>", b"a")
    inside = gate(logits, [9] + thought, 1)                          # free, but no text glued to <|end|>
    assert _allowed(inside) == set(_HarmonyVocabulary.PIECES) - {b"<|end|>x"} and constraint.seen == []
    header = _ids(b"<|end|>", b"<|start|>", b"assistant", b"<|channel|>", b"fin")
    assert _allowed(gate(logits, [9] + thought + header, 1)) == {b"al", b"a"}   # the final header, spelled on
    answer = thought + header + _ids(b"al", b"<|message|>", b"{")
    gate(logits, [9] + answer, 1)
    assert constraint.seen == [_ids(b"{")] and constraint.budgets == [20 - 11]


def test_gate_answer_header_at_the_start():
    from tests.test_reasoning import _RecordingConstraint

    constraint = _RecordingConstraint()
    gate = reasoning.ConstraintAfterThought(HARMONY, constraint, _HarmonyVocabulary(), max_new_tokens=10)
    logits = np.zeros(_HarmonyVocabulary.vocab_size)
    gate(logits, _ids(b"<|channel|>", b"final", b"<|message|>"), 0)
    assert constraint.seen == [[]] and constraint.budgets == [7]


# ----------------------------------------------------------------------------- the library


def test_gpt_oss_end_of_generation_tokens(harmony_model):
    tokenizer = harmony_model.tokenizer
    assert {token_id("<|return|>"), token_id("<|call|>")} <= set(tokenizer.eog_ids)
    assert token_id("<|end|>") not in tokenizer.eog_ids              # it ends a message, not the generation
    assert "thinking" in harmony_model.capabilities


def test_thought_and_answer_apart(harmony_model):
    result = harmony_model.chat(USER, details=True, max_tokens=30)
    assert (result.thinking, result.text, result.finish_reason) == (THOUGHT, ANSWER, "stop")
    assert result.usage.completion_tokens == len(SCRIPT) and result.usage.reasoning_tokens == 4
    assert harmony_model.chat(USER, max_tokens=30) == ANSWER


@pytest.mark.parametrize("think", [False, "none", True, "low", "high"])
def test_gpt_oss_thinks_whatever_think_says(harmony_model, think):
    result = harmony_model.chat(USER, details=True, think=think, max_tokens=30)
    assert (result.thinking, result.text) == (THOUGHT, ANSWER)


def test_effort_reaches_the_prompt(harmony_model):
    n_prompt = {think: harmony_model.chat(USER, details=True, think=think, max_tokens=1).usage.prompt_tokens
                for think in (None, "low", "high")}
    # "Reasoning: low|high|medium" in bytes (the tiny vocabulary has no merges): one token a character
    assert (n_prompt["high"] - n_prompt["low"], n_prompt[None] - n_prompt["low"]) == (1, 3)


def test_streamed_events_carry_the_thought_apart(harmony_model):
    events = list(harmony_model.chat(USER, stream=True, details=True, max_tokens=30))
    assert "".join(e.thinking for e in events) == THOUGHT and "".join(e.text for e in events) == ANSWER
    assert all(not (e.thinking and e.text) for e in events)
    assert "<|" not in "".join(e.text + e.thinking for e in events)


def test_thought_cut_by_max_tokens(harmony_model):
    result = harmony_model.chat(USER, details=True, max_tokens=4)
    assert (result.thinking, result.text, result.finish_reason) == (THOUGHT_1, "", "length")
    header_only = harmony_model.chat(USER, details=True, max_tokens=10)         # cut inside the final header
    assert (header_only.thinking, header_only.text) == (THOUGHT, "")


@pytest.mark.parametrize("schema", [ANSWER_SCHEMA, {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 5}, "n": {"type": "integer"}},
    "required": ["city", "n"], "additionalProperties": False}])
def test_json_schema_applies_after_the_final_header(harmony_model, schema):
    import jsonschema

    from localllm import constrain

    result = harmony_model.chat(USER, details=True, max_tokens=60, constraint=constrain.json_schema(schema))
    assert result.thinking == THOUGHT
    jsonschema.validate(json.loads(result.text), schema)
    if schema is ANSWER_SCHEMA:
        assert result.text == ANSWER


def test_earlier_thoughts_reach_the_template_as_it_expects(harmony_model):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
    turns = USER + [{"role": "assistant", "content": "", "thinking": "I should add.", "tool_calls": [call]},
                    {"role": "tool", "content": "4"}]
    for key in ("reasoning_content", "reasoning"):                # the OpenAI clients' names reach it as "thinking"
        renamed = [turns[0], {**{k: v for k, v in turns[1].items() if k != "thinking"}, key: "I should add."},
                   turns[2]]
        assert harmony_model.render_chat(renamed) == harmony_model.render_chat(turns)
    prompt = harmony_model.render_chat(turns)
    assert ("<|start|>assistant<|channel|>analysis<|message|>I should add.<|end|>"
            "<|start|>assistant to=functions.add<|channel|>commentary json<|message|>{\"a\": 2, \"b\": 2}<|call|>"
            "<|start|>functions.add to=assistant<|channel|>commentary<|message|>\"4\"<|end|>"
            "<|start|>assistant") in prompt
    done = turns + [{"role": "assistant", "content": "4", "thinking": "Added."}, {"role": "user", "content": "Again?"}]
    prompt = harmony_model.render_chat(done)
    assert "I should add." not in prompt and "Added." not in prompt          # dropped once a final answer follows
    assert "<|start|>assistant<|channel|>final<|message|>4<|end|>" in prompt


# ----------------------------------------------------------------------------- tool calls in the commentary channel

CALL_IN_CHANNEL = ('<|channel|>analysis<|message|>I should add.<|end|><|start|>assistant<|channel|>commentary '
                   'to=functions.add <|constrain|>json<|message|>{"a": 2, "b": 2}')
CALL_IN_ROLE = ('<|channel|>analysis<|message|>I should add.<|end|><|start|>assistant to=functions.add'
                '<|channel|>commentary json<|message|>{"a": 2, "b": 2}<|call|>')


@pytest.mark.parametrize("output", [CALL_IN_CHANNEL, CALL_IN_ROLE])
def test_a_call_after_the_thought_is_parsed_into_tool_calls(output):
    from localllm.tool_parser import ToolCallStreamParser, parse_tool_calls

    thinking, content = split_thought(output, HARMONY)
    assert thinking == "I should add."
    text, [call] = parse_tool_calls(content, ["add"])
    assert (text, call.name, json.loads(call.arguments_json)) == ("", "add", {"a": 2, "b": 2})
    for size in (1, 2, 5):                                   # streamed: the same call, whatever the pieces
        reasoning_parser, tool_parser, deltas = ReasoningStreamParser(HARMONY), ToolCallStreamParser(["add"]), []
        for i in range(0, len(output), size):
            deltas += tool_parser.push(reasoning_parser.push(output[i:i + size])[1])
        deltas += tool_parser.push(reasoning_parser.finish()[1]) + tool_parser.finish()
        assert [d for d in deltas if isinstance(d, str)] == []
        assert [(c.name, c.arguments_json) for c in tool_parser.calls] == [("add", call.arguments_json)]


@pytest.mark.parametrize("text", [
    "I go to=functions.now, not a call",                          # no <|message|>: text
    "to=functions.add<|end|><|start|>assistant<|channel|>final<|message|>{}",   # the header ended first
    "to=functions. <|message|>{}",                                # no name
])
def test_what_is_not_a_harmony_call_stays_text(text):
    from localllm.tool_parser import parse_tool_calls

    assert parse_tool_calls(text, ["add"]) == (text, [])


def test_a_call_at_the_start_of_the_output_and_text_around_it():
    from localllm.tool_parser import parse_tool_calls

    content, [call] = parse_tool_calls('Let me add.<|channel|>commentary to=functions.add <|constrain|>json'
                                       '<|message|>{"a": 1, "b": 3}<|call|> Done.', ["add"])
    assert (content, call.name, call.arguments_json) == ("Let me add. Done.", "add", '{"a": 1, "b": 3}')


def test_an_answer_ended_by_end_stops_the_generation(harmony_model):
    """gpt-oss may close its answer with <|end|> instead of <|return|>: generation stops there (finish "stop"),
    it does not run on to max_tokens writing text nobody gets."""
    from localllm.generate import GenerationParams, make_sequences, release
    from localllm.reasoning import HARMONY
    from localllm.sampling import SampledToken, SamplingParams

    params = GenerationParams(SamplingParams(temperature=0), max_tokens=40, reasoning=HARMONY)
    [seq] = make_sequences(harmony_model.tokenize("x"), params, harmony_model.tokenizer, harmony_model.cache, 1024)
    try:
        events = []
        for text in SCRIPT + ["<|end|>", "<|start|>", "assistant"]:
            if seq.finished:
                break
            events.append(seq.accept(SampledToken(token_id(text), np.zeros(token_id(text) + 1))))
    finally:
        release(harmony_model.cache, [seq])
    assert seq.finish_reason == "stop" and len(seq.generated) == len(SCRIPT) + 1     # stopped at the <|end|>
    assert "".join(e.thinking for e in events) == THOUGHT and "".join(e.text for e in events) == ANSWER
    assert events[-1].finish_reason == "stop"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_a_forced_call_is_a_commentary_message_after_the_thought(harmony_model, tool_choice):
    """gpt-oss's own call format: after the thought, ``<|start|>assistant<|channel|>commentary to=functions.add
    <|constrain|>json<|message|>{arguments}`` (special tokens, not their text spelled in bytes), then ``<|call|>``."""
    from localllm.tools import tool_call_style

    tools = [{"type": "function", "function": {"name": "add", "parameters": {     # (the random model writes digits
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},   # until the budget's
        "required": ["a", "b"], "additionalProperties": False}}},                   # end: "b" must still come)
             {"type": "function", "function": {"name": 'say "hi"', "parameters": {"type": "object"}}}]
    assert tool_call_style(harmony_model.template) == "harmony"
    result = harmony_model.chat(USER, details=True, tools=tools, tool_choice=tool_choice, max_tokens=120,
                                temperature=0)
    [choice] = result.choices
    assert choice.thinking == THOUGHT
    [call] = choice.tool_calls
    arguments = json.loads(call.arguments_json)
    assert call.name == "add" or tool_choice == "required"
    if call.name == "add":
        assert set(arguments) == {"a", "b"} and all(isinstance(v, int) for v in arguments.values())
    assert choice.finish_reason == "tool_calls"
    ids = choice.token_ids
    header = [token_id("<|start|>"), token_id("assistant"), token_id("<|channel|>")]
    at = next(i for i in range(len(ids)) if ids[i:i + 3] == header)           # the message after the thought
    assert token_id("<|constrain|>") in ids[at:] and token_id("<|message|>") in ids[at:]
    assert token_id("final") not in ids[at:]                                  # not the final channel
