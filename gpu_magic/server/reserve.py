"""Keeps the blob reserve (see :mod:`gpu_magic._reserve`) filled: after large blobs have been
written, files of their sizes are written again in a low-priority thread once the data path has
been quiet for a moment, up to a cap."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from .._reserve import RESERVE_MIN, files, round_up

log = logging.getLogger("gpu_magic.gateway")

RECENT = 4  # how many of the latest large blob sizes to keep a file ready for
QUIET_S = 0.3  # fill only after the data path has rested this long
_ZEROS = bytes(8 << 20)
MIN_FREE = 2 << 30  # never fill the disk below this much free space


def default_cap() -> int:
    """An eighth of this host's memory, at most 8 GiB: room for one round trip (the input's
    file and the result's) of blobs up to a sixteenth of memory each. With room for one file
    only, the upload took it and the result was written into new pages: a 1 GiB round trip
    over HTTP spent 2.5-3.5 s moving data on a 24 GiB VM, against 1.3-2.0 s with both."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 8 << 30
    return min(8 << 30, ram // 8)


def crowded(running: int, cores: int) -> bool:
    """Whether the cells running on this host may want every core but the one the gateway and
    its clients need: filling waits then. Waiting whenever any cell ran, a busy shared GPU
    server (a cell always running) never filled its reserve, though most of its cores idled."""
    return running > 0 and running >= cores - 1


def room_for(folder: Path, size: int) -> bool:
    """Whether the disk of ``folder`` keeps enough free after ``size`` more bytes: the reserve
    must never be what makes a user's own upload fail for want of space."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    return free - size >= max(MIN_FREE, total // 10, 2 * size)


class Reserve:
    def __init__(self, folder: Path, cap: int, busy: Callable[[], bool] = lambda: False) -> None:
        self.folder = folder
        self.cap = cap
        # while it says so (jobs are running), filling waits: it would take CPU and the pages
        # just freed from the cells that are running
        self.busy = busy
        folder.mkdir(exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)  # made by an older gateway, or by hand
        for name in os.listdir(folder):  # left by a gateway that was killed
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
        self._recent: collections.deque[int] = collections.deque(maxlen=RECENT)
        self._wake = threading.Condition()
        self._noted = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def note(self, size: int) -> None:
        """A blob of ``size`` bytes was just written: keep a file of that size ready."""
        if size < RESERVE_MIN or self.cap <= 0:
            return
        with self._wake:
            self._recent.append(round_up(size))
            self._noted += 1
            self._wake.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gpu-magic-reserve",
                                                daemon=True)
                self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
        # scratch, not state: a stopped gateway leaves no disk taken (quotas on shared homes)
        with contextlib.suppress(OSError):  # (the state directory may be gone)
            for name in os.listdir(self.folder):  # whole files and parts
                with contextlib.suppress(OSError):
                    os.unlink(self.folder / name)

    def wanted(self) -> tuple[list[int], list[str]]:
        """Sizes of the files to write and names of files to drop, so that the reserve holds a
        file for each recent size, within the cap."""
        with self._wake:
            want = sorted(self._recent, reverse=True)
        have = sorted(files(self.folder), reverse=True)
        unused = list(have)
        missing = []
        for size in want:
            fit = [h for h in unused if h[0] >= size]
            if fit:
                unused.remove(min(fit))
            else:
                missing.append(size)
        drop = [name for _, name in unused]  # sizes nobody has sent lately
        total = sum(s for s, _ in have) - sum(s for s, _ in unused)
        make = []
        for size in sorted(missing):
            if total + size <= self.cap:
                make.append(size)
                total += size
        return make, drop

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # lowest priority: cells and transfers come first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        again = False
        while True:
            with self._wake:
                while not self._closed and not self._noted and not again:
                    self._wake.wait()
                again = False
                # wait for the burst of writes and the jobs to end, then fill what they used
                while not self._closed and (self._noted or self.busy()):
                    self._noted = 0
                    self._wake.wait(QUIET_S)
                if self._closed:
                    return
            make, drop = self.wanted()
            drop += [name for size, name in self._parts() if size not in make]
            for name in drop:
                with contextlib.suppress(OSError):
                    os.unlink(self.folder / name)
            for size in make:
                done = self._write(size)
                if done is None:  # a job or a blob came: wait for quiet again, then go on
                    again = True
                if not done:
                    break

    def _interrupted(self) -> bool:
        return self._closed or bool(self._noted) or self.busy()

    def _parts(self) -> list[tuple[int, str]]:
        """Files begun and not finished, as (size they are for, name)."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        return [(int(n.split(".")[1]), n) for n in names
                if n.startswith(".") and n.endswith(".part") and n.split(".")[1].isdigit()]

    def _write(self, size: int) -> bool | None:
        """Write one reserve file: True when written, False when it cannot be (disk), None
        when interrupted by a job, a blob or closing. An interrupted file is kept and the next
        quiet moment goes on with it: on a virtual machine the pages it got cost the most, and
        a 1 s pause between a user's cells is too short to write a large file from the start."""
        begun = [name for s, name in self._parts() if s == size]
        part = self.folder / (begun[0] if begun else f".{size}.{os.urandom(6).hex()}.part")
        try:
            done = part.stat().st_size if begun else 0
        except OSError:
            return None  # gone meanwhile: begun again at the next quiet moment
        if not room_for(self.folder, size - done):
            log.info("blob reserve: not writing %d bytes more, the disk of %s is nearly full",
                     size - done, self.folder)
            for _, name in self._parts():  # their bytes too go back to the users' uploads
                with contextlib.suppress(OSError):
                    os.unlink(self.folder / name)
            return False
        try:
            # a part that went meanwhile is not made again here: its end would be a hole
            fd = os.open(part, os.O_WRONLY if begun else os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o600)
            try:
                done = os.fstat(fd).st_size
                if done > size:
                    os.ftruncate(fd, size)
                    done = size
                os.lseek(fd, done, os.SEEK_SET)
                view = memoryview(_ZEROS)
                while done < size and not self._interrupted():
                    done += os.write(fd, view[: min(len(_ZEROS), size - done)])
            finally:
                os.close(fd)
            if done < size:
                return None
            os.rename(part, self.folder / f"{size}.{os.urandom(6).hex()}")
            return True
        except FileNotFoundError:
            return None  # the part went between the look and the open: begun again later
        except OSError as exc:  # a full disk: stop until more blobs come
            log.warning("cannot fill the blob reserve in %s: %s", self.folder, exc)
            with contextlib.suppress(OSError):
                os.unlink(part)
            return False
