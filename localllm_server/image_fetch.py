"""Fetching the image an ``image_url`` part names by an http(s) URL, within a size, a time and a redirect limit.

The URL comes from the client and the server fetches it, so every fetch is bounded and every failure is an
``ImageFetchError`` whose message is what the 400 says ("could not fetch image from URL: reason"):

- only ``http`` and ``https``; any other scheme (``file:``, ``ftp:``, ``data:`` -- decoded by
  ``localllm.vision.images.load_image``, never fetched) is refused, on the first URL and on every redirect;
- redirects (301, 302, 303, 307, 308) are followed by hand, at most ``max_redirects``, each hop checked again;
- ``max_bytes``: a ``Content-Length`` above it is refused before the body is read, and a body that keeps
  coming past it is cut after ``max_bytes + 1`` bytes;
- ``timeout_s`` is the wall time of the whole fetch (DNS, connecting, TLS, every redirect, the body): every
  socket read and write waits at most the time left, so a server dripping one byte a second (in the headers
  or in the body) is cut at the deadline, and so is a DNS lookup that does not answer;
- a status other than 2xx is refused with the status; an answer that says it is ``text/html`` (a web page, not
  an image) is refused; any other ``Content-Type`` is accepted and the bytes are left to ``load_image`` to sniff;
- userinfo (``user:password@``) in a URL is refused, and never shown in a message;
- proxies from the environment (``http_proxy``...) are not used: the connection goes straight to the address
  that was checked (below), so that the check is the truth about where the request goes.

Private networks (SSRF). The server fetches whatever address the client names, so a server other people can
reach would let them read what only the server can reach (a router's page, a cloud metadata service at
169.254.169.254, services on the server's loopback). With ``allow_private=False`` the host is resolved
once, every address it resolves to is checked, and the connection is made to a checked address (so a DNS answer
that changes between the check and the connection cannot slip a private address in): loopback, private,
link-local, multicast and other non-global addresses are refused, on every hop.
``LOCALLLM_IMAGE_FETCH_ALLOW_PRIVATE`` decides; unset, private addresses are allowed only when the server
listens on a loopback address and no reverse proxy is trusted (``LOCALLLM_TRUSTED_PROXY`` unset): then only
programs on the user's own machine reach the server, and they reach the user's network themselves anyway. A
server listening on any other address (``0.0.0.0``, a LAN address) or behind a proxy refuses them.

Settings (``ImageFetchSettings.from_env``): ``LOCALLLM_IMAGE_FETCH`` (``0`` refuses every URL: clients must send
``data:`` URIs), ``LOCALLLM_IMAGE_MAX_BYTES`` (default 20 MiB, as ``load_image``'s own cap),
``LOCALLLM_IMAGE_FETCH_TIMEOUT`` (seconds, default 10), ``LOCALLLM_IMAGE_MAX_REDIRECTS`` (default 3),
``LOCALLLM_IMAGE_FETCH_ALLOW_PRIVATE`` (see above). Standard library only (``http.client``, ``ssl``).

A route: ``ImageFetchSettings.from_env(server_host=settings.host, behind_proxy=settings.trusted_proxy is not None)``
once, then ``.fetch(url)`` per ``image_url`` part; ``ImageFetchError`` is a ValueError, so it comes out as a 400.
"""
from __future__ import annotations

import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

DEFAULT_MAX_BYTES = 20 * 1024 * 1024       # localllm.vision.images.DEFAULT_MAX_BYTES: the same cap on a data: URI
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_REDIRECTS = 3

ALLOWED_SCHEMES = ("http", "https")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
WEB_PAGE_TYPES = ("text/html", "application/xhtml+xml")   # answers that are a page about the image, not the image
READ_CHUNK_BYTES = 64 * 1024
SHOWN_URL_CHARS = 200                      # a URL in a message is cut to this many characters
REQUEST_HEADERS = {"Accept": "image/png,image/jpeg,image/webp,image/gif,image/*;q=0.8",
                   "User-Agent": "localllm-image-fetch", "Connection": "close"}


