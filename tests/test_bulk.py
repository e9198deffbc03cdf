"""The bulk listener (server/bulk.py): large uploads and downloads on a port of their own, with
the same user, limits, digest check and store as PUT and GET /v1/blobs on the main port. Real
gateways on loopback, spoken to with plain sockets where the exchange itself is under test."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import gpu_magic
from gpu_magic import _client, _rawget
from gpu_magic._errors import GatewayError
from gpu_magic._payload import digest as digest_of

from .conftest import Gateway, start_class_gateway, start_gateway


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("bulk"), "--max-blob-bytes", "8M")
    yield g
    g.stop()


def offer(gw: Gateway, token: str | None = None) -> dict[str, Any]:
    health = httpx.get(f"{gw.url}/v1/health",
                       headers={"Authorization": f"Bearer {token or gw.token}"}).json()
    return health["bulk"]


def hello(sock: socket.socket, bulk: dict[str, Any], f: Any) -> tuple[str, str]:
    """Step 1 with the listener: our nonce and id, its nonce and proof (checked against the
    address we reached). Both nonces."""
    ours = os.urandom(16).hex()
    sock.sendall(f"GPU-MAGIC-BULK/1 {ours} {bulk['id']}\r\n".encode())
    word, theirs, proof = f.readline().decode().split()
    host, port = sock.getpeername()[:2]
    assert word == "gpu-magic-bulk/1"
    assert proof == _rawget.listener_proof(bytes.fromhex(bulk["key"]), ours, theirs, host, port,
                                           _rawget.here())
    return ours, theirs


PROVEN = "Authorization: (proof)"  # in a head: the proof of this connection's key, filled in


def exchange(gw: Gateway, head: list[str], body: bytes = b"", *,
             wait_continue: bool = True) -> tuple[int, dict[str, Any] | None]:
    """One connection to the bulk port: its proof checked, ``head`` sent (PROVEN made the
    request's proof), the body after 100 Continue. (status, JSON answer)."""
    bulk = offer(gw)
    sock = socket.create_connection(("127.0.0.1", bulk["port"]), timeout=10)
    with sock, sock.makefile("rb") as f:
        nonces = hello(sock, bulk, f)
        target, size, sent = proven(head, bulk, nonces)
        sock.sendall(sent)
        status_line = f.readline()
        status = int(status_line.split()[1])
        if status == 100 and wait_continue:
            f.readline()  # (the blank line ending the interim answer)
            sock.sendall(body)
            status = int(f.readline().split()[1])
        fields = {}
        while (line := f.readline().strip()):
            k, _, v = line.decode("latin-1").partition(":")
            fields[k.lower()] = v.strip()
        answer = json.loads(f.read(int(fields["content-length"]))) if status != 100 else None
    if status == 200 and answer is not None:  # (its proof that it stored it)
        assert answer.pop("mac") == _rawget.bulk_mac(bytes.fromhex(bulk["key"]), "stored",
                                                     *nonces, target, size)
    return status, answer


def proven(head: list[str], bulk: dict[str, Any], nonces: tuple[str, str],
           ) -> tuple[str, str, bytes]:
    """``head`` with PROVEN made the request's proof: its path, its length and its bytes."""
    target = head[0].split()[1] if len(head[0].split()) == 3 else ""
    size = next((h.split(":")[1].strip() for h in head if h.startswith("Content-Length")), "")
    mac = _rawget.bulk_mac(bytes.fromhex(bulk["key"]), "client", *nonces, target, size)
    head = [f"Authorization: GpuMagicBulk {mac}" if h == PROVEN else h for h in head]
    return target, size, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


def put_head(gw: Gateway, digest: str, size: int, auth: str | None = PROVEN,
             **extra: str) -> list[str]:
    lines = [f"PUT /v1/blobs/{digest} HTTP/1.1", "Host: 127.0.0.1",
             f"Content-Length: {size}", "Expect: 100-continue"]
    if auth is not None:
        lines.append(auth)
    return lines + [f"{k.replace('_', '-')}: {v}" for k, v in extra.items()]


def no_leftovers(gw: Gateway) -> list[str]:
    """Files in the blob store being written (dot files): none once an upload has ended."""
    return [p.name for p in (gw.state_dir / "blobs").rglob(".*") if p.is_file()]


def test_the_listener_proves_itself_with_a_key_only_token_holders_get(gw: Gateway) -> None:
    bulk = offer(gw)
    assert set(bulk) == {"port", "id", "key", "serves"} and bulk["serves"] == ["PUT", "GET"]
    assert bulk["port"] != httpx.URL(gw.url).port
    assert "bulk" not in httpx.get(f"{gw.url}/v1/health").json()
    data = os.urandom(3 << 20)
    d = digest_of(data)
    assert exchange(gw, put_head(gw, d, len(data)), data) == (200, {"digest": d,
                                                                    "size": len(data)})
    got = httpx.get(f"{gw.url}/v1/blobs/{d}", headers={"Authorization": f"Bearer {gw.token}"})
    assert got.content == data
    assert not no_leftovers(gw)
    # an id it did not give is said so; no hello at all: the connection closed
    for first, said in ((f"GPU-MAGIC-BULK/1 {os.urandom(16).hex()} {'0' * 32}\r\n",
                         b"gpu-magic-bulk/1 unknown-id\r\n"),
                        (f"PUT /v1/blobs/{d} HTTP/1.1\r\n", b"")):
        with socket.create_connection(("127.0.0.1", bulk["port"]), timeout=10) as sock:
            sock.sendall(first.encode())
            assert sock.recv(100) == said
            assert sock.recv(100) == b""


def test_each_user_gets_a_key_of_their_own(tmp_path: Path) -> None:
    g, tokens = start_class_gateway(tmp_path)
    try:
        alice, bob = (offer(g, tokens[n]) for n in ("alice", "bob"))
        assert alice["port"] == bob["port"]
        assert alice["id"] != bob["id"] and alice["key"] != bob["key"]
        assert offer(g, tokens["alice"]) == alice  # (the same for the gateway's lifetime)
    finally:
        g.stop()


@pytest.mark.parametrize("head, status, error, words", [
    (lambda gw, d: put_head(gw, d, 10, auth=None), 401, "unauthorized", "no proof"),
    (lambda gw, d: put_head(gw, d, 10, auth=f"Authorization: GpuMagicBulk {'0' * 64}"), 401,
     "unauthorized", "no proof"),
    # (the token itself is never taken there: whatever is at that port must not learn it)
    (lambda gw, d: put_head(gw, d, 10, auth=f"Authorization: Bearer {gw.token}"), 401,
     "unauthorized", "no proof"),
    (lambda gw, d: put_head(gw, d, 10, Host="evil.example"), 403, "forbidden_host", "evil.example"),
    (lambda gw, d: put_head(gw, d, 10, Origin="http://evil.example"), 403, "forbidden_origin",
     "evil.example"),
    (lambda gw, d: [f"DELETE /v1/blobs/{d} HTTP/1.1", "Host: localhost", PROVEN], 405,
     "method_not_allowed", "use PUT or GET"),
    (lambda gw, d: ["PUT /v1/jobs HTTP/1.1", "Host: localhost", PROVEN], 404,
     "not_found", "only PUT and GET /v1/blobs/{digest}"),
    (lambda gw, d: put_head(gw, "xxh3-128:nothex", 10), 400, "blob", "is not a blob digest"),
    (lambda gw, d: put_head(gw, d, 10)[:2] + [PROVEN, "Transfer-Encoding: chunked"],
     411, "length_required", "not chunked"),
    (lambda gw, d: [h for h in put_head(gw, d, 10) if not h.startswith("Expect")], 417,
     "expectation_failed", "100-continue"),
    (lambda gw, d: put_head(gw, d, 9 << 20), 413, "too_large",
     "the blob is 9.0 MiB; this gateway takes at most 8.0 MiB per blob (--max-blob-bytes)"),
    (lambda gw, d: ["NONSENSE"], 400, "bad_request", "not an HTTP/1.1 request line"),
])
def test_what_the_main_port_refuses_before_a_body_the_bulk_port_refuses_too(
        gw: Gateway, head: Any, status: int, error: str, words: str) -> None:
    d = digest_of(b"0123456789")
    got, answer = exchange(gw, head(gw, d), b"0123456789")
    assert got == status, answer
    assert answer is not None and answer["error"] == error and words in answer["message"], answer
    # and nothing of it is stored
    assert httpx.post(f"{gw.url}/v1/blobs/missing", json={"digests": [d]},
                      headers={"Authorization": f"Bearer {gw.token}"}).json()["missing"] == [d]


def test_a_body_that_does_not_match_its_digest_is_refused_and_not_kept(gw: Gateway) -> None:
    data = os.urandom(2 << 20)
    d = digest_of(data)
    status, answer = exchange(gw, put_head(gw, d, len(data)), data[:-1] + b"!")
    assert status == 400 and answer is not None
    assert answer["message"].startswith(f"blob content does not match its digest: sent as {d}")
    assert httpx.post(f"{gw.url}/v1/blobs/missing", json={"digests": [d]},
                      headers={"Authorization": f"Bearer {gw.token}"}).json()["missing"] == [d]
    assert not no_leftovers(gw)


@contextlib.contextmanager
def half_sent(gw: Gateway, data: bytes, sent: int) -> Iterator[None]:
    """An upload of ``data`` through the bulk port, stopped after ``sent`` bytes of it, and
    the gateway writing them (its file seen); closed at the end."""
    bulk = offer(gw)
    sock = socket.create_connection(("127.0.0.1", bulk["port"]), timeout=10)
    with sock, sock.makefile("rb") as f:
        nonces = hello(sock, bulk, f)
        sock.sendall(proven(put_head(gw, digest_of(data), len(data)), bulk, nonces)[2])
        assert f.readline().startswith(b"HTTP/1.1 100")
        sock.sendall(data[:sent])
        deadline = time.monotonic() + 10
        while not no_leftovers(gw) and time.monotonic() < deadline:
            time.sleep(0.01)
        yield


def test_an_upload_cut_off_midway_leaves_nothing(gw: Gateway) -> None:
    data = os.urandom(4 << 20)
    d = digest_of(data)
    with half_sent(gw, data, 3 << 20):
        assert no_leftovers(gw)  # (being written meanwhile)
    deadline = time.monotonic() + 10
    while no_leftovers(gw) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not no_leftovers(gw)
    assert httpx.post(f"{gw.url}/v1/blobs/missing", json={"digests": [d]},
                      headers={"Authorization": f"Bearer {gw.token}"}).json()["missing"] == [d]


def test_each_user_uploads_into_their_own_store(tmp_path: Path) -> None:
    gw, tokens = start_class_gateway(tmp_path)
    try:
        data = os.urandom(2 << 20)
        d = digest_of(data)
        with _client.GatewayClient(gw.url, tokens["bob"], same_host=False) as bob:
            bob.upload(d, memoryview(data))
            assert bob._bulk is not False and bob.missing([d]) == []
        with _client.GatewayClient(gw.url, tokens["alice"], same_host=False) as alice:
            assert alice.missing([d]) == [d]  # (bob's upload is not hers)
            with pytest.raises(GatewayError, match="no blob"):
                alice.download(d)
    finally:
        gw.stop()


def recorded(monkeypatch: pytest.MonkeyPatch, name: str) -> list[Any]:
    """What each call of ``_rawget.<name>`` came to: the answer's status, or the reason (the
    real function runs; this only records)."""
    seen: list[Any] = []
    real = getattr(_rawget, name)

    def call(*a: Any, **k: Any) -> Any:
        try:
            got = real(*a, **k)
        except _rawget.Unusable as exc:
            seen.append(exc)
            raise
        seen.append(got[0])
        return got

    monkeypatch.setattr(_rawget, name, call)
    return seen


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What each bulk upload the client tried came to."""
    return recorded(monkeypatch, "put_bulk")


def test_a_cell_s_large_input_goes_through_the_bulk_port(gw: Gateway, spy: list[Any]) -> None:
    data = np.random.default_rng(1).random(1 << 19)  # 4 MiB
    small = np.arange(1000.0)  # 8 KB: inside the submit, as before
    with _client.GatewayClient(gw.url, gw.token, same_host=False) as c:
        ns: dict[str, Any] = {"data": data, "small": small}
        assert gpu_magic.run("float(data.sum() + small.sum())", "H100", ns, client=c,
                             quiet=True) == pytest.approx(data.sum() + small.sum())
    assert spy == [200]


def test_a_refusal_on_the_bulk_port_reads_as_the_main_port_s(gw: Gateway, spy: list[Any]) -> None:
    data = os.urandom(9 << 20)
    with _client.GatewayClient(gw.url, gw.token, same_host=False) as c:
        with pytest.raises(GatewayError) as bulk:
            c.upload(digest_of(data), memoryview(data))
        assert spy == [413]
        c._bulk = False  # (the same upload through the main port, for its words)
        with pytest.raises(GatewayError) as main:
            c.upload(digest_of(data), memoryview(data))
    assert str(bulk.value) == str(main.value)
    assert "at most 8.0 MiB per blob (--max-blob-bytes)" in str(bulk.value)


def forward(at: tuple[str, int], to: tuple[str, int],
            heard: list[bytes] | None = None) -> socket.socket:
    """A TCP forwarder listening ``at`` (a port forward in front of a gateway, or a relay);
    what its clients sent goes to ``heard`` too."""
    server = socket.create_server(at)

    def pipe(a: socket.socket, b: socket.socket, into: list[bytes] | None) -> None:
        try:
            while (piece := a.recv(65536)):
                if into is not None:
                    into.append(piece)
                b.sendall(piece)
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            other = socket.create_connection(to)
            threading.Thread(target=pipe, args=(conn, other, heard), daemon=True).start()
            threading.Thread(target=pipe, args=(other, conn, None), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server


def impostor(kind: str, gw: Gateway, other_key: str | None = None) -> tuple[socket.socket, list[bytes]]:
    """A listener of another kind where a client looks for the bulk port (a port remembered
    from before its gateway started again, taken since): what it heard."""
    heard: list[bytes] = []
    if kind == "relay":  # the real listener's words, passed on both ways
        return forward(("127.0.0.1", 0), ("127.0.0.1", offer(gw)["port"]), heard), heard
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        conn.settimeout(3)
        with conn:
            if kind == "service":  # something else altogether
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            try:
                while (piece := conn.recv(65536)):
                    heard.append(piece)
                    if kind == "other user":  # a proof under its own user's key
                        nonce = piece.split()[1].decode()
                        host, port = server.getsockname()
                        proof = _rawget.listener_proof(bytes.fromhex(other_key or ""),
                                                       nonce, "0" * 32, host, port,
                                                       _rawget.here())
                        conn.sendall(f"gpu-magic-bulk/1 {'0' * 32} {proof}\r\n".encode())
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    return server, heard


def pointed_at(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    """The client's health answer names ``port`` for the bulk listener (as a stale one did)."""
    real_health = _client.GatewayClient.health
    seen: list[bool] = []

    def elsewhere(self: Any, refresh: bool = False) -> dict[str, Any]:
        answer = dict(real_health(self, refresh))
        seen.append(refresh)
        answer["bulk"] = {**answer["bulk"], "port": port}
        return answer

    monkeypatch.setattr(_client.GatewayClient, "health", elsewhere)


@pytest.mark.parametrize("kind", ["service", "relay"])
def test_a_port_that_is_not_the_listener_gets_no_token_and_the_upload_goes_the_usual_way(
        gw: Gateway, spy: list[Any], monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    server, heard = impostor(kind, gw)
    pointed_at(monkeypatch, server.getsockname()[1])
    data = os.urandom(2 << 20)
    d = digest_of(data)
    with server, _client.GatewayClient(gw.url, gw.token, same_host=False) as c:
        c.upload(d, memoryview(data))
        assert c.missing([d]) == []  # uploaded through the main port
        assert c._bulk is False  # and the other port is not tried again
        c.upload(digest_of(data[1:]), memoryview(data[1:]))
    assert len(spy) == 1 and isinstance(spy[0], _rawget.Unusable), spy
    assert "is not the gateway's bulk listener" in str(spy[0])
    assert heard and heard[0].startswith(b"GPU-MAGIC-BULK/1 ")
    assert gw.token.encode() not in b"".join(heard)


def test_a_relay_on_another_address_at_the_listener_s_port_learns_nothing(
        gw: Gateway, spy: list[Any]) -> None:
    # The gateway reached through a forward on 127.0.0.2 (an ssh tunnel, a proxy's host);
    # someone else takes 127.0.0.2 at the bulk port's number and relays it to the listener.
    main = forward(("127.0.0.2", 0), ("127.0.0.1", httpx.URL(gw.url).port))
    heard: list[bytes] = []
    relay = forward(("127.0.0.2", offer(gw)["port"]), ("127.0.0.1", offer(gw)["port"]), heard)
    data = os.urandom(2 << 20)
    d = digest_of(data)
    with main, relay, _client.GatewayClient(f"http://127.0.0.2:{main.getsockname()[1]}",
                                            gw.token, same_host=False) as c:
        c.upload(d, memoryview(data))
        assert c.missing([d]) == []  # through the forwarded main port
    assert spy and all(isinstance(x, _rawget.Unusable) for x in spy), spy
    assert "for this address" in str(spy[0])
    assert heard and gw.token.encode() not in b"".join(heard)
    assert data[:4096] not in b"".join(heard)  # (nor a byte of the blob)


def test_another_user_s_key_cannot_stand_in_for_the_listener(
        tmp_path: Path, spy: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # alice holds a token, and so her own key: she cannot answer bob's hello
    g, tokens = start_class_gateway(tmp_path)
    try:
        server, heard = impostor("other user", g, offer(g, tokens["alice"])["key"])
        pointed_at(monkeypatch, server.getsockname()[1])
        data = os.urandom(2 << 20)
        with server, _client.GatewayClient(g.url, tokens["bob"], same_host=False) as bob:
            bob.upload(digest_of(data), memoryview(data))
            assert bob.missing([digest_of(data)]) == []
        assert len(spy) == 1 and "is not the gateway's bulk listener" in str(spy[0])
        assert heard and tokens["bob"].encode() not in b"".join(heard)
    finally:
        g.stop()


@pytest.mark.parametrize("blob_port", ["any", "fixed"])
def test_after_its_gateway_starts_again_a_client_finds_its_bulk_port_again(
        tmp_path: Path, spy: list[Any], blob_port: str) -> None:
    ports = []
    for _ in range(2):
        with socket.create_server(("127.0.0.1", 0)) as probe:
            ports.append(probe.getsockname()[1])
    flags = ["--port", str(ports[0])]
    if blob_port == "fixed":  # (the new listener does not know the old id)
        flags += ["--blob-port", str(ports[1])]
    g = start_gateway(tmp_path, *flags)
    try:
        before = offer(g)
        with _client.GatewayClient(g.url, g.token, same_host=False) as c:
            data = os.urandom(2 << 20)
            c.upload(digest_of(data), memoryview(data))
            g.stop()
            g = start_gateway(tmp_path, *flags)  # (same state: the same token)
            assert offer(g) != before
            c.upload(digest_of(data[1:]), memoryview(data[1:]))
            assert c.missing([digest_of(data[1:])]) == []
            assert c._bulk is not False
        assert spy[0] == 200 and isinstance(spy[1], _rawget.Unusable) and spy[2] == 200, spy
    finally:
        g.stop()


def test_a_token_taken_back_takes_its_bulk_key_with_it(tmp_path: Path) -> None:
    import signal

    g, tokens = start_class_gateway(tmp_path)
    try:
        old = offer(g, tokens["bob"])
        path = tmp_path / "tokens.json"
        entries = json.loads(path.read_text())
        path.write_text(json.dumps({**entries, "bob": "b" * 30}))
        g.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while httpx.get(f"{g.url}/v1/pool", headers={"Authorization": f"Bearer {tokens['bob']}"}
                        ).status_code != 401 and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", old["port"]), timeout=10) as sock:
            sock.sendall(f"GPU-MAGIC-BULK/1 {os.urandom(16).hex()} {old['id']}\r\n".encode())
            assert sock.recv(100) == b"gpu-magic-bulk/1 unknown-id\r\n"
        assert offer(g, "b" * 30)["key"] != old["key"]
    finally:
        g.stop()


def test_off_means_no_listener_and_uploads_through_the_main_port(
        tmp_path: Path, spy: list[Any]) -> None:
    g = start_gateway(tmp_path, "--blob-port", "off")
    try:
        assert "bulk" not in httpx.get(f"{g.url}/v1/health",
                                       headers={"Authorization": f"Bearer {g.token}"}).json()
        data = os.urandom(2 << 20)
        with _client.GatewayClient(g.url, g.token, same_host=False) as c:
            c.upload(digest_of(data), memoryview(data))
            assert c.missing([digest_of(data)]) == []
        assert spy == []
    finally:
        g.stop()


def test_a_taken_blob_port_stops_the_start_with_what_to_do(tmp_path: Path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    with taken:
        out = subprocess.run(
            [sys.executable, "-m", "gpu_magic", "serve", "--port", "0", "--blob-port", str(port), "--state-dir", str(tmp_path / "s"), "--simulate",
             "H100:1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert (f"cannot listen on 127.0.0.1:{port} for large blobs"
            in out.stderr), out.stderr
    assert "choose another --blob-port, or --blob-port off" in out.stderr


def test_stopping_the_gateway_mid_upload_keeps_nothing_of_it(tmp_path: Path) -> None:
    g = start_gateway(tmp_path)
    try:
        data = os.urandom(4 << 20)
        d = digest_of(data)
        with half_sent(g, data, 1 << 20):
            g.proc.terminate()
            assert g.proc.wait(20) == 0
        assert not no_leftovers(g)
        assert not list((g.state_dir / "blobs").rglob(d.replace(":", "-")))
    finally:
        g.stop()


# --- downloads ---------------------------------------------------------------------------

PUT_PROOF = "Authorization: (a PUT's proof)"  # the proof an upload of that path would send


def fetch(gw: Gateway, head: list[str], body: bytes = b"", *, token: str | None = None,
          ) -> tuple[int, bytes]:
    """One download from the bulk port: its proof checked, ``head`` sent (PROVEN made a GET's
    proof, PUT_PROOF an upload's). (status, the answer's body)."""
    bulk = offer(gw, token)
    key = bytes.fromhex(bulk["key"])
    sock = socket.create_connection(("127.0.0.1", bulk["port"]), timeout=10)
    with sock, sock.makefile("rb") as f:
        nonces = hello(sock, bulk, f)
        target = head[0].split()[1]
        proofs = {PROVEN: _rawget.bulk_mac(key, "client-get", *nonces, target),
                  PUT_PROOF: _rawget.bulk_mac(key, "client", *nonces, target, "")}
        head = [f"Authorization: GpuMagicBulk {proofs[h]}" if h in proofs else h for h in head]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        status = int(f.readline().split()[1])
        fields = {}
        while (line := f.readline().strip()):
            k, _, v = line.decode("latin-1").partition(":")
            fields[k.lower()] = v.strip()
        return status, f.read(int(fields["content-length"]))


def get_head(digest: str, *extra: str) -> list[str]:
    return [f"GET /v1/blobs/{digest} HTTP/1.1", "Host: 127.0.0.1", PROVEN, *extra]


def stored(gw: Gateway, data: bytes, token: str | None = None) -> str:
    """``data`` put in the gateway's store through the main port: its digest."""
    d = digest_of(data)
    got = httpx.put(f"{gw.url}/v1/blobs/{d}", content=data,
                    headers={"Authorization": f"Bearer {token or gw.token}"})
    assert got.status_code == 200, got.text
    return d


def test_a_download_comes_off_the_bulk_port_whole(gw: Gateway) -> None:
    data = os.urandom((5 << 20) + 3)
    d = stored(gw, data)
    assert fetch(gw, get_head(d)) == (200, data)
    assert fetch(gw, get_head(stored(gw, b""))) == (200, b"")


@pytest.mark.parametrize("head, status, error, words", [
    (lambda d: get_head(d)[:2], 401, "unauthorized", "no proof"),
    # (an upload's proof of the same path is not a download's)
    (lambda d: get_head(d)[:2] + [PUT_PROOF], 401, "unauthorized", "no proof"),
    (lambda d: get_head(d)[:2] + ["Authorization: Bearer (token)"], 401, "unauthorized",
     "no proof"),
    (lambda d: get_head(d, "Host: evil.example")[:2] + ["Host: evil.example", PROVEN], 403,
     "forbidden_host", "evil.example"),
    (lambda d: get_head(d, "Origin: http://evil.example"), 403, "forbidden_origin",
     "evil.example"),
    (lambda d: get_head("xxh3-128:nothex"), 400, "blob", "is not a blob digest"),
    (lambda d: get_head(digest_of(b"never stored")), 404, "no_such_blob",
     "this gateway holds no blob"),
    (lambda d: get_head(d, "Content-Length: 5"), 400, "bad_request", "carries no body"),
])
def test_what_the_main_port_refuses_a_download_the_bulk_port_refuses_too(
        gw: Gateway, head: Any, status: int, error: str, words: str) -> None:
    d = stored(gw, b"a blob of ours")
    lines = [h.replace("(token)", gw.token) for h in head(d)]
    got, body = fetch(gw, lines, b"12345" if "Content-Length: 5" in lines else b"")
    answer = json.loads(body)
    assert got == status, answer
    assert answer["error"] == error and words in answer["message"], answer


def test_another_user_s_blob_is_not_found_on_the_bulk_port(tmp_path: Path) -> None:
    g, tokens = start_class_gateway(tmp_path)
    try:
        data = os.urandom(2 << 20)
        d = stored(g, data, tokens["bob"])
        assert fetch(g, get_head(d), token=tokens["bob"]) == (200, data)
        status, body = fetch(g, get_head(d), token=tokens["alice"])
        assert status == 404 and json.loads(body)["error"] == "no_such_blob"
        with _client.GatewayClient(g.url, tokens["alice"], same_host=False) as alice:
            with pytest.raises(GatewayError, match="holds no blob"):
                alice.download(d, len(data))  # (through the bulk port: its answer raised)
            assert alice._bulk is not False
    finally:
        g.stop()


@pytest.fixture
def gets(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What each bulk download the client tried came to."""
    return recorded(monkeypatch, "get_bulk")


def test_a_cell_s_large_result_comes_back_through_the_bulk_port(
        gw: Gateway, gets: list[Any]) -> None:
    data = np.random.default_rng(2).random(1 << 19)  # 4 MiB
    with _client.GatewayClient(gw.url, gw.token, same_host=False) as c:
        ns: dict[str, Any] = {"data": data}
        gpu_magic.run("back = data * 2", "H100", ns, client=c, quiet=True)
        assert np.array_equal(ns["back"], data * 2) and ns["back"].flags.writeable
        assert gets == [200]
        # a result under 1 MiB (not inside its event) comes through the main port: one
        # exchange less than the bulk port's hello
        gpu_magic.run("mid = data[:20000] * 3", "H100", ns, client=c, quiet=True)
        assert np.array_equal(ns["mid"], data[:20000] * 3)
        assert gets == [200]


def test_a_gateway_that_downloads_only_through_its_main_port_is_not_asked(
        gw: Gateway, gets: list[Any], spy: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # a gateway from before downloads came to the bulk port offers it for uploads only
    real_health = _client.GatewayClient.health

    def uploads_only(self: Any, refresh: bool = False) -> dict[str, Any]:
        answer = dict(real_health(self, refresh))
        answer["bulk"] = {k: v for k, v in answer["bulk"].items() if k != "serves"}
        return answer

    monkeypatch.setattr(_client.GatewayClient, "health", uploads_only)
    data = np.random.default_rng(3).random(1 << 18)  # 2 MiB
    with _client.GatewayClient(gw.url, gw.token, same_host=False) as c:
        ns: dict[str, Any] = {"data": data}
        gpu_magic.run("back = data + 1", "H100", ns, client=c, quiet=True)
        assert np.array_equal(ns["back"], data + 1)
    assert spy == [200] and gets == []


def test_a_download_from_a_port_that_is_not_the_listener_goes_the_usual_way(
        gw: Gateway, gets: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(2 << 20)
    d = stored(gw, data)
    server, heard = impostor("service", gw)
    pointed_at(monkeypatch, server.getsockname()[1])
    with server, _client.GatewayClient(gw.url, gw.token, same_host=False) as c:
        assert bytes(c.download(d, len(data))) == data
        assert c._bulk is False
    assert len(gets) == 1 and "is not the gateway's bulk listener" in str(gets[0])
    assert heard and gw.token.encode() not in b"".join(heard)


def test_a_download_that_breaks_off_says_so(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    # a listener that proves itself (it holds the key) and then sends a third of the blob
    data = os.urandom(3 << 20)
    d = stored(gw, data)
    key = bytes.fromhex(offer(gw)["key"])
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as f:
            nonce = f.readline().split()[1].decode()
            host, port = conn.getsockname()[:2]
            proof = _rawget.listener_proof(key, nonce, "1" * 32, host, port, _rawget.here())
            conn.sendall(f"gpu-magic-bulk/1 {'1' * 32} {proof}\r\n".encode())
            while f.readline().strip():
                pass
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                         + data[: 1 << 20])

    threading.Thread(target=serve, daemon=True).start()
    pointed_at(monkeypatch, server.getsockname()[1])
    with server, _client.GatewayClient(gw.url, gw.token, same_host=False) as c:
        with pytest.raises(GatewayError, match=rf"result {d} arrived short \(1048576 of "
                                               rf"{len(data)} bytes\)"):
            c.download(d, len(data))


def test_stopping_the_gateway_mid_download_ends_it_short(tmp_path: Path) -> None:
    g = start_gateway(tmp_path)
    try:
        data = os.urandom(64 << 20)
        d = stored(g, data)
        bulk = offer(g)
        sock = socket.create_connection(("127.0.0.1", bulk["port"]), timeout=20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        with sock, sock.makefile("rb") as f:
            nonces = hello(sock, bulk, f)
            mac = _rawget.bulk_mac(bytes.fromhex(bulk["key"]), "client-get", *nonces,
                                   f"/v1/blobs/{d}")
            sock.sendall((f"GET /v1/blobs/{d} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"Authorization: GpuMagicBulk {mac}\r\n\r\n").encode())
            assert f.readline().startswith(b"HTTP/1.1 200")
            f.read(1 << 20)  # (then nothing more read: the gateway's send waits on us)
            g.proc.terminate()
            assert g.proc.wait(20) == 0  # not held by a download nobody reads
            got = 0
            while (piece := f.read(1 << 20)):
                got += len(piece)
            assert got < len(data)
    finally:
        g.stop()


def test_a_loopback_port_of_another_machine_is_not_taken_for_the_listener(
        gw: Gateway, spy: list[Any], gets: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # A loopback port forwarded from one machine to another (an ssh tunnel; a relay someone
    # else runs on the client's host) keeps the address and port the listener sees: its
    # proof names the machine and network namespace too. Here the client is told it runs
    # elsewhere (the one thing a test on one host cannot make real).
    monkeypatch.setattr(_rawget, "here", lambda: "another machine")
    data = os.urandom(2 << 20)
    with _client.GatewayClient(gw.url, gw.token, same_host=False) as c:
        c.upload(digest_of(data), memoryview(data))
        assert bytes(c.download(digest_of(data), len(data))) == data  # (the main port, both)
        assert c._bulk is False
    assert len(spy) == 1 and "is not the gateway's bulk listener" in str(spy[0]), spy
    assert gets == []
