"""The same-host path: on the gateway's own host, a single-user gateway takes blobs as files in
its inbox and serves results as files, instead of HTTP bodies. Same auth, same verification."""

from __future__ import annotations

import errno
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import gpu_magic
from gpu_magic._client import GatewayClient
from gpu_magic._errors import GatewayError

from .conftest import Gateway, start_gateway, wait_for


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

def _hand_over(gw: Gateway, inbox: Path, content: bytes | int, digest: str) -> httpx.Response:
    """Adopt ``content`` as ``digest`` (an int: a file of that many zeros that takes no disk)."""
    name = secrets.token_hex(16)
    with open(inbox / name, "wb") as f:
        if isinstance(content, int):
            f.truncate(content)
        else:
            f.write(content)
    resp = httpx.post(gw.url + "/v1/blobs/adopt", headers=auth(gw),
                      json={"digest": digest, "name": name})
    assert not (inbox / name).exists()  # taken: the inbox keeps nothing
    return resp


def test_a_blob_handed_over_under_another_digest_is_removed_and_fails_its_job(
        gateway: Gateway) -> None:
    # The file holds other bytes than the digest names (a client's bug). The gateway takes
    # it at once and checks it beside the work: a job submitted meanwhile must then deliver
    # nothing, and one submitted after the check is told the blob is missing.
    held = 0
    with gateway.client() as c:
        inbox = Path(c.local_path()["inbox"])  # type: ignore[index]
        for attempt in range(5):
            # checks are made one after another: this one's comes after a long one (256 MiB
            # of a sparse file: ~0.6 s here), so the quick job below ends before it, and its
            # outcome must wait for it
            _hand_over(gateway, inbox, 256 << 20, gpu_magic._payload.digest(b"%d" % attempt))
            data = np.random.default_rng().random(1 << 20)  # never sent before, by anyone
            packed = gpu_magic._payload.pack_inputs({"x": data}, None, None)
            (buf_digest,) = packed.manifest["buffers"]
            c.upload(packed.pickle_digest, memoryview(packed.pickle))
            resp = _hand_over(gateway, inbox, bytes(data.nbytes), buf_digest)
            assert resp.status_code == 200, resp.text
            try:
                job = c.submit({"source": "y = 1", "spec": [{"type": "H100"}],
                                "inputs": packed.manifest, "outputs": ["y"]})
            except GatewayError as exc:  # checked and removed before the submit came
                assert exc.status == 409 and exc.detail["missing"] == [buf_digest]
                continue
            events = list(c.events(job["id"]))
            assert [e for e in events if e["type"] == "done"][-1]["state"] == "failed"
            assert not [e for e in events if e["type"] == "result"]
            message = c.job(job["id"])["message"]
            assert f"input blob {buf_digest} was not what its digest names" in message, message
            assert "run the cell again" in message
            assert c.missing([buf_digest]) == [buf_digest]  # removed: a rerun sends it again
            held += 1
            if held == 2:
                break
        assert held, "no job was submitted before the check ended"
        ns: dict[str, Any] = {"x": data}  # and the rerun works
        gpu_magic.run("total = float(x.sum())", "H100", ns, client=c, quiet=True)
        assert ns["total"] == float(data.sum())
        # so does a job whose input came right over HTTP after its check failed (a failed
        # check must not be held against the blob stored since)
        data = np.random.default_rng().random(1 << 20)
        packed = gpu_magic._payload.pack_inputs({"x": data}, None, None)
        (buf_digest,) = packed.manifest["buffers"]
        c.upload(packed.pickle_digest, memoryview(packed.pickle))
        _hand_over(gateway, inbox, bytes(data.nbytes), buf_digest)
        wait_for(lambda: c.missing([buf_digest]) == [buf_digest], 30)
        resp = httpx.put(f"{gateway.url}/v1/blobs/{buf_digest}", headers=auth(gateway),
                         content=data.tobytes())
        assert resp.status_code == 200, resp.text
        job = c.submit({"source": "y = float(x.sum())", "spec": [{"type": "H100"}],
                        "inputs": packed.manifest, "outputs": ["y"]})
        events = list(c.events(job["id"]))
        assert [e for e in events if e["type"] == "done"][-1]["state"] == "succeeded", events