class ImageFetchError(ValueError):
    """An image URL that could not be fetched; ``str(error)`` is the whole message a 400 should carry:
    ``could not fetch image from <url>: <reason>`` (the URL cut to a readable length, userinfo hidden)."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(f"could not fetch image from {shown_url(url)}: {reason}")


@dataclass(frozen=True)
class ImageFetchSettings:
    """The limits of ``fetch_image_bytes`` and whether URLs are fetched at all (see the module docstring)."""

    enabled: bool = True                          # LOCALLLM_IMAGE_FETCH
    max_bytes: int = DEFAULT_MAX_BYTES            # LOCALLLM_IMAGE_MAX_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S          # LOCALLLM_IMAGE_FETCH_TIMEOUT: wall time of the whole fetch
    max_redirects: int = DEFAULT_MAX_REDIRECTS    # LOCALLLM_IMAGE_MAX_REDIRECTS
    allow_private: bool = False                   # LOCALLLM_IMAGE_FETCH_ALLOW_PRIVATE

    def __post_init__(self):
        check_limits(self.max_bytes, self.timeout_s, self.max_redirects)

    @classmethod
    def from_env(cls, *, server_host: str = "127.0.0.1", behind_proxy: bool = False) -> "ImageFetchSettings":
        """The settings from the ``LOCALLLM_IMAGE_*`` variables; ``server_host`` is the address the server
        listens on and ``behind_proxy`` whether a reverse proxy is trusted (``LOCALLLM_TRUSTED_PROXY``): they
        decide ``allow_private`` when ``LOCALLLM_IMAGE_FETCH_ALLOW_PRIVATE`` is unset. A ValueError names a
        variable whose value is not one."""
        from localllm.engine import env_number

        allow_private = env_switch("LOCALLLM_IMAGE_FETCH_ALLOW_PRIVATE")
        if allow_private is None:
            allow_private = is_loopback_host(server_host) and not behind_proxy
        enabled = env_switch("LOCALLLM_IMAGE_FETCH")
        settings = dict(enabled=True if enabled is None else enabled,
                        max_bytes=env_number("LOCALLLM_IMAGE_MAX_BYTES", str(DEFAULT_MAX_BYTES)),
                        timeout_s=env_number("LOCALLLM_IMAGE_FETCH_TIMEOUT", str(DEFAULT_TIMEOUT_S), float),
                        max_redirects=env_number("LOCALLLM_IMAGE_MAX_REDIRECTS", str(DEFAULT_MAX_REDIRECTS)),
                        allow_private=allow_private)
        variables = {"max_bytes": "LOCALLLM_IMAGE_MAX_BYTES", "timeout_s": "LOCALLLM_IMAGE_FETCH_TIMEOUT",
                     "max_redirects": "LOCALLLM_IMAGE_MAX_REDIRECTS"}
        try:
            return cls(**settings)
        except ValueError as exc:          # "max_bytes must be ..." -> "LOCALLLM_IMAGE_MAX_BYTES (max_bytes must ...)"
            name = str(exc).split(" ", 1)[0]
            raise ValueError(f"{variables[name]} ({exc})") from None

    def fetch(self, url: str) -> bytes:
        """The bytes ``url`` answers with, within these limits; an ``ImageFetchError`` when fetching is off."""
        if not self.enabled:
            raise ImageFetchError(url if isinstance(url, str) else repr(url),
                                  "fetching image URLs is turned off on this server; send the image as a data: URI")
        return fetch_image_bytes(url, max_bytes=self.max_bytes, timeout_s=self.timeout_s,
                                 max_redirects=self.max_redirects, allow_private=self.allow_private)


def fetch_image_bytes(url: str, *, max_bytes: int = DEFAULT_MAX_BYTES, timeout_s: float = DEFAULT_TIMEOUT_S,
                      max_redirects: int = DEFAULT_MAX_REDIRECTS, allow_private: bool = False) -> bytes:
    """The body of the 2xx answer to ``GET url`` (after at most ``max_redirects`` redirects): at most
    ``max_bytes`` bytes, all of it within ``timeout_s`` seconds of wall time. ``allow_private=False`` refuses
    loopback, private and link-local addresses after DNS resolution, on every hop.

    Raises ``ImageFetchError`` for every failure (bad URL, scheme, DNS, connection, TLS, status, size, time,
    redirects); a ValueError for limits that are not positive."""
    check_limits(max_bytes, timeout_s, max_redirects)
    if not isinstance(url, str):
        raise ImageFetchError(repr(url), f"an image URL must be a string, not {type(url).__name__}")
    deadline = time.monotonic() + timeout_s
    hop_url = url
    for redirects in range(max_redirects + 1):
        try:
            answer = _get(hop_url, max_bytes=max_bytes, deadline=deadline, allow_private=allow_private)
        except _Refused as refused:
            if refused.reason_is_time:         # the deadline is the whole fetch's, whichever hop it fell in
                reason = f"no answer within {timeout_s:g} s"
            elif redirects:
                reason = f"redirected to {shown_url(hop_url)}: {refused.reason}"
            else:
                reason = refused.reason
            raise ImageFetchError(url, reason) from None
        if isinstance(answer, bytes):
            return answer
        hop_url = answer                   # a redirect's Location, resolved against the URL that answered it
    raise ImageFetchError(url, f"more than {max_redirects} redirects")


def check_limits(max_bytes: int, timeout_s: float, max_redirects: int) -> None:
    """A ValueError starting with the name of the limit that is out of range."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if isinstance(max_redirects, bool) or not isinstance(max_redirects, int) or max_redirects < 0:
        raise ValueError(f"max_redirects must be 0 or more, got {max_redirects!r}")


