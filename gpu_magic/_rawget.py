"""Large downloads read straight from the socket into their final buffer.

httpx reads a response 64 KiB at a time and hands each piece over as a new bytes object: 256 MiB
took 0.3-0.4 s here from a gateway that sends it in 0.1 s. This module speaks just enough
HTTP/1.1 for one ``GET`` of a body with a ``Content-Length`` and ``recv_into`` the buffer the
result will live in. Anything else (a redirect, a chunked body, a proxy in the way) is left to
httpx: :func:`get_into` then answers None before it has read any of the body.
"""

from __future__ import annotations

import socket
import ssl
import urllib.request
from typing import Any

import httpx

from ._version import __version__

_HEAD_MAX = 64 << 10
_STEP = 8 << 20


class Short(Exception):
    """The connection ended before the whole body had come: ``got`` of ``size`` bytes."""

    def __init__(self, got: int, size: int) -> None:
        super().__init__(f"{got} of {size} bytes")
        self.got, self.size = got, size


def usable(url: httpx.URL) -> bool:
    """Whether a plain connection reaches ``url`` as httpx would (no proxy configured for it)."""
    if url.scheme not in ("http", "https") or not url.host:
        return False
    proxies = urllib.request.getproxies()
    if not proxies or urllib.request.proxy_bypass(url.host):
        return True
    return not any(k in proxies for k in (url.scheme, "all"))


def get_into(url: httpx.URL, headers: dict[str, str], *, timeout: float,
             context: ssl.SSLContext, connect_timeout: float | None = None,
             ) -> tuple[int, dict[str, str], bytes | bytearray] | None:
    """GET ``url``: (status, headers, body), where a 200 body is one bytearray received in
    place. None if the answer is not one this reader handles (nothing of it used)."""
    port = url.port or (443 if url.scheme == "https" else 80)
    sock = socket.create_connection((url.host, port), timeout=connect_timeout or timeout)
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if url.scheme == "https":
            sock = context.wrap_socket(sock, server_hostname=url.host)
        host = url.netloc.decode("ascii")
        lines = [f"GET {url.raw_path.decode('ascii')} HTTP/1.1", f"Host: {host}",
                 f"User-Agent: gpu-magic/{__version__}", "Accept-Encoding: identity",
                 "Connection: close", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        sock.sendall("\r\n".join(lines).encode("latin-1"))
        head = bytearray()
        while (end := head.find(b"\r\n\r\n")) < 0:
            piece = sock.recv(_HEAD_MAX)
            if not piece or len(head) > _HEAD_MAX:
                return None
            head += piece
        status, fields = _parse_head(bytes(head[:end]))
        rest = head[end + 4 :]
        length = fields.get("content-length", "")
        if status is None or not length.isdigit() or "transfer-encoding" in fields \
                or fields.get("content-encoding", "identity") != "identity":
            return None
        size = int(length)
        if status != 200:  # an error answer: small, read whole
            body = bytes(rest)
            while len(body) < size and (piece := sock.recv(_STEP)):
                body += piece
            return status, fields, body[:size]
        buf = bytearray(size)
        got = min(len(rest), size)
        with memoryview(buf) as view:
            view[:got] = rest[:got]
            while got < size:
                n = sock.recv_into(view[got:], min(_STEP, size - got))
                if n == 0:
                    raise Short(got, size)
                got += n
        return status, fields, buf
    finally:
        sock.close()


def _parse_head(head: bytes) -> tuple[int | None, dict[str, Any]]:
    first, *rest = head.decode("latin-1").split("\r\n")
    parts = first.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        return None, {}
    fields: dict[str, Any] = {}
    for line in rest:
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return int(parts[1]), fields
