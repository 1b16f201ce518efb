"""localllm: run language models locally, in pure Python (numpy + numba).

>>> import localllm
>>> model = localllm.load("smollm2:135m")          # pull it first: localllm.pull("smollm2:135m")
>>> print(model.chat([{"role": "user", "content": "Why is the sky blue?"}], max_tokens=64))
"""
from .api import Model, load

__version__ = "0.1.0"
__all__ = ["Model", "load", "pull", "list_models", "__version__"]


def pull(name: str, progress=None):
    """Fetch a known model into the store (``localllm pull``); returns its store entry."""
    from .store import ModelStore
    return ModelStore().pull(name, progress=progress)


def list_models():
    """Store entries of every model on disk."""
    from .store import ModelStore
    return ModelStore().list()
