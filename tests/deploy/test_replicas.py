"""Three ``localllm serve`` replicas behind the shipped nginx config: conversation affinity and failover.

Requests that carry ``X-Session-Id`` go to one replica per session (the second turn of a conversation finds its
history in that replica's prompt cache); requests without it go round-robin; a replica that dies gets no more
requests, and none of the requests sent after it died fails, while a stream it had started ends in an error
instead of being restarted elsewhere.
"""
from __future__ import annotations

import pytest

from .cluster import SMOLLM2, WAIT, Nginx, http_request, start_replica

pytestmark = pytest.mark.real_model

REPLICA_NAMES = ("r0", "r1", "r2")
SESSION_HEADER = "X-Session-Id"
REPLICA_HEADER = "x-localllm-replica"
NO_END_OF_TEXT = {"0": -100, "2": -100}
COUNTING = "1, 2, 3, 4, 5,"


@pytest.fixture(scope="module")
def cluster(nginx_path, deploy_store, tmp_path_factory):
    """({name: replica}, nginx): three replicas behind one nginx."""
    folder = tmp_path_factory.mktemp("nginx-replicas")
    replicas, nginx = {}, None
    try:
        for name in REPLICA_NAMES:
            replicas[name] = start_replica(deploy_store.root, folder, name)
        nginx = Nginx(nginx_path, folder / "nginx", [replica.port for replica in replicas.values()])
        yield replicas, nginx
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in replicas.values():
            replica.stop()


def replica_for(nginx, session: str | None) -> str:
    """The replica that answers a quick request with this session id (None: no header)."""
    headers = {SESSION_HEADER: session} if session is not None else {}
    status, response_headers, _ = http_request(nginx.port, "GET", "/v1/models", headers=headers)
    assert status == 200
    return response_headers[REPLICA_HEADER]


def openai_client(nginx, session: str | None = None):
    from openai import OpenAI

    headers = {SESSION_HEADER: session} if session is not None else None
    return OpenAI(base_url=nginx.url + "/v1/", api_key="localllm", max_retries=0, timeout=WAIT,
                  default_headers=headers)


def test_one_session_one_replica(cluster):
    replicas, nginx = cluster
    chosen = {f"conversation-{i}": replica_for(nginx, f"conversation-{i}") for i in range(12)}
    for session, name in chosen.items():
        assert [replica_for(nginx, session) for _ in range(3)] == [name] * 3
    assert len(set(chosen.values())) >= 2          # sessions spread (12 on one replica: odds 3 in 3**12)


def test_requests_without_a_session_go_round_robin(cluster):
    replicas, nginx = cluster
    assert {replica_for(nginx, None) for _ in range(2 * len(replicas))} == set(replicas)


def chat_turn(client, messages: list[dict]):
    raw = client.chat.completions.with_raw_response.create(model=SMOLLM2, messages=messages, max_tokens=16,
                                                           temperature=0)
    return raw.headers[REPLICA_HEADER], raw.parse()


def test_second_turn_of_a_conversation_is_served_from_the_prompt_cache(cluster):
    replicas, nginx = cluster
    client = openai_client(nginx, "conversation-cached")
    messages = [{"role": "system", "content": "You are a terse assistant who answers in one sentence."},
                {"role": "user", "content": "Name a large ocean."}]
    first_replica, first = chat_turn(client, messages)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And a small sea?"}]
    second_replica, second = chat_turn(client, messages)
    assert second_replica == first_replica
    # the whole first prompt (system and first question) comes from the replica's cache, not a new prefill
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_a_dead_replica_gets_nothing_and_no_new_request_fails(cluster):
    """Kill the replica of a running stream: that stream ends in an error (it had started: nginx never restarts
    it elsewhere); every request sent afterwards, its session's included, streams included, is answered by the
    other two."""
    import httpx
    import openai

    replicas, nginx = cluster
    session = "conversation-doomed"
    doomed = replica_for(nginx, session)
    client = openai_client(nginx, session)
    stream = client.completions.create(model=SMOLLM2, prompt=COUNTING, max_tokens=2000, stream=True,
                                       logit_bias=NO_END_OF_TEXT, temperature=0)
    chunks = iter(stream)
    received = [next(chunks).choices[0].text for _ in range(3)]
    assert all(received)
    replicas[doomed].kill()
    try:
        with pytest.raises((httpx.HTTPError, openai.APIError)):
            for _ in chunks:
                pass

        others = set(replicas) - {doomed}
        for i in range(12):
            other_session = session if i == 0 else f"after-{i}"
            other = openai_client(nginx, other_session)
            name, reply = chat_turn(other, [{"role": "user", "content": "Hi"}])
            assert name in others and reply.choices[0].message.content is not None
        raw = client.chat.completions.with_raw_response.create(
            model=SMOLLM2, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True)
        assert raw.headers[REPLICA_HEADER] in others
        assert "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
    finally:
        replicas[doomed].start()                  # the module's cluster whole again, on the same port
