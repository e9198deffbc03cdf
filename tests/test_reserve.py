"""The blob reserve: files written ahead for large blobs, taken by exactly one writer, written
over and cut to size; kept filled by the gateway within its cap; never seen by sandboxed runners."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpu_magic
from gpu_magic import _reserve
from gpu_magic._client import GatewayClient
from gpu_magic.server.reserve import Reserve, room_for

from .conftest import start_gateway, wait_for

MIB = 1 << 20


def _needs_room(folder: Path, size: int = 512 * MIB) -> None:
    """Skip where the disk is too full for any reserve file: rightly, none is written there."""
    if not room_for(folder, size):
        pytest.skip(f"the disk of {folder} is too full for a reserve file of {size} bytes")


def _file(folder: Path, size: int, tag: str = "a") -> Path:
    path = folder / f"{size}.{tag}"
    path.write_bytes(b"\xff" * size)
    return path


def test_take_moves_the_smallest_file_that_fits(tmp_path: Path) -> None:
    res = tmp_path / "reserve"
    res.mkdir()
    for size, tag in ((8 * MIB, "small"), (32 * MIB, "big"), (16 * MIB, "mid")):
        _file(res, size, tag)
    dest = tmp_path / "blob"
    assert _reserve.take(res, 10 * MIB, dest)
    assert dest.stat().st_size == 16 * MIB
    assert sorted(os.listdir(res)) == [f"{32 * MIB}.big", f"{8 * MIB}.small"]
    # nothing fits 40 MiB, and blobs below the minimum never take a file
    assert not _reserve.take(res, 40 * MIB, tmp_path / "b2")
    assert not _reserve.take(res, 1024, tmp_path / "b3")
    assert not _reserve.take(tmp_path / "absent", 10 * MIB, tmp_path / "b4")
    assert not _reserve.take(None, 10 * MIB, tmp_path / "b5")


def test_each_reserve_file_goes_to_one_writer(tmp_path: Path) -> None:
    res = tmp_path / "reserve"
    res.mkdir()
    for i in range(8):
        _file(res, 4 * MIB, str(i))
    won: list[bool] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        ok = _reserve.take(res, 4 * MIB, tmp_path / f"w{n}")
        with lock:
            won.append(ok)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won.count(True) == 8 and os.listdir(res) == []
    taken = [p for p in tmp_path.iterdir() if p.name.startswith("w")]
    assert len(taken) == 8


def test_write_file_over_a_longer_reserve_file_is_cut_to_the_data(tmp_path: Path) -> None:
    res = tmp_path / "reserve"
    res.mkdir()
    _file(res, 12 * MIB)
    data = np.random.default_rng(0).bytes(5 * MIB + 3)
    _reserve.write_file(tmp_path / "blob", memoryview(data), res)
    assert (tmp_path / "blob").read_bytes() == data  # no tail of the old content
    assert os.listdir(res) == []
    # without a reserve file: a new private file; an existing name is never written over
    _reserve.write_file(tmp_path / "new", memoryview(data), res)
    assert (tmp_path / "new").read_bytes() == data
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        _reserve.write_file(tmp_path / "new", memoryview(b"other"), res)
    _file(res, 8 * MIB)  # nor when a reserve file would fit, and that file stays
    with pytest.raises(FileExistsError):
        _reserve.write_file(tmp_path / "new", memoryview(data), res)
    assert (tmp_path / "new").read_bytes() == data and os.listdir(res) == [f"{8 * MIB}.a"]



def _maps_here(folder: Path) -> None:
    """Skip where a reserve file is written through ``write()`` anyway: a kernel before 5.14
    (no MADV_POPULATE_WRITE) or a file system that may need new blocks to write over one."""
    probe = folder / "probe"
    probe.write_bytes(bytes(_reserve.MAP_MIN))
    fd = os.open(probe, os.O_RDWR)
    try:
        mapping = _reserve._mapped(fd, _reserve.MAP_MIN, True, probe, 2)
    finally:
        os.close(fd)
        probe.unlink()
    if mapping is None:
        pytest.skip(f"reserve files are not written through a mapping on {folder}")
    mapping.close()


def _mapped_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many threads each write through a mapping copied on (the machine's cores are the
    edge of the world: four are said to be free, so every way is taken on any machine)."""
    monkeypatch.setattr(_reserve, "usable_cores", lambda: 4)
    seen: list[int] = []
    copy = _reserve._copy_on_threads
    monkeypatch.setattr(_reserve, "_copy_on_threads",
                        lambda dst, src, n, np: (seen.append(n), copy(dst, src, n, np)))
    return seen


