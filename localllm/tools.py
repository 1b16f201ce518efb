"""Tools (function calling): prompt rendering, ``tool_choice`` and forced calls.

:func:`prepare_chat` does all of it for a chat request and returns a :class:`ChatPlan`
(prompt, constraint, and how to read the output). The pieces it goes through::

    tools = validate_tools(request_tools)                         # OpenAI/Ollama tool list, checked
    choice = normalize_tool_choice(request_tool_choice, tools)    # "none" | "auto" | "required" | a name
    prompt = render_tools_prompt(model, messages, tools, choice)  # the model's template, or the default block
    constraint = tool_call_constraint(tools, choice, style=tool_call_style(model.template))
    text = model.generate(prompt, constraint=constraint, ...)
    content, calls = parse_tool_calls(text, tools)                # or ToolCallStreamParser when streaming

Templates that know ``tools`` (Qwen 2.5, Llama 3.1, Mistral, Hermes ...) render the tools,
the assistant ``tool_calls`` and the ``tool`` messages themselves. For templates that do
not (SmolLM2's), :func:`apply_tools` rewrites the conversation into plain messages in the
Hermes format, which is also what the output is parsed and forced in:

* a system block listing the functions (:func:`tools_system_prompt`) and asking for
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
* assistant messages with ``tool_calls`` become text with one such block per call;
* ``tool`` messages become user messages ``<tool_response>\\n...\\n</tool_response>``
  (consecutive results share one message, in the order of the calls).

``tool_choice`` (OpenAI semantics; Ollama has none and means "auto"):
``"none"`` renders no tools and parses no calls; ``"auto"`` parses calls when the model
writes them; ``"required"`` forces at least one call to one of the tools through the
grammar (arguments constrained by that tool's ``parameters`` schema); a named function
``{"type": "function", "function": {"name": ...}}`` forces a call to that function.
"""
from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from . import constrain
from .tool_parser import ToolCall, ToolCallDelta, ToolCallStreamParser, new_call_id, parse_tool_calls

__all__ = ["ChatPlan", "ToolCall", "ToolCallDelta", "ToolCallStreamParser", "apply_tools", "new_call_id",
           "normalize_tool_choice", "parse_tool_calls", "prepare_chat", "render_tools_prompt",
           "template_supports_tools", "tool_call_constraint", "tool_call_style", "tool_call_text",
           "tools_system_prompt", "validate_tools"]

TOOL_CHOICES = ("none", "auto", "required")
TOOL_STYLES = ("hermes", "llama", "mistral", "harmony")
HARMONY_CALL_HEADER = "<|channel|>commentary"   # gpt-oss: a call is a commentary message to functions.NAME
_PROBE_TOOL = "localllm_probe_tool"

DEFAULT_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


# ----------------------------------------------------------------------------- request fields


def validate_tools(tools: Any) -> list[dict]:
    """The request's ``tools`` as a list of ``{"type": "function", "function": {...}}`` (None -> []).

    Raises ValueError naming the bad entry (``tools[i].function.name`` ...). The
    ``parameters`` schemas are checked when a constraint is built from them.
    """
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ValueError("tools must be a list of function tools")
    out, seen = [], set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError(f"{where}.type must be 'function'")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ValueError(f"{where}.function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.function.name must be a non-empty string")
        if name in seen:
            raise ValueError(f"{where}.function.name '{name}' is defined twice")
        seen.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ValueError(f"{where}.function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": dict(function)})
    return out


def normalize_tool_choice(tool_choice: Any, tools: list[dict]) -> str:
    """``"none"``, ``"auto"``, ``"required"`` or the name of the forced function.

    None means "auto" when there are tools and "none" otherwise (OpenAI's defaults).
    Raises ValueError for unknown values, a named function that is not in ``tools``,
    or "required"/a name without tools.
    """
    names = [tool["function"]["name"] for tool in tools]
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a function, got {tool_choice!r}")
        if tool_choice == "required" and not tools:
            raise ValueError("tool_choice 'required' needs at least one tool in tools")
        return tool_choice
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or tool_choice.get("type", "function") != "function":
        raise ValueError('tool_choice must be a string or {"type": "function", "function": {"name": ...}}')
    if name not in names:
        raise ValueError(f"tool_choice names function '{name}', which is not in tools")
    return name


# ----------------------------------------------------------------------------- prompt


_TEMPLATE_SUPPORT: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()
_TEMPLATE_LOCK = threading.Lock()