def env_switch(name: str) -> bool | None:
    """The 1/0 (true/false, yes/no, on/off) variable ``name``; None when it is unset or empty."""
    from .app import env_flag

    if not os.environ.get(name, "").strip():
        return None
    return env_flag(name)


def is_loopback_host(host: str) -> bool:
    """Whether a server listening on ``host`` is reachable from this machine only."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def shown_url(url: str) -> str:
    """``url`` as a message shows it: userinfo replaced by ``***``, unprintable characters escaped, cut short."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1***@", url)
    url = "".join(c if c.isprintable() else repr(c)[1:-1] for c in url)
    return url if len(url) <= SHOWN_URL_CHARS else url[:SHOWN_URL_CHARS] + "..."


# --- one hop ------------------------------------------------------------------------------------------------

class _Refused(Exception):
    """Why one hop failed; ``reason_is_time``: the deadline passed (fetch_image_bytes words it)."""

    def __init__(self, reason: str = "", reason_is_time: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.reason_is_time = reason_is_time


@dataclass(frozen=True)
class _Target:
    scheme: str        # "http" or "https"
    host: str          # ASCII: an IDN's punycode, an IPv6 address without brackets
    port: int
    path: str          # path and query, percent-encoded ASCII, starting with "/"


def _get(url: str, *, max_bytes: int, deadline: float, allow_private: bool) -> bytes | str:
    """One GET: the body of a 2xx answer (bytes), or the absolute URL a redirect points to (str)."""
    target = _parse_url(url)
    addresses = _resolve(target, deadline)
    if not allow_private:
        for address in addresses:
            _check_public(target.host, address[4][0])
    sock = None
    try:
        sock = _connect(target, addresses, deadline)
        connection = http.client.HTTPConnection(target.host, target.port)
        connection.sock = _DeadlineSocket(sock, deadline)
        connection.request("GET", target.path, headers=REQUEST_HEADERS)
        response = connection.getresponse()
        if response.status in REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location:
                raise _Refused(f"HTTP {response.status} without a Location header")
            return urllib.parse.urljoin(url, location.strip())
        if not 200 <= response.status < 300:
            raise _Refused(f"HTTP {response.status}")
        content_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if content_type in WEB_PAGE_TYPES:
            raise _Refused(f"the answer is a web page ({content_type}), not an image")
        return _read_body(response, max_bytes)
    except (OSError, http.client.HTTPException) as exc:
        raise _Refused(*_network_failure(exc, target)) from None
    finally:
        if sock is not None:
            sock.close()


def _parse_url(url: str) -> _Target:
    """The URL checked and taken apart; a _Refused saying what is wrong with it."""
    if re.search(r"[\x00-\x20\x7f]", url):
        raise _Refused("the URL contains a space or a control character")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _Refused(f"not a valid URL ({exc})") from None
    if parts.scheme == "data":
        raise _Refused("a data: URI is an image given inline, not a URL to fetch")
    if parts.scheme not in ALLOWED_SCHEMES:
        scheme = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise _Refused(f"{scheme} is not allowed (http and https only)")
    if "@" in parts.netloc:
        raise _Refused("credentials (user:password@) in the URL are not allowed")
    if not parts.hostname:
        raise _Refused("the URL has no host")
    if port == 0:
        raise _Refused("port 0 is not a port to fetch from")
    host = parts.hostname
    if not _is_ip_address(host):
        try:
            host = host.rstrip(".").encode("idna").decode("ascii")
        except UnicodeError:
            raise _Refused(f"{parts.hostname!r} is not a valid host name") from None
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return _Target(parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path)


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


def _resolve(target: _Target, deadline: float) -> list:
    """``getaddrinfo`` of the target, given at most until the deadline (a DNS server that does not answer holds
    a daemon thread, not the request)."""
    outcome: dict = {}

    def lookup():
        try:
            outcome["addresses"] = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            outcome["error"] = exc

    if _is_ip_address(target.host):
        lookup()                            # a numeric address: no DNS, no wait
    else:
        thread = threading.Thread(target=lookup, name="image-fetch-dns", daemon=True)
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()))
    if "error" in outcome:
        error = outcome["error"]
        detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise _Refused(f"cannot resolve host {target.host!r}: {detail}")
    if "addresses" not in outcome:
        raise _Refused(reason_is_time=True)
    if not outcome["addresses"]:
        raise _Refused(f"cannot resolve host {target.host!r}: no address")
    return outcome["addresses"]


