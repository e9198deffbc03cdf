"""Shared fixtures: a real gateway on loopback with a simulated pool, and clients for it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpu_magic._client import GatewayClient

SIM_POOL = "H100:2,A100-80GB:4"


@dataclass
class Gateway:
    """A gateway process started for tests."""

    url: str
    token: str
    state_dir: Path
    proc: subprocess.Popen[bytes]
    runtime_file: Path

    def client(self, token: str | None = None) -> GatewayClient:
        return GatewayClient(self.url, token or self.token)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_gateway(tmp: Path, *extra: str, simulate: str | None = SIM_POOL,
                  state_dir: Path | None = None, env: dict[str, str] | None = None,
                  preexec_fn: Any = None) -> Gateway:
    """Start ``gpu-magic serve`` on a free loopback port and wait until it listens."""
    state = state_dir or tmp / "state"
    runtime = tmp / f"runtime-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "gpu_magic", "serve", "--port", "0", "--state-dir", str(state),
           "--runtime-file", str(runtime), *extra]
    if simulate:
        cmd += ["--simulate", simulate]
    with open(tmp / "gateway.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, **(env or {})},
                                preexec_fn=preexec_fn)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if runtime.exists():
            info = json.loads(runtime.read_text())
            if info.get("pid") == proc.pid:
                token = info.get("token") or ""
                return Gateway(info["url"], token, state, proc, runtime)
        if proc.poll() is not None:
            raise RuntimeError((tmp / "gateway.log").read_text())
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("gateway did not start")


def start_class_gateway(tmp: Path) -> tuple[Gateway, dict[str, str]]:
    """A simulated gateway shared by alice and bob, with carol as its admin (an instructor),
    and their tokens."""
    import secrets

    tokens = {name: secrets.token_urlsafe(24) for name in ("alice", "bob", "carol")}
    path = tmp / "tokens.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"alice": tokens["alice"], "bob": tokens["bob"],
                   "carol": {"token": tokens["carol"], "admin": True}}, f)
    return start_gateway(tmp, "--tokens-file", str(path)), tokens


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("gateway"))
    yield gw
    gw.stop()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[GatewayClient]:
    c = gateway.client()
    yield c
    c.close()


@pytest.fixture
def use_gateway(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> Gateway:
    """Point the client side of this process (and kernels it starts) at the test gateway."""
    monkeypatch.setenv("GPU_MAGIC_URL", gateway.url)
    monkeypatch.setenv("GPU_MAGIC_TOKEN", gateway.token)
    return gateway


@contextlib.contextmanager
def ctrl_c_at_line(at: int, *files: str) -> Iterator[list[int]]:
    """Raise KeyboardInterrupt at the ``at``-th line run in code from ``files`` (file name
    endings) on this thread, as a Ctrl-C handled between two lines there would; yields the
    count of such lines run so far (fewer than ``at``: none was interrupted)."""
    run = [0]

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_code.co_filename.endswith(files):
            run[0] += 1
            if run[0] == at:
                raise KeyboardInterrupt
        return trace

    sys.settrace(trace)
    try:
        yield run
    finally:
        sys.settrace(None)


def plain(text: str) -> str:
    """``text`` without its colours: a kernel's tracebacks, local and remote, come with
    IPython's ANSI colour codes, which tests read past."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll until ``predicate()`` is truthy; a generous no-hang deadline, never a timing claim."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
