"""The architecture registry: GGUF architecture name -> its module (``arch/<name>.py``).

An architecture module declares ``NAMES`` (the GGUF ``general.architecture``
values it reads), ``config_from_gguf(gguf) -> ModelConfig`` (hyperparameters
and BlockSpec) and ``DEFAULT_CHAT_TEMPLATE`` (None, or the turn format for
files that carry no template). Adding one is its file, a line in MODULES, and
its tests; see docs/architecture.md.
"""
from __future__ import annotations

from types import ModuleType

from . import gemma2, gemma3, llama, phi3, qwen2, qwen3
from .spec import BlockSpec, ModelConfig, UnsupportedArchitecture, UnsupportedModelFeature

MODULES: tuple[ModuleType, ...] = (llama, qwen2, qwen3, phi3, gemma2, gemma3)
REGISTRY: dict[str, ModuleType] = {name: module for module in MODULES for name in module.NAMES}
ENCODER_ARCHITECTURES = ("bert",)  # served by models.bert / embeddings, not by the decoder


def supported() -> tuple[str, ...]:
    """Every architecture name localllm loads (decoders and encoders)."""
    return tuple(sorted((*REGISTRY, *ENCODER_ARCHITECTURES)))


def default_chat_template(architecture: str | None) -> str | None:
    """The registry's turn format for files of this architecture that carry no chat template (or None)."""
    module = REGISTRY.get(architecture or "")
    return getattr(module, "DEFAULT_CHAT_TEMPLATE", None) if module else None


def lookup(architecture: str, source: str = "") -> ModuleType:
    """The module of a decoder architecture; UnsupportedArchitecture naming it and the supported ones."""
    module = REGISTRY.get(architecture)
    if module is None:
        raise UnsupportedArchitecture(architecture, source, supported())
    return module


__all__ = ["BlockSpec", "ENCODER_ARCHITECTURES", "MODULES", "ModelConfig", "REGISTRY", "UnsupportedArchitecture",
           "UnsupportedModelFeature", "default_chat_template", "lookup", "supported"]
