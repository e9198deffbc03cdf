"""Helpers for browser tests: a real ``jupyter lab`` and Debian's Chromium driven by Playwright.

Shared by the sidebar's and the widget's browser tests. Playwright's pip package brings its own
driver; the browser is the system's ``chromium`` (``make test`` installs it), never one that
``playwright install`` would download.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # this machine's network is closed: without these Chromium keeps dialling out
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Generous: a cold lab build, a first kernel, and a busy 2-core CI machine.
WAIT_MS = 60_000


def chromium_or_skip() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (make test installs it: apt-get install chromium)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_notebook(path: Path, *cells: str) -> Path:
    """A notebook with kernelspec metadata, so JupyterLab starts python3 without asking."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


class LabServer:
    """``python -m jupyterlab`` on a free loopback port, with its own config, runtime,
    settings and workspace folders (nothing of the user's own Jupyter set-up leaks in)."""

    def __init__(self, tmp: Path, root: Path, env: dict[str, str] | None = None) -> None:
        self.tmp, self.root = tmp, root
        self.port = free_port()
        self.token = "browser-test-token"
        self.log_path = tmp / "jupyterlab.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_MAGIC_")}
        for name in ("config", "runtime", "settings", "workspaces", "data"):
            (tmp / name).mkdir(parents=True, exist_ok=True)
        self.env.update({
            "JUPYTER_CONFIG_DIR": str(tmp / "config"),
            "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
            "JUPYTER_DATA_DIR": str(tmp / "data"),
            "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
            **(env or {}),
        })
        # no news or update toasts over the page
        notify = tmp / "settings" / "@jupyterlab" / "apputils-extension"
        notify.mkdir(parents=True, exist_ok=True)
        (notify / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LabServer:
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + WAIT_MS / 1000
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {self.log()[-3000:]}")
            try:
                if httpx.get(self.url("api/status"), timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"jupyter lab did not answer: {self.log()[-3000:]}")

    def url(self, path: str = "lab") -> str:
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}/{path}{sep}token={self.token}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def jupyter(self, *args: str) -> str:
        """A ``jupyter`` command in this server's environment; its output without colours."""
        out = subprocess.run([sys.executable, "-m", "jupyter", *args], env=self.env,
                             capture_output=True, text=True, timeout=120)
        return re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # jupyter_server shuts its kernels down on TERM
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextmanager
def lab_server(tmp: Path, root: Path, env: dict[str, str] | None = None) -> Iterator[LabServer]:
    lab = LabServer(tmp, root, env).start()
    try:
        yield lab
    finally:
        lab.stop()


@contextmanager
def browser(profile: Path) -> Iterator[Any]:
    """A Playwright browser context: headless Debian Chromium with a fresh profile.

    One per module: Playwright's sync API runs one instance per thread at a time, so further
    pages come from ``context.new_page()``.
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_or_skip()
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900})
        context.set_default_timeout(WAIT_MS)
        try:
            yield context
        finally:
            context.close()


def first_page(context: Any) -> Any:
    return context.pages[0] if context.pages else context.new_page()


def open_lab(page: Any, lab: LabServer, path: str = "lab") -> None:
    page.goto(lab.url(path))
    page.wait_for_selector("#jp-main-dock-panel", state="visible")


def open_notebook(page: Any, lab: LabServer, path: str) -> None:
    """Open a notebook of the server's root, alone (``reset`` drops the notebooks the workspace
    would reopen), and wait until its kernel is idle."""
    open_lab(page, lab, f"lab/tree/{path}?reset")
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", state="visible")
    wait_kernel_idle(page)


def wait_kernel_idle(page: Any) -> None:
    # The status bar says "| Idle" once a kernel exists; the toolbar's indicator says idle
    # before that.
    page.wait_for_function(
        "() => [...document.querySelectorAll('#jp-main-statusbar *')]"
        ".some(e => e.children.length === 0 && /\\|\\s*Idle/.test(e.textContent || ''))")


def run_cells(page: Any, indices: Sequence[int]) -> None:
    """Run these cells of the current notebook, in order (Shift+Enter in each)."""
    for i in indices:
        cell = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").nth(i)
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


# pytest-jupyter's autouse loop fixtures would break Playwright's sync API at teardown, should
# its plugin ever be loaded for the whole suite: browser modules import these to shadow them.
@pytest.fixture(autouse=True)
def jp_asyncio_loop() -> None:
    return None


@pytest.fixture(autouse=True)
def jp_server_cleanup() -> None:
    return None
