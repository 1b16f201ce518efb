"""Modelfiles: parse them, render them back, and create store models from them.

A Modelfile describes a model the way Ollama's do, one directive per line::

    # comments start with '#'
    FROM smollm2:135m                      # a store name, a .gguf file, or a Hugging Face folder
    FROM ./mmproj-model-f16.gguf           # optional: a vision projector (see below)
    PARAMETER num_ctx 8192
    PARAMETER temperature 0.2
    PARAMETER stop "<|im_end|>"            # repeatable: the values make a list
    SYSTEM You are a terse assistant.
    TEMPLATE \"\"\"{% for m in messages %}...{% endfor %}\"\"\"
    MESSAGE user Is the sky blue?
    MESSAGE assistant Yes.
    LICENSE \"\"\"Apache 2.0\"\"\"

Directive names are case-insensitive. A value runs to the end of its line, or is
quoted: ``"..."`` on one line (JSON escapes such as ``\\"`` and ``\\n`` work), or
``\"\"\"...\"\"\"`` over several lines, kept verbatim.

Unlike Ollama, a ``TEMPLATE`` is a **jinja2 chat template** (the kind Hugging Face
models ship in ``tokenizer_config.json`` and GGUF files carry as
``tokenizer.chat_template``), not a Go template: it sees ``messages``, ``tools``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``. Ollama's ``{{ .Prompt }}``
syntax is refused with a message saying so.

``PARAMETER`` keys and their types are in :data:`PARAMETER_TYPES`; they become the
model's defaults on every route (a request overrides only what it sets). An unknown
directive or parameter, a value of the wrong type, an unterminated quote or a missing
``FROM`` raise :class:`ModelfileError` naming the line.

As in Ollama, a second ``FROM`` names the model's vision projector, in either order: the
projector is the GGUF file whose ``general.architecture`` is ``clip`` (llama.cpp's mmproj
files), or a Hugging Face vision-language folder (Gemma 3, LLaVA: a ``vision_config``)
beside a model of another source. Two models or two projectors are a ModelfileError naming
the second line; a projector whose embeddings do not fit the model is refused before
anything is stored (``model_info.ProjectorMismatch``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["Modelfile", "ModelfileError", "PARAMETER_TYPES", "LIST_PARAMETERS", "parse_modelfile", "parse_parameter",
           "normalize_parameters", "check_template", "render_modelfile", "format_parameters", "is_path_reference",
           "create_model", "modelfile_from_request", "validate", "split_sources"]

# PARAMETER name -> type of its value ("str" values of `stop` make a list)
PARAMETER_TYPES: dict[str, type] = {
    "num_ctx": int,
    "num_predict": int,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "repeat_penalty": float,
    "repeat_last_n": int,
    "frequency_penalty": float,
    "presence_penalty": float,
    "seed": int,
    "stop": str,
}
LIST_PARAMETERS = frozenset({"stop"})
DIRECTIVES = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "MESSAGE", "LICENSE", "ADAPTER")
MESSAGE_ROLES = ("system", "user", "assistant")
_GO_TEMPLATE = re.compile(r"\{\{-?\s*(\.|if \.|range \.|end\b)")

Progress = Callable[[dict], None]


class ModelfileError(ValueError):
    """A Modelfile (or a create request) that cannot make a model; ``line`` is 1-based when known."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


