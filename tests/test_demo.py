"""``gpu-magic demo`` (what ``make demo`` runs): JupyterLab with the teaching notebooks and a
simulated local gateway, and however it is stopped, nothing of it is left running."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gpu_magic._demo import notebooks_dir

from .conftest import wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its parent has stopped
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("sigs", [[signal.SIGINT], [signal.SIGTERM], [signal.SIGHUP],
                                  [signal.SIGTERM, signal.SIGHUP]],
                         ids=["ctrl-c", "kill", "terminal-closed", "kill-then-hangup"])
def test_the_demo_stops_everything_it_started(tmp_path: Path,
                                              sigs: list[signal.Signals]) -> None:
    port = _free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    env.pop("GPU_MAGIC_URL", None)
    # a docs trial: JupyterLab opened the repository's own notebooks, so saving one wrote
    # outputs into tracked files (and a pip user's, into the installed package): it opens a
    # copy in the folder the demo runs in, and keeps a copy the user has already edited
    copies = tmp_path / "gpu-magic-notebooks"
    copies.mkdir()
    shipped = sorted(p.name for p in notebooks_dir().glob("*.ipynb"))
    (copies / shipped[0]).write_text('{"edited": true}')
    log = open(tmp_path / "demo.log", "wb")
    demo = subprocess.Popen([sys.executable, "-m", "gpu_magic", "demo", "--port", str(port),
                             "--simulate", "T4:2"], stdout=log, stderr=log, env=env,
                             cwd=tmp_path)
    try:
        def lab_up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(lab_up, timeout=120)
        runtime = next((tmp_path / "runtime").glob("gpu-magic-gateway-*.json"))
        gateway = json.loads(runtime.read_text())
        assert gateway["config"]["simulate"] == "T4:2"
        # the demo started its gateway itself: the sidebar (which only looks) shows the pool
        # at once, before any %%gpu cell ran
        lab_token = json.loads(next((tmp_path / "runtime").glob("jpserver-*.json")).read_text())
        api = f"http://127.0.0.1:{port}/gpu-magic/api"
        auth = {"Authorization": f"token {lab_token['token']}"}
        status = httpx.get(f"{api}/status", headers=auth, timeout=30).json()
        assert status["reachable"] and status["simulated"] and status["url"] == gateway["url"]
        pool = httpx.get(f"{api}/pool", headers=auth, timeout=30).json()
        assert [(t["type"], t["total"]) for t in pool["types"]] == [("T4", 2)]
        listed = httpx.get(f"http://127.0.0.1:{port}/api/contents", headers=auth,
                           timeout=30).json()["content"]
        assert sorted(e["name"] for e in listed if e["type"] == "notebook") == shipped
        assert (copies / shipped[0]).read_text() == '{"edited": true}'
        assert (f"the teaching notebooks are in {copies}, yours to edit and save "
                f"({len(shipped) - 1} copied now, 1 kept as you left them)"
                in (tmp_path / "demo.log").read_text())
        for sig in sigs:  # several at once (systemd: TERM, then HUP) must not cut the clean-up
            demo.send_signal(sig)
        assert demo.wait(60) == 0, (tmp_path / "demo.log").read_text()[-3000:]
        assert not lab_up()
        wait_for(lambda: not _alive(gateway["pid"]), timeout=20)
        assert not runtime.exists()
    finally:
        if demo.poll() is None:
            demo.kill()
        log.close()
        _kill_leftovers(port, tmp_path)


@pytest.mark.slow
def test_a_demo_leaves_running_the_gateway_it_found_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a newcomer's trial: a second `make demo` used the first one's gateway, and stopping it
    # stopped that gateway, ending the first demo's jobs as lost
    from gpu_magic._embedded import (
        ensure_local_gateway,
        running_local_gateway,
        stop_local_gateway,
    )

    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    env.pop("GPU_MAGIC_URL", None)
    for name in ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR"):
        monkeypatch.setenv(name, env[name])
    first = ensure_local_gateway("T4:2")  # (the first demo's, or a notebook's)
    port = _free_port()
    log = open(tmp_path / "demo.log", "wb")
    demo = subprocess.Popen([sys.executable, "-m", "gpu_magic", "demo", "--port", str(port),
                             "--simulate", "T4:2"], stdout=log, stderr=log, env=env,
                             cwd=tmp_path)
    try:
        wait_for(lambda: "JupyterLab is starting" in (tmp_path / "demo.log").read_text(),
                 timeout=120)
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0
        said = (tmp_path / "demo.log").read_text()
        assert f"(already running, pid {first['pid']}: it is left running" in said, said
        assert "was running before this demo and is left running" in said, said
        still = running_local_gateway()
        assert still is not None and still["pid"] == first["pid"]
    finally:
        if demo.poll() is None:
            demo.kill()
        log.close()
        stop_local_gateway()
        _kill_leftovers(port, tmp_path)


@pytest.mark.slow
def test_two_demos_share_a_gateway_and_the_last_to_stop_stops_it(tmp_path: Path) -> None:
    # a review: the demo that started the gateway stopped it on Ctrl-C while a second demo
    # still used it, ending that demo's jobs as lost
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    env.pop("GPU_MAGIC_URL", None)
    ports, demos, logs = [_free_port(), _free_port()], [], []
    try:
        for i, port in enumerate(ports):
            logs.append(tmp_path / f"demo{i}.log")
            with open(logs[-1], "wb") as log:
                demos.append(subprocess.Popen(
                    [sys.executable, "-m", "gpu_magic", "demo", "--port", str(port),
                     "--simulate", "T4:2"], stdout=log, stderr=log, env=env,
                             cwd=tmp_path))
            wait_for(lambda log=logs[-1]: "JupyterLab is starting" in log.read_text(),
                     timeout=120)
        gateway = json.loads(next((tmp_path / "runtime").glob("gpu-magic-gateway-*.json"))
                             .read_text())
        demos[0].send_signal(signal.SIGINT)  # the one that started it
        assert demos[0].wait(60) == 0
        said = logs[0].read_text()
        assert f"is left running: the demo of pid {demos[1].pid} uses it too" in said, said
        assert _alive(gateway["pid"])
        demos[1].send_signal(signal.SIGINT)  # the last one using it
        assert demos[1].wait(60) == 0
        wait_for(lambda: not _alive(gateway["pid"]), timeout=20)
        assert "stopped the local gpu_magic gateway" in logs[1].read_text()
    finally:
        for demo in demos:
            if demo.poll() is None:
                demo.kill()
        for port in ports:
            _kill_leftovers(port, tmp_path)


def _kill_leftovers(port: int, tmp_path: Path) -> None:
    """After a failure: what the demo should have stopped must not outlive the test."""
    marks = (f"--ServerApp.port={port}", str(tmp_path))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(m in cmdline for m in marks) and int(entry) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)


@pytest.mark.parametrize(("args", "says"), [
    (["--notebooks", "{missing}"], "gpu-magic demo: --notebooks {missing}: no such folder; give "
                                   "the folder JupyterLab should open"),
    (["--simulate", "H100:2,,"], "argument --simulate: empty entry in the simulated pool "
                                 "'H100:2,,'; separate entries with single commas, e.g. "
                                 "--simulate 'H100:2,A100-80GB:4'"),
    (["--port", "99999"], "argument --port: '99999' is not a port"),
])
def test_a_demo_refuses_bad_values_before_it_starts_anything(tmp_path: Path, args: list[str],
                                                            says: str) -> None:
    # a newcomer's trial: a missing --notebooks folder was a traceback, after the gateway had
    # started (it was left running); a bad --simulate a traceback naming GPU_MAGIC_SIMULATE;
    # --port 99999 printed a URL JupyterLab did not listen on
    runtime = tmp_path / "runtime"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    env.pop("GPU_MAGIC_URL", None)
    args = [a.format(missing=tmp_path / "missing") for a in args]
    out = subprocess.run([sys.executable, "-m", "gpu_magic", "demo", *args], capture_output=True,
                         text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    assert says.format(missing=tmp_path / "missing") in out.stderr, out.stderr
    assert not (runtime / f"gpu-magic-gateway-{socket.gethostname()}.json").exists()  # none ran
