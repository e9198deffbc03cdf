"""The bulk upload listener: large blobs sent to a port of their own, read straight off the socket.

uvicorn hands a request body to the app in pieces of at most 64 KiB, each through the event loop:
about 1 GiB/s here, where loopback TCP carries 5 and a plain ``recv_into`` takes 3 (DESIGN: "the
bulk blob path may use whatever serves bytes fastest"). This listener takes only
``PUT /v1/blobs/{digest}`` and answers as that route does: the same token, the same limits, the
same digest check, the same store. Each connection is one upload on a thread of its own.

The exchange, in order:

1. On connecting (after TLS where the gateway speaks it) the listener writes one line,
   ``gpu-magic-bulk/1 ID``, where ID is the random ``bulk.id`` of the gateway's authorized
   health answer. A client sends its token only after reading that line: a connection that
   reached something else (another service on a proxy's host) gets nothing.
2. The client sends an HTTP/1.1 request head with ``Content-Length`` and ``Expect:
   100-continue``. The listener checks everything it can before the body (token, path, length,
   limits) and answers an error, or ``100 Continue``.
3. The body; then the answer (``200`` with ``{"digest", "size"}``, or the route's error) and
   the connection closes.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from .._rawget import BULK_GREETING as GREETING
from .api import foreign_page
from .auth import Authenticator, User
from .gateway import Gateway
from .limits import human
from .store import BlobError

log = logging.getLogger("gpu_magic.gateway")

HEAD_MAX = 32 << 10
IDLE_S = 30.0  # a connection that sends nothing for this long is closed
HEAD_S = 10.0  # the whole request head must come within this
MAX_CONNECTIONS = 32
STEP = 8 << 20  # one receive: a buffer of this much per connection, reused
_REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 413: "Content Too Large", 417: "Expectation Failed",
            503: "Service Unavailable", 507: "Insufficient Storage"}


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Gone(Exception):
    """The sender stopped, or went silent, in the middle of the body."""


class BulkListener:
    """Serves uploads on ``sock`` (bound and listening) until :meth:`close`."""

    def __init__(self, sock: socket.socket, gateway: Gateway, auth: Authenticator, *,
                 loopback_only: bool, ssl_context: ssl.SSLContext | None = None,
                 note_refusal: Callable[[dict[str, Any], str | None], None] | None = None,
                 ) -> None:
        self.sock, self.gateway, self.auth = sock, gateway, auth
        self.loopback_only, self.ssl_context = loopback_only, ssl_context
        self.note_refusal = note_refusal
        self.id = secrets.token_hex(16)
        self.port: int = sock.getsockname()[1]
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._buffers: list[memoryview] = []  # (new memory costs page faults; reuse it)
        self._lock = threading.Lock()
        self._closed = False
        self._open: set[socket.socket] = set()  # the connections being served
        self._thread = threading.Thread(target=self._accept, name="gpu-magic-bulk", daemon=True)

    def describe(self) -> dict[str, Any]:
        """For the authorized health answer: where to send, and what the listener will say."""
        return {"port": self.port, "id": self.id}

    def start(self) -> None:
        self._thread.start()

    def close(self, wait: float = 5.0) -> None:
        """Stop listening, and end the uploads under way (their files are removed)."""
        self._closed = True
        for s in (self.sock, *self._open):
            try:
                s.shutdown(socket.SHUT_RDWR)  # (wakes accept() and recv_into())
            except OSError:
                pass
        self.sock.close()
        self._thread.join(timeout=wait)
        deadline = time.monotonic() + wait
        while self._open and time.monotonic() < deadline:
            time.sleep(0.01)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)  # (out of descriptors: do not spin)
                continue
            if not self._slots.acquire(blocking=False):
                _answer(conn, 503, "busy", f"the gateway takes at most {MAX_CONNECTIONS} "
                        "bulk uploads at once; the client sends over the main port instead")
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, addr), daemon=True,
                             name="gpu-magic-bulk-upload").start()

    def _buffer(self) -> memoryview:
        with self._lock:
            return self._buffers.pop() if self._buffers else memoryview(bytearray(STEP))

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        self._open.add(conn)
        try:
            if self._closed:
                return
            conn.settimeout(IDLE_S)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                raw = conn  # (detached by the wrap: the TLS socket is the one to shut down)
                conn = self.ssl_context.wrap_socket(raw, server_side=True)
                self._open.add(conn)
                self._open.discard(raw)
            conn.sendall(f"{GREETING} {self.id}\r\n".encode())
            self._one(conn, addr)
        except (OSError, _Gone):
            pass  # the client went away or stalled: nothing of its upload was kept
        except Exception:
            log.exception("the bulk upload from %s failed", addr[0] if addr else "?")
        finally:
            self._open.discard(conn)
            try:
                conn.close()
            finally:
                self._slots.release()

    def _one(self, conn: socket.socket, addr: Any) -> None:
        try:
            method, target, headers, rest = _read_head(conn)
            user, digest, size = self._check(method, target, headers, addr)
        except _Refused as r:
            _answer(conn, r.status, r.code, r.message)
            return
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.gateway.touch()
        got = len(rest)

        def read_into(view: memoryview) -> int:
            nonlocal rest, got
            if rest:  # what came with the head
                n = min(len(rest), len(view))
                view[:n], rest = rest[:n], rest[n:]
                return n
            try:
                n = conn.recv_into(view)
            except OSError as exc:
                raise _Gone() from exc
            if n == 0:
                raise _Gone()
            got += n
            return n

        buffer = self._buffer()
        try:
            stored = self.gateway.blobs.put_from(
                user.name, digest, size, read_into, buffer,
                max_bytes=self.gateway.limits_for(user).max_blob_bytes)
        except BlobError as exc:
            # read what is left of the body first: closing on unread bytes resets the
            # connection, and the client would never read why
            left = size - got
            while left > 0 and (n := conn.recv_into(buffer[: min(len(buffer), left)])):
                left -= n
            _answer(conn, exc.status, "blob", exc.message)
            return
        finally:
            with self._lock:
                self._buffers.append(buffer)
                del self._buffers[4:]
        self.gateway.touch()
        _answer(conn, 200, None, {"digest": digest, "size": stored})

    def _check(self, method: str, target: str, headers: dict[bytes, str],
               addr: Any) -> tuple[User, str, int]:
        """Everything the main port's middleware and route check before a body is read."""
        if self.loopback_only and (refusal := foreign_page(headers)) is not None:
            raise _Refused(403, *refusal)
        found = self.auth.user_for(headers.get(b"authorization"))
        if found is None:
            if self.note_refusal is not None:
                self.note_refusal({"client": addr, "method": method, "path": target},
                                  headers.get(b"authorization"))
            raise _Refused(401, "unauthorized", "missing or wrong token: send 'Authorization: "
                                                "Bearer TOKEN' (GPU_MAGIC_TOKEN on the client side)")
        path = target.split("?", 1)[0]
        if not path.startswith("/v1/blobs/"):
            raise _Refused(404, "not_found", f"the bulk port serves only PUT /v1/blobs/{{digest}}, "
                                             f"not {path!r}; everything else is on the main port")
        if method != "PUT":
            raise _Refused(405, "method_not_allowed",
                           f"{method} is not allowed on the bulk port; use PUT")
        digest = path.removeprefix("/v1/blobs/")
        try:
            self.gateway.blobs.path(found.name, digest)  # (a digest it cannot be, refused)
        except BlobError as exc:
            raise _Refused(exc.status, "blob", exc.message) from None
        if "transfer-encoding" in {k.decode("latin-1").lower() for k in headers}:
            raise _Refused(411, "length_required", "send the blob with a Content-Length, "
                                                   "not chunked")
        length = headers.get(b"content-length", "")
        if not length.isdigit():
            raise _Refused(411, "length_required", f"a Content-Length is needed, got {length!r}")
        if headers.get(b"expect", "").lower() != "100-continue":
            raise _Refused(417, "expectation_failed",
                           "send 'Expect: 100-continue' and wait for it before the body")
        size = int(length)
        cap = self.gateway.limits_for(found).max_blob_bytes
        if size > cap:
            raise _Refused(413, "too_large", f"the blob is {human(size)}; this gateway takes at "
                                             f"most {human(cap)} per blob (--max-blob-bytes)")
        return found, digest, size


