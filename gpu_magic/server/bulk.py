"""The bulk listener: large blobs sent to and from a port of their own, straight off and onto
the socket.

uvicorn hands a request body to the app in pieces of at most 64 KiB, each through the event loop:
about 1 GiB/s here, where loopback TCP carries 5 and a plain ``recv_into`` takes 3; and it sends
a file as chunks read into new memory, where ``sendfile`` lets the kernel copy the file's pages
to the socket (DESIGN: "the bulk blob path may use whatever serves bytes fastest"). This
listener takes only ``PUT`` and ``GET /v1/blobs/{digest}`` and answers as those routes do: the
same user's blobs, the same limits, the same digest check, the same store. Each connection is
one upload or download on a thread of its own.

The exchange, in order. No token is sent on this port: it may be reached through something
that is not the gateway (a port taken over after the gateway started again, a forwarder on
another address, a relay), and whatever is there must learn nothing it could use.

1. The client's first line (after TLS where the gateway speaks it) is ``GPU-MAGIC-BULK/1 NONCE
   ID``: 16 random bytes in hex, and the ``bulk.id`` of the gateway's health answer to its
   token. The listener answers ``gpu-magic-bulk/1 NONCE2 PROOF``: its own nonce, and the
   HMAC-SHA256 under that token's ``bulk.key`` (also from health) of both nonces and the address
   and port the connection reached, as the listener sees them, and for a loopback address the
   machine's boot id and network namespace (``_rawget.listener_proof``). The client checks the
   proof against the address it connected to, and its own machine: a relay or a forwarder
   (another address or port, or a loopback port of another machine: an ssh tunnel), or
   another user (another key), cannot give it, and the client goes to the main port instead.
   An id the listener does not know (from before it started again) is answered
   ``gpu-magic-bulk/1 unknown-id``.
2. The client sends an HTTP/1.1 request head with ``Content-Length``, ``Expect: 100-continue``
   and ``Authorization: GpuMagicBulk MAC``, the HMAC under the same key of both nonces, the
   path and the length. The listener checks everything the main port would before the body
   (that proof in place of the token, path, length, limits) and answers an error, or ``100
   Continue``.
3. The body; then the answer (``200`` with ``{"digest", "size", "mac"}``, the MAC of both
   nonces, the path and the length: only the listener could say it was stored), or the
   route's error, and the connection closes.

A download's step 2 is a ``GET`` head proved by the MAC of ``client-get``, both nonces and the
path (no length, no body); its answer is the blob (``200`` with its ``Content-Length``) or the
route's error, and the connection closes. The health answer's ``bulk.serves`` lists the
methods; a client that finds no ``GET`` there (a gateway from before downloads came here)
downloads through the main port.

Keys are derived from each token and a secret drawn at each start: a token taken back with
SIGHUP takes its key with it, and an old key says nothing to a gateway started again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from .._rawget import BULK_HELLO, BULK_PROOF, BULK_SCHEME, bulk_mac, here, listener_proof
from .api import foreign_page
from .auth import Authenticator, User
from .gateway import Gateway
from .limits import human
from .store import BlobError

log = logging.getLogger("gpu_magic.gateway")

HEAD_MAX = 32 << 10
IDLE_S = 30.0  # a connection that sends nothing for this long is closed
HEAD_S = 10.0  # the whole request head must come within this
HELLO_S = 3.0  # and the hello within this (a connection holds one of MAX_CONNECTIONS)
MAX_CONNECTIONS = 32
STEP = 8 << 20  # one receive: a buffer of this much per connection, reused
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
            413: "Content Too Large", 417: "Expectation Failed", 507: "Insufficient Storage"}


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Session:
    """One connection's exchange after its hello: whose key, and both nonces."""

    def __init__(self, user: User, key: bytes, theirs: str, ours: str) -> None:
        self.user, self.key, self.theirs, self.ours = user, key, theirs, ours


class _Gone(Exception):
    """The sender stopped, or went silent, in the middle of the body."""


