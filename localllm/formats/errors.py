"""The one error a malformed model file raises: ``ModelFormatError``.

Every reader of untrusted model bytes (GGUF headers, safetensors headers, tokenizer metadata, tensor
shapes against the model's config) refuses a file it cannot trust with this error or a subclass
(``formats.gguf.GGUFError``, ``formats.safetensors.HFFolderError``, ``tokenizer_build.TokenizerMetadataError``)
before any kernel reads the weights. A file that is well formed but asks for something localllm does not
implement raises ``UnsupportedArchitecture`` / ``UnsupportedModelFeature`` / ``UnsupportedTensorType``
instead: those say "not supported", this says "broken".
"""
from __future__ import annotations

from pathlib import Path


class ModelFormatError(ValueError):
    """A model file is truncated, corrupt or inconsistent. ``str(error)`` says what is wrong (naming the file
    where it is known); ``path`` is the file (None when the reader was given values, not a file)."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None
