"""Warm runners for the local backend: a zygote per interpreter, and keep-warm workers.

Starting Python and importing IPython costs a few hundred milliseconds; forking a process that
already has them costs a few. So each interpreter gets a *zygote* (``python -m gpu_magic.runner
--zygote``) that imports everything once and forks one worker per job. A worker that finished
its job may stay alive for ``keep_warm`` seconds and take the next job with the same key (user,
interpreter, folder, environment and GPUs): a cell that imports torch pays for it once. Workers
are never shared between users, and an idle worker is stopped at once when a job with another
key needs its GPUs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..._embedded import _pid_alive

START_TIMEOUT_S = 15.0
ORPHAN_POLL_S = 0.2


class ZygoteError(Exception):
    """The zygote is gone or did not answer; the caller falls back to a fresh process."""


class Zygote:
    """One warm parent process for one interpreter."""

    def __init__(self, python: str, env: dict[str, str], on_exit: Callable[[int, int], None],
                 on_dead: Callable[[Zygote], None] = lambda z: None) -> None:
        self.python = python
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = subprocess.Popen(
            [python, "-m", "gpu_magic.runner", "--zygote", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        theirs.close()
        self.sock = ours
        self._lock = threading.Lock()
        self._started: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._on_exit = on_exit
        self._on_dead = on_dead
        self.dead = False
        threading.Thread(target=self._read, daemon=True, name="gpu-magic-zygote").start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "started" in msg:
                    with self._cond:
                        self._started[msg["started"]] = msg["pid"]
                        self._cond.notify_all()
                elif "exited" in msg:
                    self._on_exit(int(msg["exited"]), int(msg["status"]))
        with self._cond:
            self.dead = True
            self._cond.notify_all()
        self._on_dead(self)

    def fork(self, request: dict[str, Any], fds: list[int]) -> int:
        """Start a worker; its pid."""
        token = os.urandom(8).hex()
        data = json.dumps({**request, "token": token}).encode()
        with self._lock:
            try:
                socket.send_fds(self.sock, [data], fds)
            except OSError as exc:
                self.dead = True
                raise ZygoteError(f"the zygote for {self.python} is gone: {exc}") from None
        deadline = time.monotonic() + START_TIMEOUT_S
        with self._cond:
            while token not in self._started:
                left = deadline - time.monotonic()
                if self.dead or left <= 0:
                    raise ZygoteError(f"the zygote for {self.python} did not start a worker")
                self._cond.wait(left)
            return int(self._started.pop(token))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        try:
            self.proc.terminate()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


@dataclass
class Worker:
    """A forked runner process, maybe idle and waiting for the next job of its key."""

    pid: int
    key: tuple[Any, ...]
    ctl: socket.socket
    gpus: frozenset[tuple[str, int]]
    idle_since: float | None = None
    exit_code: int | None = None
    exited: threading.Event = field(default_factory=threading.Event)
    zygote: Zygote | None = None  # its parent, who says when it exits


class WarmPool:
    """Zygotes by interpreter and keep-warm workers by key, for one gateway."""

    def __init__(self, keep_warm: float) -> None:
        self.keep_warm = keep_warm
        self._zygotes: dict[str, Zygote] = {}
        self._workers: dict[int, Worker] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._expire, daemon=True, name="gpu-magic-keepwarm").start()

    def prewarm(self, python: str, env: dict[str, str]) -> None:
        try:
            self._zygote(python, env)
        except OSError:
            pass

    def _zygote(self, python: str, env: dict[str, str]) -> Zygote:
        with self._lock:
            z = self._zygotes.get(python)
            if z is None or z.dead or z.proc.poll() is not None:
                z = self._zygotes[python] = Zygote(python, env, self._exited, self._orphaned)
            return z

    def _orphaned(self, z: Zygote) -> None:
        """A zygote died (killed, or out of memory): no one tells its workers' exits now. Idle
        ones are stopped, busy ones when their job ends, and each is watched until it is gone,
        so its job ends and its GPUs are free within a moment, not after the 30 s its end is
        otherwise waited for."""
        with self._lock:
            ours = [w for w in self._workers.values() if w.zygote is z]
        threading.Thread(target=self._watch_orphans, args=(ours,), daemon=True,
                         name="gpu-magic-orphans").start()
        for w in ours:
            if w.idle_since is not None:
                self.stop(w)

    def _watch_orphans(self, workers: list[Worker]) -> None:
        while workers:
            time.sleep(ORPHAN_POLL_S)
            # (a zombie no one reaps is gone too: some containers' first process never
            # reaps the orphans it inherits)
            for w in [w for w in workers if not _pid_alive(w.pid)]:
                workers.remove(w)
                with self._lock:
                    self._workers.pop(w.pid, None)
                w.exited.set()  # (its exit code went to no one: None, "lost")
                w.ctl.close()

    def _exited(self, pid: int, code: int) -> None:
        with self._lock:
            w = self._workers.pop(pid, None)
        if w is not None:
            w.exit_code = code
            w.exited.set()
            w.ctl.close()

    def start(self, key: tuple[Any, ...], gpus: frozenset[tuple[str, int]], python: str,
              env: dict[str, str], job_dir: Path, cwd: str | None, events_fd: int,
              manifest: dict[str, Any] | None = None) -> Worker:
        """Run a job on an idle worker of the same key, or on a new one from the zygote.
        Without ``manifest`` the worker reads JOB_DIR/manifest.json."""
        request: dict[str, Any] = {"job_dir": str(job_dir), "cwd": cwd, "env": env,
                                   "keep_warm": self.keep_warm}
        if manifest is not None:
            request["manifest"] = manifest
        self._evict(gpus, key)
        with self._lock:
            idle = [w for w in self._workers.values() if w.key == key and w.idle_since is not None]
        for w in idle:
            w.idle_since = None
            try:
                socket.send_fds(w.ctl, [json.dumps(request).encode()], [events_fd])
                return w
            except OSError:
                continue  # it just expired; try another or fork
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_fd = -1
        try:
            # a worker captures its output from its start; before that there is nothing to log
            log_fd = os.open(os.devnull, os.O_WRONLY)
            z = self._zygote(python, env)
            pid = z.fork(request, [theirs.fileno(), events_fd, log_fd])
        except (ZygoteError, OSError):
            ours.close()
            raise
        finally:
            theirs.close()
            if log_fd >= 0:
                os.close(log_fd)
        w = Worker(pid, key, ours, gpus, zygote=z)
        with self._lock:
            self._workers[pid] = w
        if z.dead:  # (it died as it forked this one)
            self._orphaned(z)
        return w

    def finished(self, w: Worker, reusable: bool) -> None:
        """The worker's job is over; keep it warm or stop it."""
        orphan = w.zygote is not None and w.zygote.dead
        if reusable and self.keep_warm > 0 and not w.exited.is_set() and not orphan:
            w.idle_since = time.monotonic()
        else:
            self.stop(w)

    def stop(self, w: Worker) -> None:
        try:
            w.ctl.close()
        except OSError:
            pass
        try:
            os.killpg(w.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass

    def held(self) -> set[tuple[str, int]]:
        """The GPUs (node, index) the workers hold, busy or idle."""
        with self._lock:
            return {g for w in self._workers.values() for g in w.gpus}

    def _evict(self, gpus: frozenset[tuple[str, int]], key: tuple[Any, ...]) -> None:
        # an idle worker may hold a CUDA context on GPUs another job is about to get
        with self._lock:
            victims = [w for w in self._workers.values()
                       if w.idle_since is not None and w.key != key and w.gpus & gpus]
        for w in victims:
            self.stop(w)

    def _expire(self) -> None:
        while True:
            time.sleep(max(0.2, min(5.0, self.keep_warm / 4 if self.keep_warm else 5.0)))
            now = time.monotonic()
            with self._lock:
                old = [w for w in self._workers.values()
                       if w.idle_since is not None and now - w.idle_since > self.keep_warm]
            for w in old:
                self.stop(w)

    def shutdown(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
            zygotes = list(self._zygotes.values())
        for w in workers:
            self.stop(w)
        for z in zygotes:
            z.close()
