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

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator
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
    # (opened to read too: a large file is written through a mapping, see _sink)
    if take(reserve, size, dest):
        try:
            return os.open(dest, os.O_RDWR), True
        except OSError:
            os.unlink(dest)
    return os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), False


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
        # the cores a copy may take: not the one hashing alongside, none while hashing per piece
        copiers = 1 if hasher is not None and not alongside else usable_cores() - alongside
        with _sink(fd, data.nbytes, reused, dest, copiers) as put:
            if not (alongside and _write_hashing_alongside(put, data, hasher)):
                step = HASH_STEP if hasher is not None else max(data.nbytes, 1)
                for at in range(0, data.nbytes, step):
                    if hasher is not None:
                        hasher.update(data[at:at + step])
                    put(data[at:at + step])
        finish(fd, data.nbytes, reused)
    finally:
        os.close(fd)


MAP_MIN = 16 << 20  # smaller writes gain too little from a mapping to be worth making one
MAX_COPIERS = 4


@contextlib.contextmanager
def _sink(fd: int, size: int, reused: bool, dest: str | os.PathLike[str],
          copiers: int) -> Iterator[Callable[[memoryview], None]]:
    """Something to hand the bytes to, in order. One core fills a file's 4 KiB pages at about
    half the speed it fills an array's memory, and ``write()`` calls on one file wait for
    each other (its lock). So where ``copiers`` cores may copy, the file is mapped, its
    pages faulted for writing and the bytes copied in, each part by its own thread (numpy
    lets go of the GIL), as Ray's object store copies. 256 MiB on this 2-core VM (ext4): over
    a reserve file 27-38 ms against 55-64 ms through ``write()``; into a new file, whose
    pages cost most to fault on a VM, 86-109 ms against 138-400 ms alone, and 145-260 ms
    against 366-375 ms in a round trip whose cells came too close for the reserve to be
    filled (the faults, as the copies, spread over the cores). Elsewhere, and where
    the kernel cannot fault a mapping for writing (before Linux 5.14), ``write()``. numpy
    is used only where it is loaded: data this large is an array's."""
    np = sys.modules.get("numpy")
    copiers = min(copiers, MAX_COPIERS)
    mapping = (_mapped(fd, size, reused, dest, copiers)
               if size >= MAP_MIN and np is not None and copiers > 1 else None)
    if mapping is None:
        yield lambda piece: _write_all(fd, piece)
        return
    into = [np.frombuffer(mapping, dtype=np.uint8)]
    at = 0

    def put(piece: memoryview) -> None:
        nonlocal at
        _copy_on_threads(into[0][at:at + piece.nbytes], np.frombuffer(piece, dtype=np.uint8),
                         copiers, np)
        at += piece.nbytes

    try:
        yield put
    finally:
        into.clear()  # (the mapping cannot be closed while an array is over it)
        # (an error's traceback may hold arrays over it: then it is unmapped with them)
        with contextlib.suppress(BufferError):
            mapping.close()


def _copy_on_threads(dst: Any, src: Any, n: int, np: Any) -> None:
    """Copy one array of bytes into another of the same size on ``n`` threads, this one
    among them."""
    _on_threads(lambda lo, hi: np.copyto(dst[lo:hi], src[lo:hi]), src.nbytes, n)


