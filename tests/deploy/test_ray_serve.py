"""localllm on Ray Serve (localllm_server/ray_serve.py), run from the shipped deploy/ray/serve_config.yaml.

The first tests need no cluster: the shipped config names this module's deployments and router, and the router's
parts (prompt blocks, the prefix index) do what it relies on. The others run one Ray cluster for the module: a head
on 127.0.0.1 started here, the shipped config deployed by ``serve run`` with two replicas of one CPU each (no
autoscaling), driven with the real openai and ollama clients through Ray Serve's HTTP proxy. Each replica names
itself (its Ray Serve replica id) in ``X-Localllm-Replica``. Killing a replica comes last: Ray Serve starts another.
"""
from __future__ import annotations

import threading

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'localllm[ray]')")

import yaml  # noqa: E402  (ray[serve] brings it)

from localllm_server import ray_serve  # noqa: E402

from .cluster import (MINILM, SHIPPED_RAY_CONFIG, SMOLLM2, WAIT, RayCluster, http_request,  # noqa: E402
                      wait_until)

REPLICA_HEADER = "x-localllm-replica"
SESSION_HEADER = "X-Session-Id"
NO_END_OF_TEXT = {"0": -100, "2": -100}
COUNTING = "1, 2, 3, 4, 5,"


def shipped_config() -> dict:
    return yaml.safe_load(SHIPPED_RAY_CONFIG.read_text())


