"""Images through the server: the real openai and ollama clients, /v1/chat/completions, /v1/responses,
/api/chat and /api/generate, on the tiny Gemma 3 and LLaVA vision-language models (tests/tiny_vlm.py).

Each answer is checked against the library's own greedy answer for the same image on another copy of
the model, and its first-token log-probabilities against another image's: the image reaches the model."""
from __future__ import annotations

import base64
import http.server
import threading

import httpx
import pytest

import localllm
from tests.server.conftest import run_app
from tests.tiny_vlm import data_uri, picture, png_bytes

GEMMA = "tiny-vlm-gemma3:latest"
LLAVA = "tiny-vlm-llava:latest"
QUESTION = "What is it?"


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory, tiny_vlm_files):
    """(base URL, {name: a library copy of the model}) of a server whose store holds the two tiny VLMs with their
    projectors attached, plus smollm2-free text-only tiny model for the refusals."""
    from localllm.engine import Engine, EngineSettings
    from localllm.store import ModelStore
    from localllm.vision import VisionEncoder
    from tests.tiny_models import write_tiny_llama

    root = tmp_path_factory.mktemp("vision-server")
    store = ModelStore(root / "store")
    copies = {}
    for name, family in ((GEMMA, "gemma3"), (LLAVA, "llava")):
        _, model_path, mmproj = tiny_vlm_files[family]
        store.add_local(name, model_path)
        copies[name] = (localllm.load(model_path, projector=mmproj, num_ctx=512), mmproj)
    store.add_local("tiny-text:latest", write_tiny_llama(root / "text.gguf"))
    engine = Engine(EngineSettings(n_slots=4, max_queue=16, keep_alive=600), store=store)
    for name, (_, mmproj) in copies.items():
        engine.load(name).attach_vision(VisionEncoder.from_mmproj(mmproj))
    running = run_app(engine, threads=8)
    yield running.url, {name: model for name, (model, _) in copies.items()}
    running.close()
    engine.close()


@pytest.fixture(scope="module")
def image_host():
    """A local HTTP server: /cat.png (a PNG), /missing.png (404), /page (text/html)."""
    served = {"/cat.png": ("image/png", png_bytes(picture(21))), "/page": ("text/html", b"<html>hi</html>")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in served:
                self.send_error(404)
                return
            kind, body = served[self.path]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def expected(copies, name, image, max_tokens=6) -> str:
    return copies[name].chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                           {"type": "text", "text": QUESTION}]}],
                             max_tokens=max_tokens, temperature=0)


def openai_client(url):
    from openai import OpenAI
    return OpenAI(base_url=url + "/v1/", api_key="x", max_retries=0, timeout=120)


def image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


