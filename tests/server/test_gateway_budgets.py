"""Budgets per API key over HTTP: a gateway of its own (on the session engine) whose upstream is test_gateway's
fault-injecting one, priced so that one of its answers (3 prompt + 2 completion tokens) costs 1.3.

``team-a`` (key from an environment variable) may spend 2.0 a day: two answers, then 429; ``team-b`` (key by
its SHA-256) 60 tokens an hour, counted on local models too, on /v1/messages as on /v1; every other key, and
no key, falls to ``others``, which may spend nothing. A spent budget is a 429 ``insufficient_quota`` in the
OpenAI envelope (Anthropic's on /v1/messages) naming the budget, never the key; the spend shows in the
gateway's metrics lines and in ``localllm usage``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import SMOLLM2, RawHTTP, RunningServer
from .test_gateway import FAULT_KEY, faulty_port  # noqa: F401

TEAM_A_KEY = "sk-team-a-budget-key-0001"
TEAM_B_KEY = "sk-team-b-budget-key-0002"
STRANGER_KEY = "sk-not-in-any-budget-0003"
ANSWER_COST = (3 * 100_000 + 2 * 500_000) / 1e6          # 1.3

BUDGETS_TOML = """
[upstreams.faulty]
base_url = "http://127.0.0.1:{faulty}/v1"
api_key_env = "GATEWAY_TEST_FAULT_KEY"
input_price_per_million = 100_000
output_price_per_million = 500_000
models = ["ok"]

[budgets.team-a]
key_env = "BUDGET_TEST_TEAM_A_KEY"
max_cost = 2.0

[budgets.team-b]
key_sha256 = "{team_b_sha256}"
max_tokens = 60
period = "hour"

