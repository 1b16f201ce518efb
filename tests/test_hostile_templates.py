"""Hostile chat templates: loops, recursion, huge values and reaches for Python internals are each
refused with ChatTemplateError naming the limit (or the sandbox), without running long or using
much memory; every real template of the test suite renders exactly as in a plain HF-style
sandbox (the environment before the limits were added)."""
from __future__ import annotations

import json
import threading
from datetime import datetime

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localllm.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError, RenderLimits
from tests.test_chat_template import QWEN_STYLE_TOOL_CALLS
from tests.test_reasoning import QWEN3_TEMPLATE, R1_TEMPLATE
from tests.tiny_archs import GEMMA_TEMPLATE, LLAMA3_TEMPLATE, PHI3_TEMPLATE, QWEN_CHATML_TEMPLATE
from tests.tiny_models import CHATML_TEMPLATE

SMALL = RenderLimits(max_steps=20_000, max_chars=100_000, max_total_chars=400_000, max_items=1_000)
USER = [{"role": "user", "content": "hi"}]


def refused(source: str, match: str, limits: RenderLimits = SMALL, messages=USER, **extra) -> str:
    """Render ``source``: it must fail with a ChatTemplateError whose message matches ``match``."""
    with pytest.raises(ChatTemplateError, match=match) as info:
        ChatTemplate(source, limits=limits).render(messages, **extra)
    return str(info.value)


# ---------------------------------------------------------------- time: loops and steps
@pytest.mark.parametrize("source", [
    "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
    "{% for i in range(1000) %}{% for j in range(1000) %}{% for k in range(1000) %}x{% endfor %}{% endfor %}"
    "{% endfor %}",
    "{% set xs = range(1000)|list %}{% for a in xs %}{% for b in xs %}{{ '' }}{% endfor %}{% endfor %}",
    "{% for i in range(1000) if i >= 0 %}{% for c in 'x' * 1000 %}{% endfor %}{% endfor %}",   # filtered loop
    "{% for m in messages * 1000 %}{% for n in messages * 1000 %}{% endfor %}{% endfor %}",
    "{% for i in range(1000) %}{% set x = (messages * 100)|map('length')|list %}{% endfor %}",   # filters count
    "{% for x in range(2) recursive %}{% if loop.depth < 3 %}{{ loop(range(1000)) }}{% endif %}{% endfor %}",
])
def test_long_loops_stop_at_the_step_budget(source):
    refused(source, r"more than 20000 steps")


def test_the_default_budget_stops_nested_loops():
    source = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    refused(source, r"more than 5000000 steps", limits=RenderLimits())


def test_the_clock_stops_a_render():
    source = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    refused(source, r"ran for more than 0.2 s", limits=RenderLimits(seconds=0.2, max_steps=10**12))


# ---------------------------------------------------------------- recursion
@pytest.mark.parametrize("source", [
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% macro f() %}{{ g() }}{% endmacro %}{% macro g() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% for x in [1] recursive %}{{ loop([x]) }}{% endfor %}",
    "{% block b %}{{ self.b() }}{% endblock %}",
    "{% macro f() %}{% set g = f %}{{ g() }}{% endmacro %}{{ f() }}",
])
def test_recursion_stops_at_the_depth_limit(source):
    refused(source, r"nested calls more than 64 deep")


