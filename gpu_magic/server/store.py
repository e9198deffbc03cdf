"""The gateway's durable state: job records and event logs in SQLite, blobs on disk.

SQLite runs in WAL mode with one writer thread that commits in batches, so thousands of output
events per second cost one commit every few milliseconds, not one each. Blobs live in one folder
per user (a user can neither probe nor poison another's cache) and are verified against their
digest before they are stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from .. import _reserve
from .._payload import DIGEST_PREFIX, PIECES_PREFIX, Checker, digest_of, is_digest
from .checks import Checks
from .limits import human
from .reserve import Reserve

log = logging.getLogger("gpu_magic.gateway")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    state TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""
_BATCH_S = 0.005
RETRY_S = 0.5  # a batch that could not be written (disk full) is written again this often


class StoreError(Exception):
    """The state directory cannot be written (disk full, permissions)."""


class Store:
    """Job records and event logs, written in bursts by one writer thread, or at once by
    :meth:`save_job_now` (a job's end, before its client hears of it).

    A write that fails (the disk is full) is kept, in order, and tried again until it goes
    through: nothing is dropped while the gateway runs. Meanwhile ``error`` says why, the
    gateway's log says so once, and the gateway takes no new job."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "gateway.sqlite3"
        # 0600 like the token file (SQLite gives its -wal and -shm files the database's mode):
        # the state folder's 0700 guards them too, unless someone widens it
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        for f in (self.path, *(self.path.with_name(self.path.name + x) for x in ("-wal", "-shm"))):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f, 0o600)
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        conn.commit()
        conn.close()
        # Writes wait here, in order, until whoever holds _write_lock takes them: so a write
        # made at once carries every earlier one with it (a job's `done` event with its record)
        self._items: collections.deque[tuple[str, tuple[Any, ...]]] = collections.deque()
        self._cv = threading.Condition()
        self._write_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._closing = False
        self._flushed = threading.Condition()
        self._pending = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._writer, daemon=True, name="gpu-magic-store")
        self._thread.start()

    def _writer(self) -> None:
        while True:
            with self._cv:
                while not self._items and not self._closing:
                    self._cv.wait()
                if not self._items:
                    break
            # let a burst gather, then take it whole: waking for each item costs the event
            # loop a thread switch per event
            time.sleep(_BATCH_S)
            with self._write_lock:
                failed = not self._write(5000)
            if failed:
                if self._closing:
                    with self._cv:
                        left = len(self._items)
                    _say(f"stopping with {left} changes to the job store not written: "
                         f"{self.error}")
                    break
                time.sleep(RETRY_S)
        with self._write_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _write(self, most: int | None = None) -> bool:
        """Write what waits (at most ``most`` items; holding _write_lock). On failure it is
        put back in front, in order, for the next try; False then."""
        with self._cv:
            n = len(self._items) if most is None or self.error is not None else min(
                most, len(self._items))
            batch = [self._items.popleft() for _ in range(n)]
        if not batch:
            return True
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(self.path, check_same_thread=False)
                self._conn.execute("PRAGMA synchronous=NORMAL")
            with self._conn:
                for sql, args in batch:
                    self._conn.execute(sql, args)
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if self._conn is not None:
                    self._conn.close()  # a fresh connection for the next try
            self._conn = None
            with self._cv:
                self._items.extendleft(reversed(batch))
            if self.error is None:
                _say(f"cannot write the job store {self.path}: {exc}; keeping what was "
                     f"not written and trying again every {RETRY_S:g} s. Free space on its "
                     "disk. Until then the gateway takes no new job.")
            self.error = exc
            return False
        if self.error is not None:
            self.error = None
            _say("the job store is writable again; nothing was lost")
        with self._flushed:
            self._pending -= len(batch)
            self._flushed.notify_all()
        return True

    def _put(self, sql: str, args: tuple[Any, ...]) -> None:
        with self._flushed:
            self._pending += 1
        with self._cv:
            self._items.append((sql, args))
            self._cv.notify()

    def save_job(self, record: dict[str, Any]) -> None:
        self._put(
            "INSERT OR REPLACE INTO jobs (id, user, state, record) VALUES (?, ?, ?, ?)",
            (record["id"], record["user"], record["state"], json.dumps(record)),
        )

    def save_job_now(self, record: dict[str, Any]) -> None:
        """Save the record, and everything saved before it, before returning (tens of µs on
        the caller's thread, rather than a wait for the writer's next burst); while the store
        cannot be written it waits in line like any other write."""
        self.save_job(record)
        if self.error is None:
            with self._write_lock:
                self._write()

    def add_event(self, job_id: str, seq: int, event: dict[str, Any]) -> None:
        self._put(
            "INSERT OR REPLACE INTO events (job_id, seq, data) VALUES (?, ?, ?)",
            (job_id, seq, json.dumps(event)),
        )

    def delete_job(self, job_id: str) -> None:
        self._put("DELETE FROM events WHERE job_id = ?", (job_id,))
        self._put("DELETE FROM jobs WHERE id = ?", (job_id,))

    def flush(self, timeout: float = 10.0) -> None:
        with self._flushed:
            self._flushed.wait_for(lambda: self._pending <= 0, timeout)

    def close(self) -> None:
        self.flush()
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def load_jobs(self) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.path)
        try:
            return [json.loads(r[0]) for r in conn.execute("SELECT record FROM jobs")]
        finally:
            conn.close()

    def load_events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.path)
        try:
            rows = conn.execute(
                "SELECT data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
                (job_id, after),
            )
            return [json.loads(r[0]) for r in rows]
        finally:
            conn.close()