@pytest.mark.parametrize("name", [GEMMA, LLAVA])
def test_openai_chat_with_a_data_uri(vision_server, name):
    url, copies = vision_server
    client = openai_client(url)
    image = picture(20)
    answer = client.chat.completions.create(model=name, messages=image_message(data_uri(image)), max_tokens=6,
                                            temperature=0, logprobs=True, top_logprobs=5)
    assert answer.choices[0].message.content == expected(copies, name, image)
    assert answer.usage.prompt_tokens > copies[name].vision.n_image_tokens
    other = client.chat.completions.create(model=name, messages=image_message(data_uri(picture(22))), max_tokens=1,
                                           temperature=0, logprobs=True, top_logprobs=5)
    first = {t.token: t.logprob for t in answer.choices[0].logprobs.content[0].top_logprobs}
    second = {t.token: t.logprob for t in other.choices[0].logprobs.content[0].top_logprobs}
    assert first != second                         # the log-probabilities follow the image
    streamed = client.chat.completions.create(model=name, messages=image_message(data_uri(image)), max_tokens=6,
                                              temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == \
        answer.choices[0].message.content


def test_openai_chat_with_an_http_url(vision_server, image_host):
    url, copies = vision_server
    client = openai_client(url)
    answer = client.chat.completions.create(model=GEMMA, messages=image_message(image_host + "/cat.png"),
                                            max_tokens=6, temperature=0)
    assert answer.choices[0].message.content == expected(copies, GEMMA, picture(21))


@pytest.mark.parametrize("path, reason", [("/missing.png", "HTTP 404"), ("/page", "text/html")])
def test_a_url_that_fails_is_a_400_with_the_reason(vision_server, image_host, path, reason):
    import openai
    url, _ = vision_server
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client(url).chat.completions.create(model=GEMMA, messages=image_message(image_host + path),
                                                   max_tokens=1)
    error = raised.value.body
    assert reason in error["message"] and error["message"].startswith("messages[0].content[0]: could not fetch")
    assert error["param"] == "messages[0].content[0].image_url"


def test_other_schemes_are_refused(vision_server):
    url, _ = vision_server
    answer = httpx.post(url + "/v1/chat/completions", json={"model": GEMMA, "messages": image_message(
        "file:///etc/passwd")}, timeout=60)
    assert answer.status_code == 400 and "scheme 'file' is not allowed" in answer.json()["error"]["message"]


@pytest.mark.parametrize("url_of, message", [
    (lambda: "data:image/png;base64," + base64.b64encode(b"not a png at all").decode(), "messages[0].content[0]: "),
    (lambda: "data:image/png;base64,!!!", "messages[0].content[0]: "),
])
def test_an_undecodable_image_is_a_400_naming_its_place(vision_server, url_of, message):
    url, _ = vision_server
    answer = httpx.post(url + "/v1/chat/completions", json={"model": LLAVA, "messages": image_message(url_of())},
                        timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["message"].startswith(message) and error["param"] == "messages[0].content[0]"


def huge_png_header() -> bytes:
    """A small PNG whose header says 20000 x 20000 pixels (a decompression bomb: refused from its header)."""
    import struct
    import zlib
    data = bytearray(png_bytes(picture(1, size=(8, 8))))
    ihdr = data[12:29]                                  # b"IHDR" + width, height, depth, colour, ...
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_an_oversized_image_is_a_400_naming_its_place(vision_server):
    url, _ = vision_server
    bomb = "data:image/png;base64," + base64.b64encode(huge_png_header()).decode()
    answer = httpx.post(url + "/v1/chat/completions", json={"model": LLAVA, "messages": image_message(bomb)},
                        timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["message"].startswith("messages[0].content[0]: ") and "pixels" in error["message"]


def test_a_text_only_model_says_it_has_no_vision(vision_server, image_host):
    url, _ = vision_server
    answer = httpx.post(url + "/v1/chat/completions", json={"model": "tiny-text", "messages": image_message(
        image_host + "/never-fetched.png")}, timeout=60)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "model 'tiny-text' has no vision: it cannot read images"
    native = httpx.post(url + "/api/chat", json={"model": "tiny-text", "stream": False, "messages": [
        {"role": "user", "content": "hi", "images": [base64.b64encode(png_bytes(picture(1))).decode()]}]},
        timeout=60)
    assert native.status_code == 400 and "has no vision" in native.json()["error"]


def test_responses_input_image(vision_server):
    url, copies = vision_server
    image = picture(23)
    answer = openai_client(url).responses.create(model=GEMMA, max_output_tokens=6, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": data_uri(image)},
                                     {"type": "input_text", "text": QUESTION}]}])
    assert answer.output_text == expected(copies, GEMMA, image)
    bad = httpx.post(url + "/v1/responses", json={"model": GEMMA, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "x"},
                                     {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]},
        timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("input[0].content[1]: ")


@pytest.mark.parametrize("name", [GEMMA, LLAVA])
def test_ollama_chat_with_images(vision_server, name):
    import ollama
    url, copies = vision_server
    client = ollama.Client(host=url)
    image = picture(24)
    messages = [{"role": "user", "content": QUESTION, "images": [png_bytes(image)]}]
    answer = client.chat(model=name, messages=messages, options={"temperature": 0, "num_predict": 6})
    assert answer.message.content == expected(copies, name, image)
    streamed = "".join(part.message.content for part in client.chat(
        model=name, messages=messages, options={"temperature": 0, "num_predict": 6}, stream=True))
    assert streamed == answer.message.content
    other = client.chat(model=name, messages=[{**messages[0], "images": [png_bytes(picture(25))]}],
                        options={"temperature": 0, "num_predict": 6}, logprobs=True, top_logprobs=3)
    again = client.chat(model=name, messages=messages, options={"temperature": 0, "num_predict": 6}, logprobs=True,
                        top_logprobs=3)
    assert other.logprobs[0].top_logprobs != again.logprobs[0].top_logprobs


def test_ollama_generate_with_images(vision_server):
    import ollama
    url, copies = vision_server
    image = picture(26)
    answer = ollama.Client(host=url).generate(model=GEMMA, prompt=QUESTION, images=[png_bytes(image)],
                                              options={"temperature": 0, "num_predict": 6})
    assert answer.response == expected(copies, GEMMA, image)
    assert all(t >= 0 for t in answer.context)     # the image's positions are not tokens to send back


def test_ollama_bad_image_names_its_place(vision_server):
    url, _ = vision_server
    answer = httpx.post(url + "/api/chat", json={"model": LLAVA, "stream": False, "messages": [
        {"role": "user", "content": "hi", "images": ["bm90IGFuIGltYWdl"]}]}, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"].startswith("messages[0].images[0]: ")


def test_anthropic_messages_with_an_image_block(vision_server):
    from anthropic import Anthropic
    url, copies = vision_server
    image = picture(27)
    client = Anthropic(base_url=url, api_key="x", max_retries=0)
    answer = client.messages.create(model=GEMMA, max_tokens=6, extra_body={"temperature": 0}, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(png_bytes(image)).decode()}},
        {"type": "text", "text": QUESTION}]}])
    assert answer.content[0].text == expected(copies, GEMMA, image)