def deployment(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


# ---- without a cluster -----------------------------------------------------------------------------------------

def test_shipped_config_runs_this_application():
    from ray.serve.schema import ServeDeploySchema

    config = shipped_config()
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    module, attribute = app["import_path"].split(":")
    assert module == ray_serve.__name__ and getattr(ray_serve, attribute) is ray_serve.build_app
    ray_serve.build_app(app["args"])                                  # the shipped args are the builder's
    assert {d["name"] for d in app["deployments"]} == {ray_serve.REPLICA_DEPLOYMENT, ray_serve.INGRESS_DEPLOYMENT}
    replica = deployment(config, ray_serve.REPLICA_DEPLOYMENT)
    bounds = replica["autoscaling_config"]
    assert 1 <= bounds["min_replicas"] <= bounds["max_replicas"] and bounds["target_ongoing_requests"] > 0
    assert bounds["target_ongoing_requests"] <= replica["max_ongoing_requests"]
    router = replica["request_router_config"]
    assert router["request_router_class"] == f"{ray_serve.__name__}.{ray_serve.PrefixCacheRouter.__name__}"
    state = object.__new__(ray_serve.PrefixCacheRouter)
    state.initialize_state(**router["request_router_kwargs"])          # the shipped kwargs are the router's
    env = app["runtime_env"]["env_vars"]
    assert env["NUMBA_NUM_THREADS"] == str(replica["ray_actor_options"]["num_cpus"])
    assert deployment(config, ray_serve.INGRESS_DEPLOYMENT)["num_replicas"] == 1


def test_build_app_refuses_unknown_arguments():
    with pytest.raises(ValueError, match="unknown application argument.*preloads"):
        ray_serve.build_app({"preloads": [SMOLLM2]})
    with pytest.raises(ValueError, match="preload must be a list of model names"):
        ray_serve.build_app({"preload": SMOLLM2})


def chat_body(*contents: str, **extra) -> bytes:
    import json

    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": content} for i, content in enumerate(contents)]
    return json.dumps({"model": SMOLLM2, "messages": messages, **extra}).encode()


LONG_QUESTION = "Tell me about the history of the lighthouse at the end of the harbour wall, please. " * 4


def test_next_turn_prompt_blocks_start_with_the_turn_before():
    _, first = ray_serve.routing_keys({}, chat_body(LONG_QUESTION, max_tokens=8))
    _, second = ray_serve.routing_keys({}, chat_body(LONG_QUESTION, "It was built in 1850.", "Who built it?",
                                                     max_tokens=64, temperature=0.7))
    assert len(first) >= 5 and second[:len(first)] == first and len(second) > len(first)
    _, other = ray_serve.routing_keys({}, chat_body("A different question. " + LONG_QUESTION))
    assert not set(other) & set(first)               # blocks chain: nothing shared after a different start
    _, glaciers = ray_serve.routing_keys({}, chat_body("Tell me one fact about glaciers. " + LONG_QUESTION))
    _, violins = ray_serve.routing_keys({}, chat_body("Tell me one fact about violins. " + LONG_QUESTION))
    assert not set(glaciers) & set(violins)          # the same model and JSON framing are not a shared prefix
    _, other_model = ray_serve.routing_keys({}, chat_body(LONG_QUESTION).replace(SMOLLM2.encode(), b"other:1b"))
    assert not set(other_model) & set(first)


def test_routing_keys_session_and_bodies_without_a_prompt():
    body = chat_body("Hi", prompt_cache_key="conversation-7", user="someone")
    assert ray_serve.routing_keys({"x-session-id": "header-1"}, body)[0] == "header-1"
    assert ray_serve.routing_keys({}, body)[0] == "conversation-7"
    assert ray_serve.routing_keys({}, chat_body("Hi", user="someone"))[0] == "someone"
    assert ray_serve.routing_keys({}, b'{"model": "all-minilm", "input": ["a b c"]}')[1] == ()   # too short
    assert ray_serve.routing_keys({}, b'{"model": "smollm2:135m"}') == (None, ())
    assert ray_serve.routing_keys({}, b"not json") == (None, ())
    assert ray_serve.routing_keys({}, b"[1, 2]") == (None, ())


def test_prefix_index_longest_prefix_eviction_and_forget():
    index = ray_serve.PrefixIndex(max_entries=6)
    index.record((1, 2, 3, 4), "a")
    index.record((1, 2, 9), "b")
    assert index.longest_prefixes((1, 2, 3, 4, 5), ["a", "b", "c"]) == {"a": 4, "b": 2}
    assert index.longest_prefixes((1, 2, 9, 10), ["a", "b"]) == {"a": 2, "b": 3}
    assert index.longest_prefixes((7, 8), ["a", "b"]) == {}
    assert index.blocks_held == {"a": 4, "b": 3}
    index.record((20, 21), "b")                      # 7 hashes: the least recently recorded (3) goes
    assert len(index) == 6 and index.longest_prefixes((1, 2, 3, 4), ["a"]) == {"a": 4}   # 4 still stands for it
    assert index.blocks_held == {"a": 3, "b": 5}
    index.forget("b")
    assert index.longest_prefixes((1, 2, 9), ["a", "b"]) == {"a": 2} and "b" not in index.blocks_held
    with pytest.raises(ValueError, match="max_prefix_entries"):
        ray_serve.PrefixIndex(0)


def test_the_request_a_replica_sees():
    scope = {"method": "POST", "path": "/llm/v1/chat/completions", "root_path": "/llm", "query_string": b"a=1",
             "headers": [(b"Content-Type", b"application/json"), (b"X-Forwarded-For", b"203.0.113.9"),
                         (b"Accept", b"text/html"), (b"accept", b"*/*"), (b"X-Session-Id", b"s-1")],
             "client": ("198.51.100.7", 50000), "server": ("127.0.0.1", 8000), "scheme": "http"}
    forwarded = ray_serve.forwarded_request(scope, chat_body(LONG_QUESTION))
    assert (forwarded.path, forwarded.root_path, forwarded.session) == ("/v1/chat/completions", "/llm", "s-1")
    assert forwarded.prompt_blocks == ray_serve.routing_keys({}, chat_body(LONG_QUESTION))[1]
    environ = ray_serve.wsgi_environ(forwarded, lambda: False)
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"], environ["QUERY_STRING"]) == ("/llm", "/v1/chat/completions",
                                                                                       "a=1")
    assert environ["CONTENT_TYPE"] == "application/json" and environ["HTTP_ACCEPT"] == "text/html,*/*"
    assert environ["REMOTE_ADDR"] == "198.51.100.7" and "HTTP_X_FORWARDED_FOR" not in environ
    assert environ["wsgi.input"].read() == forwarded.body and environ["CONTENT_LENGTH"] == str(len(forwarded.body))


