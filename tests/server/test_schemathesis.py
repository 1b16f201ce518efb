"""schemathesis over the server's own /openapi.json: every operation, a few derandomized examples each.

A server over a tiny random Llama and all-MiniLM (``tests/fuzz/run_schemathesis.py``, which
also runs the longer fuzz as a script) answers generated requests; every answer must be
no 5xx, of a documented status and media type, and of the documented schema, within a
bounded time. The document's own promises are checked too: every operation documents its
bodies and errors, and schema-valid requests the server used to refuse are accepted.
"""
from __future__ import annotations

import pytest

from tests.fuzz.run_schemathesis import TEXT_MODEL, TinyServer, fuzz, narrowed

EXAMPLES = 5
NEGATIVE_EXAMPLES = 3
CALL_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, minilm_dir):
    server = TinyServer(tmp_path_factory.mktemp("fuzz"), minilm_dir)
    yield server.url
    server.close()


@pytest.fixture(scope="module")
def document(fuzz_server):
    import requests
    return requests.get(fuzz_server + "/openapi.json", timeout=30).json()


def test_every_operation_documents_its_answers(document):
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            responses = operation["responses"]
            label = f"{method.upper()} {path}"
            success = "201" if (method, path) == ("post", "/api/blobs/{digest}") else "200"
            assert success in responses and "403" in responses, label
            for status, answer in responses.items():
                if status == success:
                    continue
                schema = answer["content"]["application/json"]["schema"]
                error = schema["properties"]["error"]
                expected = "string" if path.startswith("/api/") else "object"
                assert error["type"] == expected, label
            if "requestBody" in operation:
                assert {"400", "413"} <= set(responses), label
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat) == {"application/json", "text/event-stream"}
    assert set(document["paths"]["/api/chat"]["post"]["responses"]["200"]["content"]) == {
        "application/json", "application/x-ndjson"}
    assert "503" in document["paths"]["/api/generate"]["post"]["responses"]