def _read_head(conn: socket.socket) -> tuple[str, str, dict[bytes, str], bytes]:
    """The request line, the headers (names lowercase) and what came after them."""
    deadline = time.monotonic() + HEAD_S
    head = bytearray()
    while (end := head.find(b"\r\n\r\n")) < 0:
        if len(head) > HEAD_MAX:
            raise _Refused(400, "bad_request", f"the request head is over {HEAD_MAX} bytes")
        if time.monotonic() > deadline:
            raise _Gone()
        piece = conn.recv(HEAD_MAX)
        if not piece:
            raise _Gone()
        head += piece
    first, *lines = bytes(head[:end]).decode("latin-1").split("\r\n")
    parts = first.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Refused(400, "bad_request", f"not an HTTP/1.1 request line: {first[:80]!r}")
    headers: dict[bytes, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if not sep or not key or key != key.strip():
            raise _Refused(400, "bad_request", f"not a header line: {line[:80]!r}")
        headers[key.lower().encode("latin-1")] = value.strip()
    return parts[0], parts[1], headers, bytes(head[end + 4 :])


def _answer(conn: socket.socket, status: int, code: str | None, message: Any) -> None:
    body = json.dumps(message if code is None else {"error": code, "message": message}).encode()
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
             "Content-Type: application/json", f"Content-Length: {len(body)}",
             "Connection: close"]
    if status == 401:
        lines.append("WWW-Authenticate: Bearer")
    try:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    except OSError:
        pass
