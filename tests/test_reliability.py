"""Reliability: crashes on purpose. Runners killed, a gateway restarted under a client, event
streams cut by a proxy, a client killed mid-job, a full disk, and retention."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

import gpu_magic
from gpu_magic import RunnerLost, _client
from gpu_magic._api import attach
from gpu_magic._client import GatewayClient
from gpu_magic._payload import pack_inputs

from .conftest import SIM_POOL, Gateway, start_gateway, wait_for
from .test_gateway_http import all_free, finish, submit

DEADLINE = 60.0


def ns() -> dict[str, Any]:
    return {"__name__": "__main__"}


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("one"), simulate="T4:1")
    yield gw
    gw.stop()


def test_killed_runner_frees_its_gpu_for_the_next_job(one_gpu: Gateway) -> None:
    with one_gpu.client() as c:
        victim = submit(c, "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)",
                        "T4", background=True)
        waiting = submit(c, "x = 'ran'", "T4", background=True, outputs=["x"])
        pid = None
        for ev in c.events(victim["id"]):
            if ev["type"] == "stdout":
                pid = int(ev["text"].split()[0])
                break
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        lost = finish(c, victim["id"])
        assert lost["state"] == "lost" and "killed by signal SIGKILL" in lost["message"]
        assert finish(c, waiting["id"])["state"] == "succeeded"
        wait_for(lambda: all_free(c), DEADLINE)


def test_what_a_cell_printed_before_its_os_exit_reaches_the_notebook(one_gpu: Gateway) -> None:
    # a trial: a line printed (flushed, or written to fd 1) just before os._exit was lost, as
    # it was read from the pipe, or waiting there, when the process ended
    with one_gpu.client() as c:
        for cell, said in [("print('last words', flush=True)\nimport os\nos._exit(3)",
                            "last words\n"),
                           ("import os\nos.write(1, b'from C\\n')\nos._exit(3)", "from C\n"),
                           ("print('no newline', end='')\nimport os\nos._exit(0)",
                            "no newline")]:
            job = submit(c, cell, "T4", background=True)
            end = finish(c, job["id"])
            assert end["state"] == "lost" and "exited with code" in end["message"], end
            out = "".join(ev["text"] for ev in c.events(job["id"]) if ev["type"] == "stdout")
            assert out == said, (cell, out)


def test_os_exit_from_a_signal_handler_mid_display_ends_the_cell(one_gpu: Gateway) -> None:
    # a review: sending the last output from os._exit waited for locks that the very thread
    # held when its signal handler ran mid-display; the cell hung until cancelled
    cell = textwrap.dedent("""
        import os, signal
        from IPython.display import display
        signal.signal(signal.SIGALRM, lambda *_: os._exit(5))
        signal.setitimer(signal.ITIMER_REAL, {at})
        while True:
            print("x" * 1_000_000)
            display("y")
    """)
    with one_gpu.client() as c:
        for at in (0.2, 0.213, 0.226, 0.239):
            job = submit(c, cell.format(at=at), "T4", background=True)
            end = finish(c, job["id"], timeout=30)  # (it hung for good)
            assert end["state"] == "lost" and "exited with code 5" in end["message"], end


@pytest.mark.parametrize("extra", [[], ["--cold"]], ids=["warm", "cold"])
def test_a_killed_runner_s_child_in_a_session_of_its_own_ends_too(tmp_path: Path,
                                                                  extra: list[str]) -> None:
    # (a trial on Ray, then here too) a runner killed outright (the OOM killer) could not end
    # what its cell had started with start_new_session=True: it ran on, holding the GPUs
    gw = start_gateway(tmp_path, *extra, simulate="T4:1")
    try:
        with gw.client() as c:
            job = submit(c, "import os, subprocess, time\n"
                            "child = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
                            "print(os.getpid(), child.pid, flush=True)\ntime.sleep(300)",
                         "T4", background=True)
            pids = None
            for ev in c.events(job["id"]):
                if ev["type"] == "stdout":
                    pids = [int(p) for p in ev["text"].split()[:2]]
                    break
            assert pids is not None
            runner, child = pids
            assert _running(child)
            os.kill(runner, signal.SIGKILL)
            assert finish(c, job["id"])["state"] == "lost"
            wait_for(lambda: not _running(child), DEADLINE)
    finally:
        gw.stop()


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process its parent has not reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


@pytest.mark.parametrize("runners", ["warm", "cold"])
def test_runners_and_what_their_cells_started_die_with_a_killed_gateway(
        tmp_path: Path, runners: str) -> None:
    # they ran on, holding the GPU that the restarted gateway granted to the next job
    extra = ("--cold",) if runners == "cold" else ()
    gw = start_gateway(tmp_path, *extra, simulate="H100:1")
    pids = tmp_path / "pids"
    source = textwrap.dedent(f"""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "300"])
        apart = subprocess.Popen(["sleep", "301"], start_new_session=True)
        with open({str(pids)!r} + ".tmp", "w") as f:
            f.write(f"{{os.getpid()}} {{child.pid}} {{apart.pid}}")
        os.rename({str(pids)!r} + ".tmp", {str(pids)!r})
        time.sleep(300)  # silent: nothing written to the gateway that could fail
    """)
    try:
        with gw.client() as c:
            submit(c, source, "H100", background=True)
            wait_for(pids.exists, DEADLINE)
        cell = [int(p) for p in pids.read_text().split()]
        # everything the gateway started: zygote, spare and busy warm runners, or the runner
        family = [p.pid for p in psutil.Process(gw.proc.pid).children(recursive=True)]
        assert cell[0] in family
        gw.proc.kill()
        gw.proc.wait()
        wait_for(lambda: not [p for p in {*family, *cell} if _running(p)], DEADLINE)
    finally:
        gw.stop()


def test_runner_that_cannot_start_is_a_clear_error(one_gpu: Gateway) -> None:
    with one_gpu.client() as c:
        job = submit(c, "1", "T4", python="/nonexistent/python3")
        done = finish(c, job["id"])
    assert done["state"] == "failed"
    assert done["message"].startswith("the runner could not be started: ")
    assert "/nonexistent/python3" in done["message"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Restartable:
    """A gateway on a fixed port and state folder, and a client of it, that can be stopped
    and started again under the client (which keeps its URL)."""

    def __init__(self, tmp_path: Path, simulate: str = SIM_POOL) -> None:
        self.tmp_path, self.port, self.state = tmp_path, _free_port(), tmp_path / "state"
        self.simulate = simulate
        self.gw = self._start()
        self.client = GatewayClient(self.gw.url, self.gw.token)

    def _start(self) -> Gateway:
        return start_gateway(self.tmp_path, "--port", str(self.port), state_dir=self.state,
                             simulate=self.simulate)

    def stop(self) -> None:
        self.gw.stop()

    def start_again(self) -> None:
        self.gw = self._start()
        self.client.token = self.gw.token
        self.client.reset()

    def close(self) -> None:
        self.client.close()
        self.gw.stop()


def test_gateway_restart_under_a_following_client(tmp_path: Path) -> None:
    r = _Restartable(tmp_path)
    outcome: dict[str, Any] = {}
    client = r.client

    def follow() -> None:
        try:
            gpu_magic.run("import time\nprint('working', flush=True)\ntime.sleep(60)", "H100",
                          ns(), client=client, quiet=True)
        except BaseException as exc:
            outcome["error"] = exc

    t = threading.Thread(target=follow)
    t.start()
    try:
        wait_for(lambda: any(j["state"] == "running" for j in client.jobs()), DEADLINE)
        r.stop()
        # its event stream ended first: uvicorn waited for it, then cancelled it mid-write
        # ("Exception in ASGI application" and two tracebacks at every stop)
        log = (tmp_path / "gateway.log").read_text()
        assert "Traceback" not in log and "Exception in ASGI" not in log, log
        r.start_again()
        t.join(DEADLINE)
        assert not t.is_alive(), "the client hung after the gateway restarted"
        err = outcome["error"]
        assert isinstance(err, RunnerLost)
        assert "the gateway was stopped (SIGTERM) while this job was running" in str(err)
    finally:
        r.close()


def test_a_cell_following_a_job_hears_at_once_that_its_gateway_stopped(tmp_path: Path) -> None:
    # its stream ended before the job did: the cell tried to resume it for half a minute,
    # then said the job "may still be running" (found by a newcomer); the gateway knew
    gw = start_gateway(tmp_path)
    outcome: dict[str, Any] = {}
    try:
        with gw.client() as c:
            def follow() -> None:
                try:
                    gpu_magic.run("import time\nprint('working', flush=True)\ntime.sleep(60)",
                                  "H100", ns(), client=c, quiet=True)
                except BaseException as exc:
                    outcome["error"] = exc

            t = threading.Thread(target=follow)
            t.start()
            wait_for(lambda: any(j["state"] == "running" for j in c.jobs()), DEADLINE)
            gw.proc.send_signal(signal.SIGTERM)
            assert gw.proc.wait(30) == 0
            t.join(10)
            assert not t.is_alive(), "the cell still waited after its gateway had stopped"
        err = outcome["error"]
        assert isinstance(err, RunnerLost), repr(err)
        assert "the gateway was stopped (SIGTERM) while this job was running" in str(err)
        log = (tmp_path / "gateway.log").read_text()
        assert "Traceback" not in log and "Exception in ASGI" not in log, log
    finally:
        gw.stop()


def test_a_job_lost_to_a_crash_did_not_run_while_the_gateway_was_down(tmp_path: Path) -> None:
    # its "ran" counted until the restart: 74 s for a cell that ran 7 (found by a newcomer)
    r = _Restartable(tmp_path)
    try:
        job = submit(r.client, "import time\ntime.sleep(60)", "H100", background=True)
        wait_for(lambda: r.client.job(job["id"])["state"] == "running", DEADLINE)
        time.sleep(2.5)  # the gateway is seen running it a while
        r.gw.proc.kill()
        r.gw.proc.wait()
        killed = time.time()
        time.sleep(5)  # down
        restarted = time.time()
        r.start_again()
        rec = r.client.job(job["id"])
        assert rec["state"] == "lost"
        ran = list(r.client.events(job["id"]))[-1]["timings"]["ran_s"]
        assert ran >= 2.0  # what it ran before the crash ...
        assert rec["started"] + ran <= killed + 2.5, ran  # ... and no more
        # its record ends at the restart: a retention shorter than the outage keeps it
        assert rec["finished"] >= restarted
        assert rec["ran_until"] == pytest.approx(rec["started"] + ran, abs=0.01)
        from gpu_magic._tables import jobs_text  # and `gpu-magic jobs` says what it ran
        row = next(ln for ln in jobs_text([rec]).splitlines() if ln.startswith(job["id"]))
        assert f" {ran:.1f} s " in row, row
        # the attempt it made is in its record (a trial found none listed)
        assert [(a["attempt"], a["outcome"]) for a in rec["attempts"]] == [(1, "lost")]
        assert rec["attempts"][0]["grant"]["gpu_type"] == "H100"
    finally:
        r.close()


def test_a_cell_printing_fast_learns_its_end_after_a_gateway_crash(tmp_path: Path) -> None:
    # events are streamed a few ms before they are saved: the kernel had seen seq 49, the
    # killed gateway had saved 48, and the restarted one wrote `done` as 49, which the client
    # skipped as seen; it waited ~33 s for "keeps ending early" instead of RunnerLost
    r = _Restartable(tmp_path)
    outcome: dict[str, Any] = {}
    client = r.client
    seen = threading.Event()

    class Seen:
        def write(self, text: str) -> None:
            seen.set()

        def flush(self) -> None:
            pass

    def follow() -> None:
        try:
            import contextlib
            with contextlib.redirect_stdout(Seen()):  # type: ignore[type-var]
                gpu_magic.run("import time\nfor i in range(100000):\n    print(i, flush=True)"
                              "\n    time.sleep(0.003)", "H100", ns(), client=client,
                              quiet=True)
        except BaseException as exc:
            outcome["error"] = exc

    t = threading.Thread(target=follow)
    t.start()
    try:
        seen.wait(DEADLINE)
        time.sleep(0.3)
        r.gw.proc.kill()
        r.gw.proc.wait()
        r.start_again()
        t.join(DEADLINE)
        assert not t.is_alive(), "the client hung after the gateway restarted"
        err = outcome["error"]
        assert isinstance(err, RunnerLost), err
        assert "the gateway restarted while this job was running" in str(err)
        # whatever the crash kept from the log: a client that saw more than was saved (events
        # numbered up to and past the restart's `done`) is told the end, numbered past its own
        job = client.jobs()[0]
        assert job["state"] == "lost"
        last = len(list(client.events(job["id"])))
        for after in (last, last + 7):
            resp = httpx.get(f"{r.gw.url}/v1/jobs/{job['id']}/events",
                             headers={"Authorization": f"Bearer {r.gw.token}",
                                      "Last-Event-ID": str(after)}, timeout=DEADLINE)
            assert resp.text.startswith(f"id: {after + 1}\ndata: "), resp.text
            assert '"type": "done", "state": "lost"' in resp.text
    finally:
        r.close()


def test_a_job_queued_when_the_gateway_restarts_says_nothing_ran(tmp_path: Path) -> None:
    # it said "on the GPU pool was lost ... its output so far is kept" of a job that had
    # neither run nor printed
    r = _Restartable(tmp_path)
    client = r.client
    try:
        holder = gpu_magic.run("import time\ntime.sleep(120)", "H100:2", ns(), client=client,
                               quiet=True, background=True)
        wait_for(lambda: holder.state == "running", DEADLINE)
        queued = gpu_magic.run("x = 1", "H100:2", ns(), client=client, quiet=True,
                               background=True)
        wait_for(lambda: queued.state == "queued", DEADLINE)
        r.stop()
        r.start_again()
        with pytest.raises(RunnerLost) as info:
            queued.wait(timeout=DEADLINE)
        assert str(info.value) == (f"GPU job {queued.id} was lost: the gateway was stopped "
                                   "(SIGTERM) while this job waited in the queue; nothing ran. "
                                   "Run the cell again.")
    finally:
        r.close()


def test_a_job_waiting_to_be_retried_when_the_gateway_crashes_had_run(tmp_path: Path) -> None:
    # it was told "waited in the queue; nothing ran" and its "ran" counted the outage: its
    # first attempt had run (here: out of memory on the T4, waiting for the busy A100)
    r = _Restartable(tmp_path, simulate="T4:1,A100-80GB:1")
    client = r.client
    try:
        holder = gpu_magic.run("import time\ntime.sleep(120)", "A100-80GB", ns(), client=client,
                               quiet=True, background=True)
        wait_for(lambda: holder.state == "running", DEADLINE)
        job = gpu_magic.run("import time\nprint('tried', flush=True)\ntime.sleep(2)\n"
                            "raise RuntimeError('CUDA out of memory. Tried to allocate 9 GiB')",
                            "T4, A100-80GB", ns(), client=client, quiet=True, background=True,
                            oom_fallback=True)
        wait_for(lambda: client.job(job.id)["attempt"] == 2, DEADLINE)
        assert client.job(job.id)["state"] == "queued"
        time.sleep(0.5)  # (its record is written within milliseconds of the change)
        r.gw.proc.kill()
        r.gw.proc.wait()
        killed = time.time()
        time.sleep(3)
        r.start_again()
        with pytest.raises(RunnerLost) as info:
            job.wait(timeout=DEADLINE)
        assert "while this job waited to be retried (attempt 2); its output so far is kept" \
            in str(info.value)
        rec = client.job(job.id)
        assert rec["ran_until"] <= killed + 2.5 < rec["finished"]
        assert "tried\n" in job.output
    finally:
        r.close()


def test_a_background_job_is_followed_again_after_a_long_gateway_outage(tmp_path: Path) -> None:
    # the gateway is away longer than the client tries to resume (about 30 s): wait() says
    # so, the job is not done as far as anyone knows, and a later wait() follows it again
    r = _Restartable(tmp_path)
    client = r.client
    try:
        job = gpu_magic.run("import time\nprint('working', flush=True)\ntime.sleep(120)",
                            "H100", ns(), client=client, quiet=True, background=True)
        wait_for(lambda: job.state == "running", DEADLINE)
        # the gateway writes its records a few milliseconds behind (a kill -9 loses those, as
        # the README says): give it time to write that the job started
        time.sleep(0.5)
        r.gw.proc.kill()  # kill -9: its runner dies with it, nothing tells the client
        r.gw.proc.wait()
        # a short wait() while the client still tries said "still running" of a dead job
        away = (f"cannot reach the gpu_magic gateway at {r.gw.url}: .*GPU job {job.id}'s end "
                f"is unknown until the gateway answers again: then wait\\(\\) again, or "
                f"`%gpu attach {job.id}`$")
        with pytest.raises(gpu_magic.GatewayError, match=away):
            job.wait(timeout=1)
        assert not job.done() and job.state == "unreachable"
        with pytest.raises(gpu_magic.GatewayError, match="lost the event stream"):
            job.wait(timeout=120)
        assert not job.done() and job.state == "unreachable"  # its end is not known
        # so is one after the client gave up (it tries again, and cannot reach it either)
        with pytest.raises(gpu_magic.GatewayError, match=away):
            job.wait(timeout=1)
        assert job.state == "unreachable"
        r.start_again()
        with pytest.raises(RunnerLost, match="the gateway restarted while this job was running"):
            job.wait(timeout=DEADLINE)
        assert job.done() and job.state == "lost"
    finally:
        r.close()


class CuttingProxy:
    """A loopback TCP proxy that cuts every connection after passing ``budget`` bytes back
    (or, with ``after``, right after passing those bytes back)."""

    def __init__(self, target: tuple[str, int], budget: int, after: bytes | None = None) -> None:
        self.target, self.budget, self.after = target, budget, after
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.cuts = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(conn, up, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, conn, self.budget), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, budget: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if budget is not None and sent + len(data) > budget:
                    dst.sendall(data[: budget - sent])
                    self.cuts += 1
                    break
                if budget is not None and self.after is not None and self.after in data:
                    dst.sendall(data)
                    self.cuts += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def test_cut_event_streams_resume_without_losing_or_repeating_a_line(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    host, port = gateway.url.rsplit("//", 1)[1].split(":")
    proxy = CuttingProxy((host, int(port)), budget=6000)
    try:
        with GatewayClient(f"http://127.0.0.1:{proxy.port}", gateway.token) as c:
            gpu_magic.run(textwrap.dedent("""
                import sys, time
                for i in range(2000):
                    print(f"line {i}")
                    if i % 200 == 0:
                        sys.stdout.flush(); time.sleep(0.05)
            """), "H100", ns(), client=c, quiet=True)
        out = capsys.readouterr().out.splitlines()
        assert out == [f"line {i}" for i in range(2000)]
        assert proxy.cuts >= 3  # the stream really was cut, several times
    finally:
        proxy.close()


def test_a_long_silent_cell_outlives_any_number_of_cut_streams(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    # a network that drops long connections: each cut counted against the resume attempts,
    # heartbeats or not, and a silent cell ended with "lost the event stream" after enough
    # of them while its job ran on
    monkeypatch.setattr(_client, "RESUME_ATTEMPTS", 0)  # (stands for "enough of them")
    host, port = gateway.url.rsplit("//", 1)[1].split(":")
    proxy = CuttingProxy((host, int(port)), budget=1 << 30, after=b": heartbeat")
    try:
        with GatewayClient(f"http://127.0.0.1:{proxy.port}", gateway.token) as c:
            space = ns()
            gpu_magic.run("import time\ntime.sleep(10.5)\ndone = True", "H100", space,
                          client=c, quiet=True)
        assert space["done"] is True
        assert proxy.cuts >= 2  # the submit's stream, then a resumed one
    finally:
        proxy.close()


def test_a_dropped_connection_gets_no_https_advice_unless_the_gateway_speaks_tls(
        gateway: Gateway) -> None:
    # an upload cut by a dying gateway was told "If it speaks https (--certfile), use https:..."
    host, port = gateway.url.rsplit("//", 1)[1].split(":")
    proxy = CuttingProxy((host, int(port)), budget=0)  # hangs up before any answer
    try:
        with GatewayClient(f"http://127.0.0.1:{proxy.port}", gateway.token,
                           same_host=False) as c:
            data = memoryview(os.urandom(1 << 20))
            with pytest.raises(gpu_magic.GatewayError) as info:
                c.upload(gpu_magic._payload.digest(data), data)
        text = str(info.value)
        assert text.startswith(f"the gpu_magic gateway at http://127.0.0.1:{proxy.port} dropped "
                               "the connection: "), text
        assert "https" not in text
    finally:
        proxy.close()


def test_a_result_cut_short_says_the_job_succeeded_and_how_to_fetch_it(
        gateway: Gateway) -> None:
    # "result ... arrived short (4161536 of 838860800 bytes)", and a widget saying "no longer
    # followed", of a job that had succeeded
    host, port = gateway.url.rsplit("//", 1)[1].split(":")
    proxy = CuttingProxy((host, int(port)), budget=1 << 20)  # less than the result
    try:
        with GatewayClient(f"http://127.0.0.1:{proxy.port}", gateway.token,
                           same_host=False) as c:
            c._bulk = False  # (the proxy stands before the main port only: downloads go there)
            space = ns()
            with pytest.raises(gpu_magic.GatewayError) as info:
                gpu_magic.run("import numpy as np\nbig = np.ones(1 << 20)", "H100", space,
                              client=c, quiet=True)
            text = str(info.value)
            job_id = text.split()[2]
            assert text.startswith(f"GPU job {job_id} succeeded, but its results could not be "
                                   "fetched: result "), text
            assert text.endswith(f"Nothing was bound; %gpu attach {job_id} fetches them "
                                 f"(gpu_magic.attach({job_id!r}) in Python)."), text
            assert "big" not in space
            job = gpu_magic.run("import numpy as np\nbig = np.ones(1 << 20)", "H100", space,
                                client=c, quiet=True, background=True)
            with pytest.raises(gpu_magic.GatewayError, match="succeeded, but its results could "
                               "not be fetched"):
                job.wait(timeout=DEADLINE)
            assert job.state == "succeeded"  # as its widget says; not "no longer followed"
        with gateway.client() as c:  # what the message says to call
            gpu_magic.attach(job_id, space, client=c, quiet=True)
        assert space["big"].sum() == 1 << 20
    finally:
        proxy.close()


def test_killed_client_does_not_lose_the_job(gateway: Gateway, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    source = "import time\nprint('go', flush=True)\ntime.sleep(3)\nanswer = 42\nanswer"
    script.write_text(
        "import gpu_magic\n"
        "from gpu_magic._client import GatewayClient\n"
        f"c = GatewayClient({gateway.url!r}, {gateway.token!r})\n"
        f"gpu_magic.run({source!r}, 'A100-80GB', {{'__name__': '__main__'}}, client=c, quiet=True)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    with gateway.client() as c:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
            proc.kill()
        finally:
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        job = max((j for j in c.jobs() if j["source"] == source), key=lambda j: j["created"])
        assert finish(c, job["id"])["state"] == "succeeded"
        space = ns()
        assert attach(job["id"], space, client=c, quiet=True) == 42 and space["answer"] == 42
        wait_for(lambda: all_free(c), DEADLINE)


@pytest.mark.parametrize("size", [2 << 20, 9 << 20])  # written at the end; in batches meanwhile
def test_full_disk_is_a_clear_error_and_nothing_is_half_written(tmp_path: Path, size: int) -> None:
    limit = 1 << 20

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    gw = start_gateway(tmp_path, preexec_fn=small_files)
    try:
        data = np.frombuffer(os.urandom(size), np.uint8)
        digest = gpu_magic._payload.digest(data.data)
        resp = httpx.put(f"{gw.url}/v1/blobs/{digest}", content=data.tobytes(),
                         headers={"Authorization": f"Bearer {gw.token}"})
        assert resp.status_code == 507
        assert resp.json()["message"].startswith("the gateway cannot store the blob: ")
        blobs = gw.state_dir / "blobs"
        assert not [p for p in blobs.rglob("*") if p.is_file()]  # no partial file left
        # over HTTP: the same-host path would write the file from this (unlimited) process
        with GatewayClient(gw.url, gw.token, same_host=False) as c:
            assert c.missing([digest]) == [digest]
            with pytest.raises(gpu_magic.GatewayError, match="cannot store the blob"):
                gpu_magic.run("x.sum()", "H100", {"x": data}, client=c, quiet=True)
            assert c.jobs() == []  # nothing was submitted
    finally:
        gw.stop()


def test_a_full_state_disk_loses_no_output_and_says_so(tmp_path: Path) -> None:
    # the store dropped the writes that failed: after a restart `%gpu attach` replayed 169
    # of 300 lines, with no notice, and jobs run meanwhile were gone from `gpu-magic jobs`
    gw = start_gateway(tmp_path, "--blob-reserve", "0")
    log = tmp_path / "gateway.log"
    inf = resource.RLIM_INFINITY
    try:
        with gw.client() as c:
            job = submit(c, "import time\nfor i in range(300):\n    print(f'L{i}', flush=True)"
                            "\n    time.sleep(0.01)", "H100", background=True)
            lines: list[str] = []
            box: dict[str, Any] = {}

            def follow() -> None:
                for ev in c.events(job["id"]):
                    if ev["type"] == "stdout":
                        lines.extend(ev["text"].splitlines())
                    box["done"] = ev
            reader = threading.Thread(target=follow, daemon=True)
            reader.start()
            wait_for(lambda: len(lines) > 20, DEADLINE)
            # the disk fills up: no file of the gateway's may grow past 4 KiB
            resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (4096, inf))
            health = wait_for(lambda: c.health(refresh=True).get("store_error"), DEADLINE)
            assert health
            with pytest.raises(gpu_magic.GatewayError) as refused:
                submit(c, "x = 1", "H100")
            assert refused.value.status == 507
            assert str(refused.value).startswith(
                f"the gateway cannot write its state directory {gw.state_dir}")
            resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (inf, inf))  # space again
            reader.join(DEADLINE)
            assert box["done"]["state"] == "succeeded"
            assert lines == [f"L{i}" for i in range(300)]
        gw.stop()
        text = log.read_text()
        assert "gpu-magic: the job store is writable again; nothing was lost" in text, text
        gw = start_gateway(tmp_path, "--blob-reserve", "0")
        with gw.client() as c:
            events = list(c.events(job["id"]))
        replayed = "".join(e["text"] for e in events if e["type"] == "stdout").splitlines()
        assert replayed == [f"L{i}" for i in range(300)]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    finally:
        gw.stop()


def _leftovers(state: Path) -> list[str]:
    """Temporary files of the gateway and its runners in a state directory."""
    return sorted(str(p.relative_to(state)) for p in [*state.glob("blobs/*/.*"),
                                                     *state.glob("jobs/*/attempt-*/out")])


def test_a_gateway_killed_right_after_telling_of_a_job_still_knows_it(tmp_path: Path) -> None:
    # its store is written in bursts: a job its client had seen end (or start) a moment
    # before a kill -9 came back unknown (404) or `lost` (found by a reliability trial)
    r = _Restartable(tmp_path)
    try:
        ns: dict[str, Any] = {"__name__": "__main__"}
        ended = []
        for _ in range(3):
            job = gpu_magic.run("x = 1", "H100", ns, client=r.client, quiet=True,
                                background=True)
            job.wait(timeout=DEADLINE)
            ended.append(job.id)
        running = gpu_magic.run("import time\ntime.sleep(60)", "H100", ns, client=r.client,
                                quiet=True, background=True)
        os.kill(r.gw.proc.pid, signal.SIGKILL)  # at once, the submit just answered
        r.gw.proc.wait(DEADLINE)
        r.start_again()
        for job_id in ended:
            assert r.client.job(job_id)["state"] == "succeeded"
        assert r.client.job(running.id)["state"] == "lost"
        ended_last = gpu_magic.run("x = 2", "H100", ns, client=r.client, quiet=True,
                                   background=True)
        ended_last.wait(timeout=DEADLINE)
        os.kill(r.gw.proc.pid, signal.SIGKILL)  # at once, its client told it ended
        r.gw.proc.wait(DEADLINE)
        r.start_again()
        assert r.client.job(ended_last.id)["state"] == "succeeded"
    finally:
        r.close()


def test_a_restarted_gateway_removes_what_a_killed_one_was_writing(tmp_path: Path) -> None:
    # a half-received upload (316 MB) and a runner's half-written result (1.5 GB) stayed
    # until retention removed them, 7 days later
    r = _Restartable(tmp_path)
    try:
        # a runner that was writing a large result when its gateway was killed
        writing = submit(r.client, textwrap.dedent(f"""
            import os, pathlib, time
            out = pathlib.Path({str(r.state)!r}, "jobs", os.environ["GPU_MAGIC_JOB_ID"],
                               "attempt-1", "out")
            out.mkdir(parents=True)
            (out / "writing.tmp").write_bytes(b"x" * 100000)
            time.sleep(300)
        """), "H100", background=True)
        wait_for(lambda: list(r.state.glob("jobs/*/attempt-1/out/writing.tmp")), DEADLINE)
        # and an upload it was receiving
        sent = threading.Event()

        def body() -> Iterator[bytes]:
            for _ in range(1000):
                yield b"y" * (1 << 20)
                sent.set()
                time.sleep(0.05)

        def upload() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.put(f"{r.gw.url}/v1/blobs/xxh3-128:{'0' * 32}", content=body(),
                          headers={"Authorization": f"Bearer {r.gw.token}",
                                   "Content-Length": str(1000 << 20)}, timeout=DEADLINE)

        threading.Thread(target=upload, daemon=True).start()
        sent.wait(DEADLINE)
        wait_for(lambda: list(r.state.glob("blobs/*/.*")), DEADLINE)
        r.gw.proc.kill()
        r.gw.proc.wait()
        assert len(_leftovers(r.state)) == 2
        r.start_again()
        wait_for(lambda: not _leftovers(r.state), DEADLINE)
        assert r.client.job(writing["id"])["state"] == "lost"
    finally:
        r.close()


@pytest.mark.parametrize("end", ["killed", "cancelled"])
def test_a_job_that_ends_without_its_result_leaves_no_half_written_file(
        one_gpu: Gateway, end: str) -> None:
    # a runner killed, or a cell cancelled, while writing a 1.5 GB result: writing.tmp stayed
    then = "os.kill(os.getpid(), 9)" if end == "killed" else "time.sleep(300)"
    with one_gpu.client() as c:
        job = submit(c, textwrap.dedent(f"""
            import os, pathlib, time
            out = pathlib.Path({str(one_gpu.state_dir)!r}, "jobs",
                               os.environ["GPU_MAGIC_JOB_ID"], "attempt-1", "out")
            out.mkdir(parents=True)
            (out / "writing.tmp").write_bytes(b"x" * 100000)
            (out.parent / "wrote").touch()
            {then}
        """), "T4", background=True)
        out = one_gpu.state_dir / "jobs" / job["id"] / "attempt-1" / "out"
        wait_for(lambda: (out.parent / "wrote").exists(), DEADLINE)
        if end == "cancelled":
            c.cancel(job["id"])
        assert finish(c, job["id"])["state"] == ("lost" if end == "killed" else "cancelled")
        wait_for(lambda: not out.exists(), DEADLINE)


@pytest.mark.parametrize("how", [(), ("--gateway-python",), ("--cold",)],
                         ids=["warm", "job-folder-as-working-folder", "fresh-process"])
def test_a_job_that_ended_leaves_no_empty_folder(tmp_path: Path, how: tuple[str, ...]) -> None:
    # a soak trial: every job whose results were files left jobs/ID/attempt-1/, empty, for
    # the retention period (671 of them after 25 minutes); a review: so did every job whose
    # working folder was its job's (--gateway-python), and a fresh process's its manifest
    gw = start_gateway(tmp_path, *how, simulate="T4:1")
    try:
        with gw.client() as c:
            for cell in ("import os\nbig = os.urandom(1 << 20)", "x = 1"):
                ns = {"__name__": "__main__"}
                for _ in range(3):
                    gpu_magic.run(cell, "T4", ns, client=c, quiet=True)
                assert "big" in ns or ns["x"] == 1
            wait_for(lambda: list((gw.state_dir / "jobs").iterdir()) == [], DEADLINE)
            if how == ("--gateway-python",):
                # a file the cell left in its working folder, its job's here, is its own: kept
                kept = gpu_magic.run("import os\nopen('mine.txt', 'w').write('x')\n"
                                     "os.getcwd()", "T4", {"__name__": "__main__"}, client=c,
                                     quiet=True)
                assert os.path.exists(os.path.join(kept, "mine.txt"))
    finally:
        gw.stop()


def test_a_cell_whose_results_cannot_be_stored_says_it_finished(tmp_path: Path) -> None:
    # "the runner failed before the cell could finish: BlobError: ..." of a cell that had
    # finished, when the gateway's disk was full
    gw = start_gateway(tmp_path, "--blob-reserve", "0")
    go = tmp_path / "go"
    inf = resource.RLIM_INFINITY
    try:
        with gw.client() as c:
            job = submit(c, f"import os, time\nwhile not os.path.exists({str(go)!r}):\n"
                            "    time.sleep(0.01)\nx = os.urandom(30000)", "H100",
                         outputs=["x"], background=True)
            wait_for(lambda: c.job(job["id"])["state"] == "running", DEADLINE)
            resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (4096, inf))  # disk full
            go.touch()
            try:
                done = finish(c, job["id"])
            finally:
                resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (inf, inf))
        assert done["state"] == "failed"
        assert done["message"].startswith(
            "the cell finished, but its results could not be stored on the gateway: "), done
        assert done["message"].endswith(
            f"Nothing was bound. Free space on the disk of the gateway's state directory "
            f"({gw.state_dir}), then run the cell again."), done
    finally:
        gw.stop()


def test_retention_removes_old_jobs_and_blobs_but_not_live_ones(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, "--retention", "2")
    try:
        with gw.client() as c:
            arr = np.arange(100_000)
            space: dict[str, Any] = {"__name__": "__main__", "arr": arr}
            gpu_magic.run("total = int(arr.sum())", "H100", space, client=c, quiet=True)
            old = c.jobs()[0]["id"]
            keep = {"keep": np.ones(100_000)}
            live = submit(c, "import time\ntime.sleep(30)", "H100", background=True,
                          values=keep)
            wait_for(lambda: old not in {j["id"] for j in c.jobs()}, DEADLINE)
            with pytest.raises(gpu_magic.GatewayError):
                c.job(old)
            digest = gpu_magic._payload.digest(arr.data)
            wait_for(lambda: c.missing([digest]) == [digest], DEADLINE)
            # the running job and its inputs are untouched
            assert c.job(live["id"])["state"] == "running"
            needed = list(pack_inputs(keep, None, None).blobs())
            time.sleep(3)  # past the retention period: the live job's blobs must still be there
            assert c.missing(needed) == []
            c.cancel(live["id"])
            finish(c, live["id"])
    finally:
        gw.stop()


def test_sigterm_stops_the_gateway_in_order(tmp_path: Path) -> None:
    """``gpu-magic stop`` sends SIGTERM: the gateway must still clean up after itself."""
    gw = start_gateway(tmp_path)
    with gw.client() as c:
        gpu_magic.run("x = 1", "H100", ns(), client=c, quiet=True)  # a zygote and a runner
    children = subprocess.run(["pgrep", "-P", str(gw.proc.pid)], capture_output=True,
                              text=True).stdout.split()
    assert children
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(20) == 0
    assert not gw.runtime_file.exists()
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in children), timeout=10)


def test_a_stopping_gateway_starts_no_queued_job(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, simulate="H100:1")
    started = tmp_path / "b-started"
    try:
        with gw.client() as c:
            a = gpu_magic.run("import time\ntime.sleep(60)", "H100", ns(), client=c, quiet=True,
                              background=True)
            wait_for(lambda: c.job(a.id)["state"] == "running", timeout=30)
            b = gpu_magic.run(f"open({str(started)!r}, 'w').close()", "H100", ns(), client=c,
                              quiet=True, background=True)
            assert c.job(b.id)["state"] == "queued"
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(30) == 0
        time.sleep(2)  # a runner started during the shutdown would have written by now
        assert not started.exists()
    finally:
        gw.stop()
