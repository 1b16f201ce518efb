"""Chat templates: the model's own jinja2 template turns a list of messages into a prompt.

Rendering follows Hugging Face transformers' ``apply_chat_template``: an
``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, a ``{% generation %}`` block tag (rendered as its body),
``raise_exception(message)``, ``strftime_now(format)`` and a ``tojson`` filter that keeps
non-ASCII characters (``ensure_ascii=False``). The template sees ``messages``, ``tools``,
``add_generation_prompt``, ``bos_token``, ``eos_token`` and any extra keyword given to
``render`` (e.g. ``enable_thinking``, ``documents``).

Messages are adapted the way llama.cpp does for OpenAI-style input, without touching the
caller's objects:

* ``content`` given as a list of parts (``[{"type": "text", "text": ...}]``) is kept as a
  list when the template renders typed parts itself, else the text parts are joined with
  "\\n". Parts other than text raise ``ChatTemplateError`` (text-only models).
* ``content: None`` (assistant messages that only call tools) becomes "".
* ``tool_calls[].function.arguments`` given as a JSON string is parsed into an object when
  the template would otherwise JSON-encode the string a second time.
* The thought of an earlier assistant turn, given as ``thinking`` (Ollama) or ``reasoning``
  (vLLM, Ollama's /v1), is passed as ``reasoning_content`` (llama.cpp, DeepSeek), the name
  reasoning templates read (Qwen 3 keeps it only after the last user turn); other templates
  ignore it.

``DEFAULT_CHAT_TEMPLATE`` (ChatML) is used when the model has no template::

    <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")   # a message's earlier thought, by client
_PROBE_TEXT = "localllm-typed-content-probe"
_PROBE_ARGUMENTS = '{"localllm_probe_arg": "probe value"}'


class ChatTemplateError(ValueError):
    """The template could not be compiled or rendered (the message is jinja's, or the template's own)."""


NO_TEMPLATE_MESSAGE = ("this model has no chat template: send a raw prompt to /v1/completions or /api/generate, "
                       "or give the model a TEMPLATE in a Modelfile (localllm create)")


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker): renders the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template.

    template: the jinja2 source (``Tokenizer.chat_template``), or None for ``DEFAULT_CHAT_TEMPLATE``.
    bos_token, eos_token: the texts the template may write (``Tokenizer.bos_token``/``eos_token``).
    """

    def __init__(self, template: str | None, bos_token: str | None = None, eos_token: str | None = None):
        self.source = DEFAULT_CHAT_TEMPLATE if template is None else template
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from exc
        self._typed_content: bool | None = None
        self._object_arguments: bool | None = None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **extra: Any) -> str:
        """The prompt text for ``messages`` (OpenAI-style dicts: role, content, tool_calls, ...)."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ChatTemplateError("messages must be a list of objects")
        prepared = [self._prepare(message, index) for index, message in enumerate(messages)]
        return self._render(prepared, add_generation_prompt, tools, extra)

    # ---------------------------------------------------------------- internals
    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None,
                extra: dict[str, Any]) -> str:
        context = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", **extra}
        try:
            return self._template.render(messages=messages, tools=tools,
                                         add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(str(exc.message if exc.message is not None else exc)) from exc
        except Exception as exc:  # the template's own type errors (e.g. None + str)
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc

    def _prepare(self, message: dict, index: int) -> dict:
        message = dict(message)
        content = message.get("content")
        if content is None and "content" in message:
            message["content"] = ""
        elif isinstance(content, list):
            message["content"] = self._prepare_parts(content, index)
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [self._prepare_tool_call(call) for call in message["tool_calls"]]
        if not message.get("reasoning_content"):
            thought = next((message[key] for key in REASONING_KEYS if isinstance(message.get(key), str)
                            and message[key]), None)
            if thought is not None:
                message["reasoning_content"] = thought
        return message

    def _prepare_parts(self, parts: list, index: int) -> str | list:
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ChatTemplateError(
                    f"messages[{index}].content: only text parts are supported, got {kind or part!r}")
        if self._supports_typed_content():
            return [dict(part) for part in parts]
        return "\n".join(part["text"] for part in parts)

    def _prepare_tool_call(self, call: Any) -> Any:
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            return call
        arguments = call["function"].get("arguments")
        if not isinstance(arguments, str) or not self._wants_object_arguments():
            return call
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return call
        return {**call, "function": {**call["function"], "arguments": parsed}}

    def _probe(self, messages: list[dict]) -> str | None:
        try:
            return self._render(messages, False, None, {})
        except ChatTemplateError:
            return None

    def _supports_typed_content(self) -> bool:
        """Does the template render ``content`` given as a list of text parts by itself?"""
        if self._typed_content is None:
            output = self._probe([{"role": "user", "content": [{"type": "text", "text": _PROBE_TEXT}]}])
            self._typed_content = (output is not None and _PROBE_TEXT in output
                                   and "'type'" not in output and '"type"' not in output)
        return self._typed_content

    def _wants_object_arguments(self) -> bool:
        """Does the template expect tool-call arguments as an object (it JSON-encodes them)?"""
        if self._object_arguments is None:
            def conversation(arguments):
                call = {"id": "call_probe", "type": "function",
                        "function": {"name": "probe_tool", "arguments": arguments}}
                return [{"role": "user", "content": "probe"},
                        {"role": "assistant", "content": "", "tool_calls": [call]}]

            as_string = self._probe(conversation(_PROBE_ARGUMENTS))
            as_object = self._probe(conversation(json.loads(_PROBE_ARGUMENTS)))
            double_encoded = json.dumps(_PROBE_ARGUMENTS)[1:-1]
            self._object_arguments = as_object is not None and (as_string is None or double_encoded in as_string)
        return self._object_arguments


class MissingChatTemplate(ChatTemplate):
    """The template of a model that has none: rendering a chat raises ChatTemplateError saying what to do."""

    def __init__(self):
        super().__init__("")

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **extra: Any) -> str:
        raise ChatTemplateError(NO_TEMPLATE_MESSAGE)
