"""Model file formats: GGUF (``formats.gguf``) and Hugging Face folders (``formats.safetensors``)."""
