"""localllm_server.image_fetch against a local HTTP(S) server in a thread: every refusal with its exact reason.

The server binds 127.0.0.1, so every fetch that should succeed passes ``allow_private=True`` explicitly.
"""
from __future__ import annotations

import http.server
import io
import socket
import ssl
import struct
import threading
import time

import pytest

from localllm_server.image_fetch import (DEFAULT_MAX_BYTES, DEFAULT_MAX_REDIRECTS, DEFAULT_TIMEOUT_S,
                                         ImageFetchError, ImageFetchSettings, fetch_image_bytes, shown_url)

from .conftest import free_port

DRIP_SECONDS = 0.1        # a byte every 0.1 s: each read gets its byte well within any socket timeout


def make_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), (200, 30, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = make_png()
HTML = b"<!doctype html><html><body><img src='/image.png'></body></html>"


class Handler(http.server.BaseHTTPRequestHandler):
    """One path per behaviour; ``self.server.hosts`` records the Host header each path was asked with."""

    def log_message(self, *args):
        pass

    def answer(self, status: int, body: bytes = b"", content_type: str = "image/png", length: int | None = None,
               **headers):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.hosts[self.path] = self.headers.get("Host")
        path = self.path
        if path in ("/image.png", "/b%C3%BCcher.png?size=s%20m"):
            self.answer(200, PNG)
        elif path == "/octet-stream":
            self.answer(200, PNG, content_type="application/octet-stream")
        elif path == "/missing.png":
            self.answer(404, b"not here", content_type="text/plain")
        elif path.startswith("/redirect/"):            # /redirect/N: N more redirects (relative ones), then the image
            left = int(path.rsplit("/", 1)[1])
            if left == 0:
                self.answer(200, PNG)
            else:
                self.answer(302, Location=f"/redirect/{left - 1}")
        elif path == "/to-file":
            self.answer(302, Location="file:///etc/passwd")
        elif path == "/to-loopback":
            self.answer(302, Location=f"http://127.0.0.1:{self.server.server_address[1]}/image.png")
        elif path == "/no-location":
            self.answer(301)
        elif path == "/page.html":
            self.answer(200, HTML, content_type="text/html; charset=utf-8")
        elif path == "/huge-length":
            self.answer(200, b"", length=10 ** 12)
        elif path == "/short-body":
            self.answer(200, PNG[:10], length=len(PNG))
        elif path == "/empty":
            self.answer(200, b"")
        elif path == "/endless":                      # no Content-Length: the body runs until the connection closes
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.write_until_refused(lambda: b"x" * 4096)
        elif path == "/endless-chunked":
            self.protocol_version = "HTTP/1.1"
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            self.write_until_refused(lambda: b"1000\r\n" + b"x" * 4096 + b"\r\n")
        elif path == "/drip-body":                    # Content-Length 30, a byte every DRIP_SECONDS
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "30")
            self.end_headers()
            self.drip(PNG[:30])
        elif path == "/drip-headers":                 # the status line and headers themselves trickle in
            self.close_connection = True
            self.drip(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: 3\r\n\r\nabc")
        elif path == "/reset":
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        elif path == "/no-answer":
            self.close_connection = True
        else:
            self.answer(500, b"unknown test path", content_type="text/plain")

    def write_until_refused(self, piece, limit: int = 2000):
        try:
            for _ in range(limit):
                self.wfile.write(piece())
        except OSError:
            pass

    def drip(self, data: bytes):
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(DRIP_SECONDS)
        except OSError:
            pass


def start_server(wrap_tls=None):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    server.hosts = {}
    if wrap_tls is not None:
        server.socket = wrap_tls(server.socket)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def site():
    """http://127.0.0.1:PORT serving Handler's paths; ``site.hosts`` maps a path to the Host header it got."""
    server, thread = start_server()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def tls_site(tmp_path_factory):
    """https://127.0.0.1:PORT with a self-signed certificate for 127.0.0.1 (``tls_site.cert_file`` trusts it)."""
    cert_file = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file)
    server, thread = start_server(lambda sock: context.wrap_socket(sock, server_side=True))
    server.url = f"https://127.0.0.1:{server.server_address[1]}"
    server.cert_file = str(cert_file)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def self_signed_certificate(folder):
    """A PEM file holding a key and its self-signed certificate for the IP address 127.0.0.1."""
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localllm test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    path = folder / "self-signed.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
                     + certificate.public_bytes(serialization.Encoding.PEM))
    return path


