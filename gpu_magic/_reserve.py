"""Files written ahead of time for large blobs.

On a virtual machine the first write into memory the guest has not touched lately costs ~0.4
GiB/s (the host maps each page on demand), while writing over the pages of a file written a
while ago runs at memcpy speed: 256 MiB took 0.65 s into a new file and 0.05 s over an old one
here. So the gateway keeps a few files of the sizes its users have been sending, written while
nothing else runs, and whoever writes a large blob (a client on this host, a runner, the
gateway's own upload path) moves one of them into place and writes over it.

A reserve file's name is ``<size>.<random>``: its size is known without a stat, and moving it
away (a link, then an unlink that only one writer can win) is how one writer takes it,
exclusively, with no lock.
"""

from __future__ import annotations

import os
import threading
from typing import Any

RESERVE_MIN = 4 << 20  # smaller blobs: a new file costs about as much as reusing one


def take(reserve: str | os.PathLike[str] | None, size: int, dest: str | os.PathLike[str]) -> bool:
    """Move the smallest reserve file of at least ``size`` bytes to ``dest``; False if none."""
    if reserve is None or size < RESERVE_MIN:
        return False
    for _, name in sorted(f for f in files(reserve) if f[0] >= size):
        src = os.path.join(reserve, name)
        # link, then unlink: unlike a rename this never replaces an existing ``dest``, and of
        # several writers that linked the same file only the one whose unlink succeeds has it
        try:
            os.link(src, dest)
        except FileNotFoundError:
            continue  # another writer took it first
        except OSError:
            return False  # dest exists, or links are not possible here
        try:
            os.unlink(src)
            return True
        except OSError:
            os.unlink(dest)  # another writer won it
    return False


def files(reserve: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """The reserve's whole files as (size, name); none if the folder cannot be read."""
    try:
        names = os.listdir(reserve)
    except OSError:
        return []
    return [(int(head), name) for name in names
            if (head := name.partition(".")[0]).isdigit()]


def open_for(dest: str | os.PathLike[str], size: int,
             reserve: str | os.PathLike[str] | None) -> tuple[int, bool]:
    """A new file at ``dest`` (0600, which must not exist) to write ``size`` bytes into from
    its start, over a reserve file's pages when one fits. Returns the fd and whether it came
    from the reserve: then the caller truncates it to the bytes written (:func:`finish`)."""
    if take(reserve, size, dest):
        try:
            return os.open(dest, os.O_WRONLY), True
        except OSError:
            os.unlink(dest)
    return os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), False


def finish(fd: int, written: int, reused: bool) -> None:
    """Cut a reused file to what was written (it may have been longer)."""
    if reused:
        os.ftruncate(fd, written)


HASH_STEP = 4 << 20  # a piece hashed just before it is written is still in the CPU's cache
HASH_ALONGSIDE_MIN = 64 << 20  # larger data is hashed on another thread where a core is free


def write_file(dest: str | os.PathLike[str], data: memoryview,
               reserve: str | os.PathLike[str] | None, hasher: Any = None) -> None:
    """Write ``data`` (bytes) as the new file ``dest``, into a reserve file when one fits.
    With ``hasher``, the bytes are also fed to its ``update``: on one core each piece just
    before its write, one pass over memory instead of two (a 256 MiB result: 28 ms, not 37);
    large data where another core is free, on a thread of its own while it is written."""
    fd, reused = open_for(dest, data.nbytes, reserve)
    try:
        alongside = hasher is not None and data.nbytes >= HASH_ALONGSIDE_MIN and _spare_core()
        if not (alongside and _write_hashing_alongside(fd, data, hasher)):
            step = HASH_STEP if hasher is not None else max(data.nbytes, 1)
            for at in range(0, data.nbytes, step):
                if hasher is not None:
                    hasher.update(data[at:at + step])
                _write_all(fd, data[at:at + step])
        finish(fd, data.nbytes, reused)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:  # one write() stops short of 2 GiB
        data = data[os.write(fd, data):]


def _write_hashing_alongside(fd: int, data: memoryview, hasher: Any) -> bool:
    """Hash ``data`` on another thread while it is written: xxhash lets go of the GIL, so
    with a core to spare the hash adds nothing (a 1 GiB result here: 0.18-0.22 s, against
    0.28-0.32 s hashing each piece before its write). False, having written nothing, where
    no thread can be started (a cell left as many as a pids limit allows)."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            hasher.update(data)
        except BaseException as exc:  # (re-raised on the writer's thread)
            failed.append(exc)

    thread = threading.Thread(target=run, name="gpu-magic-hash", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # "can't start new thread"
        return False
    try:
        _write_all(fd, data)
    finally:
        thread.join()  # the hasher is not the caller's to read before it is done
    if failed:
        raise failed[0]
    return True


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the system says it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _spare_core() -> bool:
    return usable_cores() > 1


def round_up(size: int) -> int:
    """The size of the reserve file made for a blob of ``size`` bytes (whole MiB, so a blob a
    few bytes longer next time still fits)."""
    mib = 1 << 20
    return -(-size // mib) * mib + mib
