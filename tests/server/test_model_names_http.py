"""Model names that try path traversal get a 400 ``invalid model name`` on every route that takes a name, and
touch nothing on disk. (The library and the CLI: tests/test_model_names.py.)"""
from __future__ import annotations

import urllib.parse

import pytest

from tests.server.conftest import SMOLLM2

HOSTILE_NAMES = ["../../etc/passwd", "..", "/etc/passwd", "a/../../b", "..\\..\\x", "x:../y", ".hidden", "a//b",
                 "x\x00y", "x\ny", "~/x", "C:\\x", "%2e%2e/x", "x:", "a/b/c/d/e/f"]
USER = [{"role": "user", "content": "hi"}]

ROUTES = {  # (method, path, body for a name)
    "/v1/chat/completions": ("POST", "/v1/chat/completions", lambda n: {"model": n, "messages": USER}),
    "/v1/completions": ("POST", "/v1/completions", lambda n: {"model": n, "prompt": "hi"}),
    "/v1/embeddings": ("POST", "/v1/embeddings", lambda n: {"model": n, "input": "hi"}),
    "/v1/responses": ("POST", "/v1/responses", lambda n: {"model": n, "input": "hi"}),
    "/api/chat": ("POST", "/api/chat", lambda n: {"model": n, "messages": USER}),
    "/api/generate": ("POST", "/api/generate", lambda n: {"model": n, "prompt": "hi"}),
    "/api/embed": ("POST", "/api/embed", lambda n: {"model": n, "input": "hi"}),
    "/api/embeddings": ("POST", "/api/embeddings", lambda n: {"model": n, "prompt": "hi"}),
    "/api/show": ("POST", "/api/show", lambda n: {"model": n}),
    "/api/pull": ("POST", "/api/pull", lambda n: {"model": n}),
    "/api/pull (not streamed)": ("POST", "/api/pull", lambda n: {"model": n, "stream": False}),
    "/api/create model": ("POST", "/api/create", lambda n: {"model": n, "from": SMOLLM2}),
    "/api/copy source": ("POST", "/api/copy", lambda n: {"source": n, "destination": "fine"}),
    "/api/copy destination": ("POST", "/api/copy", lambda n: {"source": SMOLLM2, "destination": n}),
    "/api/delete": ("DELETE", "/api/delete", lambda n: {"model": n}),
    "/tokenize": ("POST", "/tokenize", lambda n: {"model": n, "prompt": "hi"}),
    "/detokenize": ("POST", "/detokenize", lambda n: {"model": n, "tokens": [1]}),
}


def listing(root) -> dict[str, int]:
    """Every file under ``root`` with its size (the store holds real models: not read whole)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def error_message(response) -> tuple[str, str | None]:
    """(message, code) of an Ollama (``{"error": "..."}``) or OpenAI (``{"error": {...}}``) error body."""
    error = response.json()["error"]
    if isinstance(error, dict):
        return error["message"], error.get("code")
    return error, None


def assert_refused(response, name: str, what: str) -> None:
    assert response.status == 400, (what, name, response.status, response.body[:300])
    message, code = error_message(response)
    assert message.startswith(f"invalid model name {name!r}"), (what, message)
    assert code in (None, "invalid_model_name"), (what, code)


@pytest.mark.parametrize("route", ROUTES)
def test_hostile_names_are_400_on_every_route(http, server_store, route):
    method, path, body = ROUTES[route]
    before = listing(server_store.root.parent)
    for name in HOSTILE_NAMES:
        assert_refused(http.request(method, path, body(name)), name, route)
    assert listing(server_store.root.parent) == before


def test_hostile_names_in_the_model_url_are_400(http, server_store):
    before = listing(server_store.root.parent)
    for name in HOSTILE_NAMES:
        if name in ("..", "/etc/passwd") or name.startswith(("../", "/", "a/")):
            continue  # as a URL path these are other routes (or dot segments a client resolves)
        response = http.get("/v1/models/" + urllib.parse.quote(name, safe=""))
        assert_refused(response, name, "/v1/models/{model}")
    assert listing(server_store.root.parent) == before


def test_create_from_a_hostile_model_name_is_400(http, server_store):
    """``from`` names a store model unless written as a path; as a name it is checked like any other."""
    before = listing(server_store.root.parent)
    for name in ["a/../../b", "x\x00y", "x:../y", "a\\b", ".hidden", "x:"]:
        assert_refused(http.post("/api/create", {"model": "fine", "from": name}), name, "/api/create from")
    assert listing(server_store.root.parent) == before
    assert "fine:latest" not in [entry.name for entry in server_store.list()]
