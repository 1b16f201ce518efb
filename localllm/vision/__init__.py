"""Images for vision-language models: decoding what users send (``load_image``) and the encoders that turn an
image into the soft tokens a language model reads (``VisionEncoder``: Gemma 3's SigLIP tower and LLaVA-1.5's
CLIP tower, from llama.cpp's mmproj GGUF or a Hugging Face folder).

    encoder = VisionEncoder.from_mmproj("mmproj-gemma-3-4b-it-f16.gguf")
    embeddings = encoder.encode(encoder.preprocess(load_image(png_bytes)))   # (256, 2560) float32
"""
from .encoder import ImagePreprocessing, VisionConfig, VisionEncoder
from .images import ImageError, load_image
from .loading import VisionModelError

__all__ = ["ImageError", "ImagePreprocessing", "VisionConfig", "VisionEncoder", "VisionModelError", "load_image"]