def test_recursion_in_a_small_thread_stack_is_refused_not_a_crash():
    template = ChatTemplate("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    outcome = []

    def render():
        try:
            template.render(USER)
        except ChatTemplateError as exc:
            outcome.append(str(exc))

    old = threading.stack_size(512 * 1024)
    try:
        worker = threading.Thread(target=render)
        worker.start()
        worker.join(60)
    finally:
        threading.stack_size(old)
    assert outcome and "64 deep" in outcome[0]


def test_deeply_nested_input_is_refused():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    refused("{{ messages[0].extra|tojson }}", "nests too deep", messages=[{"role": "user", "content": "", "extra": deep}],
            limits=RenderLimits())
    refused("{{ x }}", r"only text parts are supported, got \[\[\[", messages=[{"role": "user", "content": deep}])


def test_deeply_nested_source_does_not_compile():
    with pytest.raises(ChatTemplateError, match="does not compile|syntax error"):
        ChatTemplate("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}")
    with pytest.raises(ChatTemplateError, match="at most 10 are allowed"):
        ChatTemplate("x" * 11, limits=RenderLimits(max_source_chars=10))


# ---------------------------------------------------------------- size: values made in one go
@pytest.mark.parametrize("source", [
    "{{ 'x' * 10**9 }}",
    "{{ 'x' * 1000000000 }}",
    "{{ 1000000000 * 'x' }}",
    "{{ ['x'] * 10**9 }}",
    "{{ ('x',) * 10**9 }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ 'x'.center(1000000000) }}",
    "{{ 'x'.zfill(10**9) }}",
    "{{ ('\t' * 1000).expandtabs(10**6) }}",
    "{{ ('x' * 1000).replace('', 'y' * 1000) }}",
    "{{ ('y' * 1000).join(['x' * 1000] * 1000) }}",
    "{{ ('x' * 1000).translate({120: 'y' * 1000}) }}",
    "{{ (1).to_bytes(10**9, 'big') }}",
    "{{ '%1000000000s' % 'x' }}",
    "{{ '%*s' % (10**9, 'x') }}",
    "{{ '{:>1000000000}'.format('x') }}",
    "{{ '{:>{}}'.format('x', 10**9) }}",
    "{{ '{a:>1000000000}'.format_map({'a': 'x'}) }}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x\nx'|indent(10**9) }}",
    "{{ ('x' * 1000)|wordwrap(1, wrapstring='y' * 1000) }}",
    "{{ ('x' * 1000)|replace('', 'y' * 1000) }}",
    "{{ '%1000000000s'|format('x') }}",
    "{{ ['x' * 1000] * 50 + ['x' * 1000] * 60 }}",
    "{{ (['x' * 1000] * 100)|join('y' * 1000) }}",
    "{{ messages|map(attribute='content')|map('center', 10**9)|list }}",
    "{{ (['x' * 100] * 1000)|batch(10**9, 'x')|list }}",
    "{{ [1]|batch(10**9, 0)|list }}",
    "{{ [1]|slice(10**9)|list }}",
    "{{ ([['x' * 100]] * 1000)|sum(start=[]) }}",
    "{{ messages|tojson(indent=10**9) }}",
    "{{ strftime_now('%c' * 10000) }}",
])
def test_operations_that_amplify_are_refused_before_they_run(source):
    refused(source, r"for about \d+ characters|for \d+ items|indent of|made a value of more than")


@pytest.mark.parametrize("source", [
    "{{ 2 ** 1000000000 }}",
    "{{ 2 ** (10 ** 9) }}",
    "{{ 10 ** 1000000 }}",
    "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
])
def test_huge_integers_are_refused(source):
    refused(source, r"integer of about \d+ bits")


def test_small_integer_arithmetic_still_works():
    assert ChatTemplate("{{ 2 ** 10 }} {{ 7 * 6 }} {{ -2 ** 3 }} {{ 1 ** 10**9 }} {{ 2 ** -1 }} {{ 7 // 2 }} "
                        "{{ 7 % 3 }} {{ 1.5 * 2 }} {{ 'ab' * 2 }} {{ [1] * 2 }}").render([]) == \
        "1024 42 -8 1 0.5 3 1 3.0 abab [1, 1]"


# ---------------------------------------------------------------- size: values grown step by step
@pytest.mark.parametrize("source", [
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s=['x']) %}{% for i in range(64) %}{% set ns.s = [ns.s, ns.s] %}{% endfor %}"
    "{{ ns.s|tojson }}",
    "{% set ns = namespace(s={}) %}{% for i in range(64) %}{% set ns.s = {'a': ns.s, 'b': ns.s} %}{% endfor %}",
    "{% set ns = namespace(s=()) %}{% for i in range(64) %}{% set ns.s = (ns.s, ns.s) %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = dict(a=ns.s, b=ns.s) %}{% endfor %}",
    "{% set ns = namespace(s=namespace()) %}{% for i in range(64) %}{% set ns.s = namespace(a=ns.s, b=ns.s) %}"
    "{% endfor %}",
    # unrolled in the source, no loop at all
    "{% set x = 'x' * 1000 %}" + "{% set x = x ~ x %}" * 40,
    "{% set x = ['x' * 1000] %}" + "{% set x = [x, x, x, x] %}" * 20 + "{{ x }}",
    "{% macro double(s) %}{{ s }}{{ s }}{% endmacro %}{% set x = 'x' * 1000 %}" + "{% set x = double(x) %}" * 40,
    "{% set x = 'x' * 1000 %}" + "{% set x %}{{ x }}{{ x }}{% endset %}" * 40,
    "{% set x = 'x' * 1000 %}" + "{% set x = x|indent(1, true) ~ x %}" * 40,
])
def test_doubling_a_value_is_refused(source):
    refused(source, r"made a value of more than|for about \d+ characters|of text in all")


