"""The job's widget in real kernels (nbclient, jupyter_client): what it shows, its stored state,
its text form for front ends without widgets, and its Cancel button in a foreground cell."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import KernelManager

from gpu_magic._view import JobState, outputs_html, outputs_text, render_html, render_text

from .conftest import Gateway, plain, wait_for
from .test_gateway_http import finish, submit
from .test_kernel import execute, make_notebook, texts

pytestmark = pytest.mark.slow
WIDGET = "application/vnd.jupyter.widget-view+json"
DEADLINE = 60.0


def widget_states(nb: Any) -> dict[str, dict[str, Any]]:
    """model id → (model name, state) of the widget state nbclient stored in the notebook."""
    stored = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return {k: {"model": v["model_name"], **v["state"]} for k, v in stored.get("state", {}).items()}


def descendants(states: dict[str, dict[str, Any]], model_id: str) -> list[dict[str, Any]]:
    """The widget and every widget inside it (children, recursively)."""
    out, stack = [], [model_id]
    while stack:
        s = states[stack.pop()]
        out.append(s)
        stack += [c.removeprefix("IPY_MODEL_") for c in s.get("children", [])]
    return out


def widget_of(cell: Any) -> str:
    views = [o.data[WIDGET]["model_id"] for o in cell.outputs
             if o.output_type == "display_data" and WIDGET in o.data]
    assert len(views) == 1, [o.output_type for o in cell.outputs]
    return views[0]


def saved(cell: Any) -> tuple[str, str]:
    """The text and HTML a cell keeps of its ended background job, which must be no widget: a
    notebook opened again has no widget state ("Error displaying widget: model not found")."""
    shown = [o.data for o in cell.outputs if o.output_type == "display_data"
             and "gpu-magic-" in o.data.get("text/html", "")]
    assert len(shown) == 1, [o.output_type for o in cell.outputs]
    assert WIDGET not in shown[0], shown[0]
    return shown[0].get("text/plain", ""), shown[0]["text/html"]


def test_a_background_job_s_output_in_the_forms_a_saved_notebook_keeps() -> None:
    """Prints as preformatted text as a terminal leaves them (colours off, a \\r-rewritten
    progress line in its last form, stderr tinted), displays by their richest form HTML holds."""
    png = "iVBORw0KGgo=\n"
    outs = [{"output_type": "stream", "name": "stdout", "text": "epoch 1 <ok>\n10%\r100%\r\n"},
            {"output_type": "stream", "name": "stderr", "text": "\x1b[31mwarn\x1b[0m\n"},
            {"output_type": "display_data", "data": {"text/plain": "<Figure>", "image/png": png},
             "metadata": {"image/png": {"width": 320}}},
            {"output_type": "display_data", "data": {"text/plain": "df", "text/html": "<table/>"},
             "metadata": {}},
            {"output_type": "display_data", "data": {"text/plain": "84"}, "metadata": {}}]
    text = outputs_text(outs)
    assert text == "epoch 1 <ok>\n100%\nwarn\n<Figure>\ndf\n84\n"
    markup = outputs_html(outs)
    assert "epoch 1 &lt;ok&gt;\n100%\n</pre>" in markup and "\x1b" not in markup
    assert 'jp-rendermime-error-background' in markup.split("warn")[0].rsplit("<pre", 1)[1]
    assert '<img src="data:image/png;base64,iVBORw0KGgo=" width="320"' in markup
    assert "<div><table/></div>" in markup and ">84</pre>" in markup
    assert "&lt;Figure&gt;" not in markup and ">df<" not in markup  # the richer form only
    assert outputs_html([]) == "" and outputs_text([]) == ""


def test_the_saved_form_of_output_stays_apart_and_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    """One output's unclosed HTML does not take in the outputs after it; image data cannot
    leave its attribute; hyperlinks and backspaces read as a terminal leaves them; a huge
    output is cut, saying where the rest is."""
    import gpu_magic._view as view

    outs = [{"output_type": "display_data", "data": {"text/html": "<table><tr><td>open"}},
            {"output_type": "stream", "name": "stdout", "text": "after\n"},
            {"output_type": "display_data",
             "data": {"image/png": 'iVBOR" onerror="alert(1)'}, "metadata": {}}]
    markup = outputs_html(outs)
    assert "<td>open</td></tr></table></div><pre" in markup
    assert 'onerror="' not in markup and "iVBOR&quot;onerror=&quot;alert(1)" in markup
    assert view.as_shown("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\ ab\x08c\n") == "link ac\n"
    monkeypatch.setattr(view, "SAVED_MAX", 10)
    big = [{"output_type": "stream", "name": "stdout", "text": "x" * 30}]
    text = outputs_text(big)
    assert text.startswith("x" * 10 + "\n[gpu_magic] the output goes on") and "job.output" in text
    assert ">" + "x" * 10 + "</pre>" in outputs_html(big) and "first 10 B" in text


def test_theme_colours_keep_a_fixed_colour_first() -> None:
    # an untrusted notebook's sanitizer drops a var() declaration whole: the fixed one stays
    s = JobState("H100", "j1")
    s.apply({"type": "done", "state": "succeeded"}, now=1.0)
    markup = render_html(s, 1.0)
    assert "color:#15803d;color:var(--jp-success-color1,#15803d)" in markup
    assert "border-left:3px solid #15803d;border-left-color:var(" in markup


def test_text_and_html_forms_are_readable() -> None:
    """The pure forms: grant as the headline, the option that won and why, attempts in order."""
    s = JobState("H100:2, A100-80GB:2, any", "abc123")
    s.sent_bytes, s.reused = 3 * 1024 * 1024, 2
    s.apply({"type": "queued", "position": 2, "estimate": 30.0}, now=0.0)
    assert "position 2" in render_text(s, 0.0) and "about 30 s" in render_text(s, 0.0)
    grant = {"type": "granted", "gpu_type": "A100-80GB", "count": 2, "node": "node-3",
             "option_index": 1, "passed_over": [{"option": "H100:2", "reason": "busy"}],
             "memory_gb": 80, "simulated": True, "attempt": 1}
    s.apply(grant, now=1.0)
    s.apply({"type": "started", "attempt": 1}, now=1.0)
    text = render_text(s, 4.5)
    assert text.splitlines()[0] == ("[gpu] running 3.5 s · A100-80GB ×2 on node-3 (simulated) · "
                                    "option 2 of 3 (H100:2: busy) · 80 GB")
    assert "sent 3.0 MiB, 2 input buffers reused from the gateway cache" in text
    s.apply({"type": "stderr", "text": "[gpu_magic] the runner process died (killed by signal "
                                       "SIGKILL); retrying (attempt 2 of 2)\n"}, now=5.0)
    s.apply({**grant, "node": "node-4", "attempt": 2}, now=6.0)
    # granted again, its runner not started yet: the line still says where it stands
    assert render_text(s, 6.0).startswith("[gpu] granted · A100-80GB ×2 on node-4")
    s.apply({"type": "done", "state": "succeeded",
             "timings": {"queued_s": 1.0, "ran_s": 2.0, "total_s": 6.0}}, now=8.0)
    s.bound = ["model"]
    text = render_text(s, 9.0)
    assert "attempt 1: A100-80GB ×2 on node-3 (simulated) — the runner process died" in text
    assert "attempt 2: A100-80GB ×2 on node-4 (simulated) — succeeded" in text
    assert text.startswith("[gpu] succeeded · queued 1.0 s · ran 2.0 s · total 6.0 s")
    assert "bound model" in text
    page = render_html(s, 9.0)
    assert "A100-80GB ×2" in page and "node-4" in page and ">simulated<" in page
    attempts = page[page.index("<ol"):page.index("</ol>")]
    assert attempts.index("node-3") < attempts.index("node-4")  # in order
    assert "<script" not in render_html(JobState("<script>", "x"), 0.0)  # escaped

    c = JobState("H100", "j")
    c.apply({"type": "granted", "gpu_type": "H100", "count": 1, "node": "n", "option_index": 0},
            now=0.5)
    silent = JobState("H100", "s")  # (before any output: no output to point to)
    silent.apply(c.grant, now=0.5)
    c.apply({"type": "stdout", "text": "step 1\n"}, now=0.7)
    for job in (c, silent):
        job.apply({"type": "done", "state": "cancelled", "message": "cancelled while running"},
                  now=1.0)
        job.cancel = "the Cancel button"
    assert ("cancelled by the Cancel button: nothing was bound (the namespace is as before); "
            "the output so far is kept below; its GPUs are released") in render_text(c, 1.0)
    assert ("cancelled by the Cancel button: nothing was bound (the namespace is as before); "
            "its GPUs are released") in render_text(silent, 1.0)
    q = JobState("H100", "q")  # never granted: no GPUs to speak of
    q.apply({"type": "done", "state": "cancelled"}, now=1.0)
    q.cancel = "the Cancel button"
    assert ("cancelled by the Cancel button before it was granted a GPU: nothing ran, nothing "
            "was bound") in render_text(q, 1.0)


@pytest.mark.usefixtures("use_gateway")
def test_foreground_widget_shows_the_grant_and_keeps_the_final_summary(
        client: Any, tmp_path: Path) -> None:
    blocker = submit(client, "import time\ntime.sleep(60)", "H100:2", background=True)
    try:
        wait_for(lambda: client.job(blocker["id"])["state"] == "running", DEADLINE)
        nb = make_notebook(
            "%load_ext gpu_magic",
            "%%gpu H100:2, A100-80GB\nimport time\nprint('first line')\ntime.sleep(1.5)\n"
            "print('second line')\nx = 6 * 7\nx",
        )
        execute(nb, tmp_path)
    finally:
        client.cancel(blocker["id"])
        finish(client, blocker["id"])
    cell = nb.cells[1]
    # the widget first, then the cell's own output in order, then its value
    kinds = [o.output_type for o in cell.outputs]
    assert kinds[0] == "display_data" and kinds[-1] == "execute_result", kinds
    assert set(kinds[1:-1]) == {"stream"}, kinds
    assert texts(cell, "stdout") == "first line\nsecond line\n"
    assert texts(cell, "execute_result") == "42"
    # once it ended, the widget gave way to its final status as HTML: a notebook opened
    # again without its kernel showed "Loading widget..." for good
    data = cell.outputs[0].data
    assert WIDGET not in data
    html = data["text/html"]
    assert "A100-80GB ×1" in html and "sim-vm" in html and ">simulated<" in html
    assert "option 2 of 2 (H100:2: 0 of 2 H100 free)" in html
    assert "succeeded" in html and "bound" in html
    first = data["text/plain"].splitlines()[0]
    assert first.startswith("[gpu] succeeded · queued") and "A100-80GB ×1 on sim-vm" in first
    assert "option 2 of 2" in first
    assert "succeeded" in data["text/html"] and "A100-80GB ×1" in data["text/html"]
    assert "Widget" not in data["text/plain"] and "VBox" not in data["text/plain"]


@pytest.mark.usefixtures("use_gateway")
def test_a_status_shown_while_the_cell_ran_keeps_its_form_at_the_end(tmp_path: Path) -> None:
    # shown as a card when its output came, it ended as one long line (no bar, "3.8" and
    # "MiB" on two lines), as only a cell too quick to show anything should
    nb = make_notebook("%load_ext gpu_magic", "%%gpu A100-80GB\nprint('first')\nx = 1",
                       "%%gpu A100-80GB\nx = 2")
    execute(nb, tmp_path)
    shown, quick = nb.cells[1].outputs[0].data, nb.cells[2].outputs[0].data
    assert texts(nb.cells[1], "stdout") == "first\n"
    assert "border-left:3px solid" in shown["text/html"] and "succeeded" in shown["text/html"]
    assert "border-left" not in quick["text/html"]  # (never shown running: one line)
    # of one GPU, "80 GB" ("80 GB each" read oddly)
    assert "A100-80GB ×1" in shown["text/html"] and " · 80 GB<" in shown["text/html"], shown


@pytest.mark.usefixtures("use_gateway")
def test_modules_the_cell_changed_are_said_as_changed_inputs_not_imports(tmp_path: Path) -> None:
    # a newcomer's trial: `dyn.A = 4` on an input module said "imported dyn", and a change to
    # helpers.py's module beside the notebook came back without a word
    (tmp_path / "helpers_w.py").write_text("SCALE = 1\n")
    nb = make_notebook(
        "%load_ext gpu_magic\nimport types\nimport helpers_w as hw\n"
        "dyn = types.ModuleType('dyn')\ndyn.A = 3",
        "%%gpu H100\nimport math\nhw.SCALE = 10\ndyn.A = 4\nout = math.floor(2.5)",
        "print(hw.SCALE, dyn.A, out)",
    )
    execute(nb, tmp_path)
    assert texts(nb.cells[2], "stdout") == "10 4 2\n"
    status = nb.cells[1].outputs[0].data["text/plain"]
    assert status.endswith("\n      bound out, dyn, hw · imported math"), status
    # attached, which names were inputs is not known: its imports are still said as such
    nb = make_notebook("%load_ext gpu_magic",
                       "%%gpu H100 --background\nimport math\nx = math.floor(2.5)",
                       "job = _\njob.wait()\ndel x, math",
                       "%gpu attach {job.id}",
                       "print(x, math.pi > 3)")
    execute(nb, tmp_path)
    assert texts(nb.cells[4], "stdout") == "2 True\n"
    status = [o.data["text/plain"] for o in nb.cells[3].outputs
              if o.output_type == "display_data"][0]
    assert status.endswith("\n      bound x · imported math"), status


@pytest.mark.usefixtures("use_gateway")
def test_clear_output_in_the_cell_keeps_the_status_above_its_output(tmp_path: Path) -> None:
    """A live-plot loop clears the cell's output each step; the front end clears the status
    with it, so it is shown again, and the cell ends with its final status on top."""
    nb = make_notebook(
        "%load_ext gpu_magic",
        "%%gpu H100\nfrom IPython.display import clear_output\nimport time\n"
        "for i in range(4):\n    clear_output(wait=i % 2 == 0)\n    print('step', i)\n"
        "    time.sleep(0.4)\ndone = i",
    )
    execute(nb, tmp_path)
    cell = nb.cells[1]
    assert [o.output_type for o in cell.outputs] == ["display_data", "stream"], cell.outputs
    assert cell.outputs[1].text == "step 3\n"
    status = cell.outputs[0].data
    assert WIDGET not in status  # the widget it became gave way to the final status
    assert status["text/plain"].startswith("[gpu] succeeded"), status["text/plain"]
    assert "bound clear_output, i, done · imported time" in status["text/plain"], status
    # clear_output(wait=True) clears when the next output comes, as locally: a cell ending on
    # it keeps what it printed (re-shown at once, the status was that next output)
    nb = make_notebook("%load_ext gpu_magic", "%%gpu H100\nfrom IPython.display import "
                       "clear_output\nprint('keep')\nclear_output(wait=True)")
    execute(nb, tmp_path)
    outputs = nb.cells[1].outputs
    assert [o.output_type for o in outputs] == ["display_data", "stream"], outputs
    assert outputs[1].text == "keep\n" and "succeeded" in outputs[0].data["text/plain"]
    # ... unless a value or an error follows: that clears what it printed, not the status
    nb = make_notebook("%load_ext gpu_magic",
                       "%%gpu H100\nfrom IPython.display import clear_output\nprint('gone')\n"
                       "clear_output(wait=True)\n6 * 7",
                       "%%gpu H100\nfrom IPython.display import clear_output\nprint('gone')\n"
                       "clear_output(wait=True)\n1 / 0")
    execute(nb, tmp_path, allow_errors=True)
    for cell, last in zip(nb.cells[1:], ("execute_result", "error"), strict=True):
        kinds = [o.output_type for o in cell.outputs]
        assert kinds == ["display_data", last], cell.outputs
        assert "[gpu]" in cell.outputs[0].data["text/plain"]


def test_quiet_shows_no_widget(use_gateway: Gateway, tmp_path: Path) -> None:
    nb = make_notebook("%load_ext gpu_magic",
                       "%%gpu --quiet\nimport time\ntime.sleep(1.2)\nprint('only this')")
    execute(nb, tmp_path)
    assert [o.output_type for o in nb.cells[1].outputs] == ["stream"]
    assert nb.cells[1].outputs[0].text == "only this\n"
    assert not widget_states(nb)


def test_text_form_in_terminal_ipython(use_gateway: Gateway, tmp_path: Path) -> None:
    """Terminal IPython has no widgets: the text form, and never a raw repr."""
    code = ("ip = get_ipython(); ip.run_line_magic('load_ext', 'gpu_magic'); "
            "ip.run_cell_magic('gpu', 'H100', 'y = 6 * 7\\nprint(\"remote says\", y)'); "
            "print('local y', y)")
    out = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "--colors=nocolor",
                          "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "remote says 42" in lines and "local y 42" in lines
    final = [ln for ln in lines if ln.startswith("[gpu] succeeded")]
    assert final and "H100 ×1 on sim-vm (simulated)" in final[-1], out.stdout
    assert "option 1 of 1" not in final[-1]  # (a spec of one option: no choice was made)
    assert "object at 0x" not in out.stdout and "Widget" not in out.stdout


class Kernel:
    """A real kernel driven message by message (what a front end does)."""

    def __init__(self, cwd: Path) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=DEADLINE)
        self.iopub: list[dict[str, Any]] = []

    def run(self, code: str, **kw: Any) -> str:
        return str(self.kc.execute(code, **kw))

    def drain(self, timeout: float = 0.2) -> None:
        while True:
            try:
                self.iopub.append(self.kc.get_iopub_msg(timeout=timeout))
            except Exception:
                return

    def reply(self, msg_id: str, timeout: float = DEADLINE) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_shell_msg(timeout=0.5)
            except Exception:
                self.drain(0.05)
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                self.drain()
                content = msg["content"]
                if "traceback" in content:  # (without IPython's colours)
                    content["traceback"] = [plain(t) for t in content["traceback"]]
                return content  # type: ignore[no-any-return]
        raise AssertionError(f"no reply to {msg_id} within {timeout} s")

    def outputs(self, msg_id: str, kind: str = "stream") -> str:
        return "".join(m["content"].get("text", "") for m in self.iopub
                       if m["parent_header"].get("msg_id") == msg_id
                       and m["msg_type"] == kind)

    def models(self, name: str) -> list[str]:
        return [m["content"]["comm_id"] for m in self.iopub if m["msg_type"] == "comm_open"
                and m["content"]["data"]["state"].get("_model_name") == name]

    def last_value(self, comm_id: str, key: str) -> Any:
        value = None
        for m in self.iopub:
            c = m["content"]
            if m["msg_type"] in ("comm_open", "comm_msg") and c.get("comm_id") == comm_id:
                state = c.get("data", {}).get("state", {})
                if key in state:
                    value = state[key]
        return value

    def click(self, comm_id: str) -> None:
        msg = self.kc.session.msg("comm_msg", {
            "comm_id": comm_id, "data": {"method": "custom", "content": {"event": "click"}}})
        self.kc.shell_channel.send(msg)

    def stop(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.mark.usefixtures("use_gateway")
def test_cancel_button_cancels_a_foreground_cell(client: Any, tmp_path: Path) -> None:
    """The kernel is blocked in %%gpu, yet the click is handled; a cell queued behind it still
    runs afterwards (the pump hands every other message on, in order)."""
    before = {j["id"] for j in client.jobs()}
    k = Kernel(tmp_path)
    try:
        k.reply(k.run("%load_ext gpu_magic\nkeep = 'untouched'"))
        cell = k.run("%%gpu A100-80GB\nimport time\nprint('started', flush=True)\n"
                     "time.sleep(120)\nv = 1", stop_on_error=False)
        wait_for(lambda: k.drain(0.1) or ("started" in k.outputs(cell) and k.models("ButtonModel")),
                 DEADLINE)
        queued = k.run("print('queued cell ran', keep, 'v' in globals())")
        button = k.models("ButtonModel")[0]
        k.click(button)
        reply = k.reply(cell)
        assert reply["status"] == "error" and reply["ename"] == "JobCancelled", reply
        assert "by the Cancel button" in reply["evalue"]
        assert k.reply(queued)["status"] == "ok"
        assert k.outputs(queued) == "queued cell ran untouched False\n"
        html_models = k.models("HTMLModel")
        final = k.last_value(html_models[-1], "value")
        assert "cancelled by the Cancel button" in final and "nothing was bound" in final
        assert k.last_value(button, "disabled") is True
    finally:
        k.stop()
    mine = [j for j in client.jobs() if j["id"] not in before]
    assert len(mine) == 1 and finish(client, mine[0]["id"])["state"] == "cancelled"
    # its record says where too, as the sidebar shows it (it read "cancelled while running")
    record = client.job(mine[0]["id"])
    assert record["message"].startswith("cancelled by the Cancel button while running"), record


@pytest.mark.usefixtures("use_gateway")
def test_an_ended_job_s_widget_stays_open_in_its_final_form(tmp_path: Path) -> None:
    """A browser trial: a page reloaded while a background job ran showed its widget again,
    and when the job ended the cell went blank: the display update that replaces the widget
    cannot be placed after a reload (display ids do not survive one), and the widget had been
    closed. It stays open now, showing how the job ended, its output kept."""
    k = Kernel(tmp_path)
    try:
        k.reply(k.run("%load_ext gpu_magic"))
        cell = k.run("%%gpu H100 --background\nprint('bg-line', flush=True)\nx = 1")
        k.reply(cell)
        html = wait_for(lambda: k.drain(0.1) or k.models("HTMLModel"), DEADLINE)[0]
        wait_for(lambda: k.drain(0.1) or "succeeded" in (k.last_value(html, "value") or ""),
                 DEADLINE)
        k.drain(0.5)
        closed = {m["content"].get("comm_id") for m in k.iopub if m["msg_type"] == "comm_close"}
        ours = {*k.models("HTMLModel"), *k.models("OutputModel"), *k.models("ButtonModel"),
                *k.models("VBoxModel")}
        assert ours and not ours & closed, (ours, closed)
        out = k.models("OutputModel")[0]
        assert "bg-line" in str(k.last_value(out, "outputs")), k.last_value(out, "outputs")
        # one that printed more than KEPT_OUTPUT keeps its final status, not its output (its
        # final display holds that): what the kernel keeps of ended widgets stays small
        k.reply(k.run("%%gpu H100 --background\nprint('y' * (1200 << 10))"))
        html = wait_for(lambda: k.drain(0.1) or k.models("HTMLModel")[1:], DEADLINE)[0]
        wait_for(lambda: k.drain(0.1) or "succeeded" in (k.last_value(html, "value") or ""),
                 DEADLINE)
        k.drain(0.5)
        assert not k.last_value(k.models("OutputModel")[1], "outputs")
    finally:
        k.stop()


@pytest.mark.usefixtures("use_gateway")
def test_large_inputs_going_up_are_said_and_the_status_takes_that_place(tmp_path: Path) -> None:
    # a cell with 200 MiB of inputs showed nothing for seconds while they went up (found by
    # a newcomer); the notice then gives way to the status: one display, not two
    k = Kernel(tmp_path)
    try:
        k.reply(k.run("%load_ext gpu_magic\nimport os\nbig = os.urandom(24 << 20)"))
        cell = k.run("%%gpu H100\nn = len(big)")
        assert k.reply(cell)["status"] == "ok"
        k.drain()
        mine = [m for m in k.iopub if m["parent_header"].get("msg_id") == cell
                and m["msg_type"] in ("display_data", "update_display_data")]
        shown = [m for m in mine if m["msg_type"] == "display_data"]
        assert len(shown) == 1, [m["content"]["data"].get("text/plain") for m in mine]
        assert shown[0]["content"]["data"]["text/plain"] == "[gpu] sending 24.0 MiB of inputs…"
        same = shown[0]["content"]["transient"]["display_id"]
        updates = [m["content"] for m in mine if m["msg_type"] == "update_display_data"]
        assert updates and all(u["transient"]["display_id"] == same for u in updates)
        assert updates[0]["data"]["text/plain"].startswith("[gpu] sent 24.0 MiB of inputs in ")
        assert updates[-1]["data"]["text/plain"].startswith("[gpu] succeeded"), updates[-1]
    finally:
        k.stop()


def test_a_refused_upload_does_not_leave_the_cell_saying_it_sends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .conftest import start_gateway

    gw = start_gateway(tmp_path, "--max-blob-bytes", "20M")
    monkeypatch.setenv("GPU_MAGIC_URL", gw.url)
    monkeypatch.setenv("GPU_MAGIC_TOKEN", gw.token)
    k = Kernel(tmp_path)
    try:
        k.reply(k.run("%load_ext gpu_magic\nimport os\nbig = os.urandom(24 << 20)"))
        cell = k.run("%%gpu H100\nn = len(big)", stop_on_error=False)
        reply = k.reply(cell)
        assert reply["status"] == "error", reply
        assert reply["evalue"].startswith("the blob is 24.0 MiB; this gateway takes at most "
                                          "20.0 MiB per blob"), reply["evalue"]
        assert "Make or load such data inside the cell" in reply["evalue"]
        k.drain()
        texts = [m["content"]["data"]["text/plain"] for m in k.iopub
                 if m["parent_header"].get("msg_id") == cell
                 and m["msg_type"] in ("display_data", "update_display_data")]
        assert texts == ["[gpu] sending 24.0 MiB of inputs…",
                         "[gpu] stopped while sending or submitting: see below"], texts
    finally:
        k.stop()
        gw.stop()


def test_a_saved_background_cell_keeps_its_output_without_widget_state(
        use_gateway: Gateway, tmp_path: Path) -> None:
    """The saved notebook is valid, and the background job's cell holds its final status and
    what it printed as text and HTML: no widget, which a notebook opened again cannot show."""
    nb = make_notebook("%load_ext gpu_magic",
                       "%%gpu H100 --background\nimport time\ntime.sleep(1.2)\nprint('kept')",
                       "job = _\njob.wait()")
    execute(nb, tmp_path)
    import nbformat

    path = tmp_path / "saved.ipynb"
    nbformat.write(nb, path)
    again = nbformat.read(path, as_version=4)
    nbformat.validate(again)
    text, markup = saved(again.cells[1])
    assert text.startswith("[gpu] succeeded") and text.endswith("\nkept\n")
    assert markup.index("succeeded") < markup.index(">kept\n</pre>")


def test_a_job_followed_again_counts_its_time_from_its_real_start() -> None:
    # %gpu attach replays "started" only now: the clock began at zero, then jumped at the end
    import time as _time

    s = JobState("H100", "j")
    s.started_wall = _time.time() - 14.0
    s.apply({"type": "started"}, now=100.0)
    assert 13.5 < (s.elapsed(100.0) or 0) < 15.0
    assert "running 14" in render_text(s, 100.0)


def test_a_queued_job_says_how_long_it_has_waited_and_why() -> None:
    # the widget said "queued (position 1)" for minutes: nothing moved, it read as stuck
    s = JobState("H100:2", "j")
    s.apply({"type": "queued", "position": 2, "estimate": 30}, now=50.0)
    s.apply({"type": "queued", "position": 1, "estimate": 12}, now=60.0)  # (still since 50)
    assert s.progress(62.5) == "queued 12 s (position 1, about 12 s)"
    assert "queued 12 s (position 1" in render_html(s, 62.5)
    s.apply({"type": "queued", "position": 1, "held": "you hold 4 GPUs, your limit"}, now=63.0)
    assert s.progress(63.2) == "queued 13 s (position 1; you hold 4 GPUs, your limit)"


def test_a_queued_job_cancelled_by_an_interrupt_says_how_long_it_waited() -> None:
    # a trial: Jupyter's stop button left "cancelled" alone, the Cancel button "cancelled ·
    # queued 3.7 s · total 3.7 s"
    s = JobState("T4", "j")
    s.apply({"type": "queued", "position": 1}, now=10.0)
    s.cancelled_here(now=13.7)
    assert s.progress(20.0) == "cancelled · queued 3.7 s · total 3.7 s"


@pytest.mark.parametrize(("end", "said"), [
    ("succeeded", "the cancel did not get through: Connection refused; the job went on to its end"),
    ("cancelled", None),  # cancelled after all (the sidebar): the failed try is history
])
def test_a_cancel_that_did_not_get_through_is_said_for_what_it_was_at_the_end(
        end: str, said: str | None) -> None:
    # the status of a job that then ran to its end still read "the cancel did not get
    # through", as if it were still news
    s = JobState("T4", "j")
    s.apply({"type": "granted", "gpu_type": "T4", "gpu_count": 1, "node": "n"}, now=1.0)
    s.cancel_error = "the cancel did not get through: Connection refused"
    assert "the cancel did not get through: Connection refused\n" in render_text(s, 2.0) + "\n"
    s.apply({"type": "done", "state": end}, now=3.0)
    text, html = render_text(s, 4.0), render_html(s, 4.0)
    if said is None:
        assert "did not get through" not in text and "did not get through" not in html
    else:
        assert said in text and said in html


def test_a_job_followed_again_counts_its_wait_from_its_submission() -> None:
    import time as _time

    s = JobState("H100", "j")
    s.created_wall = _time.time() - 40.0
    s.apply({"type": "queued", "position": 3}, now=100.0)
    assert s.progress(100.0).startswith("queued 40 s")


def test_a_status_shown_before_the_widget_does_not_freeze_at_zero_seconds() -> None:
    # shown once before the widget takes over, "running 0.0 s" stayed while output arrived
    s = JobState("H100", "j")
    s.apply({"type": "granted", "gpu_type": "H100", "count": 1, "node": "n"}, now=0.0)
    s.apply({"type": "started"}, now=0.0)
    assert s.progress(0.05) == "running" and "running 0" not in render_html(s, 0.05)
    assert s.progress(2.25) == "running 2.2 s"


@pytest.mark.parametrize("background", [False, True])
def test_the_advice_of_a_timeout_is_said_once_in_a_foreground_cell(background: bool) -> None:
    # the status above and the error below repeated the same three sentences: the error (raised
    # only in the foreground) keeps what to do, the status what happened
    message = ("'H100' got no GPU of the simulated pool within --wait 2.5 s; "
               "nothing ran. Wait longer (--wait), add fallback options, or try again later "
               "(%gpu pool shows what is free).")
    s = JobState("H100", "j", background=background)
    s.apply({"type": "queued", "position": 1}, now=0.0)
    s.apply({"type": "done", "state": "expired", "message": message}, now=2.5)
    outcome = s.outcome()
    assert outcome.startswith("'H100' got no GPU of the simulated pool within --wait 2.5 s; "
                              "nothing ran.")
    assert outcome.endswith("Nothing was bound.")
    assert ("Wait longer" in outcome) is background
    assert ("Wait longer" in render_html(s, 3.0)) is background


def test_an_interrupt_that_bound_nothing_does_not_say_what_it_bound() -> None:
    # "bound nothing (what the cell had assigned when it was interrupted)" contradicted itself
    s = JobState("H100", "j")
    s.apply({"type": "started"}, now=0.0)
    s.apply({"type": "interrupted"}, now=1.0)
    s.apply({"type": "done", "state": "cancelled"}, now=1.5)
    # (nothing bound may also be a second interrupt's cancel: no reason is claimed)
    assert "KeyboardInterrupt · nothing was bound; its GPUs are released" in s.outcome()
    s.imported = ["numpy"]  # (an import the cell made before the interrupt is bound too)
    assert "bound numpy (what the cell had assigned when it was interrupted)" in s.outcome()
    s.bound = ["a", "b"]
    assert "bound a, b, numpy (what the cell had assigned when it was interrupted)" in s.outcome()


def test_a_job_no_longer_followed_does_not_say_it_runs() -> None:
    # the gateway went away under a following client: the widget went on saying "running"
    from gpu_magic._view import UNREACHABLE

    s = JobState("H100", "j")
    s.apply({"type": "started"}, now=0.0)
    s.state, s.message = UNREACHABLE, "lost the event stream of job j"
    text = render_text(s, 5.0)
    assert "running" not in text and "no longer followed" in text
    assert "lost the event stream of job j; nothing was bound" in text
