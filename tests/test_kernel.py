"""``%%gpu`` in real Jupyter kernels (nbclient): the magic, its display, the embedded gateway."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import plain

SETUP = """\
import numpy as np
data = np.arange(1_000_000, dtype=np.float32)
factor = 3
def scale(x): return x * factor
class Acc:
    def __init__(self): self.total = 0.0
    def add(self, v): self.total += float(v)
acc = Acc()
"""

GPU_CELL = """\
%%gpu H100:2, A100-80GB
import os
print("granted:", os.environ["GPU_MAGIC_GRANT"])
acc.add(scale(data).sum())          # changes an input in place
half = acc.total / 2
half
"""


def make_notebook(*cells: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path, allow_errors: bool = False) -> nbformat.NotebookNode:
    client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def texts(cell: Any, kind: str) -> str:
    out = []
    for o in cell.outputs:
        if o.output_type == "stream" and kind == o.name:
            out.append(o.text)
        elif o.output_type in ("display_data", "execute_result") and kind == o.output_type:
            out.append(o.data.get("text/plain", ""))
        elif o.output_type == "error" and kind == "error":
            out.append(f"{o.ename}: {o.evalue}\n" + plain("\n".join(o.traceback)))
    return "".join(out)


@pytest.mark.usefixtures("use_gateway")
def test_issue_example_in_a_real_kernel(tmp_path: Path) -> None:
    nb = make_notebook("%load_ext gpu_magic", SETUP, GPU_CELL,
                       "print(acc.total, isinstance(acc, Acc), half, type(acc).__name__)")
    execute(nb, tmp_path)
    cell = nb.cells[2]
    stdout = texts(cell, "stdout")
    grant = json.loads(stdout.split("granted:", 1)[1].strip().splitlines()[0])
    assert grant["type"] == "H100" and grant["count"] == 2 and grant["simulated"] is True
    status = texts(cell, "display_data")
    assert "H100 ×2" in status and "option 1 of 2" in status and "succeeded" in status
    html = [o for o in cell.outputs if o.output_type == "display_data"][0].data["text/html"]
    assert "simulated" in html
    import numpy as np

    total = float((np.arange(1_000_000, dtype=np.float32) * 3).sum())
    assert texts(cell, "execute_result") == repr(total / 2)
    assert texts(nb.cells[3], "stdout").split() == [repr(total), "True", repr(total / 2), "Acc"]


@pytest.mark.usefixtures("use_gateway")
def test_remote_error_shows_cell_line_numbers_in_kernel(tmp_path: Path) -> None:
    nb = make_notebook("%load_ext gpu_magic",
                       "def helper(v):\n    return 1 / v",
                       "def outer(v):\n    return helper(v) + 1",
                       "%%gpu\nx = 0\nhelper(x)",
                       "%%gpu\nx = 0\nouter(x)")
    execute(nb, tmp_path, allow_errors=True)
    err = texts(nb.cells[3], "error")
    assert err.startswith("ZeroDivisionError: division by zero")
    # the cell's own line numbers (the %%gpu line is line 1) and the helper's notebook cell
    assert "Cell In[4], line 3" in err and "helper(x)" in err
    assert "Cell In[2], line 2, in helper" in err and "return 1 / v" in err
    # a function reached only through another one (it travelled as outer's global) too
    err = texts(nb.cells[4], "error")
    assert "Cell In[3], line 2, in outer" in err and "return helper(v) + 1" in err
    assert "Cell In[2], line 2, in helper" in err and "return 1 / v" in err
    assert "simulated" in err


@pytest.mark.usefixtures("use_gateway")
def test_magic_usage_errors_are_clear(tmp_path: Path) -> None:
    nb = make_notebook("%load_ext gpu_magic", "%%gpu H100 --retries\n1", "%gpu frobnicate",
                       "%%gpu H1000\n1")
    execute(nb, tmp_path, allow_errors=True)
    # IPython reports a UsageError on stderr, without a traceback
    assert ("UsageError: --retries needs a whole number of re-runs, e.g. --retries 2; leave it "
            "out for the default") in texts(nb.cells[1], "stderr")
    assert "usage: %gpu pool | jobs" in texts(nb.cells[2], "stderr")
    err = texts(nb.cells[3], "error")
    assert "'H1000' is not a GPU type; did you mean H100?" in err
    assert "_api.py" not in err and "_spec.py" not in err  # the message, not our stack


@pytest.mark.usefixtures("use_gateway")
def test_pool_and_jobs_tables(tmp_path: Path) -> None:
    nb = make_notebook("%load_ext gpu_magic", "%%gpu --quiet\nz = 1", "%gpu pool", "%gpu jobs")
    execute(nb, tmp_path)
    assert texts(nb.cells[1], "display_data") == ""  # --quiet: no status display
    pool = texts(nb.cells[2], "display_data")
    assert "simulated pool" in pool and "H100" in pool and "A100-80GB" in pool
    assert "succeeded" in texts(nb.cells[3], "display_data")


def _embedded_env(tmp_path: Path, simulate: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_MAGIC_")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    env["JUPYTER_DATA_DIR"] = str(tmp_path / "data")
    if simulate:
        env["GPU_MAGIC_SIMULATE"] = simulate
    return env


def test_embedded_gateway_is_started_shared_and_stopped(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("GPU_MAGIC_")]:
        monkeypatch.delenv(k)
    env = _embedded_env(tmp_path, None)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    runtime = tmp_path / "runtime"
    try:
        # no GPU and no simulation: the refusal says how to connect or simulate
        nb = make_notebook("%load_ext gpu_magic", "%%gpu\n1")
        execute(nb, tmp_path, allow_errors=True)
        err = texts(nb.cells[1], "error")
        assert "NoFeasibleOption" in err and "GPU_MAGIC_SIMULATE" in err and "GPU_MAGIC_URL" in err

        monkeypatch.setenv("GPU_MAGIC_SIMULATE", "T4:2")
        nb = make_notebook("%load_ext gpu_magic", "%%gpu T4\nimport os\nos.getpid()")
        execute(nb, tmp_path)
        files = list(runtime.glob("gpu-magic-gateway-*.json"))
        assert len(files) == 1
        assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
        info = json.loads(files[0].read_text())
        assert info["config"] == {"backend": "local", "simulate": "T4:2"}
        assert {"url", "token", "pid", "host", "version"} <= set(info)
        assert info["url"].startswith("http://127.0.0.1:")

        # a second kernel shares the same gateway
        nb2 = make_notebook("%load_ext gpu_magic", "%%gpu\n2")
        execute(nb2, tmp_path)
        assert json.loads(files[0].read_text())["pid"] == info["pid"]

        out = subprocess.run([sys.executable, "-m", "gpu_magic", "stop"], capture_output=True,
                             text=True, check=True).stdout
        assert f"pid {info['pid']}" in out
        assert not files[0].exists()
    finally:
        subprocess.run([sys.executable, "-m", "gpu_magic", "stop"], capture_output=True)


@pytest.mark.usefixtures("use_gateway")
def test_rich_output_magics_and_env_work_remotely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_FOR_CELL", "s3cret")
    nb = make_notebook(
        "%load_ext gpu_magic",
        "%%gpu --env MODE=fast --env SECRET_FOR_CELL\n"
        "import os\n"
        "from IPython.display import display, HTML\n"
        "print('before')\n"
        "display(HTML('<b>bold</b>'))\n"
        "print('after')\n"
        "%timeit -n1 -r1 sum(range(10))\n"
        "os.environ['MODE'], os.environ['SECRET_FOR_CELL']",
        "%%gpu\n"
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3])\n"
        "plt.show()",
    )
    execute(nb, tmp_path)
    outs = nb.cells[1].outputs
    kinds = [(o.output_type, o.get("name") or "") for o in outs]
    # the status display first, then the cell's output in the order it was produced
    html_at = next(i for i, o in enumerate(outs) if "text/html" in o.get("data", {})
                   and "bold" in o.data["text/html"])
    before_at = next(i for i, o in enumerate(outs) if o.output_type == "stream" and "before" in o.text)
    after_at = next(i for i, o in enumerate(outs) if o.output_type == "stream" and "after" in o.text)
    assert before_at < html_at < after_at, kinds
    assert "per loop" in texts(nb.cells[1], "stdout")
    assert texts(nb.cells[1], "execute_result") == "('fast', 's3cret')"
    # the source of the cell never holds the secret's value
    assert "s3cret" not in nb.cells[1].source
    images = [o for o in nb.cells[2].outputs if "image/png" in o.get("data", {})]
    assert images, [o.output_type for o in nb.cells[2].outputs]


def test_connect_takes_the_token_from_the_environment_not_the_notebook(
    gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in [k for k in os.environ if k.startswith("GPU_MAGIC_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("GPU_MAGIC_TOKEN", gateway.token)
    nb = make_notebook("%load_ext gpu_magic", f"%gpu connect {gateway.url}", "%%gpu\n1 + 1",
                       "%gpu status")
    execute(nb, tmp_path)
    assert texts(nb.cells[1], "stdout").startswith(f"connected to {gateway.url}")
    assert texts(nb.cells[2], "execute_result") == "2"
    assert f"gateway {gateway.url} (%gpu connect)" in texts(nb.cells[3], "stdout")
    assert gateway.token not in json.dumps(nb)  # the token never lands in the notebook


@pytest.mark.usefixtures("use_gateway")
def test_a_quick_cell_shows_its_status_once_above_its_output() -> None:
    # a quick cell's status is sent once, in its final form; a cell with output or a slower
    # one shows it first, above that output, and updates it in place at the end
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")

    def run(code: str) -> list[tuple[str, str]]:
        msg_id = kc.execute(code)
        seen = []
        while True:
            m = kc.get_iopub_msg(timeout=60)
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = m["msg_type"], m["content"]
            if kind == "status" and content["execution_state"] == "idle":
                return seen
            if kind in ("display_data", "update_display_data"):
                seen.append((kind, content["data"]["text/plain"].splitlines()[0]))
            elif kind in ("stream", "error"):
                seen.append((kind, content.get("text", content.get("ename", ""))))

    try:
        assert run("%load_ext gpu_magic") == []
        printing = run("%%gpu H100\nprint('hi')\nx = 1")
        assert [k for k, _ in printing] == ["display_data", "stream", "update_display_data"]
        assert printing[1][1] == "hi\n" and printing[2][1].startswith("[gpu] succeeded")
        assert run("%%gpu H100 --quiet\ny = 2") == []  # --quiet: no status at all
        silent = run("%%gpu H100\ny = 2")  # ... and only for its own cell
        assert [k for k, _ in silent] == ["display_data"], silent
        assert silent[0][1].startswith("[gpu] succeeded")
        failing = run("%%gpu H100\n1 / 0")
        assert [k for k, _ in failing] == ["display_data", "error"], failing
        assert failing[0][1].startswith("[gpu] failed")
        slow = run("%%gpu H100\nimport time\ntime.sleep(0.5)\nz = 3")
        assert [k for k, _ in slow][:1] == ["display_data"], slow
        assert "running" in slow[0][1] or "granted" in slow[0][1], slow
        assert slow[-1][0] == "update_display_data" and "succeeded" in slow[-1][1], slow
        # attached after its end, a job showed "[gpu] running 2.8 s" while its output replayed
        run("import gpu_magic\nj = gpu_magic.run('import time\\ntime.sleep(1)\\n"
            "print(\"before\")', background=True, quiet=True)\nj.wait()")
        attached = run("%gpu attach {j.id}")
        assert [k for k, _ in attached][:2] == ["display_data", "stream"], attached
        assert attached[0][1].startswith("[gpu] succeeded"), attached
        assert not any("running" in text for k, text in attached if "display" in k), attached
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.usefixtures("use_gateway")
@pytest.mark.parametrize("cell, expected", [
    # a quick, silent cell: its final status alone
    ("x = 6 * 7", ["[gpu] succeeded"]),
    # output: the status first, above it, then once more when the job ends
    ("x = 6 * 7\nprint('x is', x)", ["[gpu] running", "x is 42", "[gpu] succeeded"]),
])
def test_terminal_ipython_prints_each_status_once(tmp_path: Path, cell: str,
                                                  expected: list[str]) -> None:
    # without widgets (terminal IPython) every update is printed anew: none may repeat another
    script = tmp_path / "cell.ipy"
    script.write_text(f"%%gpu H100\n{cell}\n")
    out = subprocess.run([sys.executable, "-m", "IPython", "--ext=gpu_magic", "--no-banner",
                          "--colors=NoColor", str(script)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    heads = [line for line in out.stdout.splitlines() if not line.startswith("      ")]
    assert [h for h in heads if h.strip()] == [
        next(h for h in heads if h.startswith(e)) for e in expected], out.stdout
    assert heads[-1].startswith("[gpu] succeeded") and "bound x" in out.stdout


@pytest.mark.usefixtures("use_gateway")
def test_widgets_from_the_gpu_show_as_text_and_tqdm_notebook_draws_a_text_bar(
        tmp_path: Path) -> None:
    # A widget made on the GPU machine cannot reach the notebook (it talks through its
    # kernel's comms): its view would show "model not found". tqdm.notebook is the common case.
    nb = make_notebook("%load_ext gpu_magic",
                       "%%gpu\nfrom tqdm.notebook import tqdm, trange\n"
                       "total = sum(1 for _ in tqdm(range(3))) + sum(1 for _ in trange(2))",
                       "%%gpu\nimport ipywidgets\ndisplay(ipywidgets.IntSlider(value=7))\n"
                       "display(ipywidgets.IntSlider(value=8))",
                       "total")
    execute(nb, tmp_path)
    bars = texts(nb.cells[1], "stderr")
    assert "3/3" in bars and "2/2" in bars
    views = [o for c in nb.cells for o in c.outputs
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
             and "IntSlider" in o.get("data", {}).get("text/plain", "")]
    assert views == []
    shown = texts(nb.cells[2], "display_data")
    assert "IntSlider(value=7" in shown and "IntSlider(value=8" in shown
    assert texts(nb.cells[2], "stderr").count("cannot be shown from the GPU machine") == 1
    assert texts(nb.cells[3], "execute_result") == "5"


@pytest.mark.usefixtures("use_gateway")
def test_a_cell_can_use_the_values_of_earlier_cells(tmp_path: Path) -> None:
    # _, __ and _N are the notebook's values of earlier cells, as in a local cell
    nb = make_notebook("%load_ext gpu_magic", "20", "21",
                       "%%gpu\n(_ + 1, __, _2 * 2, _3)")
    execute(nb, tmp_path)
    assert texts(nb.cells[3], "execute_result") == "(22, 20, 40, 21)"


@pytest.mark.usefixtures("use_gateway")
def test_a_cell_reads_the_notebooks_inputs_as_a_local_cell_does(tmp_path: Path) -> None:
    # In, _i and _iN: In[-1] was silently '' and _i undefined (found by a newcomer)
    nb = make_notebook("%load_ext gpu_magic", "a = 20",
                       "%%gpu\nb = a + 1\nseen = (In[2], _i, _i2, len(In), In[-1][:28])\n%who")
    execute(nb, tmp_path)
    assert texts(nb.cells[2], "stdout").split() == ["a", "b", "seen"]  # not In nor Out
    nb.cells.append(nbformat.v4.new_code_cell("seen"))
    execute(nb, tmp_path)
    assert texts(nb.cells[3], "execute_result") == (
        "('a = 20', 'a = 20', 'a = 20', 4, 'get_ipython().run_cell_magic')")


@pytest.mark.usefixtures("use_gateway")
def test_remote_tracebacks_name_the_right_function_of_two_with_one_name(tmp_path: Path) -> None:
    nb = make_notebook("%load_ext gpu_magic",
                       "class B:\n    def forward(self):\n        return 'b fine'",
                       "class A:\n    def forward(self):\n        return 1 / 0\n"
                       "def go():\n    return A().forward()",
                       "%%gpu\ngo()",
                       "%%gpu\nexit()")
    execute(nb, tmp_path, allow_errors=True)
    err = texts(nb.cells[3], "error")
    assert "Cell In[3], line 3, in forward" in err and "return 1 / 0" in err
    assert "b fine" not in err
    # with the lines around it, in IPython's columns (its def line, not what follows it)
    # indented as written, and the frame's parameters, as IPython shows a local frame
    assert "in forward(self)\n      2     def forward(self):\n----> 3         return 1 / 0\n\n" \
        in err, err
    assert "----> 2 go()" in err  # (line 2 of the notebook cell, under %%gpu)
    # exit() goes through IPython and the runner: only the cell's own frame is shown
    err = texts(nb.cells[4], "error")
    assert "exit() ends this cell" in err and "autocall" not in err and "runner.py" not in err


@pytest.mark.usefixtures("use_gateway")
def test_a_remote_syntax_error_or_exception_group_shows_the_cell_s_frames(
        tmp_path: Path) -> None:
    # a trial: IPython shows these two its own way, never asking the exception how: the
    # cell's error read as frames of gpu_magic's own code
    nb = make_notebook("%load_ext gpu_magic",
                       "%%gpu\nx = 1\neval('1 +')",
                       "%%gpu\nraise ExceptionGroup('eg', [ValueError(1), TypeError(2)])",
                       "eval('1 +')",
                       "x = (1,",
                       "try:\n    get_ipython().run_cell_magic('gpu', '', \"eval('1 +')\")\n"
                       "except SyntaxError as e:\n    caught = type(e).__name__\ncaught")
    execute(nb, tmp_path, allow_errors=True)
    for cell, line in ((nb.cells[1], "----> 3 eval('1 +')"),
                       (nb.cells[2], "----> 2 raise ExceptionGroup")):
        err = texts(cell, "error")
        assert line in err, err
        assert "_api.py" not in err and "run_cell_magic" not in err, err
        assert cell.outputs[-1]["ename"] in ("SyntaxError", "ExceptionGroup"), cell.outputs
    # a local one is shown as IPython shows it, and a remote one is still a SyntaxError
    local = texts(nb.cells[3], "error")
    assert "SyntaxError" in local and "gpu_magic" not in local, local
    # a typo IPython finds parsing a cell: its line and a caret, none of IPython's own frames
    typo = texts(nb.cells[4], "error")
    assert typo.startswith("SyntaxError") and "x = (1," in typo, typo
    assert "interactiveshell" not in typo and "compilerop" not in typo, typo
    assert "'SyntaxError'" in texts(nb.cells[5], "execute_result")


@pytest.mark.usefixtures("use_gateway")
def test_a_remote_traceback_follows_the_notebook_s_xmode(tmp_path: Path) -> None:
    # a trial: %xmode Minimal or Plain changed every local traceback, never a %%gpu cell's
    cell = "%%gpu\nx = 1\ny = 2\n1 / 0\nz = 3"
    nb = make_notebook("%load_ext gpu_magic", "%xmode Minimal", cell, "%xmode Plain", cell,
                       "%xmode Context", cell)
    execute(nb, tmp_path, allow_errors=True)
    minimal, plain, context = (texts(nb.cells[i], "error") for i in (2, 4, 6))
    assert minimal.splitlines()[1:] == ["ZeroDivisionError: division by zero"], minimal
    assert "----> 4 1 / 0" in plain and "y = 2" not in plain, plain
    assert "----> 4 1 / 0" in context and "y = 2" in context, context


@pytest.mark.usefixtures("use_gateway")
def test_the_ipython_shell_travels_as_each_side_s_own(tmp_path: Path) -> None:
    # a trial: `ip = get_ipython()` in a %%gpu cell took 0.6 s trying to copy the shell and
    # came back unbound, with a note about its locks; as an input it could not be sent
    nb = make_notebook("%load_ext gpu_magic",
                       "%%gpu\nip = get_ipython()\nthere = type(ip).__name__",
                       "ip is get_ipython(), there",
                       "mine = get_ipython()",
                       "%%gpu\nseen = mine is get_ipython()",
                       "seen")
    execute(nb, tmp_path)
    assert texts(nb.cells[2], "execute_result").startswith("(True, "), nb.cells[2].outputs
    assert "was not brought back" not in texts(nb.cells[1], "stderr")
    assert texts(nb.cells[5], "execute_result") == "True"


@pytest.mark.usefixtures("use_gateway")
def test_notebook_code_keeps_its_source_both_ways(tmp_path: Path) -> None:
    # cloudpickle sends code as "<dynamic-code>": inspect.getsource of a notebook function
    # failed on the GPU machine (and with it torch.jit.script, triton.jit), and a function made
    # in a %%gpu cell came back without its source
    nb = make_notebook("%load_ext gpu_magic",
                       "def scale(v):\n    # doubles it\n    return v * 2",
                       "%%gpu\nimport inspect\nsrc = inspect.getsource(scale)\n"
                       "def made(x):\n    return x + 1",
                       "import inspect\nprint(src, end='')\nprint(inspect.getsource(made), end='')")
    execute(nb, tmp_path)
    assert texts(nb.cells[3], "stdout") == ("def scale(v):\n    # doubles it\n    return v * 2\n"
                                            "def made(x):\n    return x + 1\n")


@pytest.mark.usefixtures("use_gateway")
def test_a_function_made_in_an_earlier_gpu_cell_is_named_by_that_cell(tmp_path: Path) -> None:
    # called from a later %%gpu cell its frame was taken for the running cell's ("Cell In[6],
    # line 5" of a three-line cell, with that cell's lines); called here it read
    # "<ipython-input-1-…>:4", numbered from the line after %%gpu
    nb = make_notebook("%load_ext gpu_magic",
                       "%%gpu H100\n# made here\ndef helper(v):\n    w = v + 1\n    return w / 0",
                       "%%gpu H100\nhelper(3)",
                       "helper(3)")
    execute(nb, tmp_path, allow_errors=True)
    remote = texts(nb.cells[2], "error")
    local = re.sub(r"\x1b\[[0-9;]*m", "", texts(nb.cells[3], "error"))  # (IPython's colours)
    assert "Cell In[3], line 2\n----> 2 helper(3)" in remote, remote
    assert ("Cell In[2] on the GPU, line 5, in helper(v)\n      3 def helper(v):\n"
            "      4     w = v + 1\n----> 5     return w / 0") in remote, remote
    assert "File <Cell In[2] on the GPU, job " in local and ":5, in helper" in local, local
    assert "return w / 0" in local


@pytest.mark.usefixtures("use_gateway")
def test_a_notebook_s_logging_setup_shows_none_of_our_requests(tmp_path: Path) -> None:
    # logging.basicConfig(level=INFO) showed httpx's "HTTP Request: GET http://…/v1/health"
    # for each of our requests (at DEBUG, httpcore's lines too); the notebook's own still log
    nb = make_notebook("%load_ext gpu_magic\nimport logging\n"
                       "logging.basicConfig(level=logging.DEBUG, force=True)",
                       "%%gpu H100\nx = 1",
                       "import httpx\nfrom gpu_magic._client import _OUR_URLS\n"
                       "url = sorted(_OUR_URLS)[0] + 'v1/health'\n"
                       "httpx.get(url.replace('127.0.0.1', 'localhost'))")
    execute(nb, tmp_path)
    said = texts(nb.cells[1], "stderr")
    assert "httpx" not in said and "httpcore" not in said and "HTTP Request" not in said, said
    assert "HTTP Request: GET http://localhost" in texts(nb.cells[2], "stderr")


@pytest.mark.usefixtures("use_gateway")
def test_a_figure_made_on_the_gpu_shows_as_an_image_before_any_local_plot(
        tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    nb = make_notebook("%load_ext gpu_magic\nimport matplotlib.pyplot as plt",
                       "%%gpu H100\nfig, ax = plt.subplots()\nax.plot([1, 2])\nplt.close(fig)\nfig",
                       "fig")
    execute(nb, tmp_path)
    for cell in nb.cells[1:]:
        values = [o for o in cell.outputs if o.output_type == "execute_result"]
        assert values and "image/png" in values[0].data, cell.outputs