def _unchecked(state_dir: Path) -> list[Path]:
    return list((state_dir / "blobs").glob("*/.*.unchecked"))


def test_a_blob_handed_over_with_its_own_digest_is_kept(gateway: Gateway) -> None:
    content = os.urandom(1 << 20)
    digest = gpu_magic._payload.digest(content)
    with gateway.client() as c:
        inbox = Path(c.local_path()["inbox"])  # type: ignore[index]
        assert _hand_over(gateway, inbox, content, digest).json() == {
            "digest": digest, "size": len(content)}
        wait_for(lambda: not _unchecked(gateway.state_dir), 10)  # its check ended
        assert c.missing([digest]) == []
        assert bytes(c.download(digest)) == content


def test_a_gateway_stopped_while_it_checked_checks_again_at_start(tmp_path: Path) -> None:
    # a marker beside a blob says its check did not end: the next start does it (what a
    # gateway killed in that moment leaves)
    good, bad = os.urandom(1 << 20), os.urandom(1 << 20)
    state = tmp_path / "state"
    gw = start_gateway(tmp_path, state_dir=state)
    try:
        with gw.client() as c:
            for content in (good, bad):
                c.upload(gpu_magic._payload.digest(content), memoryview(content))
    finally:
        gw.stop()
    blobs = {p.name: p for p in (state / "blobs").glob("*/*")}
    good_file = blobs[gpu_magic._payload.digest(good).replace(":", "-")]
    bad_file = blobs[gpu_magic._payload.digest(bad).replace(":", "-")]
    bad_file.write_bytes(good)  # other bytes than its name says
    for f in (good_file, bad_file):
        f.with_name(f".{f.name}.unchecked").touch()
    gw = start_gateway(tmp_path, state_dir=state)
    try:
        with gw.client() as c:
            assert c.missing([gpu_magic._payload.digest(good), gpu_magic._payload.digest(bad)]) \
                == [gpu_magic._payload.digest(bad)]
        assert not _unchecked(state)
    finally:
        gw.stop()


def test_an_inbox_file_a_dead_client_left_is_removed(tmp_path: Path) -> None:
    # a kernel killed while it wrote a large input into the inbox never hands it over: it
    # stayed for good (1.5 GB each time, found by a reliability trial)
    state = tmp_path / "state"
    gw = start_gateway(tmp_path, "--retention", "2", state_dir=state)
    try:
        with gw.client() as c:
            inbox = Path(c.local_path()["inbox"])
        left, live = inbox / ("a" * 32), inbox / ("b" * 32)
        for f in (left, live):
            f.write_bytes(b"x" * 1000)
        os.utime(left, (time.time() - 3600, time.time() - 3600))  # last written an hour ago
        wait_for(lambda: not left.exists(), 20)
        assert live.exists()  # one being written now is not touched
        gw.stop()
        os.utime(live, (time.time() - 3600, time.time() - 3600))
        gw = start_gateway(tmp_path, state_dir=state)  # and at start, whatever the retention
        wait_for(lambda: not live.exists(), 20)
    finally:
        gw.stop()


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


