"""The same-host path: on the gateway's own host, a single-user gateway takes blobs as files in
its inbox and serves results as files, instead of HTTP bodies. Same auth, same verification."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import gpu_magic
from gpu_magic._client import GatewayClient

from .conftest import Gateway, start_gateway


def auth(gw: Gateway, token: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token or gw.token}"}


def test_large_arrays_travel_as_files_and_come_back_exact(gateway: Gateway) -> None:
    with gateway.client() as c:
        local = c.local_path()
        assert local is not None and Path(local["inbox"]).is_dir()
        data = np.random.default_rng(1).random(1 << 20)  # 8 MiB
        ns: dict[str, Any] = {"__name__": "__main__", "data": data}
        gpu_magic.run("twice = data * 2", "H100", ns, client=c, quiet=True)
        assert np.array_equal(ns["twice"], data * 2)
        assert ns["twice"].flags.writeable
        assert os.listdir(local["inbox"]) == []  # nothing left behind
        # the same bytes over HTTP give the same answer
        with GatewayClient(gateway.url, gateway.token, same_host=False) as plain:
            ns2: dict[str, Any] = {"__name__": "__main__", "data": data}
            gpu_magic.run("twice = data * 2", "H100", ns2, client=plain, quiet=True)
            assert np.array_equal(ns2["twice"], ns["twice"])



def test_results_of_equal_and_shared_large_buffers_come_back_as_made(gateway: Gateway) -> None:
    # result buffers are hashed while written: equal buffers, one buffer twice, a small one
    # beside large ones, and a large pickle must each arrive whole, by the right name
    with gateway.client() as c:
        ns: dict[str, Any] = {"__name__": "__main__", "n": 1 << 19}
        gpu_magic.run("import numpy as np\n"
                      "a = np.arange(n, dtype=np.float64)\n"
                      "b = a.copy()\n"
                      "pair = (a, a)\n"
                      "small = np.ones(3)\n"
                      "text = 'x' * (3 << 20)\n"
                      "c = np.asfortranarray(np.arange(n, dtype=np.float32).reshape(512, -1))",
                      "H100", ns, client=c, quiet=True)
    want = np.arange(1 << 19, dtype=np.float64)
    assert np.array_equal(ns["a"], want) and np.array_equal(ns["b"], want)
    assert ns["pair"][0] is ns["pair"][1] is ns["a"]  # one object, as in the cell
    assert ns["b"] is not ns["a"]
    assert ns["small"].tolist() == [1.0, 1.0, 1.0] and ns["text"] == "x" * (3 << 20)
    assert ns["c"].flags.f_contiguous
    assert np.array_equal(ns["c"], np.arange(1 << 19, dtype=np.float32).reshape(512, -1))

def test_adopt_refuses_mismatching_content_and_deletes_it(gateway: Gateway) -> None:
    with gateway.client() as c:
        inbox = Path(c.local_path()["inbox"])  # type: ignore[index]
    name = secrets.token_hex(16)
    (inbox / name).write_bytes(b"not what the digest says")
    digest = gpu_magic._payload.digest(b"something else")
    resp = httpx.post(gateway.url + "/v1/blobs/adopt", headers=auth(gateway),
                      json={"digest": digest, "name": name})
    assert resp.status_code == 400 and "does not match its digest" in resp.json()["message"]
    assert not (inbox / name).exists()


@pytest.mark.parametrize("name", ["../token", "a" * 31, "..", "/etc/passwd", "A" * 32])
def test_adopt_refuses_names_outside_the_inbox(gateway: Gateway, name: str) -> None:
    resp = httpx.post(gateway.url + "/v1/blobs/adopt", headers=auth(gateway),
                      json={"digest": gpu_magic._payload.digest(b"x"), "name": name})
    assert resp.status_code == 422


def test_adopt_of_a_missing_file_is_404(gateway: Gateway) -> None:
    resp = httpx.post(gateway.url + "/v1/blobs/adopt", headers=auth(gateway),
                      json={"digest": gpu_magic._payload.digest(b"x"), "name": "0" * 32})
    assert resp.status_code == 404


def test_shared_gateway_offers_no_same_host_path(tmp_path: Path) -> None:
    tokens = {u: secrets.token_urlsafe(32) for u in ("alice", "bob")}
    f = tmp_path / "tokens.json"
    f.write_text(json.dumps(tokens))
    f.chmod(0o600)
    gw = start_gateway(tmp_path, "--tokens-file", str(f), "--isolation", "none", "--force")
    try:
        for path, method in (("/v1/local", "GET"), ("/v1/blobs/adopt", "POST")):
            kw: dict[str, Any] = {"json": {"digest": gpu_magic._payload.digest(b"x"),
                                           "name": "0" * 32}} if method == "POST" else {}
            resp = httpx.request(method, gw.url + path, headers=auth(gw, tokens["alice"]), **kw)
            assert resp.status_code == 404 and resp.json()["error"] == "no_local_path"
        with GatewayClient(gw.url, tokens["alice"]) as c:
            assert c.local_path() is None
    finally:
        gw.stop()


@pytest.mark.parametrize("same_host", [True, False])
@pytest.mark.parametrize("where", [0, 1 << 19, (1 << 20) - 1])
def test_cell_writing_into_a_large_input_changes_only_its_own_copy(gateway: Gateway,
                                                                   same_host: bool,
                                                                   where: int) -> None:
    # inputs are mapped copy-on-write from the gateway's store: a write anywhere (first,
    # middle or last page) must reach the caller as a changed input, and never the stored
    # blob that the next job reuses
    original = np.random.default_rng(2).random(1 << 20)  # 8 MiB: a blob of its own
    with GatewayClient(gateway.url, gateway.token, same_host=same_host) as c:
        ns: dict[str, Any] = {"__name__": "__main__", "data": original.copy()}
        gpu_magic.run(f"data[{where}] = -1.0", "H100", ns, client=c, quiet=True)
        expected = original.copy()
        expected[where] = -1.0
        assert np.array_equal(ns["data"], expected)
        again: dict[str, Any] = {"__name__": "__main__", "data": original.copy()}
        mine = again["data"]
        gpu_magic.run("first = float(data.sum())", "H100", again, client=c, quiet=True)
        assert again["first"] == float(original.sum())
        assert again["data"] is mine  # read, not written: not sent back