@pytest.mark.parametrize("source", [
    "{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}",                          # output
    "{% set big = 'x' * 50000 %}{% for i in range(1000) %}{{ big }}{% endfor %}",      # the same value printed
    "{% set big = 'x' * 50000 %}{% set x %}{% for i in range(1000) %}{{ big }}{% endfor %}{% endset %}",
    "{% set big = 'x' * 50000 %}{% set x %}{% for i in range(1000) %}{{ big ~ i }}{% endfor %}{% endset %}",
    "{% set big = 'x' * 50000 %}{% for i in range(1000) %}{% set y = big[i:] %}{% endfor %}",   # slices copy
    "{% set big = 'x' * 50000 %}{% for i in range(1000) %}{% set y = big|upper %}{% endfor %}",
    "{% set big = ['x' * 50] * 1000 %}{% set x %}{% for i in range(1000) %}{{ big }}{% endfor %}{% endset %}",
    "{% set big = 'x' * 50000 %}{% macro m() %}{% for i in range(1000) %}{{ big }}{% endfor %}{% endmacro %}"
    "{{ m() }}",
])
def test_text_made_over_many_steps_is_capped(source):
    refused(source, r"wrote more than|made more than \d+ characters of text|made a value of more than|for about")


@pytest.mark.parametrize("printed", ["big", "[big]", "d", "d.items()", "d.values()", "ns"])
def test_printing_into_a_captured_block_counts_as_it_goes(printed):
    """Text printed inside ``{% set %}...{% endset %}`` is kept until the block ends: it is counted as it is
    printed (a few copies in), not only when the block is joined."""
    source = ("{% set big = 'x' * 50000 %}{% set d = dict(a=big) %}{% set ns = namespace(a=big) %}{% set x %}"
              "{% for i in range(1000) %}{{ " + printed + " }}{% endfor %}{% endset %}")
    refused(source, r"made more than 4008\d\d characters of text in all")


def test_the_limits_grow_with_the_input():
    content = "y" * 150_000                       # more than SMALL.max_chars: a template may still print it
    assert ChatTemplate(DEFAULT_CHAT_TEMPLATE, limits=SMALL).render([{"role": "user", "content": content}]) == \
        f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------- Python internals
@pytest.mark.parametrize("source", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''['__class__'] }}",
    "{{ messages.__class__.__base__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler(1, 2).next.__func__ }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set ns = namespace() %}{{ ns._Namespace__attrs }}",
    "{% set ns = namespace() %}{{ ns.__class__ }}",
    "{{ (messages|first).__class__ }}",
    "{{ messages|attr('__class__') }}",
    "{{ messages|map(attribute='__class__')|list }}",
    "{{ messages|selectattr('__class__')|list }}",
    "{{ messages|sort(attribute='__class__') }}",
    "{% for m in messages %}{{ loop.__class__ }}{% endfor %}",
    "{% for m in messages %}{{ loop._iterator }}{% endfor %}",
    "{{ '{0.__class__}'.format('') }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ '{0[__class__]}'.format({}) }}",
    "{{ '{x.__class__}'.format_map({'x': 1}) }}",
    "{{ (1).__class__ }}",
    "{{ range.__globals__ }}",
    "{% macro m() %}{% endmacro %}{{ m._func.__globals__ }}",
    "{{ (messages|map('string')).gi_frame }}",
])
def test_python_internals_are_refused(source):
    refused(source, r"which the sandbox does not allow")


@pytest.mark.parametrize("source, match", [
    ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
    ("{{ range(10**9)|list }}", r"range\(\) for 1000000000 items"),
    ("{{ range(0, 10**9, 2)|length }}", r"range\(\) for 500000000 items"),
    ("{{ messages.append(1) }}", "sandbox|not safely callable|unsafe"),
    ("{{ {}.update(a=1) }}", "sandbox|not safely callable|unsafe"),
    ("{{ {}.setdefault('a', 1) }}", "sandbox|not safely callable|unsafe"),
    ("{% include 'x' %}", "no loader|TypeError|include"),
    ("{% import 'x' as y %}", "no loader|TypeError|import"),
    ("{% extends 'x' %}", "no loader|TypeError|extends"),
])
def test_other_escapes_are_refused(source, match):
    refused(source, match)


