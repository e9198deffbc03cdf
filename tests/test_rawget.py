"""Downloads read straight from the socket: exact bytes, the gateway's own errors, a cut
connection reported as such, and httpx taking over where the plain reader cannot go."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from gpu_magic import _rawget
from gpu_magic._client import GatewayClient
from gpu_magic._errors import AuthError, GatewayError
from gpu_magic._payload import digest

from .conftest import Gateway
from .test_bulk import recorded
from .test_reliability import CuttingProxy


def _stored(c: GatewayClient, size: int) -> tuple[str, bytes]:
    data = secrets.token_bytes(size)
    d = digest(data)
    c.upload(d, memoryview(data))
    return d, data


@pytest.fixture
def no_httpx_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads must take the plain reader: httpx's streaming is not there to fall back on."""
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the download went through httpx")

    monkeypatch.setattr(httpx.Client, "stream", refuse)


@pytest.mark.usefixtures("no_httpx_streams")
def test_a_download_comes_back_exact_and_writable(gateway: Gateway) -> None:
    with GatewayClient(gateway.url, gateway.token, same_host=False) as c:
        for size in (1, 70_000, 9 << 20):  # within the first read, just past it, many reads
            d, data = _stored(c, size)
            got = c.download(d)
            assert bytes(got) == data
            memoryview(got)[0] = 0  # writable: arrays rebuilt on it may be written


@pytest.mark.usefixtures("no_httpx_streams")
def test_download_errors_are_the_gateways_own(gateway: Gateway) -> None:
    with GatewayClient(gateway.url, gateway.token, same_host=False) as c:
        missing = digest(secrets.token_bytes(32))
        with pytest.raises(GatewayError, match="holds no blob") as err:
            c.download(missing)
        assert err.value.status == 404
        d, _ = _stored(c, 1000)
    with GatewayClient(gateway.url, "x" * 30, same_host=False) as wrong:
        with pytest.raises(AuthError, match="refused our token"):
            wrong.download(d)


def test_a_cut_download_is_an_error_not_a_short_result(gateway: Gateway) -> None:
    host, port = gateway.url.rsplit("//", 1)[1].split(":")
    with GatewayClient(gateway.url, gateway.token, same_host=False) as c:
        d, _ = _stored(c, 4 << 20)
    proxy = CuttingProxy((host, int(port)), budget=1 << 20)
    try:
        with GatewayClient(f"http://127.0.0.1:{proxy.port}", gateway.token,
                           same_host=False) as c:
            with pytest.raises(GatewayError, match=r"arrived short \(\d+ of 4194304 bytes\)"):
                c.download(d)
    finally:
        proxy.close()