[budgets.others]
other_keys = true
max_cost = 0
"""


@pytest.fixture(scope="module")
def budget_gateway(engine, faulty_port, tmp_path_factory):
    from localllm_server.app import Settings, create_app

    path = tmp_path_factory.mktemp("budgets") / "gateway.toml"
    path.write_text(BUDGETS_TOML.format(faulty=faulty_port,
                                        team_b_sha256=hashlib.sha256(TEAM_B_KEY.encode()).hexdigest()))
    patch = pytest.MonkeyPatch()
    patch.setenv("GATEWAY_TEST_FAULT_KEY", FAULT_KEY)
    patch.setenv("BUDGET_TEST_TEAM_A_KEY", TEAM_A_KEY)
    settings = Settings(threads=4)
    settings.gateway = str(path)
    running = RunningServer(create_app(engine, settings), settings)
    yield running.url, settings._gateway
    running.close()
    patch.undo()


@pytest.fixture(scope="module")
def bw(budget_gateway) -> RawHTTP:
    return RawHTTP(budget_gateway[0])


def chat(model: str = "faulty/ok", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def spent_row(gateway, name: str) -> dict:
    [row] = [row for row in gateway.budgets.snapshot() if row["budget"] == name]
    return row


def test_a_cost_budget_answers_until_spent_then_429_naming_the_budget_not_the_key(budget_gateway, bw, caplog):
    caplog.set_level(logging.DEBUG)
    _, gateway = budget_gateway
    for _ in range(2):                                # 0 then 1.3 spent: below 2.0, answered
        answered = bw.post("/v1/chat/completions", chat(), headers=bearer(TEAM_A_KEY))
        assert answered.status == 200, answered.body
    assert spent_row(gateway, "team-a")["cost"] == pytest.approx(2 * ANSWER_COST)
    refused = bw.post("/v1/chat/completions", chat(), headers=bearer(TEAM_A_KEY))
    assert refused.status == 429
    error = refused.json()["error"]
    assert error["type"] == error["code"] == "insufficient_quota"
    assert error["message"].startswith("budget 'team-a' is spent for this day: 2.600000 of 2 in cost")
    assert 0 < int(refused.headers["retry-after"]) <= 24 * 3600
    streamed = bw.post("/v1/chat/completions", chat(stream=True), headers=bearer(TEAM_A_KEY))
    assert streamed.status == 429                     # refused before any stream starts
    assert spent_row(gateway, "team-a")["refused"] == 2
    for text in (refused.body.decode(), caplog.text, repr(gateway.config)):
        assert TEAM_A_KEY not in text and TEAM_B_KEY not in text


def test_a_spent_budget_is_an_anthropic_error_on_messages(budget_gateway, bw):
    anthropic = pytest.importorskip("anthropic")
    bw.post("/v1/chat/completions", chat(), headers=bearer(TEAM_A_KEY))          # spent, if it was not yet
    client = anthropic.Anthropic(base_url=budget_gateway[0], api_key=TEAM_A_KEY, max_retries=0)   # x-api-key
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="faulty/ok", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 429
    assert caught.value.body["type"] == "error"
    error = caught.value.body["error"]
    assert error["type"] == "rate_limit_error" and "budget 'team-a'" in error["message"]


def test_a_token_budget_counts_local_answers_streams_included(budget_gateway, bw):
    _, gateway = budget_gateway
    message = {"model": SMOLLM2, "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    first = bw.post("/v1/messages", message, headers={"x-api-key": TEAM_B_KEY})     # the local /v1/messages
    assert first.status == 200 and b"message_stop" in first.body
    events = [json.loads(line[5:]) for line in first.body.decode().splitlines() if line.startswith("data:")]
    usage = [e for e in events if e["type"] == "message_delta"][0]["usage"]
    expected = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["output_tokens"]
    assert spent_row(gateway, "team-b")["tokens"] == expected
    second = bw.post("/v1/chat/completions", chat(SMOLLM2, max_tokens=3), headers=bearer(TEAM_B_KEY))
    assert second.status == 200                        # a local model through the gateway's chat route
    tokens = spent_row(gateway, "team-b")["tokens"]
    assert tokens == expected + second.json()["usage"]["total_tokens"] and tokens >= 60
    refused = bw.post("/v1/chat/completions", chat(SMOLLM2), headers=bearer(TEAM_B_KEY))
    assert refused.status == 429 and f"{tokens} of 60 tokens" in refused.json()["error"]["message"]
    assert spent_row(gateway, "team-b")["cost"] == 0                              # local models cost nothing


@pytest.mark.parametrize("headers", [{}, bearer(STRANGER_KEY), {"x-api-key": STRANGER_KEY}])
def test_keys_in_no_budget_fall_to_the_other_keys_budget(bw, headers):
    refused = bw.post("/v1/chat/completions", chat(), headers=headers)
    assert refused.status == 429 and "budget 'others'" in refused.json()["error"]["message"]
    assert STRANGER_KEY not in refused.body.decode()


def test_the_spend_in_the_gateways_metrics_lines_and_localllm_usage(budget_gateway, bw, monkeypatch, capsys):
    from localllm import cli

    _, gateway = budget_gateway
    bw.post("/v1/chat/completions", chat(), headers=bearer(STRANGER_KEY))           # refused by 'others'
    text = gateway.metrics_text()
    assert 'localllm_gateway_budget_max_cost{budget="others",period="day"} 0.000000' in text
    assert 'localllm_gateway_budget_max_tokens{budget="team-b",period="hour"} 60' in text
    rows = {row["budget"]: row for row in cli.budget_rows(text)}
    assert list(rows) == ["team-a", "team-b", "others"]
    for name in rows:
        snapshot = spent_row(gateway, name)
        assert rows[name]["tokens"] == snapshot["tokens"] and rows[name]["refused"] == snapshot["refused"]
        assert rows[name]["cost"] == pytest.approx(snapshot["cost"], abs=1e-6)
    assert rows["team-a"]["max_tokens"] is None and rows["team-b"]["max_cost"] is None
    assert rows["others"]["refused"] >= 1

    class Metrics(BaseHTTPRequestHandler):         # a server whose /metrics holds these lines
        def do_GET(self):
            payload = text.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("LOCALLLM_HOST", f"127.0.0.1:{httpd.server_address[1]}")
        assert cli.main(["usage"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == ["BUDGET", "PERIOD", "TOKENS", "COST", "REFUSED"]
        team_b = next(line for line in table if line.startswith("team-b"))
        assert team_b.split()[:5] == ["team-b", "hour", str(rows["team-b"]["tokens"]), "of", "60"]
        assert cli.main(["usage", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"routes": [], "budgets": list(rows.values())}
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_spend_is_in_the_servers_metrics(bw):
    assert 'localllm_gateway_budget_spent_tokens{budget="team-b",period="hour"}' in bw.get("/metrics").body.decode()
