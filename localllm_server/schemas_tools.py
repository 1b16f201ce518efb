"""Validation of tools: function definitions, ``tool_choice``, the ``tool_calls`` of earlier assistant messages.

Shared by /v1/chat/completions and /v1/responses (whose flattened tools are converted to
the chat shape first). Every error is a 400 naming the request field. The parameter
schemas are only checked for shape here; whether llguidance can enforce them is known
when a call is forced (``localllm.tools.tool_call_constraint``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import bad_request

PARAMETERS_SCHEMA = {"type": "object", "required": ["type"], "properties": {
    "type": {"anyOf": [{"const": "object"}, {"type": "array", "contains": {"const": "object"}}]}},
    "description": "JSON schema of the arguments object (\"type\": \"object\"); a forced call (tool_choice "
                   "required or named) needs one the grammar can enforce (else 400)"}
FUNCTION_SCHEMA = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}, "description": {"type": ["string", "null"]},
    "parameters": {"anyOf": [PARAMETERS_SCHEMA, {"type": "null"}]}, "strict": {"type": ["boolean", "null"]}},
    "description": "function names must differ within tools (else 400)"}
CHAT_TOOL_SCHEMA = {"type": "object", "required": ["function"], "properties": {
    "type": {"const": "function"}, "function": FUNCTION_SCHEMA}}
TOOL_CALL_SCHEMA = {"type": "object", "required": ["function"], "properties": {
    "id": {"type": ["string", "null"]}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1},
        "arguments": {"anyOf": [{"type": "string", "description": "the arguments object as JSON text"},
                                {"type": "object"}, {"type": "null"}]}}}}}
TOOL_CHOICE_SCHEMA = {"anyOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {
    "type": "object", "required": ["function"], "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]}
TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
TOOL_CHOICE_MESSAGE = "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}"


def parse_function(function, param: str, where: str) -> dict:
    """One function definition ``{name, description?, parameters?, strict?}``, checked; 400 naming ``param``.

    ``parameters`` must be a JSON schema for an object (``"type": "object"``): the
    arguments of a call are always a JSON object. Without it the function takes none.
    """
    if not isinstance(function, dict):
        raise bad_request(f"{where} must be an object", param)
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise bad_request(f"{where}.name must be 1 to 64 letters, digits, '_', '.' or '-', got {name!r}", param)
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{where}.description must be a string", param)
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    kind = parameters.get("type") if isinstance(parameters, dict) else None
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise bad_request(f"{where}.parameters must be a JSON schema with \"type\": \"object\"", param)
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request(f"{where}.strict must be a boolean", param)
    out = {"name": name}
    if description is not None:
        out["description"] = description
    out["parameters"] = parameters
    return out


def check_tool_names(tools: list[dict], param: str) -> list[dict]:
    seen = set()
    for index, tool in enumerate(tools):
        name = tool["function"]["name"]
        if name in seen:
            raise bad_request(f"{param}[{index}].function.name '{name}' is defined twice", param)
        seen.add(name)
    return tools


def parse_tools(value, param):
    """OpenAI chat tools ``[{"type": "function", "function": {...}}]``, normalized (see :func:`parse_function`)."""
    if not isinstance(value, list):
        raise bad_request(f"{param} must be a list of function tools", param)
    tools = []
    for index, tool in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise bad_request(f"{where}.type must be 'function'", param)
        tools.append({"type": "function", "function": parse_function(tool.get("function"), param,
                                                                      f"{where}.function")})
    return check_tool_names(tools, param)


@dataclass(frozen=True)
class NamedFunction:
    """A ``tool_choice`` naming the function to call (kept apart from the strings "none", "auto", "required")."""

    name: str


def parse_tool_choice(value, param):
    """"none" | "auto" | "required" | NamedFunction."""
    if value in ("none", "auto", "required"):
        return value
    function = value.get("function") if isinstance(value, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str) \
            and value.get("type", "function") == "function":
        return NamedFunction(function["name"])
    raise bad_request(f"{param} must be {TOOL_CHOICE_MESSAGE}", param)


def resolve_tool_choice(tool_choice, tools: list[dict], param: str = "tool_choice") -> str:
    """The effective choice: "none", "auto", "required" or a function name (OpenAI defaults: "auto" with tools).

    400 naming ``param`` for "required" without tools or a function that is not in ``tools``.
    """
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, NamedFunction):
        name = tool_choice.name
        if name not in [tool["function"]["name"] for tool in tools]:
            raise bad_request(f"{param} names function '{name}', which is not in tools", param)
        return name
    if tool_choice == "required" and not tools:
        raise bad_request(f"{param} 'required' needs at least one function in tools", param)
    return "none" if not tools else tool_choice


def parse_tool_call(call, param) -> dict:
    """An assistant message's ``tool_calls[i]``: ``{id, type, function: {name, arguments}}``."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise bad_request(f"{param} must be {{\"id\", \"type\": \"function\", \"function\": "
                          f"{{\"name\", \"arguments\"}}}}", param)
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, (str, dict)):
        raise bad_request(f"{param}.function.arguments must be a JSON string", param)
    if call.get("id") is not None and not isinstance(call["id"], str):
        raise bad_request(f"{param}.id must be a string", param)
    out = {"type": "function", "function": {"name": function["name"],
                                            "arguments": arguments if arguments is not None else "{}"}}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def check_format_and_tools(response_format: dict | None, tool_choice: str, param: str = "response_format") -> None:
    """JSON output formats and tool calls exclude each other: 400 unless tool_choice is "none".

    A JSON-constrained answer could never hold a tool call, and a forced call is not the
    requested JSON; rather than pick one silently, the request is refused.
    """
    if response_format and response_format.get("type") in ("json_object", "json_schema") and tool_choice != "none":
        raise bad_request(f"{param} {response_format['type']} cannot be combined with tools unless tool_choice is "
                          "'none' (a JSON answer cannot hold a tool call)", param)
