"""The embedded local gateway's life: a stopped one is seen as stopped by every process (its
starter reaps it, and nobody takes a zombie for a gateway), and a kernel that cached one that no
longer answers forgets it and starts a fresh one."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gpu_magic
from gpu_magic import GatewayError, RunnerLost, _connection
from gpu_magic._embedded import _pid_alive, stop_local_gateway

from .conftest import wait_for


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_MAGIC_")}
    return {**env, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
            "JUPYTER_DATA_DIR": str(tmp_path / "data")}


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux's /proc")
def test_another_process_s_zombie_is_not_alive() -> None:
    # a child that exited and that its parent never reaps: kill(pid, 0) still succeeds on it
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, time\np = subprocess.Popen(['true'])\n"
         "print(p.pid, flush=True)\ntime.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        wait_for(lambda: _state(pid) == "Z")
        assert not _pid_alive(pid)
    finally:
        parent.kill()
        parent.communicate()
    assert _pid_alive(os.getpid())


def test_whoever_starts_the_gateway_reaps_it_when_it_stops(tmp_path: Path) -> None:
    # as `gpu-magic demo` does: start the local gateway, then keep running; `gpu-magic stop`
    # from elsewhere must leave no zombie behind, which other processes took for a gateway
    env = _env(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom gpu_magic._embedded import ensure_local_gateway"
         "\nprint(ensure_local_gateway('T4:1')['pid'], flush=True)\ntime.sleep(300)"],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout is not None
        pid = int(holder.stdout.readline())
        stop = subprocess.run([sys.executable, "-m", "gpu_magic", "stop"], capture_output=True,
                              text=True, env=env, timeout=60)
        assert stop.stdout.startswith(f"stopped the local gpu_magic gateway (pid {pid}"), stop
        wait_for(lambda: _state(pid) is None, timeout=20)  # reaped, not left a zombie
    finally:
        holder.kill()
        holder.communicate()
        subprocess.run([sys.executable, "-m", "gpu_magic", "stop"], capture_output=True, env=env,
                       timeout=60)


@pytest.fixture
def local_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's client side on a local gateway of the test's own (simulated)."""
    for key in list(os.environ):
        if key.startswith("GPU_MAGIC_"):
            monkeypatch.delenv(key)
    for key, value in _env(tmp_path).items():
        if key.startswith("JUPYTER_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("GPU_MAGIC_SIMULATE", "T4:1")
    monkeypatch.setattr(_connection, "_override", None)
    monkeypatch.setattr(_connection, "_configured", ("", ""))
    monkeypatch.setattr(_connection, "_embedded", None)
    yield
    stop_local_gateway()


def test_a_local_gateway_that_stopped_answering_is_forgotten(local_only: None) -> None:
    ns = {"__name__": "__main__"}
    gpu_magic.run("x = 1", "T4", ns, quiet=True)
    first = _connection._embedded
    assert first is not None and ns["x"] == 1
    stop_local_gateway()
    # as if its pid now named another process (reused): the pid check cannot tell
    _connection._embedded = {**first, "pid": os.getpid()}
    with pytest.raises(GatewayError) as err:
        gpu_magic.run("x = 2", "T4", ns, quiet=True)
    text = str(err.value)
    assert text.startswith(f"the local gpu_magic gateway at {first['url']} stopped answering")
    assert "run the cell again" in text and "GPU_MAGIC_URL" not in text
    gpu_magic.run("x = 3", "T4", ns, quiet=True)  # a fresh gateway
    assert ns["x"] == 3
    assert _connection._embedded is not None and _connection._embedded["pid"] != first["pid"]


def test_a_kernel_keeps_no_socket_of_a_local_gateway_stopped_since(local_only: None) -> None:
    # a soak trial: a kernel kept two or three sockets (CLOSE-WAIT) of each local gateway
    # stopped and started again under it, for good
    import psutil

    me = psutil.Process()
    ports: set[int] = set()  # (of this test's gateways: other tests' sockets are theirs)

    def stale() -> int:
        return sum(1 for c in me.net_connections("tcp")
                   if c.status == psutil.CONN_CLOSE_WAIT and c.raddr and c.raddr.port in ports)

    ns = {"__name__": "__main__"}
    for _ in range(4):
        gpu_magic.run("x = 1", "T4", ns, quiet=True)
        assert _connection._embedded is not None
        ports.add(int(str(_connection._embedded["url"]).rsplit(":", 1)[1]))
        job = gpu_magic.run("x = 2", "T4", ns, quiet=True, background=True)
        job.wait(timeout=60)
        stop_local_gateway()
        with contextlib.suppress(GatewayError):  # (the first cell after a stop may say so)
            gpu_magic.run("x = 3", "T4", ns, quiet=True)
    gpu_magic.run("x = 4", "T4", ns, quiet=True)
    assert ns["x"] == 4
    wait_for(lambda: stale() == 0, 10)


def test_the_local_gateway_s_log_and_inbox_are_its_user_s_alone(local_only: None) -> None:
    # a soak trial: gateway.log was 0644 and inbox/ 0755 in the 0700 state folder
    import numpy as np

    from gpu_magic.server.serve import default_state_dir

    ns = {"__name__": "__main__", "data": np.ones(1 << 20)}  # (8 MiB: by the same-host inbox)
    gpu_magic.run("n = len(data)", "T4", ns, quiet=True)
    assert ns["n"] == 1 << 20
    state = default_state_dir()
    assert (state / "gateway.log").stat().st_mode & 0o777 == 0o600
    assert (state / "inbox").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_background_job_of_a_stopped_local_gateway_says_it_ended_with_it(
        local_only: None, how: str) -> None:
    # a README trial: after `gpu-magic stop`, wait() tried for 30 s, then said "the job may
    # still be running", while stop had just said it ended, as lost. Stopped, the gateway
    # tells its followers so; killed, the client knows its gateway is gone (a local one's
    # cells end with it)
    import json
    import signal

    from gpu_magic._embedded import runtime_path

    ns = {"__name__": "__main__"}
    job = gpu_magic.run("import time\nprint('started', flush=True)\ntime.sleep(60)", "T4", ns,
                        quiet=True, background=True)
    wait_for(lambda: "started" in job.output, 30)
    url = _connection._embedded["url"] if _connection._embedded else "?"
    if how == "stop":
        stop_local_gateway()
        with pytest.raises(RunnerLost) as lost:
            job.wait(timeout=60)
        assert "the gateway was stopped (SIGTERM) while this job was running" in str(lost.value)
    else:
        pid = int(json.loads(runtime_path().read_text())["pid"])
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(GatewayError) as err:
            job.wait(timeout=60)
        text = str(err.value)
        assert text.startswith(f"the local gpu_magic gateway at {url} is no longer running ("), text
        assert f"GPU job {job.id} ended with it, as lost" in text and "may still be" not in text
    gpu_magic.run("x = 3", "T4", ns, quiet=True)  # a fresh gateway, which knows how it ended
    assert _connection.connect().job(job.id)["state"] == "lost"


def test_a_local_gateway_is_gone_by_its_process_not_by_how_fast_it_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (a review) "gone" was told by a health request: a local gateway stalled for a few
    # seconds would have had its running jobs declared ended with it
    import json

    from gpu_magic._embedded import local_gateway_gone, runtime_path

    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    url = "http://127.0.0.1:9"  # (nothing answers there: only the process is asked about)
    assert local_gateway_gone(url)  # no runtime file: stopped
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runtime_path().write_text(json.dumps({"url": url, "pid": sleeper.pid}))
        assert not local_gateway_gone(url)  # it runs, however slow to answer
        assert not local_gateway_gone("http://127.0.0.1:10")  # another one runs: followed there
    finally:
        sleeper.kill()
        sleeper.wait()
    assert local_gateway_gone(url)  # its process is gone


def test_a_local_gateway_with_no_gpus_says_how_to_simulate_some(
        local_only: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # (a served gateway says to ask whoever runs it: test_cli)
    monkeypatch.delenv("GPU_MAGIC_SIMULATE")
    with _connection.connect() as c:
        if c.pool()["types"]:
            pytest.skip("this machine has GPUs: nothing to refuse")
        with pytest.raises(gpu_magic.NoFeasibleOption) as info:
            gpu_magic.run("1", "T4", {"__name__": "__main__"}, client=c, quiet=True)
    said = str(info.value)
    assert "this gateway has no GPUs" in said, said
    # what it says to do works now, not only "before the first %%gpu cell" (a trial)
    assert "run %env GPU_MAGIC_SIMULATE=H100:2,A100-80GB:4 in a cell (the next %%gpu cell " \
           "starts a simulated pool)" in said, said
    assert "whoever runs it" not in said
    monkeypatch.setenv("GPU_MAGIC_SIMULATE", "T4:1")
    ns: dict[str, Any] = {"__name__": "__main__"}
    gpu_magic.run("x = 1", "T4", ns, quiet=True)
    assert ns["x"] == 1


def test_a_cell_followed_across_a_local_gateway_restart_learns_its_end(
        local_only: None) -> None:
    # the local gateway was stopped under a running cell and started again (by the sidebar,
    # another kernel): the cell kept asking the old port, failed with "the job may still be
    # running", and its widget said "running" for good; the new gateway knew it was lost
    import threading

    from gpu_magic._embedded import ensure_local_gateway

    ns = {"__name__": "__main__"}
    gpu_magic.run("x = 1", "T4", ns, quiet=True)  # the gateway, started
    outcome: dict[str, BaseException] = {}

    def cell() -> None:
        try:
            gpu_magic.run("import time\ntime.sleep(60)", "T4", {"__name__": "__main__"},
                          quiet=True)
        except BaseException as exc:
            outcome["error"] = exc

    t = threading.Thread(target=cell)
    t.start()
    client = _connection.connect()
    wait_for(lambda: any(j["state"] == "running" for j in client.jobs()), 30)
    # %gpu stop said only "stopped", of a gateway whose job it ended (the README trial)
    assert stop_local_gateway().endswith(
        "; its 1 running and 0 queued job(s) ended with it, as lost (their output so far is "
        "kept: %gpu jobs lists them once a gateway runs again)")
    ensure_local_gateway("T4:1")  # started again: a new port, a new token
    t.join(60)
    assert not t.is_alive()
    err = outcome.get("error")
    assert isinstance(err, gpu_magic.RunnerLost), err
    # (stopped for the restart: said so, not "restarted", which a killed gateway's successor says)
    assert "the gateway was stopped (SIGTERM) while this job was running" in str(err)


def test_a_failed_start_quotes_its_own_log_and_typos_are_noted(tmp_path: Path) -> None:
    # the log is appended across starts: a failure quoted the end of the file, where an
    # earlier failure's line came first
    script = ("import sys\nfrom gpu_magic._embedded import ensure_local_gateway\n"
              "try:\n    ensure_local_gateway(sys.argv[1])\n"
              "except Exception as exc:\n    print(exc)\n")
    env = _env(tmp_path)
    # a start the gateway itself refuses (its lock file cannot be opened), twice: the second
    # failure quotes its own refusal only, not the first one's before it in the log
    state = Path(subprocess.run(
        [sys.executable, "-c", "from gpu_magic.server.serve import default_state_dir as d\n"
                               "print(d())"], capture_output=True, text=True, timeout=60,
        env=env, check=True).stdout.strip())
    (state / "gateway.lock").mkdir(parents=True)
    refusal = "as the gateway's state directory: Is a directory"
    for _ in range(2):
        failed = subprocess.run([sys.executable, "-c", script, "T4:1"], capture_output=True,
                                text=True, timeout=120, env=env)
        assert "the local gpu_magic gateway failed to start" in failed.stdout, failed
        assert failed.stdout.count(refusal) == 1, failed.stdout
    assert (state / "gateway.log").read_text().count(refusal) == 2
    (state / "gateway.lock").rmdir()
    first = subprocess.run([sys.executable, "-c", script, "T4:0"], capture_output=True,
                           text=True, timeout=120, env=env)
    assert "'T4:0' in the simulated pool asks for 0 GPUs" in first.stdout, first
    second = subprocess.run([sys.executable, "-c", script, "L4:999"], capture_output=True,
                            text=True, timeout=120, env=env)
    # refused before a gateway starts, naming the variable (it said only that the gateway
    # "failed to start (exit code 2)", quoting a refusal of --simulate)
    assert second.stdout.startswith("GPU_MAGIC_SIMULATE='L4:999': 'L4:999' in the simulated "
                                    "pool asks for 999 GPUs"), second
    assert "no local gateway was started" in second.stdout, second
    assert "T4:0" not in second.stdout, second.stdout
    # a type that is likely a typo is said in the kernel as its gateway starts
    started = subprocess.run([sys.executable, "-c", script, "H1000:2"], capture_output=True,
                             text=True, timeout=120, env=env)
    try:
        assert ("gpu_magic: GPU_MAGIC_SIMULATE='H1000:2': the simulated pool's type 'H1000' is "
                "not a known GPU type; did you mean H100?") in started.stderr, started
        assert started.stdout == "", started
        # GPU_MAGIC_SIMULATE with an empty entry is refused where the gateway parses it
        third = subprocess.run([sys.executable, "-c", script, "T4:1,,"], capture_output=True,
                               text=True, timeout=120, env=env)
        assert ("empty entry in the simulated pool 'T4:1,,'; separate entries "
                "with single commas, e.g. GPU_MAGIC_SIMULATE='H100:2,A100-80GB:4'"
                ) in third.stdout, third
        # refused before the H1000 gateway, running and idle, was stopped for it
        assert "the local gateway running now is left as it is" in third.stdout, third
        assert "restarting the local gateway" not in third.stderr, third
        still = subprocess.run([sys.executable, "-c", script, "H1000:2"], capture_output=True,
                               text=True, timeout=120, env=env)
        assert "restarting" not in still.stderr and still.stdout == "", still
    finally:
        subprocess.run([sys.executable, "-m", "gpu_magic", "stop"], capture_output=True,
                       env=env, timeout=60)


def test_one_gateway_per_state_directory(local_only: None, tmp_path: Path) -> None:
    # the runtime file went missing (a tmp cleaner) under a running job: the next kernel
    # started a second gateway on the same state directory, which granted the same GPU again
    # and took the first one's job for lost
    from gpu_magic._embedded import ensure_local_gateway, runtime_path

    holder = gpu_magic.run("import time\ntime.sleep(60)", "T4", {"__name__": "__main__"},
                           quiet=True, background=True)
    wait_for(lambda: holder.state == "running", 30)
    first = _connection._embedded
    assert first is not None
    runtime_path().unlink()
    info = ensure_local_gateway("T4:1")  # as another kernel would
    assert (info["pid"], info["url"]) == (first["pid"], first["url"])
    assert runtime_path().exists()  # named again, for the next kernel
    # and a gateway started by hand on that state directory is refused, naming the first
    serve = subprocess.run(
        [sys.executable, "-m", "gpu_magic", "serve", "--port", "0", "--simulate", "T4:1",
         "--state-dir", first["state_dir"]], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2
    assert serve.stderr.startswith(
        f"gpu-magic serve: another gpu_magic gateway (pid {first['pid']}, {first['url']}) uses "
        f"the state directory {first['state_dir']}"), serve.stderr
    assert f"(gpu-magic stop, or kill {first['pid']})" in serve.stderr, serve.stderr
    assert holder.state == "running"
    holder.cancel()
    runtime_path().unlink()  # gone again: `gpu-magic stop` still finds it
    assert stop_local_gateway().startswith(
        f"stopped the local gpu_magic gateway (pid {first['pid']}, {first['url']})")
    wait_for(lambda: not _pid_alive(first["pid"]), 30)


def test_kernels_that_write_one_pool_differently_share_its_gateway(
        local_only: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # a class: one student's kernel says 't4', another's 'T4:1' (the grammar is
    # case-insensitive, a count of one may go unsaid): one pool, one gateway, no restart and
    # no refusal while the first one's job runs
    from gpu_magic._connection import local_difference

    monkeypatch.setenv("GPU_MAGIC_SIMULATE", " t4 ")
    holder = gpu_magic.run("import time\ntime.sleep(60)", "T4", {"__name__": "__main__"},
                           quiet=True, background=True)
    try:
        wait_for(lambda: holder.state == "running", 30)
        first = _connection._embedded
        assert first is not None
        monkeypatch.setenv("GPU_MAGIC_SIMULATE", "T4:1")  # the other kernel
        monkeypatch.setattr(_connection, "_embedded", None)
        assert gpu_magic.run("1 + 1", "any", {"__name__": "__main__"}, quiet=True,
                             background=True).state in ("queued", "running", "succeeded")
        assert _connection._embedded is not None
        assert _connection._embedded["pid"] == first["pid"]
        assert local_difference() is None
        # a pool that is another one is still told apart (and refused while jobs run)
        monkeypatch.setenv("GPU_MAGIC_SIMULATE", "T4:2")
        monkeypatch.setattr(_connection, "_embedded", None)
        with pytest.raises(GatewayError, match="still has jobs"):
            gpu_magic.run("1 + 1", "any", {"__name__": "__main__"}, quiet=True)
    finally:
        holder.cancel()