def fetch(url, **limits):
    limits.setdefault("allow_private", True)
    limits.setdefault("timeout_s", 5)
    return fetch_image_bytes(url, **limits)


def refusal(url, **limits) -> str:
    """The message of the ImageFetchError fetching ``url`` raises, checked to name the URL first."""
    with pytest.raises(ImageFetchError) as caught:
        fetch(url, **limits)
    message = str(caught.value)
    assert message == f"could not fetch image from {shown_url(url)}: {caught.value.reason}"
    return caught.value.reason


# --- what is fetched ---------------------------------------------------------------------------------------

def test_a_png_is_fetched_byte_for_byte(site):
    assert fetch(site.url + "/image.png") == PNG


def test_bytes_of_another_content_type_are_left_to_the_decoder(site):
    assert fetch(site.url + "/octet-stream") == PNG


def test_a_redirect_chain_within_the_limit_is_followed(site):
    assert fetch(site.url + "/redirect/2", max_redirects=3) == PNG
    assert fetch(site.url + "/redirect/3", max_redirects=3) == PNG


def test_a_non_ascii_path_and_query_are_percent_encoded(site):
    assert fetch(site.url + "/bücher.png?size=s m".replace(" ", "%20")) == PNG


def test_an_internationalized_host_name_is_asked_for_in_punycode(site, monkeypatch):
    asked = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append(host)
        return real_getaddrinfo("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    port = site.server_address[1]
    assert fetch(f"http://bücher.example:{port}/image.png") == PNG
    assert asked == ["xn--bcher-kva.example"]
    assert site.hosts["/image.png"] == f"xn--bcher-kva.example:{port}"


def test_https_with_a_trusted_certificate(tls_site, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", tls_site.cert_file)
    assert fetch(tls_site.url + "/image.png") == PNG


# --- status, content type, size -----------------------------------------------------------------------------

def test_a_404_is_refused_with_its_status(site):
    url = site.url + "/missing.png"
    with pytest.raises(ImageFetchError) as caught:
        fetch(url)
    assert str(caught.value) == f"could not fetch image from {url}: HTTP 404"


def test_a_web_page_is_refused(site):
    assert refusal(site.url + "/page.html") == "the answer is a web page (text/html), not an image"


def test_a_content_length_over_the_cap_is_refused_before_the_body(site):
    assert refusal(site.url + "/huge-length", max_bytes=1000) == \
        "larger than 1000 bytes (Content-Length: 1000000000000)"


def test_a_body_without_length_is_cut_past_the_cap(site):
    assert refusal(site.url + "/endless", max_bytes=10_000) == "larger than 10000 bytes"


def test_a_chunked_body_is_cut_past_the_cap(site):
    assert refusal(site.url + "/endless-chunked", max_bytes=10_000) == "larger than 10000 bytes"


def test_an_image_of_exactly_the_cap_is_fetched(site):
    assert fetch(site.url + "/image.png", max_bytes=len(PNG)) == PNG
    assert refusal(site.url + "/image.png", max_bytes=len(PNG) - 1) == \
        f"larger than {len(PNG) - 1} bytes (Content-Length: {len(PNG)})"


def test_a_body_shorter_than_its_length_is_refused(site):
    assert refusal(site.url + "/short-body") == f"the answer ended after 10 of its {len(PNG)} bytes"


def test_an_empty_answer_is_refused(site):
    assert refusal(site.url + "/empty") == "the answer is empty (0 bytes)"


# --- redirects ------------------------------------------------------------------------------------------------

def test_too_many_redirects_are_refused(site):
    assert refusal(site.url + "/redirect/5", max_redirects=3) == "more than 3 redirects"
    assert refusal(site.url + "/redirect/1", max_redirects=0) == "more than 0 redirects"


def test_a_redirect_to_a_file_url_is_refused(site):
    assert refusal(site.url + "/to-file") == \
        "redirected to file:///etc/passwd: scheme 'file' is not allowed (http and https only)"


def test_a_redirect_without_location_is_refused(site):
    assert refusal(site.url + "/no-location") == "HTTP 301 without a Location header"


# --- time -----------------------------------------------------------------------------------------------------

def test_a_body_dripping_past_the_deadline_is_cut(site):
    # 30 bytes at a byte every 0.1 s take 3 s: the 1 s deadline, not any single read's wait, ends the fetch
    assert refusal(site.url + "/drip-body", timeout_s=1) == "no answer within 1 s"


def test_headers_dripping_past_the_deadline_are_cut(site):
    assert refusal(site.url + "/drip-headers", timeout_s=1) == "no answer within 1 s"


def test_a_dns_lookup_that_does_not_answer_is_cut_at_the_deadline(monkeypatch):
    release = threading.Event()

    def getaddrinfo(*args, **kwargs):
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        assert refusal("http://slow-dns.example/x.png", timeout_s=0.3) == "no answer within 0.3 s"
    finally:
        release.set()


# --- network failures -----------------------------------------------------------------------------------------

def test_a_closed_port_is_refused():
    port = free_port()
    assert refusal(f"http://127.0.0.1:{port}/x.png") == f"connection to 127.0.0.1:{port} refused"


def test_a_reset_connection(site):
    assert refusal(site.url + "/reset") == "the server reset the connection"


def test_a_connection_closed_without_answer(site):
    assert refusal(site.url + "/no-answer") == "the server closed the connection without an answer"


def test_a_dns_failure(monkeypatch):
    def getaddrinfo(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert refusal("http://no-such-host.invalid/x.png") == \
        "cannot resolve host 'no-such-host.invalid': Name or service not known"


def test_tls_to_a_plain_http_server_fails_cleanly(site):
    url = site.url.replace("http://", "https://") + "/image.png"
    assert refusal(url).startswith("the TLS handshake with 127.0.0.1 failed: ")


def test_an_untrusted_certificate_is_refused(tls_site, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    reason = refusal(tls_site.url + "/image.png")
    assert reason in ("the TLS certificate of 127.0.0.1 is not valid: self-signed certificate",
                      "the TLS certificate of 127.0.0.1 is not valid: self signed certificate")


# --- URLs refused before any connection --------------------------------------------------------------------

@pytest.mark.parametrize("url, reason", [
    ("file:///etc/passwd", "scheme 'file' is not allowed (http and https only)"),
    ("ftp://127.0.0.1/x.png", "scheme 'ftp' is not allowed (http and https only)"),
    ("gopher://127.0.0.1:70/_x", "scheme 'gopher' is not allowed (http and https only)"),
    ("javascript:alert(1)", "scheme 'javascript' is not allowed (http and https only)"),
    ("data:image/png;base64,iVBORw0KGgo=", "a data: URI is an image given inline, not a URL to fetch"),
    ("127.0.0.1/x.png", "no scheme is not allowed (http and https only)"),
    ("http:///x.png", "the URL has no host"),
    ("http://[::1/x.png", "not a valid URL (Invalid IPv6 URL)"),
    ("http://127.0.0.1:99999/x.png", "not a valid URL (Port out of range 0-65535)"),
    ("http://127.0.0.1:0/x.png", "port 0 is not a port to fetch from"),
    ("http://a..b/x.png", "'a..b' is not a valid host name"),
    ("http://exa mple.com/x.png", "the URL contains a space or a control character"),
    ("http://example.com/x.png\r\nX-Injected: 1", "the URL contains a space or a control character"),
])
def test_malformed_and_foreign_urls_are_refused(url, reason):
    assert refusal(url) == reason


def test_userinfo_is_refused_and_never_shown(site):
    url = site.url.replace("://", "://user:s3cret@") + "/image.png"
    with pytest.raises(ImageFetchError) as caught:
        fetch(url)
    assert caught.value.reason == "credentials (user:password@) in the URL are not allowed"
    assert "s3cret" not in str(caught.value) and "***@127.0.0.1" in str(caught.value)


def test_a_long_url_is_cut_in_the_message():
    url = "ftp://example.com/" + "a" * 5000
    with pytest.raises(ImageFetchError) as caught:
        fetch(url)
    assert str(caught.value) == f"could not fetch image from {url[:200]}...: " \
                                "scheme 'ftp' is not allowed (http and https only)"


def test_a_url_that_is_not_a_string():
    with pytest.raises(ImageFetchError, match="an image URL must be a string, not int"):
        fetch(42)


# --- private addresses ----------------------------------------------------------------------------------------

PRIVATE_REFUSAL = "this server does not fetch images from loopback, private or link-local addresses"


def test_loopback_is_refused_when_private_addresses_are_not_allowed(site):
    assert refusal(site.url + "/image.png", allow_private=False) == \
        f"127.0.0.1 is a loopback address; {PRIVATE_REFUSAL}"


def test_a_private_address_is_refused_before_connecting(site):
    site.hosts.clear()
    assert refusal(site.url + "/redirect/0", allow_private=False) == \
        f"127.0.0.1 is a loopback address; {PRIVATE_REFUSAL}"
    assert site.hosts == {}                       # the server was never asked


@pytest.mark.parametrize("host, address, kind", [
    ("router.lan", "192.168.1.1", "a private"), ("metadata.cloud", "169.254.169.254", "a link-local"),
    ("mapped.example", "::ffff:127.0.0.1", "a loopback"), ("zero.example", "0.0.0.0", "an unspecified"),
    ("cgnat.example", "100.64.0.1", "a reserved"), ("v6.example", "fd00::1", "a private")])
def test_names_resolving_to_non_public_addresses_are_refused(monkeypatch, host, address, kind):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sockaddr = (address, 80, 0, 0) if family == socket.AF_INET6 else (address, 80)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(family, socket.SOCK_STREAM, 6, "", sockaddr)])
    assert refusal(f"http://{host}/x.png", allow_private=False) == \
        f"{host} resolves to {address}, which is {kind} address; {PRIVATE_REFUSAL}"


def test_each_redirect_hop_is_checked(site, monkeypatch):
    """A public first hop redirecting to a private address: the second hop is refused. "public.example" stands for
    a public host (it resolves to the test server, whose address the check is told to pass)."""
    import localllm_server.image_fetch as image_fetch

    port = site.server_address[1]
    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real_getaddrinfo(
        "127.0.0.1" if host == "public.example" else host, *a, **k))
    real_check = image_fetch._check_public
    monkeypatch.setattr(image_fetch, "_check_public",
                        lambda host, address: None if host == "public.example" else real_check(host, address))
    assert fetch(f"http://public.example:{port}/image.png", allow_private=False) == PNG
    assert refusal(f"http://public.example:{port}/to-loopback", allow_private=False) == \
        f"redirected to http://127.0.0.1:{port}/image.png: 127.0.0.1 is a loopback address; {PRIVATE_REFUSAL}"


# --- settings -------------------------------------------------------------------------------------------------

IMAGE_VARIABLES = ("LOCALLLM_IMAGE_FETCH", "LOCALLLM_IMAGE_MAX_BYTES", "LOCALLLM_IMAGE_FETCH_TIMEOUT",
                   "LOCALLLM_IMAGE_MAX_REDIRECTS", "LOCALLLM_IMAGE_FETCH_ALLOW_PRIVATE")


@pytest.fixture
def clean_env(monkeypatch):
    for name in IMAGE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_defaults(clean_env):
    settings = ImageFetchSettings.from_env()
    assert settings == ImageFetchSettings(enabled=True, max_bytes=20 * 1024 * 1024, timeout_s=10.0, max_redirects=3,
                                          allow_private=True)
    assert (DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S, DEFAULT_MAX_REDIRECTS) == (20971520, 10.0, 3)


@pytest.mark.parametrize("server_host, behind_proxy, allowed", [
    ("127.0.0.1", False, True), ("localhost", False, True), ("::1", False, True), ("[::1]", False, True),
    ("127.0.0.1", True, False), ("0.0.0.0", False, False), ("192.168.1.20", False, False), ("::", False, False),
    ("myhost.lan", False, False)])
def test_private_addresses_are_allowed_by_default_only_on_a_loopback_server(clean_env, server_host, behind_proxy,
                                                                            allowed):
    settings = ImageFetchSettings.from_env(server_host=server_host, behind_proxy=behind_proxy)
    assert settings.allow_private is allowed


def test_the_allow_private_variable_wins_over_the_default(clean_env):
    clean_env.setenv("LOCALLLM_IMAGE_FETCH_ALLOW_PRIVATE", "0")
    assert ImageFetchSettings.from_env(server_host="127.0.0.1").allow_private is False
    clean_env.setenv("LOCALLLM_IMAGE_FETCH_ALLOW_PRIVATE", "yes")
    assert ImageFetchSettings.from_env(server_host="0.0.0.0").allow_private is True


def test_settings_from_the_environment_limit_the_fetch(clean_env, site):
    clean_env.setenv("LOCALLLM_IMAGE_MAX_BYTES", "1000")
    clean_env.setenv("LOCALLLM_IMAGE_FETCH_TIMEOUT", "2.5")
    clean_env.setenv("LOCALLLM_IMAGE_MAX_REDIRECTS", "1")
    settings = ImageFetchSettings.from_env()
    assert (settings.max_bytes, settings.timeout_s, settings.max_redirects) == (1000, 2.5, 1)
    assert settings.fetch(site.url + "/redirect/1") == PNG
    with pytest.raises(ImageFetchError, match=r"/redirect/2: more than 1 redirects$"):
        settings.fetch(site.url + "/redirect/2")
    with pytest.raises(ImageFetchError, match=r"/endless: larger than 1000 bytes$"):
        settings.fetch(site.url + "/endless")


def test_fetching_turned_off_refuses_every_url(clean_env, site):
    clean_env.setenv("LOCALLLM_IMAGE_FETCH", "0")
    settings = ImageFetchSettings.from_env()
    assert settings.enabled is False
    url = site.url + "/image.png"
    with pytest.raises(ImageFetchError) as caught:
        settings.fetch(url)
    assert str(caught.value) == (f"could not fetch image from {url}: fetching image URLs is turned off on this "
                                 "server; send the image as a data: URI")


@pytest.mark.parametrize("name, value, message", [
    ("LOCALLLM_IMAGE_MAX_BYTES", "0", "LOCALLLM_IMAGE_MAX_BYTES (max_bytes must be a positive number of bytes, got 0)"),
    ("LOCALLLM_IMAGE_MAX_BYTES", "lots", "LOCALLLM_IMAGE_MAX_BYTES must be an integer, got 'lots'"),
    ("LOCALLLM_IMAGE_FETCH_TIMEOUT", "-1",
     "LOCALLLM_IMAGE_FETCH_TIMEOUT (timeout_s must be a positive number of seconds, got -1.0)"),
    ("LOCALLLM_IMAGE_MAX_REDIRECTS", "-2", "LOCALLLM_IMAGE_MAX_REDIRECTS (max_redirects must be 0 or more, got -2)"),
    ("LOCALLLM_IMAGE_FETCH", "maybe", "LOCALLLM_IMAGE_FETCH must be 1 or 0 (true/false, yes/no, on/off), got 'maybe'"),
])
def test_bad_settings_name_their_variable(clean_env, name, value, message):
    clean_env.setenv(name, value)
    with pytest.raises(ValueError) as caught:
        ImageFetchSettings.from_env()
    assert str(caught.value) == message


@pytest.mark.parametrize("limits, message", [
    ({"max_bytes": 0}, "max_bytes must be a positive number of bytes, got 0"),
    ({"timeout_s": float("inf")}, "timeout_s must be a positive number of seconds, got inf"),
    ({"max_redirects": True}, "max_redirects must be 0 or more, got True")])
def test_bad_limits_are_value_errors(limits, message):
    with pytest.raises(ValueError) as caught:
        fetch_image_bytes("http://127.0.0.1/x.png", **limits)
    assert str(caught.value) == message and not isinstance(caught.value, ImageFetchError)
