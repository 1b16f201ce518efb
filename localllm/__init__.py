"""localllm: run language models locally, in pure Python (numpy + numba)."""
__version__ = "0.1.0"