def _on_threads(work: Callable[[int, int], Any], size: int, n: int,
                align: int = 1) -> list[Any]:
    """``work(lo, hi)`` for ``n`` parts of ``range(size)`` at once, the first on this thread,
    each part but the last a multiple of ``align`` long; what each returned, in order. A
    part whose thread cannot start (a pids limit a cell reached) is done here too. Returns
    once every part is done, even on an error."""
    step = max(-(-size // (n * align)) * align, align)
    bounds = [(lo, min(lo + step, size)) for lo in range(0, size, step)] or [(0, 0)]
    got: list[Any] = [None] * len(bounds)
    failed: list[BaseException] = []

    def part(i: int) -> None:
        try:
            got[i] = work(*bounds[i])
        except BaseException as exc:  # (raised on the caller's thread below)
            failed.append(exc)

    threads, here = [], [0]
    try:
        for i in range(1, len(bounds)):
            t = threading.Thread(target=part, args=(i,), name="gpu-magic-copy", daemon=True)
            try:
                t.start()
            except RuntimeError:  # "can't start new thread"
                here.append(i)
                continue
            threads.append(t)
        for i in here:
            got[i] = work(*bounds[i])
    finally:
        join_all(threads)  # (never left writing into a mapping that is closed next)
    if failed:
        raise failed[0]
    return got


def join_all(threads: list[threading.Thread]) -> None:
    """Join every thread, even when a Ctrl-C lands in a join (it would skip the joins after
    it, and leave threads writing into memory the caller lets go of next); the first such
    interrupt is raised once all have ended."""
    interrupted: BaseException | None = None
    for t in threads:
        while True:
            try:
                t.join()
                break
            except BaseException as exc:
                interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def _mapped(fd: int, size: int, reused: bool, dest: str | os.PathLike[str],
            threads: int) -> mmap.mmap | None:
    """The first ``size`` bytes of the open file ``fd`` (a reserve file, or a new empty one
    made that long) mapped shared and faulted for writing on ``threads`` threads, or None
    where that is not safe or not possible. A write into a file's mapping that needs disk
    space it cannot get kills the process (SIGBUS): the pages are all faulted before any copy
    (a fault that fails is then an error returned here, and ``write()`` is used), and only
    file systems that write a file's blocks in place are used (one that copies on write
    could need new blocks at a later fault, once the kernel wrote the pages back)."""
    advise = madvise()
    if advise is None or _refused or _fs_type(dest) not in _IN_PLACE_FS:
        return None
    try:
        if not reused:
            os.ftruncate(fd, size)  # (a write() after a failure here fills it from its start)
        elif os.fstat(fd).st_size < size:
            return None
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):
        return None
    anchor = ctypes.c_char.from_buffer(mapping)
    start = ctypes.addressof(anchor)
    del anchor  # (an export would keep the mapping from being closed)
    def fault(lo: int, hi: int) -> int:  # (madvise takes whole pages: lo is a page's start)
        if advise(start + lo, hi - lo, MADV_POPULATE_WRITE) == 0:
            return 0
        return ctypes.get_errno() or -1

    failed = [e for e in _on_threads(fault, size, threads, mmap.PAGESIZE) if e]
    if failed:
        if errno.EINVAL in failed:  # (not ENOSPC, EFAULT: this kernel has no such advice)
            _refused.append(True)
        mapping.close()
        return None
    return mapping


MADV_POPULATE_WRITE = 23
# ext2/3/4, XFS, tmpfs. Not overlayfs: its magic hides the file system its files are written
# to, which may copy on write (btrfs under rootless podman)
_IN_PLACE_FS = {0xEF53, 0x58465342, 0x01021994}
_refused: list[bool] = []  # the kernel said EINVAL to MADV_POPULATE_WRITE (before Linux 5.14)


@functools.cache
def madvise() -> Any:
    """libc's madvise (ctypes lets go of the GIL while it runs), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _fs_type(path: str | os.PathLike[str]) -> int | None:
    """The Linux file system magic number (``statfs``'s ``f_type``) of ``path``, or None."""
    statfs = _statfs()
    if statfs is None:
        return None
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if statfs(os.fsencode(os.fspath(path)), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value  # f_type: the struct's first word


@functools.cache
def _statfs() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).statfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    fn.restype = ctypes.c_int
    return fn


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:  # one write() stops short of 2 GiB
        data = data[os.write(fd, data):]


def _write_hashing_alongside(put: Callable[[memoryview], None], data: memoryview,
                             hasher: Any) -> bool:
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
        put(data)
    finally:
        join_all([thread])  # the hasher is not the caller's to read before it is done
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