class BulkListener:
    """Serves uploads and downloads on ``sock`` (bound and listening) until :meth:`close`."""

    def __init__(self, sock: socket.socket, gateway: Gateway, auth: Authenticator, *,
                 loopback_only: bool, ssl_context: ssl.SSLContext | None = None,
                 note_refusal: Callable[[dict[str, Any], str | None], None] | None = None,
                 ) -> None:
        self.sock, self.gateway, self.auth = sock, gateway, auth
        self.loopback_only, self.ssl_context = loopback_only, ssl_context
        self.note_refusal = note_refusal
        self._secret = secrets.token_bytes(32)  # (new at each start: old keys say nothing)
        self.port: int = sock.getsockname()[1]
        # (the loopback it is on: read where the socket was made, as the client reads its own)
        self.where = here()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._buffers: list[memoryview] = []  # (new memory costs page faults; reuse it)
        self._lock = threading.Lock()
        self._closed = False
        self._open: set[socket.socket] = set()  # the connections being served
        self._thread = threading.Thread(target=self._accept, name="gpu-magic-bulk", daemon=True)

    def _derived(self, what: bytes, token: str) -> bytes:
        return hmac.new(self._secret, what + b"\0" + token.encode(), hashlib.sha256).digest()

    def offer(self, token: str) -> dict[str, Any]:
        """For the authorized health answer to ``token``: where to send, the id to name, and
        the key both ends prove themselves with. Derived from the token: another user's key
        cannot stand in, and a token taken back (SIGHUP) takes its key with it."""
        return {"port": self.port, "id": self._derived(b"id", token)[:16].hex(),
                "key": self._derived(b"key", token).hex(), "serves": ["PUT", "GET"]}

    def _key_for(self, kid: str) -> tuple[User, bytes] | None:
        found = None
        for token, user in self.auth.pairs():
            if hmac.compare_digest(self._derived(b"id", token)[:16].hex(), kid):
                found = user, self._derived(b"key", token)
        return found

    def start(self) -> None:
        self._thread.start()

    def close(self, wait: float = 5.0) -> None:
        """Stop listening, and end the transfers under way (no upload's file is kept)."""
        self._closed = True
        for s in (self.sock, *self._open):
            try:
                # (wakes accept(), recv_into() and sends; the plain socket's own shutdown even
                # for TLS: SSLSocket.shutdown drops its TLS state first, and a thread sending
                # meanwhile would send plain bytes)
                socket.socket.shutdown(s, socket.SHUT_RDWR)
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
                conn.close()  # (the client reads no proof, and uses the main port)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn, addr), daemon=True,
                                 name="gpu-magic-bulk-transfer").start()
            except RuntimeError:  # (no thread to be had)
                conn.close()
                self._slots.release()

    def _buffer(self) -> memoryview:
        with self._lock:
            return self._buffers.pop() if self._buffers else memoryview(bytearray(STEP))

    def _give_back(self, buffer: memoryview) -> None:
        with self._lock:
            self._buffers.append(buffer)
            del self._buffers[4:]

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        self._open.add(conn)
        try:
            if self._closed:
                return
            conn.settimeout(IDLE_S)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                raw = conn  # (detached by the wrap: the TLS socket is the one to shut down)
                conn = self.ssl_context.wrap_socket(raw, server_side=True,
                                                    do_handshake_on_connect=False)
                self._open.add(conn)
                self._open.discard(raw)
                if self._closed:
                    return
                conn.do_handshake()
            session = self._hello(conn)
            if session is not None:
                self._one(conn, addr, session)
        except (OSError, _Gone):
            pass  # the client went away or stalled: nothing of an upload was kept
        except Exception:
            log.exception("the bulk transfer with %s failed", addr[0] if addr else "?")
        finally:
            self._open.discard(conn)
            try:
                conn.close()
            finally:
                self._slots.release()

    def _hello(self, conn: socket.socket) -> _Session | None:
        """Step 1 of the exchange: the proof, for a client that names an id of this gateway's
        (an id it does not know, from before it started again: said, so that the client asks
        its health anew)."""
        conn.settimeout(HELLO_S)
        deadline = time.monotonic() + HELLO_S
        line = b""
        while not line.endswith(b"\r\n"):
            if len(line) > 200 or time.monotonic() > deadline:
                return None
            piece = conn.recv(1)  # (one line, nothing past it)
            if not piece:
                return None
            line += piece
        parts = line.decode("latin-1").split()
        if (len(parts) != 3 or parts[0] != BULK_HELLO or len(parts[1]) != 32
                or not all(c in "0123456789abcdef" for c in parts[1])):
            return None
        found = self._key_for(parts[2])
        if found is None:
            conn.sendall(f"{BULK_PROOF} unknown-id\r\n".encode())
            return None
        at = conn.getsockname()
        session = _Session(*found, parts[1], secrets.token_hex(16))
        proof = listener_proof(session.key, session.theirs, session.ours, at[0], at[1],
                               self.where)
        conn.sendall(f"{BULK_PROOF} {session.ours} {proof}\r\n".encode())
        conn.settimeout(IDLE_S)
        return session

    def _one(self, conn: socket.socket, addr: Any, session: _Session) -> None:
        try:
            method, target, headers, rest = _read_head(conn)
            digest = self._check(method, target, headers, addr, session)
            if method == "GET":
                with self._opened(session.user, digest) as f:
                    self._send(conn, f)
                return
            size = self._check_put(headers, session, target, addr)
        except _Refused as r:
            _answer(conn, r.status, r.code, r.message)
            return
        user = session.user
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
            self._give_back(buffer)
        self.gateway.touch()
        _answer(conn, 200, None, {"digest": digest, "size": stored, "mac": bulk_mac(
            session.key, "stored", session.theirs, session.ours, target, size)})

    def _check(self, method: str, target: str, headers: dict[bytes, str],
               addr: Any, session: _Session) -> str:
        """Everything the main port's middleware and route check before a body is read or
        sent; in place of a token, the request's proof of the session's key. The digest."""
        if self.loopback_only and (refusal := foreign_page(headers)) is not None:
            raise _Refused(403, *refusal)
        path = target.split("?", 1)[0]
        if not path.startswith("/v1/blobs/"):
            raise _Refused(404, "not_found", f"the bulk port serves only PUT and GET "
                                             f"/v1/blobs/{{digest}}, not {path!r}; everything "
                                             "else is on the main port")
        if method not in ("PUT", "GET"):
            raise _Refused(405, "method_not_allowed",
                           f"{method} is not allowed on the bulk port; use PUT or GET")
        digest = path.removeprefix("/v1/blobs/")
        try:
            self.gateway.blobs.path(session.user.name, digest)  # (a digest it cannot be)
        except BlobError as exc:
            raise _Refused(exc.status, "blob", exc.message) from None
        if method == "GET":
            # (a GET's proof is not a PUT's: the label differs, and it names no length)
            expected = bulk_mac(session.key, "client-get", session.theirs, session.ours, target)
            self._proved(headers, expected, addr, method, target)
            if headers.get(b"content-length", "0") != "0" or b"transfer-encoding" in headers:
                raise _Refused(400, "bad_request", "a GET on the bulk port carries no body")
        return digest

    def _proved(self, headers: dict[bytes, str], expected: str, addr: Any, method: str,
                target: str) -> None:
        scheme, _, proof = headers.get(b"authorization", "").partition(" ")
        if scheme != BULK_SCHEME or not hmac.compare_digest(proof.strip().encode(),
                                                            expected.encode()):
            if self.note_refusal is not None:
                self.note_refusal({"client": addr, "method": method, "path": target},
                                  headers.get(b"authorization"))
            raise _Refused(401, "unauthorized", f"no proof of this connection's key: send "
                                                f"'Authorization: {BULK_SCHEME} MAC' (server/"
                                                "bulk.py says how), or use the main port")

    def _opened(self, user: User, digest: str) -> Any:
        try:
            return self.gateway.blobs.reader(user.name, digest)
        except FileNotFoundError:
            raise _Refused(404, "no_such_blob",
                           f"this gateway holds no blob {digest} of yours") from None

    def _send(self, conn: socket.socket, f: Any) -> None:
        """The blob open as ``f``: with sendfile (the kernel passes the file's pages to the
        socket), or through a reused buffer for TLS (SSLSocket.sendfile would send 8 KiB at a
        time, slower than the main port)."""
        size = os.fstat(f.fileno()).st_size
        conn.sendall(("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                      f"Content-Length: {size}\r\nConnection: close\r\n\r\n").encode())
        self.gateway.touch()
        if not isinstance(conn, ssl.SSLSocket):
            conn.sendfile(f, 0, size)
        else:
            buffer, left = self._buffer(), size
            try:
                while left > 0 and (n := f.readinto(buffer[: min(len(buffer), left)])):
                    conn.sendall(buffer[:n])
                    left -= n
            finally:
                self._give_back(buffer)
        self.gateway.touch()

    def _check_put(self, headers: dict[bytes, str], session: _Session, target: str,
                   addr: Any) -> int:
        """What the main port's PUT checks of the request before its body: the size."""
        if "transfer-encoding" in {k.decode("latin-1").lower() for k in headers}:
            raise _Refused(411, "length_required", "send the blob with a Content-Length, "
                                                   "not chunked")
        length = headers.get(b"content-length", "")
        if not (length.isascii() and length.isdigit() and len(length) < 20):
            raise _Refused(411, "length_required", f"a Content-Length is needed, got {length!r}")
        if headers.get(b"expect", "").lower() != "100-continue":
            raise _Refused(417, "expectation_failed",
                           "send 'Expect: 100-continue' and wait for it before the body")
        size = int(length)
        self._proved(headers, bulk_mac(session.key, "client", session.theirs, session.ours,
                                       target, size), addr, "PUT", target)
        cap = self.gateway.limits_for(session.user).max_blob_bytes
        if size > cap:
            raise _Refused(413, "too_large", f"the blob is {human(size)}; this gateway takes at "
                                             f"most {human(cap)} per blob (--max-blob-bytes)")
        return size


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
