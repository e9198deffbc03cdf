"""Large downloads read straight from the socket into their final buffer.

httpx reads a response 64 KiB at a time and hands each piece over as a new bytes object: 256 MiB
took 0.3-0.4 s here from a gateway that sends it in 0.1 s. This module speaks just enough
HTTP/1.1 for one ``GET`` of a body with a ``Content-Length`` and ``recv_into`` the buffer the
result will live in. Anything else (a redirect, a chunked body, a proxy in the way) is left to
httpx: :func:`get_into` then answers None before it has read any of the body.

:class:`Exchange` does the same for each cell's one request, the submit answered by the job's
event stream, on a connection it keeps.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import hmac
import ipaddress
import json
import mmap
import os
import socket
import ssl
import threading
import urllib.request
from collections.abc import Generator, Iterator
from typing import Any

import httpx

from ._reserve import MADV_POPULATE_WRITE as _MADV_POPULATE_WRITE
from ._reserve import join_all
from ._reserve import madvise as _madvise
from ._version import __version__

_HEAD_MAX = 64 << 10
_STEP = 8 << 20
_MAPPED_MIN = 1 << 20


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
             ) -> tuple[int, dict[str, str], bytes | bytearray | mmap.mmap] | None:
    """GET ``url``: (status, headers, body), where a 200 body is one writable buffer
    (:func:`new_buffer`) received in place. None if the answer is not one this reader
    handles (nothing of it used)."""
    sock = _connect(url, timeout, connect_timeout or timeout, context)
    try:
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
        if status != 200:  # an error answer: small, read whole
            return status, fields, _small_body(sock, fields, rest)[: int(length)]
        return status, fields, _receive(sock, rest, int(length))
    finally:
        sock.close()


BULK_HELLO = "GPU-MAGIC-BULK/1"  # a client's first line to the gateway's bulk listener
BULK_PROOF = "gpu-magic-bulk/1"  # the listener's answer
BULK_SCHEME = "GpuMagicBulk"  # the request's proof, in place of a token


def bulk_mac(key: bytes, *parts: str | bytes | int) -> str:
    """An HMAC-SHA256 under ``key`` of ``parts``, each said apart (see server/bulk.py)."""
    data = b"\0".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def plain_address(host: str) -> str:
    """An IP address as the other end of a connection names it (IPv4 for a mapped one)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def listener_proof(key: bytes, ours: str, theirs: str, host: str, port: int,
                   where: str) -> str:
    """What the bulk listener proves in its hello: both nonces, and the address and port the
    connection reached as the listener sees them (a forwarder or relay at another address or
    port cannot pass it on). For a loopback address, also ``where`` (:func:`here`): a
    loopback port on one host forwarded to a loopback port on another (an ssh tunnel, a relay
    run by someone else on the client's host) keeps address and port the same, and must not
    pass either."""
    host = plain_address(host)
    parts: list[str | int] = ["listener", ours, theirs, host, port]
    with contextlib.suppress(ValueError):  # (not an IP address: no loopback either)
        if ipaddress.ip_address(host).is_loopback:
            parts.append(where)
    return bulk_mac(key, *parts)


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def here() -> str:
    """Which loopback a socket made now, on this thread, is on: the machine's boot id and
    this thread's network namespace (read each time: a process or thread may change its
    namespace). Where neither can be read, a value of this process alone: its loopback port
    is then never taken for the gateway's (uploads and downloads use the main port)."""
    net = ""
    for path in ("/proc/thread-self/ns/net", "/proc/self/ns/net"):
        with contextlib.suppress(OSError):
            net = os.readlink(path)
            break
    if not _boot_id() and not net:
        return f"unknown {os.getpid()} {id(_boot_id)}"
    return f"{_boot_id()} {net}"


class Unusable(Exception):
    """The bulk port did not take the upload: not reached, not the gateway's, busy, or broken
    before its answer. ``lasting``: trying it again for the next upload would fail the same
    way. Nothing was stored; the upload goes the usual way."""

    def __init__(self, why: str, lasting: bool) -> None:
        super().__init__(why)
        self.lasting = lasting


