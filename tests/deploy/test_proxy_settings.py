"""The app's side of a reverse proxy, without processes: settings from the environment, the waitress trusted-proxy
options, ``X-Accel-Buffering`` on streams, ``X-Localllm-Replica`` and the access log (falcon.testing)."""
from __future__ import annotations

import logging

import falcon
import falcon.testing
import pytest

from localllm_server.app import REPLICA_HEADER, Settings, create_app
from localllm_server.server import TRUSTED_PROXY_HEADERS, stop, waitress_server
from localllm_server.streaming import UnbufferedStreams, is_stream_content_type


@pytest.mark.parametrize("value", ["127.0.0.1", "10.1.2.3", "::1", "*"])
def test_trusted_proxy_from_the_environment(monkeypatch, value):
    monkeypatch.setenv("LOCALLLM_TRUSTED_PROXY", f" {value} ")
    assert Settings.from_env().trusted_proxy == value


@pytest.mark.parametrize("variable, value, named", [
    ("LOCALLLM_TRUSTED_PROXY", "nginx.local", "LOCALLLM_TRUSTED_PROXY"),
    ("LOCALLLM_TRUSTED_PROXY", "10.0.0.0/8", "LOCALLLM_TRUSTED_PROXY"),
    ("LOCALLLM_REPLICA_NAME", "replica one", "LOCALLLM_REPLICA_NAME"),
    ("LOCALLLM_REPLICA_NAME", "réplica", "LOCALLLM_REPLICA_NAME"),
    ("LOCALLLM_ACCESS_LOG", "maybe", "LOCALLLM_ACCESS_LOG"),
])
def test_bad_proxy_settings_name_their_variable(monkeypatch, variable, value, named):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=named):
        Settings.from_env()


def test_defaults_trust_no_proxy(monkeypatch):
    for variable in ("LOCALLLM_TRUSTED_PROXY", "LOCALLLM_REPLICA_NAME", "LOCALLLM_ACCESS_LOG"):
        monkeypatch.delenv(variable, raising=False)
    settings = Settings.from_env()
    assert (settings.trusted_proxy, settings.replica_name, settings.access_log) == (None, None, False)


def waitress_adjustments(settings: Settings):
    settings.host, settings.port = "127.0.0.1", 0
    server = waitress_server(falcon.App(), settings)
    try:
        return server.adj
    finally:
        stop(server)


def test_waitress_trusts_the_forwarded_headers_of_the_trusted_proxy_only():
    adj = waitress_adjustments(Settings(trusted_proxy="127.0.0.1"))
    assert adj.trusted_proxy == "127.0.0.1" and adj.trusted_proxy_count == 1
    assert adj.trusted_proxy_headers == set(TRUSTED_PROXY_HEADERS)
    assert adj.clear_untrusted_proxy_headers
    untrusting = waitress_adjustments(Settings())
    assert untrusting.trusted_proxy is None and not untrusting.trusted_proxy_headers
    assert untrusting.clear_untrusted_proxy_headers


@pytest.mark.parametrize("content_type, streamed", [
    ("text/event-stream", True), ("application/x-ndjson", True), ("text/event-stream; charset=utf-8", True),
    ("Application/X-NDJSON", True), ("application/json", False), (None, False), ("text/plain", False),
])
def test_stream_content_types(content_type, streamed):
    assert is_stream_content_type(content_type) is streamed


def test_unbuffered_streams_mark_only_streams():
    class Answer:
        def on_get(self, req, resp, kind):
            resp.content_type = {"sse": "text/event-stream", "ndjson": "application/x-ndjson",
                                 "json": falcon.MEDIA_JSON}[kind]
            resp.text = "{}"

    app = falcon.App(middleware=[UnbufferedStreams()])
    app.add_route("/{kind}", Answer())
    client = falcon.testing.TestClient(app)
    assert client.simulate_get("/sse").headers["X-Accel-Buffering"] == "no"
    assert client.simulate_get("/ndjson").headers["X-Accel-Buffering"] == "no"
    assert "X-Accel-Buffering" not in client.simulate_get("/json").headers


def test_replica_header_and_access_log(caplog):
    """The access line shows the client address and URL the WSGI server gave the app (a trusted proxy's
    forwarded values, when waitress applied them) and the request id."""
    app = create_app(engine=None, settings=Settings(replica_name="r7", access_log=True))
    client = falcon.testing.TestClient(app)
    with caplog.at_level(logging.INFO, logger="localllm_server.access"):
        answer = client.simulate_get("/", remote_addr="198.51.100.4", host="llm.example.test",
                                     headers={"X-Request-Id": "req-abc"})
        missing = client.simulate_get("/nowhere", remote_addr="198.51.100.4", headers={"X-Request-Id": "req-def"})
    assert answer.status_code == 200 and answer.headers[REPLICA_HEADER] == "r7"
    assert missing.status_code == 404 and missing.headers[REPLICA_HEADER] == "r7"
    lines = [record.getMessage() for record in caplog.records if record.name == "localllm_server.access"]
    assert lines == ['198.51.100.4 "GET http://llm.example.test/" 200 req-abc',
                     '198.51.100.4 "GET http://falconframework.org/nowhere" 404 req-def']


def test_no_replica_header_unless_named():
    client = falcon.testing.TestClient(create_app(engine=None, settings=Settings()))
    assert REPLICA_HEADER not in client.simulate_get("/").headers