def test_refusals_leave_the_template_usable():
    template = ChatTemplate("{% if messages[0].content == 'loop' %}{% for i in range(1000) %}"
                            "{% for j in range(1000) %}{% endfor %}{% endfor %}{% endif %}[{{ messages[0].content }}]",
                            limits=SMALL)
    with pytest.raises(ChatTemplateError, match="steps"):
        template.render([{"role": "user", "content": "loop"}])
    assert template.render([{"role": "user", "content": "fine"}]) == "[fine]"


def test_concurrent_renders_have_their_own_budgets():
    template = ChatTemplate("{% for i in range(messages[0].content|int) %}.{% endfor %}",
                            limits=RenderLimits(max_steps=1_000))
    results: dict[int, str] = {}

    def render(n):
        try:
            results[n] = template.render([{"role": "user", "content": str(n)}], add_generation_prompt=False)
        except ChatTemplateError as exc:
            results[n] = str(exc)

    workers = [threading.Thread(target=render, args=(n,)) for n in (600, 600, 600, 5000)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert results[600] == "." * 600 and "steps" in results[5000]


# ---------------------------------------------------------------- real templates render as before
def reference_environment() -> ImmutableSandboxedEnvironment:
    """The environment as Hugging Face (and localllm before the limits) configures it, without limits."""
    from localllm.chat_template import _GenerationBlock

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"},
                                                    "days": {"type": "integer", "enum": [1, 2, 3]}},
                   "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATIONS = {
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Un café ☕ 🍕?"}],
    "plain": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
              {"role": "user", "content": "again"}],
    "tools": [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
              {"role": "user", "content": "thanks"}],
    "long": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 10} for i in range(200)],
}
TEMPLATES = {"default": DEFAULT_CHAT_TEMPLATE, "chatml": CHATML_TEMPLATE, "qwen_chatml": QWEN_CHATML_TEMPLATE,
             "llama3": LLAMA3_TEMPLATE, "phi3": PHI3_TEMPLATE, "gemma": GEMMA_TEMPLATE, "qwen3": QWEN3_TEMPLATE,
             "r1": R1_TEMPLATE, "qwen_tool_calls": QWEN_STYLE_TOOL_CALLS}


def _both(source: str, messages: list, tools, add_generation_prompt: bool) -> tuple[str, str]:
    def outcome(render):
        try:
            return render()
        except Exception as exc:   # a template refusing a conversation must refuse it in both
            return f"error: {exc}"

    variables = dict(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                     bos_token="<s>", eos_token="</s>")
    reference = outcome(lambda: reference_environment().from_string(source).render(**variables))
    ours = outcome(lambda: ChatTemplate(source, "<s>", "</s>").render(messages, add_generation_prompt, tools))
    return reference, ours


def _real_templates(smollm2_gguf) -> dict[str, str]:
    from localllm import arch

    templates = dict(TEMPLATES)
    templates["smollm2_gguf"] = smollm2_gguf.metadata["tokenizer.chat_template"]
    for name in ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"):
        default = arch.default_chat_template(name)
        if default is not None:
            templates[f"arch_{name}"] = default
    return templates


def test_real_templates_render_as_in_a_plain_sandbox(smollm2_gguf):
    rendered = 0
    for name, source in _real_templates(smollm2_gguf).items():
        for conversation, messages in CONVERSATIONS.items():
            for add_generation_prompt in (True, False):
                tools = TOOLS if conversation == "tools" else None
                reference, ours = _both(source, messages, tools, add_generation_prompt)
                assert ours == reference, (name, conversation, add_generation_prompt)
                rendered += not reference.startswith("error: ")
    assert rendered >= 80   # most of them render (Gemma's refuses a system role, ...)


def test_a_template_that_cannot_compile_fails_chat_not_the_model(tmp_path):
    """A syntax error (or an oversized source) in a model file's template: the model loads, raw completion
    works, and chat says what is wrong with the template."""
    import localllm
    from tests.tiny_models import write_tiny_llama

    model = localllm.load(write_tiny_llama(tmp_path / "broken-template.gguf", chat_template="{% for %}"),
                          backend="ref", num_ctx=64)
    assert model.generate("hello", temperature=0, max_tokens=3)
    with pytest.raises(ChatTemplateError, match="the model's chat template cannot be used"):
        model.chat([{"role": "user", "content": "hi"}], max_tokens=3)
