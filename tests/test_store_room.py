"""The blob store makes room on a nearly full disk: unused blobs go, least recently used
first, of the users holding the most; what a live job needs, and what was used lately, stays."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gpu_magic._payload import digest
from gpu_magic.server.store import eviction_order

from .conftest import start_gateway

MiB = 1 << 20


def test_whoever_holds_the_most_loses_their_oldest_first() -> None:
    blobs = [("ann", "a1", 10, 1.0), ("ann", "a2", 10, 5.0), ("bob", "b1", 40, 2.0),
             ("bob", "b2", 40, 3.0), ("cy", "c1", 5, 0.5)]
    assert eviction_order(blobs, 30, lambda u, n: False) == [("bob", "b1")]
    # bob is down to 40, ann holds 20: bob again, then the largest holder each time
    assert eviction_order(blobs, 90, lambda u, n: False) == [
        ("bob", "b1"), ("bob", "b2"), ("ann", "a1")]


def test_what_must_stay_stays_even_if_that_frees_too_little() -> None:
    blobs = [("bob", "live", 50, 1.0), ("bob", "old", 10, 2.0), ("ann", "a1", 5, 0.0)]
    keep = {("bob", "live")}
    assert eviction_order(blobs, 100, lambda u, n: (u, n) in keep) == [
        ("bob", "old"), ("ann", "a1")]
    assert eviction_order(blobs, 0, lambda u, n: False) == []


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(where)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"needs a small filesystem of its own (mount: {made.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_nearly_full_state_disk_makes_room_for_an_upload(tmp_path: Path) -> None:
    # each changed input and each result is a new blob, kept for the retention period (a
    # week): a day of reruns of a cell with a large input filled the disk, and a full store
    # takes no new job
    with small_disk(tmp_path / "disk", "48m") as disk:
        gw = start_gateway(tmp_path, "--blob-reserve", "0", state_dir=disk / "state")
        try:
            headers = {"Authorization": f"Bearer {gw.token}"}

            def put(data: bytes) -> str:
                d = digest(data)
                resp = httpx.put(f"{gw.url}/v1/blobs/{d}", content=data, headers=headers)
                assert resp.status_code == 200, resp.text
                return d.replace(":", "-")

            names = [put(os.urandom(5 * MiB)) for _ in range(8)]
            folder = next((disk / "state" / "blobs").iterdir())
            old = time.time() - 3600
            for i, name in enumerate(names):  # used an hour ago, the first one longest ago
                os.utime(folder / name, (old + i, old + i))
            newest = put(os.urandom(5 * MiB))
            kept = {p.name for p in folder.iterdir()}
            assert newest in kept and names[-1] in kept
            assert names[0] not in kept  # the least recently used went first
            assert len(kept) >= 7  # no more than it took
            log = (tmp_path / "gateway.log").read_text()
            assert "the state directory's disk keeps less than a tenth free: removed" in log
        finally:
            gw.stop()


def test_a_submit_on_a_nearly_full_disk_keeps_its_own_old_inputs(tmp_path: Path) -> None:
    # (a review) the room made at submit came before the job's inputs were marked used: inputs
    # the gateway already held, unused for a while, were the first to go, and the job was
    # refused for lack of them (409)
    import numpy as np

    from gpu_magic._client import GatewayClient
    from gpu_magic._payload import pack_inputs

    from .test_gateway_http import finish, opts

    with small_disk(tmp_path / "disk", "48m") as disk:
        gw = start_gateway(tmp_path, "--blob-reserve", "0", state_dir=disk / "state")
        try:
            with GatewayClient(gw.url, gw.token, same_host=False) as c:
                packed = pack_inputs({"a": np.ones(5 * MiB // 8)}, None, None)
                for d, blob in packed.blobs().items():
                    c.upload(d, blob)
                for _ in range(6):
                    data = os.urandom(5 * MiB)
                    c.upload(digest(data), data)
                folder = next((disk / "state" / "blobs").iterdir())
                ours = {d.replace(":", "-") for d in packed.blobs()}
                old = time.time() - 3600
                for f in folder.iterdir():  # all unused for an hour, the job's own longest
                    t = old - 60 if f.name in ours else old
                    os.utime(f, (t, t))
                # what is not the store's fills the rest of the disk
                (disk / "other").write_bytes(b"\0" * (9 * MiB))
                job = c.submit({"source": "s = float(a.sum())", "spec": opts("H100"),
                                "inputs": packed.manifest, "input_names": ["a"],
                                "outputs": ["s"], "deleted": [], "has_value": False})
                assert finish(c, job["id"])["state"] == "succeeded"
                assert ours <= {f.name for f in folder.iterdir()}
        finally:
            gw.stop()
