"""The embedded default backend: each job in its own runner subprocess on this host.

The runner gets exactly the granted GPUs: ``CUDA_VISIBLE_DEVICES`` by GPU UUID for real GPUs, and
empty for a simulated grant, so a real GPU on the same machine is never touched by a simulation.
Each runner leads its own process group, so a cancel reaches everything the cell started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..inventory import Gpu, parse_simulated, read_nvml
from .sandbox import bwrap_command

# Variables of the gateway that a cell must never see.
_SECRET_ENV = ("GPU_MAGIC_TOKEN",)


@dataclass
class RunSpec:
    """Everything a backend needs to start one attempt of a job."""

    job_id: str
    attempt: int
    job_dir: Path
    manifest: dict[str, Any]
    gpus: list[Gpu]
    grant_env: dict[str, str]
    python: str | None = None
    cwd: str | None = None
    user: str = ""


@dataclass
class Handle:
    proc: subprocess.Popen[bytes]
    spec: RunSpec
    cancelled: bool = False
    threads: list[threading.Thread] = field(default_factory=list)


EventCallback = Callable[[str, int, dict[str, Any]], None]
ExitCallback = Callable[[str, int, int | None, str], None]


class LocalBackend:
    """Runner subprocesses on this host; GPUs from NVML or a simulated inventory."""

    name = "local"

    def __init__(
        self,
        simulate: str | None = None,
        *,
        client_python: bool = True,
        isolation: str = "none",
        state_dir: Path | None = None,
        hidden_files: tuple[Path, ...] = (),
    ) -> None:
        self.simulated = bool(simulate)
        self._gpus = parse_simulated(simulate) if simulate else read_nvml(own_pids=set())
        # The embedded gateway runs each cell with the submitting kernel's own Python and working
        # directory; a shared gateway uses its own.
        self.client_python = client_python
        self.isolation = isolation
        self.state_dir = state_dir
        self.hidden_files = hidden_files
        self._handles: dict[tuple[str, int], Handle] = {}

    def inventory(self) -> list[Gpu]:
        if self.simulated or not self._gpus:
            return list(self._gpus)
        own = {h.proc.pid for h in self._handles.values()}
        fresh = read_nvml(own_pids=own)
        return fresh or list(self._gpus)

    def start(self, run: RunSpec, on_event: EventCallback, on_exit: ExitCallback) -> Handle:
        run.job_dir.mkdir(parents=True, exist_ok=True)
        (run.job_dir / "manifest.json").write_text(json.dumps(run.manifest))
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
        env.update(run.grant_env)
        python = run.python if (self.client_python and run.python) else sys.executable
        cwd = run.cwd if (self.client_python and run.cwd and os.path.isdir(run.cwd)) else None
        r, w = os.pipe()
        argv = [python, "-m", "gpu_magic.runner", str(run.job_dir), str(w)]
        if self.isolation == "bwrap":
            assert self.state_dir is not None
            m = run.manifest["inputs"]
            argv = bwrap_command(argv, job_dir=run.job_dir, state_dir=self.state_dir,
                                 readable=[m["pickle"], *m["buffers"]],
                                 hidden_files=self.hidden_files)
            env = {k: v for k, v in env.items() if not k.startswith("GPU_MAGIC_") or k in
                   run.grant_env}
        log = open(run.job_dir / "runner.log", "wb")
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd or str(run.job_dir),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(w,),
                start_new_session=True,
            )
        except OSError:
            os.close(r)
            raise
        finally:
            os.close(w)
            log.close()
        handle = Handle(proc, run)
        self._handles[(run.job_id, run.attempt)] = handle
        t = threading.Thread(
            target=self._follow, args=(handle, r, on_event, on_exit), daemon=True,
            name=f"gpu-magic-runner-{run.job_id}",
        )
        handle.threads.append(t)
        t.start()
        return handle

    def _follow(self, handle: Handle, fd: int, on_event: EventCallback, on_exit: ExitCallback) -> None:
        run = handle.spec
        with os.fdopen(fd, "rb") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a runner never writes anything else here; ignore noise
                if isinstance(event, dict) and isinstance(event.get("type"), str):
                    on_event(run.job_id, run.attempt, event)
        rc = handle.proc.wait()
        self._handles.pop((run.job_id, run.attempt), None)
        tail = ""
        try:
            tail = (run.job_dir / "runner.log").read_text(errors="replace")[-4000:]
        except OSError:
            pass
        on_exit(run.job_id, run.attempt, rc, tail)

    def cancel(self, handle: Handle, grace: float = 3.0) -> None:
        """SIGTERM the runner's whole process group, then SIGKILL after ``grace`` seconds."""
        handle.cancelled = True
        pgid = handle.proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def kill_later() -> None:
            try:
                handle.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        threading.Thread(target=kill_later, daemon=True).start()

    def shutdown(self) -> None:
        for handle in list(self._handles.values()):
            self.cancel(handle, grace=1.0)

