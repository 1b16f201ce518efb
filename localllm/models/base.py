"""ModelConfig: the shape of a decoder-only transformer, read from file metadata."""
from __future__ import annotations

from dataclasses import dataclass


class UnsupportedArchitecture(ValueError):
    """The model file names an architecture localllm has no dataflow for."""

    def __init__(self, architecture: str, source: str = ""):
        where = f" in {source}" if source else ""
        super().__init__(f"unsupported model architecture '{architecture}'{where}")
        self.architecture = architecture


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    dim: int                  # residual stream width (embedding_length)
    hidden_dim: int           # feed-forward width
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    n_ctx_train: int          # context length the model was trained for
    rope_theta: float = 10000.0
    rope_dim: int = 0         # rotated dimensions per head (0 -> head_dim)
    rope_style: str = "norm"  # "norm": adjacent pairs (GGUF llama); "neox": first/second half
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    @property
    def n_rot(self) -> int:
        return self.rope_dim or self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim
