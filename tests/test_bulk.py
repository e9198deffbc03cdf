"""The bulk upload listener (server/bulk.py): large uploads on a port of their own, with the
same token, limits, digest check and store as PUT /v1/blobs on the main port. Real gateways
on loopback, spoken to with plain sockets where the exchange itself is under test."""

from __future__ import annotations

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


def hello(sock: socket.socket, bulk: dict[str, Any], f: Any) -> bytes:
    """Step 1 with the listener: our nonce and id, its proof (checked). The nonce."""
    nonce = os.urandom(16)
    sock.sendall(f"GPU-MAGIC-BULK/1 {nonce.hex()} {bulk['id']}\r\n".encode())
    proof = _rawget.bulk_proof(bytes.fromhex(bulk["key"]), nonce, bulk["port"])
    assert f.readline() == f"gpu-magic-bulk/1 {proof}\r\n".encode()
    return nonce


def exchange(gw: Gateway, head: list[str], body: bytes = b"", *,
             wait_continue: bool = True) -> tuple[int, dict[str, Any] | None]:
    """One connection to the bulk port: its proof checked, ``head`` sent, the body after
    100 Continue. (status, JSON answer)."""
    bulk = offer(gw)
    sock = socket.create_connection(("127.0.0.1", bulk["port"]), timeout=10)
    with sock, sock.makefile("rb") as f:
        hello(sock, bulk, f)
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
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
    return status, answer


def put_head(gw: Gateway, digest: str, size: int, token: str | None = "own",
             **extra: str) -> list[str]:
    lines = [f"PUT /v1/blobs/{digest} HTTP/1.1", "Host: 127.0.0.1",
             f"Content-Length: {size}", "Expect: 100-continue"]
    if token is not None:
        lines.append(f"Authorization: Bearer {gw.token if token == 'own' else token}")
    return lines + [f"{k.replace('_', '-')}: {v}" for k, v in extra.items()]


def no_leftovers(gw: Gateway) -> list[str]:
    """Files in the blob store being written (dot files): none once an upload has ended."""
    return [p.name for p in (gw.state_dir / "blobs").rglob(".*") if p.is_file()]


def test_the_listener_proves_itself_with_a_key_only_token_holders_get(gw: Gateway) -> None:
    bulk = offer(gw)
    assert set(bulk) == {"port", "id", "key"} and bulk["port"] != httpx.URL(gw.url).port
    assert "bulk" not in httpx.get(f"{gw.url}/v1/health").json()
    data = os.urandom(3 << 20)
    d = digest_of(data)
    assert exchange(gw, put_head(gw, d, len(data)), data) == (200, {"digest": d,
                                                                    "size": len(data)})
    got = httpx.get(f"{gw.url}/v1/blobs/{d}", headers={"Authorization": f"Bearer {gw.token}"})
    assert got.content == data
    assert not no_leftovers(gw)
    # an id it did not give, or no hello at all: nothing said back, the connection closed
    for first in (f"GPU-MAGIC-BULK/1 {os.urandom(16).hex()} {'0' * 32}\r\n",
                  f"PUT /v1/blobs/{d} HTTP/1.1\r\n"):
        with socket.create_connection(("127.0.0.1", bulk["port"]), timeout=10) as sock:
            sock.sendall(first.encode())
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
    (lambda gw, d: put_head(gw, d, 10, token=None), 401, "unauthorized", "missing or wrong token"),
    (lambda gw, d: put_head(gw, d, 10, token="guess"), 401, "unauthorized", "missing or wrong token"),
    (lambda gw, d: put_head(gw, d, 10, Host="evil.example"), 403, "forbidden_host", "evil.example"),
    (lambda gw, d: put_head(gw, d, 10, Origin="http://evil.example"), 403, "forbidden_origin",
     "evil.example"),
    (lambda gw, d: [f"GET /v1/blobs/{d} HTTP/1.1", "Host: localhost",
                    f"Authorization: Bearer {gw.token}"], 405,
     "method_not_allowed", "use PUT"),
    (lambda gw, d: ["PUT /v1/jobs HTTP/1.1", "Host: localhost",
                    f"Authorization: Bearer {gw.token}"], 404,
     "not_found", "only PUT /v1/blobs/{digest}"),
    (lambda gw, d: put_head(gw, "xxh3-128:nothex", 10), 400, "blob", "is not a blob digest"),
    (lambda gw, d: put_head(gw, d, 10)[:2] + [f"Authorization: Bearer {gw.token}",
                                             "Transfer-Encoding: chunked"],
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


def test_an_upload_cut_off_midway_leaves_nothing(gw: Gateway) -> None:
    data = os.urandom(4 << 20)
    d = digest_of(data)
    bulk = offer(gw)
    sock = socket.create_connection(("127.0.0.1", bulk["port"]), timeout=10)
    with sock, sock.makefile("rb") as f:
        hello(sock, bulk, f)
        sock.sendall(("\r\n".join(put_head(gw, d, len(data))) + "\r\n\r\n").encode())
        assert f.readline().startswith(b"HTTP/1.1 100")
        sock.sendall(data[: 3 << 20])
        deadline = time.monotonic() + 10
        while not no_leftovers(gw) and time.monotonic() < deadline:
            time.sleep(0.01)
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


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What each bulk upload the client tried came to: the answer's status, or the reason
    (the real put_bulk runs; this only records)."""
    seen: list[Any] = []
    real = _rawget.put_bulk

    def recorded(*a: Any, **k: Any) -> Any:
        try:
            got = real(*a, **k)
        except _rawget.Unusable as exc:
            seen.append(exc)
            raise
        seen.append(got[0])
        return got

    monkeypatch.setattr(_rawget, "put_bulk", recorded)
    return seen


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


def impostor(kind: str, gw: Gateway, other_key: str | None = None) -> tuple[socket.socket, list[bytes]]:
    """A listener of another kind where a client looks for the bulk port (a port remembered
    from before its gateway started again, taken since): what it heard."""
    server = socket.create_server(("127.0.0.1", 0))
    heard: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        conn.settimeout(3)
        with conn:
            if kind == "service":  # something else altogether
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            elif kind == "relay":  # the real listener's words, passed on both ways
                real = socket.create_connection(("127.0.0.1", offer(gw)["port"]))
                real.settimeout(3)

                def back() -> None:
                    try:
                        while (piece := real.recv(65536)):
                            conn.sendall(piece)
                    except OSError:
                        pass

                threading.Thread(target=back, daemon=True).start()
            try:
                while (piece := conn.recv(65536)):
                    heard.append(piece)
                    if kind == "relay":
                        real.sendall(piece)
                    elif kind == "other user":  # a proof under its own user's key
                        nonce = bytes.fromhex(piece.split()[1].decode())
                        port = server.getsockname()[1]
                        proof = _rawget.bulk_proof(bytes.fromhex(other_key or ""), nonce, port)
                        conn.sendall(f"gpu-magic-bulk/1 {proof}\r\n".encode())
            except OSError:
                pass
            finally:
                if kind == "relay":
                    real.close()

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


def test_after_its_gateway_starts_again_a_client_finds_the_new_bulk_port(
        tmp_path: Path, spy: list[Any]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    g = start_gateway(tmp_path, "--port", str(port))
    try:
        before = offer(g)
        with _client.GatewayClient(g.url, g.token, same_host=False) as c:
            data = os.urandom(2 << 20)
            c.upload(digest_of(data), memoryview(data))
            g.stop()
            g = start_gateway(tmp_path, "--port", str(port))  # (same state: the same token)
            assert offer(g)["port"] != before["port"]
            c.upload(digest_of(data[1:]), memoryview(data[1:]))
            assert c.missing([digest_of(data[1:])]) == []
            assert c._bulk is not False
        assert spy[0] == 200 and isinstance(spy[1], _rawget.Unusable) and spy[2] == 200, spy
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
    assert (f"cannot listen on 127.0.0.1:{port} for large uploads"
            in out.stderr), out.stderr
    assert "choose another --blob-port, or --blob-port off" in out.stderr


def test_stopping_the_gateway_mid_upload_keeps_nothing_of_it(tmp_path: Path) -> None:
    g = start_gateway(tmp_path)
    try:
        data = os.urandom(4 << 20)
        d = digest_of(data)
        bulk = offer(g)
        sock = socket.create_connection(("127.0.0.1", bulk["port"]), timeout=10)
        with sock, sock.makefile("rb") as f:
            hello(sock, bulk, f)
            sock.sendall(("\r\n".join(put_head(g, d, len(data))) + "\r\n\r\n").encode())
            assert f.readline().startswith(b"HTTP/1.1 100")
            sock.sendall(data[: 1 << 20])
            deadline = time.monotonic() + 10
            while not no_leftovers(g) and time.monotonic() < deadline:
                time.sleep(0.01)
            g.proc.terminate()
            assert g.proc.wait(20) == 0
        assert not no_leftovers(g)
        assert not list((g.state_dir / "blobs").rglob(d.replace(":", "-")))
    finally:
        g.stop()
