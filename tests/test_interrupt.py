"""Interrupting a running ``%%gpu`` cell in a real kernel (jupyter_client), as Jupyter's stop
button does: a KeyboardInterrupt in the cell on the GPU machine, as in a local cell (its handlers
run, what it had bound comes back); a second interrupt, or a cell that does not stop, cancels."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_magic._view import JobState, render_html, render_text

from .conftest import Gateway, start_gateway, wait_for
from .test_gateway_http import all_free, finish
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