def template_supports_tools(template) -> bool:
    """Does this ``ChatTemplate`` render the ``tools`` variable? (probed once per template object)."""
    with _TEMPLATE_LOCK:
        known = _TEMPLATE_SUPPORT.get(template)
    if known is None:
        probe = [{"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        try:
            output = template.render([{"role": "user", "content": "probe"}], add_generation_prompt=True, tools=probe)
            known = _PROBE_TOOL in output
        except ValueError:
            known = False
        with _TEMPLATE_LOCK:
            _TEMPLATE_SUPPORT[template] = known
    return known


def tool_call_style(template) -> str:
    """The call format the model was trained on, guessed from its template: "hermes", "llama", "mistral" or
    "harmony" (gpt-oss's channels).

    Templates without tool support get "hermes" (the default block asks for it).
    """
    if not template_supports_tools(template):
        return "hermes"
    source = getattr(template, "source", "") or ""
    if "<|channel|>" in source:
        return "harmony"
    if "<tool_call>" in source:
        return "hermes"
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama"
    return "hermes"


def tools_system_prompt(tools: list[dict]) -> str:
    """The default tools block (Hermes style) for templates that do not render ``tools``."""
    listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return DEFAULT_TOOLS_PROMPT.format(tools=listing)


def tool_call_text(name: str, arguments: Any) -> str:
    """One call in the Hermes format: ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    body = json.dumps({"name": name, "arguments": arguments if arguments is not None else {}}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def _text_content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return json.dumps(content, ensure_ascii=False)


def apply_tools(messages: list[dict], tools: list[dict] | None, template_supports_tools: bool,
                system: str | None = None) -> list[dict]:
    """Messages ready for the chat template (the caller's objects are not modified).

    With ``template_supports_tools`` the messages are returned as they are (the template
    renders ``tools``, ``tool_calls`` and ``tool`` messages; pass ``tools`` to it). Without,
    tool calls and results are rewritten in the Hermes format and, when ``tools`` is not
    empty, the tools block is appended to the system message (one is created from
    ``system``, e.g. the Modelfile SYSTEM, when the conversation has none).
    Ollama's message fields (``tool_calls[].function.arguments`` as objects, ``tool_name``)
    are accepted too.
    """
    if template_supports_tools:
        return [dict(message) for message in messages]
    out: list[dict] = []
    last_was_tool = False
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = [tool_call_text(call.get("function", {}).get("name", ""), call.get("function", {}).get("arguments"))
                     for call in message["tool_calls"] if isinstance(call, dict)]
            content = _text_content(message.get("content")).strip()
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + calls)})
            last_was_tool = False
        elif role == "tool":
            response = f"<tool_response>\n{_text_content(message.get('content'))}\n</tool_response>"
            if last_was_tool:
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + response}
            else:
                out.append({"role": "user", "content": response})
            last_was_tool = True
        else:
            out.append(dict(message))
            last_was_tool = False
    if tools:
        block = tools_system_prompt(tools)
        if out and out[0].get("role") == "system":
            first = _text_content(out[0].get("content"))
            out[0] = {**out[0], "content": f"{first}\n\n{block}" if first else block}
        else:
            out.insert(0, {"role": "system", "content": f"{system}\n\n{block}" if system else block})
    return out


def render_tools_prompt(model, messages: list[dict], tools: list[dict] | None, tool_choice: str = "auto",
                        **extra) -> str:
    """The prompt for a chat request with tools on ``model`` (a ``localllm.api.Model``).

    ``tool_choice`` "none" renders no tools (earlier calls and results are still rendered).
    Uses ``model.render_chat``, so the model's SYSTEM and template apply as for any chat.
    """
    tools = tools if tools and tool_choice != "none" else None
    supports = template_supports_tools(model.template)
    prepared = apply_tools(messages, tools, supports, system=getattr(model, "system", None))
    return model.render_chat(prepared, add_generation_prompt=True, tools=tools if supports else None, **extra)


# ----------------------------------------------------------------------------- forced calls


def _call_schema(tool: dict, arguments_key: str) -> dict:
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    try:
        constrain.json_schema(parameters, name=function["name"])
    except constrain.UnsupportedSchema as exc:
        raise constrain.UnsupportedSchema(f"tool '{function['name']}' parameters: {exc}") from None
    return {"type": "object", "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
            "required": ["name", arguments_key], "additionalProperties": False}


def tool_call_constraint(tools: list[dict], tool_choice: str, style: str = "hermes",
                         parallel_tool_calls: bool = False) -> constrain.Constraint | None:
    """The grammar that forces a call for ``tool_choice`` "required" or a function name; None otherwise.

    style: the call format (:func:`tool_call_style`): "hermes" ``<tool_call>\\n{...}\\n</tool_call>``,
        "llama" ``{"name", "parameters"}``, "mistral" ``[TOOL_CALLS] [{...}]`` or "harmony"
        ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{arguments}`` (gpt-oss; the
        constraint's ``answer_header`` makes the reasoning gate spell the commentary header, not the final one).
    parallel_tool_calls: let a "required" grammar take several calls (Hermes: one block per
        line; Mistral: several array items). Off by default, unlike OpenAI's flag: forced
        small models tend to repeat the same call until the token budget runs out, so pass
        True only when the request asked for it explicitly. A named function is always one call.
    The JSON inside follows ``{"name": <const>, "arguments": <the tool's parameters schema>}``;
    after the call(s) only end-of-generation tokens are allowed. Raises UnsupportedSchema
    naming the tool whose parameters cannot be enforced.
    """
    if tool_choice in ("none", "auto"):
        return None
    if style not in TOOL_STYLES:
        raise ValueError(f"style must be one of {', '.join(TOOL_STYLES)}, got {style!r}")
    chosen = tools if tool_choice == "required" else [t for t in tools if t["function"]["name"] == tool_choice]
    if not chosen:
        raise ValueError(f"tool_choice {tool_choice!r} matches no tool")
    arguments_key = "parameters" if style == "llama" else "arguments"
    parallel_tool_calls = parallel_tool_calls and tool_choice == "required"
    schemas = [_call_schema(tool, arguments_key) for tool in chosen]
    if style == "harmony":                      # the name in the header, the arguments alone as the message
        rules = "start: " + " | ".join(f"call{i}" for i in range(len(chosen))) + "\n"
        for i, (tool, schema) in enumerate(zip(chosen, schemas)):
            recipient = json.dumps(f" to=functions.{tool['function']['name']} ")     # a quoted, escaped literal
            rules += f'call{i}: {recipient} <|constrain|> "json" <|message|> args{i}\n'
            rules += f"args{i}: " + constrain.schema_json_grammar_fragment(schema["properties"][arguments_key]) + "\n"
        return constrain.lark(rules, kind="tool_call", answer_header=HARMONY_CALL_HEADER)
    body = constrain.schema_json_grammar_fragment(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})
    if style == "hermes":
        rules = 'start: call ("\\n" call)*\n' if parallel_tool_calls else "start: call\n"
        rules += 'call: "<tool_call>\\n" body "\\n</tool_call>"\n'
    elif style == "mistral":
        rules = 'start: "[TOOL_CALLS] [" body (", " body)* "]"\n' if parallel_tool_calls else \
            'start: "[TOOL_CALLS] [" body "]"\n'
    else:
        rules = "start: body\n"
    return constrain.lark(rules + "body: " + body + "\n", kind="tool_call")


# ----------------------------------------------------------------------------- one call for a chat request


@dataclass
class ChatPlan:
    """What a chat request with tools and/or a response format needs, from :func:`prepare_chat`.

    prompt: the rendered prompt text (give it to ``model.generate`` / ``model.stream``).
    constraint: pass as ``constraint=`` (None: unconstrained).
    tools, tool_choice: the validated tools and the normalized choice.
    """

    prompt: str
    constraint: constrain.Constraint | None
    tools: list[dict] = field(default_factory=list)
    tool_choice: str = "none"

    @property
    def parses_tool_calls(self) -> bool:
        """Whether the output is read for tool calls (tools given and tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a finished choice; (text, []) when no calls are parsed."""
        if not self.parses_tool_calls:
            return text, []
        return parse_tool_calls(text, self.tools)

    def stream_parser(self) -> ToolCallStreamParser | None:
        """A fresh streaming parser for one choice, or None when the text goes out as it is."""
        return ToolCallStreamParser(self.tools) if self.parses_tool_calls else None

    @staticmethod
    def finish_reason(finish_reason: str, calls: list) -> str:
        """OpenAI's finish_reason: "tool_calls" when the choice made calls, else the generator's."""
        return "tool_calls" if calls else finish_reason


def prepare_chat(model, messages: list[dict], tools: Any = None, tool_choice: Any = None,
                 parallel_tool_calls: bool | None = None, constraint: constrain.Constraint | None = None,
                 **template_extra) -> ChatPlan:
    """Prompt and constraint for a chat request on ``model`` (a ``localllm.api.Model``).

    tools, tool_choice, parallel_tool_calls: the request's fields, unvalidated (ValueError
        naming the field when bad). Only an explicit ``parallel_tool_calls=True`` lets a
        forced grammar take several calls (see :func:`tool_call_constraint`).
    constraint: the response format's constraint (``constrain.from_response_format`` /
        ``from_ollama_format``); a forced tool call takes precedence over it.
    """
    tools = validate_tools(tools)
    choice = normalize_tool_choice(tool_choice, tools)
    prompt = render_tools_prompt(model, messages, tools, choice, **template_extra)
    forced = tool_call_constraint(tools, choice, style=tool_call_style(model.template),
                                  parallel_tool_calls=parallel_tool_calls is True)
    return ChatPlan(prompt, forced or constraint, tools, choice)
