"""Warm runners: a zygote forks each job, and a finished runner takes the next cell of the same
key. A reused runner must behave exactly like a fresh one: clean namespace, environment, folder,
sys.path and random seeds, and local modules edited since their import are re-imported."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gpu_magic
from gpu_magic._client import GatewayClient

from .conftest import Gateway, start_gateway, wait_for

CELLS = [
    "import os, sys, random\nos.environ['LEAK'] = 'x'\nos.chdir('/')\nsys.path.append('/nowhere')\n"
    "random.seed(0)\nsecret = 41\nstate = (os.environ.get('LEAK'), os.getcwd() == '/')\nstate",
    "import os, sys, random\n"
    "seen = (os.environ.get('LEAK'), 'secret' in globals(), '/nowhere' in sys.path,\n"
    "        random.random() == random.Random(0).random(), os.getcwd() == '/')\nseen",
    "x = 1 + 1\nx",
]


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("warm"), "--keep-warm", "60")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("cold"), "--cold")
    yield gw
    gw.stop()


def _values(gw: Gateway, cells: list[str], spec: str = "H100") -> list[Any]:
    with gw.client() as c:
        return [gpu_magic.run(cell, spec, {"__name__": "__main__"}, client=c, quiet=True)
                for cell in cells]


def test_warm_and_cold_runs_give_the_same_results(warm: Gateway, cold: Gateway) -> None:
    got_warm, got_cold = _values(warm, CELLS), _values(cold, CELLS)
    assert got_warm == got_cold
    assert got_warm[1] == (None, False, False, False, False)  # nothing leaked into cell 2



def test_a_warm_runner_takes_cells_of_its_own_kernel_only(tmp_path: Path) -> None:
    # an ML trial: two notebooks in one folder shared a warm runner, so one's
    # `warnings.simplefilter('ignore')` (its loggers, its module settings) silenced the
    # other's cells; two local kernels are two processes
    import subprocess

    gw = start_gateway(tmp_path, "--keep-warm", "60", simulate="T4:1")
    try:
        with gw.client() as c:
            mine = gpu_magic.run("import os\nos.getpid()", "T4", {"__name__": "__main__"},
                                 client=c, quiet=True)
            other = subprocess.run(
                [sys.executable, "-c",
                 "import sys, gpu_magic\nfrom gpu_magic._client import GatewayClient\n"
                 "with GatewayClient(sys.argv[1], sys.argv[2]) as c:\n"
                 "    print(gpu_magic.run('import os, warnings\\n"
                 "warnings.simplefilter(\"ignore\")\\nos.getpid()', 'T4', "
                 "{'__name__': '__main__'}, client=c, quiet=True))",
                 gw.url, gw.token], capture_output=True, text=True, timeout=120)
            assert other.returncode == 0, other.stderr
            assert int(other.stdout) != mine  # not this kernel's runner
            pid, ignored = gpu_magic.run(
                "import os, warnings\n"
                "os.getpid(), any(f[0] == 'ignore' and f[1] is None and f[2] is Warning\n"
                "                 for f in warnings.filters)", "T4", {"__name__": "__main__"},
                client=c, quiet=True)
            assert not ignored and pid != int(other.stdout)
            # and this kernel's next cell takes its own runner again
            again = gpu_magic.run("import os\nos.getpid()", "T4", {"__name__": "__main__"},
                                  client=c, quiet=True)
            assert again == pid
    finally:
        gw.stop()


SHELL_CELLS = [
    # what a cell may change in the shell and in packages' settings ...
    "import numpy as np, torch, matplotlib as mpl, matplotlib.pyplot as plt\n"
    "from IPython.core.magic import register_line_magic\n"
    "%precision 1\n%config InlineBackend.figure_format = 'jpeg'\n%alias hello echo hello\n"
    "ip = get_ipython()\n"
    "ip.display_formatter.formatters['text/plain'].for_type(int, lambda o, p, c: p.text('INT'))\n"
    "def hook(*a):\n    print('HOOK')\n"
    "ip.events.register('post_run_cell', hook)\n"
    "@register_line_magic\ndef mine(line):\n    return 'M'\n"
    "np.set_printoptions(precision=2)\nnp.seterr(all='raise')\n"
    "torch.set_grad_enabled(False)\ntorch.set_default_dtype(torch.float64)\n"
    "torch.autograd.set_detect_anomaly(True)\n"
    "mpl.rcParams['figure.figsize'] = (3, 2)\nplt.plot([1, 2])\ndel ip",
    # ... the next cell, maybe another notebook's, must not see
    "import numpy as np, torch, matplotlib as mpl, matplotlib.pyplot as plt\n"
    "from matplotlib_inline.config import InlineBackend\n"
    "ip = get_ipython()\nplain = ip.display_formatter.formatters['text/plain']\n"
    "seen = dict(precision=plain.float_precision, int_printer=int in plain.type_printers,\n"
    "    hooks=[c.__name__ for c in ip.events.callbacks['post_run_cell']],\n"
    "    flush=[c.__name__ for c in ip.events.callbacks['post_execute']],\n"
    "    alias='hello' in ip.magics_manager.magics['line'],\n"
    "    magic='mine' in ip.magics_manager.magics['line'],\n"
    "    np=(np.get_printoptions()['precision'], np.geterr()['divide']),\n"
    "    torch=(torch.is_grad_enabled(), str(torch.get_default_dtype()),\n"
    "           torch.is_anomaly_enabled()),\n"
    "    figsize=list(mpl.rcParams['figure.figsize']),\n"
    "    formats=sorted(InlineBackend.instance().figure_formats))\n"
    "plt.plot([1, 2])\ndel ip, plain\nseen",
]


def test_shell_and_package_settings_a_cell_changed_do_not_reach_the_next_cell(
        warm: Gateway, cold: Gateway) -> None:
    # seen leaking on warm runners, into other notebooks' cells too: a hook that printed,
    # %precision, a formatter for int, JPEG figures, torch without gradients
    got_warm, got_cold = _values(warm, SHELL_CELLS), _values(cold, SHELL_CELLS)
    assert got_warm[1] == got_cold[1]
    assert got_warm[1]["precision"] == "" and got_warm[1]["hooks"] == []
    assert got_warm[1]["torch"] == (True, "torch.float32", False)
    assert got_warm[1]["formats"] == ["png"]
    assert "flush_figures" in got_warm[1]["flush"]  # later cells' figures still show


def test_ipython_s_own_magics_work_in_every_cell_of_a_reused_runner(warm: Gateway) -> None:
    # IPython loads its magics on first use; putting the shell back must not undo that
    # (a review found %time, %env, %%writefile... failing from a runner's second cell on)
    cell = ("%time s = sum(range(10))\n%env GPU_MAGIC_T=1\n%load_ext autoreload\n"
            "import os\npid = os.getpid()\n"
            "n = len(get_ipython().events.callbacks['pre_run_cell'])")
    got = []
    with warm.client() as c:
        for _ in range(3):
            ns: dict[str, Any] = {"__name__": "__main__"}
            gpu_magic.run(cell, "H100", ns, client=c, quiet=True)
            got.append((ns["s"], ns["pid"], ns["n"]))
    assert got[0][0] == got[1][0] == got[2][0] == 45
    assert got[0][1] == got[1][1] == got[2][1]  # one warm runner for the three
    assert got[0][2] == got[1][2] == got[2][2]  # an extension's hooks do not pile up


def test_a_style_module_beside_the_notebook_applies_in_every_cell(warm: Gateway,
                                                                   tmp_path: Path) -> None:
    # what a module of the user's sets when imported must hold in every cell that imports
    # it, as on a fresh runner (the reset of packages' settings undid it from the 2nd on)
    (tmp_path / "mystyle_gm.py").write_text(
        "import numpy as np\nnp.set_printoptions(precision=3)\n")
    got = []
    with warm.client() as c:
        for _ in range(3):
            ns: dict[str, Any] = {"__name__": "__main__"}
            gpu_magic.run(f"import os, sys\nos.chdir({str(tmp_path)!r})\n"
                          f"sys.path.insert(0, {str(tmp_path)!r})\n"
                          "import mystyle_gm, numpy as np\nshown = repr(np.array([1 / 3]))",
                          "H100", ns, client=c, quiet=True, return_names=["shown"])
            got.append(ns["shown"])
    assert got == ["array([0.333])"] * 3

C_ENV_CELLS = [
    # behind os.environ's back: the C library's environment alone changes
    "import os\nos.putenv('C_LEAK', 'x')\nos.putenv('HOME', '/nowhere')\nos.unsetenv('PATH')\n"
    "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo ${C_LEAK:-unset} $HOME'],\n"
    "               capture_output=True, text=True).stdout.split()",
    "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo ${C_LEAK:-unset} $HOME $PATH'],\n"
    "               capture_output=True, text=True).stdout.split()",
]


def test_a_cell_that_changed_the_c_environment_leaves_the_next_one_clean(
        warm: Gateway, cold: Gateway) -> None:
    got_warm, got_cold = _values(warm, C_ENV_CELLS), _values(cold, C_ENV_CELLS)
    assert got_warm[0] == ["x", "/nowhere"]  # the change was real within its own cell
    assert got_warm == got_cold
    assert got_warm[1][0] == "unset" and got_warm[1][1] != "/nowhere" and got_warm[1][2]


SETTINGS_CELLS = [
    # process-wide settings a cell may change: a fresh runner starts without them
    "import logging, signal, warnings\nlogging.captureWarnings(True)\n"
    "logging.basicConfig(level=logging.INFO)\nlogging.disable(logging.CRITICAL)\n"
    "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
    "signal.setitimer(signal.ITIMER_REAL, 30)  # an alarm that would go off later\n"
    "len(logging.getLogger().handlers) > 0",
    "import logging, signal, warnings\n"
    "(warnings.showwarning.__module__, len(logging.getLogger().handlers),\n"
    " logging.getLogger().level, logging.root.manager.disable,\n"
    " signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL,\n"
    " sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])), signal.getitimer(signal.ITIMER_REAL)[0])",
    # a package's own warning filters, added when it is imported, stay with it
    "import warnings\nimport numpy as np\nwith warnings.catch_warnings(record=True) as w:\n"
    "    for _ in range(3):\n        np.polyfit([1, 1, 1], [1, 2, 3], 2)\nlen(w)",
    "import warnings\nimport numpy as np\nwith warnings.catch_warnings(record=True) as w:\n"
    "    for _ in range(3):\n        np.polyfit([1, 1, 1], [1, 2, 3], 2)\nlen(w)",
]


def test_a_cell_that_changed_process_settings_leaves_the_next_one_clean(
        warm: Gateway, cold: Gateway) -> None:
    with warm.client() as c:
        ns: dict[str, Any] = {"__name__": "__main__"}
        first_pid = gpu_magic.run("import os\nos.getpid()", "H100", ns, client=c, quiet=True)
        got_warm = [gpu_magic.run(cell, "H100", {"__name__": "__main__"}, client=c, quiet=True)
                    for cell in SETTINGS_CELLS]
        assert _pid(c, "H100") == first_pid  # all of it on one reused runner
    got_cold = _values(cold, SETTINGS_CELLS)
    assert got_warm[0] is True
    assert got_warm == got_cold
    # (warnings are shown by the runner's own function, which names the cell's lines)
    assert got_warm[1][0] != "logging"
    assert got_warm[1][1:] == (0, logging.WARNING, 0, True, [], 0.0)
    assert got_warm[2] == got_warm[3] == 3  # numpy's 'always' filter for RankWarning holds


INTERPRETER_CELLS = [
    # the interpreter's own settings: a fresh runner starts with none of these
    "import builtins, io, os, resource, sys, torch\n"
    "sys.stdout = io.StringIO()\nsys.excepthook = None\nbuiltins.print = lambda *a, **k: None\n"
    "builtins.leaked = 1\nsys.setrecursionlimit(54321)\nos.umask(0o000)\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
    "torch.manual_seed(0)\nTrue",
    "import builtins, os, resource, sys, torch\nprint('still printed')\n"
    "first = torch.rand(1).item()\ntorch.manual_seed(0)\n"
    "mask = os.umask(0o022)\nos.umask(mask)\n"
    "(hasattr(builtins, 'leaked'), sys.getrecursionlimit(), mask,\n"
    " sys.excepthook is not None, resource.getrlimit(resource.RLIMIT_NOFILE),\n"
    " first == torch.rand(1).item())",
]


def test_a_cell_that_changed_interpreter_settings_leaves_the_next_one_clean(
        warm: Gateway, cold: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    with warm.client() as c:
        first_pid = _pid(c, "H100")
        capsys.readouterr()
        got_warm = [gpu_magic.run(cell, "H100", {"__name__": "__main__"}, client=c, quiet=True)
                    for cell in INTERPRETER_CELLS]
        assert capsys.readouterr().out == "still printed\n"
        assert _pid(c, "H100") == first_pid  # all of it on one reused runner
    got_cold = _values(cold, INTERPRETER_CELLS)
    assert got_warm == got_cold
    leaked, limit, _mask, has_hook, files, seeded = got_warm[1]
    assert not leaked and limit != 54321 and has_hook and not seeded
    assert files[0] != 64  # the soft limit back to what it was


def test_a_thread_a_cell_left_running_ends_with_its_runner(
        warm: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    # a fresh runner ends a cell's threads with the cell; a reused one must not let them
    # print into the next cell
    with warm.client() as c:
        first = gpu_magic.run(
            "import os, threading, time\n"
            "threading.Thread(target=lambda: (time.sleep(1.0), print('late'))).start()\n"
            "os.getpid()", "H100", {"__name__": "__main__"}, client=c, quiet=True)
        capsys.readouterr()
        second = gpu_magic.run("import os, time\ntime.sleep(1.5)\nos.getpid()", "H100",
                               {"__name__": "__main__"}, client=c, quiet=True)
        assert "late" not in capsys.readouterr().out
        assert second != first
        # a daemon thread (a progress bar's monitor) and a thread pool's idle workers do not
        # cost the runner its reuse
        third = gpu_magic.run(
            "import asyncio, concurrent.futures, os, threading, time\n"
            "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
            "await asyncio.to_thread(abs, -1)\n"
            "concurrent.futures.ThreadPoolExecutor(2).submit(abs, -1).result()\nos.getpid()",
            "H100", {"__name__": "__main__"}, client=c, quiet=True)
        assert _pid(c, "H100") == third


HELD = (
    "import os\n"
    "class Held:\n"
    "    def __init__(self):\n"
    "        self.pid = os.getpid()\n"
    "    def __del__(self):\n"
    "        if __import__('os').getpid() == self.pid:  # the runner's, not a copy sent back\n"
    "            print('finalized')\n"
    "            __import__('os').write(2, b'finalized at the fd\\n')\n"
    "            with open(MARK, 'w') as f:\n"
    "                f.write('released')\n"
    "held = Held()\n")


@pytest.mark.parametrize("tail", [
    "",  # a name the cell assigned
    "held",  # the value of its last expression
    "held.me = held",  # a cycle of its own
    "def keep():\n    return held",  # a function: it ties the namespace into a cycle
    "raise ValueError('after')",  # an error: its frames hold what the cell made
    "import typing\nhint = typing.Optional[Held]",  # typing's cache holds the class
    # pyplot keeps figures no backend showed
    "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
    "plt.figure().held = held",
], ids=["name", "value", "cycle", "function", "error", "typing", "pyplot"])
def test_what_a_cell_made_is_released_when_it_ends(
        warm: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str], tail: str) -> None:
    # A cell's arrays and tensors (GPU memory too) must be free once it ends, as a fresh
    # runner's are: kept until the next cell, a cell run twice needed its memory twice.
    mark = tmp_path / "released"
    with warm.client() as c:
        before = _pid(c, "H100")
        try:
            gpu_magic.run(HELD + tail, "H100", {"__name__": "__main__", "MARK": str(mark)},
                          client=c, quiet=True, return_names=[])
        except ValueError:
            assert "raise" in tail
        assert mark.exists()  # as the cell ended, not at some later collection
        assert _pid(c, "H100") == before  # and the runner stays warm
    # a fresh runner ends without running finalizers: what they print is not the cell's
    assert "finalized" not in "".join(capsys.readouterr())


def test_a_finalizer_that_blocks_costs_the_runner_its_reuse_not_the_cell(warm: Gateway) -> None:
    with warm.client() as c:
        start = time.monotonic()
        first = gpu_magic.run(
            "import os, time\nclass Stuck:\n    def __del__(self):\n        while True:\n"
            "            try:\n                time.sleep(300)\n"
            "            except Exception:  # retries whatever goes wrong\n                pass\n"
            "stuck = Stuck()\nos.getpid()", "H100", {"__name__": "__main__"}, client=c,
            quiet=True, return_names=[])
        assert time.monotonic() - start < 120  # interrupted after RELEASE_S, not hung
        assert _pid(c, "H100") != first  # what it left behind is unknown: a fresh runner


def test_a_dataloader_iterator_left_in_the_namespace_lets_the_runner_be_reused(
        warm: Gateway) -> None:
    # the namespace died whole in a collection, which closed the queues to the iterator's
    # workers before its finalizer asked them to stop: it waited 5 s per worker, past the
    # release's limit, and the runner was not reused (10 s a cell, as `it = iter(dl)` does)
    pytest.importorskip("torch")
    with warm.client() as c:
        ns: dict[str, Any] = {"__name__": "__main__"}
        gpu_magic.run("import torch\nX = torch.randn(64, 3)\nY = torch.randn(64)", "H100", ns,
                      client=c, quiet=True)
        for persistent in (False, True):  # (with persistent workers the loader holds it)
            first = gpu_magic.run(
                "import os\nfrom torch.utils.data import DataLoader, TensorDataset\n"
                "dl = DataLoader(TensorDataset(X, Y), batch_size=4, num_workers=2, "
                f"persistent_workers={persistent})\n"
                "it = iter(dl)\nfirst_batch = next(it)\nos.getpid()", "H100", ns, client=c,
                quiet=True, return_names=[])
            assert _pid(c, "H100") == first, persistent


def test_a_dataloader_of_the_notebook_iterated_in_cells_lets_the_runner_be_reused(
        warm: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    # a trial: a loader made in the notebook with persistent workers, iterated in %%gpu
    # cells, cost every second cell 10 s and the runner its reuse. The pickler that tried to
    # send it back (its iterator does not pickle) lived in a cycle until the collection, and
    # held the cell's inputs: the loader died there, its workers' queues closed first
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    ns: dict[str, Any] = {"__name__": "__main__", "loader": DataLoader(
        TensorDataset(torch.randn(64, 3), torch.randn(64)), batch_size=8, num_workers=2,
        persistent_workers=True)}
    cell = "import os\nn = 0\nfor xb, yb in loader:\n    n += 1\nos.getpid()"
    with warm.client() as c:
        pids = []
        for _ in range(3):
            pids.append(gpu_magic.run(cell, "H100", ns, client=c, quiet=True))
            assert ns["n"] == 8
        assert _pid(c, "H100") == pids[0] == pids[1] == pids[2], pids
    # (its iterator does not travel back) the note's advice keeps the notebook's loader:
    # `del loader`, which it gave, deleted it here too
    note = capsys.readouterr().err
    assert "loader was not brought back: loader._iterator._sampler_iter (a generator) cannot " \
        "be sent back, so what the cell changed in it stayed on the GPU machine; list what " \
        "to bring back with --return, without loader, to leave it there without this note" \
        in note, note
    assert "del loader" not in note


def test_a_cell_s_finalizer_still_finds_the_globals_made_after_its_object(
        warm: Gateway, tmp_path: Path) -> None:
    # objects with finalizers that the namespace alone held were let go of newest first:
    # one made later, a finalizer of its own, was gone before the earlier one's ran
    mark = tmp_path / "seen"
    cell = ("class Helper:\n    def __del__(self):\n        pass\n"
            "class Logger:\n    def __del__(self):\n"
            "        open(MARK, 'w').write(str('helper' in globals()))\n"
            "lg = Logger()\nhelper = Helper()\nimport os\nos.getpid()")
    with warm.client() as c:
        first = gpu_magic.run(cell, "H100", {"__name__": "__main__", "MARK": str(mark)},
                              client=c, quiet=True, return_names=[])
        assert mark.read_text() == "True"
        assert _pid(c, "H100") == first


def test_an_object_whose_type_answers_oddly_leaves_the_runner_reusable(warm: Gateway) -> None:
    cell = ("class Odd(type):\n    def __getattr__(cls, name):\n        raise RuntimeError(name)\n"
            "class Weird(metaclass=Odd):\n    pass\nw = Weird()\nimport os\nos.getpid()")
    with warm.client() as c:
        first = gpu_magic.run(cell, "H100", {"__name__": "__main__"}, client=c, quiet=True,
                              return_names=[])
        assert _pid(c, "H100") == first


def test_a_cell_after_matplotlib_use_leaves_later_figures_inline(warm: Gateway) -> None:
    with warm.client() as c:
        gpu_magic.run("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot",
                      "H100", {"__name__": "__main__"}, client=c, quiet=True, return_names=[])
        backend = gpu_magic.run("import matplotlib\nmatplotlib.get_backend()", "H100",
                                {"__name__": "__main__"}, client=c, quiet=True)
    assert backend == "module://matplotlib_inline.backend_inline"


def test_garbage_an_edited_module_leaves_is_collected_while_the_runner_waits(
        warm: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What survives a cell is frozen out of later collections (they stay cheap); what of it
    # becomes garbage later, like the old copy of an edited module, must still be freed.
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    mark = tmp_path / "released"
    mod = tmp_path / "holder_for_warm.py"
    mod.write_text(textwrap.dedent(f"""
        import os
        class Held:
            def __del__(self):
                try:
                    if os.getpid() != {os.getpid()}:  # the runner's copy, not one imported here
                        with open({str(mark)!r}, "w") as f:
                            f.write("released")
                except Exception:  # this process's copy, at its exit
                    pass
        held = Held()
        def keep():  # the module's functions tie its namespace into a cycle
            return held
    """))
    cell = "import holder_for_warm, os\nos.getpid()"
    with warm.client() as c:
        first = gpu_magic.run(cell, "H100", {"__name__": "__main__"}, client=c, quiet=True)
        mod.write_text(mod.read_text().replace("held = Held()", "held = None"))
        os.utime(mod, (time.time() + 5, time.time() + 5))  # a new mtime even within one tick
        assert gpu_magic.run(cell, "H100", {"__name__": "__main__"}, client=c,
                             quiet=True) == first
        deadline = time.monotonic() + 30
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mark.exists()


def test_a_cell_s_own_gc_collect_frees_what_earlier_cells_left(
        warm: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what survives a cell is frozen (later collections stay cheap); a cell's own
    # gc.collect() must still free it once it is garbage, as in a fresh process
    # (a module outside the notebook's folder: the user's own modules beside it are
    # imported afresh by each cell, installed ones stay, as this one does)
    (tmp_path / "nb").mkdir()
    (tmp_path / "lib").mkdir()
    monkeypatch.chdir(tmp_path / "nb")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    (tmp_path / "lib" / "cycle_holder_for_warm.py").write_text(textwrap.dedent("""
        import weakref
        class Node:
            def __init__(self):
                self.me = self  # a cycle: only the collector frees it
        keep = ref = None
        def load():
            global keep, ref
            keep = Node()
            ref = weakref.ref(keep)
    """))
    with warm.client() as c:
        pid = _pid(c, "H100")
        gpu_magic.run("import cycle_holder_for_warm as h\nh.load()", "H100",
                      {"__name__": "__main__"}, client=c, quiet=True, return_names=[])
        freed = gpu_magic.run("import gc, cycle_holder_for_warm as h\nh.keep = None\n"
                              "gc.collect()\nh.ref() is None", "H100",
                              {"__name__": "__main__"}, client=c, quiet=True, return_names=[])
        assert _pid(c, "H100") == pid  # one warm runner throughout
    assert freed is True


def test_a_runner_kept_warm_for_no_time_ends_without_running_finalizers(
        tmp_path: Path) -> None:
    # --keep-warm 0 forks a runner per cell: it ends as a fresh one does, without a release
    (tmp_path / "gw").mkdir()
    gw = start_gateway(tmp_path / "gw", "--keep-warm", "0")
    mark = tmp_path / "released"
    try:
        with gw.client() as c:
            gpu_magic.run(HELD, "H100", {"__name__": "__main__", "MARK": str(mark)}, client=c,
                          quiet=True, return_names=[])
            gpu_magic.run("1", "H100", {"__name__": "__main__"}, client=c, quiet=True)
    finally:
        gw.stop()
    assert not mark.exists()


def test_what_a_value_prints_as_it_is_sent_back_is_the_cell_s_output(
        warm: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    with warm.client() as c:
        for _ in range(3):
            gpu_magic.run("class Loud:\n    def __repr__(self):\n        print('from repr')\n"
                          "        return 'Loud()'\nLoud()", "H100", {"__name__": "__main__"},
                          client=c, quiet=True)
            assert capsys.readouterr().out == "from repr\n"


def _pid(c: GatewayClient, spec: str) -> int:
    return gpu_magic.run("import os\nos.getpid()", spec, {"__name__": "__main__"}, client=c,
                         quiet=True)


def test_runner_is_reused_for_the_same_key_only(warm: Gateway, tmp_path: Path) -> None:
    with warm.client() as c:
        first = _pid(c, "A100-80GB:4")
        assert _pid(c, "A100-80GB:4") == first  # same user, interpreter and GPUs: reused
        assert _pid(c, "H100:2") != first  # other GPUs: another runner


def test_a_warm_runner_takes_the_next_cell_after_an_interrupted_one(warm: Gateway) -> None:
    with warm.client() as c:
        pid = _pid(c, "A100-80GB:4")
        job = gpu_magic.run("import os, time\nleft = 1\nprint(os.getpid(), flush=True)\n"
                            "time.sleep(60)", "A100-80GB:4", {"__name__": "__main__"}, client=c,
                            quiet=True, background=True)
        wait_for(lambda: job.output, 30)
        assert job.output == f"{pid}\n"  # the same runner
        c.interrupt(job.id)
        with pytest.raises(KeyboardInterrupt):
            job.wait(timeout=30)
        # an interrupt that finds the runner idle between cells is no cell's: ignored
        os.kill(pid, signal.SIGINT)
        after = gpu_magic.run("import os\n('left' in globals(), 'time' in globals(), os.getpid())",
                              "A100-80GB:4", {"__name__": "__main__"}, client=c, quiet=True)
        assert after == (False, False, pid)


def test_an_interrupt_before_a_fresh_runner_listens_waits_for_its_cell(cold: Gateway) -> None:
    # asked while the runner starts (Python's own handler would end it), it waits for the
    # runner to say it takes interrupts, then for the cell to run
    from .test_gateway_http import follow, submit

    with cold.client() as c:
        job = submit(c, "acc = [1]\nimport time\ntime.sleep(30)\n", "H100")
        follow(c, job["id"], until=lambda e: e["type"] == "granted")
        c.interrupt(job["id"])
        events = follow(c, job["id"])
        kinds = [e["type"] for e in events]
        assert "interrupted" in kinds and kinds[-3:] == ["result", "error", "done"], events
        assert events[-2]["ename"] == "KeyboardInterrupt" and events[-1]["state"] == "cancelled"


def test_cold_gateway_never_reuses(cold: Gateway) -> None:
    with cold.client() as c:
        assert _pid(c, "H100") != _pid(c, "H100")


def test_edited_local_module_is_imported_again(warm: Gateway, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as a notebook kernel has its folder on sys.path
    mod = tmp_path / "helpers_for_warm.py"
    mod.write_text("VALUE = 1\n")
    cell = "import helpers_for_warm\nhelpers_for_warm.VALUE"
    with warm.client() as c:
        assert gpu_magic.run(cell, "H100", {"__name__": "__main__"}, client=c, quiet=True) == 1
        mod.write_text(textwrap.dedent("""
            VALUE = 2
        """))
        import os
        import time

        os.utime(mod, (time.time() + 5, time.time() + 5))  # a new mtime even within one tick
        # (binding the first cell's import imported it here too; a module this side holds
        # travels as it is here, as a local import would find it: not what is tested)
        sys.modules.pop("helpers_for_warm", None)
        assert gpu_magic.run(cell, "H100", {"__name__": "__main__"}, client=c, quiet=True) == 2
        sys.modules.pop("helpers_for_warm", None)


def test_a_dead_spare_runner_is_replaced_and_the_job_ends(tmp_path: Path) -> None:
    # the zygote keeps a runner forked ahead; if it died, the job gets a new one, and that
    # one must not hold the job's events pipe open (the job would never seem to end)
    import os
    import signal
    import time

    import psutil

    gw = start_gateway(tmp_path, "--keep-warm", "60", simulate="H100:1")
    try:
        deadline = time.monotonic() + 30
        spares: list[Any] = []
        while not spares and time.monotonic() < deadline:
            zygotes = [p for p in psutil.Process(gw.proc.pid).children()
                       if "--zygote" in p.cmdline()]
            spares = [c for z in zygotes for c in z.children()]
            time.sleep(0.1)
        assert spares, "the zygote keeps no spare runner"
        for p in spares:
            os.kill(p.pid, signal.SIGKILL)
        with GatewayClient(gw.url, gw.token) as c:  # a job that never ends times out here
            assert gpu_magic.run("2 * 21", "H100", {"__name__": "__main__"}, client=c,
                                 quiet=True, timeout=30) == 42
    finally:
        gw.stop()


def test_the_c_environment_comes_back_after_clearenv() -> None:
    # clearenv() leaves no table at all: the next reset must still put every variable back
    import subprocess
    import sys

    code = (
        "import ctypes, os\n"
        "from gpu_magic.runner import _CEnviron\n"
        "c = _CEnviron(); c.mark()\n"
        "libc = ctypes.CDLL(None); libc.getenv.restype = ctypes.c_char_p\n"
        "libc.clearenv()\n"
        "assert c.touched() and libc.getenv(b'PATH') is None\n"
        "c.mark()  # nothing to copy: no table\n"
        "c.sync(os.environ); c.mark()\n"
        "print(libc.getenv(b'PATH') == os.environ['PATH'].encode(), c.touched())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_a_cell_that_removes_its_own_folder_keeps_its_runner(warm: Gateway) -> None:
    cell = ("import colorsys, os, tempfile  # a module this runner has not imported yet\n"
            "d = tempfile.mkdtemp()\nos.chdir(d)\nos.rmdir(d)\nos.getpid()")
    with warm.client() as c:
        pid = gpu_magic.run(cell, "H100", {"__name__": "__main__"}, client=c, quiet=True)
        assert _pid(c, "H100") == pid



LEFTOVERS = """
import os, subprocess, sys
plain = subprocess.Popen(['sleep', '301']).pid
own_session = subprocess.Popen(['sleep', '302'], start_new_session=True).pid
# a daemon: its parent exits at once, so it is nobody's child but the runner's (adopted)
r, w = os.pipe()
subprocess.run([sys.executable, '-c', 'import os, subprocess, sys; '
                'p = subprocess.Popen(["sleep", "303"], start_new_session=True); '
                'os.write(int(sys.argv[1]), str(p.pid).encode())', str(w)], pass_fds=[w])