def test_files_stored_before_their_check_stay_only_if_they_pass(tmp_path: Path) -> None:
    # a runner's results outside a sandbox are stored at once and checked beside the client
    # binding them: one whose bytes are not its digest's is removed when its check ends
    from gpu_magic.server.store import BlobStore

    store = BlobStore(tmp_path / "blobs")
    out = tmp_path / "out"
    out.mkdir()
    good, other = os.urandom(1 << 20), os.urandom(1 << 20)
    named = {"good": gpu_magic._payload.digest(good), "bad": gpu_magic._payload.digest(other)}
    for name in named:
        (out / name).write_bytes(good)
    gate = threading.Event()
    try:
        store.checks._pool.submit(gate.wait)  # the check thread, busy until both are stored
        for name, digest in named.items():
            assert store.adopt("u", out, name, digest, beside=True) == len(good)
        pending = store.checks.pending([store.path("u", d) for d in named.values()])
        gate.set()
        outcome = {p.name: fs[0].result(timeout=10) for p, fs in pending.items()}
        assert outcome[named["good"].replace(":", "-")] is None
        assert "not what its writer named it" in str(outcome[named["bad"].replace(":", "-")])
        assert store.has("u", named["good"]) and not store.has("u", named["bad"])
        assert store.path("u", named["good"]).read_bytes() == good
        assert not list((tmp_path / "blobs").glob("*/.*"))  # no marker, no temporary file
    finally:
        gate.set()
        store.close()


def test_a_blob_that_cannot_be_read_to_check_it_is_not_kept(tmp_path: Path) -> None:
    # the disk fails the check's read: the blob must not stay as if it had passed
    from gpu_magic.server.checks import Checks, marker

    def unreadable(fd: int, max_bytes: int | None, like: str) -> tuple[str, int]:
        raise OSError(errno.EIO, "Input/output error")

    checks = Checks(unreadable, lambda size: None)
    gate = threading.Event()
    try:
        checks._pool.submit(gate.wait)  # the check thread, busy until the blob is stored
        blob, tmp = tmp_path / ("xxh3-128-" + "0" * 32), tmp_path / ".incoming"
        tmp.write_bytes(b"data")
        checks.publish(tmp, blob, "xxh3-128:" + "0" * 32)
        ((future,),) = checks.pending([blob]).values()
        gate.set()
        assert "could not be read to check it (OSError" in str(future.result(timeout=10))
        assert not blob.exists() and not marker(blob).exists()
    finally:
        gate.set()
        checks.close()


def test_every_user_name_has_a_folder_of_its_own() -> None:
    from gpu_magic.server.store import user_folder

    names = ["alice", "ann lee", "ann_lee", "Ann_lee", "ann%20lee", ".", "..", "", "%",
             ".hidden", "a/b", "élan", "x" * 300, "x" * 301, "日本"]
    folders = [user_folder(n) for n in names]
    assert len({f.lower() for f in folders}) == len(names)  # apart even where case is not
    assert user_folder("alice") == "alice"  # a plain name keeps its folder
    for f in folders:
        assert f not in (".", "..") and not f.startswith(".") and "/" not in f
        assert 0 < len(f) <= 255


def test_blobs_a_live_job_needs_are_kept_whatever_its_user_is_called(tmp_path: Path) -> None:
    from gpu_magic.server.store import BlobStore

    store = BlobStore(tmp_path / "blobs")
    try:
        data = os.urandom(1000)
        digest = gpu_magic._payload.digest(data)
        for user in ("ann lee", "bob"):
            store.put_bytes(user, digest, data)
        # everything is older than the cutoff; only ann lee's live job needs the blob
        store.collect(cutoff=2e9, needed={"ann lee": {digest}})
        assert store.has("ann lee", digest) and not store.has("bob", digest)
    finally:
        store.close()