@dataclass
class Modelfile:
    """The directives of one Modelfile, typed."""

    from_: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    license: str | None = None
    adapters: list[str] = field(default_factory=list)
    # the second FROM: the vision projector. Parsing keeps the lines' order; split_sources (create_model) finds
    # which of the two is the model and which the projector by their contents.
    projector: str | None = None
    from_line: int | None = field(default=None, compare=False, repr=False)        # where each FROM was written
    projector_line: int | None = field(default=None, compare=False, repr=False)

    def create_request(self, name: str, base_dir: str | os.PathLike | None = None) -> dict:
        """The body of an Ollama ``POST /api/create`` that makes this model as ``name``.

        A ``FROM`` path is made absolute (relative paths start at ``base_dir``, the
        Modelfile's folder), so a server on the same machine finds the file. A second
        ``FROM`` goes as ``projector`` (localllm's field beside ``from``: a path on the server).
        """
        def absolute(value: str | None) -> str | None:
            if value is not None and is_path_reference(value, base_dir):
                return str(_resolve_path(value, base_dir).resolve())
            return value

        body: dict[str, Any] = {"model": name, "from": absolute(self.from_)}
        if self.projector is not None:
            body["projector"] = absolute(self.projector)
        for key in ("template", "system", "license"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        if self.parameters:
            body["parameters"] = dict(self.parameters)
        if self.messages:
            body["messages"] = [dict(m) for m in self.messages]
        if self.adapters:
            body["adapters"] = list(self.adapters)
        return body


# ---------------------------------------------------------------------------------------------- parsing

def parse_modelfile(text: str, require_from: bool = True) -> Modelfile:
    """Parse Modelfile ``text``; raises :class:`ModelfileError` with the line number of the bad directive.

    ``require_from=False`` accepts a Modelfile without ``FROM`` (its source given elsewhere).
    """
    if not isinstance(text, str):
        raise ModelfileError(f"a Modelfile must be text, got {type(text).__name__}")
    text = text.replace("\r\n", "\n")
    modelfile = Modelfile()
    licenses: list[str] = []
    pos = 0
    while pos < len(text):
        line_end = _line_end(text, pos)
        stripped = text[pos:line_end].strip()
        line_no = text.count("\n", 0, pos) + 1
        if not stripped or stripped.startswith("#"):
            pos = line_end + 1
            continue
        start = pos + (len(text[pos:line_end]) - len(text[pos:line_end].lstrip()))
        directive = re.match(r"\S+", text[start:line_end]).group(0)
        keyword = directive.upper()
        if keyword not in DIRECTIVES:
            raise ModelfileError(f"unknown directive {directive!r} (expected one of {', '.join(DIRECTIVES)})",
                                 line_no)
        pos = start + len(directive)
        if keyword == "PARAMETER":
            key, pos = _word(text, pos, line_no, "PARAMETER needs a name and a value")
            value, pos = _value(text, pos, line_no, f"PARAMETER {key} needs a value")
            _add_parameter(modelfile.parameters, key, value, line_no)
        elif keyword == "MESSAGE":
            role, pos = _word(text, pos, line_no, "MESSAGE needs a role and a text")
            if role.lower() not in MESSAGE_ROLES:
                raise ModelfileError(f"MESSAGE role {role!r} must be one of {', '.join(MESSAGE_ROLES)}", line_no)
            content, pos = _value(text, pos, line_no, f"MESSAGE {role} needs a text")
            modelfile.messages.append({"role": role.lower(), "content": content})
        else:
            value, pos = _value(text, pos, line_no, f"{keyword} needs a value")
            if keyword == "FROM":
                if modelfile.projector is not None:
                    raise ModelfileError("a third FROM line: a Modelfile names one model and at most one vision "
                                         "projector", line_no)
                if modelfile.from_ is None:
                    modelfile.from_, modelfile.from_line = value.strip(), line_no
                else:
                    modelfile.projector, modelfile.projector_line = value.strip(), line_no
            elif keyword == "TEMPLATE":
                modelfile.template = check_template(value, line_no)
            elif keyword == "SYSTEM":
                modelfile.system = value
            elif keyword == "LICENSE":
                licenses.append(value)
            else:
                modelfile.adapters.append(value.strip())
        rest_end = _line_end(text, pos)
        if text[pos:rest_end].strip():
            raise ModelfileError(f"unexpected text after the value: {text[pos:rest_end].strip()!r}",
                                 text.count("\n", 0, pos) + 1)
        pos = rest_end + 1
    if modelfile.from_ is None and require_from:
        raise ModelfileError("no FROM line: a Modelfile must say which model it builds on")
    modelfile.license = "\n".join(licenses) if licenses else None
    return modelfile


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def _word(text: str, pos: int, line_no: int, missing: str) -> tuple[str, int]:
    """The next whitespace-delimited word on the current line."""
    match = re.compile(r"[ \t]*([^\s\"]+)").match(text, pos)
    if not match:
        raise ModelfileError(missing, line_no)
    return match.group(1), match.end()


def _value(text: str, pos: int, line_no: int, missing: str) -> tuple[str, int]:
    """A value from ``pos``: triple-quoted (multi-line), double-quoted (one line), or the rest of the line."""
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    line_end = _line_end(text, pos)
    if text.startswith('"""', pos):
        close = text.find('"""', pos + 3)
        if close < 0:
            raise ModelfileError('unterminated """ quote', line_no)
        return text[pos + 3:close], close + 3
    if text.startswith('"', pos):
        close = _closing_quote(text, pos + 1, line_end)
        if close < 0:
            raise ModelfileError('unterminated " quote (use """ for values over several lines)', line_no)
        quoted = text[pos:close + 1]
        try:
            return json.loads(quoted), close + 1
        except json.JSONDecodeError:
            return quoted[1:-1], close + 1
    value = text[pos:line_end].strip()
    if not value:
        raise ModelfileError(missing, line_no)
    return value, line_end


def _closing_quote(text: str, pos: int, line_end: int) -> int:
    """Index of the unescaped ``"`` that closes a one-line quote, or -1."""
    while pos < line_end:
        if text[pos] == "\\":
            pos += 2
            continue
        if text[pos] == '"':
            return pos
        pos += 1
    return -1


def _add_parameter(parameters: dict, key: str, value: str, line_no: int) -> None:
    typed = _typed_parameter(key, value, line_no)
    if key in LIST_PARAMETERS:
        parameters.setdefault(key, []).append(typed)
    else:
        parameters[key] = typed


def parse_parameter(key: str, raw: str, line: int | None = None) -> Any:
    """The typed value of one ``PARAMETER key raw`` (one item for list parameters such as ``stop``).

    ``raw`` is the text after the key; a ``"..."`` quote around it is removed (JSON
    escapes apply). Raises :class:`ModelfileError` for an unknown key, or a value of the
    wrong type or out of range.
    """
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            raw = text[1:-1]
    return _typed_parameter(key, raw, line)


def _typed_parameter(key: str, value: str, line: int | None) -> Any:
    if key not in PARAMETER_TYPES:
        raise ModelfileError(f"unknown parameter {key!r} (known: {', '.join(PARAMETER_TYPES)})", line)
    kind = PARAMETER_TYPES[key]
    if kind is str:
        return value
    try:
        typed = kind(value.strip())
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise ModelfileError(f"PARAMETER {key} expects {expected}, got {value.strip()!r}", line) from None
    try:
        _check_ranges({key: typed})
    except ValueError as exc:
        raise ModelfileError(str(exc), line) from None
    return typed


def check_template(template: str, line_no: int | None = None) -> str:
    """``template`` if it compiles as a jinja2 chat template; a ModelfileError saying why otherwise."""
    from .chat_template import ChatTemplate, ChatTemplateError

    if _GO_TEMPLATE.search(template):
        raise ModelfileError("TEMPLATE looks like an Ollama Go template ({{ .Prompt }}); localllm templates are "
                             "jinja2 chat templates over `messages`, like Hugging Face's", line_no)
    try:
        ChatTemplate(template)
    except ChatTemplateError as exc:
        raise ModelfileError(f"TEMPLATE: {exc}", line_no) from None
    return template


# ------------------------------------------------------------------------------------- parameters

def normalize_parameters(parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check a ``parameters`` object (``/api/create``) and return it typed: known keys, right types, in range.

    ``stop`` may be a string or a list of strings and comes back as a list; integral
    floats are accepted for integer parameters. Raises :class:`ModelfileError`.
    """
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise ModelfileError(f"parameters must be an object, got {type(parameters).__name__}")
    typed: dict[str, Any] = {}
    for key, value in parameters.items():
        if value is None:
            continue
        if key not in PARAMETER_TYPES:
            raise ModelfileError(f"unknown parameter {key!r} (known: {', '.join(PARAMETER_TYPES)})")
        kind = PARAMETER_TYPES[key]
        if key in LIST_PARAMETERS:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
                raise ModelfileError(f"parameter {key} must be a string or a list of strings")
            typed[key] = list(items)
        elif kind is int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelfileError(f"parameter {key} must be an integer, got {value!r}")
            typed[key] = value
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ModelfileError(f"parameter {key} must be a number, got {value!r}")
            typed[key] = float(value)
    try:
        _check_ranges(typed)
    except ValueError as exc:
        raise ModelfileError(str(exc)) from None
    return typed


def _check_ranges(parameters: Mapping[str, Any]) -> None:
    """Range checks, by the sampler's own validation (so Modelfiles and requests agree)."""
    from .sampling import SamplingParams

    if parameters.get("num_ctx") is not None and parameters["num_ctx"] < 1:
        raise ValueError("num_ctx must be a positive integer")
    sampling = {k: v for k, v in parameters.items() if k in SamplingParams.__dataclass_fields__ and k != "seed"}
    SamplingParams(**sampling).validate()


# -------------------------------------------------------------------------------------- rendering

def format_parameters(parameters: Mapping[str, Any]) -> str:
    """Parameters as Ollama's ``/api/show`` writes them: ``key`` padded to 30, then the value (strings quoted)."""
    lines = []
    for key, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {_literal(item)}")
    return "\n".join(lines)


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quoted_block(value: str) -> str:
    if '"""' in value:
        raise ModelfileError('a value containing """ cannot be written in a Modelfile')
    return f'"""{value}"""'


def render_modelfile(entry, from_: str | None = None) -> str:
    """A Modelfile that recreates the store model ``entry`` (``/api/show``, ``localllm show --modelfile``).

    ``FROM`` names the model's own file in the store unless ``from_`` is given; a second
    ``FROM`` its vision projector (unless the model's folder is its own, a vision-language one).
    ``parse_modelfile(render_modelfile(entry))`` gives back its parameters, template,
    system prompt, messages and license.
    """
    lines = ['# Modelfile generated by "localllm show"',
             "# To build a new Modelfile based on this, replace FROM with:",
             f"# FROM {entry.name}", "", f"FROM {from_ or entry.path}"]
    projector = getattr(entry, "projector", None)
    if projector is not None and projector != entry.path:
        lines.append(f"FROM {projector}")
    if entry.template:
        lines.append(f"TEMPLATE {_quoted_block(entry.template)}")
    if entry.system:
        lines.append(f"SYSTEM {_quoted_block(entry.system)}")
    for key, value in (entry.parameters or {}).items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {_literal(item)}")
    for message in entry.messages or []:
        lines.append(f"MESSAGE {message['role']} {_quoted_block(message['content'])}")
    if entry.license:
        lines.append(f"LICENSE {_quoted_block(entry.license)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- creating

def is_path_reference(value: str, base_dir: str | os.PathLike | None = None) -> bool:
    """Does a ``FROM`` value name a file or folder (rather than a store model)?

    Paths start with ``/``, ``./``, ``../`` or ``~``, end with ``.gguf``, or exist on disk
    (relative to ``base_dir``, the Modelfile's folder, when given).
    """
    if value.startswith(("/", "./", "../", "~", ".\\", "..\\")) or value.lower().endswith(".gguf"):
        return True
    if os.sep in value or (os.altsep and os.altsep in value) or "/" in value:
        return _resolve_path(value, base_dir).exists()
    return False


def _resolve_path(value: str, base_dir: str | os.PathLike | None) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def create_model(store, name: str, modelfile: Modelfile, *, base_dir: str | os.PathLike | None = None,
                 progress: Progress | None = None, quantize: str | None = None):
    """Create store model ``name`` as ``modelfile`` describes; returns its store entry.

    ``modelfile.from_`` names a store model (pulled first when missing and the registry
    knows it; its parameters are kept and the Modelfile's override them) or a ``.gguf``
    file / HF folder (relative paths start at ``base_dir``, the Modelfile's folder).
    ``quantize`` (``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``; Ollama's ``--quantize``) converts a
    Hugging Face decoder folder into a GGUF file of that type in the store (``formats.gguf_export``), its
    ``generation_config.json`` sampling defaults kept under the Modelfile's PARAMETERs.
    ``progress`` gets Ollama create status events (``{"status": ...}``), pull events
    included. A corrupt or truncated model file raises ``InvalidModelFile`` and leaves
    nothing in the store; bad fields raise :class:`ModelfileError`.
    """
    from .store import canonical_name

    emit = progress or (lambda event: None)
    canonical = canonical_name(name)
    checked = split_sources(validate(modelfile), base_dir)
    if checked.adapters:
        raise ModelfileError("ADAPTER (LoRA adapters) is not supported")
    projector = _resolve_path(checked.projector, base_dir) if checked.projector is not None else None
    if projector is not None:
        emit({"status": f"copying projector file {projector.name}"})
    if quantize is not None:
        entry = _create_quantized(store, canonical, checked, quantize, base_dir, emit, projector)
    elif is_path_reference(checked.from_, base_dir):
        path = _resolve_path(checked.from_, base_dir)
        if not path.exists():
            raise ModelfileError(f"FROM {checked.from_}: no such file or folder", checked.from_line)
        emit({"status": f"copying model file {path.name}"})
        entry = store.add_local(canonical, path, parameters=checked.parameters, template=checked.template,
                                system=checked.system, messages=checked.messages, license=checked.license,
                                projector=projector)
    else:
        base = store.ensure(checked.from_, progress=emit)
        emit({"status": f"using existing layer {base.digest}"})
        entry = store.derive(canonical, base.name, parameters=checked.parameters, template=checked.template,
                             system=checked.system, messages=checked.messages or None, license=checked.license,
                             projector=projector)
    emit({"status": "writing manifest"})
    emit({"status": "success"})
    return entry


def _create_quantized(store, canonical: str, checked: Modelfile, quantize: str,
                      base_dir: str | os.PathLike | None, emit: Progress, projector: Path | None = None):
    """``create --quantize``: FROM a Hugging Face decoder folder -> a quantized GGUF file in the store. The language
    model of a vision-language folder is converted; its vision encoder stays the folder's (stored as the
    projector, unless another FROM names one)."""
    from .arch.spec import UnsupportedArchitecture, UnsupportedModelFeature
    from .formats.gguf_export import quantize_type, write_gguf
    from .formats.hf_decoder import read_hf_decoder
    from .formats.safetensors import HFFolderError
    from .model_info import InvalidModelFile

    try:
        ggml_type = quantize_type(quantize)
    except ValueError as exc:
        raise ModelfileError(str(exc)) from None
    path = _resolve_path(checked.from_, base_dir)
    if not (is_path_reference(checked.from_, base_dir) and path.is_dir()):
        raise ModelfileError(f"--quantize converts a Hugging Face folder; FROM {checked.from_} is not one "
                             "(quantizing a GGUF file or a store model again is not supported)")
    try:
        folder = read_hf_decoder(path)               # architecture, config and tensors checked first
        if projector is None and folder.has_vision:
            projector = path
            emit({"status": f"keeping the vision encoder of {path.name} as the projector"})
        emit({"status": f"converting {path.name} ({folder.architecture}) to {ggml_type}"})
        parameters = {**folder.generation_defaults, **checked.parameters}
        return store.add_written(canonical, f"{path.name}-{ggml_type}.gguf",
                                 lambda target: write_gguf(folder, target, ggml_type, name=path.name),
                                 parameters=parameters, template=checked.template, system=checked.system,
                                 messages=checked.messages, license=checked.license, projector=projector)
    except (UnsupportedArchitecture, UnsupportedModelFeature, HFFolderError) as exc:
        raise InvalidModelFile(f"{path}: {exc}") from exc


def modelfile_from_request(body: Mapping[str, Any], files: Mapping[str, Path] | None = None) -> Modelfile:
    """A :class:`Modelfile` from the fields of an Ollama ``/api/create`` body.

    ``from``, ``parameters``, ``template``, ``system``, ``messages``, ``license`` (a string
    or a list), ``adapters``; or a whole Modelfile as text in ``modelfile`` (older clients),
    whose directives the other fields override. The model and its vision projector may come
    from ``from``, a second ``FROM`` of ``modelfile``, ``projector`` (localllm's: a path on the
    server) and ``files`` (Ollama's: name -> the file on the server its digest names, resolved by
    the caller): one model and at most one projector in all, told apart by ``split_sources``.
    Checked by :func:`validate`.
    """
    text = body.get("modelfile")
    if text is not None:
        if not isinstance(text, str):
            raise ModelfileError("modelfile must be a string")
        base = parse_modelfile(text, require_from=body.get("from") is None)
    else:
        base = Modelfile()
    license = body.get("license", base.license)
    if isinstance(license, list):
        if not all(isinstance(item, str) for item in license):
            raise ModelfileError("license must be a string or a list of strings")
        license = "\n".join(license) if license else None
    parameters = dict(base.parameters)
    parameters.update(normalize_parameters(body.get("parameters")))
    adapters = body.get("adapters")
    projector = body.get("projector")
    if projector is not None and (not isinstance(projector, str) or not projector.strip()):
        raise ModelfileError("projector must be the path of a vision projector (an mmproj .gguf file or a Hugging "
                             "Face folder) on the server")
    from_ = (body.get("from"), None) if body.get("from") is not None else (base.from_, base.from_line)
    sources = [(value, line) for value, line in (from_, (base.projector, base.projector_line), (projector, None),
                                                 *((str(path), None) for path in (files or {}).values()))
               if value is not None]
    if len(sources) > 2:
        raise ModelfileError(f"{len(sources)} model sources (from, the modelfile's FROM lines, projector, files): a "
                             "model takes one model file and at most one vision projector")
    (from_, from_line), (projector, projector_line) = (sources + [(None, None)] * 2)[:2]
    modelfile = Modelfile(
        from_=from_, projector=projector, from_line=from_line, projector_line=projector_line,
        parameters=parameters,
        template=body.get("template", base.template),
        system=body.get("system", base.system),
        messages=body.get("messages") if body.get("messages") is not None else base.messages,
        license=license,
        adapters=list(adapters.values()) if isinstance(adapters, Mapping) else list(adapters or base.adapters))
    return validate(modelfile)


def validate(modelfile: Modelfile) -> Modelfile:
    """A checked, typed copy of ``modelfile`` (its fields may come from JSON); raises :class:`ModelfileError`."""
    from_ = modelfile.from_
    if not isinstance(from_, str) or not from_.strip():
        raise ModelfileError("from must name a model or a model file (the Modelfile's FROM)")
    for key in ("template", "system", "license"):
        value = getattr(modelfile, key)
        if value is not None and not isinstance(value, str):
            raise ModelfileError(f"{key} must be a string")
    projector = modelfile.projector
    if projector is not None and (not isinstance(projector, str) or not projector.strip()):
        raise ModelfileError("the second FROM (projector) must name a vision projector file or folder",
                             modelfile.projector_line)
    if modelfile.template is not None:
        check_template(modelfile.template)
    return Modelfile(from_=from_.strip(), parameters=normalize_parameters(modelfile.parameters),
                     template=modelfile.template, system=modelfile.system,
                     messages=_check_messages(modelfile.messages), license=modelfile.license,
                     adapters=list(modelfile.adapters or []), projector=projector.strip() if projector else None,
                     from_line=modelfile.from_line, projector_line=modelfile.projector_line)


def split_sources(modelfile: Modelfile, base_dir: str | os.PathLike | None = None) -> Modelfile:
    """``modelfile`` with ``from_`` naming the model and ``projector`` its vision projector, whichever order the
    two FROM lines came in (relative paths start at ``base_dir``).

    The projector is the GGUF file whose ``general.architecture`` is ``clip`` (an mmproj file), or, beside a
    model of another kind, a Hugging Face vision-language folder (whose vision part is then used). A store
    name is a model. Two models, two projectors, or a projector alone are a ModelfileError naming the line.
    """
    from dataclasses import replace

    first = _source_kind(modelfile.from_, modelfile.from_line, base_dir)
    if modelfile.projector is None:
        if first == "projector":
            raise ModelfileError(f"FROM {modelfile.from_} is a vision projector (mmproj), not a model: add a FROM "
                                 "line naming the model it belongs to", modelfile.from_line)
        return modelfile
    second = _source_kind(modelfile.projector, modelfile.projector_line, base_dir)
    swapped = replace(modelfile, from_=modelfile.projector, projector=modelfile.from_,
                      from_line=modelfile.projector_line, projector_line=modelfile.from_line)
    if first == second == "projector":
        raise ModelfileError(f"two vision projectors: FROM {modelfile.from_} and FROM {modelfile.projector}; a "
                             "Modelfile names one model and at most one projector", modelfile.projector_line)
    if second == "projector" or (first, second) == ("model", "vision-model"):
        return modelfile
    if first == "projector" or (first, second) == ("vision-model", "model"):
        return swapped
    raise ModelfileError(f"two models: FROM {modelfile.from_} and FROM {modelfile.projector}; a second FROM may "
                         "only name the model's vision projector (an mmproj .gguf file)", modelfile.projector_line)


def _source_kind(value: str, line: int | None, base_dir: str | os.PathLike | None) -> str:
    """What a FROM names: ``"projector"`` (an mmproj GGUF), ``"vision-model"`` (a Hugging Face vision-language
    folder: a model with its projector), or ``"model"`` (any other file or folder, or a store name)."""
    from .model_info import is_projector_file, is_vision_folder

    if not is_path_reference(value, base_dir):
        return "model"
    path = _resolve_path(value, base_dir)
    if not path.exists():
        raise ModelfileError(f"FROM {value}: no such file or folder", line)
    if path.is_dir():
        return "vision-model" if is_vision_folder(path) else "model"
    return "projector" if is_projector_file(path) else "model"


def _check_messages(messages) -> list[dict]:
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise ModelfileError("messages must be a list of {role, content} objects")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ModelfileError(f"messages[{index}] must be an object with role and content")
        role, content = message.get("role"), message.get("content", "")
        if role not in MESSAGE_ROLES:
            raise ModelfileError(f"messages[{index}].role must be one of {', '.join(MESSAGE_ROLES)}")
        if not isinstance(content, str):
            raise ModelfileError(f"messages[{index}].content must be a string")
        checked.append({"role": role, "content": content})
    return checked
