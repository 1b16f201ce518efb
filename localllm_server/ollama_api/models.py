"""Model management: /api/tags, /api/show, /api/ps, /api/copy, DELETE /api/delete, /api/pull, /api/create, and
the uploads /api/create's ``files`` name (HEAD/POST /api/blobs/<digest>)."""
from __future__ import annotations

import queue
import threading

import falcon

from ..errors import APIError, to_api_error
from ..streaming import ClosingStream, ndjson_line
from . import parsing, responses
from .base import Resource
from .runner import NDJSON

_END = object()


class TagsResource(Resource):
    """Local models, then (with a gateway) its upstream models and routes: name and model only (no file)."""

    def on_get(self, req, resp):
        from ..gateway import gateway_for

        models = [responses.tag(entry) for entry in self.engine.store.list()]
        gateway = gateway_for(self.settings)
        if gateway is not None:
            models += [{"name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z", "size": 0,
                        "digest": "", "details": {"family": owner, "format": "remote"}}
                       for name, owner in gateway.listing()]
        resp.media = {"models": models}


class ShowResource(Resource):
    def on_post(self, req, resp):
        body = self.body(req)
        resp.media = responses.show(self.engine.store.get(parsing.model_name(body)))


class PsResource(Resource):
    def on_get(self, req, resp):
        models = []
        for row in sorted(self.engine.loaded(), key=lambda r: r["expires_at"], reverse=True):
            try:
                entry = self.engine.store.get(row["name"])
            except (LookupError, ValueError):      # deleted or not a store name: nothing to describe it by
                continue
            model = row["model"]
            context = getattr(model, "n_ctx", None) or getattr(model, "max_seq_length", None)
            models.append(responses.process(entry, row, context))
        resp.media = {"models": models}


class CopyResource(Resource):
    def on_post(self, req, resp):
        body = self.body(req)
        source = parsing.model_name(body, "source")
        destination = parsing.model_name(body, "destination")
        self.engine.store.get(source)
        unload_quietly(self.engine, destination)       # a loaded model of that name has the old defaults
        self.engine.store.copy(source, destination)
        resp.status = falcon.HTTP_200


class DeleteResource(Resource):
    def on_delete(self, req, resp):
        body = self.body(req)
        name = parsing.model_name(body)
        self.engine.store.get(name)
        unload_quietly(self.engine, name)
        self.engine.store.delete(name)
        resp.status = falcon.HTTP_200


class PullResource(Resource):
    """Pull a registry model; progress lines as Ollama writes them (``pulling <digest12>`` with completed/total)."""

    def on_post(self, req, resp):
        from localllm.store import canonical_name

        body = self.body(req)
        name = parsing.model_name(body)
        stream = parsing.flag(body, "stream", True)
        canonical_name(name)
        store = self.engine.store
        if not stream:
            store.pull(name, progress=None)
            unload_quietly(self.engine, name)
            resp.media = {"status": "success"}
            return
        events = run_in_thread(lambda progress: store.pull(name, progress=progress))
        first = next(events)                    # an unknown name is a 404 before the stream starts
        resp.content_type = NDJSON
        resp.stream = ClosingStream(ndjson_lines(first, events, lambda: unload_quietly(self.engine, name)))