def test_a_stream_cut_by_a_lost_replica_ends_in_its_own_framing():
    import json

    sse = ray_serve.stream_error("/v1/chat/completions", "text/event-stream; charset=utf-8", "gone")
    event, done = sse.split(b"\n\n")[:2]
    assert json.loads(event.removeprefix(b"data: "))["error"]["message"] == "gone" and done == b"data: [DONE]"
    assert json.loads(ray_serve.stream_error("/api/chat", "application/x-ndjson", "gone")) == {"error": "gone"}
    anthropic = ray_serve.stream_error("/v1/messages", "text/event-stream", "gone").decode()
    assert anthropic.startswith("event: error\ndata: ") and '"overloaded_error"' in anthropic
    assert ray_serve.stream_error("/v1/models", "application/json", "gone") == b""


def test_replicas_are_sized_to_the_cluster():
    assert ray_serve.replica_cpus_and_slots([8.0, 8.0, 4.0], threads=8) == (8, 2)
    assert ray_serve.replica_cpus_and_slots([4.0], threads=16) == (4, 1)       # at most a whole node
    assert ray_serve.replica_cpus_and_slots([8.0, 2.0], threads=2) == (2, 5)
    with pytest.raises(ValueError, match="no node with a CPU"):
        ray_serve.replica_cpus_and_slots([0.0], threads=2)


# ---- on a Ray cluster ------------------------------------------------------------------------------------------

def cluster_config(store_root) -> dict:
    """The shipped config, for this machine: the test store, two replicas of one CPU (two sequences each), the
    autoscaling bounds pinned to two; room for a session's whole burst on its replica (10 ongoing requests, no
    ``imbalance_threshold``)."""
    config = shipped_config()
    app = config["applications"][0]
    app["args"] = {"preload": [SMOLLM2]}
    app["runtime_env"]["env_vars"].update(LOCALLLM_MODELS=str(store_root), LOCALLLM_NUM_PARALLEL="2",
                                          LOCALLLM_MAX_QUEUE="8", NUMBA_NUM_THREADS="1")
    replica = deployment(config, ray_serve.REPLICA_DEPLOYMENT)
    replica["autoscaling_config"].update(min_replicas=2, max_replicas=2)
    replica.update(max_ongoing_requests=10, graceful_shutdown_timeout_s=5)
    replica["ray_actor_options"]["num_cpus"] = 1
    replica["request_router_config"]["request_router_kwargs"]["imbalance_threshold"] = None
    return config


@pytest.fixture(scope="module")
def cluster(deploy_store, tmp_path_factory):
    cluster = RayCluster(tmp_path_factory.mktemp("ray-serve"), cluster_config(deploy_store.root), num_cpus=4)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def replica_ids(cluster) -> set[str]:
    replicas = set(cluster.replica_actors(ray_serve.REPLICA_DEPLOYMENT))
    assert len(replicas) == 2
    return replicas


def openai_client(cluster, session: str | None = None):
    from openai import OpenAI

    headers = {SESSION_HEADER: session} if session is not None else None
    return OpenAI(base_url=cluster.url + "/v1/", api_key="localllm", max_retries=0, timeout=WAIT,
                  default_headers=headers)


def chat(client, messages: list[dict], max_tokens: int = 12):
    raw = client.chat.completions.with_raw_response.create(model=SMOLLM2, messages=messages, max_tokens=max_tokens,
                                                           temperature=0)
    return raw.headers[REPLICA_HEADER], raw.parse()


