"""Background jobs (``%%gpu --background``, ``run(..., background=True)``) in real kernels: the
handle, binding at a safe point, output kept in its own cell, cancel, several at once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import gpu_magic
from gpu_magic import GpuJob, JobCancelled

from .conftest import ctrl_c_at_line, wait_for
from .test_gateway_http import all_free
from .test_kernel import execute, make_notebook, texts
from .test_widget import saved

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("use_gateway")]
DEADLINE = 60.0


def test_background_cell_returns_a_handle_and_binds_at_wait(tmp_path: Path) -> None:
    nb = make_notebook(
        "%load_ext gpu_magic\nimport time",
        "%%gpu H100 --background\nimport time\nprint('from the background', flush=True)\n"
        "time.sleep(1)\ny = 42\ny * 2",
        "job = _\nprint(type(job).__name__, 'y' in globals())",
        "print('meanwhile')",
        "print(job.wait(), y, job.state, job.grant['gpu_type'], job.result['y'])",
    )
    execute(nb, tmp_path)
    started, handle, meanwhile, waited = nb.cells[1:]
    assert texts(handle, "stdout") == "GpuJob False\n"  # returned at once, nothing bound yet
    assert texts(waited, "stdout") == "84 42 succeeded H100 42\n"
    # the job's output is in its own cell's widget, not in the cells that ran meanwhile
    for other in (handle, meanwhile, waited):
        assert "from the background" not in texts(other, "stdout")
    assert [o.output_type for o in started.outputs] == ["display_data"]
    # ended, its widget became the final status with the job's output (and the cell's value)
    # below it: what a notebook saved and opened again shows
    text, html = saved(started)
    assert text.startswith("[gpu] succeeded") and "bound y · imported time" in text
    assert text.endswith("\nfrom the background\n84\n")
    assert "H100 ×1" in html and "bound y · imported time" in html
    assert html.index("bound y") < html.index(">from the background\n</pre>") \
        < html.index(">84</pre>")


def test_a_background_job_shown_again_in_another_cell_ends_there_too(tmp_path: Path) -> None:
    # the copy shown by `job` in another cell kept its widget, saved as "model not found"
    nb = make_notebook("%load_ext gpu_magic",
                       "%%gpu H100 --background\nimport time\ntime.sleep(1)\nprint('again')",
                       "job = _\njob",
                       "job.wait()")
    execute(nb, tmp_path)
    for cell in nb.cells[1:3]:
        text, _ = saved(cell)
        assert text.startswith("[gpu] succeeded") and text.endswith("\nagain\n"), text


def _until_flag(tmp_path: Path, then: str, setup: str = "") -> tuple[str, str]:
    """A first cell, and a background cell that waits for the file FLAG, then runs
    ``then``: the job ends during the cell that makes the file, always."""
    return (f"%load_ext gpu_magic\nimport time\nFLAG = {str(tmp_path / 'go')!r}\n{setup}",
            "%%gpu --background\nimport os, time\nwhile not os.path.exists(FLAG):\n"
            f"    time.sleep(0.02)\n{then}")


def test_names_bound_before_the_next_cell_and_reassigned_names_kept(tmp_path: Path) -> None:
    # the remote cell waits for cell 3 to create the flag: the job ends during cell 3, always
    nb = make_notebook(
        *_until_flag(tmp_path, "z = 7\nw = 'remote'"),
        "job = _\nw = 'local'",
        "open(FLAG, 'w').close()\nwhile not job.done():\n    time.sleep(0.05)\n"
        "print('z' in globals())",
        "print(z, w, job.result['w'])",
    )
    execute(nb, tmp_path)
    # the job ended during cell 3, but nothing was bound from a thread while it ran
    assert texts(nb.cells[3], "stdout") == "False\n"
    # before cell 4 ran: z bound; w reassigned meanwhile, so kept, with a warning
    assert texts(nb.cells[4], "stdout") == "7 local remote\n"
    warning = texts(nb.cells[4], "stderr")
    assert "kept your w: reassigned here since the job was submitted" in warning
    assert "kept your w" in saved(nb.cells[1])[1]


def test_a_background_job_that_deletes_a_name_says_it_will_delete_it(tmp_path: Path) -> None:
    # until the next cell ran, its status said "will bind scores" of a name it deleted
    nb = make_notebook(
        *_until_flag(tmp_path, "del scores\nz = 7", setup="scores = {'a': 1}"),
        "job = _",
        "from gpu_magic._view import render_text\nopen(FLAG, 'w').close()\n"
        "end = time.monotonic() + 30\n"
        "while 'will' not in render_text(job._job.state, 0) and time.monotonic() < end:\n"
        "    time.sleep(0.05)\nprint(render_text(job._job.state, 0))",
        "print('scores' in globals(), z)",
    )
    execute(nb, tmp_path)
    # and the modules it imported are said apart, as once they are bound
    assert ("will bind z · import os, time · delete scores before the next cell runs (or at "
            "job.wait())\n") in texts(nb.cells[3], "stdout")
    assert texts(nb.cells[4], "stdout") == "False 7\n"
    assert "bound z · imported os, time · deleted scores" in saved(nb.cells[1])[0]


def test_a_background_job_that_failed_says_so_in_the_next_cell(tmp_path: Path) -> None:
    # only its widget, maybe far up the notebook, turned to "failed": the next cells said
    # nothing (found by a newcomer's trial). Said once, in the first cell after it ended.
    nb = make_notebook(
        "%load_ext gpu_magic\nimport time",
        "%%gpu --background\nraise ValueError('bad row 7')",
        "job = _\nwhile not job.done():\n    time.sleep(0.05)",
        "print('next')",
        "print('later')",
    )
    execute(nb, tmp_path)
    said = [texts(c, "stderr") for c in nb.cells[2:]]
    notices = [s for s in said if "background job" in s]
    assert len(notices) == 1 and said.index(notices[0]) in (0, 1), said
    assert "failed: ValueError: bad row 7 (its widget shows more; job.wait() raises it)" \
        in notices[0]
    assert texts(nb.cells[3], "stdout") == "next\n"


def test_cancel_from_the_handle(tmp_path: Path, client: Any) -> None:
    nb = make_notebook(
        "%load_ext gpu_magic",
        "%%gpu A100-80GB --background\nimport time\nprint('started', flush=True)\n"
        "time.sleep(120)\nv = 1",
        # wait for the print, not only for 'running': a cancel in between has nothing to keep
        "job = _\nimport time\nwhile 'started' not in job.output:\n    time.sleep(0.05)\n"
        "print(job.cancel())",
        "from gpu_magic import JobCancelled\ntry:\n    job.wait(timeout=60)\n"
        "except JobCancelled as exc:\n    print('raised', type(exc).__name__)\n"
        "print(job.state, 'v' in globals(), job.cancel())",
    )
    execute(nb, tmp_path)
    assert texts(nb.cells[2], "stdout") == "True\n"
    assert texts(nb.cells[3], "stdout") == "raised JobCancelled\ncancelled False False\n"
    text, html = saved(nb.cells[1])
    assert "cancelled by job.cancel(): nothing was bound" in html
    assert text.endswith("\nstarted\n")  # what it printed before the cancel stays
    wait_for(lambda: all_free(client), DEADLINE)


def test_wait_s_own_errors_and_an_interrupt_of_it_are_one_line(tmp_path: Path,
                                                                 client: Any) -> None:
    # Ctrl-C in job.wait() showed a KeyboardInterrupt through threading's internals and did not
    # say the job goes on; its JobTimeout showed gpu_magic's own stack
    from .test_widget import Kernel

    k = Kernel(tmp_path)
    try:
        assert k.reply(k.run("%load_ext gpu_magic\nimport time"))["status"] == "ok"
        k.reply(k.run("%%gpu A100-80GB --background\nimport time\ntime.sleep(60)"))
        k.reply(k.run("job = _\nwhile job.state != 'running':\n    time.sleep(0.05)"))
        job_id = next(j["id"] for j in client.jobs() if j["state"] == "running")
        cell = k.run("job.wait()", stop_on_error=False)
        wait_for(lambda: k.drain(0.1) or any(
            m["msg_type"] == "execute_input" and m["parent_header"].get("msg_id") == cell
            for m in k.iopub), DEADLINE)
        time.sleep(0.5)  # (into wait()'s loop)
        k.km.interrupt_kernel()
        reply = k.reply(cell)
        assert reply["traceback"] == [f"KeyboardInterrupt: stopped waiting for GPU job {job_id}; "
                                      "it keeps running: job.wait() again, or job.cancel()"], reply
        assert client.job(job_id)["state"] == "running"
        k.reply(k.run("job.cancel()"))
        k.reply(k.run("%%gpu A100-80GB --background --timeout 1\nimport time\ntime.sleep(30)"))
        cell = k.run("job = _\njob.wait()", stop_on_error=False)
        reply = k.reply(cell)
        assert reply["ename"] == "JobTimeout" and len(reply["traceback"]) == 1, reply
        assert reply["traceback"][0].startswith("JobTimeout: "), reply
    finally:
        k.stop()


def test_several_background_jobs_at_once(tmp_path: Path) -> None:
    nb = make_notebook(
        "%load_ext gpu_magic",
        "%%gpu H100 --background\nimport time\ntime.sleep(1)\na = 'one'",
        "first = _",
        "%%gpu A100-80GB --background\nimport time\ntime.sleep(1)\nb = 'two'",
        "second = _",
        "print(second.wait() is None, first.wait() is None, a, b)",
    )
    execute(nb, tmp_path)
    assert texts(nb.cells[5], "stdout") == "True True one two\n"
    assert "bound a · imported time" in saved(nb.cells[1])[0]
    assert "bound b · imported time" in saved(nb.cells[3])[0]


def test_run_in_plain_python_returns_a_handle(capsys: pytest.CaptureFixture[str]) -> None:
    space: dict[str, Any] = {"__name__": "__main__", "base": 40}
    job = gpu_magic.run("print('hi from bg')\nanswer = base + 2\nanswer", "H100", space,
                        background=True)
    assert isinstance(job, GpuJob)
    assert job.wait(timeout=DEADLINE) == 42
    assert space["answer"] == 42 and job.result == {"answer": 42} and job.value == 42
    assert job.grant is not None and job.grant["gpu_type"] == "H100"
    assert "hi from bg" in capsys.readouterr().out
    assert repr(job).startswith("[gpu] succeeded · ")


def test_job_state_learns_the_end_once_the_gateway_is_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # job.state stayed "unreachable" after the gateway was back, until someone called wait()
    import socket

    from gpu_magic import _client, _jobs

    from .conftest import start_gateway

    monkeypatch.setattr(_client, "RESUME_ATTEMPTS", 2)  # (it gives up in a second, not 35)
    monkeypatch.setattr(_jobs, "LOOK_AGAIN_S", 0.5)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    gw = start_gateway(tmp_path, "--port", port)
    try:
        with gw.client() as c:
            job = gpu_magic.run("import time\ntime.sleep(60)", "H100", {"__name__": "__main__"},
                                client=c, quiet=True, background=True)
            wait_for(lambda: job.state == "running", DEADLINE)
            gw.proc.kill()  # (its runner goes with it)
            gw.proc.wait()
            wait_for(lambda: job._finished.is_set(), DEADLINE)  # its follower gave up
            assert job.state == "unreachable" and not job.done()
            gw = start_gateway(tmp_path, "--port", port)  # back, on the same state directory
            wait_for(lambda: job.state == "lost", DEADLINE)  # polled: no wait() called
            assert job.done()
            with pytest.raises(gpu_magic.RunnerLost, match="the gateway restarted"):
                job.wait(timeout=DEADLINE)
    finally:
        gw.stop()


def test_wait_raises_the_cells_own_error_and_times_out() -> None:
    space: dict[str, Any] = {"__name__": "__main__"}
    job = gpu_magic.run("1 / 0", "H100", space, background=True)
    with pytest.raises(ZeroDivisionError):
        job.wait(timeout=DEADLINE)
    slow = gpu_magic.run("import time\ntime.sleep(60)", "H100", space, background=True)
    try:
        with pytest.raises(TimeoutError, match="keeps going"):
            slow.wait(timeout=0.2)
    finally:
        assert slow.cancel() is True
        with pytest.raises(JobCancelled):
            slow.wait(timeout=DEADLINE)


def test_quiet_background_jobs_from_python_show_no_status_and_no_value(tmp_path: Path) -> None:
    # six quiet jobs in a loop showed six status lines and their values (notebook 05)
    nb = make_notebook(
        "%load_ext gpu_magic\nimport gpu_magic",
        "jobs = [gpu_magic.run('print(\"line\", n)\\nn * 10', 'H100', namespace={'n': n},\n"
        "                      background=True, quiet=True) for n in range(2)]\n"
        "print([j.wait() for j in jobs])",
        # notebook 05's jobs print nothing: each left an empty widget in the cell
        "silent = [gpu_magic.run('n', 'H100', namespace={'n': n}, background=True, quiet=True)\n"
        "          for n in range(2)]\nprint([j.wait() for j in silent])",
        # one that prints only once its cell has ended: the output area is there to take it
        "%%gpu --background --quiet\nimport time\ntime.sleep(1)\nprint('late', flush=True)",
        "_.wait()",
    )
    execute(nb, tmp_path)
    silent, late = nb.cells[2:4]
    assert [(o.output_type, o.get("text")) for o in silent.outputs] == [("stream", "[0, 1]\n")]
    text, html = saved(late)
    assert text == "late\n" and ">late\n</pre>" in html and "gpu-magic-status" not in html
    cell = nb.cells[1]
    assert texts(cell, "stdout") == "[0, 10]\n"
    said = " ".join(str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs
                    if o.output_type == "display_data")
    assert "[gpu]" not in said and "succeeded" not in said
    shown = [o.data for o in cell.outputs if o.output_type == "display_data"]
    assert sorted(d["text/plain"] for d in shown) == ["line 0\n", "line 1\n"]  # no value
    assert not any("gpu-magic-status" in d["text/html"] for d in shown)  # no status line


def test_a_name_another_background_job_bound_is_not_the_user_s(tmp_path: Path) -> None:
    # two background cells that both import time or set a scratch name warned that the
    # name was "reassigned since the job was submitted": the other job had bound it
    flag = tmp_path / "go"
    nb = make_notebook(  # the first ends only once the second was submitted
        f"%load_ext gpu_magic\nFLAG = {str(flag)!r}",
        "%%gpu --background --quiet\nimport math, os, time\n"
        "while not os.path.exists(FLAG):\n    time.sleep(0.02)\nt0 = 1",
        "first = _",
        "%%gpu --background --quiet\nimport math\nt0 = 2\nmine = 'job'",
        "second = _\nopen(FLAG, 'w').close()\nfirst.wait()\nimport math",
        "second.wait()\nprint(t0, mine)",
    )
    execute(nb, tmp_path)
    assert texts(nb.cells[5], "stdout") == "2 job\n", [texts(c, "stderr") for c in nb.cells]
    assert not any("kept your" in texts(c, "stderr") for c in nb.cells)


def test_a_job_s_own_underscore_neither_takes_ipython_s_nor_warns(tmp_path: Path) -> None:
    # `for _ in tqdm(...)` in a background cell: "kept your _ (reassigned since submitting)",
    # where the only change was IPython's, making `_` the job's handle
    nb = make_notebook("%load_ext gpu_magic\nimport time",
                       "%%gpu H100 --background\nfor _ in range(3):\n    pass\nz = 5",
                       "time.sleep(3)",
                       "job = _\nprint(type(job).__name__, z)")
    execute(nb, tmp_path)
    assert texts(nb.cells[3], "stdout") == "GpuJob 5\n"
    assert not any("kept your" in texts(c, "stderr") for c in nb.cells), \
        [texts(c, "stderr") for c in nb.cells]


def test_two_background_jobs_changing_one_dict_keep_both_changes(
        capsys: pytest.CaptureFixture[str]) -> None:
    # the researcher's trial: two experiments logging into one dict, run side by side; the
    # later one to end brought back the dict as it had it, and the first one's entry was gone
    import textwrap

    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(textwrap.dedent("""
        import time
        scores, log, tags, order = {"kept": 0, "old": 1}, [], set(), [3, 2, 1]
        def experiment(name, seconds):
            time.sleep(seconds)
            scores[name] = seconds
            scores.pop("old", None)
            log.append(name)
            tags.add(name)
    """), ns)
    scores, log, tags = ns["scores"], ns["log"], ns["tags"]
    first = gpu_magic.run("experiment('A', 1.0)", "H100", ns, background=True, quiet=True)
    second = gpu_magic.run("experiment('B', 0.1)\norder.sort()", "H100", ns, background=True,
                           quiet=True)
    scores["here"] = 5  # a cell's change meanwhile
    ns["order"].reverse()  # (a change a list cannot merge: said, and the job's wins)
    second.wait()
    first.wait()
    assert scores == {"kept": 0, "B": 0.1, "here": 5, "A": 1.0}
    assert log == ["B", "A"] and tags == {"A", "B"}
    assert (ns["scores"], ns["log"], ns["tags"]) == (scores, log, tags)  # the same objects
    err = capsys.readouterr().err
    assert (f"[gpu_magic] background job {first.id}: scores, log, tags changed here since the "
            "job was sent (a cell, or another job); its changes were merged in, yours kept") \
        in err, err
    assert (f"[gpu_magic] background job {second.id}: order changed here since the job was "
            "sent, and the two changes cannot both be kept") in err, err
    assert ns["order"] == [1, 2, 3]


def test_an_array_changed_here_while_a_background_job_changes_it_too_is_said(
        capsys: pytest.CaptureFixture[str]) -> None:
    # a trial: the job's state replaced `arr[1] = 7` made meanwhile without a word, while a
    # list in the same case was noted
    import numpy as np

    ns: dict[str, Any] = {"__name__": "__main__", "arr": np.zeros(3),
                          "stamps": np.zeros(2, "datetime64[s]"), "calm": np.ones(2)}
    arr, calm = ns["arr"], ns["calm"]
    job = gpu_magic.run("import time\ntime.sleep(1)\narr[0] = 5\nstamps[0] = stamps[0] + 5\n"
                        "calm[0] = 2", "H100", ns, background=True, quiet=True)
    arr[1] = 7  # a cell's change meanwhile
    ns["stamps"][1] = np.datetime64(9, "s")
    job.wait(timeout=60)
    assert ns["arr"] is arr and list(arr) == [5, 0, 0]  # the job's state, as documented
    assert list(calm) == [2, 1]
    err = capsys.readouterr().err
    assert (f"[gpu_magic] background job {job.id}: arr, stamps changed here since the job "
            "was sent, and the two changes cannot both be kept (a list changed other than by "
            "appending, an array's values): the job's state replaced yours") in err, err


def test_background_jobs_merge_nested_lists_and_dicts_and_add_counts(
        capsys: pytest.CaptureFixture[str]) -> None:
    # the trial of the day's changes: appends to a defaultdict's lists and keys set in a dict
    # of dicts were lost in silence when a cell or another job changed them meanwhile, and two
    # jobs' `counts["x"] += 1` kept one
    import collections
    import textwrap

    ns: dict[str, Any] = {"__name__": "__main__", "collections": collections}
    exec(textwrap.dedent("""
        import time
        log = collections.defaultdict(list)
        log["k"].append(0)
        nested = {"exp": {"hist": [1]}}
        counts = collections.Counter(x=1)
        def step(name, seconds):
            time.sleep(seconds)
            log["k"].append(name)
            nested["exp"]["hist"].append(name)
            nested["exp"][name] = 1
            counts["x"] += 10
    """), ns)
    log, nested, counts = ns["log"], ns["nested"], ns["counts"]
    hist, inner = nested["exp"]["hist"], nested["exp"]
    first = gpu_magic.run("step('j1', 1.0)", "H100", ns, background=True, quiet=True)
    second = gpu_magic.run("step('j2', 0.1)", "H100", ns, background=True, quiet=True)
    log["k"].append("L")
    hist.append("L")
    inner["L"] = 1
    counts["x"] += 100
    second.wait()
    first.wait()
    assert log["k"] == [0, "L", "j2", "j1"]
    assert hist == [1, "L", "j2", "j1"] and nested["exp"] is inner and inner["hist"] is hist
    assert {k: inner[k] for k in ("L", "j1", "j2")} == {"L": 1, "j1": 1, "j2": 1}
    assert counts["x"] == 121
    err = capsys.readouterr().err
    assert f"[gpu_magic] background job {first.id}: " in err and "merged in" in err, err
    assert "nested['exp']" in err, err


def test_a_ctrl_c_anywhere_in_wait_only_stops_the_waiting() -> None:
    # Python takes a signal between two lines: one inside threading's Condition wait under
    # wait() came out as "RuntimeError: release unlocked lock". A Ctrl-C at each line of
    # threading's code below wait() in turn says it stopped waiting, and the job goes on.
    slow = gpu_magic.run("import time\ntime.sleep(60)", "H100", {}, background=True)
    outcomes: list[str] = []
    try:
        for at in range(1, 200):
            with ctrl_c_at_line(at, "threading.py") as run:
                try:
                    slow.wait(timeout=0.3)
                except BaseException as exc:
                    outcomes.append(f"{type(exc).__name__}: {exc}")
            if run[0] < at:  # (no line left to interrupt: every one was)
                break
        wrong = [o for o in outcomes if not o.startswith((
            "KeyboardInterrupt: stopped waiting for GPU job", "TimeoutError: GPU job"))]
        assert not wrong, wrong
        assert len(outcomes) > 3 and outcomes[-1].startswith("TimeoutError"), outcomes
        assert slow.state == "running"
    finally:
        assert slow.cancel() is True
        with pytest.raises(JobCancelled):
            slow.wait(timeout=DEADLINE)
