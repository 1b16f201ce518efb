"""The threaded engine on a tiny model: batching is invisible in the results, cancellation frees slots."""
import threading
import time

import pytest

import localllm
from localllm.engine import Engine, EngineSettings, ServerBusy
from localllm.store import ModelNotFound, ModelStore


@pytest.fixture()
def engine(tmp_path):
    engine = Engine(EngineSettings(n_slots=4, max_queue=8, keep_alive=60, backend="ref"),
                    store=ModelStore(tmp_path / "store"))
    yield engine
    engine.close()


def run(engine, path, prompt, **settings):
    model = engine.load(str(path))
    params, num_ctx = model.make_params(**settings)
    handle = engine.submit(str(path), model.tokenize(prompt), params, num_ctx)
    events = list(handle)
    return "".join(e.text for e in events), events


def test_concurrent_requests_match_running_alone(engine, tiny_llama_path):
    alone_model = localllm.load(tiny_llama_path, backend="ref")
    prompts = ["hello", "a longer prompt here", "x", "abc abc", "zz top", "what?"]
    expected = [alone_model.generate(p, temperature=0, max_tokens=12) for p in prompts]
    results = [None] * len(prompts)

    def worker(i):
        results[i] = run(engine, tiny_llama_path, prompts[i], temperature=0, max_tokens=12)[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == expected


def test_final_event_has_usage_and_reason(engine, tiny_llama_path):
    _, events = run(engine, tiny_llama_path, "hello", temperature=0, max_tokens=5)
    assert events[-1].finish_reason == "length"
    assert events[-1].usage.prompt_tokens == 5 and events[-1].usage.completion_tokens == 5


def _worker(engine, path):
    return engine.workers[str(path)]


def test_cancel_frees_the_slot(engine, tiny_llama_path):
    model = engine.load(str(tiny_llama_path))
    params, num_ctx = model.make_params(temperature=0, max_tokens=200)
    handle = engine.submit(str(tiny_llama_path), model.tokenize("hi"), params, num_ctx)
    next(iter(handle))
    handle.cancel()
    worker = _worker(engine, tiny_llama_path)
    deadline = time.time() + 10
    while worker.busy() and time.time() < deadline:
        time.sleep(0.01)
    assert not worker.busy()
    assert model.cache.free_slots == model.cache.n_slots


def test_queue_full_is_server_busy(tmp_path, tiny_llama_path):
    engine = Engine(EngineSettings(n_slots=1, max_queue=1, keep_alive=60, backend="ref"),
                    store=ModelStore(tmp_path / "store"))
    try:
        model = engine.load(str(tiny_llama_path))
        params, num_ctx = model.make_params(temperature=0, max_tokens=150)
        first = engine.submit(str(tiny_llama_path), model.tokenize("a"), params, num_ctx)
        next(iter(first))                                   # admitted: the only slot is busy
        second = engine.submit(str(tiny_llama_path), model.tokenize("b"), params, num_ctx)   # waits
        with pytest.raises(ServerBusy, match="maximum pending requests exceeded"):
            engine.submit(str(tiny_llama_path), model.tokenize("c"), params, num_ctx)
        first.cancel()
        assert "".join(e.text for e in second)              # the waiting one still completes
    finally:
        engine.close()


def test_keep_alive_zero_unloads(engine, tiny_llama_path):
    engine.load(str(tiny_llama_path), keep_alive=0)
    deadline = time.time() + 5
    while engine.loaded() and time.time() < deadline:
        time.sleep(0.05)
    assert engine.loaded() == []


def test_unknown_model_is_not_found(engine):
    with pytest.raises(ModelNotFound, match="model 'nope' not found, try pulling it first"):
        engine.load("nope")


def test_keep_alive_zero_on_submit_serves_the_request_then_unloads(engine, tiny_llama_path):
    model = engine.load(str(tiny_llama_path))
    params, num_ctx = model.make_params(temperature=0, max_tokens=20)
    for _ in range(5):                                   # the reaper runs every second: give it chances to race
        handle = engine.submit(str(tiny_llama_path), model.tokenize("hi"), params, num_ctx, keep_alive=0)
        assert "".join(e.text for e in handle) == model.generate("hi", temperature=0, max_tokens=20)
        model = engine.load(str(tiny_llama_path))
    engine.load(str(tiny_llama_path), keep_alive=0)
    deadline = time.time() + 5
    while engine.loaded() and time.time() < deadline:
        time.sleep(0.05)
    assert engine.loaded() == []


def test_negative_keep_alive_is_forever(engine, tiny_llama_path):
    engine.load(str(tiny_llama_path), keep_alive=-1)
    (row,) = engine.loaded()
    assert row["expires_at"] > time.time() + 250 * 365 * 86400


def test_a_negative_default_keep_alive_is_forever_too(tiny_llama_path):
    """LOCALLLM_KEEP_ALIVE=-1 (the engine's default) keeps models loaded, as a request's -1 does."""
    engine = Engine(EngineSettings(n_slots=1, max_queue=2, keep_alive=-1, backend="ref"))
    try:
        engine.load(str(tiny_llama_path))
        (row,) = engine.loaded()
        assert row["expires_at"] > time.time() + 250 * 365 * 86400
    finally:
        engine.close()