@pytest.mark.parametrize("hashed", ["no", "alongside", "per piece"])
def test_a_large_write_over_a_reserve_file_is_copied_in_on_threads_and_is_exact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashed: str) -> None:
    _maps_here(tmp_path)
    seen = _mapped_writes(monkeypatch)
    monkeypatch.setattr(_reserve, "_spare_core", lambda: hashed != "per piece")
    res = tmp_path / "reserve"
    res.mkdir()
    _file(res, _reserve.HASH_ALONGSIDE_MIN + 5 * MIB)  # longer, and full of other bytes
    data = np.random.default_rng(len(hashed)).bytes(_reserve.HASH_ALONGSIDE_MIN + 4099)
    h = gpu_magic._payload.Checker(gpu_magic._payload.PIECES_PREFIX) if hashed != "no" else None
    _reserve.write_file(tmp_path / "blob", memoryview(data), res, h)
    assert os.listdir(res) == []  # the reserve file was the one written over
    with open(tmp_path / "blob", "rb") as f:
        assert f.read() == data  # cut to the data, none of the old tail left
    if h is not None:
        assert h.result() == gpu_magic._payload.digest_of(data, gpu_magic._payload.PIECES_PREFIX)
    # all cores copy; all but the one hashing alongside; one core hashing each piece just
    # before its write gains nothing from a mapping, and writes as before
    assert seen == {"no": [4], "alongside": [3], "per piece": []}[hashed]


@pytest.mark.parametrize("faults", [True, False])
def test_a_large_new_file_is_written_through_a_mapping_where_its_pages_fault(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, faults: bool) -> None:
    # no reserve file fits (cells close together, a first large upload): a new file, faulted
    # on every core; where faulting fails (no disk space for the pages: the kernel's answer
    # is the edge of the world here), the file is written as before, and exactly
    _maps_here(tmp_path)
    seen = _mapped_writes(monkeypatch)
    if not faults:
        advise = _reserve.madvise()

        def no_room(addr: int, size: int, how: int) -> int:
            if how == _reserve.MADV_POPULATE_WRITE and size > MIB:
                ctypes.set_errno(errno.ENOSPC)
                return -1
            return advise(addr, size, how)  # type: ignore[no-any-return]

        monkeypatch.setattr(_reserve, "madvise", lambda: no_room)
    data = np.random.default_rng(3).bytes(2 * _reserve.MAP_MIN + 4097)
    _reserve.write_file(tmp_path / "blob", memoryview(data), tmp_path / "no-reserve")
    assert seen == ([4] if faults else [])
    assert (tmp_path / "blob").read_bytes() == data
    assert stat.S_IMODE((tmp_path / "blob").stat().st_mode) == 0o600


def test_a_kernel_without_the_advice_is_asked_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # before Linux 5.14 madvise says EINVAL: every large write made, then unmade, a mapping
    # and its threads before writing as before; after the first, it writes as before at once
    _maps_here(tmp_path)
    monkeypatch.setattr(_reserve, "_refused", [])
    seen = _mapped_writes(monkeypatch)
    asked = []

    def old_kernel(addr: int, size: int, how: int) -> int:
        asked.append(how)
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(_reserve, "madvise", lambda: old_kernel)
    for i in range(3):
        data = np.random.default_rng(i).bytes(_reserve.MAP_MIN + i)
        _reserve.write_file(tmp_path / f"blob{i}", memoryview(data), tmp_path / "no-reserve")
        assert (tmp_path / f"blob{i}").read_bytes() == data
    assert seen == [] and 0 < len(asked) <= 4  # (the first write's threads asked, no other)


