"""download_url against a local HTTP server that honours Range (or not) and can drop connections half-way;
HashingWriter's streamed, chunked copies."""
from __future__ import annotations

import hashlib
import io
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from localllm.download import DownloadError, HashingWriter, download_url, partial_path

DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


class FileServer:
    """Serves ``data`` at /file; ``cut_after`` bytes into the body, the next ``cuts`` responses are dropped."""

    def __init__(self, data: bytes = DATA):
        self.data = data
        self.support_range = True
        self.cut_after = None
        self.cuts = 0
        self.requests: list[str | None] = []  # the Range header of every request
        self.bytes_sent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path != "/file":
                    self.send_error(404)
                    return
                range_header = self.headers.get("Range")
                server.requests.append(range_header)
                start = 0
                if range_header and server.support_range:
                    start = int(range_header.removeprefix("bytes=").split("-")[0])
                    if start >= len(server.data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(server.data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(server.data) - 1}/{len(server.data)}")
                else:
                    self.send_response(200)
                body = server.data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cuts and server.cut_after is not None:
                    server.cuts -= 1
                    body = body[:server.cut_after]
                    self.close_connection = True
                server.bytes_sent += len(body)  # counted first: the client may finish before write returns
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    running = FileServer()
    yield running
    running.close()


def test_plain_download_verifies_and_renames(server, tmp_path):
    dest = tmp_path / "model.gguf"
    seen = []
    assert download_url(server.url, dest, SHA, progress=lambda done, total: seen.append((done, total)),
                        chunk=65536) == SHA
    assert dest.read_bytes() == DATA
    assert not partial_path(dest).exists()
    assert seen[-1] == (len(DATA), len(DATA))
    assert server.requests == [None]


def test_dropped_connection_resumes_with_range_in_the_same_call(server, tmp_path):
    server.cut_after, server.cuts = 100_000, 1
    dest = tmp_path / "model.gguf"
    download_url(server.url, dest, SHA, chunk=4096)
    assert dest.read_bytes() == DATA
    assert server.requests == [None, "bytes=100000-"]
    assert server.bytes_sent == len(DATA)  # nothing fetched twice


def test_interrupted_download_keeps_partial_and_next_call_resumes(server, tmp_path):
    server.cut_after, server.cuts = 120_000, 1
    dest = tmp_path / "model.gguf"
    with pytest.raises(DownloadError, match="connection closed after 120000"):
        download_url(server.url, dest, SHA, retries=0)
    assert not dest.exists()
    assert partial_path(dest).read_bytes() == DATA[:120_000]
    download_url(server.url, dest, SHA)
    assert dest.read_bytes() == DATA
    assert server.requests[-1] == "bytes=120000-"
    assert server.bytes_sent == len(DATA)


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.support_range = False
    dest = tmp_path / "model.gguf"
    partial_path(dest).write_bytes(b"garbage that is not a prefix")
    download_url(server.url, dest, SHA)
    assert dest.read_bytes() == DATA
    assert server.requests == ["bytes=28-"]


def test_complete_partial_is_finished_after_416(server, tmp_path):
    dest = tmp_path / "model.gguf"
    partial_path(dest).write_bytes(DATA)
    download_url(server.url, dest, SHA)
    assert dest.read_bytes() == DATA
    assert server.bytes_sent == 0


def test_sha256_mismatch_removes_everything(server, tmp_path):
    dest = tmp_path / "model.gguf"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download_url(server.url, dest, "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_unknown_sha_returns_the_digest(server, tmp_path):
    assert download_url(server.url, tmp_path / "x", None) == SHA


def test_http_error_names_the_status(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_url(server.url.replace("/file", "/missing"), tmp_path / "x", None)
    assert list(tmp_path.iterdir()) == []


class RecordingStream(io.BytesIO):
    """A stream that records the size of every read."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.reads: list[int] = []

    def read(self, n=-1):
        self.reads.append(n)
        return super().read(n)


def test_hashing_writer_concatenates_streams_in_chunks(tmp_path):
    cuts = [0, 100_000, 100_001, 250_000, len(DATA)]
    streams = [RecordingStream(DATA[a:b]) for a, b in zip(cuts, cuts[1:])]
    reported = []
    with HashingWriter(tmp_path / "sub" / "whole", chunk=4096, report=reported.append) as out:
        got = [out.write_from(stream) for stream in streams]
    assert got == [100_000, 1, 149_999, 50_000]
    assert (tmp_path / "sub" / "whole").read_bytes() == DATA
    assert out.sha256 == SHA and out.size == len(DATA)
    assert all(n == 4096 for stream in streams for n in stream.reads)  # never more than a chunk in memory
    assert reported[-1] == len(DATA) and reported == sorted(reported)
    assert max(b - a for a, b in zip(reported, reported[1:])) <= 4096


def test_hashing_writer_resumes_after_a_prefix_and_cuts_what_follows(tmp_path):
    """What an interrupted writer left: the first 100000 bytes are kept (hashed again), the torn tail is cut."""
    path = tmp_path / "assembly"
    path.write_bytes(DATA[:100_000] + b"torn tail of an interrupted part")
    reported = []
    with HashingWriter(path, chunk=4096, report=reported.append, resume_from=100_000) as out:
        assert out.size == 100_000
        assert out.write_from(io.BytesIO(DATA[100_000:])) == len(DATA) - 100_000
    assert path.read_bytes() == DATA
    assert out.sha256 == SHA and out.size == len(DATA)
    assert reported[0] == 100_000 + 4096 and reported[-1] == len(DATA)
    with pytest.raises(ValueError, match="holds 300000 bytes, cannot resume from 400000"):
        HashingWriter(path, resume_from=400_000)
