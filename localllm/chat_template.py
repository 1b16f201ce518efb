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
  "\\n". Parts other than text raise ``ChatTemplateError``: a chat's images are turned into text
  markers before it is rendered (``Model.images_in``, ``vision.prompt``).
* ``content: None`` (assistant messages that only call tools) becomes "".
* ``tool_calls[].function.arguments`` given as a JSON string is parsed into an object when
  the template would otherwise JSON-encode the string a second time.
* The thought of an earlier assistant turn, given as ``thinking`` (Ollama) or ``reasoning``
  (vLLM, Ollama's /v1), is passed as ``reasoning_content`` (llama.cpp, DeepSeek), the name
  reasoning templates read (Qwen 3 keeps it only after the last user turn), and as
  ``thinking`` (gpt-oss's template reads that one); other templates ignore it.

``DEFAULT_CHAT_TEMPLATE`` (ChatML) is used when the model has no template::

    <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n

A template comes from a model file or a request (Ollama's ``template``), so it is not
trusted: it renders in a sandbox with limits (``RenderLimits``). Past any of them, and on
any reach for Python internals (``''.__class__``, ``self._TemplateReference__context``),
rendering stops with ``ChatTemplateError`` saying which limit. The limits are checked at
the few places a template can spend time or memory: every loop iteration, call, filter and
arithmetic operator counts as a step and checks the clock; every value it makes (operators,
``~``, list and dict literals, call and filter results, captured blocks, printed values)
is measured before or right after it is made, the operations that can make something much
larger than their inputs (``'x' * n``, ``'x'.ljust(n)``, ``center(n)``, ``replace``,
``format`` widths, ``range(n)``, ``2 ** n`` ...) before; nested calls (recursive macros,
recursive loops) are counted. Jinja's ``lipsum`` global is not available.
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
import json
import re
import reprlib
import time
import types
from collections.abc import ItemsView, KeysView, ValuesView
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.runtime import LoopContext, Namespace, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg

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


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    width = len(indent) if isinstance(indent, str) else indent or 0
    if width > MAX_JSON_INDENT:
        raise TemplateLimitExceeded(f"chat template asked tojson for an indent of {width}; at most "
                                    f"{MAX_JSON_INDENT} is allowed")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(date_format: str) -> str:
    _current_budget().expect(32 * len(date_format), "strftime_now()")   # one directive writes at most ~30 chars
    return datetime.now().strftime(date_format)


# ---------------------------------------------------------------------------------------------- the sandbox
MAX_JSON_INDENT = 16


@dataclass(frozen=True)
class RenderLimits:
    """What one render of a chat template may use; past any limit it stops with ``ChatTemplateError``.

    The character limits grow with the input: a template may write (and make any one value of)
    ``max_chars`` + 2 x the characters of its messages, tools and variables, and make
    ``max_total_chars`` + 16 x those characters of text in all.
    """

    seconds: float = 10.0                # wall time of one render
    max_steps: int = 5_000_000           # loop iterations, calls, filters and arithmetic operators
    max_depth: int = 64                  # calls inside calls (recursive macros, recursive loops)
    max_chars: int = 8_000_000           # the prompt, and any one value the template makes
    max_total_chars: int = 64_000_000    # all the text the template makes while rendering
    max_items: int = 100_000             # range() lengths, batch and slice counts
    max_int_bits: int = 4096             # integers made by * and **
    max_source_chars: int = 1_000_000    # the template's own source


DEFAULT_LIMITS = RenderLimits()


class TemplateLimitExceeded(SecurityError):
    """A render went past one of its ``RenderLimits`` (shown to the caller as ``ChatTemplateError``)."""


class _RenderBudget:
    """The running counts of one render, checked against its limits."""

    def __init__(self, limits: RenderLimits, input_chars: int):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.max_chars = limits.max_chars + 2 * input_chars
        self.max_total_chars = limits.max_total_chars + 16 * input_chars
        self.steps = 0
        self.depth = 0
        self.total_chars = 0

    def step(self, count: int = 1) -> None:
        """Count ``count`` steps (loop iterations, calls, filters, operators) and check the clock."""
        self.steps += count
        if self.steps > self.limits.max_steps:
            raise TemplateLimitExceeded(f"chat template took more than {self.limits.max_steps} steps (loop "
                                        "iterations, calls, filters and operators)")
        if time.monotonic() > self.deadline:
            raise TemplateLimitExceeded(f"chat template ran for more than {self.limits.seconds:g} s")

    def expect(self, chars: int, what: str) -> None:
        """Refuse an operation whose result would be ``chars`` characters, before it is made."""
        if chars > self.max_chars:
            raise TemplateLimitExceeded(f"chat template asked {what} for about {chars} characters; a value may "
                                        f"have at most {self.max_chars}")

    def expect_items(self, count: int, what: str) -> None:
        if count > self.limits.max_items:
            raise TemplateLimitExceeded(f"chat template asked {what} for {count} items; at most "
                                        f"{self.limits.max_items} are allowed")

    def expect_int_bits(self, bits: int, what: str) -> None:
        if bits > self.limits.max_int_bits:
            raise TemplateLimitExceeded(f"chat template asked {what} for an integer of about {bits} bits; at "
                                        f"most {self.limits.max_int_bits} are allowed")

    def made(self, value: Any) -> Any:
        """Measure a value the template just made (refused if too large) and count its text; return it."""
        chars = value_chars(value, self.max_chars)
        if chars > self.max_chars:
            raise TemplateLimitExceeded(f"chat template made a value of more than {self.max_chars} characters")
        if isinstance(value, (str, bytes)):
            self.charge(chars)
        return value

    def charge(self, chars: int) -> None:
        """Count ``chars`` characters of text made."""
        self.total_chars += chars
        if self.total_chars > self.max_total_chars:
            raise TemplateLimitExceeded(f"chat template made more than {self.max_total_chars} characters of text "
                                        "in all")


_BUDGET: ContextVar[_RenderBudget | None] = ContextVar("chat_template_budget", default=None)


def _current_budget() -> _RenderBudget:
    budget = _BUDGET.get()
    if budget is None:   # jinja folding a constant at compile time: not allowed, so it is done at render time
        raise RuntimeError("sandboxed operation outside a chat template render")
    return budget


_SCALAR_CHARS = 8   # str() of None, a bool, a float, an object's repr: a few characters


def value_chars(value: Any, limit: int) -> int:
    """About how many characters ``str(value)`` writes: strings their length, containers the sum of their
    items (a part shared n times counts n times, a cycle once). Stops counting once past ``limit``."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    children = _children(value)
    if children is None:
        return _SCALAR_CHARS
    sizes: dict[int, int] = {}         # id -> chars of a container measured in full
    open_ids: set[int] = set()         # containers being measured (a cycle leads back to one)
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if not children_done:
            if key in sizes or key in open_ids:
                continue
            open_ids.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if _children(child) is not None)
            continue
        chars = 2
        for child in _children(node):
            child_key = id(child)
            if child_key in sizes:
                chars += sizes[child_key] + 2
            elif child_key in open_ids:      # a cycle: repr writes "..."
                chars += 5
            else:
                chars += value_chars(child, limit) + 2
            if chars > limit:
                return chars                 # a container holds its parts: the whole is larger still
        open_ids.discard(key)
        sizes[key] = chars
    return sizes[id(value)]


def _children(value: Any) -> Iterable | None:
    """The parts ``str(value)`` writes, for a container; None for anything else."""
    if isinstance(value, (list, tuple, set, frozenset, KeysView, ValuesView)):
        return value
    if isinstance(value, ItemsView):
        return itertools.chain.from_iterable(value)
    if isinstance(value, dict):
        return itertools.chain.from_iterable(value.items())
    if isinstance(value, Namespace):
        return _children(object.__getattribute__(value, "_Namespace__attrs"))
    return None


_FORMAT_NUMBER = re.compile(r"\d+")
_STR_TYPES = (str, bytes)


def _expect_format(budget: _RenderBudget, template: str, args: Any, what: str) -> None:
    """``%`` and ``format``: no width or precision over the limit (written in the format or given as an
    argument) and about len(format) + fields x size of the arguments."""
    if not isinstance(template, str):
        return
    for number in _FORMAT_NUMBER.findall(template):
        if len(number) > 12 or int(number) > budget.max_chars:
            budget.expect(int(number), what)
    values = args.values() if isinstance(args, dict) else args if isinstance(args, (tuple, list)) else (args,)
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            budget.expect(abs(value), what)
    fields = template.count("%") + template.count("{")
    budget.expect(len(template) + fields * value_chars(args, budget.max_chars), what)


def _replaced_chars(text: Any, old: Any, new: Any, count: Any) -> int:
    if not (isinstance(text, _STR_TYPES) and isinstance(old, _STR_TYPES) and isinstance(new, _STR_TYPES)):
        return 0
    found = len(text) + 1 if not old else text.count(old)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(text) + found * max(0, len(new) - len(old))


def _width(value: Any) -> int:
    if isinstance(value, _STR_TYPES):
        return len(value)
    return value if isinstance(value, int) else 0


def _joined_chars(items: list, separator: Any, limit: int) -> int:
    return value_chars(items, limit) + len(items) * _width(separator)


def _expect_str_method(budget: _RenderBudget, method: Any, args: tuple, kwargs: dict) -> tuple:
    """Size checks for the str/bytes/int methods that can make much more than they are given; returns the
    arguments (``join``'s iterable made a list so it can be measured)."""
    owner, name = method.__self__, method.__name__
    what = f"{type(owner).__name__}.{name}()"
    if isinstance(owner, int) and name == "to_bytes":
        budget.expect(_width(args[0] if args else kwargs.get("length", 1)), what)
    if not isinstance(owner, _STR_TYPES):
        return args
    first = args[0] if args else None
    if name in ("ljust", "rjust", "center", "zfill"):
        budget.expect(max(len(owner), _width(first if first is not None else kwargs.get("width", 0))), what)
    elif name == "expandtabs":
        tabsize = first if first is not None else kwargs.get("tabsize", 8)
        budget.expect(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * _width(tabsize), what)
    elif name == "replace" and len(args) >= 2:
        budget.expect(_replaced_chars(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count")),
                      what)
    elif name == "join" and args:
        items = list(itertools.islice(args[0], budget.max_chars + 1))
        budget.step(len(items))
        budget.expect(_joined_chars(items, owner, budget.max_chars), what)
        args = (items,) + args[1:]
    elif name == "translate" and isinstance(first, dict):
        longest = max((_width(v) for v in first.values()), default=1)
        budget.expect(len(owner) * max(1, longest), what)
    return args


def _bounded_range(*args: int) -> range:
    numbers = range(*args)
    _current_budget().expect_items(len(numbers), "range()")
    return numbers


# filter name -> check of its (bound) arguments before it runs
def _expect_center(budget, arguments):
    budget.expect(_width(arguments.get("width", 80)), "center")


def _expect_indent(budget, arguments):
    text = arguments.get("s", "")
    lines = text.count("\n") + 1 if isinstance(text, str) else 1
    budget.expect(value_chars(text, budget.max_chars) + lines * _width(arguments.get("width", 4)), "indent")


def _expect_wordwrap(budget, arguments):
    text, wrap = arguments.get("s", ""), arguments.get("wrapstring") or "\n"
    budget.expect((value_chars(text, budget.max_chars) + 1) * (1 + _width(wrap)), "wordwrap")


def _expect_replace(budget, arguments):
    budget.expect(_replaced_chars(arguments.get("s"), arguments.get("old"), arguments.get("new"),
                                  arguments.get("count")), "replace")


def _expect_format_filter(budget, arguments):
    _expect_format(budget, arguments.get("value"), arguments.get("kwargs") or arguments.get("args", ()), "format")


def _expect_batch(budget, arguments):
    budget.expect_items(_width(arguments.get("linecount", 0)), "batch")


def _expect_slice(budget, arguments):
    budget.expect_items(_width(arguments.get("slices", 0)), "slice")


def _expect_sum(budget, arguments):
    if isinstance(arguments.get("start", 0), (list, tuple, str)):  # adding sequences copies each time
        items = arguments.get("iterable")
        count = len(items) if hasattr(items, "__len__") else 1
        budget.expect(count * value_chars(items, budget.max_chars), "sum")


_FILTER_CHECKS = {"center": _expect_center, "indent": _expect_indent, "wordwrap": _expect_wordwrap,
                  "replace": _expect_replace, "format": _expect_format_filter, "batch": _expect_batch,
                  "slice": _expect_slice, "sum": _expect_sum}


def _guarded_filter(name: str, function: Callable) -> Callable:
    """``function`` counted as a step, its result measured, and its arguments checked first when it is one
    of the filters that can make much more than they are given."""
    check = _FILTER_CHECKS.get(name)
    signature = inspect.signature(function) if check is not None or name == "join" else None
    passes_first = _PassArg.from_obj(function) is not None   # context / eval context / environment first
    # jinja's sync/async filters (slice, ...) take an eval context their signature does not show
    hidden_first = passes_first and _PassArg.from_obj(inspect.unwrap(function)) is None

    def arguments(args: tuple, kwargs: dict) -> dict:
        return signature.bind(*(args[1:] if hidden_first else args), **kwargs).arguments

    @functools.wraps(function)
    def guarded(*args, **kwargs):
        budget = _current_budget()
        budget.step()
        if name == "join":   # measure the items: a generator is made a list first (join reads it all anyway)
            at = 1 if passes_first else 0
            items = list(itertools.islice(args[at], budget.max_chars + 1)) if len(args) > at else []
            budget.step(len(items))
            args = args[:at] + (items,) + args[at + 1:]
            separator = arguments(args, kwargs).get("d", "")
            budget.expect(_joined_chars(items, separator, budget.max_chars), "join")
        elif check is not None:
            check(budget, arguments(args, kwargs))
        return budget.made(function(*args, **kwargs))

    return guarded


class _CountedIterable:
    """A loop's iterable: every item taken counts as a step (``len`` passes through for ``loop.length``)."""

    def __init__(self, iterable: Any, budget: _RenderBudget):
        self.iterable = iterable
        self.budget = budget

    def __len__(self) -> int:
        return len(self.iterable)

    def __iter__(self):
        step = self.budget.step
        for item in self.iterable:
            step()
            yield item


class _SandboxCodeGenerator(CodeGenerator):
    """Jinja's code generator with the sandbox's checks around loops, ``~``, slices and list/dict/tuple literals."""

    def visit_For(self, node: nodes.For, frame) -> None:
        counted = copy.copy(node)   # iterate environment.counted_loop(<iterable>) instead
        counted.iter = nodes.Call(nodes.EnvironmentAttribute("counted_loop"), [node.iter], [], None, None,
                                  lineno=node.lineno)
        super().visit_For(counted, frame)

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        markup = "context.eval_ctx.autoescape" if frame.eval_ctx.volatile else repr(bool(frame.eval_ctx.autoescape))
        self.write("environment.checked_concat((")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write(f"), {markup})")

    def visit_Getitem(self, node: nodes.Getitem, frame) -> None:
        if not isinstance(node.arg, nodes.Slice):       # environment.getitem: the sandbox's own hook
            super().visit_Getitem(node, frame)
            return
        self.write("environment.made(")                # x[a:b] copies (jinja writes it as plain Python)
        super().visit_Getitem(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame) -> None:
        self.write("environment.made(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame) -> None:
        self.write("environment.made(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame) -> None:
        if node.ctx != "load":     # an assignment target: `for a, b in ...`, `set a, b = ...`
            super().visit_Tuple(node, frame)
            return
        self.write("environment.made(")
        super().visit_Tuple(node, frame)
        self.write(")")


class _ChatTemplateSandbox(ImmutableSandboxedEnvironment):
    """HF's chat template environment (immutable sandbox, trim/lstrip blocks, loop controls, ``generation``
    blocks, ``raise_exception``, ``strftime_now``, ``tojson``) with the checks of a ``_RenderBudget``."""

    code_generator_class = _SandboxCodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=self._finalize_output,
                         extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
        self.filters["tojson"] = _tojson
        self.filters = {name: _guarded_filter(name, function) for name, function in self.filters.items()}
        del self.globals["lipsum"]
        self.globals.update(range=_bounded_range, raise_exception=_raise_exception, strftime_now=_strftime_now)

    # ---- hooks the generated code calls
    def counted_loop(self, iterable: Any) -> _CountedIterable:
        return _CountedIterable(iterable, _current_budget())

    def checked_concat(self, parts: tuple, markup: bool) -> str:
        budget = _current_budget()
        budget.step()
        budget.expect(sum(value_chars(part, budget.max_chars) for part in parts), "~")
        return budget.made(markup_join(parts) if markup else str_join(parts))

    def made(self, value: Any) -> Any:
        return _current_budget().made(value)

    def concat(self, parts: Iterable[str]) -> str:
        """The text of a macro, a captured ``set`` block or a ``call``/``filter`` block body."""
        budget = _current_budget()
        parts = list(parts)
        budget.expect(sum(map(len, parts)), "a block")
        return budget.made("".join(parts))

    def _finalize_output(self, value: Any) -> Any:
        """Every ``{{ value }}``: its text is about to be made (and kept, inside a captured block)."""
        budget = _current_budget()
        if not isinstance(value, str):
            budget.expect(value_chars(value, budget.max_chars), "printing a value")
        budget.charge(value_chars(value, budget.max_chars))
        return value

    # ---- the sandbox's own hooks
    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        budget = _current_budget()
        budget.step()
        if isinstance(__obj, LoopContext) and args:           # loop(children) in a recursive loop
            args = (_CountedIterable(args[0], budget),) + args[1:]
        elif isinstance(__obj, types.BuiltinMethodType) and isinstance(getattr(__obj, "__self__", None),
                                                                        (str, bytes, int)):
            args = _expect_str_method(budget, __obj, args, kwargs)
        if budget.depth >= budget.limits.max_depth:
            raise TemplateLimitExceeded(f"chat template nested calls more than {budget.limits.max_depth} deep "
                                        "(a macro or loop calling itself without end?)")
        budget.depth += 1
        try:
            return budget.made(super().call(__context, __obj, *args, **kwargs))
        finally:
            budget.depth -= 1

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        budget = _current_budget()
        budget.step()
        what = f"the operator {operator}"
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if isinstance(times, int) and isinstance(sequence, (str, bytes, list, tuple)):
                    budget.expect(value_chars(sequence, budget.max_chars) * max(times, 0), what)
            if isinstance(left, int) and isinstance(right, int):
                budget.expect_int_bits(left.bit_length() + right.bit_length(), what)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            bits = abs(left).bit_length() - 1 if abs(left) > 1 else 0     # |left| <= 1: no growth
            budget.expect_int_bits(bits * right, what)
        elif operator == "+" and not isinstance(left, (int, float)):
            budget.expect(value_chars(left, budget.max_chars) + value_chars(right, budget.max_chars), what)
        elif operator == "%" and isinstance(left, str):
            _expect_format(budget, left, right, what)
        return budget.made(super().call_binop(context, operator, left, right))

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"chat template tried to read {attribute!r} of a {type(obj).__name__!r} object, "
                            "which the sandbox does not allow")

    def wrap_str_format(self, value: Any):
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        template = value.__self__

        @functools.wraps(wrapper)
        def checked_format(*args, **kwargs):
            budget = _current_budget()
            fields = (args[0] if args else {}) if value.__name__ == "format_map" else args + tuple(kwargs.values())
            _expect_format(budget, template, fields, f"str.{value.__name__}()")
            return budget.made(wrapper(*args, **kwargs))

        return checked_format


def _environment() -> _ChatTemplateSandbox:
    return _ChatTemplateSandbox()


class ChatTemplate:
    """A compiled chat template.

    template: the jinja2 source (``Tokenizer.chat_template``), or None for ``DEFAULT_CHAT_TEMPLATE``.
    bos_token, eos_token: the texts the template may write (``Tokenizer.bos_token``/``eos_token``).
    """

    def __init__(self, template: str | None, bos_token: str | None = None, eos_token: str | None = None,
                 limits: RenderLimits = DEFAULT_LIMITS):
        self.source = DEFAULT_CHAT_TEMPLATE if template is None else template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.limits = limits
        if not isinstance(self.source, str):
            raise ChatTemplateError(f"chat template must be a string, got {type(self.source).__name__}")
        if len(self.source) > limits.max_source_chars:
            raise ChatTemplateError(f"chat template is {len(self.source)} characters long; at most "
                                    f"{limits.max_source_chars} are allowed")
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from exc
        except Exception as exc:   # nesting too deep for the parser or Python's compiler, ...
            raise ChatTemplateError(f"chat template does not compile: {type(exc).__name__}: {exc}") from exc
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
        context = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", **extra,
                   "messages": messages, "tools": tools, "add_generation_prompt": add_generation_prompt}
        budget = _RenderBudget(self.limits, value_chars(list(context.values()), 2 ** 62))
        token = _BUDGET.set(budget)
        try:
            parts, written = [], 0
            for part in self._template.generate(context):
                written += len(part)
                if written > budget.max_chars:
                    raise TemplateLimitExceeded(f"chat template wrote more than {budget.max_chars} characters")
                parts.append(part)
            return "".join(parts)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(str(exc.message if exc.message is not None else exc)) from exc
        except RecursionError as exc:
            raise ChatTemplateError("chat template failed: it (or a value it was given) nests too deep") from exc
        except Exception as exc:  # the template's own type errors (e.g. None + str)
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        finally:
            _BUDGET.reset(token)

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
        if message.get("reasoning_content") and not message.get("thinking"):
            message["thinking"] = message["reasoning_content"]          # gpt-oss's template reads "thinking"
        return message

    def _prepare_parts(self, parts: list, index: int) -> str | list:
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ChatTemplateError(
                    f"messages[{index}].content: only text parts are supported, got {kind or reprlib.repr(part)}")
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
    """The template of a model that has none, or whose template cannot be compiled: rendering a chat raises
    ChatTemplateError saying so (the model still loads, and raw completion works)."""

    def __init__(self, message: str = NO_TEMPLATE_MESSAGE):
        super().__init__("")
        self.message = message

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **extra: Any) -> str:
        raise ChatTemplateError(self.message)
