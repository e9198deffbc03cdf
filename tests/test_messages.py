"""What gpu_magic says when a job does not succeed, or cannot start: each fact once, in one
well-formed sentence. Real gateway, real jobs; the texts are folded from their real events."""

from __future__ import annotations

import html
import re
import threading
from typing import Any

import numpy as np
import pytest

import gpu_magic
from gpu_magic import GatewayError, JobCancelled, SerializationError, WaitExpired
from gpu_magic._client import GatewayClient
from gpu_magic._view import JobState, render_html, render_text

from .conftest import Gateway, wait_for
from .test_gateway_http import finish, submit

DEADLINE = 60.0
# what a glitch looks like: a word said twice in a row, or two stops in a row
GLITCH = re.compile(r"\b(\w+) · \1\b|\.[.;]|; ;|: ;|;\s*\.")


def _folded(client: GatewayClient, job_id: str) -> JobState:
    state = JobState(client.job(job_id)["spec"], job_id)
    for ev in client.events(job_id):
        state.apply(ev, now=0.0)
    return state


def _clean(text: str) -> str:
    assert not GLITCH.search(text), text
    return text


@pytest.fixture
def blocked(use_gateway: Gateway) -> Any:
    """Both H100s of the test pool held by a running job for the length of a test."""
    client = use_gateway.client()
    blocker = submit(client, "import time\ntime.sleep(60)", "H100:2", background=True)
    wait_for(lambda: client.job(blocker["id"])["state"] == "running", DEADLINE)
    yield client
    client.cancel(blocker["id"])
    finish(client, blocker["id"])
    client.close()


def test_an_expired_wait_says_each_thing_once(blocked: GatewayClient) -> None:
    with pytest.raises(WaitExpired) as info:
        gpu_magic.run("1", "H100:2", {"__name__": "__main__"}, client=blocked, wait=0.3)
    _clean(str(info.value))
    assert "Wait longer (--wait)" in str(info.value)  # what to do: in the error, once
    job = max(blocked.jobs(), key=lambda j: j["created"])
    state = _folded(blocked, job["id"])
    text = _clean(render_text(state, 0.0))
    assert text.startswith("[gpu] expired · queued ") and text.count("expired") == 1, text
    # (what it waited for: the test's own job holding both H100s)
    assert "within --wait 0.3 s (H100: 0 of 2 free, held by your job " in text, text
    assert text.endswith("); nothing ran. Nothing was bound."), text
    _clean(render_html(state, 0.0, compact=True))


def test_a_simulated_pool_is_said_before_any_grant_too(blocked: GatewayClient) -> None:
    # the badge came only with a grant: queued and expired jobs looked real
    with pytest.raises(WaitExpired) as info:
        gpu_magic.run("1", "H100:2", {"__name__": "__main__"}, client=blocked, wait=0.3)
    assert "'H100:2' got no GPU of the simulated pool within" in str(info.value)
    job = max(blocked.jobs(), key=lambda j: j["created"])
    events = list(blocked.events(job["id"]))
    queued = JobState(job["spec"], job["id"])
    queued.apply(events[0], now=0.0)
    assert queued.state == "queued"
    assert "queued for H100:2 on the simulated pool (position 1; " in render_text(queued, 0.0)
    assert "simulated</span>" in render_html(queued, 0.0)
    ended = _folded(blocked, job["id"])
    assert "requested H100:2 on the simulated pool" in render_text(ended, 0.0)
    assert "simulated</span>" in render_html(ended, 0.0, compact=True)


def test_a_job_cancelled_while_queued_says_so_once(blocked: GatewayClient) -> None:
    job = gpu_magic.run("v = 1", "H100:2", {"__name__": "__main__"}, client=blocked,
                        background=True)
    wait_for(lambda: job.state == "queued", DEADLINE)
    assert job.cancel()
    with pytest.raises(JobCancelled) as info:
        job.wait(timeout=DEADLINE)
    message = _clean(str(info.value))
    assert message == (f"GPU job {job.id} was cancelled by job.cancel() while queued; nothing "
                       "ran; nothing was bound"), message
    first = _clean(render_text(_folded(blocked, job.id), 0.0)).splitlines()[0]
    assert first.startswith("[gpu] cancelled · ") and first.count("cancelled") == 1, first
    assert first.endswith(" · requested H100:2 on the simulated pool"), first