def test_schema_states_what_the_server_enforces(document, fuzz_server):
    """A tool message needs tool_call_id; stop strings are non-empty; tool parameters are object schemas; and
    a request the outside fuzz saw refused (a tool result, an empty stop list) is taken."""
    import requests

    from localllm.reasoning import EFFORTS
    from localllm_server.schemas import REASONING_EFFORTS

    assert REASONING_EFFORTS == EFFORTS
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    message_kinds = body["properties"]["messages"]["items"]["anyOf"]
    tool_message = next(kind for kind in message_kinds if kind["properties"]["role"].get("const") == "tool")
    assert "tool_call_id" in tool_message["required"]
    assert body["properties"]["stop"]["anyOf"][0]["minLength"] == 1
    parameters = body["properties"]["tools"]["items"]["properties"]["function"]["properties"]["parameters"]
    assert parameters["anyOf"][0]["required"] == ["type"]
    answer = requests.post(fuzz_server + "/v1/chat/completions", timeout=CALL_TIMEOUT, json={
        "model": TEXT_MODEL, "max_tokens": 2, "stop": [],
        "messages": [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "42"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})
    # the tiny model's 128 tokens cannot hold the tool prompt: validation passed if the context check answers
    assert answer.status_code == 200 or answer.json()["error"]["code"] == "context_length_exceeded", answer.text


def test_request_rules_match_the_library():
    """The rules the document copies from the library (no heavy imports in the server) are the library's."""
    import re

    from localllm import modelfile, store
    from localllm_server import openapi, schemas
    from localllm_server.ollama_api import parsing

    name = re.compile(schemas.MODEL_NAME_PATTERN)
    for valid in ("smollm2", "smollm2:135m", "hf.co/user/repo:file-Q4_K_M", "a/b/c/d/e:_1"):
        assert name.search(valid) and store.canonical_name(valid)
    for invalid in ("", "../x", "/abs", "a b", "a/b/c/d/e/f", "-x", "x:-tag", "x" * 81):
        assert not name.search(invalid)
        with pytest.raises(store.InvalidModelName):
            store.canonical_name(invalid)
    assert set(modelfile.PARAMETER_TYPES) == set(parsing.GENERATION_OPTIONS)
    assert openapi.CREATE_MESSAGE_ROLES == modelfile.MESSAGE_ROLES
    duration = re.compile(parsing.DURATION_PATTERN)
    for text, seconds in (("5m", 300), ("1h30m", 5400), ("-1", -1), ("0", 0), (".5s", 0.5), ("1e3", 1000)):
        assert duration.search(text) and parsing.parse_duration(text) == seconds
    assert not duration.search("nan")


def test_fuzz_reports_a_document_the_server_breaks(fuzz_server, document):
    """The checks bite: an undocumented status, media type, body field, SSE chunk and NDJSON line are all found."""
    broken = narrowed(document)
    paths = broken["paths"]
    paths["/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["required"] = ["missing"]
    paths["/api/version"]["get"]["responses"]["200"]["content"] = {"text/html": {"schema": {"type": "string"}}}
    show = paths["/api/show"]["post"]
    del show["responses"]["404"]
    show["requestBody"]["content"]["application/json"]["schema"] = {
        "type": "object", "required": ["model"], "properties": {"model": {"const": "not-in-the-store"}}}
    chat = paths["/v1/chat/completions"]["post"]
    chat["requestBody"]["content"]["application/json"]["schema"] = {
        "type": "object", "required": ["model", "messages", "stream", "max_tokens"], "properties": {
            "model": {"const": TEXT_MODEL}, "stream": {"const": True}, "max_tokens": {"const": 2},
            "messages": {"const": [{"role": "user", "content": "hi"}]}}}
    event = chat["responses"]["200"]["content"]["text/event-stream"]["schema"]["properties"]["data"]["anyOf"][1]
    event["contentSchema"]["anyOf"][0]["properties"]["object"] = {"const": "not.a.chunk"}
    generate = paths["/api/generate"]["post"]
    generate["requestBody"]["content"]["application/json"]["schema"] = {
        "type": "object", "required": ["model", "prompt", "options"], "properties": {
            "model": {"const": TEXT_MODEL}, "prompt": {"const": "hi"}, "options": {"const": {"num_predict": 2}}}}
    line = generate["responses"]["200"]["content"]["application/x-ndjson"]["schema"]["items"]["anyOf"][0]
    line["properties"]["done"] = {"const": False}
    expected = {"GET /health": "response_schema_conformance", "GET /api/version": "content_type_conformance",
                "POST /api/show": "status_code_conformance",
                "POST /v1/chat/completions": "response_schema_conformance",
                "POST /api/generate": "response_schema_conformance"}
    summary = fuzz(fuzz_server, 1, timeout=CALL_TIMEOUT, document=broken,
                   operations={tuple(label.split(" ", 1)) for label in expected})
    for label, check in expected.items():
        assert check in [failure["check"] for failure in summary["operations"][label]["failures"]], label


def test_fuzzed_requests_get_documented_answers(fuzz_server, document):
    summary = fuzz(fuzz_server, EXAMPLES, timeout=CALL_TIMEOUT, document=narrowed(document))
    operations = summary["operations"]
    assert len(operations) == sum(len(methods) for methods in document["paths"].values())
    failures = [(label, failure) for label, report in operations.items() for failure in report["failures"]]
    assert not failures, failures[:5]
    answered = {label for label, report in operations.items() if "200" in report["statuses"]}
    for label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /api/generate", "POST /api/embed"):
        assert label in answered, (label, operations[label]["statuses"])


def test_requests_that_break_the_schema_get_documented_4xx(fuzz_server, document):
    summary = fuzz(fuzz_server, NEGATIVE_EXAMPLES, timeout=CALL_TIMEOUT, document=narrowed(document), negative=True)
    failures = [(label, failure) for label, report in summary["operations"].items() for failure in report["failures"]]
    assert not failures, failures[:5]
    statuses = [status for report in summary["operations"].values() for status in report["statuses"]]
    assert "400" in statuses and all(not status.startswith("5") for status in statuses)
