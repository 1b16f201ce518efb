"""Images inside prompts: a chat's image parts -> markers in the rendered text -> token ids with image positions.

The path of an image through a chat request:

1. ``collect_images(messages)`` finds the images, wherever a client put them: OpenAI content parts
   (``{"type": "image_url", "image_url": {"url": "data:..."}}``; the server resolves http(s) URLs to bytes
   first), the responses API's ``{"type": "input_image", "image_url": ...}``, the library's
   ``{"type": "image", "image": <bytes | path | PIL image>}`` and Ollama's ``images`` list on a message
   (placed before the message's text, as Ollama does). Each becomes a ``PendingImage`` that knows where it
   came from (``messages[0].content[1]``), so a bad one is reported by its place.
2. ``ImageEmbedder.embed`` decodes it (``load_image``), preprocesses and encodes it, and keeps the
   embeddings in a small cache keyed by the digest of the decoded pixels (the same picture sent again with
   each turn of a conversation is encoded once). The messages get a text part holding ``marker(digest)``
   in place of the image, so the chat template renders them like any text.
3. ``tokenize_with_images`` splits the rendered prompt at the markers, tokenizes the text between them
   and puts each image in: the wrapping text of its projector (Gemma 3: ``"\\n\\n<start_of_image>"`` before
   and ``"<end_of_image>\\n\\n"`` after, as transformers' Gemma3Processor writes them; LLaVA: none, as
   llama.cpp) and one **image id** per soft token.

An image id is negative: ``-(1 + (digest << 12) + row)``, ``digest`` 40 bits of the pixels' SHA-256 and
``row`` the soft token's index. So the ids of one image differ from any token and from any other image's:
prefix reuse in the KV cache and the prompt cache compare prompts as before, and a conversation that sends
the same image again reuses its K/V, while a different image never matches. ``PromptTokens`` (a list of
ids) carries the embeddings its image ids stand for to the generation loop (``generate.step``), which
hands them to the model as ``ImageRows``.
"""
from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .images import ImageError, load_image

DIGEST_BITS = 40
ROW_BITS = 12                   # at most 4096 soft tokens an image (Gemma 3: 256, LLaVA-1.5: 576)
MARKER_PATTERN = re.compile(r"<__localllm_image_([0-9a-f]{10})__>")
IMAGE_PART_TYPES = ("image", "image_url", "input_image")
DEFAULT_CACHED_IMAGES = 32      # embeddings kept per model (Gemma 3 4B: 2.6 MB an image)


class ImageInputError(ValueError):
    """An image in a request that cannot be used; the message names where it was (``messages[1].content[0]``)."""


class NoVisionError(ValueError):
    """Images sent to a model without a vision encoder."""


@dataclass(frozen=True)
class ImageWrapping:
    """How a projector family puts an image into the prompt."""

    before: str                 # text before the soft tokens
    after: str                  # text after them
    bidirectional: bool         # the soft tokens of one image attend to each other (Gemma 3)


WRAPPING = {
    "gemma3": ImageWrapping("\n\n<start_of_image>", "<end_of_image>\n\n", True),
    "llava": ImageWrapping("", "", False),
}


def marker(digest: int) -> str:
    """The text that stands for an image in a rendered prompt."""
    return f"<__localllm_image_{digest:010x}__>"


def image_ids(digest: int, n_tokens: int) -> list[int]:
    """The ids of an image's ``n_tokens`` positions."""
    if not 0 < n_tokens <= 1 << ROW_BITS:
        raise ValueError(f"an image may have 1..{1 << ROW_BITS} soft tokens, got {n_tokens}")
    base = 1 + (digest << ROW_BITS)
    return [-(base + row) for row in range(n_tokens)]


def split_image_id(image_id: int) -> tuple[int, int]:
    """(digest, row) of a negative image id."""
    value = -image_id - 1
    return value >> ROW_BITS, value & ((1 << ROW_BITS) - 1)


class PromptTokens(list):
    """Token ids of a prompt with images: a list of ints where each image position holds its image id.

    ``images``: digest -> (n_tokens, n_embd) float32 embeddings of every image the ids name;
    ``bidirectional``: an image's positions see each other (Gemma 3).
    """

    def __init__(self, ids, images: dict[int, np.ndarray], bidirectional: bool):
        super().__init__(ids)
        self.images = dict(images)
        self.bidirectional = bidirectional

    def __repr__(self) -> str:
        return f"PromptTokens({len(self)} ids, {len(self.images)} image(s))"