def test_an_interrupt_in_a_join_still_waits_for_every_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a Ctrl-C landing in the first join skipped the others: threads went on copying into a
    # mapping (or faulting its address range) that the caller unmapped next
    ended: list[int] = []
    join = threading.Thread.join
    calls = []

    def interrupted_once(self: threading.Thread, timeout: float | None = None) -> None:
        calls.append(self.name)
        if len(calls) == 1:
            raise KeyboardInterrupt
        join(self, timeout)

    def work(lo: int, hi: int) -> None:
        time.sleep(0.3 if lo else 0.0)  # (the threads' parts end after this thread's)
        ended.append(lo)

    monkeypatch.setattr(threading.Thread, "join", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        _reserve._on_threads(work, 4, 4)
    monkeypatch.undo()
    assert sorted(ended) == [0, 1, 2, 3]  # every part had ended when the interrupt came out
    assert not [t for t in threading.enumerate() if t.name == "gpu-magic-copy"]


def test_a_copy_whose_threads_cannot_start_is_made_by_the_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _maps_here(tmp_path)
    seen = _mapped_writes(monkeypatch)
    started = []
    start = threading.Thread.start

    def only_one(self: threading.Thread) -> None:  # a pids limit reached by a cell
        if started:
            raise RuntimeError("can't start new thread")
        started.append(self)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", only_one)
    res = tmp_path / "reserve"
    res.mkdir()
    _file(res, 3 * _reserve.MAP_MIN)
    data = np.random.default_rng(9).bytes(2 * _reserve.MAP_MIN + 13)  # not a multiple of 4
    _reserve.write_file(tmp_path / "blob", memoryview(data), res)
    assert seen == [4] and len(started) == 1
    assert (tmp_path / "blob").read_bytes() == data


def test_an_interrupt_while_copying_into_a_mapping_is_the_error_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C in the notebook, or %gpu interrupt in a runner, mid-copy: the traceback still
    # holds arrays over the mapping, which then cannot be closed; the interrupt is what the
    # caller sees, not a BufferError about the mapping
    _maps_here(tmp_path)
    monkeypatch.setattr(_reserve, "usable_cores", lambda: 2)
    copy = _reserve._copy_on_threads

    def interrupted(dst: Any, src: Any, n: int, np: Any) -> None:
        copy(dst[:4096], src[:4096], n, np)
        raise KeyboardInterrupt

    monkeypatch.setattr(_reserve, "_copy_on_threads", interrupted)
    res = tmp_path / "reserve"
    res.mkdir()
    _file(res, 2 * _reserve.MAP_MIN)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(KeyboardInterrupt):
        _reserve.write_file(tmp_path / "blob", memoryview(bytes(_reserve.MAP_MIN)), res)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_mapped_write_that_fails_leaves_no_mapping_or_descriptor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _maps_here(tmp_path)
    seen = _mapped_writes(monkeypatch)
    monkeypatch.setattr(_reserve, "_spare_core", lambda: True)
    res = tmp_path / "reserve"
    res.mkdir()
    _file(res, 2 * _reserve.HASH_ALONGSIDE_MIN)

    class Broken:
        def update(self, data: Any) -> None:
            raise MemoryError("no room for the hash")

    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(MemoryError, match="no room"):
        _reserve.write_file(tmp_path / "blob", memoryview(bytes(_reserve.HASH_ALONGSIDE_MIN)),
                            res, Broken())
    assert seen == [3]  # (it was written through a mapping)
    assert len(os.listdir("/proc/self/fd")) == fds
    with open("/proc/self/maps") as maps:
        assert str(tmp_path / "blob") not in maps.read()


@pytest.mark.parametrize("size", [0, 1, _reserve.HASH_STEP, 2 * _reserve.HASH_STEP + 7])
def test_write_file_can_hash_what_it_writes(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).bytes(size)
    h = gpu_magic._payload.Checker()
    _reserve.write_file(tmp_path / "blob", memoryview(data), None, h)
    assert (tmp_path / "blob").read_bytes() == data
    assert h.result() == gpu_magic._payload.digest(data)

@pytest.mark.parametrize("cores", [1, 2])
@pytest.mark.parametrize("scheme", [gpu_magic._payload.DIGEST_PREFIX,
                                    gpu_magic._payload.PIECES_PREFIX])
def test_large_data_hashed_alongside_its_write_gets_the_same_digest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cores: int, scheme: str) -> None:
    # where a second core is free the hash runs on a thread of its own; the machine's
    # cores are the edge of the world here, so both ways are taken on any machine
    monkeypatch.setattr(_reserve, "_spare_core", lambda: cores > 1)
    data = np.random.default_rng(cores).bytes(_reserve.HASH_ALONGSIDE_MIN + 7)
    h = gpu_magic._payload.Checker(scheme)
    _reserve.write_file(tmp_path / "blob", memoryview(data), None, h)
    assert h.result() == gpu_magic._payload.digest_of(data, scheme)
    with open(tmp_path / "blob", "rb") as f:
        assert f.read() == data


