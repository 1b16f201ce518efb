"""Fuzz every operation of a running server's /openapi.json with schemathesis; print a JSON summary.

    python tests/fuzz/run_schemathesis.py --examples 200              # starts its own server (tiny model)
    python tests/fuzz/run_schemathesis.py --url http://127.0.0.1:11434 --examples 50

Every generated request is sent with a time limit and its answer checked: no 5xx
(``not_a_server_error``), a documented status (``status_code_conformance``), a
documented media type (``content_type_conformance``) and a body of the documented
schema (``response_schema_conformance``; NDJSON bodies are read as the array of
their lines, as the document describes them). A call that does not answer within
``--timeout`` seconds is a failure too (a hang). Generation is derandomized:
the same ``--examples`` and ``--seed`` give the same requests (seed 0: derandomized, as the test runs it).

Without ``--url`` the script serves a temporary store holding a tiny random Llama
(``tests/tiny_models.py``) as :data:`TEXT_MODEL` and all-MiniLM as
:data:`EMBEDDING_MODEL`; the generated ``model`` of the routes that load one is
narrowed to those two names (the document itself stays as the server publishes
it), so requests get past the model lookup into generation. The routes that
change the store (pull, create, copy, delete) keep arbitrary names.
``tests/server/test_schemathesis.py`` runs :func:`fuzz` with a few examples.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TEXT_MODEL = "tiny:latest"
EMBEDDING_MODEL = "all-minilm:latest"
TINY_CONTEXT = 128
# Operations whose `model` must name a loaded model to get anywhere; the rest keep arbitrary names.
MODEL_OPERATIONS = {
    ("POST", "/v1/chat/completions"): [TEXT_MODEL],
    ("POST", "/v1/completions"): [TEXT_MODEL],
    ("POST", "/v1/responses"): [TEXT_MODEL],
    ("POST", "/v1/embeddings"): [EMBEDDING_MODEL],
    ("POST", "/tokenize"): [TEXT_MODEL, EMBEDDING_MODEL],
    ("POST", "/detokenize"): [TEXT_MODEL, EMBEDDING_MODEL],
    ("POST", "/api/chat"): [TEXT_MODEL],
    ("POST", "/api/generate"): [TEXT_MODEL],
    ("POST", "/api/embed"): [EMBEDDING_MODEL],
    ("POST", "/api/embeddings"): [EMBEDDING_MODEL],
    ("POST", "/api/show"): [TEXT_MODEL, EMBEDDING_MODEL],
    ("POST", "/v1/messages"): [TEXT_MODEL],
    ("POST", "/v1/messages/count_tokens"): [TEXT_MODEL],
}
PATH_PARAMETERS = {("GET", "/v1/models/{model}"): [TEXT_MODEL, EMBEDDING_MODEL]}


def narrowed(document: dict) -> dict:
    """A copy of ``document`` whose ``model`` (and ``name``) fields of :data:`MODEL_OPERATIONS` are enums of the
    served models, and whose path parameters of :data:`PATH_PARAMETERS` are too."""
    document = copy.deepcopy(document)
    for (method, path), names in MODEL_OPERATIONS.items():
        operation = document["paths"][path][method.lower()]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        for key in ("model", "name"):
            if key in schema["properties"]:
                schema["properties"][key] = {"enum": names}
    for (method, path), names in PATH_PARAMETERS.items():
        for parameter in document["paths"][path][method.lower()]["parameters"]:
            parameter["schema"] = {"enum": names}
    return document


def register_ndjson_deserializer() -> None:
    """NDJSON bodies read as the list of their lines (the document describes them so)."""
    import schemathesis

    @schemathesis.deserializer("application/x-ndjson")
    def lines(ctx, response):
        return [json.loads(line) for line in response.content.decode("utf-8").splitlines() if line.strip()]


def _describe(case) -> dict:
    body = case.body if not isinstance(case.body, (bytes, bytearray)) else repr(case.body)
    text = json.dumps(body, ensure_ascii=False, default=repr)
    return {"path_parameters": case.path_parameters or None, "body": text if len(text) < 2000 else text[:2000] + "..."}


def _error_message(response) -> str:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
    message = error["message"] if isinstance(error, dict) else str(error)
    return f"{response.status_code} {message[:200]}"


def fuzz(base_url: str, examples: int, seed: int = 0, timeout: float = 60.0, document: dict | None = None,
         operations: set | None = None, log=None, negative: bool = False) -> dict:
    """Run ``examples`` generated requests per operation against ``base_url``; the summary as a dict.

    ``document``: the schema to generate from (default: the server's /openapi.json);
    ``operations``: only these ``(METHOD, path)`` pairs; ``negative``: requests that break the
    schema (each must get a documented 4xx, never a 5xx). The summary lists per operation the
    calls made, the statuses seen, the 4xx messages (why schema-valid requests were refused) and
    each failure (check, message, request).
    """
    import hypothesis
    import requests
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    register_ndjson_deserializer()
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    if document is None:
        document = requests.get(base_url + "/openapi.json", timeout=timeout).json()
    schema = schemathesis.openapi.from_dict(document)
    summary: dict = {"base_url": base_url, "examples": examples, "seed": seed, "negative": negative,
                     "operations": {}, "failures": 0}
    session = requests.Session()
    mode = GenerationMode.NEGATIVE if negative else GenerationMode.POSITIVE
    for result in schema.get_all_operations():
        operation = result.ok()
        key = (operation.method.upper(), operation.path)
        if operations is not None and key not in operations:
            continue
        label = f"{key[0]} {key[1]}"
        report = {"calls": 0, "statuses": {}, "refusals": {}, "failures": [], "seconds": 0.0, "call_seconds": 0.0,
                  "slowest": None}
        started = time.perf_counter()

        @hypothesis.seed(seed)
        @hypothesis.settings(max_examples=examples, derandomize=seed == 0, deadline=None, database=None,
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            report["calls"] += 1
            call_started = time.perf_counter()
            try:
                response = case.call(base_url=base_url, session=session, timeout=timeout)
            except requests.exceptions.Timeout:
                report["failures"].append({"check": "timeout", "message": f"no answer within {timeout} s",
                                           **_describe(case)})
                return
            finally:
                seconds = time.perf_counter() - call_started
                report["call_seconds"] += seconds
                if report["slowest"] is None or seconds > report["slowest"]["seconds"]:
                    report["slowest"] = {"seconds": round(seconds, 2), **_describe(case)}
            status = str(response.status_code)
            report["statuses"][status] = report["statuses"].get(status, 0) + 1
            if 400 <= response.status_code < 500:           # why schema-valid requests were refused
                message = _error_message(response)
                report["refusals"][message] = report["refusals"].get(message, 0) + 1
            for check in checks:
                try:
                    case.validate_response(response, checks=[check])
                except (AssertionError, BaseExceptionGroup) as exc:   # failed: recorded with the request
                    report["failures"].append({"check": check.__name__, "status": response.status_code,
                                               "message": str(exc)[:3000], **_describe(case)})

        try:
            run()
        except hypothesis.errors.Unsatisfiable:       # negative mode: nothing in the operation to break
            report["skipped"] = "no request schema to break"
        report["seconds"] = round(time.perf_counter() - started, 2)
        report["call_seconds"] = round(report["call_seconds"], 2)
        summary["operations"][label] = report
        summary["failures"] += len(report["failures"])
        if log is not None:
            log(f"{label}: {report['calls']} calls, statuses {report['statuses']}, "
                f"{len(report['failures'])} failures, {report['seconds']} s ({report['call_seconds']} s in calls)")
    return summary


class TinyServer:
    """A server on 127.0.0.1 over a temporary store: the tiny random Llama and all-MiniLM (from the user's store)."""

    def __init__(self, folder: Path, minilm_dir: Path | None = None, context: int = TINY_CONTEXT):
        from localllm.engine import Engine, EngineSettings
        from localllm.store import ModelStore
        from tests.server.conftest import run_app
        from tests.tiny_models import write_tiny_llama

        store = ModelStore(folder / "store")
        store.add_local(TEXT_MODEL, write_tiny_llama(folder / "tiny.gguf", n_ctx=context))
        store.add_local(EMBEDDING_MODEL, minilm_dir or ModelStore().ensure("all-minilm").path)
        self.engine = Engine(EngineSettings(n_slots=4, max_queue=64, keep_alive=600), store=store)
        self.running = run_app(self.engine, threads=4)
        self.url = self.running.url

    def close(self) -> None:
        self.running.close()
        self.engine.close()


def main(argv=None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100, help="generated requests per operation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a call may take before it is a hang")
    parser.add_argument("--url", help="fuzz this running server (its own document, not narrowed)")
    parser.add_argument("--operation", action="append", help="only 'METHOD /path' (repeatable)")
    parser.add_argument("--negative", action="store_true", help="requests that break the schema (expect 4xx)")
    args = parser.parse_args(argv)
    operations = {tuple(o.split(" ", 1)) for o in args.operation} if args.operation else None

    def log(line):
        print(line, file=sys.stderr, flush=True)

    if args.url:
        summary = fuzz(args.url.rstrip("/"), args.examples, args.seed, args.timeout, operations=operations, log=log,
                       negative=args.negative)
    else:
        import requests
        with tempfile.TemporaryDirectory() as folder:
            server = TinyServer(Path(folder))
            try:
                document = narrowed(requests.get(server.url + "/openapi.json", timeout=30).json())
                summary = fuzz(server.url, args.examples, args.seed, args.timeout, document=document,
                               operations=operations, log=log, negative=args.negative)
            finally:
                server.close()
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
