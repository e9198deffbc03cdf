"""Interrupting a running ``%%gpu`` cell in a real kernel (jupyter_client), as Jupyter's stop
button does: a KeyboardInterrupt in the cell on the GPU machine, as in a local cell (its handlers
run, what it had bound comes back); a second interrupt, or a cell that does not stop, cancels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_magic._view import JobState, render_html, render_text

from .conftest import Gateway, wait_for
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