def test_where_no_thread_can_start_the_hash_goes_piece_by_piece(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a cell that left as many threads as a pids limit allows: the result is still written
    monkeypatch.setattr(_reserve, "_spare_core", lambda: True)

    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    data = np.random.default_rng(5).bytes(_reserve.HASH_ALONGSIDE_MIN + 3)
    h = gpu_magic._payload.Checker()
    _reserve.write_file(tmp_path / "blob", memoryview(data), None, h)
    assert h.result() == gpu_magic._payload.digest(data)
    with open(tmp_path / "blob", "rb") as f:
        assert f.read() == data


def test_a_hash_that_fails_alongside_the_write_is_raised_to_the_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_reserve, "_spare_core", lambda: True)

    class Broken:
        def update(self, data: Any) -> None:
            raise MemoryError("no room for the hash")

    with pytest.raises(MemoryError, match="no room"):
        _reserve.write_file(tmp_path / "blob", memoryview(bytes(_reserve.HASH_ALONGSIDE_MIN)),
                            None, Broken())


def _sizes(folder: Path) -> list[int]:
    return sorted(int(n.split(".")[0]) for n in os.listdir(folder) if n[0].isdigit())


def test_the_gateway_refills_recent_sizes_within_its_cap(tmp_path: Path) -> None:
    _needs_room(tmp_path)
    stale = tmp_path / "reserve"
    stale.mkdir()
    (stale / ".123.part").write_bytes(b"x")  # half-written by a gateway that was killed
    (stale / f"{8 * MIB}.old").write_bytes(b"x")  # whole, but nobody has asked for it since
    r = Reserve(stale, cap=40 * MIB)
    try:
        assert os.listdir(stale) == []
        r.note(1024)  # small blobs need no file
        r.note(10 * MIB)
        r.note(20 * MIB)
        want = [_reserve.round_up(10 * MIB), _reserve.round_up(20 * MIB)]
        wait_for(lambda: _sizes(stale) == want, timeout=20)
        for name in os.listdir(stale):
            assert stat.S_IMODE((stale / name).stat().st_mode) == 0o600
            with open(stale / name, "rb") as f:
                assert f.read(4096) == bytes(4096)
        assert stat.S_IMODE(stale.stat().st_mode) == 0o700
        # a writer takes the 21 MiB file; 16 MiB is written next, and 21 MiB again would
        # pass the cap of 40 MiB (11 + 16 + 21), so it is not
        assert _reserve.take(stale, 15 * MIB, tmp_path / "blob")
        r.note(15 * MIB)
        wait_for(lambda: _sizes(stale) == [want[0], _reserve.round_up(15 * MIB)], timeout=20)
        r.note(64 * MIB)  # larger than the cap: never kept
        wait_for(lambda: not r._noted, timeout=20)
        assert _sizes(stale) == [want[0], _reserve.round_up(15 * MIB)]
    finally:
        r.close()
    assert os.listdir(stale) == []  # a stopped gateway leaves no disk taken


