"""Resumable HTTP downloads with sha256 verification, streamed hashing copies, and tqdm progress bars for pulls.

:func:`download_url` writes into ``<dest>.partial`` and resumes it with an HTTP
``Range`` request, after a dropped connection (retried in the same call) or in a
later call; a server that ignores ``Range`` (answers 200) restarts the file. The
file appears at ``dest`` only once complete, verified and on disk (fsync, then atomic
``os.replace``). :class:`HashingWriter` writes a file from one stream or several in a row
(the parts of a split file), a chunk at a time, hashing as it goes; it can continue a file
an earlier, interrupted writer left (``resume_from``).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO, Callable, Union

USER_AGENT = "localllm/0.1 (+urllib)"

ByteProgress = Union[Callable[[int, Union[int, None]], None], bool, None]


class DownloadError(RuntimeError):
    """An HTTP failure, a short body after all retries, or a sha256 / size mismatch."""


def partial_path(dest: Path) -> Path:
    """Where the unfinished download of ``dest`` lives: ``<dest>.partial`` beside it."""
    return dest.with_name(dest.name + ".partial")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it) to the disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class HashingWriter:
    """Writes ``path`` from readable binary streams, one after another, hashing as it goes.

    Reads ``chunk`` bytes at a time, so no more than one chunk is ever in memory;
    ``report(size)`` gets the bytes written so far after every chunk. ``size`` and
    ``sha256`` describe everything written. ``resume_from=n`` keeps the first ``n`` bytes
    of an existing file (hashed again, anything past them cut off) and appends after them.
    Use as a context manager: leaving it normally flushes the file to the disk (fsync),
    so it can be renamed into place; leaving it by an exception only closes it.
    """

    def __init__(self, path: Path, chunk: int = 1 << 20, report: Callable[[int], None] | None = None,
                 resume_from: int = 0):
        self.path = Path(path)
        self.chunk = chunk
        self.report = report or (lambda size: None)
        self.size = 0
        self._digest = hashlib.sha256()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from:
            self._file = open(self.path, "r+b")
            held = os.fstat(self._file.fileno()).st_size
            if held < resume_from:  # (truncate would pad it with zeros)
                self._file.close()
                raise ValueError(f"{self.path} holds {held} bytes, cannot resume from {resume_from}")
            self._file.truncate(resume_from)
            while self.size < resume_from and (block := self._file.read(min(chunk, resume_from - self.size))):
                self._digest.update(block)
                self.size += len(block)
            self._file.seek(resume_from)
        else:
            self._file = open(self.path, "wb")

    def write_from(self, source: BinaryIO) -> int:
        """Append everything ``source`` holds; returns how many bytes it gave."""
        start = self.size
        while block := source.read(self.chunk):
            self._digest.update(block)
            self._file.write(block)
            self.size += len(block)
            self.report(self.size)
        return self.size - start

    @property
    def sha256(self) -> str:
        """Hex sha256 of everything written so far."""
        return self._digest.hexdigest()

    def sync(self) -> None:
        """Flush everything written so far to the disk."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        try:
            if exc_type is None:
                self.sync()
        finally:
            self.close()


def download_url(url: str, dest: Path, sha256: str | None, progress: ByteProgress = None,
                 chunk: int = 1 << 20, retries: int = 3, timeout: float = 60.0) -> str:
    """Download ``url`` to ``dest``; return the file's hex sha256.

    progress: None, True (a tqdm bar), or ``callback(completed_bytes, total_bytes_or_None)``.
    retries: how many times a dropped connection is resumed within this call.
    Raises :class:`DownloadError`; an interrupted download keeps ``<dest>.partial`` for the
    next call, a file failing its sha256 is removed.
    """
    dest = Path(dest)
    partial = partial_path(dest)
    partial.parent.mkdir(parents=True, exist_ok=True)
    report, close = _byte_progress(progress, dest.name)
    try:
        for attempt in range(retries + 1):
            try:
                total = _fetch_into(url, partial, report, chunk, timeout)
                break
            except (ConnectionError, TimeoutError, http.client.HTTPException, urllib.error.URLError, _ShortBody) as exc:
                if isinstance(exc, urllib.error.HTTPError) or attempt == retries:
                    raise DownloadError(f"GET {url}: {_describe(exc)}") from exc
        size = partial.stat().st_size
        if total is not None and size != total:
            if size > total:  # longer than the file: not a prefix of it, cannot be resumed
                partial.unlink()
            raise DownloadError(f"GET {url}: got {size} bytes, expected {total}")
        actual = sha256_file(partial, chunk)
        if sha256 is not None and actual != sha256.lower():
            partial.unlink()
            raise DownloadError(f"sha256 mismatch for {url}: expected {sha256}, got {actual}")
        fsync_file(partial)
        os.replace(partial, dest)
        fsync_dir(dest.parent)
        return actual
    finally:
        close()


class _ShortBody(Exception):
    """The connection ended before Content-Length bytes arrived."""


def _fetch_into(url: str, partial: Path, report, chunk: int, timeout: float) -> int | None:
    """One HTTP request appending to ``partial``; returns the full file size when the server says it."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left past what we have: the partial file is complete
            content_range = exc.headers.get("Content-Range", "")
            return int(content_range.rsplit("/", 1)[1]) if "/" in content_range else have
        raise
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None else None
        if response.status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range", ""))
            if start != have:
                raise DownloadError(f"GET {url}: asked for bytes from {have}, server sent from {start}")
            mode = "ab"
        else:  # 200: the whole file (the server ignored Range, or we asked from zero)
            have, total, mode = 0, length, "wb"
        report(have, total)
        received = 0
        with open(partial, mode) as f:
            while block := response.read(chunk):
                f.write(block)
                received += len(block)
                report(have + received, total)
        if length is not None and received < length:
            raise _ShortBody(f"connection closed after {received} of {length} bytes")
    return total


def _parse_content_range(value: str) -> tuple[int, int | None]:
    """``bytes 100-199/200`` -> (100, 200); ``bytes 100-199/*`` -> (100, None)."""
    try:
        unit, spec = value.split(" ", 1)
        first_last, total = spec.split("/", 1)
        start = int(first_last.split("-", 1)[0])
        return start, None if total == "*" else int(total)
    except ValueError as exc:
        raise DownloadError(f"unreadable Content-Range header {value!r}") from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _byte_progress(progress: ByteProgress, label: str):
    """(report(completed, total), close()) for the ``progress`` argument of :func:`download_url`."""
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(desc=label, unit="B", unit_scale=True)

        def report(completed, total):
            bar.total = total
            bar.n = completed
            bar.refresh()

        return report, bar.close
    if callable(progress):
        return progress, lambda: None
    return (lambda completed, total: None), lambda: None


class TqdmPullProgress:
    """Renders Ollama-style pull events (``ModelStore.pull(progress=...)``) as tqdm bars, one per file.

    Status lines without a digest are written above the bars.
    """

    def __init__(self, file=None):
        self.file = file
        self.bars: dict[str, object] = {}

    def __call__(self, event: dict) -> None:
        from tqdm.auto import tqdm

        if "total" in event:
            key = event.get("digest") or event["status"]
            bar = self.bars.get(key)
            if bar is None:
                bar = self.bars[key] = tqdm(desc=event["status"], total=event["total"], unit="B",
                                            unit_scale=True, file=self.file)
            bar.total = event["total"]
            bar.n = event.get("completed", 0)
            bar.refresh()
            return
        self.close()
        tqdm.write(event["status"], file=self.file)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