def test_an_interrupt_while_queued_says_nothing_ran(blocked: GatewayClient) -> None:
    # it said "its GPUs are released" of a job that never held one
    import os
    import signal

    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(JobCancelled) as info:
            gpu_magic.run("v = 1", "H100:2", {"__name__": "__main__"}, client=blocked, quiet=True)
    finally:
        timer.cancel()
    message = _clean(str(info.value))
    assert message.endswith("was cancelled by an interrupt before it was granted a GPU: "
                            "nothing ran"), message
    assert "released" not in message


@pytest.mark.parametrize("url, expected", [
    ("gpu-box:8765", "the gateway URL 'gpu-box:8765' does not say how to reach it "
                     "(Request URL has an unsupported protocol 'gpu-box://'): write it as "
                     "http://HOST:PORT or https://HOST:PORT"),
    ("http://127.0.0.1:9", "cannot reach the gpu_magic gateway at http://127.0.0.1:9: "),
])
def test_an_unreachable_gateway_is_one_sentence(url: str, expected: str) -> None:
    with GatewayClient(url, "x" * 43) as client, pytest.raises(GatewayError) as info:
        client.pool()
    assert _clean(str(info.value)).startswith(expected), str(info.value)
    assert "[Errno" not in str(info.value)  # ("Connection refused", as a person says it)


class Settings:
    def __init__(self) -> None:
        self.scale = 2
        self.lock = threading.Lock()


def test_the_decorator_names_the_argument_that_cannot_be_sent(use_gateway: Gateway) -> None:
    @gpu_magic.gpu("H100")
    def total(values: Any, *more: Any, settings: Any = None) -> float:
        return sum(values)

    with pytest.raises(SerializationError) as info:
        total(i for i in range(3))
    message = str(info.value)
    assert message.startswith("argument 'values' of total() (a generator) cannot be sent to the "
                              "GPU: turn it into a list first"), message
    assert "__gpu" not in message and info.value.name == "values"

    with pytest.raises(SerializationError) as info:
        total([1], 2, (i for i in range(3)))
    assert str(info.value).startswith("argument 'more[1]' of total() (a generator)"), info.value

    with pytest.raises(SerializationError) as info:
        total([1], settings=Settings())
    message = str(info.value)
    assert message.startswith("argument 'settings' of total() (a Settings object) cannot be sent "
                              "to the GPU: settings.lock: a thread lock;"), message
    assert info.value.path == "settings.lock"


def test_a_queued_cell_shows_no_made_up_wait_estimate(blocked: GatewayClient) -> None:
    # the gateway cannot know when the running cell ends (past cells took ~0.3 s; this one
    # holds both H100s for a minute): no number is better than a wrong one
    gpu_magic.run("1", "A100-80GB", {"__name__": "__main__"}, client=blocked, quiet=True)
    job = gpu_magic.run("v = 1", "H100:2", {"__name__": "__main__"}, client=blocked,
                        background=True, quiet=True)
    try:
        wait_for(lambda: job.state == "queued", DEADLINE)
        events = blocked.events(job.id)
        try:
            queued = next(ev for ev in events if ev["type"] == "queued")
        finally:
            events.close()
        assert queued["position"] == 1 and queued["estimate"] is None, queued
        state = JobState("H100:2", job.id)
        state.apply(queued, now=0.0)
        # and what it waits for instead: "queued" alone had a student look for the reason,
        # their own job on the GPUs, in every notebook they had open
        holder = next(j["id"] for j in blocked.jobs() if j["state"] == "running")
        why = f"H100: 0 of 2 free, held by your job {holder}"
        assert state.headline() == f"queued for H100:2 on the simulated pool (position 1; {why})"
        assert blocked.job(job.id)["waiting_why"] == why  # (the sidebar's)
    finally:
        job.cancel()