def _check_public(host: str, address: str) -> None:
    """A _Refused when ``address`` (one of ``host``'s) is loopback, private, link-local or otherwise not global."""
    address = address.split("%", 1)[0]                  # an IPv6 scope ("fe80::1%eth0") is no part of the address
    kind = _non_public_kind(ipaddress.ip_address(address))
    if kind is None:
        return
    where = address if host == address else f"{host} resolves to {address}, which"
    raise _Refused(f"{where} is {kind} address; this server does not fetch images from loopback, private or "
                   "link-local addresses")


def _non_public_kind(ip) -> str | None:
    """``"a loopback"``, ``"a private"``, ...: what kind of non-global address ``ip`` is; None when it is global."""
    if ip.version == 6 and ip.ipv4_mapped is not None:      # ::ffff:127.0.0.1 is 127.0.0.1
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "an unspecified"
    if ip.is_loopback:
        return "a loopback"
    if ip.is_link_local:
        return "a link-local"
    if ip.is_multicast:
        return "a multicast"
    if ip.is_private:
        return "a private"
    if not ip.is_global:
        return "a reserved"
    return None


def _connect(target: _Target, addresses: list, deadline: float):
    """A socket connected to the first of ``addresses`` that answers (TLS done for https), before the deadline."""
    failure: OSError | None = None
    for family, kind, protocol, _, sockaddr in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Refused(reason_is_time=True)
        sock = socket.socket(family, kind, protocol)
        try:
            sock.settimeout(remaining)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        if target.scheme == "https":
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                return ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
            except BaseException:
                sock.close()
                raise
        return sock
    raise failure


class _DeadlineSocket:
    """A connected socket whose every read and write waits at most until ``deadline`` (time.monotonic()).

    ``http.client`` reads the status line and each header with ``readline``, which keeps reading while bytes
    trickle in; a socket timeout alone bounds each read, not the sum. This wrapper gives each read the time left,
    so the whole answer -- headers and body -- must arrive before the deadline."""

    def __init__(self, sock, deadline: float):
        self.sock = sock
        self.deadline = deadline

    def _arm(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the deadline passed")
        self.sock.settimeout(remaining)

    def sendall(self, data) -> None:
        self._arm()
        self.sock.sendall(data)

    def recv_into(self, buffer) -> int:
        self._arm()
        return self.sock.recv_into(buffer)

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"only 'rb' files are made from this socket, not {mode!r}")
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        """Nothing: http.client closes its connection as soon as it has the headers of a ``Connection: close``
        answer, before the body is read; the fetch closes the socket itself when it is done."""


class _DeadlineReader(io.RawIOBase):
    """The raw byte stream under http.client's buffered reader; closing it leaves the socket to its owner."""

    def __init__(self, sock: _DeadlineSocket):
        self.sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.sock.recv_into(buffer)


def _read_body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """The body, refused up front when Content-Length says more than ``max_bytes`` and cut when it goes past."""
    declared = response.length                      # Content-Length, or None (chunked, or read until close)
    if declared is not None and declared > max_bytes:
        raise _Refused(f"larger than {max_bytes} bytes (Content-Length: {declared})")
    body = bytearray()
    while True:
        chunk = response.read(min(READ_CHUNK_BYTES, max_bytes + 1 - len(body)))
        if not chunk:
            break
        body += chunk
        if len(body) > max_bytes:
            raise _Refused(f"larger than {max_bytes} bytes")
    if declared is not None and len(body) < declared:
        raise _Refused(f"the answer ended after {len(body)} of its {declared} bytes")
    if not body:
        raise _Refused("the answer is empty (0 bytes)")
    return bytes(body)


def _network_failure(exc: BaseException, target: _Target) -> tuple[str, bool]:
    """(reason, reason_is_time) for an exception raised while connecting, sending or reading."""
    where = f"[{target.host}]:{target.port}" if ":" in target.host else f"{target.host}:{target.port}"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "", True
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the TLS certificate of {target.host} is not valid: {exc.verify_message or exc}", False
    if isinstance(exc, ssl.SSLError):
        return f"the TLS handshake with {target.host} failed: {_ssl_message(exc)}", False
    if isinstance(exc, ConnectionRefusedError):
        return f"connection to {where} refused", False
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without an answer", False
    if isinstance(exc, ConnectionResetError):
        return "the server reset the connection", False
    if isinstance(exc, http.client.IncompleteRead):
        return f"the answer ended after {len(exc.partial)} bytes, before its end", False
    if isinstance(exc, http.client.HTTPException):
        return f"not a valid HTTP answer ({type(exc).__name__}: {exc})", False
    return f"network error talking to {where}: {exc.strerror or exc}", False


def _ssl_message(exc: ssl.SSLError) -> str:
    """"[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)" -> "wrong version number"."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    found = re.search(r"\]\s*(.*?)\s*\(_ssl\.c:\d+\)$", text)
    return found.group(1) if found else text