def with_images_of(ids, prompt) -> list[int]:
    """``ids`` (a cut or a copy of ``prompt``'s) as PromptTokens again when ``prompt`` had images."""
    if isinstance(prompt, PromptTokens):
        return PromptTokens(ids, prompt.images, prompt.bidirectional)
    return list(ids)


def image_runs(tokens, start: int = 0) -> list[tuple[int, int]]:
    """[(first, stop), ...]: the index ranges of each image's positions in ``tokens`` from ``start`` on."""
    runs: list[tuple[int, int]] = []
    i, n = start, len(tokens)
    while i < n:
        if tokens[i] >= 0:
            i += 1
            continue
        digest, row = split_image_id(tokens[i])
        first = i - row if i - row >= 0 else i                 # a run cut at its front still ends where it ends
        i += 1
        while i < n and tokens[i] < 0 and split_image_id(tokens[i]) == (digest, i - first):
            i += 1
        runs.append((first, i))
    return runs


def image_positions(tokens, images: dict[int, np.ndarray], bidirectional: bool, start: int,
                    stop: int) -> list[tuple[int, np.ndarray, int]]:
    """(position, embedding, last position it sees) of each image position of ``tokens`` in [start, stop):
    with ``bidirectional`` an image's positions see up to its last one, else each sees up to itself."""
    found = []
    for first, end in image_runs(tokens[:stop], start):
        for pos in range(max(first, start), end):
            digest, row = split_image_id(tokens[pos])
            found.append((pos, images[digest][row], end - 1 if bidirectional else pos))
    return found


def image_rows(tokens, start: int = 0, stop: int | None = None):
    """The ``models.decoder.ImageRows`` of a prompt's positions [start, stop) (batch row = position - start),
    or None when there are none there (or ``tokens`` is a plain list of ids)."""
    from ..models.decoder import ImageRows
    if not isinstance(tokens, PromptTokens):
        return None
    stop = len(tokens) if stop is None else stop
    found = image_positions(tokens, tokens.images, tokens.bidirectional, start, stop)
    if not found:
        return None
    rows = np.array([pos - start for pos, _, _ in found], dtype=np.int64)
    until = np.array([u for _, _, u in found], dtype=np.int64)
    return ImageRows(rows, np.stack([v for _, v, _ in found]).astype(np.float32),
                     until if tokens.bidirectional else None)


# ---------------------------------------------------------------------------- finding images in messages
@dataclass
class PendingImage:
    """An image found in the messages, not yet decoded: its source and where it was."""

    source: Any                 # bytes, a path, a data: URI, or a PIL image
    where: str                  # "messages[0].content[1]" / "messages[2].images[0]"


def has_images(messages) -> bool:
    """Does any message carry an image (a content part or Ollama's ``images``)?"""
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        if message.get("images"):
            return True
        content = message.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES
                                             for p in content):
            return True
    return False


def collect_images(messages: list[dict]) -> tuple[list[dict], list[PendingImage]]:
    """(messages with each image replaced by a placeholder text part, the images in prompt order).

    The placeholder parts are ``{"type": "text", "text": None, "image": index}``: ``place_markers`` fills
    them once the images are encoded. The caller's objects are not modified. An image part may name its
    own place for errors (``"where": "input[2].content[0]"``: the server's other request shapes).
    """
    out: list[dict] = []
    images: list[PendingImage] = []
    for m, message in enumerate(messages):
        if not isinstance(message, dict):
            out.append(message)
            continue
        message = dict(message)
        parts: list = []
        listed = message.pop("images", None)
        if listed:
            if not isinstance(listed, list):
                raise ImageInputError(f"messages[{m}].images must be a list of base64-encoded images")
            for j, source in enumerate(listed):
                parts.append(_placeholder(len(images)))
                images.append(PendingImage(_ollama_image(source, f"messages[{m}].images[{j}]"),
                                           f"messages[{m}].images[{j}]"))
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in IMAGE_PART_TYPES:
                    where = part.get("where") or f"messages[{m}].content[{j}]"
                    parts.append(_placeholder(len(images)))
                    images.append(PendingImage(_part_source(part, kind, where), where))
                else:
                    parts.append(part)
        elif parts:                                 # Ollama: the images, then the message's text
            if isinstance(content, str) and content:
                parts.append({"type": "text", "text": content})
        else:
            out.append(message)
            continue
        message["content"] = parts
        out.append(message)
    return out, images