def test_openai_chat_and_its_stream_through_ray_serve(cluster, replica_ids):
    client = openai_client(cluster)
    messages = [{"role": "user", "content": "Name a colour."}]
    replica, reply = chat(client, messages)
    assert replica in replica_ids
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 12
    raw = client.chat.completions.with_raw_response.create(model=SMOLLM2, messages=messages, max_tokens=12,
                                                           temperature=0, stream=True)
    assert raw.headers[REPLICA_HEADER] in replica_ids and raw.headers["content-type"].startswith("text/event-stream")
    assert len(raw.headers.get_list("x-request-id")) == 1          # Ray Serve's proxy and the app's, once
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
    assert streamed == reply.choices[0].message.content


def test_ollama_chat_stream_generate_and_embed_through_ray_serve(cluster):
    import ollama

    client = ollama.Client(host=cluster.url, timeout=WAIT)
    parts = list(client.chat(model=SMOLLM2, messages=[{"role": "user", "content": "Say hello."}], stream=True,
                             options={"num_predict": 8, "temperature": 0}))
    assert len(parts) > 2 and parts[-1].done and "".join(p.message.content for p in parts)
    generated = client.generate(model=SMOLLM2, prompt=COUNTING, options={"num_predict": 4, "temperature": 0})
    assert generated.response.strip() and generated.eval_count == 4
    embedded = client.embed(model=MINILM, input=["a lighthouse", "a harbour"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 384


def test_errors_keep_their_status_and_envelope(cluster):
    import ollama
    import openai

    with pytest.raises(openai.NotFoundError):
        openai_client(cluster).chat.completions.create(model="no-such-model", messages=[{"role": "user",
                                                                                          "content": "Hi"}])
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=cluster.url, timeout=WAIT).chat(model="no-such-model",
                                                            messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 404
    status, _, body = http_request(cluster.port, "POST", "/v1/chat/completions", {"model": SMOLLM2})
    assert status == 400 and b'"param": "messages"' in body


def test_next_turn_goes_to_the_replica_that_cached_its_prefix(cluster, replica_ids):
    """No session header: the router finds a conversation's replica from its prompt alone. New conversations
    spread over both replicas (the least loaded, the one holding fewer recorded blocks first); each second turn
    goes where its first turn went, and its history comes from that replica's cache."""
    client = openai_client(cluster)
    topics = ["lighthouses", "glaciers", "violins", "beekeeping"]
    first_turns = {}
    for topic in topics:
        messages = [{"role": "user", "content": f"Tell me one fact about {topic}. " + LONG_QUESTION}]
        replica, reply = chat(client, messages)
        first_turns[topic] = (replica, messages, reply)
    assert {replica for replica, _, _ in first_turns.values()} == replica_ids
    for topic, (replica, messages, reply) in first_turns.items():
        messages = messages + [{"role": "assistant", "content": reply.choices[0].message.content},
                               {"role": "user", "content": "And another one?"}]
        second_replica, second = chat(client, messages, max_tokens=4)
        assert second_replica == replica, topic
        assert second.usage.prompt_tokens_details.cached_tokens >= reply.usage.prompt_tokens, topic


def replica_of(cluster, session: str | None) -> str:
    headers = {SESSION_HEADER: session} if session else {}
    status, headers, _ = http_request(cluster.port, "GET", "/health", headers=headers)
    assert status == 200
    return headers[REPLICA_HEADER]


def test_a_session_stays_on_its_replica(cluster, replica_ids):
    """X-Session-Id: a session's requests go to one replica even when their prompts share nothing with what it
    sent before. The same short prompt from four sessions (no prefix to follow, so without sessions they would all
    go to one replica) reaches both replicas, each session's own."""
    sessions = {}
    for i, topic in enumerate(["tides", "comets", "orchids", "canals"]):
        messages = [{"role": "user", "content": f"Tell me one fact about {topic}. " + LONG_QUESTION}]
        sessions[f"session-{i}"] = chat(openai_client(cluster, f"session-{i}"), messages, max_tokens=1)[0]
    assert set(sessions.values()) == replica_ids      # new sessions spread over the replicas
    for session, replica in sessions.items():
        answered, _ = chat(openai_client(cluster, session), [{"role": "user", "content": "Hi"}], max_tokens=1)
        assert answered == replica and replica_of(cluster, session) == replica, session


def engine_load(cluster, session: str, replica: str) -> int | None:
    """Generation requests decoding or waiting in ``replica`` (reached through its session), None if another
    replica answered."""
    status, headers, body = http_request(cluster.port, "GET", "/metrics", headers={SESSION_HEADER: session})
    assert status == 200
    if headers[REPLICA_HEADER] != replica:
        return None
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in body.decode().splitlines()
               if line.startswith(("localllm_requests_active{", "localllm_requests_pending{")))


def test_a_client_that_goes_away_frees_its_slot(cluster):
    session = "goes-away"
    replica = replica_of(cluster, session)
    stream = openai_client(cluster, session).completions.create(model=SMOLLM2, prompt=COUNTING, max_tokens=2000,
                                                                stream=True, logit_bias=NO_END_OF_TEXT,
                                                                temperature=0)
    chunks = iter(stream)
    assert all(next(chunks).choices[0].text for _ in range(3))
    assert engine_load(cluster, session, replica) == 1
    stream.close()
    wait_until(lambda: engine_load(cluster, session, replica) == 0, "the replica stops the abandoned generation")


def long_stream(client):
    """A completion stream that runs until it is stopped, with its replica; three chunks already read."""
    raw = client.completions.with_raw_response.create(model=SMOLLM2, prompt=COUNTING, max_tokens=2000, stream=True,
                                                      logit_bias=NO_END_OF_TEXT, temperature=0)
    chunks = iter(raw.parse())
    assert all(next(chunks).choices[0].text for _ in range(3))
    return raw.headers[REPLICA_HEADER], chunks


def test_killing_a_replica_loses_no_request_that_had_not_started(cluster, replica_ids):
    """Two streams fill the replica's two slots, and six requests of their session wait behind them in its engine.
    Its actor is killed: the streams, started, end with an error event; the six, not started, are answered by
    another replica, with the answers they would have had."""
    import openai

    prompts = ["Name a fruit.", "Name a river.", "Name a planet."]
    expected = {p: chat(openai_client(cluster), [{"role": "user", "content": p}])[1].choices[0].message.content
                for p in prompts}
    session = "doomed"
    doomed = replica_of(cluster, session)
    client = openai_client(cluster, session)
    streams = [long_stream(client) for _ in range(2)]
    assert [replica for replica, _ in streams] == [doomed, doomed]

    answers: dict[int, tuple[str, str]] = {}
    failures: dict[int, BaseException] = {}

    def ask(i: int) -> None:
        try:
            replica, reply = chat(client, [{"role": "user", "content": prompts[i % 3]}])
            answers[i] = (replica, reply.choices[0].message.content)
        except BaseException as exc:                 # reported by the assertions below
            failures[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    wait_until(lambda: engine_load(cluster, session, doomed) == 8, "the six requests wait in the doomed replica")
    cluster.kill_replica(ray_serve.REPLICA_DEPLOYMENT, doomed)

    for _, chunks in streams:
        with pytest.raises(openai.APIError, match="the replica answering this request stopped"):
            for _ in chunks:                         # an error event, not a broken connection
                pass
    for thread in threads:
        thread.join(WAIT)
    assert not failures, failures
    assert sorted(answers) == list(range(6))
    for i, (replica, content) in answers.items():
        assert replica != doomed and content == expected[prompts[i % 3]], (i, replica)