def _bulk_open(url: httpx.URL, port: int, kid: str, secret: bytes, *,
               connect_timeout: float, context: ssl.SSLContext,
               ) -> tuple[socket.socket, str, str]:
    """A connection to the bulk port past its hello: (socket, our nonce, its nonce), once the
    listener has proved it holds ``secret`` for the address this connection reached."""
    where = here()  # (before the socket, on its thread: the loopback it will be on)
    try:
        sock = _open(url.host, port, min(connect_timeout, 2.0))
    except OSError as exc:
        raise Unusable(f"cannot connect to port {port}: {exc}", lasting=True) from None
    try:
        sock.settimeout(min(connect_timeout, 2.0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reached = sock.getpeername()
        if url.scheme == "https":
            sock = context.wrap_socket(sock, server_side=False, server_hostname=url.host)
        nonce = os.urandom(16).hex()
        sock.sendall(f"{BULK_HELLO} {nonce} {kid}\r\n".encode())
        said = b""
        try:
            while not said.endswith(b"\r\n") and len(said) < 256:
                piece = sock.recv(1)  # (one line, nothing past it)
                if not piece:
                    break
                said += piece
        except TimeoutError:  # (a listener answers at once: this is something else)
            raise Unusable(f"port {port} said nothing", lasting=True) from None
        if not said:  # (closed at once: it was busy)
            raise Unusable(f"port {port} closed the connection", lasting=False)
        words = said.decode("latin-1").split()
        theirs = words[1] if len(words) == 3 and words[0] == BULK_PROOF else ""
        expected = listener_proof(secret, nonce, theirs, reached[0], reached[1], where)
        if not theirs or not hmac.compare_digest(words[2].encode(), expected.encode()):
            raise Unusable(f"port {port} is not the gateway's bulk listener for this address "
                           f"and key (it said {said[:40].decode('latin-1')!r})", lasting=True)
    except OSError as exc:  # (a TLS handshake that fails, too: a busy listener closes at once)
        sock.close()
        raise Unusable(f"the exchange with port {port} broke: {exc}", lasting=False) from None
    except BaseException:
        sock.close()
        raise
    return sock, nonce, theirs


def _bulk_head(method: str, url: httpx.URL, target: str, proof: str, *extra: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {url.netloc.decode('ascii')}",
             f"User-Agent: gpu-magic/{__version__}", *extra, "Connection: close",
             f"Authorization: {BULK_SCHEME} {proof}", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _small_body(sock: socket.socket, fields: dict[str, str], rest: bytes) -> bytes:
    length = fields.get("content-length", "")
    body = bytes(rest)
    while length.isdigit() and len(body) < int(length) and (piece := sock.recv(_HEAD_MAX)):
        body += piece
    return body


def put_bulk(url: httpx.URL, port: int, kid: str, key: str, target: str,
             view: memoryview, *, timeout: float, connect_timeout: float,
             context: ssl.SSLContext) -> tuple[int, dict[str, str], bytes]:
    """PUT ``view`` (bytes) as ``target`` on the bulk port of the gateway at ``url``: (status,
    headers, body) of its answer. No token is sent there: the listener proves it holds
    ``key`` (the key the gateway's health gave with the id ``kid``) for the address this
    connection reached, the request proves it too, and so does a 200 answer."""
    secret = bytes.fromhex(key)
    sock, nonce, theirs = _bulk_open(url, port, kid, secret, connect_timeout=connect_timeout,
                                     context=context)
    try:
        sock.settimeout(timeout)
        proof = bulk_mac(secret, "client", nonce, theirs, target, view.nbytes)
        sock.sendall(_bulk_head("PUT", url, target, proof, f"Content-Length: {view.nbytes}",
                                "Expect: 100-continue"))
        status, fields, rest = _read_answer_head(sock, b"")
        if status == 100:
            for i in range(0, view.nbytes, _STEP):
                sock.sendall(view[i : i + _STEP])
            status, fields, rest = _read_answer_head(sock, rest)
        body = _small_body(sock, fields, rest)
    except OSError as exc:
        raise Unusable(f"the upload to port {port} broke: {exc}", lasting=False) from None
    finally:
        sock.close()
    if status == 200:
        try:
            stored = json.loads(body).get("mac", "")
        except (ValueError, AttributeError):
            stored = ""
        if not hmac.compare_digest(str(stored).encode(), bulk_mac(
                secret, "stored", nonce, theirs, target, view.nbytes).encode()):
            raise Unusable(f"port {port} said the upload was stored, unproven", lasting=True)
    return status, fields, body


def get_bulk(url: httpx.URL, port: int, kid: str, key: str, target: str, *,
             timeout: float, connect_timeout: float, context: ssl.SSLContext,
             ) -> tuple[int, dict[str, str], bytes | bytearray | mmap.mmap]:
    """GET ``target`` from the bulk port, proved as :func:`put_bulk` does: (status, headers,
    body), a 200 body received in place into one buffer (:func:`new_buffer`). Raises
    :class:`Unusable` before any of the body has come (fall back to the main port), and
    :class:`Short` or OSError if the body broke off."""
    secret = bytes.fromhex(key)
    sock, nonce, theirs = _bulk_open(url, port, kid, secret, connect_timeout=connect_timeout,
                                     context=context)
    try:
        sock.settimeout(timeout)
        try:
            sock.sendall(_bulk_head("GET", url, target, bulk_mac(
                secret, "client-get", nonce, theirs, target), "Accept-Encoding: identity"))
            status, fields, rest = _read_answer_head(sock, b"")
        except OSError as exc:
            raise Unusable(f"the download from port {port} broke: {exc}", lasting=False) from None
        length = fields.get("content-length", "")
        if status != 200 or not length.isdigit() or "transfer-encoding" in fields:
            return status, fields, _small_body(sock, fields, rest)
        return status, fields, _receive(sock, rest, int(length))
    finally:
        sock.close()


def _read_answer_head(sock: socket.socket, got: bytes) -> tuple[int, dict[str, str], bytes]:
    head = bytearray(got)
    while (end := head.find(b"\r\n\r\n")) < 0:
        piece = sock.recv(_HEAD_MAX)
        if not piece or len(head) > _HEAD_MAX:
            raise OSError("the answer's head did not come whole")
        head += piece
    status, fields = _parse_head(bytes(head[:end]))
    if status is None:
        raise OSError(f"not an HTTP answer: {bytes(head[:40])!r}")
    return status, fields, bytes(head[end + 4 :])


def _receive(sock: socket.socket, rest: bytes | bytearray, size: int) -> bytearray | mmap.mmap:
    """A body of ``size`` bytes, ``rest`` its start, received in place into a new buffer."""
    buf = new_buffer(size)
    got = min(len(rest), size)
    with prefaulted(buf), memoryview(buf) as view:
        view[:got] = rest[:got]
        while got < size:
            n = sock.recv_into(view[got:], min(_STEP, size - got))
            if n == 0:
                raise Short(got, size)
            got += n
    return buf


@contextlib.contextmanager
def prefaulted(buf: bytearray | mmap.mmap) -> Iterator[None]:
    """While the block runs, a new mapping's pages are faulted in on another thread, from its
    start on (MADV_POPULATE_WRITE, Linux 5.14+; elsewhere nothing is done). A receive into
    new memory spends half its time on page faults here (256 MiB: 0.22 s, 0.11 s with this):
    the other core takes them, ahead of the bytes. The thread has stopped when this ends."""
    madvise = _madvise() if isinstance(buf, mmap.mmap) and len(buf) >= _PREFAULT_MIN else None
    if madvise is None:
        yield
        return
    size = len(buf)
    anchor = ctypes.c_char.from_buffer(buf)
    start = ctypes.addressof(anchor)
    del anchor  # (an export would keep the mapping from being closed)
    stop = threading.Event()

    def populate(mapping: mmap.mmap = buf) -> None:
        # (``mapping`` keeps the memory mapped while this runs: a second Ctrl-C may cut the
        # join below short, and the buffer would otherwise be collected under this thread)
        for off in range(0, size, _PREFAULT_STEP):
            if stop.is_set() or madvise(start + off, min(_PREFAULT_STEP, size - off),
                                        _MADV_POPULATE_WRITE) != 0:
                return  # (an older kernel says EINVAL at once: the receive faults its own)

    thread = threading.Thread(target=populate, name="gpu-magic-prefault", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        join_all([thread])  # (never left running over memory that may be unmapped next)


_PREFAULT_MIN = 4 << 20
_PREFAULT_STEP = 16 << 20


def new_buffer(size: int) -> bytearray | mmap.mmap:
    """Writable memory for a body of ``size`` bytes. A large one is a private anonymous
    mapping: its pages come zeroed from the kernel as they are written, where a bytearray
    first writes zeros over all of them (256 MiB: 0.1 s before any byte has arrived)."""
    if size < _MAPPED_MIN or not hasattr(mmap, "MAP_PRIVATE"):
        return bytearray(size)
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _connect(url: httpx.URL, timeout: float, connect_timeout: float,
             context: ssl.SSLContext) -> socket.socket:
    """A connection to ``url``'s host, as httpx would make it (TLS for https)."""
    port = url.port or (443 if url.scheme == "https" else 80)
    sock = _open(url.host, port, connect_timeout)
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if url.scheme == "https":
            sock = context.wrap_socket(sock, server_hostname=url.host)
    except BaseException:
        sock.close()
        raise
    return sock


def _open(host: str, port: int, timeout: float) -> socket.socket:
    """socket.create_connection, but closing its socket on any exception: a Ctrl-C during
    the connect left one open (create_connection closes it on OSError only)."""
    error: OSError | None = None
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = None
        try:
            sock = socket.socket(family, kind, proto)
            sock.settimeout(timeout)
            sock.connect(addr)
            return sock
        except OSError as exc:
            if sock is not None:
                sock.close()
            error = exc
        except BaseException:
            if sock is not None:
                sock.close()
            raise
    raise error or OSError(f"cannot find an address for {host}")


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


class Exchange:
    """One kept-alive HTTP/1.1 connection for a cell's one request: the submit, answered by
    the job's event stream. httpx spent more on that exchange (request building, h11's checks,
    headers and body in two writes, a chunk decoder per event) than the gateway spends on the
    whole trivial job. Failures are raised as the httpx exceptions the caller already handles,
    so a connection the gateway had closed is retried and an error answer reads the same.

    Not thread-safe: one per client, and a client serves one thread at a time.
    """

    def __init__(self, url: httpx.URL, headers: dict[str, str], *, timeout: float,
                 connect_timeout: float, context: ssl.SSLContext) -> None:
        self.url, self.headers = url, headers
        self.timeout, self.connect_timeout, self.context = timeout, connect_timeout, context
        self._sock: socket.socket | None = None
        self._pid = 0
        self._buf = bytearray()
        self._closed = False

    def close(self) -> None:
        """For good: a submit after this is refused, never sent on a new connection (an
        interrupted submit's reader retries, and must not send the job again)."""
        self._closed = True
        self.drop()

    def drop(self) -> None:
        """Drop the connection; the next request opens a new one."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._pid == os.getpid():  # (in a forked child it is the parent's connection too)
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in another thread
            except OSError:
                pass
        sock.close()

    def listen(self, silence: float) -> None:
        """From now until the next request: a read that waits ``silence`` seconds fails (an
        event stream with heartbeats; the request itself may take the server longer)."""
        if self._sock is not None:
            self._sock.settimeout(silence)

    def post(self, target: str, body: bytes,
             ) -> tuple[int, dict[str, str], Generator[bytes, None, None]]:
        """POST ``body`` (JSON): the status, the headers and the body's pieces as they come.
        The connection is kept for the next request once the body has been read to its end."""
        if self._closed:
            raise RuntimeError("cannot send a request: the client has been closed")
        if self._sock is None or self._pid != os.getpid():
            self._connect()
        assert self._sock is not None
        self._sock.settimeout(self.timeout)  # (a stream before may have listened for less)
        u = self.url
        lines = [f"POST {target} HTTP/1.1", f"Host: {u.netloc.decode('ascii')}",
                 f"User-Agent: gpu-magic/{__version__}", "Accept-Encoding: identity",
                 "Content-Type: application/json", f"Content-Length: {len(body)}",
                 *(f"{k}: {v}" for k, v in self.headers.items()), "", ""]
        try:
            try:
                self._sock.sendall("\r\n".join(lines).encode("latin-1") + body)  # one write
            except TimeoutError as exc:
                raise httpx.WriteTimeout(str(exc)) from None
            except OSError as exc:  # a kept connection the gateway had closed, among others
                raise httpx.WriteError(str(exc)) from None
            status, fields = self._head()
        except BaseException:
            self.drop()
            raise
        if "chunked" in fields.get("transfer-encoding", ""):
            pieces = self._chunked()
        elif fields.get("content-length", "").isdigit():
            pieces = self._sized(int(fields["content-length"]))
        else:
            pieces = self._to_end()
        return status, fields, self._kept(pieces, fields.get("connection", "") != "close")

    def _connect(self) -> None:
        self.drop()
        try:
            sock = _connect(self.url, self.timeout, self.connect_timeout, self.context)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc)) from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from None
        self._sock, self._pid, self._buf = sock, os.getpid(), bytearray()

    def _recv(self) -> bytes:
        sock = self._sock
        if sock is None:  # closed under us (an interrupted follow)
            raise httpx.ReadError("the connection was closed")
        try:
            piece = sock.recv(_STEP)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc)) from None
        except OSError as exc:
            raise httpx.ReadError(str(exc)) from None
        if not piece:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response."
                                            if not self._buf else "the answer was cut short")
        return piece

    def _head(self) -> tuple[int, dict[str, str]]:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > _HEAD_MAX:
                raise httpx.RemoteProtocolError("the answer's head is too long")
            self._buf += self._recv()
        status, fields = _parse_head(bytes(self._buf[:end]))
        del self._buf[: end + 4]
        if status is None:
            raise httpx.RemoteProtocolError("the answer is not HTTP/1.1")
        return status, fields

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            self._buf += self._recv()
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return line

    def _exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += self._recv()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _chunked(self) -> Iterator[bytes]:
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                return
            data = self._exact(size + 2)
            yield data[:-2]

    def _sized(self, size: int) -> Iterator[bytes]:
        if size:
            yield self._exact(size)

    def _to_end(self) -> Iterator[bytes]:
        if self._buf:
            yield bytes(self._buf)
            self._buf.clear()
        while True:
            try:
                yield self._recv()
            except httpx.RemoteProtocolError:
                return

    def _kept(self, pieces: Iterator[bytes], keep: bool) -> Generator[bytes, None, None]:
        """The body's pieces; the connection is kept only if the body was read to its end."""
        finished = False
        try:
            yield from pieces
            finished = keep and not self._buf
        finally:
            if not finished:
                self.drop()
