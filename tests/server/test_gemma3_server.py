"""Gemma 3 270M through the server with the real clients; a model without any chat template."""
import pytest

from tests.server.conftest import run_app

pytestmark = pytest.mark.real_model
GEMMA3 = "gemma3:270m"


@pytest.fixture(scope="module")
def gemma_server(tmp_path_factory, gemma3_gguf_path):
    from localllm.engine import Engine, EngineSettings
    from localllm.store import ModelStore
    from tests.tiny_models import write_tiny_llama

    store = ModelStore(tmp_path_factory.mktemp("gemma-store"))
    store.add_local(GEMMA3, gemma3_gguf_path)
    no_template = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "plain.gguf", chat_template=None)
    store.add_local("plain:latest", no_template)
    engine = Engine(EngineSettings(n_slots=2, max_queue=8, keep_alive=600), store=store)
    running = run_app(engine, threads=4)
    yield running.url
    running.close()
    engine.close()


def test_listed_and_shown(gemma_server):
    import ollama
    client = ollama.Client(host=gemma_server)
    assert GEMMA3 in [m.model for m in client.list().models]
    shown = client.show(GEMMA3)
    assert shown.modelinfo["general.architecture"] == "gemma3" and shown.details.family == "gemma3"
    assert "<start_of_turn>" in shown.template and "completion" in shown.capabilities


def test_completion_gives_the_float_models_greedy_text(gemma_server, golden_gemma3):
    """/v1/completions and /api/generate (raw) continue the golden prompt with the float model's greedy tokens."""
    import ollama
    from openai import OpenAI
    case = next(c for c in golden_gemma3["cases"] if c["name"] == "g_code")   # llama.cpp = float greedy here
    client = OpenAI(base_url=gemma_server + "/v1/", api_key="x", max_retries=0, timeout=300)
    reply = client.completions.create(model=GEMMA3, prompt=case["prompt"], max_tokens=16, temperature=0)
    assert case["llamacpp"]["greedy_text"].startswith(reply.choices[0].text) and len(reply.choices[0].text) > 20
    assert reply.usage.prompt_tokens == len(case["prompt_tokens"])
    generated = ollama.Client(host=gemma_server).generate(model=GEMMA3, prompt=case["prompt"], raw=True,
                                                         options={"num_predict": 16, "temperature": 0})
    assert generated.response == reply.choices[0].text
    loaded = ollama.Client(host=gemma_server).ps()
    assert GEMMA3 in [m.model for m in loaded.models]


def test_chat_uses_gemma_turns(gemma_server):
    from openai import OpenAI
    client = OpenAI(base_url=gemma_server + "/v1/", api_key="x", max_retries=0, timeout=300)
    reply = client.chat.completions.create(model=GEMMA3, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Say hello."}])
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == 12   # <bos><start_of_turn>user\nSay hello.<end_of_turn>\n<start_of_turn>model\n


def test_chat_without_a_template_is_a_clear_400(gemma_server):
    import openai
    from openai import OpenAI
    client = OpenAI(base_url=gemma_server + "/v1/", api_key="x", max_retries=0, timeout=300)
    with pytest.raises(openai.BadRequestError, match="no chat template.*completions.*TEMPLATE"):
        client.chat.completions.create(model="plain", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    completion = client.completions.create(model="plain", prompt="Hi", max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens >= 1


def test_next_turn_reports_the_tokens_it_took_from_the_cache(gemma_server):
    """The OpenAI usage says how much of a conversation's next turn came from the slot's cache."""
    from openai import OpenAI
    client = OpenAI(base_url=gemma_server + "/v1/", api_key="x", max_retries=0, timeout=300)
    history = [{"role": "user", "content": "Tell me about the rivers of France. " * 40}]
    first = client.chat.completions.create(model=GEMMA3, max_tokens=12, temperature=0, messages=history)
    assert first.usage.prompt_tokens > 300
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And of Spain?"}]
    second = client.chat.completions.create(model=GEMMA3, max_tokens=4, temperature=0, messages=history)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens and second.usage.prompt_tokens - cached < 40