def test_a_cell_missing_a_local_module_or_file_is_told_what_to_do(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # on a shared gateway the cell runs in the job's own folder: `import utils` and
    # open('data.csv') failed bare, although both are right here in the notebook's folder
    import json
    import secrets

    from .conftest import start_gateway

    tokens = {u: secrets.token_urlsafe(32) for u in ("ana", "ben")}
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    (tmp_path / "tokens.json").chmod(0o600)
    gw = start_gateway(tmp_path, "--tokens-file", str(tmp_path / "tokens.json"),
                       "--isolation", "none", "--force")
    notebook = tmp_path / "course"
    notebook.mkdir()
    (notebook / "course_helpers.py").write_text("SCALE = 3\n")
    (notebook / "data.csv").write_text("1,2\n")
    monkeypatch.chdir(notebook)
    monkeypatch.syspath_prepend(str(notebook))
    try:
        with GatewayClient(gw.url, tokens["ana"]) as c:
            with pytest.raises(ModuleNotFoundError) as info:
                gpu_magic.run("import course_helpers", "H100", {"__name__": "__main__"},
                              client=c, quiet=True)
            text = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
            assert "'course_helpers' is a module in your notebook's folder" in text
            with pytest.raises(FileNotFoundError) as info:
                gpu_magic.run("open('data.csv').read()", "H100", {"__name__": "__main__"},
                              client=c, quiet=True)
            text = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
            assert "'data.csv' is in your notebook's folder" in text
            # and the advice works: imported here, the module travels with the cell
            import course_helpers

            ns: dict[str, Any] = {"__name__": "__main__", "course_helpers":
                                  course_helpers}
            gpu_magic.run("y = course_helpers.SCALE * 2", "H100", ns, client=c,
                          quiet=True)
            assert ns["y"] == 6
            # ... and so does the cell's own import of it, the very cell that failed above
            ns = {"__name__": "__main__"}
            gpu_magic.run("import course_helpers\nz = course_helpers.SCALE", "H100", ns,
                          client=c, quiet=True)
            assert ns["z"] == 3 and ns["course_helpers"] is course_helpers
            # a module importable here from elsewhere on sys.path is to be installed there
            elsewhere = tmp_path / "site"
            elsewhere.mkdir()
            (elsewhere / "labtools_pkg_x.py").write_text("")
            monkeypatch.syspath_prepend(str(elsewhere))
            with pytest.raises(ModuleNotFoundError) as info:
                gpu_magic.run("import labtools_pkg_x", "H100", {"__name__": "__main__"},
                              client=c, quiet=True)
            text = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
            assert "'labtools_pkg_x' is importable here" in text and "install it" in text
            # a module missing here too gets no such advice
            with pytest.raises(ModuleNotFoundError) as info:
                gpu_magic.run("import no_such_module_anywhere", "H100", {"__name__": "__main__"},
                              client=c, quiet=True)
            assert "[gpu_magic]" not in "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
    finally:
        gw.stop()


def test_a_cell_that_resizes_a_tensor_it_was_sent_is_told_to_resize_a_copy(
        use_gateway: Gateway) -> None:
    torch = pytest.importorskip("torch")
    ns = {"__name__": "__main__", "x": torch.zeros(100_000)}
    with use_gateway.client() as c:
        with pytest.raises(RuntimeError) as info:
            gpu_magic.run("x.resize_(200_000)", "H100", ns, client=c, quiet=True)
        text = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
        assert "resize a copy of it (x = x.clone()) instead" in text
        gpu_magic.run("x = x.clone()\nx.resize_(200_000)\nn = x.numel()", "H100", ns,
                      client=c, quiet=True)
        assert ns["n"] == 200_000 and ns["x"].numel() == 200_000


def test_a_small_array_resizes_in_a_cell_and_a_large_one_is_told_to_resize_a_copy(
        use_gateway: Gateway) -> None:
    # protocol 5 rebuilds an array as a view of the bytes that arrived, which numpy cannot
    # resize: a small one gets memory of its own (as it has locally), a large one a hint
    ns = {"__name__": "__main__", "small": np.zeros(10), "frozen": np.arange(3.0),
          "big": np.zeros(100_000)}
    ns["frozen"].flags.writeable = False
    with use_gateway.client() as c:
        gpu_magic.run("small.resize(20, refcheck=False)\nsmall[15] = 7\n"
                      "ro = frozen.flags.writeable", "H100", ns, client=c, quiet=True)
        assert ns["small"].shape == (20,) and ns["small"][15] == 7
        assert ns["ro"] is False  # a read-only input stays read-only
        with pytest.raises(ValueError) as info:
            gpu_magic.run("big.resize(200_000, refcheck=False)", "H100", ns, client=c,
                          quiet=True)
        text = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
        assert "resize a copy of it (x = x.copy())" in text
        gpu_magic.run("big = big.copy()\nbig.resize(200_000, refcheck=False)", "H100", ns,
                      client=c, quiet=True)
        assert ns["big"].shape == (200_000,)


def test_traceback_context_stays_in_the_frame_s_function() -> None:
    """Two lines each side, as IPython shows them: an `if x:` above the line that raised does
    not cut the context, the function's def line is shown and nothing above it, nor the next
    function below."""
    from gpu_magic._remote import _context

    src = ["import math", "def f(x):", "    if x:", "        y = 1 / 0", "    return y",
           "def g():", "    pass"]

    def line(n: int) -> str:
        return src[n - 1] if 0 < n <= len(src) else ""

    assert _context(line, 4, 0, "", module=False) == [
        "      2 def f(x):", "      3     if x:", "----> 4         y = 1 / 0", "      5     return y"]
    assert _context(line, 1, 10, "", module=True)[0] == "---> 11 import math"
    assert _context(lambda n: "", 3, 0, "fallback()", module=False) == ["----> 3 fallback()"]


def _out_of_memory_quietly(client: Any) -> None:
    """A --quiet --oom-fallback cell that runs out of GPU memory on the pool's largest type."""
    with pytest.raises(RuntimeError):
        gpu_magic.run('raise RuntimeError("CUDA out of memory. Tried to allocate 900 GiB")',
                      "H100", {"__name__": "__main__"}, client=client, quiet=True,
                      oom_fallback=True)


def test_a_quick_cell_s_one_line_summary_keeps_its_notes(use_gateway: Gateway) -> None:
    # a cell that ends within a second gets one line instead of the widget; that line left
    # out the note saying why no larger GPU was tried, which the text form and the widget say
    client = use_gateway.client()
    try:
        _out_of_memory_quietly(client)
        job = max(client.jobs(), key=lambda j: j["created"])
        state = _folded(client, job["id"])
    finally:
        client.close()
    assert state.notices and "out of GPU memory" in state.notices[0], state.notices
    text, line = render_text(state, 0.0), _clean(render_html(state, 0.0, compact=True))
    for note in state.notices:
        assert f"note: {note}" in text
        assert f"note: {html.escape(note)}" in line, line


def test_a_quiet_cell_says_its_notes_and_dropped_options_on_stderr(
        use_gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    # --quiet shows no status, and with it went the only word of why no larger GPU was tried
    # and of options that could never be granted (found by a newcomer)
    client = use_gateway.client()
    try:
        _out_of_memory_quietly(client)
        err = capsys.readouterr().err
        assert "[gpu_magic] note: the cell ran out of GPU memory on " in err, err
        assert "no option in its list has a GPU with more memory" in err, err
        assert gpu_magic.run("y = 2", "T4, H100", {"__name__": "__main__"}, client=client,
                             quiet=True) is None
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("[gpu_magic] dropped T4: ")]
        assert len(lines) == 1, err
    finally:
        client.close()


def test_a_cell_with_no_inputs_says_nothing_was_sent(use_gateway: Gateway) -> None:
    # an instructor's trial: its first run said "sent 5 B" (the pickle of no inputs), the next
    # nothing; a cell with inputs still says what it sent
    client = use_gateway.client()
    try:
        texts = []
        for source, ns in (("y = 1", {}), ("y = 2", {}), ("y = len(x)", {"x": "abc"})):
            job = gpu_magic.run(source, "H100", {"__name__": "__main__", **ns}, client=client,
                                quiet=True, background=True)
            job.wait(timeout=DEADLINE)
            texts.append(render_text(job._job.state, 0.0))
    finally:
        client.close()
    assert "sent" not in texts[0] and "sent" not in texts[1], texts
    assert "sent " in texts[2], texts