def _say(text: str) -> None:
    print(f"gpu-magic: {text}", file=sys.stderr, flush=True)


class BlobError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_WRITE_BATCH = 4 << 20


def _write_all(fd: int, parts: list[bytes] | list[memoryview]) -> None:
    """Write ``parts`` in order, however the system splits the writes."""
    views = [memoryview(p) for p in parts if p]
    while views:
        n = os.writev(fd, views[:512])  # at most IOV_MAX buffers per call
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


class _Landing:
    """A blob being received: its file, its running digest and the bytes written so far."""

    def __init__(self, fd: int, checker: Checker) -> None:
        self.fd, self.checker, self.size = fd, checker, 0


def _open_regular(path: Path, max_bytes: int | None = None) -> tuple[int, int]:
    """A descriptor and the size of the regular file at ``path``, refusing anything else: a
    link (followed, it would read what the writer could not), a FIFO or device (it would block
    or never end), or more than ``max_bytes``. Files handed over by runners and clients are
    theirs to make, so nothing about them is trusted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BlobError(400, f"{path.name} is a link, not a file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BlobError(400, f"{path.name} is not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise _too_large(max_bytes, st.st_size)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _too_large(cap: int, size: int | None = None) -> BlobError:
    # as the refusal from Content-Length says it (api.py), with what to do
    what = f"is {human(size)}" if size else f"is over {human(cap)}"
    return BlobError(413, f"the blob {what}; this gateway takes at most {human(cap)} per blob "
                          "(--max-blob-bytes)")


# Files are read through one buffer small enough to stay in the core's own cache while it is
# hashed: a 256 MiB file took 42-44 ms to hash this way against 50-55 ms through 4 MiB.
_READ_STEP = 256 << 10


def _hash_fd(fd: int, max_bytes: int | None = None,
             like: str = DIGEST_PREFIX) -> tuple[str, int]:
    """The digest and size of what the open file ``fd`` holds (read from its start), in the
    scheme of the digest ``like``."""
    h = Checker(like)
    buf = bytearray(_READ_STEP)
    view = memoryview(buf)
    size = 0
    with open(fd, "rb", buffering=0, closefd=False) as f:
        f.seek(0)
        while n := f.readinto(buf):
            size += n
            if max_bytes is not None and size > max_bytes:  # it grew while read
                raise _too_large(max_bytes)
            h.update(view[:n])
    return h.result(), size


def _hash_file(path: Path, max_bytes: int | None = None,
               like: str = DIGEST_PREFIX) -> tuple[str, int]:
    """The digest and size of the regular file at ``path`` (see :func:`_open_regular`)."""
    fd, _ = _open_regular(path, max_bytes)
    try:
        return _hash_fd(fd, max_bytes, like)
    finally:
        os.close(fd)


def _copy_out(folder_fd: int, name: str, dest: Path, max_bytes: int | None,
              like: str = DIGEST_PREFIX) -> tuple[str, int]:
    """Copy the regular file ``name`` of the folder ``folder_fd`` to the new file ``dest``,
    refusing anything else (see :func:`_hash_file`) and more than ``max_bytes``; the digest
    and size of what was copied (hashed on the way: no second read)."""
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                  dir_fd=folder_fd)
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            raise BlobError(400, f"{name} is not a regular file")
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            h = Checker(like)
            buf = bytearray(_READ_STEP)
            view = memoryview(buf)
            size = 0
            while n := os.readv(src, [buf]):
                size += n
                if max_bytes is not None and size > max_bytes:
                    raise _too_large(max_bytes)
                h.update(view[:n])
                _write_all(out, [view[:n]])
            return h.result(), size
        except BaseException:
            os.unlink(dest)  # nothing half-copied stays in the store
            raise
        finally:
            os.close(out)
    finally:
        os.close(src)


_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def user_folder(user: str) -> str:
    """The name of ``user``'s own folder: the name itself where it is plain (lowercase
    letters, digits, ``-_.``), else with every other character percent-encoded. No two users
    may share a folder (each would read the other's blobs): the encoding is one to one, also
    on filesystems that ignore case, and never gives '.', '..' or a hidden name. A name too
    long for a file name ends in a hash of it instead (and in '%', which no encoding does)."""
    out = "".join(c if c in _PLAIN and not (c == "." and i == 0)
                  else "".join(f"%{b:02x}" for b in c.encode("utf-8", "surrogatepass"))
                  for i, c in enumerate(user)) or "%"
    if len(out) > 200:
        out = f"{out[:150]}%{hashlib.sha256(user.encode('utf-8', 'surrogatepass')).hexdigest()}%"
    return out


STORE_FREE_FRACTION = 10  # the store keeps a tenth of its disk free (see make_room)
RECENT_S = 600.0  # a blob used this recently is not removed to make room (sent, not yet run)
ROOM_LOOK_S = 30.0  # a scan not asked for by an upload comes at most this often


def _used_now(blob: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(blob)


def eviction_order(blobs: list[tuple[str, str, int, float]], need: int,
                   keep: Callable[[str, str], bool]) -> list[tuple[str, str]]:
    """Which blobs to remove to free ``need`` bytes, from ``blobs`` as (user, name, size,
    last use): never one ``keep(user, name)`` says to keep; each time, the least recently
    used of the user who holds the most. So whoever filled the disk pays first, and each
    user's newest blobs go last. Pure: no I/O, no clock."""
    per: dict[str, list[tuple[float, str, int]]] = {}
    held: dict[str, int] = {}
    for user, name, size, used in blobs:
        held[user] = held.get(user, 0) + size
        if not keep(user, name):
            per.setdefault(user, []).append((used, name, size))
    for files in per.values():
        files.sort(reverse=True)  # oldest last: popped first
    out: list[tuple[str, str]] = []
    freed = 0
    while freed < need:
        users = [u for u in per if per[u]]
        if not users:
            break
        user = max(users, key=lambda u: (held[u], u))
        _, name, size = per[user].pop()
        held[user] -= size
        freed += size
        out.append((user, name))
    return out


class BlobStore:
    """Content-addressed blobs, one folder per user."""

    def __init__(self, root: Path, reserve_cap: int = 0,
                 busy: Callable[[], bool] = lambda: False) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._made: dict[str, Path] = {}
        # beside the users' folders, never among them (a user may be called anything)
        self.reserve = Reserve(root.parent / "reserve", reserve_cap, busy)
        self.checks = Checks(_hash_fd, self.reserve.note)
        self.checks.recheck(root)
        # the blobs of live jobs by user (the gateway's to say): never removed to make room
        self.needed: Callable[[], dict[str, set[str]]] = dict
        self._room_lock = threading.Lock()
        self._room_looked = -ROOM_LOOK_S  # (monotonic) when make_room last scanned

    def close(self) -> None:
        self.checks.close()
        self.reserve.close()

    def user_dir(self, user: str) -> Path:
        d = self._made.get(user)
        if d is None:  # every blob lookup passes here: one mkdir per user, not per call
            d = self.root / user_folder(user)
            d.mkdir(exist_ok=True, mode=0o700)
            self._made[user] = d
        return d

    def path(self, user: str, digest: str) -> Path:
        if not is_digest(digest):
            raise BlobError(
                400, f"{digest!r} is not a blob digest; expected {DIGEST_PREFIX} (or "
                     f"{PIECES_PREFIX}) and 32 hex digits"
            )
        return self.user_dir(user) / digest.replace(":", "-")

    def has(self, user: str, digest: str) -> bool:
        return self.path(user, digest).exists()

    def missing(self, user: str, digests: list[str]) -> list[str]:
        return [d for d in dict.fromkeys(digests) if not self.has(user, d)]

    @contextlib.contextmanager
    def _landing(self, user: str, digest: str, size_hint: int) -> Iterator[_Landing]:
        """A new file for a blob on its way in, over a reserve file's pages when one fits
        ``size_hint``: kept under its digest if the block within ends well and the bytes fed
        to the landing's checker match it; removed in every other case."""
        final = self.path(user, digest)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}."
                              f"{os.urandom(4).hex()}")
        land = _Landing(-1, Checker(digest))
        try:
            land.fd, reused = _reserve.open_for(tmp, size_hint, self.reserve.folder)
            try:
                yield land
            finally:
                try:
                    _reserve.finish(land.fd, land.size, reused)
                finally:
                    os.close(land.fd)
            got = land.checker.result()
            if got != digest:
                raise BlobError(400, f"blob content does not match its digest: sent as {digest}, content is {got}")
            os.replace(tmp, final)
        except OSError as exc:
            raise BlobError(507, f"the gateway cannot store the blob: {exc}") from exc
        finally:
            if tmp.exists():
                tmp.unlink()
        self.reserve.note(land.size)

    async def put_stream(self, user: str, digest: str, chunks: AsyncIterator[bytes],
                         max_bytes: int | None = None, size_hint: int = 0) -> int:
        """Store an uploaded blob, verifying its digest; nothing is left behind on failure.
        ``size_hint`` (the announced length) picks a reserve file to write over."""
        self.path(user, digest)  # (an invalid digest is refused before anything is taken)
        if max_bytes is not None and size_hint > max_bytes:  # before any file is taken
            raise _too_large(max_bytes, size_hint)
        if size_hint:
            await asyncio.to_thread(self.make_room, size_hint)
        with self._landing(user, digest, size_hint) as land:
            # Writes go to a thread a few MiB at a time while the next ones arrive: the event
            # loop keeps serving everyone else, and receiving overlaps writing (filling new
            # page-cache pages is as slow as the network here).
            writing: asyncio.Future[None] | None = None
            batch: list[bytes] = []
            pending = 0
            try:
                async for chunk in chunks:
                    land.size += len(chunk)
                    if max_bytes is not None and land.size > max_bytes:
                        raise _too_large(max_bytes)
                    land.checker.update(chunk)
                    batch.append(chunk)
                    pending += len(chunk)
                    if pending >= _WRITE_BATCH:
                        if writing is not None:
                            await asyncio.shield(writing)
                        writing = asyncio.ensure_future(asyncio.to_thread(_write_all, land.fd, batch))
                        batch, pending = [], 0
                if writing is not None:
                    await asyncio.shield(writing)
                if batch:
                    writing = asyncio.ensure_future(asyncio.to_thread(_write_all, land.fd, batch))
                    await asyncio.shield(writing)
            finally:
                # never close the file under a write: a cancelled upload (shutdown) waits for
                # the thread, whose write was shielded from the cancel
                if writing is not None:
                    await asyncio.wait([writing])
                    if not writing.cancelled():
                        writing.exception()  # seen: what went wrong first is what is raised
        return land.size

    def put_from(self, user: str, digest: str, size: int, read_into: Callable[[memoryview], int],
                 buffer: memoryview, max_bytes: int | None = None) -> int:
        """Store a blob of exactly ``size`` bytes that ``read_into`` puts into ``buffer`` a
        part at a time (it answers how many bytes it put; 0: the sender stopped). The same
        checks as :meth:`put_stream`; for the bulk listener's threads (server/bulk.py)."""
        self.path(user, digest)
        if max_bytes is not None and size > max_bytes:
            raise _too_large(max_bytes, size)
        self.make_room(size)
        with self._landing(user, digest, size) as land:
            while land.size < size:
                n = read_into(buffer[: min(len(buffer), size - land.size)])
                if n <= 0:
                    raise BlobError(400, f"the upload ended after {land.size} of {size} bytes")
                land.checker.update(buffer[:n])
                _write_all(land.fd, [buffer[:n]])
                land.size += n
        return size

    def put_bytes(self, user: str, digest: str, data: bytes) -> None:
        """Store a small blob sent inside a request, verifying its digest like an upload."""
        got = digest_of(data, like=digest)
        if got != digest:
            raise BlobError(400, f"blob content does not match its digest: sent as {digest}, "
                                 f"content is {got}")
        final = self.path(user, digest)
        if final.exists():
            return
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise BlobError(507, f"the gateway cannot store the blob: {exc}") from exc

    def read_small(self, user: str, digests: list[str], limit: int) -> dict[str, bytes] | None:
        """The content of these blobs if they are all here and together at most ``limit``
        bytes; else None."""
        paths = {d: self.path(user, d) for d in digests}
        try:
            if sum(p.stat().st_size for p in paths.values()) > limit:
                return None
            return {d: p.read_bytes() for d, p in paths.items()}
        except OSError:
            return None

    def inbox(self, user: str) -> Path:
        """Where a client on this host writes blobs for :meth:`adopt_inbox` (0700)."""
        d = self.root.parent / "inbox" / user_folder(user)
        d.parent.mkdir(exist_ok=True, mode=0o700)  # (parents=True would make it 0755)
        d.mkdir(exist_ok=True, mode=0o700)
        return d

    def sweep_inbox(self, cutoff: float) -> int:
        """Remove inbox files last written before ``cutoff``: a client killed while it wrote
        one (a kernel restarted during a large upload) never hands it over. Returns how many."""
        removed = 0
        inbox = self.root.parent / "inbox"
        with contextlib.suppress(OSError):
            for user_dir in os.scandir(inbox):
                with contextlib.suppress(OSError):
                    for f in os.scandir(user_dir.path):
                        try:
                            if f.stat(follow_symlinks=False).st_mtime < cutoff:
                                os.unlink(f.path)
                                removed += 1
                        except OSError:
                            continue
        return removed

    def adopt_inbox(self, user: str, name: str, digest: str, max_bytes: int | None = None) -> int:
        """Move ``inbox/name`` into the store; its content is checked against ``digest`` beside
        the job that uses it (the inbox is offered only to the gateway's own user), and a
        mismatching file is removed, never kept."""
        if "/" in name or name in ("", ".", ".."):
            raise BlobError(400, f"{name!r} is not a file name")
        try:
            return self.adopt(user, self.inbox(user), name, digest, max_bytes, beside=True)
        except BlobError as exc:
            if exc.status == 404:
                raise BlobError(404, f"there is no file {name!r} in your inbox") from None
            raise

    def adopt(self, user: str, folder: Path, name: str, digest: str,
              max_bytes: int | None = None, copy: bool = False, beside: bool = False) -> int:
        """Move the file ``folder/name`` (a runner's result, a client's inbox file) into the
        user's store if its content has ``digest``; returns its size. ``folder`` is its
        writer's (a runner may replace it with a link to someone else's folder); its parent
        is the gateway's. The file is first moved into the gateway's own folder, so what is
        verified is what is kept: its writer can neither swap it afterwards nor make it, or
        the folder it is in, a link to someone else's file. ``copy``: copied instead, for a
        writer that may still hold the file open (a sandboxed runner: a descriptor it kept
        would change the stored blob after its check). ``beside``: stored at once and checked
        on another thread (see :mod:`.checks`), for a writer who is the gateway's own user."""
        dest = self.path(user, digest)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.adopt")
        at = None
        try:
            parent = os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                at = os.open(folder.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, dir_fd=parent)
            finally:
                os.close(parent)
            try:
                copied = None
                if copy:
                    copied = _copy_out(at, name, tmp, max_bytes, digest)
                    os.unlink(name, dir_fd=at)
                else:
                    os.rename(name, tmp, src_dir_fd=at)
            finally:
                os.close(at)
        except FileNotFoundError:
            raise BlobError(404, f"there is no file {name!r} to take") from None
        except OSError as exc:
            # (the folder, or, once it was open, the file: a red team's link in place of a
            # result file was said to be a folder that was not one)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise BlobError(400, f"{folder.name} is not a folder" if at is None
                                else f"{name} is a link, not a file") from None
            raise BlobError(507, f"the gateway cannot store the blob: {exc}") from exc
        try:
            if beside and copied is None:
                fd, size = _open_regular(tmp, max_bytes)
                os.close(fd)
                if not dest.exists():
                    self.checks.publish(tmp, dest, digest)
                else:
                    _used_now(dest)
                return size
            got, size = copied or _hash_file(tmp, max_bytes, digest)
            if got != digest:
                raise BlobError(400, f"blob content does not match its digest: sent as "
                                     f"{digest}, content is {got}")
            self.reserve.note(size)
            if dest.exists():
                _used_now(dest)  # (an older blob of the same bytes: used now, kept as new)
                return size
            os.replace(tmp, dest)
            return size
        except OSError as exc:
            raise BlobError(507, f"the gateway cannot store the blob: {exc}") from exc
        finally:
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def total_size(self, user: str, digests: list[str]) -> int:
        total = 0
        for d in dict.fromkeys(digests):
            try:
                total += self.path(user, d).stat().st_size
            except OSError:
                continue
        return total

    def touch(self, user: str, digests: list[str]) -> None:
        """Mark blobs as used now (retention counts from the last use)."""
        for d in dict.fromkeys(digests):
            _used_now(self.path(user, d))

    def make_room(self, size: int) -> int:
        """Before ``size`` more bytes are stored: if the disk would then keep less than a
        tenth free, remove blobs no live job needs and none used in the last RECENT_S,
        in :func:`eviction_order`, until it keeps it. Every changed input and every result
        is a new blob, kept for the retention period: a day of reruns of a cell with a large
        input filled the disk, and a full store takes no new job. Returns the bytes freed."""
        try:
            st = os.statvfs(self.root)
        except OSError:
            return 0
        need = size + st.f_blocks * st.f_frsize // STORE_FREE_FRACTION - \
            st.f_bavail * st.f_frsize
        if need <= 0:
            return 0
        if not size and time.monotonic() - self._room_looked < ROOM_LOOK_S:
            return 0  # (a disk full of what is not ours: not a scan at every submit)
        self._room_looked = time.monotonic()
        with self._room_lock:  # (two uploads at once would each remove for both)
            needed = {user_folder(u): {d.replace(":", "-") for d in ds}
                      for u, ds in self.needed().items()}
            recent = time.time() - RECENT_S
            blobs: list[tuple[str, str, int, float]] = []
            for user_dir in self.root.iterdir():
                with contextlib.suppress(OSError):
                    for f in os.scandir(user_dir):
                        if f.name.startswith(".") or not f.is_file(follow_symlinks=False):
                            continue  # (being written, or under check)
                        info = f.stat(follow_symlinks=False)
                        blobs.append((user_dir.name, f.name, info.st_size, info.st_mtime))
            seen = {(u, n): (z, t) for u, n, z, t in blobs}  # size and last use
            order = eviction_order(blobs, need, lambda u, n: n in needed.get(u, ()) or
                                   seen[(u, n)][1] >= recent)
            freed, users = 0, set()
            for user, name in order:
                with contextlib.suppress(OSError):
                    os.unlink(self.root / user / name)
                    freed += seen[(user, name)][0]
                    users.add(user)
        if order:
            log.warning("the state directory's disk keeps less than a tenth free: removed %d "
                        "unused blobs (%s), least recently used first, of the users holding "
                        "the most (%s)", len(order), human(freed), ", ".join(sorted(users)))
        return freed

    def collect(self, cutoff: float, needed: dict[str, set[str]]) -> int:
        """Delete blobs unused since ``cutoff`` that no live job needs."""
        removed = 0
        needed = {user_folder(u): digests for u, digests in needed.items()}
        for user_dir in self.root.iterdir():
            keep = {d.replace(":", "-") for d in needed.get(user_dir.name, set())}
            for f in user_dir.iterdir():
                try:
                    if f.name not in keep and f.stat().st_mtime < cutoff:
                        f.unlink()
                        removed += 1
                except OSError:
                    continue
        return removed

    def reader(self, user: str, digest: str) -> io.FileIO:
        """The stored blob, open for reading (FileNotFoundError where there is none). What
        make_room removes meanwhile is still read whole: it is unlinked, never rewritten."""
        fd = os.open(self.path(user, digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return io.FileIO(fd, "rb")

    async def iter_file(self, user: str, digest: str) -> AsyncIterator[bytes]:
        """The blob's bytes in large chunks read off the event loop (one thread hop per 8 MiB,
        not per MiB). Each chunk is a new bytes object: a transport may keep what it could
        not send yet, so a reused buffer could change under it."""
        f = await asyncio.to_thread(self.reader, user, digest)
        try:
            while chunk := await asyncio.to_thread(f.read, 8 << 20):
                yield chunk
        finally:
            f.close()