def test_the_default_cap_keeps_a_round_trip_of_a_sixteenth_of_memory(tmp_path: Path) -> None:
    # a cell's input and its result of the same size each need a file: with room for one
    # only, the upload takes it and the result is written into new pages
    from gpu_magic.server.reserve import default_cap

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    blob = min(ram // 16, 4 << 30) - 2 * MIB  # (a file is rounded up to whole MiB, plus one)
    r = Reserve(tmp_path / "reserve", cap=default_cap())
    file = _reserve.round_up(blob)
    r._recent.extend([file, file])  # as note() does, without the thread that writes them
    assert r.wanted() == ([file, file], [])


def test_filling_waits_while_jobs_run(tmp_path: Path) -> None:
    _needs_room(tmp_path)
    running = threading.Event()
    running.set()
    r = Reserve(tmp_path / "reserve", cap=64 * MIB, busy=running.is_set)
    try:
        r.note(8 * MIB)
        wait_for(lambda: not r._noted, timeout=20)  # the filler has seen the note
        threading.Event().wait(1.0)  # more than three quiet periods
        assert _sizes(tmp_path / "reserve") == []
        running.clear()
        wait_for(lambda: _sizes(tmp_path / "reserve") == [_reserve.round_up(8 * MIB)], timeout=20)
    finally:
        r.close()


def test_filling_waits_only_while_cells_may_want_every_core() -> None:
    from gpu_magic.server.reserve import crowded

    assert not crowded(0, 1) and crowded(1, 1)  # (one core: as before, only when idle)
    assert not crowded(0, 2) and crowded(1, 2)
    # a shared server's 16 cores: its reserve is filled while some of its cells run
    assert not crowded(14, 16) and crowded(15, 16) and crowded(40, 16)


@pytest.mark.parametrize("cores", [2, 3])
def test_a_gateway_fills_its_reserve_while_a_cell_runs_only_with_cores_to_spare(
        tmp_path: Path, cores: int) -> None:
    # a department's GPU server always had a cell running, so its reserve was never filled
    _needs_room(tmp_path)
    if len(os.sched_getaffinity(0)) < cores:
        pytest.skip(f"this machine has fewer than {cores} cores to give the gateway")
    chosen = sorted(os.sched_getaffinity(0))[:cores]
    gw = start_gateway(tmp_path, "--blob-reserve", "64M",
                       preexec_fn=lambda: os.sched_setaffinity(0, chosen))
    reserve = gw.state_dir / "reserve"
    flag = tmp_path / "go"
    try:
        with GatewayClient(gw.url, gw.token, same_host=False) as c:
            ns: dict[str, Any] = {"__name__": "__main__", "data": np.ones(MIB)}  # (8 MiB)
            cell = (f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n"
                    "    time.sleep(0.05)\nn = len(data)")
            job = gpu_magic.run(cell, "H100", ns, client=c, quiet=True, background=True)
            wait_for(lambda: c.job(job.id)["state"] == "running", timeout=30)
            if cores > 2:
                wait_for(lambda: len(_sizes(reserve)) == 1, timeout=20)
            else:  # one core for the cell and one for the gateway: nothing to spare
                threading.Event().wait(1.5)  # (five quiet periods)
                assert _sizes(reserve) == []
            flag.touch()
            job.wait()
            assert ns["n"] == MIB
            wait_for(lambda: len(_sizes(reserve)) == 1, timeout=20)
    finally:
        flag.touch()
        gw.stop()


def test_a_job_that_starts_during_a_fill_stops_it_and_the_fill_goes_on_later(
        tmp_path: Path) -> None:
    _needs_room(tmp_path)
    folder = tmp_path / "reserve"
    released = threading.Event()
    stops: list[tuple[str, int]] = []  # the part's name and size at each stop

    def busy() -> bool:  # a job starts each time a fill has written more, until released
        parts = [n for n in os.listdir(folder) if n.endswith(".part")]
        if not released.is_set() and parts:
            size = (folder / parts[0]).stat().st_size
            if size > (stops[-1][1] if stops else 0):
                stops.append((parts[0], size))
                return True
            # (after three, a job still running: the fill waits for the release, not for the
            # test's next look, which a loaded machine may delay past the file's end)
            return len(stops) >= 3
        return False

    r = Reserve(folder, cap=1 << 30, busy=busy)
    try:
        r.note(64 * MIB)
        wait_for(lambda: len(stops) >= 3, timeout=20)
        assert _sizes(folder) == []  # every fill was stopped before it completed
        # what a stopped fill wrote is kept, and the next quiet moment goes on with it
        # rather than beginning a new file (its pages are what cost the most)
        assert len({name for name, _ in stops}) == 1
        assert stops[-1][1] < _reserve.round_up(64 * MIB)
        released.set()
        wait_for(lambda: _sizes(folder) == [_reserve.round_up(64 * MIB)], timeout=20)
        assert not [n for n in os.listdir(folder) if n.endswith(".part")]
    finally:
        r.close()
    assert os.listdir(folder) == []


def test_a_begun_file_no_size_wants_any_more_is_dropped(tmp_path: Path) -> None:
    _needs_room(tmp_path)
    folder = tmp_path / "reserve"
    r = Reserve(folder, cap=1 << 30)
    try:
        (folder / f".{_reserve.round_up(32 * MIB)}.abc.part").write_bytes(b"\0" * 4096)
        r.note(8 * MIB)
        wait_for(lambda: _sizes(folder) == [_reserve.round_up(8 * MIB)], timeout=20)
        wait_for(lambda: not [n for n in os.listdir(folder) if n.endswith(".part")],
                 timeout=20)
    finally:
        r.close()


def test_the_reserve_never_fills_the_disk(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    disk = st.f_blocks * st.f_frsize
    r = Reserve(tmp_path / "reserve", cap=1 << 60)
    try:
        r.note(disk)  # as large as the whole disk: it would fill it
        r.note(8 * MIB)  # small enough to write, unless this disk is already nearly full
        small_fits = room_for(tmp_path, _reserve.round_up(8 * MIB))
        wait_for(lambda: not r._noted and r._thread is not None, timeout=20)
        wait_for(lambda: _sizes(tmp_path / "reserve") == ([_reserve.round_up(8 * MIB)]
                                                          if small_fits else []), timeout=20)
    finally:
        r.close()


def test_a_begun_file_is_dropped_when_the_disk_has_no_room_to_finish_it(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    disk = st.f_blocks * st.f_frsize
    folder = tmp_path / "reserve"
    r = Reserve(folder, cap=1 << 60)
    try:
        part = folder / f".{_reserve.round_up(disk)}.abc.part"
        part.write_bytes(b"\0" * 4096)  # begun when the disk had room
        r.note(disk)
        wait_for(lambda: not part.exists(), timeout=20)
        assert os.listdir(folder) == []
    finally:
        r.close()


def test_closing_a_reserve_whose_folder_is_gone_raises_nothing(tmp_path: Path) -> None:
    # (a review: a gateway whose state directory was removed failed at its own stop)
    r = Reserve(tmp_path / "reserve", cap=1 << 30)
    shutil.rmtree(tmp_path / "reserve")
    r.close()


def test_a_reserve_of_zero_writes_nothing(tmp_path: Path) -> None:
    r = Reserve(tmp_path / "reserve", cap=0)
    r.note(64 * MIB)
    assert r._thread is None and os.listdir(tmp_path / "reserve") == []
    r.close()


@pytest.mark.slow
@pytest.mark.parametrize("same_host", [True, False])
def test_large_round_trips_over_reserve_files_come_back_exact(tmp_path: Path,
                                                              same_host: bool) -> None:
    _needs_room(tmp_path)
    gw = start_gateway(tmp_path, "--blob-reserve", "256M")
    reserve = gw.state_dir / "reserve"
    rng = np.random.default_rng(7)
    try:
        with GatewayClient(gw.url, gw.token, same_host=same_host) as c:
            for i in range(4):
                # sizes that shrink and grow, so reserve files are longer than some blobs
                data = rng.random((3 - i % 2) * MIB)
                ns: dict[str, Any] = {"__name__": "__main__", "data": data}
                # settled: a file for each of the last four large blobs (two a round)
                want = min(2 * i, 4)
                wait_for(lambda: len(_sizes(reserve)) == want, timeout=20)  # noqa: B023
                ready = {(reserve / n).stat().st_ino for n in os.listdir(reserve)}
                gpu_magic.run("twice = data * 2\nhead = float(data[0])", "H100", ns, client=c,
                              quiet=True)
                assert np.array_equal(ns["twice"], data * 2) and ns["head"] == data[0]
                if i:
                    # the input (uploaded or handed over) and the result (the runner's) were
                    # written over reserve files: the stored blobs are those files
                    stored = {p.stat().st_ino for p in (gw.state_dir / "blobs").glob("*/*")}
                    assert len(ready & stored) >= 2, (ready, stored)
            assert all(s <= 256 * MIB for s in _sizes(reserve))
    finally:
        gw.stop()
    assert gw.proc.returncode == 0 and _sizes(reserve) == []


def test_an_upload_over_the_limit_takes_no_reserve_file(tmp_path: Path) -> None:
    from gpu_magic.server.store import BlobError, BlobStore

    store = BlobStore(tmp_path / "blobs", reserve_cap=64 * MIB)
    try:
        _file(store.reserve.folder, 65 * MIB)

        async def body() -> Any:
            yield b"x" * (1 << 20)

        with pytest.raises(BlobError, match="takes at most 10.0 MiB per blob") as err:
            asyncio.run(store.put_stream("alice", gpu_magic._payload.digest(b"x"), body(),
                                         max_bytes=10 * MIB, size_hint=64 * MIB))
        assert err.value.status == 413
        assert _sizes(store.reserve.folder) == [65 * MIB]
    finally:
        store.close()
