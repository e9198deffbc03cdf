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

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path


def marker(blob: Path) -> Path:
    return blob.with_name(f".{blob.name}.unchecked")


class Checks:
    """Checks of published blobs. ``hash_fd(fd, max_bytes, like) -> (digest, size)`` hashes
    an open file in the scheme of the digest ``like``;
    ``good(size)`` hears of each blob that passed (the reserve keeps files of their sizes).
    A check's future tells its outcome: None (the blob is what its name says, or was replaced
    meanwhile by a file whose own check decides), or why it was removed."""

    def __init__(self, hash_fd: Callable[[int, int | None, str], tuple[str, int]],
                 good: Callable[[int], None]) -> None:
        self._hash_fd = hash_fd
        self._good = good
        self._lock = threading.Lock()
        self._pending: dict[Path, list[Future[str | None]]] = {}
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
            fut: Future[str | None] = Future()
            self._pending.setdefault(blob, []).append(fut)
        try:
            self._pool.submit(self._check, blob, digest, (st.st_dev, st.st_ino), fut)
        except RuntimeError:  # shutting down: checked now
            self._check(blob, digest, (st.st_dev, st.st_ino), fut)

    def pending(self, blobs: list[Path]) -> dict[Path, list[Future[str | None]]]:
        """The checks of these blobs not finished yet. Taken before asking whether the blobs
        are there, a job sees every check that could still remove one: a check that fails
        removes its blob before its future is done."""
        with self._lock:
            return {b: list(self._pending[b]) for b in blobs if b in self._pending}

    def _check(self, blob: Path, digest: str, ident: tuple[int, int],
               fut: Future[str | None]) -> None:
        why: str | None = None
        settled = True
        try:
            why = self._mismatch(blob, digest, ident)
        except Exception as exc:  # (a read error): unusable as it is, and unchecked
            why = f"it could not be read to check it ({type(exc).__name__}: {exc})"
            settled = self._remove(blob, ident)
        if why is not None:
            print(f"gpu-magic: blob {digest} removed: {why}", file=sys.stderr, flush=True)
        with self._lock:
            left = self._pending.get(blob, [])
            if fut in left:
                left.remove(fut)
            if not left:
                self._pending.pop(blob, None)
                if settled:  # else the marker stays: the next start checks the blob again
                    with contextlib.suppress(OSError):
                        marker(blob).unlink()
        fut.set_result(why)

    def _remove(self, blob: Path, ident: tuple[int, int]) -> bool:
        """Remove ``blob`` if it is still the file ``ident`` names; whether it is gone."""
        with self._lock:
            try:
                now = os.stat(blob, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == ident:
                    blob.unlink()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                return False

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
            got, size = self._hash_fd(fd, None, digest)
        finally:
            os.close(fd)
        if got == digest:
            self._good(size)
            return None
        self._remove(blob, ident)
        return f"its content is {got}, not what its writer named it"

    def recheck(self, root: Path) -> None:
        """At start: check the blobs whose check a gateway that stopped left unfinished."""
        for mark in root.glob("*/.*.unchecked"):
            blob = mark.with_name(mark.name[1 : -len(".unchecked")])
            head, _, tail = blob.name.rpartition("-")  # (a digest's file name: ':' as '-')
            digest = f"{head}:{tail}"
            try:
                st = os.stat(blob, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            except OSError:
                continue  # the marker stays: checked at the next start
            if st is not None:
                ident = (st.st_dev, st.st_ino)
                try:
                    self._mismatch(blob, digest, ident)
                except OSError:  # unreadable: not kept unchecked
                    if not self._remove(blob, ident):
                        continue
            with contextlib.suppress(OSError):
                mark.unlink()