def test_a_gateway_stopped_while_a_job_waits_for_its_inputs_checks_ends_it_as_it_ran(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    gw = start_gateway(tmp_path, state_dir=state)
    try:
        with gw.client() as c:
            inbox = Path(c.local_path()["inbox"])  # type: ignore[index]
            # a long check first (512 MiB of a sparse file: about a second here), then the
            # input's, so the job's cell ends while its input is still being checked
            _hand_over(gw, inbox, 512 << 20, gpu_magic._payload.digest(b"ahead"))
            data = np.random.default_rng().random(1 << 17)
            packed = gpu_magic._payload.pack_inputs({"x": data}, None, None)
            (buf_digest,) = packed.manifest["buffers"]
            c.upload(packed.pickle_digest, memoryview(packed.pickle))
            _hand_over(gw, inbox, bytes(packed.blobs()[buf_digest]), buf_digest)
            job = c.submit({"source": "print('ran', flush=True)\ny = 1",
                            "spec": [{"type": "H100"}], "inputs": packed.manifest,
                            "outputs": ["y"]})
            for ev in c.events(job["id"]):
                if ev["type"] == "stdout" and "ran" in ev["text"]:
                    break
        gw.stop()  # SIGTERM: the gateway drains, and the job's wait is part of that
        gw = start_gateway(tmp_path, state_dir=state)
        with gw.client() as c:
            record = c.job(job["id"])
            assert record["state"] == "succeeded", record
    finally:
        gw.stop()


def test_a_large_input_is_named_by_its_pieces_where_the_gateway_takes_them(
        gateway: Gateway) -> None:
    from gpu_magic._payload import PIECE, digest

    def stored() -> set[str]:
        return {p.name for p in (gateway.state_dir / "blobs").rglob("xxh3-*")}

    rng = np.random.default_rng(7)
    for same_host in (True, False):
        with GatewayClient(gateway.url, gateway.token, same_host=same_host) as c:
            data = rng.random(PIECE // 8 + 1000)  # just over one piece
            ns: dict[str, Any] = {"__name__": "__main__", "data": data}
            gpu_magic.run("total = float(data.sum())", "H100", ns, client=c, quiet=True)
            assert ns["total"] == float(data.sum())
            name = digest(memoryview(data).cast("B"), pieces=True)
            assert name.startswith("xxh3-128-16m:") and name.replace(":", "-") in stored()
            # a gateway that does not list them (an older one) gets the plain digest
            c.health().pop("digests")
            data = rng.random(PIECE // 8 + 1000)
            ns = {"__name__": "__main__", "data": data}
            gpu_magic.run("total = float(data.sum())", "H100", ns, client=c, quiet=True)
            assert ns["total"] == float(data.sum())
            assert digest(memoryview(data).cast("B")).replace(":", "-") in stored()


def test_a_large_result_sent_back_as_a_later_cell_s_input_is_not_uploaded(
        gateway: Gateway) -> None:
    from gpu_magic._api import submit
    from gpu_magic._payload import PIECE

    for same_host in (True, False):
        with GatewayClient(gateway.url, gateway.token, same_host=same_host) as c:
            ns: dict[str, Any] = {"__name__": "__main__", "n": PIECE // 8 + 1000, "k": same_host}
            gpu_magic.run("import numpy as np\nbig = np.full(n, 2.0 + k)", "H100", ns, client=c,
                          quiet=True)
            job = submit("total = float(big.sum())", "H100", ns, client=c)
            job.follow()
            assert job.outcome() is None and ns["total"] == (2.0 + same_host) * ns["n"]
            # named as the runner named it: the gateway has it, nothing is uploaded
            assert job.state.sent_bytes < 10_000 and job.state.reused == 1, job.state


def test_a_dry_run_says_a_large_input_the_gateway_has_is_cached(gateway: Gateway) -> None:
    from gpu_magic._payload import PIECE

    with gateway.client() as c:
        data = np.random.default_rng(3).random(PIECE // 8 + 1000)
        ns: dict[str, Any] = {"__name__": "__main__", "data": data}
        report = gpu_magic.run("s = float(data[0])", "H100", ns, client=c, dry_run=True)
        assert "cached" not in report["inputs"][0]["travels"]
        gpu_magic.run("s = float(data[0])", "H100", ns, client=c, quiet=True)
        report = gpu_magic.run("s = float(data[0])", "H100", ns, client=c, dry_run=True)
        assert report["inputs"][0]["travels"].endswith("already cached on the gateway"), report