class CreateResource(Resource):
    """Create a model from ``from`` (a store name or a .gguf/HF folder path) and Modelfile fields, or a ``modelfile``.

    Its vision projector comes from a second ``FROM`` of the ``modelfile``, from ``projector`` (localllm's field:
    the path of an mmproj ``.gguf`` or a Hugging Face folder on the server), or from Ollama's ``files`` (file
    name -> ``sha256:<hex>`` of a file uploaded to ``/api/blobs`` or already in the store): one model and at most
    one projector in all, told apart by their contents. Uploads a create stored are removed from ``uploads/``.
    """

    def on_post(self, req, resp):
        from localllm.modelfile import create_model, modelfile_from_request
        from localllm.store import canonical_name

        body = self.body(req)
        name = parsing.model_name(body)
        stream = parsing.flag(body, "stream", True)
        canonical_name(name)
        files = self.uploaded_files(body.get("files"))
        quantize = body.get("quantize")
        if quantize is not None and not isinstance(quantize, str):
            raise APIError(400, "quantize: expected a string such as \"q8_0\"", param="quantize")
        modelfile = modelfile_from_request(body, files=files)
        events: list[dict] = []
        if body.get("modelfile") is not None:
            events.append({"status": "parsing modelfile"})
        create_model(self.engine.store, name, modelfile, progress=events.append, quantize=quantize or None)
        self.engine.store.discard_uploads(files.values())
        unload_quietly(self.engine, name)
        if not stream:
            resp.media = events[-1]
            return
        resp.content_type = NDJSON
        resp.text = b"".join(ndjson_line(event) for event in events).decode("utf-8")

    def uploaded_files(self, files) -> dict:
        """Ollama's ``files`` (name -> digest) -> name -> the file on the server; 400 naming the bad entry."""
        from localllm.store import DigestMismatch

        if files is None:
            return {}
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise APIError(400, "files must map file names to digests (\"sha256:<hex>\")", param="files")
        resolved = {}
        for file_name, digest in files.items():
            if not file_name.lower().endswith(".gguf"):
                raise APIError(400, f"files: {file_name!r} is not a .gguf file; files may hold a GGUF model and its "
                                    "mmproj projector (a Hugging Face folder: give `from` its path on the server)",
                               param="files")
            try:
                path = self.engine.store.blob_file(digest)
            except DigestMismatch as exc:
                raise APIError(400, f"files: {file_name}: {exc}", param="files") from None
            if path is None:
                raise APIError(400, f"files: {file_name} ({digest}) is not on the server; upload it first "
                                    f"(POST /api/blobs/{digest})", param="files")
            resolved[file_name] = path
        return resolved


class BlobsResource(Resource):
    """Ollama's uploads for /api/create ``files``: ``HEAD /api/blobs/<digest>`` is 200 when the server has the file
    (uploaded, or a stored model's) and 404 otherwise; ``POST /api/blobs/<digest>`` with the file as the body keeps
    it (201) once its sha256 is the digest, else 400 and nothing is kept (``ModelStore.save_upload``)."""

    def on_head(self, req, resp, digest):
        resp.status = falcon.HTTP_200 if self._file(digest) is not None else falcon.HTTP_404

    def on_post(self, req, resp, digest):
        from localllm.store import DigestMismatch

        self._file(digest)                              # a malformed digest is refused before the body is read
        try:
            self.engine.store.save_upload(digest, req.bounded_stream)
        except DigestMismatch as exc:
            raise APIError(400, str(exc), param="digest") from None
        resp.status = falcon.HTTP_201

    def _file(self, digest: str):
        from localllm.store import DigestMismatch

        try:
            return self.engine.store.blob_file(digest)
        except DigestMismatch as exc:
            raise APIError(400, str(exc), param="digest") from None


def unload_quietly(engine, name: str) -> None:
    """Unload ``name`` if it is loaded (its files or defaults changed)."""
    from localllm.store import canonical_name

    canonical = canonical_name(name)
    if any(row["name"] == canonical for row in engine.loaded()):
        engine.unload(engine.store.get(canonical))




def run_in_thread(work):
    """Run ``work(progress)`` in a thread; yield its progress events, then raise its exception if it failed."""
    items: queue.Queue = queue.Queue()

    def target():
        try:
            work(items.put)
        except BaseException as exc:            # handed to the request thread
            items.put(exc)
        finally:
            items.put(_END)

    threading.Thread(target=target, name="localllm-pull", daemon=True).start()

    def events():
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    return events()


def ndjson_lines(first: dict, events, on_success):
    yield ndjson_line(first)
    try:
        for event in events:
            if event.get("status") == "success":
                on_success()
            yield ndjson_line(event)
    except Exception as exc:                    # the stream has begun: report in-band
        yield ndjson_line({"error": to_api_error(exc).message})