def _serve(handle: Callable[[socket.socket], None]) -> socket.socket:
    """A loopback server handing each connection to ``handle`` on a thread of its own."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv


@pytest.fixture
def chunked_server() -> Iterator[tuple[str, bytes]]:
    """A server that answers every GET with a chunked body (no length): the plain reader must
    leave it to httpx."""
    body = secrets.token_bytes(100_000)

    def answer(conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n"
                         + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")

    srv = _serve(answer)
    yield f"http://127.0.0.1:{srv.getsockname()[1]}", body
    srv.close()


def test_answers_the_plain_reader_cannot_read_go_to_httpx(chunked_server: tuple[str, bytes]) -> None:
    url, body = chunked_server
    blob = digest(body)
    assert _rawget.get_into(httpx.URL(f"{url}/v1/blobs/{blob}"), {}, timeout=5,
                            context=None) is None  # type: ignore[arg-type]
    with GatewayClient(url, "t" * 30, same_host=False) as c:
        assert bytes(c.download(blob)) == body


def test_a_configured_proxy_is_left_to_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    url = httpx.URL("http://gpu-box.example:8765/v1/blobs/x")
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert _rawget.usable(url)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert not _rawget.usable(url)
    monkeypatch.setenv("NO_PROXY", "gpu-box.example")
    assert _rawget.usable(url)


# --- the submit-and-follow exchange on a kept-alive socket ---


def _time_waits(port: int) -> int:
    import psutil

    return sum(1 for c in psutil.net_connections("tcp")
               if c.status == psutil.CONN_TIME_WAIT and c.raddr and c.raddr.port == port)


def test_cells_share_one_kept_connection(gateway: Gateway) -> None:
    import gpu_magic

    port = httpx.URL(gateway.url).port
    with GatewayClient(gateway.url, gateway.token, same_host=False) as c:
        ns: dict[str, object] = {}
        gpu_magic.run("x = 1", "H100", ns, client=c, quiet=True)
        before = _time_waits(port)
        for i in range(8):
            assert gpu_magic.run(f"x = {i} * 2\nx", "H100", ns, client=c, quiet=True) == i * 2
        # a connection opened and closed per cell would leave one TIME_WAIT socket per cell
        assert _time_waits(port) - before < 4


def test_events_arrive_whole_however_the_bytes_are_split(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import gpu_magic

    monkeypatch.setattr(_rawget, "_STEP", 7)  # every read a few bytes: heads, chunks, events cut
    with GatewayClient(gateway.url, gateway.token, same_host=False) as c:
        ns: dict[str, object] = {}
        got = gpu_magic.run("for i in range(5):\n    print('line', i)\nv = 'é' * 3\nv", "H100",
                            ns, client=c, quiet=True)
    assert got == "ééé" and ns["v"] == "ééé"
    assert capsys.readouterr().out == "".join(f"line {i}\n" for i in range(5))


def test_a_cell_after_the_gateway_restarted_finds_it_again(tmp_path: object) -> None:
    # the kept connection died with the old gateway: the next submit opens a new one
    import gpu_magic

    from .conftest import start_gateway

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = tmp_path / "state"  # type: ignore[operator]
    gw = start_gateway(tmp_path, "--port", str(port), state_dir=state)  # type: ignore[arg-type]
    try:
        with GatewayClient(gw.url, gw.token, same_host=False) as c:
            ns: dict[str, object] = {}
            assert gpu_magic.run("1 + 1", "H100", ns, client=c, quiet=True) == 2
            gw.stop()
            gw = start_gateway(tmp_path, "--port", str(port), state_dir=state)  # type: ignore[arg-type]
            assert gpu_magic.run("2 + 2", "H100", ns, client=c, quiet=True) == 4
    finally:
        gw.stop()


def test_a_submit_through_a_configured_proxy_goes_through_it(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    import gpu_magic

    class Counting(CuttingProxy):
        piped = 0

        def _pipe(self, src: socket.socket, dst: socket.socket, budget: int | None) -> None:
            self.piped += 1
            super()._pipe(src, dst, budget)

    url = httpx.URL(gateway.url)
    proxy = Counting((url.host, url.port or 80), budget=1 << 30)
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the submit went around the proxy")

    monkeypatch.setattr(_rawget.Exchange, "post", refuse)
    with GatewayClient(gateway.url, gateway.token, same_host=False) as c:
        assert gpu_magic.run("6 * 7", "H100", {}, client=c, quiet=True) == 42
    assert proxy.piped >= 2  # (both directions of at least one connection)


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[bytes]]]:
    """A server that reads requests and never answers (a gateway hung mid-submit): its URL
    and the request heads it has read."""
    heads: list[bytes] = []
    conns: list[socket.socket] = []

    def read(conn: socket.socket) -> None:
        conns.append(conn)
        try:
            while data := conn.recv(65536):
                heads.extend(line for line in data.split(b"\r\n") if line.startswith(b"POST "))
        except OSError:
            pass

    srv = _serve(read)
    yield f"http://127.0.0.1:{srv.getsockname()[1]}", heads
    srv.close()
    for c in conns:
        c.close()


def test_an_interrupted_submit_is_not_sent_again(silent_server: tuple[str, list[bytes]]) -> None:
    # Ctrl-C during a submit closes the feed's connection under its reader, which then sees
    # the connection end: it must not take that for a stale connection and send the job again
    import time

    from gpu_magic._jobs import EventFeed

    url, heads = silent_server
    with GatewayClient(url, "t" * 30, same_host=False) as c:
        feed = EventFeed(c, "ab" * 8, submit={"id": "ab" * 8, "source": "1"})
        deadline = time.monotonic() + 10
        while not heads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(heads) == 1
        feed.close()
        time.sleep(0.5)
    assert len(heads) == 1, heads


def test_a_forked_child_leaves_the_parents_connection_alone(gateway: Gateway) -> None:
    import os

    ex = _rawget.Exchange(httpx.URL(gateway.url + "/v1/pool"), {}, timeout=10,
                          connect_timeout=10, context=None)  # type: ignore[arg-type]
    # a plain GET has no body to send: post what the gateway answers with 405, fully read
    status, _, pieces = ex.post("/v1/pool", b"{}")
    b"".join(pieces)
    assert status in (401, 405)
    pid = os.fork()
    if pid == 0:  # the child: its own connection, never the parent's
        try:
            status, _, pieces = ex.post("/v1/pool", b"{}")
            b"".join(pieces)
            ex.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    sock = ex._sock
    assert sock is not None
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):  # open and quiet: not shut down under us
        sock.recv(1, socket.MSG_PEEK)
    sock.setblocking(True)
    sock.settimeout(10)
    status, _, pieces = ex.post("/v1/pool", b"{}")
    b"".join(pieces)
    assert ex._sock is sock and status in (401, 405)
    ex.close()


def test_a_client_dropped_unclosed_closes_its_connections(gateway: Gateway) -> None:
    import gc
    import warnings

    import gpu_magic

    c = GatewayClient(gateway.url, gateway.token, same_host=False)
    assert gpu_magic.run("1", "H100", {}, client=c, quiet=True) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        del c
        gc.collect()
    assert not [w for w in caught if "socket" in str(w.message)], caught


def test_a_gateway_behind_tls_runs_cells_both_ways(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    # --certfile/--keyfile: the kept submit socket, uploads and the plain-socket download all
    # speak TLS, and verify the gateway's certificate against SSL_CERT_FILE
    import numpy as np
    import trustme

    import gpu_magic
    from gpu_magic import _client

    from .conftest import start_gateway

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, bundle = (tmp_path / n for n in ("chain.pem", "key.pem", "ca.pem"))  # type: ignore[operator]
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(bundle))
    gw = start_gateway(tmp_path, "--certfile", str(chain), "--keyfile", str(key))  # type: ignore[arg-type]
    try:
        assert gw.url.startswith("https://127.0.0.1:")
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
        monkeypatch.setattr(_client, "_SSL", None)  # the context is built once per process
        # (each way through the bulk port, TLS too: what came of it)
        puts, gets = recorded(monkeypatch, "put_bulk"), recorded(monkeypatch, "get_bulk")
        with GatewayClient(gw.url, gw.token, same_host=False) as c:
            ns: dict[str, object] = {"data": np.arange(1 << 19, dtype=np.float64)}  # 4 MiB
            assert gpu_magic.run("6 * 7", "H100", ns, client=c, quiet=True) == 42
            gpu_magic.run("back = data * 2", "H100", ns, client=c, quiet=True)
            assert np.array_equal(ns["back"], np.arange(1 << 19, dtype=np.float64) * 2)
        assert (puts, gets) == ([200], [200])
        # a client that does not trust the certificate is refused, not silently let through
        monkeypatch.setattr(_client, "_SSL", None)
        monkeypatch.delenv("SSL_CERT_FILE")
        with GatewayClient(gw.url, gw.token, same_host=False) as c:
            with pytest.raises(GatewayError, match="CERTIFICATE_VERIFY_FAILED|certificate"):
                gpu_magic.run("1", "H100", {}, client=c, quiet=True)
    finally:
        gw.stop()
        monkeypatch.setattr(_client, "_SSL", None)


def test_a_buffer_filled_while_its_pages_are_faulted_ahead_is_left_whole_and_closable() -> None:
    size = 40 << 20
    buf = _rawget.new_buffer(size)
    with pytest.raises(ZeroDivisionError):
        with _rawget.prefaulted(buf), memoryview(buf) as view:
            view[size - 3 :] = b"end"
            1 / 0  # noqa: B018
    assert not [t for t in threading.enumerate() if t.name == "gpu-magic-prefault"]
    assert bytes(buf[:4]) == b"\0" * 4 and bytes(buf[-3:]) == b"end"
    buf.close()  # (nothing still holds the mapping)


def test_a_new_buffer_s_pages_are_faulted_in_while_it_is_being_filled() -> None:
    if _rawget._madvise() is None:
        pytest.skip("MADV_POPULATE_WRITE is Linux's")
    size = 64 << 20
    buf = _rawget.new_buffer(size)
    with contextlib.closing(buf):
        start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        if _rawget._madvise()(start, 4096, _rawget._MADV_POPULATE_WRITE) != 0:
            pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14+)")

        def resident() -> int:
            """kB of the buffer's mapping in memory (/proc/self/smaps)."""
            with open("/proc/self/smaps") as f:
                ours = False
                for line in f:
                    if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                        ours = int(line.split("-", 1)[0], 16) == start
                    elif ours and line.startswith("Rss:"):
                        return int(line.split()[1])
            raise AssertionError("the buffer's mapping is not in /proc/self/smaps")

        assert resident() <= 8  # (the one page faulted in above)
        with _rawget.prefaulted(buf):
            deadline = time.monotonic() + 20
            while resident() < size >> 10 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert resident() == size >> 10  # every page, none written by this thread


def test_a_thread_in_another_network_namespace_is_on_another_loopback() -> None:
    # the bulk port's proof names the loopback a socket is on: read per thread, each time (a
    # cached per-process value let a thread in another namespace take a relay for the gateway)
    if not os.path.exists("/proc/thread-self/ns/net"):
        pytest.skip("needs Linux's /proc/thread-self")
    libc = ctypes.CDLL(None, use_errno=True)
    main = _rawget.here()
    got: dict[str, str] = {}

    def elsewhere() -> None:  # (the thread ends in its own namespace; the process is untouched)
        if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
            got["skip"] = os.strerror(ctypes.get_errno())
            return
        got["here"] = _rawget.here()

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    if "skip" in got:
        pytest.skip(f"cannot make a network namespace here: {got['skip']}")
    assert got["here"] != main and got["here"].split()[0] == main.split()[0]  # (same boot)
    assert _rawget.here() == main
