"""Images in requests: what every route does between the client's image parts and the library's chat images.

1. ``fetch_urls``: each ``image_url`` / ``input_image`` part with an http(s) URL is fetched
   (``image_fetch``: size cap, deadline, redirect limit, private addresses by setting) and becomes the
   library's ``{"type": "image", "image": <bytes>}`` part; ``data:`` URIs are left to the library.
2. ``chat_images`` (which calls ``fetch_urls`` once it knows the model sees): ``Model.images_in`` decodes and encodes the images (their embeddings cached by pixel
   digest) and puts markers in the messages; the route renders and tokenizes as for any chat, passing the
   embeddings to ``Model.tokenize(..., images=)``.

Every failure is a 400 in the route's envelope naming where the image was: a model without a vision
encoder ("model 'x' has no vision"), an undecodable or oversized image ("messages[0].content[1]: ..."),
a URL that could not be fetched (the reason: HTTP status, size, time, redirects, scheme).
"""
from __future__ import annotations

import functools

from .errors import APIError
from .image_fetch import ImageFetchError, ImageFetchSettings


@functools.lru_cache(maxsize=8)
def _fetch_settings(server_host: str, behind_proxy: bool) -> ImageFetchSettings:
    return ImageFetchSettings.from_env(server_host=server_host, behind_proxy=behind_proxy)


def fetch_settings(settings) -> ImageFetchSettings:
    """The image-fetching limits for a server with these settings (``LOCALLLM_IMAGE_*``, read once)."""
    host = getattr(settings, "host", "127.0.0.1")
    return _fetch_settings(host, getattr(settings, "trusted_proxy", None) is not None)


def fetch_urls(messages: list[dict], settings, param: str = "messages") -> list[dict]:
    """``messages`` with every http(s) image URL fetched into the bytes of a library image part."""
    from localllm.vision.prompt import has_images     # (the server package imports no numpy until a request)
    if not has_images(messages):
        return messages
    out = []
    for m, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            url = _http_url(part)
            if url is None:
                parts.append(part)
                continue
            where = part.get("where") or f"{param}[{m}].content[{j}]"
            try:
                data = fetch_settings(settings).fetch(url)
            except ImageFetchError as exc:
                raise APIError(400, f"{where}: {exc}", param=f"{where}.image_url", code="invalid_image_url") from None
            parts.append({"type": "image", "image": data, "where": where})
        out.append({**message, "content": parts})
    return out


def chat_images(model, name: str, messages: list[dict], settings=None,
                param: str = "messages") -> tuple[list[dict], dict]:
    """(messages with image markers, {digest: embeddings}) of a chat on ``model`` (``name`` as the client
    called it): URLs fetched (``fetch_urls``) once the model is known to see, then decoded and encoded;
    or a 400 naming the model / the image's place."""
    from localllm.vision.prompt import ImageInputError, NoVisionError, has_images
    if not has_images(messages):
        return messages, {}
    if getattr(model, "vision", None) is None:      # before fetching anything
        raise APIError(400, f"model '{name}' has no vision: it cannot read images", param=param,
                       code="model_has_no_vision")
    messages = fetch_urls(messages, settings, param)
    try:
        return model.images_in(messages)
    except NoVisionError as exc:
        raise APIError(400, str(exc), param=param, code="model_has_no_vision") from None
    except ImageInputError as exc:
        where = str(exc).split(":", 1)[0]
        raise APIError(400, str(exc), param=where if where.startswith(param) else param,
                       code="invalid_image") from None


def _http_url(part) -> str | None:
    from localllm.vision.prompt import IMAGE_PART_TYPES
    if not isinstance(part, dict) or part.get("type") not in IMAGE_PART_TYPES:
        return None
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if isinstance(url, str) and url and url[:5].lower() != "data:":
        return url
    return None


def tokenize(model, text: str, images: dict):
    """The prompt's token ids: with the images' positions when it has images (``Model.tokenize(..., images=)``),
    else as any text prompt."""
    return model.tokenize(text, images=images) if images else model.tokenize(text)
