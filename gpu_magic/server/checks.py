"""Digests checked beside the work, for files the gateway's own user wrote on this host.

A same-host client's inbox file and an unsandboxed runner's result are written by the user
the gateway runs as, who could write into the store directly: checking their digest guards
the store's promise that a digest names its content (an unchanged input is never sent again),
not a boundary. So such a file goes into the store at once and its digest is checked on
another thread while the cell runs or the client binds, instead of before (256 MiB: ~11 ms,
twice a round trip). The promise holds because a job's outcome waits for the checks of its
inputs (a failed one fails the job), a blob that fails is removed, and a marker beside each
blob under check makes a gateway that died meanwhile check it again when it starts.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

_KEPT_FAILURES = 1000


def marker(blob: Path) -> Path:
    return blob.with_name(f".{blob.name}.unchecked")


class Checks:
    """Checks of published blobs. ``hash_fd(fd) -> (digest, size)`` hashes an open file;
    ``good(size)`` hears of each blob that passed (the reserve keeps files of their sizes)."""

    def __init__(self, hash_fd: Callable[[int], tuple[str, int]],
                 good: Callable[[int], None]) -> None:
        self._hash_fd = hash_fd
        self._good = good
        self._lock = threading.Lock()
        self._pending: dict[Path, list[Future[None]]] = {}
        self._failed: collections.OrderedDict[Path, str] = collections.OrderedDict()
        # one thread: a check uses a core the cell or the client does not need at that moment,
        # never both
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gpu-magic-check")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def publish(self, tmp: Path, blob: Path, digest: str) -> None:
        """Move ``tmp`` (regular, of a fitting size) to ``blob`` and check it beside."""
        with self._lock:
            marker(blob).touch()  # before the blob appears: a crash leaves it to check
            st = os.stat(tmp)
            os.replace(tmp, blob)
            fut: Future[None] = Future()
            self._pending.setdefault(blob, []).append(fut)
            self._failed.pop(blob, None)
        try:
            self._pool.submit(self._check, blob, digest, (st.st_dev, st.st_ino), fut)
        except RuntimeError:  # shutting down: checked now
            self._check(blob, digest, (st.st_dev, st.st_ino), fut)

    def waiting(self, blobs: list[Path]) -> list[Future[None]]:
        with self._lock:
            return [f for b in blobs for f in self._pending.get(b, ())]

    def failure(self, blob: Path) -> str | None:
        with self._lock:
            return self._failed.get(blob)

    def _check(self, blob: Path, digest: str, ident: tuple[int, int], fut: Future[None]) -> None:
        try:
            why = self._mismatch(blob, digest, ident)
            if why is not None:
                with self._lock:
                    self._failed[blob] = why
                    while len(self._failed) > _KEPT_FAILURES:
                        self._failed.popitem(last=False)
                print(f"gpu-magic: blob {digest} removed: {why}", file=sys.stderr, flush=True)
        except Exception as exc:  # (no disk, ...) the blob stays marked, checked at the next start
            print(f"gpu-magic: could not check blob {digest}: {exc}", file=sys.stderr,
                  flush=True)
        finally:
            with self._lock:
                left = self._pending.get(blob, [])
                if fut in left:
                    left.remove(fut)
                if not left:
                    self._pending.pop(blob, None)
                    with contextlib.suppress(OSError):
                        marker(blob).unlink()
            fut.set_result(None)

    def _mismatch(self, blob: Path, digest: str, ident: tuple[int, int]) -> str | None:
        """Why the file published as ``blob`` is not ``digest`` (it is then removed); None
        if it is, or if it was since replaced by another (whose own check decides)."""
        try:
            fd = os.open(blob, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # collected meanwhile
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != ident:
                return None
            got, size = self._hash_fd(fd)
        finally:
            os.close(fd)
        if got == digest:
            self._good(size)
            return None
        with self._lock:
            with contextlib.suppress(OSError):
                now = os.stat(blob, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == ident:
                    blob.unlink()
        return f"its content is {got}, not what its writer named it"

    def recheck(self, root: Path) -> None:
        """At start: check the blobs whose check a gateway that stopped left unfinished."""
        for mark in root.glob("*/.*.unchecked"):
            blob = mark.with_name(mark.name[1 : -len(".unchecked")])
            head, _, tail = blob.name.rpartition("-")  # (a digest's file name: ':' as '-')
            digest = f"{head}:{tail}"
            with contextlib.suppress(OSError):
                st = os.stat(blob, follow_symlinks=False)
                self._mismatch(blob, digest, (st.st_dev, st.st_ino))
            with contextlib.suppress(OSError):
                mark.unlink()