def place_markers(messages: list[dict], digests: list[int]) -> list[dict]:
    """The placeholders of ``collect_images`` filled with the markers of the encoded images."""
    filled = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and "image" in p and p.get("text") is None
                                             for p in content):
            content = [{"type": "text", "text": marker(digests[p["image"]])}
                       if isinstance(p, dict) and "image" in p and p.get("text") is None else p for p in content]
            message = {**message, "content": content}
        filled.append(message)
    return filled


def _placeholder(index: int) -> dict:
    return {"type": "text", "text": None, "image": index}


def _part_source(part: dict, kind: str, where: str):
    if kind == "image":                                    # the library's own part
        if "image" not in part:
            raise ImageInputError(f"{where}: an image part needs an 'image' (bytes, a path or a PIL image)")
        return part["image"]
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise ImageInputError(f"{where}: {kind} needs a url (a data: URI, or http(s) through the server)")
    if url[:5].lower() != "data:":
        raise ImageInputError(f"{where}: only data: URIs are read here; got '{url[:40]}' (the server fetches "
                              "http(s) URLs)")
    return url


def _ollama_image(source, where: str):
    """Ollama sends base64 strings; the library's callers may also give bytes or PIL images."""
    if isinstance(source, str):
        import base64
        import binascii
        try:
            return base64.b64decode(source, validate=True)
        except (binascii.Error, ValueError):
            raise ImageInputError(f"{where}: not valid base64") from None
    return source


# ---------------------------------------------------------------------------- encoding with a cache
class ImageEmbedder:
    """A vision encoder and the embeddings of the images it encoded lately (by pixel digest, LRU)."""

    def __init__(self, encoder, cached_images: int = DEFAULT_CACHED_IMAGES):
        self.encoder = encoder
        self.wrapping = WRAPPING[encoder.projector]
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_images = cached_images
        self._lock = threading.Lock()
        self.encoded = 0            # images actually run through the encoder (the rest came from the cache)

    @property
    def n_image_tokens(self) -> int:
        return self.encoder.n_image_tokens

    def embed(self, pending: PendingImage) -> tuple[int, np.ndarray]:
        """(digest, embeddings (n_image_tokens, n_embd_text)) of one image; ImageInputError names its place."""
        try:
            image = load_image(pending.source)
        except ImageError as exc:
            raise ImageInputError(f"{pending.where}: {exc}") from None
        pixels = self.encoder.preprocess(image)                              # (3, H, W) float32
        digest = int.from_bytes(hashlib.sha256(pixels.tobytes()).digest()[:DIGEST_BITS // 8], "big")
        with self._lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
                return digest, self._cache[digest]
        embeddings = self.encoder.encode(pixels)
        embeddings.setflags(write=False)
        with self._lock:
            self.encoded += 1
            self._cache[digest] = embeddings
            while len(self._cache) > self._cached_images:
                self._cache.popitem(last=False)
        return digest, embeddings

    def embed_all(self, images: list[PendingImage]) -> tuple[list[int], dict[int, np.ndarray]]:
        digests, table = [], {}
        for pending in images:
            digest, embeddings = self.embed(pending)
            digests.append(digest)
            table[digest] = embeddings
        return digests, table


# ---------------------------------------------------------------------------- tokenizing around the markers
def tokenize_with_images(text: str, images: dict[int, np.ndarray], wrapping: ImageWrapping,
                         tokenize) -> list[int]:
    """Token ids of a rendered prompt whose markers stand for ``images`` (digest -> embeddings).

    ``tokenize(text, first)``: the ids of a piece of text (``first``: the prompt's first piece, which may
    get the BOS token). Markers of digests not in ``images`` are left as text. Returns PromptTokens
    when the text holds at least one image, else a plain list.
    """
    pieces: list[str] = []
    found: list[int] = []
    last = 0
    for match in MARKER_PATTERN.finditer(text):
        digest = int(match.group(1), 16)
        if digest not in images:
            continue
        pieces.append(text[last:match.start()])
        found.append(digest)
        last = match.end()
    pieces.append(text[last:])
    if not found:
        return tokenize(text, True)
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        if index > 0:
            piece = wrapping.after + piece
        if index < len(found):
            piece = piece + wrapping.before
        ids += tokenize(piece, index == 0) if piece else []
        if index < len(found):
            digest = found[index]
            ids += image_ids(digest, images[digest].shape[0])
    return PromptTokens(ids, {d: images[d] for d in found}, wrapping.bidirectional)
