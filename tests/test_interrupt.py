"""Interrupting a running ``%%gpu`` cell in a real kernel (jupyter_client), as Jupyter's stop
button does: a KeyboardInterrupt in the cell on the GPU machine, as in a local cell (its handlers
run, what it had bound comes back); a second interrupt, or a cell that does not stop, cancels."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpu_magic._view import JobState, render_html, render_text

from .conftest import Gateway, ctrl_c_at_line, start_gateway, wait_for
from .test_gateway_http import all_free, finish, submit
from .test_widget import Kernel

pytestmark = pytest.mark.slow
DEADLINE = 60.0


@pytest.fixture
def kernel(use_gateway: Gateway, tmp_path: Path) -> Iterator[Kernel]:
    k = Kernel(tmp_path)
    try:
        assert k.reply(k.run("%load_ext gpu_magic\nx = 0\nacc = []"))["status"] == "ok"
        yield k
    finally:
        k.stop()


def _interrupt_when_started(k: Kernel, cell: str, text: str = "started") -> None:
    wait_for(lambda: k.drain(0.1) or text in k.outputs(cell), DEADLINE)
    k.km.interrupt_kernel()


def _check(k: Kernel, code: str) -> str:
    msg = k.run(code)
    assert k.reply(msg)["status"] == "ok"
    return k.outputs(msg)


def _new_job(client: Any, before: set[str]) -> dict[str, Any]:
    mine = [j for j in client.jobs() if j["id"] not in before]
    assert len(mine) == 1, mine
    return finish(client, mine[0]["id"])


def test_an_interrupt_the_cell_handles_binds_what_it_saved(kernel: Kernel) -> None:
    k = kernel
    cell = k.run('%%gpu\nimport time\nprint("started", flush=True)\ntry:\n    time.sleep(30)\n'
                 'except KeyboardInterrupt:\n    print("caught KI"); y = "saved"',
                 stop_on_error=False)
    _interrupt_when_started(k, cell)
    reply = k.reply(cell)
    assert reply["status"] == "ok", reply
    assert "caught KI" in k.outputs(cell)
    assert _check(k, "print(x, y)") == "0 saved\n"


def test_an_interrupt_that_ends_the_cell_keeps_what_it_had_done(kernel: Kernel,
                                                                 client: Any) -> None:
    k = kernel
    before = {j["id"] for j in client.jobs()}
    cell = k.run('%%gpu\nimport time\na = 1\nacc.append(1)\nprint("started", flush=True)\n'
                 'try:\n    time.sleep(30)\nfinally:\n    print("finally ran", flush=True)\nb = 2',
                 stop_on_error=False)
    _interrupt_when_started(k, cell)
    reply = k.reply(cell)
    # the job is cancelled (the contract), and the error shows the KeyboardInterrupt as a
    # local cell's, at the line that was running
    assert reply["status"] == "error" and reply["ename"] == "JobCancelled", reply
    shown = "\n".join(reply["traceback"])
    assert "line 7" in shown and "time.sleep(30)" in shown and "KeyboardInterrupt" in shown, shown
    assert "finally ran" in k.outputs(cell)
    # bound what it had assigned and changed, as a local cell interrupted there leaves it
    assert _check(k, "print(a, acc, 'b' in globals())") == "1 [1] False\n"
    assert _new_job(client, before)["state"] == "cancelled"


def test_a_second_interrupt_cancels_at_once(kernel: Kernel, client: Any) -> None:
    k = kernel
    before = {j["id"] for j in client.jobs()}
    cell = k.run('%%gpu\nimport time\nprint("started", flush=True)\ntry:\n    time.sleep(60)\n'
                 'except KeyboardInterrupt:\n    print("caught", flush=True)\n    time.sleep(60)\n'
                 '    y = 1', stop_on_error=False)
    _interrupt_when_started(k, cell)
    _interrupt_when_started(k, cell, "caught")  # (the cell took the first, and goes on)
    reply = k.reply(cell, timeout=30)  # well before the cell's own minute is up
    assert reply["status"] == "error" and reply["ename"] == "JobCancelled", reply
    # the status and the error agree: the gateway is stopping it (the status said its GPUs
    # were released, and showed no times)
    assert "the gateway is stopping it (its GPUs are free once it has ended" in reply["evalue"]
    final = [m["content"]["data"]["text/plain"] for m in k.iopub
             if m["msg_type"] in ("display_data", "update_display_data")][-1]
    assert final.startswith("[gpu] cancelled · ran "), final
    assert "its GPUs are free once the gateway has stopped it" in final, final
    assert _check(k, "print('y' in globals())") == "False\n"
    assert _new_job(client, before)["state"] == "cancelled"
    wait_for(lambda: all_free(client), DEADLINE)


def test_a_cell_that_ignores_the_interrupt_is_cancelled_after_a_grace(kernel: Kernel,
                                                                       client: Any) -> None:
    k = kernel
    before = {j["id"] for j in client.jobs()}
    cell = k.run("%%gpu\nimport signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                 "print('started', flush=True)\ntime.sleep(60)\nv = 1", stop_on_error=False)
    _interrupt_when_started(k, cell)
    reply = k.reply(cell, timeout=40)
    assert reply["status"] == "error" and reply["ename"] == "JobCancelled", reply
    assert "the cell did not stop within 5 s of the interrupt" in reply["evalue"], reply
    assert _check(k, "print('v' in globals())") == "False\n"
    assert _new_job(client, before)["state"] == "cancelled"
    wait_for(lambda: all_free(client), DEADLINE)  # its GPU is free for the next cell


@pytest.fixture
def own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Gateway, Kernel]]:
    """A gateway of its own (these tests stop it) and a kernel that uses it."""
    (tmp_path / "gw").mkdir()
    gw = start_gateway(tmp_path / "gw")
    monkeypatch.setenv("GPU_MAGIC_URL", gw.url)
    monkeypatch.setenv("GPU_MAGIC_TOKEN", gw.token)
    k = Kernel(tmp_path)
    try:
        assert k.reply(k.run("%load_ext gpu_magic"))["status"] == "ok"
        yield gw, k
    finally:
        k.stop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(gw.proc.pid, signal.SIGCONT)
        gw.stop()


def _running_job(gw: Gateway) -> str:
    with gw.client() as c:
        ids = [j["id"] for j in c.jobs() if j["state"] == "running"]
    assert len(ids) == 1, ids
    return ids[0]


def test_an_interrupt_a_stopped_gateway_cannot_hear_says_so(own: tuple[Gateway, Kernel]) -> None:
    # a stopped gateway (SIGSTOP) keeps its connections: Ctrl-C waited a minute, then said
    # "cancelled ... the gateway is stopping it", and the job, let go on, succeeded
    gw, k = own
    cell = k.run("%%gpu\nimport time\nprint('started', flush=True)\ntime.sleep(8)\nv = 1",
                 stop_on_error=False)
    wait_for(lambda: k.drain(0.1) or "started" in k.outputs(cell), DEADLINE)
    job_id = _running_job(gw)
    os.kill(gw.proc.pid, signal.SIGSTOP)
    k.km.interrupt_kernel()
    reply = k.reply(cell, timeout=30)  # (it waited for the client's read timeout, 60 s)
    assert reply["status"] == "error" and reply["ename"] == "GatewayError", reply
    assert (f"the gpu_magic gateway at {gw.url} did not answer the interrupt (no answer within "
            f"5 s; it may still act on it later). GPU job {job_id}'s end is unknown here"
            in reply["evalue"]), reply
    final = [m["content"]["data"]["text/plain"] for m in k.iopub
             if m["msg_type"] in ("display_data", "update_display_data")][-1]
    assert "cancelled" not in final and "did not answer the interrupt" in final, final
    assert final.count("nothing was bound") == 1, final
    os.kill(gw.proc.pid, signal.SIGCONT)
    # awake, it takes the interrupt it had been sent (as said it might), and attach tells
    with gw.client() as c:
        assert finish(c, job_id)["state"] == "cancelled"
    attach = k.run(f"%gpu attach {job_id}")
    reply = k.reply(attach)
    assert reply["ename"] == "JobCancelled" and "cancelled by an interrupt" in reply["evalue"], reply


def test_an_interrupt_while_submitting_to_a_stopped_gateway_says_so(
        own: tuple[Gateway, Kernel]) -> None:
    # it said "cancelled by an interrupt before it was granted a GPU: nothing ran", and the
    # gateway, resumed, could take the submit it had been sent
    gw, k = own
    os.kill(gw.proc.pid, signal.SIGSTOP)
    # first in the kernel: held in the look at the gateway (its health), before any submit,
    # so there is nothing to cancel and nothing that may still run
    cell = k.run("%%gpu\nv = 0", stop_on_error=False)
    wait_for(lambda: k.drain(0.1) or any(
        m["msg_type"] == "execute_input" and m["parent_header"].get("msg_id") == cell
        for m in k.iopub), DEADLINE)
    time.sleep(1.0)
    k.km.interrupt_kernel()
    reply = k.reply(cell, timeout=30)
    assert reply["ename"] == "JobCancelled", reply
    assert reply["evalue"] == ("the cell was interrupted while preparing it, before the "
                               "gateway took it: no GPU job was made, nothing ran and nothing "
                               "was bound; run the cell again"), reply
    os.kill(gw.proc.pid, signal.SIGCONT)
    assert k.reply(k.run("%%gpu\nv = 0"))["status"] == "ok"  # (its health now known)
    os.kill(gw.proc.pid, signal.SIGSTOP)
    cell = k.run("%%gpu\nv = 1", stop_on_error=False)
    wait_for(lambda: k.drain(0.1) or any(
        m["msg_type"] == "execute_input" and m["parent_header"].get("msg_id") == cell
        for m in k.iopub), DEADLINE)
    time.sleep(1.0)  # (into the submit, which nothing answers)
    k.km.interrupt_kernel()
    reply = k.reply(cell, timeout=30)
    assert reply["ename"] == "GatewayError", reply
    assert "interrupted while submitting GPU job " in reply["evalue"], reply
    assert "and the cancel did not reach the gpu_magic gateway" in reply["evalue"], reply
    assert "it may still take the job and run it" in reply["evalue"], reply


class _Holding:
    """A loopback proxy to the gateway that passes everything up to the first request that
    begins with ``hold`` (on any connection, keep-alive ones too): from there on it passes
    nothing of that connection on, until ``let_go`` is set (a request that comes late);
    ``answers`` collects what the gateway sent back on every connection."""

    def __init__(self, target: str, hold: bytes) -> None:
        host, port = target.rsplit("//", 1)[1].split(":")
        self.target, self.hold = (host, int(port)), hold
        self.held = threading.Event()
        self.let_go = threading.Event()
        self.answers: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                up = socket.create_connection(self.target)
                self.conns += [conn, up]
                threading.Thread(target=self._pipe, args=(conn, up, self.hold),
                                 daemon=True).start()
                threading.Thread(target=self._pipe, args=(up, conn, None, self.answers),
                                 daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, hold: bytes | None,
              seen: list[bytes] | None = None) -> None:
        tail = b""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                at = (tail + data).find(hold) if hold else -1
                if at >= 0:  # (the bodies here cannot hold a request line)
                    dst.sendall(data[: max(0, at - len(tail))])
                    self.held.set()
                    if not self.let_go.wait(DEADLINE):
                        return
                    data, hold = data[max(0, at - len(tail)):], None
                if seen is not None:
                    seen.append(data)
                dst.sendall(data)
                tail = data[-len(hold):] if hold else b""
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("hold, doing", [(b"PUT /v1/blobs/", "sending its inputs"),
                                         (b"POST /v1/jobs", "submitting it")])
def test_an_interrupt_before_the_gateway_took_the_job_names_no_job(
        client: Any, hold: bytes, doing: str) -> None:
    # Ctrl-C during a large upload said "GPU job 75ac... was cancelled by an interrupt
    # before it was granted a GPU", an id that neither %gpu jobs nor %gpu attach knew
    import gpu_magic
    from gpu_magic._client import GatewayClient
    from gpu_magic._errors import JobCancelled

    before = {j["id"] for j in client.jobs()}
    proxy = _Holding(client.url, hold)
    main = threading.main_thread().ident

    def interrupt() -> None:
        if proxy.held.wait(DEADLINE):
            time.sleep(0.3)  # (the client is blocked in its send or its wait for an answer)
            signal.pthread_kill(main, signal.SIGINT)

    try:
        with GatewayClient(proxy.url, client.token, same_host=False) as c:
            c._bulk = False  # (the bulk port is not behind the proxy)
            threading.Thread(target=interrupt, daemon=True).start()
            with pytest.raises(JobCancelled) as got:
                gpu_magic.run("s = float(data.sum())", "H100",
                              {"data": np.ones(4 << 20), "__name__": "__main__"},
                              client=c, quiet=True)
    finally:
        proxy.close()
    assert proxy.held.is_set()
    assert str(got.value) == (f"the cell was interrupted while {doing}, before the gateway took "
                              "it: no GPU job was made, nothing ran and nothing was bound; run "
                              "the cell again")
    assert got.value.job_id is None
    assert {j["id"] for j in client.jobs()} == before and all_free(client)


def test_a_submit_that_comes_after_its_cancel_is_refused(client: Any) -> None:
    # interrupted while submitting, the client's cancel found no job (404) while its submit
    # was still on its way: the gateway took it after, and it ran with nobody following it
    import gpu_magic
    from gpu_magic._client import GatewayClient
    from gpu_magic._errors import JobCancelled

    before = {j["id"] for j in client.jobs()}
    proxy = _Holding(client.url, b"POST /v1/jobs")
    main = threading.main_thread().ident

    def interrupt() -> None:
        if proxy.held.wait(DEADLINE):
            time.sleep(0.3)
            signal.pthread_kill(main, signal.SIGINT)

    try:
        with GatewayClient(proxy.url, client.token, same_host=False) as c:
            c._bulk = False
            threading.Thread(target=interrupt, daemon=True).start()
            with pytest.raises(JobCancelled, match="interrupted while submitting it"):
                gpu_magic.run("made = 1", "H100", {"__name__": "__main__"}, client=c,
                              quiet=True)
            proxy.let_go.set()  # the submit reaches the gateway now, after the cancel
            wait_for(lambda: b"job_cancelled" in b"".join(proxy.answers), DEADLINE)
    finally:
        proxy.close()
    answer = b"".join(proxy.answers).decode()
    assert "409 Conflict" in answer and "was cancelled before the gateway took it" in answer
    assert {j["id"] for j in client.jobs()} == before and all_free(client)


def test_a_cell_says_while_its_gateway_does_not_answer(own: tuple[Gateway, Kernel]) -> None:
    # the widget went on saying "running 10 s, 20 s, ..." for the 35 s the client tried again
    gw, k = own
    cell = k.run("%%gpu\nimport time\nprint('started', flush=True)\ntime.sleep(60)",
                 stop_on_error=False)
    wait_for(lambda: k.drain(0.1) or "started" in k.outputs(cell), DEADLINE)
    wait_for(lambda: k.drain(0.1) or k.models("HTMLModel"), DEADLINE)  # (shown after 1 s)
    gw.proc.kill()
    status = k.models("HTMLModel")[-1]
    wait_for(lambda: k.drain(0.1) or "the gateway does not answer (Connection refused): trying "
             "to reach it again" in str(k.last_value(status, "value")), DEADLINE)
    k.km.interrupt_kernel()  # (and an interrupt then says it could not get there)
    reply = k.reply(cell, timeout=30)
    assert reply["ename"] == "GatewayError", reply
    assert "the interrupt did not reach the gpu_magic gateway" in reply["evalue"], reply
    assert "(Connection refused)" in reply["evalue"], reply


def test_the_status_says_the_cell_is_being_interrupted() -> None:
    s = JobState("H100")
    grant = {"type": "granted", "gpu_type": "H100", "count": 1, "node": "n", "option_index": 0,
             "attempt": 1}
    for ev in (grant, {"type": "started", "attempt": 1}):
        s.apply(ev, now=0.0)
    s.interrupt = "an interrupt"
    assert "interrupting the cell… (interrupt again to cancel it)" in render_text(s, 1.0)
    s.apply({"type": "interrupted", "attempt": 1}, now=1.0)
    assert "its except and finally blocks run" in render_html(s, 1.0)
    s.apply({"type": "error", "ename": "KeyboardInterrupt", "evalue": "", "interrupted": True})
    s.apply({"type": "done", "state": "cancelled", "timings": {}}, now=2.0)
    s.bound = ["a", "acc"]
    text = render_text(s, 2.0)
    assert "interrupting" not in text, text
    assert "cancelled by an interrupt: KeyboardInterrupt · bound a, acc" in text, text


def test_an_interrupt_before_the_grant_was_heard_interrupts_a_cell_already_running(
        client: Any, tmp_path: Path) -> None:
    # the researcher's trial: a Ctrl-C a moment after submitting (the status still said
    # "submitting") was taken for one before any grant: the job was cancelled, its runner
    # killed without the cell's finally, and the cell told "nothing ran" though it had
    from gpu_magic._api import Options, _follow_here, submit
    from gpu_magic._errors import JobCancelled

    ran, fin = tmp_path / "ran", tmp_path / "fin"
    ns: dict[str, Any] = {"__name__": "__main__", "ran": str(ran), "fin": str(fin)}
    job = submit("import time\nopen(ran, 'w').write('x')\nstep = 1\ntry:\n    time.sleep(60)\n"
                 "finally:\n    open(fin, 'w').write('x')", "H100", ns, Options(quiet=True),
                 client=client)
    wait_for(lambda: ran.exists(), DEADLINE)
    assert job.state.grant is None  # nothing of its events read here yet
    assert job._interrupt()  # an interrupt, not a cancel
    with pytest.raises(JobCancelled, match="the cell stopped on KeyboardInterrupt there"):
        _follow_here(job)
    assert fin.exists()  # its finally ran
    assert ns["step"] == 1  # and what it had bound came back, as a local cell's interrupt
    assert finish(client, job.id)["state"] == "cancelled"


def test_an_interrupt_amid_a_flood_of_output_loses_and_repeats_no_line(kernel: Kernel) -> None:
    # the Ctrl-C lands while the kernel is handing on the cell's output: every line up to where
    # the cell took the interrupt arrives once, in order
    k = kernel
    cell = k.run('%%gpu\nimport time\ni = 0\ntry:\n    while i < 300_000:\n'
                 '        print(f"line {i}")\n        i += 1\n        if i % 10 == 0:\n'
                 '            time.sleep(0.001)\nexcept KeyboardInterrupt:\n'
                 '    print(f"caught at {i}")', stop_on_error=False)
    deadline = time.monotonic() + DEADLINE
    while "line 3000\n" not in k.outputs(cell):  # (drain() would wait for the flood to end)
        assert time.monotonic() < deadline
        k.iopub.append(k.kc.get_iopub_msg(timeout=DEADLINE))
    k.km.interrupt_kernel()
    reply = k.reply(cell)
    assert reply["status"] == "ok", reply
    text = k.outputs(cell)
    assert "caught at " in text, text[-200:]
    before, after = text.split("caught at ", 1)
    last = int(after.split()[0])  # (i, which the interrupt may catch before its += 1)
    got = before.split("\n")
    # the interrupt may come inside print(), between its text and its newline, as locally
    whole, part = got[:-1], got[-1]
    assert part in ("", f"line {len(whole)}"), got[-3:]
    assert len(whole) in (last, last + 1), (last, len(whole))
    wrong = [(n, line) for n, line in enumerate(whole) if line != f"line {n}"]
    assert not wrong, wrong[:3]



def _printer(client: Any, n: int, pause: float = 0.05) -> tuple[Any, str]:
    from gpu_magic._jobs import EventFeed

    job = submit(client, f"import time\nfor i in range({n}):\n    print(i, flush=True)\n"
                         f"    time.sleep({pause})")
    return EventFeed(client, job["id"]), job["id"]


def test_a_ctrl_c_while_an_event_is_handled_comes_out_of_the_next_wait(client: Any) -> None:
    # the follower writes each output event whole: a Ctrl-C that comes meanwhile is raised by
    # the next wait for an event, and no event is lost or half written
    feed, job_id = _printer(client, 20)
    written, interrupts, raised = [], 0, 0
    try:
        with feed.held_interrupts():
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            while True:
                try:
                    ev = feed.get(timeout=DEADLINE)
                except KeyboardInterrupt:
                    interrupts += 1
                    continue
                if ev is None or ev["type"] == "done":
                    break
                if ev["type"] == "stdout":
                    text = ev["text"]
                    written.append(text[:1])
                    signal.raise_signal(signal.SIGINT)  # (between the two halves)
                    raised += 1
                    written.append(text[1:])
            signal.raise_signal(signal.SIGINT)  # after the end: too late to stop anything
            with feed.raising(), pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)  # (raising(): at once, where it lands)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        feed.close()
    assert raised >= 2 and interrupts == raised, (raised, interrupts)
    assert "".join(written) == "".join(f"{i}\n" for i in range(20))
    assert finish(client, job_id)["state"] == "succeeded"



def test_a_held_ctrl_c_goes_before_the_events_already_queued(client: Any) -> None:
    # a cell that prints faster than the notebook writes: a Ctrl-C waiting behind the backlog
    # came seconds late, and behind the job's end not at all
    feed, job_id = _printer(client, 300, pause=0)
    try:
        assert finish(client, job_id)["state"] == "succeeded"
        wait_for(feed._done.is_set, DEADLINE)  # (its reader has queued every event, the end too)
        with feed.held_interrupts():
            signal.raise_signal(signal.SIGINT)
            with pytest.raises(KeyboardInterrupt):
                feed.get(timeout=DEADLINE)
            text, ev = "", feed.get(timeout=DEADLINE)  # and the events are all still there
            while ev is not None and ev["type"] != "done":
                text += ev.get("text", "") if ev["type"] == "stdout" else ""
                ev = feed.get(timeout=DEADLINE)
    finally:
        feed.close()
    assert ev is not None and text == "".join(f"{i}\n" for i in range(300))


def test_nothing_in_the_wait_for_an_event_is_python_a_ctrl_c_can_cut(client: Any) -> None:
    # Python takes a signal between two lines: one inside a threading.Condition's wait for the
    # next event once came out as "RuntimeError: release unlocked lock" in place of the
    # KeyboardInterrupt (the submit's wait, where Ctrl-C raises as it lands). A Ctrl-C at each
    # line below get() in turn is a KeyboardInterrupt, and the events still come.
    feed, job_id = _printer(client, 10)
    cut, seen = [], []
    deadline = time.monotonic() + DEADLINE
    try:
        at = 1
        while "done" not in seen:
            assert time.monotonic() < deadline, seen
            try:
                with ctrl_c_at_line(at, "threading.py", "queue.py"):
                    ev = feed.get(timeout=0.05)
                at = 1
            except BaseException as exc:
                cut.append(type(exc).__name__)
                at += 1
                continue
            if ev is not None:
                seen.append(ev["type"])
    finally:
        feed.close()
    assert set(cut) <= {"KeyboardInterrupt"}, cut
    assert seen.count("stdout") >= 1 and finish(client, job_id)["state"] == "succeeded"