os.close(w)
daemon = int(os.read(r, 100))
"""


@pytest.mark.parametrize("which", ["warm", "cold"])
def test_processes_a_cell_leaves_running_end_with_it(
        which: str, warm: Gateway, cold: Gateway, tmp_path: Path) -> None:
    # one still running after its job held the job's GPUs (and their memory) while the next
    # job was granted them; on a warm runner, even a plain child outlived the cell
    gw = warm if which == "warm" else cold
    with gw.client() as c:
        ns: dict[str, Any] = {"__name__": "__main__"}
        gpu_magic.run(LEFTOVERS, "H100", ns, client=c, quiet=True)
        pids = [ns["plain"], ns["own_session"], ns["daemon"]]

        def alive(pid: int) -> bool:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
            except FileNotFoundError:
                return False

        wait_for(lambda: not any(alive(p) for p in pids), 10)
        # a cancelled cell's too (the gateway stops its runner's process group only)
        ns["where"] = str(tmp_path / f"pids-{which}")
        job = gpu_magic.run(LEFTOVERS + "Path = __import__('pathlib').Path\n"
                            "Path(where + '.tmp').write_text(repr([plain, own_session, daemon]))\nos.rename(where + '.tmp', where)\n"
                            "import time\ntime.sleep(60)", "H100", ns, client=c, quiet=True,
                            background=True)
        wait_for(lambda: os.path.exists(ns["where"]), 30)
        pids = json.loads(Path(ns["where"]).read_text())
        assert all(alive(p) for p in pids)
        job.cancel()
        with pytest.raises(gpu_magic.JobCancelled):
            job.wait(timeout=30)
        wait_for(lambda: not any(alive(p) for p in pids), 10)
        # and a cell that waits for its own subprocess is untouched
        assert gpu_magic.run("import subprocess\nsubprocess.run(['sleep', '0.2']).returncode",
                             "H100", {"__name__": "__main__"}, client=c, quiet=True) == 0


def test_multiprocessing_works_cell_after_cell_on_a_warm_runner(warm: Gateway) -> None:
    # ending what a cell left running once ended the interpreter's own helpers too (the
    # resource tracker, the forkserver): the next cell warned, or failed with
    # ChildProcessError
    cell = ("import multiprocessing as mp, warnings\n"
            "with warnings.catch_warnings():\n    warnings.simplefilter('error')\n"
            "    with mp.get_context(METHOD).Pool(2) as p:\n"
            "        out = p.map(abs, [-1, -2, -3])\nout")
    with warm.client() as c:
        first = _pid(c, "H100")
        for method in ("spawn", "spawn", "forkserver", "forkserver"):
            assert gpu_magic.run(cell, "H100", {"__name__": "__main__", "METHOD": method},
                                 client=c, quiet=True) == [1, 2, 3]
        assert _pid(c, "H100") == first  # one warm runner did all four


def test_torch_compile_in_a_cell_leaves_its_own_globals_where_it_ran(
        warm: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    # dynamo puts numbered globals of its own in the namespace of what it compiles: brought
    # back, the notebook's next torch.compile met them ("Name '__builtins_dict___0' already
    # exists in scope"), and a note named one the user never made
    torch = pytest.importorskip("torch")
    ns: dict[str, Any] = {"__name__": "__main__"}
    with warm.client() as c:
        gpu_magic.run("import torch\nf = torch.compile(lambda a: a + 1, backend='eager')\n"
                      "y = f(torch.ones(3))", "H100", ns, client=c)
    assert [k for k in ns if k.startswith("__") and not k.endswith("__")] == []
    assert torch.equal(ns["y"], torch.full((3,), 2.0))
    assert "__compiled_fn" not in capsys.readouterr().err  # no note of a name never made


def test_a_cell_that_redirects_fds_1_and_2_leaves_later_cells_their_output(
        warm: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    # seen in a trial: every later cell on that runner printed nothing (and waited 7.7 s)
    with warm.client() as c:
        pid = _pid(c, "H100")
        capsys.readouterr()
        gpu_magic.run("import os\nfd = os.open('/dev/null', os.O_WRONLY)\nos.dup2(fd, 1)\n"
                      "os.dup2(fd, 2)\nos.close(fd)\nprint('own print')", "H100",
                      {"__name__": "__main__"}, client=c, quiet=True)
        # its print goes through sys.stdout, which a kernel sends over ZMQ, not through fd 1
        assert capsys.readouterr().out == "own print\n"
        gpu_magic.run("import os, sys\nprint('later')\nos.write(1, b'from fd 1\\n')\n"
                      "os.write(2, b'from fd 2\\n')", "H100", {"__name__": "__main__"},
                      client=c, quiet=True)
        got = capsys.readouterr()
        assert (got.out, got.err) == ("later\nfrom fd 1\n", "from fd 2\n")
        assert _pid(c, "H100") == pid  # on the same runner


def test_a_cell_that_closes_fd_1_keeps_its_output_and_results(
        warm: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    with warm.client() as c:
        pid = _pid(c, "H100")
        capsys.readouterr()
        ns: dict[str, Any] = {"__name__": "__main__"}
        got = gpu_magic.run("print('before', flush=True)\nimport os\nos.close(1)\nx = 7\nx",
                            "H100", ns, client=c, quiet=True)
        assert (got, ns["x"]) == (7, 7)
        assert capsys.readouterr().out == "before\n"
        gpu_magic.run("import os\nprint('after')\nos.write(1, b'from fd 1\\n')", "H100",
                      {"__name__": "__main__"}, client=c, quiet=True)
        assert capsys.readouterr().out == "after\nfrom fd 1\n"
        # a file that took fd 1 closes it when the cell's namespace is let go of
        assert gpu_magic.run("import os\nos.close(1)\nf = open(os.devnull, 'w')\nf.fileno()",
                             "H100", {"__name__": "__main__"}, client=c, quiet=True) == 1
        gpu_magic.run("import os\nos.write(1, b'from fd 1\\n')", "H100",
                      {"__name__": "__main__"}, client=c, quiet=True)
        assert capsys.readouterr().out == "from fd 1\n"
        assert _pid(c, "H100") == pid


def test_a_cell_that_closes_sys_stdout_leaves_the_next_cell_a_working_one(
        warm: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    with warm.client() as c:
        pid = _pid(c, "H100")
        capsys.readouterr()
        got = gpu_magic.run(
            "import sys\nprint('before')\nsys.stdout.close()\ntry:\n    print('lost')\n"
            "except ValueError as e:\n    said = str(e)\n(sys.stdout.closed, said)", "H100",
            {"__name__": "__main__"}, client=c, quiet=True)
        assert got == (True, "I/O operation on closed file.")  # as a local kernel says
        assert capsys.readouterr().out == "before\n"
        assert gpu_magic.run("import sys\nprint('again')\nsys.stdout.closed", "H100",
                             {"__name__": "__main__"}, client=c, quiet=True) is False
        assert capsys.readouterr().out == "again\n"
        assert _pid(c, "H100") == pid  # on the same runner



def test_a_cell_that_leaks_its_file_descriptors_costs_its_runner_not_the_next_cell(
        warm: Gateway) -> None:
    # seen in a trial: the next, unrelated cell failed with "Too many open files" reading
    # its own inputs; what the cell leaked cannot be told from what libraries keep open
    leak = ("import os\nfds = []\ntry:\n    while True:\n"
            "        fds.append(os.open('/dev/null', os.O_RDONLY))\nexcept OSError:\n    pass\n"
            "n = len(fds)\ndel fds\nn")
    with warm.client() as c:
        pid = _pid(c, "H100")
        assert gpu_magic.run(leak, "H100", {"__name__": "__main__"}, client=c, quiet=True) > 0
        ns: dict[str, Any] = {"__name__": "__main__", "data": list(range(100_000))}
        assert gpu_magic.run("sum(data)", "H100", ns, client=c, quiet=True) == 4999950000
        assert _pid(c, "H100") != pid  # that runner took no further cell


def test_a_runner_whose_zygote_died_still_ends_its_job_and_frees_its_gpus(
        tmp_path: Path) -> None:
    # a trial: with the zygote killed (as the kernel's OOM killer may), no one told the gateway
    # that its runners exited: a cancelled or timed-out cell kept "running" and its GPUs busy
    # for the 30 s the end of a runner is waited for
    import psutil

    gw = start_gateway(tmp_path, "--keep-warm", "60", simulate="H100:1")
    try:
        with gw.client() as c:
            job = gpu_magic.run("import os, time\nprint(os.getpid(), flush=True)\n"
                                "time.sleep(120)", "H100", {"__name__": "__main__"}, client=c,
                                quiet=True, background=True)
            wait_for(lambda: job.output, 30)
            runner = int(job.output)
            zygote = psutil.Process(runner).parent()
            assert zygote is not None and "--zygote" in zygote.cmdline()
            zygote.kill()
            c.cancel(job.id)
            with pytest.raises(gpu_magic.JobCancelled):
                job.wait(timeout=20)  # (the runner's exit was waited for 30 s)
            assert not psutil.pid_exists(runner) or \
                psutil.Process(runner).status() == psutil.STATUS_ZOMBIE
            wait_for(lambda: not c.pool()["nodes"][0]["gpus"][0]["busy"], 10)
            # the next cell gets a runner from a new zygote, and ends as usual
            assert gpu_magic.run("6 * 7", "H100", {"__name__": "__main__"}, client=c,
                                 quiet=True) == 42
    finally:
        gw.stop()
