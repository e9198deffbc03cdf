"""End to end through ``gpu_magic.run``: real gateway, real runner subprocesses, simulated pool."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import secrets
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpu_magic
from gpu_magic import (
    EnvironmentMismatch,
    JobFailed,
    RemoteError,
    SerializationError,
    SpecError,
)
from gpu_magic._api import _check_environment, attach
from gpu_magic._version import WIRE_FORMAT

from .conftest import wait_for

pytestmark = pytest.mark.usefixtures("use_gateway")


def notebook(source: str) -> dict[str, Any]:
    """A namespace as a notebook has it: code run in a dict whose __name__ is __main__."""
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(textwrap.dedent(source), "<notebook>", "exec"), ns)
    return ns


def run(ns: dict[str, Any], cell: str, spec: str | None = None, **kw: Any) -> Any:
    return gpu_magic.run(textwrap.dedent(cell), spec, ns, **kw)


def test_issue_example_mutates_input_and_returns_value(capsys: pytest.CaptureFixture[str]) -> None:
    ns = notebook("""
        import numpy as np
        data = np.arange(1_000_000, dtype=np.float32)
        factor = 3
        def scale(x): return x * factor
        class Acc:
            def __init__(self): self.total = 0.0
            def add(self, v): self.total += float(v)
        acc = Acc()
    """)
    acc_class = ns["Acc"]
    value = run(ns, """
        import os
        print("granted:", os.environ["GPU_MAGIC_GRANT"])
        acc.add(scale(data).sum())          # changes an input in place
        half = acc.total / 2
        half
    """, "H100:2, A100-80GB")
    expected = float((np.arange(1_000_000, dtype=np.float32) * 3).sum())
    out = capsys.readouterr().out
    grant = json.loads(out.split("granted:", 1)[1].strip().splitlines()[0])
    assert grant["type"] == "H100" and grant["count"] == 2 and grant["simulated"] is True
    # the keys DESIGN names (a trial found "memory_gb" where the docs said "memory")
    assert {"type", "count", "node", "simulated", "memory"} <= set(grant), grant
    assert grant["memory"] == 80
    assert value == expected / 2 == ns["half"]
    assert isinstance(ns["acc"], acc_class)
    assert ns["acc"].total == expected
    assert "os" in ns  # names the cell binds come back, imports included


def test_simulated_grant_hides_every_gpu() -> None:
    ns = notebook("")
    assert run(ns, "import os; os.environ['CUDA_VISIBLE_DEVICES']", "A100-80GB:4") == ""


def test_shared_references_survive_both_ways() -> None:
    ns = notebook("""
        a = [1, 2]
        b = a
        keep = {"k": 1}
    """)
    run(ns, """
        assert a is b, "two names for one object arrived as two objects"
        a.append(3)
        c = b
        alias = keep
    """)
    assert ns["a"] == [1, 2, 3]
    assert ns["a"] is ns["b"] is ns["c"]
    # an input the cell did not change comes back as the very object we hold
    assert ns["alias"] is ns["keep"]


def test_del_deletes_locally_and_unchanged_inputs_stay_identical() -> None:
    ns = notebook("""
        x = 1
        big = list(range(10))
    """)
    original = ns["big"]
    run(ns, "total = sum(big)\ndel x")
    assert "x" not in ns
    assert ns["total"] == 45
    assert ns["big"] is original


def test_failed_bind_leaves_namespace_unchanged() -> None:
    ns = notebook("x = 'before'")
    # The class unpickles on the runner but refuses to on the client (no GPU_MAGIC_GRANT here).
    with pytest.raises(SerializationError,
                       match="refuses to load here, in Picky.__setstate__.*nothing was bound"):
        run(ns, """
            import os
            class Picky:
                def __setstate__(self, state):
                    if "GPU_MAGIC_GRANT" not in os.environ:
                        raise RuntimeError("refuses to load here")
                    self.__dict__.update(state)
            x = "after"
            p = Picky()
            p.v = 1
        """)
    assert ns["x"] == "before"
    assert "p" not in ns and "Picky" not in ns


def test_an_input_that_fails_to_load_there_is_said_with_the_code_that_failed() -> None:
    # it read "the runner failed before the cell could finish: RuntimeError: ..." with
    # nothing to say which of the inputs it was
    ns = notebook("""
        import os
        class Picky:
            def __setstate__(self, state):
                if "GPU_MAGIC_GRANT" in os.environ:
                    raise RuntimeError("will not load on the GPU machine")
                self.__dict__.update(state)
        p = Picky()
        p.v = 1
    """)
    with pytest.raises(JobFailed) as info:
        run(ns, "print(p.v)")
    message = str(info.value)
    assert ("RuntimeError: will not load on the GPU machine (while rebuilding the cell's inputs "
            "on the GPU machine, in Picky.__setstate__; the cell did not run)") in message
    assert message.endswith("%%gpu --dry-run lists what travels. The input p is a Picky"), \
        message


def test_functions_see_later_assignments_like_locally() -> None:
    ns = notebook("""
        factor = 3
        def scale(x): return x * factor
    """)
    assert run(ns, "factor = 5\nscale(2)") == 10
    assert ns["factor"] == 5


def test_what_a_notebook_function_does_to_its_globals_comes_back() -> None:
    # The cell only calls train(); what train changes (a list it appends to, a counter it
    # rebinds with `global`, a dict it edits, a name it creates or deletes) is what a local
    # run leaves behind, so it must come back too.
    ns = notebook("""
        history = []
        same_history = history
        step = 0
        config = {"lr": 0.1}
        unused = {"kept": True}
        gone = 1
        In, Out = ["notebook history"], {1: "an output"}  # as IPython has them
        def train():
            global step, made, gone
            for i in range(3):
                history.append(i)
                step += 1
            config["lr"] = 0.01
            made = step * 2
            del gone
            return "trained" if unused["kept"] and None not in (In, Out) else "?"
    """)
    train, unused, history_in, history_out = ns["train"], ns["unused"], ns["In"], ns["Out"]
    assert run(ns, "out = train()") is None
    assert ns["out"] == "trained"
    assert (ns["history"], ns["step"], ns["config"], ns["made"]) == ([0, 1, 2], 3, {"lr": 0.01}, 6)
    assert "gone" not in ns
    assert ns["same_history"] is ns["history"]  # changed in place: the same list
    # what did not change stays the very same object, and IPython's names are the kernel's
    assert ns["train"] is train and ns["unused"] is unused
    assert ns["In"] is history_in and ns["Out"] is history_out


def test_a_background_job_brings_back_what_a_function_did_to_its_globals(
        capsys: pytest.CaptureFixture[str]) -> None:
    ns = notebook("""
        history = []
        def train():
            history.append(1)
    """)
    run(ns, "train()", background=True).wait()
    assert ns["history"] == [1]
    assert "reassigned since" not in capsys.readouterr().err


def test_an_input_changed_in_place_changes_where_the_notebook_holds_it() -> None:
    # Locally, an in-place change shows through every reference: an alias, a view of the
    # array, a dict holding the object. The input must come back as the same object.
    ns = notebook("""
        import numpy as np
        losses = []
        alias = losses
        data = np.zeros(4)
        view = data[:2]
        frozen = np.zeros(2)
        config = {"lr": 0.1}
        holder = {"config": config}
        from collections import Counter
        words = Counter(a=1)
        same_words = words
        seen = set()
        class Model:
            def __init__(self):
                self.weights = [0.0]
                self.steps = 0
            def step(self):
                self.weights.append(1.0)
                self.steps += 1
        model = Model()
        trainer = {"model": model, "model again": model}
    """)
    objects = {n: ns[n] for n in ("losses", "data", "frozen", "config", "words", "seen",
                                  "model")}
    run(ns, """
        losses.append(1.5)
        data += 1
        frozen += 1
        frozen.flags.writeable = False
        config["lr"] = 0.01
        seen.add("x")
        words["a"] += 1
        model.step()
        model.me = model  # its new state refers to itself: to the notebook's object
    """)
    assert all(ns[n] is obj for n, obj in objects.items())
    assert ns["alias"] == [1.5]
    assert ns["view"].tolist() == [1.0, 1.0] and ns["data"].tolist() == [1.0] * 4
    assert ns["frozen"].tolist() == [1.0, 1.0] and not ns["frozen"].flags.writeable
    assert ns["holder"]["config"] == {"lr": 0.01} and ns["seen"] == {"x"}
    assert ns["same_words"] == {"a": 2}
    model = ns["trainer"]["model"]
    assert model.steps == 1 and model.weights == [0.0, 1.0] and model.me is model
    assert isinstance(model, ns["Model"])


# two models in a list, each also a name of its own
TWO_MODELS = "class M:\n    def __init__(self): self.w = 0\nm1, m2 = M(), M()\nmodels = [m1, m2]\n"


def test_objects_inside_an_input_stay_the_notebook_s_objects() -> None:
    # a list of models, a dict of arrays, a dataclass's list: what the cell changed inside
    # them came back as new objects, and the notebook's other names for them (m1, W, tags)
    # kept the old state, in silence and for every later cell
    ns = notebook(TWO_MODELS + textwrap.dedent("""
        import numpy as np
        from dataclasses import dataclass, field
        W = np.zeros(3)
        params = {"W": W}
        @dataclass
        class Cfg:
            tags: list = field(default_factory=list)
        cfg = Cfg(["a"])
        tags = cfg.tags
        inner = []
        t = (inner, 1)
        node = {"name": "n"}
        node["self"] = node
        graph = [node]
    """))
    before = {n: ns[n] for n in ("m1", "m2", "models", "W", "params", "tags", "inner", "node")}
    run(ns, """
        for m in models:
            m.w += 1
        models.append(M())
        params["W"][:] = 7
        cfg.tags.append("b")
        t[0].append(1)
        graph[0]["seen"] = True
        first = models[0]
    """)
    assert all(ns[n] is obj for n, obj in before.items())
    assert ns["models"][:2] == [ns["m1"], ns["m2"]] and ns["m1"].w == ns["m2"].w == 1
    assert ns["models"][2].w == 0 and isinstance(ns["models"][2], ns["M"])
    assert ns["first"] is ns["m1"]  # a new name for an object inside an input: the same one
    assert ns["params"]["W"] is ns["W"] and ns["W"].tolist() == [7.0] * 3
    assert ns["cfg"].tags is ns["tags"] and ns["tags"] == ["a", "b"]
    assert ns["t"][0] is ns["inner"] and ns["inner"] == [1]
    assert ns["graph"][0] is ns["node"] and ns["node"]["self"] is ns["node"]
    assert ns["node"]["seen"] is True
    # and the next cell sees the change where the notebook holds it
    run(ns, "seen_w = m1.w")
    assert ns["seen_w"] == 1


# a small torch model, its optimizer, and data to train it on
LINEAR_AND_SGD = ("import torch\ntorch.manual_seed(0)\nmodel = torch.nn.Linear(2, 1)\n"
                  "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
                  "x, y = torch.randn(8, 2), torch.randn(8, 1)\n")


def test_a_model_trained_in_place_stays_the_notebook_s_model() -> None:
    torch = pytest.importorskip("torch")
    ns = notebook(LINEAR_AND_SGD + textwrap.dedent("""
        trainer = {"model": model, "opt": opt}
        counts = torch.zeros(2)
        also_counts = counts
        scale = torch.nn.Parameter(torch.ones(2))
        def train(model, opt):
            for _ in range(3):
                opt.zero_grad()
                ((model(x) - y) ** 2).mean().backward()
                opt.step()
    """))
    before = ns["model"].weight.detach().clone()
    scale = ns["scale"]
    run(ns, "train(model, opt)\ncounts.add_(1)\nscale.requires_grad_(False)")
    assert ns["scale"] is scale and not scale.requires_grad  # what it says of itself too
    assert ns["trainer"]["model"] is ns["model"] and ns["trainer"]["opt"] is ns["opt"]
    assert not torch.equal(ns["model"].weight, before)
    assert ns["also_counts"].tolist() == [1.0, 1.0]
    # the optimizer steps the model's own parameters, so training goes on here as after a
    # local run
    params = {id(p) for p in ns["model"].parameters()}
    assert all(id(p) in params for g in ns["opt"].param_groups for p in g["params"])
    trained = ns["model"].weight.detach().clone()
    ns["train"](ns["model"], ns["opt"])
    assert not torch.equal(ns["model"].weight, trained)


def test_only_what_the_cell_changed_inside_an_input_is_changed_here() -> None:
    # every object a result reached was brought to its state there, changed or not: a view
    # sent beside its array wrote its old bytes back over the array's new ones, __setstate__
    # ran on live objects, and what __getstate__ leaves out (a lock) was dropped from them
    ns = notebook("""
        import threading
        import numpy as np
        a = np.arange(6.0)
        data = [a, a[2:4]]
        class Guarded:
            def __init__(self): self.v, self.lock = 0, threading.Lock()
            def __getstate__(self): return {"v": self.v}
            def __setstate__(self, state): self.__dict__.update(state, lock=None, restored=1)
        g = Guarded()
        box = {"g": g, "n": 0}
    """)
    lock = ns["g"].lock
    run(ns, "data[0] += 1\nbox['n'] += 1")
    assert ns["a"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert ns["data"][1].tolist() == [3.0, 4.0]  # a view of a: as a local run leaves it
    assert ns["box"] == {"g": ns["g"], "n": 1}
    assert ns["g"].lock is lock and "restored" not in vars(ns["g"])  # left alone
    # changed there: what the cell changed is changed here, and what __getstate__ leaves
    # out stays (it was brought to its state through __setstate__, and lost its lock)
    run(ns, "box['g'].v = 5")
    assert ns["box"]["g"] is ns["g"] and ns["g"].v == 5
    assert ns["g"].lock is lock and "restored" not in vars(ns["g"])


def test_objects_holding_enum_members_or_numpy_scalars_are_told_unchanged() -> None:
    # such a value is no place of its own (it cannot change in place): two objects holding
    # the same one stopped the job before its cell ran (KeyError in the runner), and one
    # holding it alone always read as changed
    ns = notebook("""
        import enum
        import numpy as np
        class Mode(enum.Enum):
            A = 1
        class Box:
            def __init__(self, best): self.mode, self.best = Mode.A, best
            def __setstate__(self, state): self.__dict__.update(state, restored=True)
        best = np.float32(1.5)
        boxes = [Box(best), Box(best)]
        alone = {"box": Box(np.float64(2.5))}
    """)
    run(ns, "boxes.append(None)\nalone['n'] = 1")
    assert len(ns["boxes"]) == 3 and ns["alone"]["n"] == 1
    assert not any(vars(b).get("restored") for b in [*ns["boxes"][:2], ns["alone"]["box"]])
    run(ns, "boxes[0].best = boxes[0].best * 2")
    assert ns["boxes"][0].best == 3.0 and ns["boxes"][0].restored is True


def test_an_input_that_no_longer_pickles_there_is_said_not_lost_in_silence(
        capsys: pytest.CaptureFixture[str]) -> None:
    # a __getstate__ that needs what it leaves out: the copy there no longer pickles, so
    # whether the cell changed box could not be told, and box['n'] += 1 was lost in silence
    ns = notebook("""
        class C:
            def __init__(self): self.v, self.cache = 0, 5
            def __getstate__(self):
                state = dict(self.__dict__)
                del state["cache"]
                return state
        c = C()
        box = {"c": c, "n": 0}
    """)
    run(ns, "box['n'] += 1")
    assert ns["box"]["n"] == 0  # (it cannot come back)
    err = capsys.readouterr().err
    # (no `del box` advice: deleting an input there deletes the notebook's too)
    assert ("[gpu_magic] box was not brought back: whether the cell changed it cannot be told "
            "here: box['c'] (a C object), whose pickling raised KeyError: 'cache' no longer "
            "pickles where the cell ran, so a change the cell made to it stays there; here box "
            "still holds its value from before the cell\n") in err, err


def test_a_background_job_leaves_alone_what_it_did_not_change_inside_its_inputs() -> None:
    ns = notebook(TWO_MODELS)
    job = run(ns, "import time\ntime.sleep(1)\nmodels[0].w += 1", background=True, quiet=True)
    ns["m2"].w = 100  # changed here meanwhile: the job did not touch it
    job.wait(timeout=60)
    assert ns["models"] == [ns["m1"], ns["m2"]] and (ns["m1"].w, ns["m2"].w) == (1, 100)


def test_a_model_trained_inside_a_dict_stays_the_notebook_s_model() -> None:
    # only the dict was an input: the model and optimizer in it came back as new objects,
    # and `model` here kept its untrained weights
    torch = pytest.importorskip("torch")
    ns = notebook(LINEAR_AND_SGD + 'setup = {"model": model, "opt": opt}\n')
    model, weight = ns["model"], ns["model"].weight
    before = weight.detach().clone()
    run(ns, """
        for _ in range(3):
            setup["opt"].zero_grad()
            ((setup["model"](x) - y) ** 2).mean().backward()
            setup["opt"].step()
    """)
    assert ns["setup"]["model"] is model and ns["setup"]["opt"] is ns["opt"]
    assert model.weight is weight and not torch.equal(weight, before)
    params = {id(p) for p in model.parameters()}
    assert all(id(p) in params for g in ns["opt"].param_groups for p in g["params"])


def test_a_tensor_reshaped_in_place_stays_the_notebook_s_tensor() -> None:
    # unsqueeze_, resize_, t_ and an out= of another shape change a tensor in place: it came
    # back as a new object, its aliases, dict entries and views holding the old data
    torch = pytest.importorskip("torch")
    ns = notebook("""
        import torch
        a = torch.zeros(6)
        c = torch.zeros(50_000)
        b = torch.arange(3.0)
        x = torch.ones(2, 3)
        big = torch.zeros(100_000)
        held = {"a": a, "c": c}
        c_view = c[:2]
    """)
    a, c, b, x, big = (ns[n] for n in ("a", "c", "b", "x", "big"))
    value = run(ns, """
        a.unsqueeze_(0)
        c.unsqueeze_(0)
        c.add_(1)
        b.resize_(5)
        b[3:] = 7
        x.t_()
        r = torch.add(torch.ones(64, 16), 1, out=big)
        c
    """)
    assert ns["a"] is a and ns["held"]["a"] is a and a.shape == (1, 6)
    assert ns["c"] is c and ns["held"]["c"] is c and c.shape == (1, 50_000)
    assert ns["c_view"].tolist() == [1.0, 1.0]  # a view here sees what the cell did
    assert value is c
    assert ns["b"] is b and b.tolist() == [0.0, 1.0, 2.0, 7.0, 7.0]
    assert ns["x"] is x and x.shape == (3, 2) and x.stride() == (1, 3)
    assert ns["big"] is big and ns["r"] is big and big.shape == (64, 16)
    assert torch.equal(big, torch.full((64, 16), 2.0))


def test_numpy_views_share_memory_in_the_cell_as_here() -> None:
    # a newcomer's trial: X_train = X[:8] arrived as a copy, so after `X -= 100` the cell's
    # X_train.mean() was 3.5 where a local cell gives -96.5; and two overlapping views of an
    # array not sent came back each over the other's part
    ns = notebook("""
        import numpy as np
        X = np.arange(10, dtype=float)
        X_train = X[:8]
        F = np.asfortranarray(np.arange(12.0).reshape(3, 4))
        back = F[::-1, ::2]
        a = np.zeros(10)
        va, vb = a[:5], a[3:]
        big = np.arange(1 << 20, dtype=float)
        head, tail = big[:10], big[-10:]
    """)
    X, a = ns["X"], ns["a"]
    value = run(ns, """
        X -= 100
        F[0, 0] = -1
        va[:] = 1
        vb[-1] = 2
        linked = [np.shares_memory(X, X_train), np.shares_memory(F, back),
                  np.shares_memory(va, vb), np.shares_memory(head, tail)]
        X_train.mean()
    """)
    assert value == -96.5
    assert ns["linked"] == [True, True, True, False]  # (head and tail never overlapped)
    assert ns["X"] is X and ns["X_train"].base is X and ns["X_train"].mean() == -96.5
    assert ns["back"][-1, 0] == -1
    assert a.tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 2]  # as a local cell leaves it
    # arrays the cell makes come back sharing memory as they did there
    run(ns, "m = np.zeros(6)\nmv = m[2:4]\nmv += 5")
    assert np.shares_memory(ns["m"], ns["mv"]) and ns["m"].tolist() == [0, 0, 5, 5, 0, 0]
    ns["m"][2] = 7
    assert ns["mv"][0] == 7


def test_a_numpy_array_given_a_new_shape_or_type_in_place_stays_the_same_object() -> None:
    # a trial: after `arr.shape = (2, 3)` the name held a new array and its aliases the old
    ns = notebook("""
        import numpy as np
        arr = np.arange(6)
        x, holder = arr, [arr]
        f = np.zeros(4)
        grown = np.zeros(4)
    """)
    arr, f, grown = ns["arr"], ns["f"], ns["grown"]
    run(ns, """
        arr.shape = (2, 3)
        arr += 1
        f.dtype = np.int64
        f[0] = 7
        grown.resize(8, refcheck=False)
    """)
    assert ns["arr"] is arr and ns["x"] is arr and ns["holder"][0] is arr
    assert arr.shape == (2, 3) and arr.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert ns["f"] is f and f.dtype == np.int64 and f.tolist() == [7, 0, 0, 0]
    # (more bytes than it has: a new array, as before)
    assert ns["grown"].shape == (8,) and grown.shape == (4,)


def test_an_input_changed_in_place_then_rebound_or_deleted_keeps_the_change_here() -> None:
    # a newcomer's trial: after `history.append(0.5)` then `history = history[-100:]`,
    # runs["main"] (the list history had held) stayed empty where a local cell appends
    ns = notebook("""
        history = []
        runs = {"main": history}
        scores = [1]
        also = scores
        log = {"n": 0}
        def tick():
            global log
            log["n"] += 1
            log = {"n": 0}
    """)
    history, log = ns["history"], ns["log"]
    run(ns, """
        history.append(0.5)
        history = history[-100:]
        old = scores
        scores.append(2)
        del scores
        tick()
    """)
    assert ns["runs"]["main"] is history and history == [0.5]
    assert ns["history"] == [0.5] and ns["history"] is not history
    assert "scores" not in ns and ns["also"] == [1, 2] and ns["old"] == [1, 2]
    assert log == {"n": 1} and ns["log"] == {"n": 0} and ns["log"] is not log


def test_what_an_objects_getstate_leaves_out_stays_here(tmp_path: Path) -> None:
    # a newcomer's trial: after `ds.epoch += 1` the notebook's ds._fh (an open file its
    # __getstate__ sends as None) was None, and a cache __setstate__ rebuilds was emptied
    ns = notebook(f"""
        class Dataset:
            def __init__(self, path):
                self.epoch, self.seen, self.tag = 0, [], "a"
                self._fh = open(path, "w")
                self._cache = {{"warm": 1}}
            def __getstate__(self):
                state = dict(self.__dict__, _fh=None)
                del state["_cache"]
                return state
            def __setstate__(self, state):
                self.__dict__.update(state, _cache={{}})
        ds = Dataset({str(tmp_path / "rows.txt")!r})
    """)
    ds = ns["ds"]
    fh, seen = ds._fh, ds.seen
    try:
        run(ns, "ds.epoch += 1\nds.seen.append(3)\ndel ds.tag\nds.note = 'new'")
        assert ns["ds"] is ds and ds.epoch == 1 and ds.note == "new" and not hasattr(ds, "tag")
        assert ds._fh is fh and ds._cache == {"warm": 1}
        assert ds.seen is seen and seen == [3]
    finally:
        fh.close()


def test_a_view_reshaped_in_place_brings_back_only_its_own_bytes() -> None:
    # the whole storage came back: what the notebook did meanwhile to the rest of it (a
    # background job) was undone
    pytest.importorskip("torch")
    ns = notebook("import torch\nbase = torch.arange(10.0)\na = base[:3]")
    base = ns["base"]
    job = run(ns, "import time\ntime.sleep(1)\na.unsqueeze_(0)\na.mul_(2)", background=True)
    base[9] = 99.0  # here, while it runs
    job.wait(60)
    assert ns["a"].shape == (1, 3) and ns["a"].tolist() == [[0.0, 2.0, 4.0]]
    assert base.tolist() == [0.0, 2.0, 4.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 99.0]


def test_a_tensor_that_cannot_be_reshaped_here_comes_back_new_and_nothing_half_bound() -> None:
    # an inference tensor refuses set_: its new shape was half applied under an error that
    # said nothing was bound
    pytest.importorskip("torch")
    ns = notebook("""
        import torch
        a = torch.zeros(3)
        with torch.inference_mode():
            b = torch.zeros(3)
    """)
    a, b = ns["a"], ns["b"]
    run(ns, "a.add_(5)\nwith torch.inference_mode():\n    b.unsqueeze_(0)\nz = 1")
    assert ns["a"] is a and a.tolist() == [5.0, 5.0, 5.0]
    assert ns["b"] is not b and ns["b"].shape == (1, 3) and b.shape == (3,)
    assert ns["z"] == 1
    b = ns["b"]  # and changed in place without a new shape
    run(ns, "with torch.inference_mode():\n    b.add_(1)")
    assert ns["b"].tolist() == [[1.0, 1.0, 1.0]]


def test_a_state_that_cannot_be_applied_binds_nothing() -> None:
    ns = notebook("""
        import os
        class Plain:
            __slots__ = ("count", "__dict__")
            def __init__(self):
                self.count, self.extra = 0, 0
        class Picky:
            def __setstate__(self, state):
                if "GPU_MAGIC_GRANT" not in os.environ:  # only on the runner
                    raise RuntimeError("not here")
                self.__dict__.update(state)
        a_plain, b_picky, c_list = Plain(), Picky(), []
    """)
    with pytest.raises(SerializationError,
                       match="b_picky changed in place.*nothing was bound.*__setstate__"):
        run(ns, "a_plain.count = a_plain.extra = 1\nb_picky.x = 1\nc_list.append(1)\n"
                "new_name = 1")
    assert (ns["a_plain"].count, ns["a_plain"].extra) == (0, 0)
    assert ns["c_list"] == [] and "new_name" not in ns


def test_attaching_elsewhere_brings_back_new_objects() -> None:
    # %gpu attach in another kernel (or after a restart): the objects there are not the ones
    # the job was sent, so what it changed in place comes back as new objects
    ns = notebook("""
        class Model:
            def __init__(self):
                self.w = 0
        class Config:
            def __init__(self):
                self.lr = 0.1
        model, data = Model(), [1]
    """)
    job = run(ns, "model.w = 42\ndata.append(2)\nnew = 1", background=True)
    job.wait()
    empty: dict[str, Any] = {"__name__": "__main__"}
    attach(job.id, empty, quiet=True)
    assert (empty["model"].w, empty["data"], empty["new"]) == (42, [1, 2], 1)
    other = notebook("class Config:\n    lr = 0.1\nmodel = Config()\ndata = [7]")
    config, data = other["model"], other["data"]
    attach(job.id, other, quiet=True)
    assert other["model"].w == 42 and type(other["model"]).__name__ == "Model"
    assert vars(config) == {} and config.lr == 0.1 and data == [7]  # left alone


def test_attaching_elsewhere_rebuilds_results_that_hold_small_inputs() -> None:
    # a version-skew trial, with no skew: every 3 in the results was sent back as the input
    # `factor = 3` (Python shares small ints), so another kernel's attach failed with
    # "unknown persistent id ('gpu_magic:input', 'factor')"
    ns = notebook("""
        factor, label = 3, 'run'
        def scale(x):
            return x * factor
        class Acc:
            def __init__(self):
                self.total = 0
            def add(self, v):
                self.total += v
        acc, rows = Acc(), [1, 2]
        empty, pair = (), (1, ('a', 2.5))
    """)
    job = run(ns, "acc.add(scale(1))\nz = [factor, label, empty, pair]", background=True)
    job.wait()
    other: dict[str, Any] = {"__name__": "__main__"}
    attach(job.id, other, quiet=True)
    assert other["z"] == [3, "run", (), (1, ("a", 2.5))] and other["acc"].total == 3
    # an input that is an object still comes back as the notebook's own, so a kernel without
    # it is told which name it lacks and what to do
    job = run(ns, "kept = [rows]", background=True)
    job.wait()
    assert job.result is not None and ns["kept"][0] is ns["rows"]
    with pytest.raises(SerializationError) as info:
        attach(job.id, {"__name__": "__main__"}, quiet=True)
    assert (f"the results of GPU job {job.id} hold 'rows', an input the cell left unchanged"
            in str(info.value)), info.value
    assert "set rows here as it was there and attach again" in str(info.value)
    again = notebook("rows = [5]")
    attach(job.id, again, quiet=True)
    assert again["kept"][0] is again["rows"]


def test_attaching_elsewhere_keeps_a_changed_input_one_object_with_the_results_holding_it(
        ) -> None:
    # `model` changed in place and `pair` holds it: attached elsewhere, `pair[0]` is the new
    # `model` bound there, not that kernel's own old one; the unchanged `cfg` is theirs
    import numpy as np

    ns = notebook("import numpy as np\ncfg = {'lr': 0.1}\nmodel = np.zeros(3)\nlog = []")
    job = run(ns, "model += 1\nlog.append(len(log))\npair = (model, cfg, log)\nout = 42",
              background=True)
    job.wait()
    other = notebook("import numpy as np\ncfg = {'lr': 0.5}\nmodel = np.full(3, 7.0)\nlog = [9]")
    old_model, old_log = other["model"], other["log"]
    attach(job.id, other, quiet=True)
    assert np.array_equal(other["model"], [1, 1, 1]) and other["log"] == [0]
    assert other["pair"][0] is other["model"] and other["pair"][2] is other["log"]
    assert other["pair"][1] is other["cfg"] and other["cfg"] == {"lr": 0.5}
    assert np.array_equal(old_model, [7, 7, 7]) and old_log == [9]  # (left alone)
    # a kernel with none of them is told of the unchanged input it lacks, not the changed
    with pytest.raises(SerializationError, match="hold 'cfg', an input the cell left unchanged"):
        attach(job.id, {"__name__": "__main__"}, quiet=True)


def test_attach_numbers_a_cell_s_lines_as_the_cell_did() -> None:
    # both newcomer trials: the failed cell said "line 3", %gpu attach "line 2" (the %%gpu
    # line, line 1 of the cell, was not counted)
    job = run(notebook(""), "x = 1\n1 / 0", background=True, line_offset=1)
    with pytest.raises(ZeroDivisionError) as first:
        job.wait()
    with pytest.raises(ZeroDivisionError) as again:
        attach(job.id, notebook(""), quiet=True)
    for info in (first, again):
        shown = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
        assert "line 3\n      2 x = 1\n----> 3 1 / 0" in shown, shown


@pytest.mark.parametrize("call", ["exit()", "quit()", "import sys\nsys.exit(3)",
                                  "raise SystemExit"])
def test_exit_in_a_cell_ends_the_cell_and_says_so(
        call: str, capsys: pytest.CaptureFixture[str]) -> None:
    ns = notebook("")
    # ("SystemExit: " with nothing after the colon, for a bare one)
    with pytest.raises(RemoteError,
                       match="^SystemExit(: exit\\(\\) ends this cell on the GPU machine; .*|: 3)?$"):
        run(ns, f"before = 1\n{call}\nafter = 2")
    assert "before" not in ns and "after" not in ns  # an error: nothing bound
    assert "To exit: use" not in capsys.readouterr().err  # IPython's advice for a terminal


def test_a_base_exception_of_the_cell_is_raised_as_its_own_type() -> None:
    # a trial: `except Stop:` and `except asyncio.CancelledError:` missed them (RemoteError,
    # an Exception, came instead, and `except Exception:` took it)
    import asyncio

    ns = notebook("""
        class Stop(BaseException):
            pass
    """)
    with pytest.raises(ns["Stop"], match="enough"):
        run(ns, "raise Stop('enough')")
    with pytest.raises(asyncio.CancelledError):
        run(ns, "import asyncio\nraise asyncio.CancelledError()")


def test_notebook_functions_kept_inside_results_use_the_notebook_s_globals() -> None:
    # a model's hooks, callbacks in a list, handlers in a dict: functions held inside what
    # comes back must see the notebook's names, as the same objects made locally would
    ns = notebook("""
        seen = []
        def on_step(v):
            seen.append(v)
        class Trainer:
            def __init__(self):
                self.callbacks = [on_step]
        trainer = Trainer()
    """)
    ns["hooks"] = {}
    run(ns, "def on_end(v):\n    seen.append(v)\ntrainer.callbacks.append(on_end)\n"
            "handlers = {'done': lambda: seen.append('done')}\nhooks['end'] = on_end\n"
            "alias = on_end")
    ns["seen"] = []  # a later cell rebinds it: the functions must read the notebook's name
    for callback in ns["trainer"].callbacks:
        callback(1)
    ns["handlers"]["done"]()
    ns["hooks"]["end"](2)
    assert ns["seen"] == [1, 1, "done", 2]
    # one function under several names and places is still one function
    assert ns["alias"] is ns["on_end"] is ns["hooks"]["end"] is ns["trainer"].callbacks[1]


def test_a_job_keeps_alive_only_what_it_sent() -> None:
    # a failed cell's exception (IPython keeps it) and a background job's handle must not hold
    # the rest of the notebook: `del big` after them frees it
    import gc
    import weakref

    ns = notebook("""
        class Big:
            pass
        big, other = Big(), Big()
        scale = 2
        def f():
            return scale
    """)
    refs = [weakref.ref(ns["big"]), weakref.ref(ns["other"])]
    with pytest.raises(ZeroDivisionError) as failed:
        run(ns, "f()\n1 / 0")
    job = run(ns, "g = f()", background=True)
    job.wait()
    del ns["big"], ns["other"]
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert failed.value is not None and job.result == {"g": 2}


def test_function_defined_remotely_uses_local_globals_after_return() -> None:
    ns = notebook("k = 2")
    run(ns, "def times_k(x):\n    return x * k")
    assert ns["times_k"](3) == 6
    ns["k"] = 10
    assert ns["times_k"](3) == 30


def test_remote_exception_has_its_own_type_and_cell_line_numbers() -> None:
    ns = notebook("""
        class MyError(Exception):
            pass
    """)
    with pytest.raises(ValueError) as info:
        run(ns, "x = 1\nraise ValueError('bad value 42')")
    lines = info.value._render_traceback_()  # type: ignore[attr-defined]
    text = "\n".join(lines)
    assert "Cell, line 2" in text and "raise ValueError('bad value 42')" in text
    assert "H100" in text or "A100" in text  # says where it ran
    assert "simulated" in text
    with pytest.raises(ns["MyError"]):
        run(ns, "raise MyError('mine')")


@pytest.mark.parametrize("cell, where", [("%%time\nx = 1\n1 / 0", "<timed exec>"),
                                         ("%time 1 / 0", "<timed eval>")])
def test_an_error_under_a_magic_shows_no_ipython_frames(cell: str, where: str) -> None:
    # a trial: 30 lines of IPython's way into %%time, where a kernel shows the cell and the
    # line that raised
    import IPython

    if IPython.version_info < (9,):
        pytest.skip("IPython 8's %time prints the error and goes on: nothing is raised")
    with pytest.raises(ZeroDivisionError) as info:
        run(notebook(""), cell)
    text = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
    assert f"File {where}" in text and "Cell, line 1" in text, text
    assert "IPython" not in text and "interactiveshell" not in text, text


def test_a_missing_file_shows_the_cell_s_line_and_not_ipython_s_open(tmp_path: Path) -> None:
    # a trial: the most common first error showed IPython's `_modified_open` under the
    # cell's line, which a kernel leaves out
    missing = tmp_path / "data.txt"
    with pytest.raises(FileNotFoundError) as info:
        run(notebook(""), f"text = open({str(missing)!r}).read()")
    text = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
    assert "Cell, line 1" in text and "FileNotFoundError" in text, text
    assert "_modified_open" not in text and "interactiveshell" not in text, text


def test_debug_after_a_remote_error_says_where_the_cell_s_frames_are() -> None:
    # a trial: %debug opened gpu_magic's own line with nothing to say why `p y` failed
    with pytest.raises(ZeroDivisionError) as info:
        run(notebook(""), "y = 3\n1 / 0")
    landing = traceback.extract_tb(info.value.__traceback__)[-1]  # (where %debug opens)
    assert "%debug: the cell's own frames stayed on its GPU" in (landing.line or ""), landing


def test_unpicklable_remote_exception_becomes_remote_error() -> None:
    ns = notebook("")
    with pytest.raises(RemoteError) as info:
        run(ns, """
            import threading
            class Odd(Exception):
                def __init__(self):
                    super().__init__("odd")
                    self.lock = threading.Lock()
            raise Odd()
        """)
    assert info.value.ename == "Odd"
    assert "odd" in str(info.value)


def test_an_exception_that_cannot_be_rebuilt_here_says_why() -> None:
    # it pickles on the GPU machine, but its __init__ wants more than Exception keeps
    ns = notebook("")
    with pytest.raises(RemoteError) as info:
        run(ns, """
            class MyErr(Exception):
                def __init__(self, code, *, detail):
                    super().__init__(f"code {code}")
                    self.detail = detail
            raise MyErr(3, detail="x")
        """)
    assert info.value.ename == "MyErr"
    text = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
    assert "[gpu_magic] MyErr could not be rebuilt here (TypeError: " in text, text
    assert "keyword-only argument: 'detail'" in text
    assert "`except RemoteError` takes it" in text and "needs a __reduce__" in text


def test_a_notebook_class_coming_back_keeps_its_own_methods() -> None:
    """An instance coming back brings its class by value (when the cell did not name the
    class), and cloudpickle set every attribute of that copy onto the notebook's class: its
    methods became the copies (tracebacks and inspect lost their source), and a method
    patched here while a background job ran was reverted. Only what the cell changed is set."""
    ns = notebook("""
        class Net:
            scale = 2
            def __init__(self, w):
                self.w = w
            def describe(self):
                return "v1"
        class Deeper(Net):
            def describe(self):
                return "deeper " + super().describe()
        model, d = Net(3), Deeper(1)
    """)
    Net = ns["Net"]
    init, deeper = Net.__init__, ns["Deeper"].describe
    job = run(ns, "import time\ntime.sleep(1)\nmodel.w += 1\nclone = type(d)(7)", "H100",
              background=True, quiet=True)

    def v2(self: Any) -> str:
        return "v2"

    Net.describe = v2  # patched here while the job runs
    job.wait(timeout=60)
    assert ns["model"].w == 4 and type(ns["clone"]) is ns["Deeper"]
    assert Net.describe is v2
    assert ns["clone"].describe() == "deeper v2"
    assert Net.__init__ is init and ns["Deeper"].describe is deeper
    assert Net.__init__.__code__.co_filename == "<notebook>"
    # what the cell does change in the class comes back, and only that
    run(ns, "type(model).scale = 5\ndef twice(self):\n    return 2 * self.w\n"
        "type(model).twice = twice\nmodel.w = 6", "H100")
    assert Net.scale == 5 and ns["model"].twice() == 12
    assert Net.__init__ is init and Net.describe is v2


def test_no_cuda_on_a_simulated_gpu_says_why() -> None:
    # torch's own "Torch not compiled with CUDA enabled" read as a broken install
    ns = notebook("")
    with pytest.raises(AssertionError) as info:
        run(ns, "raise AssertionError('Torch not compiled with CUDA enabled')", "H100")
    notes = getattr(info.value, "__notes__", [])
    assert any("the H100 this cell was granted is simulated" in n for n in notes), notes
    assert "torch.cuda.is_available()" in "".join(notes)
    with pytest.raises(ValueError) as other:
        run(ns, "raise ValueError('bad shape')", "H100")
    assert not any("CUDA" in n for n in getattr(other.value, "__notes__", []))


def test_nvidia_smi_on_a_simulated_gpu_says_it_is_simulated() -> None:
    # an instructor's trial: a student's first `!nvidia-smi` printed "command not found" (and
    # on a laptop with a GPU, the real one would list a GPU the cell does not have)
    ns = notebook("")
    run(ns, """
        import os, subprocess
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        listed = get_ipython().getoutput("nvidia-smi")
        path = os.environ["PATH"]
    """, "A100-80GB:2")
    assert ns["smi"].returncode == 0, ns["smi"]
    out = ns["smi"].stdout
    assert out.startswith("gpu_magic: nvidia-smi is simulated here. This cell was granted "
                          "A100-80GB x2 on "), out
    assert "GPU 0: A100-80GB (simulated, 80 GB)\nGPU 1: A100-80GB (simulated, 80 GB)\n" in out
    assert list(ns["listed"]) == out.splitlines()
    # each cell's own grant, on a runner made for it or one kept warm
    for _ in range(2):
        run(ns, "import subprocess\nagain = subprocess.run(['nvidia-smi'], capture_output=True, "
                "text=True).stdout\nboth = os.environ['PATH']", "H100")
        assert "granted H100 x1 on " in ns["again"], ns["again"]
        assert ns["both"].count("gpu-magic-simulated-") == 1, ns["both"]


def test_an_exception_whose_class_is_only_where_the_cell_ran_says_so() -> None:
    ns = notebook("")
    with pytest.raises(RemoteError) as info:
        run(ns, """
            import sys, tempfile, pathlib
            where = tempfile.TemporaryDirectory()  # a module this kernel cannot import
            pathlib.Path(where.name, "remote_only_errs.py").write_text(
                "class FarError(Exception):\\n    pass\\n")
            sys.path.insert(0, where.name)
            from remote_only_errs import FarError
            raise FarError("far")
        """)
    assert info.value.ename == "FarError"
    text = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
    assert "FarError could not be rebuilt here (ModuleNotFoundError: " in text, text
    assert "Its class is only where the cell ran" in text and "__reduce__" not in text


def test_a_cell_run_inside_a_job_binds_only_its_names_and_may_await() -> None:
    ns = notebook("")
    run(ns, """
        import gpu_magic
        inner = {"a": 1}
        got = gpu_magic.run("b = a + 1\\nb", "H100", inner)
        names = sorted(inner)
        waited = {}
        later = gpu_magic.run("import asyncio\\nawait asyncio.sleep(0)\\nc = 5\\nc", "H100",
                              waited)
        tasked = {}  # a task made in one statement and awaited in the last: one loop
        task = gpu_magic.run("import asyncio\\nasync def work():\\n    return 7\\n"
                             "t = asyncio.create_task(work())\\nawait t", "H100", tasked)
        clean = "_gpu_magic_cell_value" not in tasked
        del tasked  # (a task cannot come back)
    """)
    assert ns["got"] == 2 and ns["names"] == ["a", "b"]  # no __builtins__ left behind
    assert ns["later"] == 5 and ns["waited"]["c"] == 5
    assert ns["task"] == 7 and ns["clean"]


def test_gpu_magics_work_in_a_cell_without_loading_the_extension_there() -> None:
    # the notebook loaded it; the cell on the GPU must not have to (twice: a warm runner too)
    for _ in range(2):
        ns = notebook("")
        run(ns, """
            r = get_ipython().run_cell_magic("gpu", "H100 --quiet", "q = 6 * 7\\nq")
            try:
                get_ipython().run_line_magic("gpu", "pool")
            except Exception as e:
                refused = str(e)
        """)
        assert ns["r"] == 42 and ns["q"] == 42
        assert ns["refused"].startswith("%gpu pool: this runs inside GPU job "), ns["refused"]
    ns = notebook("")  # a cell that calls the magic in a loop does not grow the shell
    run(ns, """
        sizes = []
        for _ in range(20):
            get_ipython().run_cell_magic("gpu", "H100 --quiet", "w = 1")
            sizes.append(len(get_ipython().configurables))
    """)
    assert len(set(ns["sizes"])) == 1, ns["sizes"]


def test_an_error_in_a_cell_inside_a_job_shows_the_cells_lines_not_ours() -> None:
    ns = notebook("")
    with pytest.raises(ZeroDivisionError) as info:
        run(ns, """
            x = 1
            get_ipython().run_cell_magic("gpu", "H100 --quiet", "y = 2\\nz = y / 0")
        """)
    text = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
    assert "z = y / 0" in text and "run_cell_magic" in text, text
    assert "gpu_magic" not in text.replace("[gpu_magic]", ""), text


def test_queue_options_of_a_cell_inside_a_job_are_said_to_do_nothing(
        capfd: pytest.CaptureFixture[str]) -> None:
    ns = notebook("")
    run(ns, """
        get_ipython().run_cell_magic("gpu", "H100 --quiet --timeout 1 --retries 2",
                                     "slept = 1")
    """)
    assert ns["slept"] == 1
    err = capfd.readouterr().err
    assert "gpu_magic: --timeout, --retries have no effect here: this cell runs inside GPU " \
           "job " in err, err


@pytest.mark.parametrize("raising, why", [
    ("e = Odd('has a lock')\ne.lock = threading.Lock()\nraise e", "TypeError: cannot pickle"),
    ("class Bad(Exception):\n    def __reduce__(self):\n        raise ValueError('no')\n"
     "raise Bad('x')", "ValueError: no"),
])
def test_an_exception_that_cannot_be_pickled_where_it_ran_says_so(raising: str,
                                                                  why: str) -> None:
    ns = notebook("")
    with pytest.raises(RemoteError) as info:
        run(ns, "import threading\nclass Odd(Exception):\n    pass\n" + raising)
    text = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
    assert "could not be sent back from the GPU machine (" + why in text, text
    assert "give its class a __reduce__" in text


def test_an_exception_carrying_more_than_it_may_bring_back_says_so() -> None:
    ns = notebook("class Heavy(Exception):\n    pass\n")
    with pytest.raises(RemoteError) as info:
        run(ns, "import numpy as np\ne = Heavy('x')\ne.arr = np.ones(9 << 20)\nraise e")
    text = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
    assert "(it carries 72 MiB of arrays; at most 64 MiB travel with an exception)" in text, text


def test_an_exception_carrying_a_large_array_comes_back_as_itself() -> None:
    ns = notebook("class Carrying(Exception):\n    pass\n")
    with pytest.raises(ns["Carrying"]) as info:
        run(ns, "import numpy as np\ne = Carrying('x')\ne.arr = np.ones(2_000_000)\nraise e")
    assert info.value.arr.sum() == 2_000_000  # type: ignore[attr-defined]


def test_a_remote_error_travels_back_from_a_nested_cell() -> None:
    from gpu_magic._errors import RemoteError as Remote

    err = Remote("FarError", "far", "  Cell, line 2\nFarError: far")
    back = pickle.loads(pickle.dumps(err))
    assert (back.ename, back.evalue, back._render_traceback_()) == (
        "FarError", "far", ["  Cell, line 2", "FarError: far"])


def test_bad_spec_is_refused_before_anything_is_sent(client: Any) -> None:
    before = len(client.jobs())
    ns = notebook("")
    with pytest.raises(SpecError, match="'H1000' is not a GPU type; did you mean H100"):
        run(ns, "1", "H1000")
    assert len(client.jobs()) == before


def test_unpicklable_input_is_refused_before_anything_is_sent(client: Any, tmp_path: Any) -> None:
    before = len(client.jobs())
    with open(tmp_path / "f.txt", "w") as f:
        ns = notebook("")
        ns["f"] = f
        with pytest.raises(SerializationError) as info:
            run(ns, "f.write('x')")
    assert str(info.value) == (
        "variable 'f' (an open file) cannot be sent to the GPU: open it inside the cell instead"
    )
    assert len(client.jobs()) == before


def test_output_arrives_complete_and_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    run(notebook(""), """
        import os, sys, subprocess
        for i in range(3000):
            print(f"line {i}")
        sys.stdout.flush()
        os.write(1, b"from the fd\\n")
        subprocess.run(["echo", "from a subprocess"], check=True)
        print("last")
    """)
    out = capsys.readouterr().out.splitlines()
    assert out[:3000] == [f"line {i}" for i in range(3000)]
    assert out[3000:] == ["from the fd", "from a subprocess", "last"]


def test_one_long_line_of_output_arrives_whole(capsys: pytest.CaptureFixture[str]) -> None:
    # it travels in several events (each far below what the gateway takes in one line)
    ns = notebook("")
    run(ns, "print('a' * 2_500_000 + 'b' * 500_000)\nprint('next')")
    out = capsys.readouterr().out
    assert out == "a" * 2_500_000 + "b" * 500_000 + "\nnext\n"


def test_ipython_syntax_works_remotely(capsys: pytest.CaptureFixture[str]) -> None:
    ns = notebook("word = 'shell-ok'")
    run(ns, """
        !echo $word
        files = !echo listed
    """)
    assert "shell-ok" in capsys.readouterr().out
    assert list(ns["files"]) == ["listed"]


def test_input_fails_at_once_with_a_clear_message() -> None:
    with pytest.raises(RuntimeError, match="input\\(\\) is not available in a %%gpu cell"):
        run(notebook(""), "name = input('who? ')")


def test_getpass_is_named_as_what_has_no_keyboard() -> None:
    with pytest.raises(RuntimeError, match="getpass\\(\\) is not available in a %%gpu cell"):
        run(notebook(""), "import getpass\nsecret = getpass.getpass()")


def test_errors_a_cell_goes_on_from_are_shown_as_a_kernel_shows_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a trial: the runner silenced every traceback IPython reports and goes on from, so %run
    # of a failing script "succeeded" without its error, as did a failing _repr_html_
    script = tmp_path / "bad_script.py"
    script.write_text("print('script start')\nraise ValueError('script failed')\n")
    ns = notebook("")
    run(ns, f"""
        %run {script}
        class Shown:
            def _repr_html_(self):
                raise KeyError('no html')
            def __repr__(self):
                return 'Shown()'
        display(Shown())
        inner = get_ipython().run_cell('1 / 0')
        awaited = await get_ipython().run_cell_async('[][1]', transformed_cell='[][1]')
        print('went on', inner.success, awaited.success)
    """)
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "script start" and "went on False False" in out
    assert "ValueError: script failed" in err and "KeyError: 'no html'" in err
    assert "ZeroDivisionError: division by zero" in err
    assert "IndexError: list index out of range" in err
    assert ns["inner"] is not None  # (the cell itself succeeded and bound its names)
    # and under %%capture, as a kernel shows it: past the capture (which keeps the prints)
    run(ns, "%%capture cap\nprint('hidden')\n1 / 0")
    out, err = capsys.readouterr()
    assert "ZeroDivisionError: division by zero" in err and "hidden" not in out
    # the cell's own error is raised here, once, and not also printed there
    with pytest.raises(ZeroDivisionError):
        run(ns, "print('before')\n1 / 0")
    out, err = capsys.readouterr()
    assert out == "before\n" and "ZeroDivisionError" not in err


def test_load_in_a_cell_says_it_cannot_reach_the_notebook(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "snippet.py"
    source.write_text("x = 1\n")
    run(notebook(""), f"%load {source}")
    assert "which a %%gpu cell cannot do: run that line in a cell without %%gpu" \
        in capsys.readouterr().err


@pytest.mark.parametrize("stop", ["breakpoint()", "import pdb; pdb.set_trace()",
                                  "from IPython.core.debugger import set_trace; set_trace()"])
def test_a_debugger_in_a_cell_says_it_cannot_stop_there(stop: str) -> None:
    ns = notebook("")
    with pytest.raises(RuntimeError, match=r"breakpoint\(\) cannot stop a %%gpu cell") as info:
        run(ns, f"x = 1\n{stop}\ny = 2", quiet=True)
    shown = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
    assert "Cell, line 2" in shown, shown  # the cell's own line, not only the debugger's
    assert "input()" not in str(info.value)


def test_out_and_in_of_the_notebook_say_what_to_use_instead() -> None:
    ns = notebook("")
    ns["_2"] = 42  # what the notebook showed as Out[2] travels as _2
    with pytest.raises(KeyError, match=r"Out\[2\]: the notebook's Out did not travel with the "
                       r"cell; use _2 instead"):
        run(ns, "v = Out[2]", quiet=True)
    assert run(ns, "v = _2\nv", quiet=True) == 42
    with pytest.raises(IndexError, match=r"In\[2\]: the notebook's input history did not "
                       "travel"):
        run(ns, "print(In[2])", quiet=True)
    ns["In"] = [1, 2, 3]  # a plain namespace's own list of that name: sent as it is
    assert run(ns, "sum(In)", quiet=True) == 6


def test_a_thread_the_cell_leaves_running_is_said_to_stop_with_the_job(
        capsys: pytest.CaptureFixture[str]) -> None:
    # what it printed after the cell ended was lost without a word (found by a newcomer)
    ns = notebook("")
    run(ns, """
        import threading, time
        t = threading.Thread(target=lambda: (time.sleep(0.3), print("late")), name="worker")
        t.start()
        x = 1
    """, "H100")
    err = capsys.readouterr().err
    assert "the cell left 1 thread running ('worker'): it stops when the job ends" in err, err
    run(ns, "import threading\nt = threading.Thread(target=print, args=('joined',))\n"
        "t.start()\nt.join()", "H100")
    out = capsys.readouterr()
    assert "joined" in out.out and "left" not in out.err


def test_trailing_semicolon_suppresses_the_value() -> None:
    ns = notebook("")
    assert run(ns, "y = 3\ny * 2;") is None
    assert ns["y"] == 3


def test_return_and_no_return_limit_what_comes_back() -> None:
    ns = notebook("")
    run(ns, "a = 1\nb = 2", return_names=["b"])
    assert "a" not in ns and ns["b"] == 2
    ns2 = notebook("")
    run(ns2, "a = 1", no_return=True)
    assert "a" not in ns2


def test_a_return_name_the_cell_never_left_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    # a typo in --return used to bring back nothing, silently: the cell's work was lost
    ns = notebook("")
    run(ns, "model = [1, 2]\nloss = 0.1", return_names=["modle", "loss"])
    assert ns["loss"] == 0.1 and "model" not in ns
    err = capsys.readouterr().err
    assert "modle was not brought back" in err and "did you mean model?" in err, err


def test_a_name_made_and_deleted_inside_the_cell_is_not_reported_deleted() -> None:
    # `except E as exc` deletes exc at the end of the block: nothing of the notebook's went
    ns = notebook("x = 1")
    job = run(ns, "try:\n    1 / 0\nexcept ZeroDivisionError as exc:\n    y = 2\ndel x",
              background=True, quiet=True)
    job.wait()
    assert ns["y"] == 2 and "x" not in ns and "exc" not in ns
    assert job._job.state.deleted == ["x"]


def test_background_jobs_keep_what_the_user_reassigned(
        capsys: pytest.CaptureFixture[str]) -> None:
    # a module imported here too is the same object: not "reassigned since submitting"
    ns = notebook("")
    first = run(ns, "import math\nt0 = 1", background=True, quiet=True)
    first.wait()
    import math
    ns["math"] = math
    job = run(ns, "import math\nt0 = 3\nmine = 'job'", background=True, quiet=True)
    ns["mine"] = "user"
    job.wait()
    assert ns["t0"] == 3 and ns["mine"] == "user"  # what the user did reassign is kept
    err = capsys.readouterr().err
    assert "kept your mine: reassigned here" in err and "math" not in err


def test_dry_run_reports_inputs_and_sends_nothing(client: Any) -> None:
    before = len(client.jobs())
    ns = notebook("""
        import numpy as np
        arr = np.ones(100_000)
        def f(x): return x
    """)
    report = run(ns, "f(arr).sum() + np.pi", dry_run=True)
    rows = {r["name"]: r for r in report["inputs"]}
    assert set(rows) == {"arr", "f", "np"}
    assert rows["np"]["travels"] == "by reference"
    assert rows["f"]["travels"] == "by value"
    assert rows["arr"]["bytes"] >= 800_000
    assert "arr" in repr(report)
    assert len(client.jobs()) == before


def test_decorator_runs_the_function_remotely() -> None:
    ns = notebook("""
        import os
        import gpu_magic
        @gpu_magic.gpu("A100-80GB")
        def where(x):
            return os.environ["GPU_MAGIC_GRANT"], x + 1
    """)
    grant, y = ns["where"](41)
    assert json.loads(grant)["type"] == "A100-80GB" and y == 42


def test_instances_of_a_class_a_cell_made_do_not_come_back_from_a_cell_that_reads_them(
) -> None:
    # the next cell on the same warm runner numbered the class's code again before it ran:
    # its instances read as changed, and came back ("bound k, kd") from a cell that printed
    ns = notebook("")
    run(ns, """

        class K:
            def __init__(self, v): self.v = v
        k = K(1)
        kd = {"a": K(2)}
    """, "H100:2")  # (both GPUs: the next cell takes the same warm runner)
    for _ in range(2):
        job = run(ns, "print(k.v, kd['a'].v)", "H100:2", background=True, quiet=True)
        job.wait(timeout=60)
        assert job._job.state.bound == [], job._job.state.bound


def test_a_decorator_s_bad_spec_is_refused_where_it_is_written_or_called() -> None:
    # it was taken, and each call failed below six frames of gpu_magic's own
    with pytest.raises(SpecError, match="'H100:0' asks for 0 GPUs") as info:
        gpu_magic.gpu("H100:0")
    frames = [f.name for f in traceback.extract_tb(info.tb)]  # none of the parser's own
    assert frames == ["test_a_decorator_s_bad_spec_is_refused_where_it_is_written_or_called",
                      "gpu"], frames
    # a type this pool may name (its own simulated 'H1000') is asked of it at the call
    ns = notebook("""
        import gpu_magic
        @gpu_magic.gpu("H1000")
        def f():
            return 1
    """)
    with pytest.raises(SpecError, match="'H1000' is not a GPU type; did you mean H100") as info:
        ns["f"]()
    frames = [f.name for f in traceback.extract_tb(info.tb)]
    assert frames == ["test_a_decorator_s_bad_spec_is_refused_where_it_is_written_or_called",
                      "call"], frames


def test_a_decorator_s_bad_options_are_refused_where_it_is_written() -> None:
    # they were taken, and each call failed (a ValueError from inside submit)
    with pytest.raises(ValueError, match=r"^@gpu_magic.gpu: timeout=-5: the cell's time limit"):
        gpu_magic.gpu("T4", timeout=-5)
    with pytest.raises(TypeError, match="@gpu_magic.gpu has no option timout=5; did you mean "
                                        "timeout=") as info:
        gpu_magic.gpu("T4", timout=5)
    assert [f.name for f in traceback.extract_tb(info.tb)] == [
        "test_a_decorator_s_bad_options_are_refused_where_it_is_written", "gpu"]
    with pytest.raises(ValueError, match="env CUDA_VISIBLE_DEVICES: the grant sets this"):
        gpu_magic.gpu("T4", env={"CUDA_VISIBLE_DEVICES": "1"})
    assert callable(gpu_magic.gpu("T4", timeout=5, quiet=False))


def _shown_error(ns: dict[str, Any], cell: str, kind: type[BaseException]) -> str:
    """The traceback a notebook shows for the cell's remote error of this kind."""
    with pytest.raises(kind) as info:
        run(ns, cell, quiet=True)
    return "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]


def test_a_name_the_cell_reads_only_inside_a_string_is_named_with_the_fix() -> None:
    # the README's trial: x = 41 here, `y = eval("x") + 1` there gave a bare NameError
    text = _shown_error(notebook("x = 41"), 'y = eval("x") + 1', NameError)
    assert ("x is defined in your notebook, but the cell names it only where reading its code "
            "cannot see (inside a string: eval, exec, globals()[...]), so it was not sent: name "
            "it once in the cell's code (x on a line of its own)") in text, text
    # a name the notebook does not have either is the cell's own mistake: nothing added
    assert "notebook" not in _shown_error(notebook(""), 'y = eval("x") + 1', NameError)


def test_a_variable_set_only_in_this_kernel_s_environment_is_named_with_the_fix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a bare KeyError: 'MY_KEY' from a cell whose kernel has MY_KEY set
    monkeypatch.setenv("GPU_MAGIC_TEST_ONLY_HERE", "abc")
    text = _shown_error(notebook("import os"), "key = os.environ['GPU_MAGIC_TEST_ONLY_HERE']",
                        KeyError)
    assert ("GPU_MAGIC_TEST_ONLY_HERE is set in this kernel's environment, but environment "
            "variables do not travel with the cell: pass it with --env GPU_MAGIC_TEST_ONLY_HERE "
            "(this kernel's value) or --env GPU_MAGIC_TEST_ONLY_HERE=VALUE") in text, text
    # a dict's KeyError that happens to name a variable set here says nothing of it
    assert "--env" not in _shown_error(notebook(""), "d = {}\nd['GPU_MAGIC_TEST_ONLY_HERE']",
                                       KeyError)


def test_a_decorated_function_changes_its_arguments_as_a_local_call_does() -> None:
    # DESIGN: `train(model)` must bring `model` back
    ns = notebook("""
        import gpu_magic
        @gpu_magic.gpu("H100", quiet=False)
        def train(history, model, *more, steps, **options):
            for _ in range(steps):
                history.append(len(history))
            model["w"] += options["step"]
            more[0].add("seen")
            return "done"
        history, model, tags = [], {"w": 0}, set()
    """)
    history, model, tags = ns["history"], ns["model"], ns["tags"]
    np = pytest.importorskip("numpy")
    names = dict(zip(np.array(["steps", "step"]), [2, 5]))  # keys that are str subclasses
    assert ns["train"](history, model, tags, **names) == "done"
    assert history == [0, 1] and model == {"w": 5} and tags == {"seen"}
    assert (ns["history"], ns["model"], ns["tags"]) == (history, model, tags)  # nothing rebound


def test_a_return_value_that_cannot_come_back_is_an_error_not_none(
        capsys: pytest.CaptureFixture[str]) -> None:
    # the researcher's trial: a decorated function returning {"acc": 0.9, "lock": Lock()}
    # returned None, and the next line failed far from the cause
    ns = notebook("""
        import gpu_magic, threading
        @gpu_magic.gpu("H100")
        def train_and_log(buf):
            buf.append("trained")
            return {"acc": 0.9, "lock": threading.Lock()}
        buf = []
    """)
    with pytest.raises(SerializationError) as info:
        ns["train_and_log"](ns["buf"])
    text = str(info.value)
    assert "train_and_log()'s return value cannot come back: dict (['lock']: a thread lock)" \
        in text, text
    assert ns["buf"] == ["trained"]  # what the call changed came back, as locally
    assert "was not brought back" not in capsys.readouterr().err  # said once, in the error
    with pytest.raises(SerializationError, match="the value of the cell's last expression"):
        run(notebook(""), "import threading\nthreading.Lock()", "H100", quiet=True)
    # a %%gpu cell only shows its value: its names are bound and the note says why not it
    ns2 = notebook("")
    job = run(ns2, "import threading\nv = 1\nthreading.Lock()", "H100", quiet=True,
              show_value=True, background=True)
    assert job.wait() is None and ns2["v"] == 1
    # attached again, where it is not known whether a cell or a call made it: a note, as a
    # cell says it (a review: attach raised for a %%gpu cell's value)
    ns3 = notebook("")
    assert attach(job.id, ns3, quiet=True) is None and ns3["v"] == 1


def test_a_decorated_call_says_nothing_of_its_own_names(
        capsys: pytest.CaptureFixture[str]) -> None:
    ns = notebook("""
        import gpu_magic
        @gpu_magic.gpu("H100")
        def fill(items):
            items.append(x for x in range(3))  # cannot come back: the caller's list stays
            return len(items)
        items = []
    """)
    assert ns["fill"](ns["items"]) == 1 and ns["items"] == []
    assert "__gpu_" not in capsys.readouterr().err
    # nor does its error: the call it made of the function is no line of the user's
    ns2 = notebook("""
        import gpu_magic
        @gpu_magic.gpu("H100")
        def boom(x):
            return 1 / x
    """)
    with pytest.raises(ZeroDivisionError) as info:
        ns2["boom"](0)
    shown = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
    assert "__gpu_" not in shown and "in boom" in shown, shown


@pytest.mark.parametrize(
    ("health", "message"),
    [
        ({"python": "2.7.18", "client_python": False},
         "the GPU runner has Python 2.7 but this kernel has {ours}; cloudpickle needs the same "
         "minor version on both sides. Use a kernel with Python 2.7, or ask the gateway's admin "
         "for one with yours."),
    ],
)
def test_python_version_mismatch_is_refused(health: dict[str, Any], message: str) -> None:
    import platform

    ours = ".".join(platform.python_version_tuple()[:2])
    with pytest.raises(EnvironmentMismatch) as info:
        _check_environment(health)
    assert str(info.value) == message.format(ours=ours)


def test_same_python_and_client_python_pass() -> None:
    import platform

    _check_environment({"python": platform.python_version(), "client_python": False,
                        "packages": {}, "wire_format": WIRE_FORMAT})
    _check_environment({"python": "2.7.18", "client_python": True})


@pytest.mark.parametrize("wire, said", [(None, "from before wire formats"),
                                        (WIRE_FORMAT + 1, f"wire format {WIRE_FORMAT + 1}")])
def test_a_gateway_whose_runners_write_other_pickles_is_refused(wire: int | None,
                                                                said: str) -> None:
    # a version-skew trial: a hub's kernel and its GPU box a day apart lost a cell's results
    # after it ran, or failed with "Can't get attribute '_code_in_file'" before
    import platform

    health = {"python": platform.python_version(), "client_python": False, "packages": {},
              "version": "0.0.9", "wire_format": wire}
    with pytest.raises(EnvironmentMismatch) as info:
        _check_environment(health)
    assert str(info.value) == (
        f"the gateway runs cells with gpu_magic 0.0.9 ({said}), and this kernel has gpu_magic "
        f"{gpu_magic.__version__} (wire format {WIRE_FORMAT}): they cannot read each other's "
        "inputs and results. Install gpu-magic==0.0.9 here and restart the kernel, or ask "
        "whoever runs the gateway to run this kernel's version.")


def test_names_that_cannot_come_back_are_skipped_and_said(capsys: pytest.CaptureFixture[str]) -> None:
    ns = notebook("gen = 'old value'")
    # (show_value: as a %%gpu cell, which shows its value; run() raises about it instead)
    value = run(ns, "import threading\nlock = threading.Lock()\nx = 1\n"
                    "gen = (i for i in range(x))\nthreading.Lock()", show_value=True)
    assert ns["x"] == 1 and "lock" not in ns
    assert value is None
    err = capsys.readouterr().err
    assert ("[gpu_magic] lock was not brought back: a thread lock cannot be sent back, so it "
            "stayed on the GPU machine; `del lock` at the end of the cell, or list what to "
            "bring back with --return, to leave it there without this note; here lock is not "
            "defined\n") in err
    # a local run would have rebound it: the old value here is said, not found later
    assert ns["gen"] == "old value"
    assert ("[gpu_magic] gen was not brought back: a generator cannot be sent back, so it "
            "stayed on the GPU machine; `del gen` at the end of the cell, or list what to "
            "bring back with --return, to leave it there without this note; here gen still "
            "holds its value from before the cell\n") in err
    # listed in --return already: not told to list it there
    run(ns, "import threading\nlock = threading.Lock()", return_names=["lock"])
    assert ("[gpu_magic] lock was not brought back: a thread lock cannot be sent back, so it "
            "stayed on the GPU machine; leave lock out of --return to leave it there without "
            "this note; here lock is not defined\n") in capsys.readouterr().err
    # with the text a local cell would have shown for it
    assert re.search(r"\[gpu_magic\] <cell value> was not brought back: lock \(a thread lock\) "
                     r"cannot be pickled; it was <unlocked _thread.lock object at 0x[0-9a-f]+>",
                     err), err


def test_a_file_closed_by_its_with_block_is_left_there_without_a_note(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `with open(...) as fw:` leaves fw bound to a closed file: a three-line note after every
    # such cell said it "cannot be sent back" (the researcher's trial)
    ns = notebook(f"path = {str(tmp_path / 'log.txt')!r}")
    run(ns, "with open(path, 'w') as fw:\n    fw.write('x')\nn = 1", quiet=True)
    assert ns["n"] == 1 and "fw" not in ns and (tmp_path / "log.txt").read_text() == "x"
    assert "was not brought back" not in capsys.readouterr().err
    # one still open is said, as before
    run(ns, "fw = open(path)\nn = 2", quiet=True)
    assert ns["n"] == 2 and "fw was not brought back: an open file" in capsys.readouterr().err


def test_unchanged_inputs_are_not_sent_again_even_after_the_gateway_dropped_them(
        use_gateway: Any) -> None:
    import secrets

    from gpu_magic._api import submit

    ns = notebook("pass")
    ns["blob"] = secrets.token_bytes(5000)
    with use_gateway.client() as c:
        def once() -> Any:
            job = submit("n = len(blob)", "H100", ns, client=c)
            job.follow()
            assert job.outcome() is None and ns.pop("n") == 5000
            return job.state

        first = once()
        assert first.sent_bytes > 5000 and first.reused == 0
        again = once()
        assert again.sent_bytes == 0  # (its bytes are in the pickle: no data buffer to count)
        # the gateway's retention dropped it meanwhile: refused, sent, run; nothing lost
        for d in c.known:
            for f in use_gateway.state_dir.glob(f"blobs/*/{d.replace(':', '-')}"):
                f.unlink()
        third = once()
        assert third.sent_bytes > 5000
        # the pickle of the names is not counted as a reused buffer: a cell with no inputs
        # read "1 input buffer reused" when run again
        for _ in range(2):
            job = submit("k = 1", "H100", ns, client=c)
            job.follow()
            assert job.outcome() is None and job.state.reused == 0


def test_an_unchanged_tensor_is_not_sent_again_beside_a_changed_input(
        use_gateway: Any) -> None:
    pytest.importorskip("torch")
    from gpu_magic._api import submit

    ns = notebook("import torch\nweights = torch.randn(250_000)\nstep = 0")
    expected = float(ns["weights"].sum())
    with use_gateway.client() as c:
        def once() -> Any:
            ns["step"] += 1
            job = submit("total = float(weights.sum()) + step", "H100", ns, client=c)
            job.follow()
            assert job.outcome() is None
            assert ns.pop("total") == pytest.approx(expected + ns["step"], rel=1e-6)
            return job.state

        first = once()
        assert first.sent_bytes > 1_000_000
        again = once()  # a new step: a new small pickle, the tensor's megabyte stays there
        assert 0 < again.sent_bytes < 10_000 and again.reused == 1


def _cell_in_a_child(url: str, token: str) -> Any:
    from gpu_magic._client import GatewayClient

    with GatewayClient(url, token) as c:
        return gpu_magic.run("y = 1 + 1\ny", "H100", {"__name__": "__main__"}, client=c,
                             quiet=True)


def test_a_forked_child_can_run_cells(use_gateway: Any) -> None:
    # the parent's kept event-stream threads and connections do not cross a fork: a child
    # (multiprocessing's default on Linux) must start its own instead of waiting forever
    import multiprocessing

    with use_gateway.client() as c:
        assert gpu_magic.run("1 + 1", "H100", {"__name__": "__main__"}, client=c, quiet=True) == 2
    with multiprocessing.get_context("fork").Pool(1) as pool:
        result = pool.apply_async(_cell_in_a_child, (use_gateway.url, use_gateway.token))
        assert result.get(timeout=60) == 2


def test_a_background_job_s_output_so_far_can_be_read(tmp_path: Any) -> None:
    # so that a notebook can wait for a line (a teaching notebook cancels after "started")
    flag = tmp_path / "go"
    ns = notebook(f"FLAG = {str(flag)!r}")
    job = run(ns, "import os, sys, time\nprint('started', flush=True)\n"
                  "print('warned', file=sys.stderr, flush=True)\n"
                  "while not os.path.exists(FLAG):\n    time.sleep(0.02)\nprint('done')",
              background=True, quiet=True)
    try:
        # (stdout and stderr are two pipes: their order between them is not kept)
        wait_for(lambda: "warned" in job.output and "started" in job.output, 30)
        assert len(job.output) == len("started\nwarned\n") and not job.done()
    finally:
        flag.touch()  # never leave the job holding its GPU for the next tests
    job.wait(timeout=30)
    assert job.output.endswith("done\n") and len(job.output) == len("started\nwarned\ndone\n")


def test_a_huge_exception_is_still_the_cell_s_own() -> None:
    # a 5 MB message, or a recursion 20,000 deep, made the error event too large, and the
    # user got "the runner sent a malformed error" instead of their exception
    ns = notebook("")
    with pytest.raises(ValueError) as info:
        run(ns, "raise ValueError('x' * 5_000_000)")
    assert str(info.value) == "x" * 5_000_000  # the exception itself travels whole
    with pytest.raises(RecursionError) as deep:
        run(ns, "import sys\nsys.setrecursionlimit(30_000)\n"
                "def down(n):\n    return down(n + 1)\ndown(0)")
    shown = "\n".join(deep.value._render_traceback_())  # type: ignore[attr-defined]
    assert "more frames cut" in shown and shown.count("in down") <= 400


def test_decorated_functions_calling_decorated_functions_run_in_the_same_job() -> None:
    # each call inside a job submitted a job of its own, holding a GPU while waiting for the
    # next: fact(3) on a pool of two H100s waited for good
    ns = notebook("""
        import os
        import gpu_magic

        # (wait=: without the fix, a test that fails, not one that hangs)
        @gpu_magic.gpu("H100", wait=20)
        def fact(n):
            return 1 if n <= 1 else n * fact(n - 1)

        @gpu_magic.gpu("H100", wait=20)
        def where():
            return os.environ["GPU_MAGIC_JOB_ID"]

        @gpu_magic.gpu("H100", wait=20)
        def outer():
            return os.environ["GPU_MAGIC_JOB_ID"], where()
    """)
    assert ns["fact"](5) == 120
    mine, inner = ns["outer"]()
    assert mine == inner  # one job


def test_a_generator_or_coroutine_cannot_be_decorated() -> None:
    with pytest.raises(TypeError, match="it is a generator function, and a GPU job gives back "
                                        "one value; return a list") as refused:
        @gpu_magic.gpu("H100")
        def gen(n):  # noqa: ANN001, ANN202
            yield from range(n)
    # IPython shows its one line, not gpu_magic's own frame (a newcomer's trial)
    assert refused.value._render_traceback_() == [  # type: ignore[attr-defined]
        f"TypeError: {refused.value}"]
    with pytest.raises(TypeError, match=r"a coroutine function \(async def\)"):
        @gpu_magic.gpu("H100")
        async def co():  # noqa: ANN202
            return 1


def test_a_remote_error_shows_where_it_was_raised_in_plain_python(tmp_path: Any) -> None:
    # outside IPython the traceback named only gpu_magic's own frames
    import subprocess
    import sys

    script = textwrap.dedent("""
        import gpu_magic
        def helper(y):
            return {}[y]
        gpu_magic.run("a = 1\\nb = helper(a + 1)", "H100", {"helper": helper, "__name__": "__main__"})
    """)
    (tmp_path / "train.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "train.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.rstrip().splitlines()[-1] != "KeyError: 2"
    assert "raised remotely on H100" in proc.stderr and "line 2" in proc.stderr
    assert "return {}[y]" in proc.stderr, proc.stderr


def test_an_instance_with_slots_changed_in_place_stays_the_notebook_s() -> None:
    # its new state failed to load here ("'S' object has no attribute '__dict__'"), and with
    # it every name of the cell
    ns = notebook("""
        class S:
            __slots__ = ("v", "w")
            def __init__(self):
                self.v = 1
        s = S()
        alias = s
    """)
    run(ns, "s.v = 2\ns.w = 'new'\nother = 3")
    assert ns["s"] is ns["alias"] and (ns["s"].v, ns["s"].w, ns["other"]) == (2, "new", 3)


def test_fortran_ordered_and_memory_mapped_arrays_are_changed_in_place(tmp_path: Any) -> None:
    # they came back as new, detached arrays: a memmap's file never saw the change
    path = tmp_path / "mm.bin"
    np.arange(10.0).tofile(path)
    mm = np.memmap(path, dtype=np.float64, mode="r+", shape=(10,))
    fo = np.asfortranarray(np.zeros((2, 3)))
    ns = notebook("")
    ns.update(mm=mm, fo=fo)
    run(ns, "mm[0] = -1\nfo[0, 1] = 3")
    assert ns["mm"] is mm and ns["fo"] is fo
    assert fo[0, 1] == 3 and fo.flags.f_contiguous
    mm.flush()
    assert np.fromfile(path)[0] == -1


def test_a_cell_that_only_reads_instances_changes_neither_them_nor_their_classes() -> None:
    # pickling an instance makes copyreg cache __slotnames__ on its class: taking the state
    # before the cell did that, so a class a cell only read (and its instances) came back as
    # changed by it, named in the "bound" line
    ns = notebook("""
        class Animal:
            def __init__(self, name):
                self.name = name
            def speak(self):
                return self.name + " ..."
        class Dog(Animal):
            def speak(self):
                return self.name + " woof"
        pets = [Dog("rex"), Animal("tom")]
    """)
    job = run(ns, "said = [a.speak() for a in pets if isinstance(a, Animal)]",
              background=True, quiet=True)
    job.wait(timeout=60)
    assert sorted(job.result) == ["said"]
    assert ns["said"] == ["rex woof", "tom ..."]


def test_dates_and_durations_travel_and_are_changed_in_place() -> None:
    # numpy's datetime64 and timedelta64 export no buffer: every cell using one (a pandas
    # frame with a date column, too) failed with "cannot include dtype 'M' in a buffer"
    stamps = np.arange(6).astype("datetime64[s]")
    waits = np.arange(100_000).astype("timedelta64[ms]").reshape(1000, 100).T  # large, F-order
    table = np.zeros(3, dtype=[("t", "datetime64[D]"), ("v", "f8")])
    ns = notebook("import numpy as np")
    ns.update(stamps=stamps, waits=waits, table=table)
    latest = run(ns, "stamps[0] = stamps[-1]\nwaits[0, 0] = waits.max()\n"
                     "table['t'][1] = np.datetime64('2024-02-29')\nstamps.max()")
    assert latest == np.datetime64(5, "s")
    assert ns["stamps"] is stamps and ns["waits"] is waits and ns["table"] is table
    assert stamps[0] == np.datetime64(5, "s")
    assert waits[0, 0] == np.timedelta64(99_999, "ms") and waits.flags.f_contiguous
    assert table["t"][1] == np.datetime64("2024-02-29")


def test_a_folder_the_notebook_added_to_sys_path_is_on_the_runner_s_too(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # `sys.path.append("../src")` is how notebooks reach their project's modules: the cell
    # failed with ModuleNotFoundError (and a hint to install what is the kernel's own Python)
    src = tmp_path / "src"
    src.mkdir()
    (src / "labtools_on_path.py").write_text("SCALE = 7\n")
    monkeypatch.syspath_prepend(str(src))
    ns = notebook("")
    assert run(ns, "import labtools_on_path\nlabtools_on_path.SCALE * 2") == 14


def test_python_api_mistakes_are_named() -> None:
    ns = notebook("")
    with pytest.raises(TypeError, match=r"has no option timout=5; did you mean timeout=\?"):
        run(ns, "1", timout=5)
    import types

    with pytest.raises(TypeError, match="namespace must be a dict .*not SimpleNamespace"):
        gpu_magic.run("1", None, types.SimpleNamespace())  # type: ignore[arg-type]
    # (bytes failed inside the cell's analysis: "a bytes-like object is required")
    with pytest.raises(TypeError, match=r"^source must be a str \(the cell's code\), not "
                                        r"bytes: decode it first \(source.decode\(\)\)$"):
        gpu_magic.run(b"1+1", "H100", {})  # type: ignore[arg-type]


def test_a_chainmap_namespace_still_works() -> None:
    # any mutable mapping serves as a namespace (the dict check refused ChainMap)
    import collections

    ns = collections.ChainMap({}, {"a": 3, "__name__": "__main__"})
    gpu_magic.run("b = a * 2", "H100", ns, quiet=True)
    assert ns["b"] == 6


def test_cell_namespace_is_main_for_pickle_and_process_pools() -> None:
    # a kernel's cell namespace is __main__'s: pickle finds the cell's own functions and
    # classes by name there, which process pools and DataLoader workers need
    ns = notebook("""
        class Net:
            def __init__(self):
                self.w = [1, 2]
        net = Net()
    """)
    run(ns, """
        import multiprocessing, pickle
        from concurrent.futures import ProcessPoolExecutor
        def square(v):
            return v * v
        class Point:
            pass
        with multiprocessing.Pool(2) as pool:
            squares = pool.map(square, range(5))
        with ProcessPoolExecutor(2) as ex:
            cubes = list(ex.map(square, [2, 3]))
        point_size = len(pickle.dumps(Point()))
        # a notebook class the cell never names (torch.save of a model does this)
        copied = pickle.loads(pickle.dumps(net)).w
        del pool, ex
    """, "H100", quiet=True)
    assert ns["squares"] == [0, 1, 4, 9, 16] and ns["cubes"] == [4, 9]
    assert ns["point_size"] > 0 and ns["copied"] == [1, 2]


def test_stdin_says_there_is_no_keyboard_however_it_is_read() -> None:
    ns = notebook("")
    for read in ("sys.stdin.read()", "sys.stdin.readline()", "next(iter(sys.stdin))"):
        with pytest.raises(RuntimeError, match="no keyboard"):
            run(ns, f"import sys\n{read}", "H100", quiet=True)
    run(ns, "import sys\nsys.stdin.close()\nok = sys.stdin.isatty() is False", "H100", quiet=True)
    assert ns["ok"] is True


def test_matplotlib_inline_magic_works_and_a_window_toolkit_is_refused() -> None:
    pytest.importorskip("matplotlib")
    ns = notebook("")
    run(ns, "%matplotlib inline\nimport matplotlib\nbackend = matplotlib.get_backend()", "H100",
        quiet=True)
    assert "inline" in ns["backend"]
    with pytest.raises(Exception, match=r"no screen.*%matplotlib inline"):
        run(ns, "get_ipython().enable_gui('qt')", "H100", quiet=True)  # (what %matplotlib qt asks)


def test_an_exception_raised_from_another_shows_both_as_python_does() -> None:
    ns = notebook("")
    with pytest.raises(RuntimeError) as info:
        run(ns, """
            try:
                1 / 0
            except Exception as e:
                raise RuntimeError("wrapped") from e
        """, "H100", quiet=True)
    shown = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
    first, _, then = shown.partition("The above exception was the direct cause")
    assert "ZeroDivisionError: division by zero" in first and "1 / 0" in first
    assert "RuntimeError: wrapped" in then and "raised remotely" in then
    assert "division by zero" in str(info.value.__cause__)
    with pytest.raises(ValueError) as info2:
        run(ns, """
            try:
                {}["k"]
            except KeyError:
                int("x")
        """, "H100", quiet=True)
    shown = "\n".join(info2.value._render_traceback_())  # type: ignore[attr-defined]
    assert "KeyError: 'k'" in shown.partition("During handling of the above exception")[0]
    assert "KeyError" in str(info2.value.__context__)
    with pytest.raises(ValueError) as info3:  # `from None` shows the last one only
        run(ns, "try:\n    1 / 0\nexcept Exception:\n    raise ValueError('v') from None",
            "H100", quiet=True)
    assert "ZeroDivision" not in "\n".join(info3.value._render_traceback_())  # type: ignore[attr-defined]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="add_note is 3.11's")
def test_notes_added_to_an_exception_are_shown_under_its_message_as_python_does() -> None:
    ns = notebook("")
    with pytest.raises(ValueError) as info:
        run(ns, """
            try:
                int("x")
            except ValueError as inner:
                inner.add_note("while reading the config")
                raise ValueError("bad row") from inner
        """, "H100", quiet=True)
    shown = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
    first, _, then = shown.partition("The above exception was the direct cause")
    assert "invalid literal" in first
    assert first.rstrip().endswith("while reading the config"), first
    assert then.rstrip().endswith("ValueError: bad row"), then
    with pytest.raises(KeyError) as info2:
        run(ns, "e = KeyError('k')\ne.add_note('first')\ne.add_note('second')\nraise e",
            "H100", quiet=True)
    shown = "\n".join(info2.value._render_traceback_())  # type: ignore[attr-defined]
    assert shown.rstrip().endswith("KeyError: 'k'\nfirst\nsecond"), shown
    assert info2.value.__notes__[:2] == ["first", "second"]  # (then ours: where it was raised)


def test_a_coloured_remote_traceback_leaves_notes_and_logs_plain() -> None:
    # a review: with the notebook's colours the rule was no longer found, and the note plain
    # Python and logging print held the whole chain, escape codes and all
    from gpu_magic._errors import RemoteError
    from gpu_magic._remote import rebuild, render_traceback

    def frame(line: str, lineno: int) -> dict[str, Any]:
        return {"filename": "c", "lineno": lineno, "name": "<module>", "line": line,
                "cell": True}

    source = "try:\n    {}['k']\nexcept KeyError as e:\n    raise ValueError('bad row') from e"
    event = {"ename": "ValueError", "evalue": "bad row",
             "traceback": [frame("raise ValueError('bad row') from e", 4)],
             "chain": [{"ename": "KeyError", "evalue": "'k'", "cause": True,
                        "traceback": [frame("{}['k']", 2)]}]}
    lines = render_traceback(event, source, theme="linux")
    assert any("\x1b[" in line for line in lines)  # (coloured, as the notebook shows it)
    exc = rebuild(event, ValueError("bad row"), lines)
    assert exc._render_traceback_() == lines  # type: ignore[attr-defined]
    [note] = exc.__notes__
    assert "\x1b" not in note and "KeyError: 'k'" not in note, note  # (its own block only)
    assert "raise ValueError('bad row') from e" in note, note
    lost = rebuild(event, None, lines)
    assert isinstance(lost, RemoteError) and lost._render_traceback_() == lines
    assert "\x1b" not in lost.traceback_text and "KeyError: 'k'" in lost.traceback_text
    assert pickle.loads(pickle.dumps(lost))._render_traceback_() == lines


def test_cached_functions_new_types_and_cached_properties_of_the_notebook_travel() -> None:
    # they pickle by name, which names nothing where the cell runs: "Can't get attribute"
    ns = notebook("""
        import functools, typing
        @functools.lru_cache(maxsize=None)
        def fib(k): return k if k < 2 else fib(k - 1) + fib(k - 2)
        @functools.cache
        def square(x): return x * x
        def uses_square(x): return square(x) + 1
        UserId = typing.NewType("UserId", int)
        class Svc:
            @functools.lru_cache(maxsize=8)
            def get(self, k): return k * 10
            @functools.cached_property
            def heavy(self): return sum(range(10))
        svc = Svc()
    """)
    run(ns, """
        f = fib(30)
        u = uses_square(3)
        uid = UserId(5)
        g = svc.get(4)
        h = svc.heavy
        info = fib.cache_info().misses
        @functools.lru_cache(maxsize=4)
        def made_there(x): return -x
        name = fib.__name__, fib.__wrapped__.__name__
    """, "H100", quiet=True)
    assert (ns["f"], ns["u"], ns["uid"], ns["g"], ns["h"]) == (832040, 10, 5, 40, 45)
    assert ns["info"] == 31  # a real cache there: each k computed once
    assert ns["name"] == ("fib", "fib")
    assert ns["made_there"](3) == -3 and ns["made_there"].cache_info().maxsize == 4
    assert ns["svc"].heavy == 45 and ns["fib"](10) == 55


def test_names_a_cell_looks_up_by_string_in_globals_are_sent() -> None:
    # a trial: `if "model" not in globals(): model = build()` built a new model and bound it
    # over the trained one, and `globals().get("runs", 0) + 1` counted from 0 each time
    ns = notebook("model = ['trained']\nruns = 3")
    trained = ns["model"]
    run(ns, """
        if "model" not in globals():
            model = ["new"]
        runs = globals().get("runs", 0) + 1
        fresh = "absent" in globals()
    """)
    assert ns["model"] is trained and ns["runs"] == 4 and ns["fresh"] is False


def test_classes_that_register_their_subclasses_are_not_registered_twice() -> None:
    # a trial: making A again where the cell ran ran __init_subclass__ (and a metaclass's
    # __new__) again, and that came back: Plugin.order was ['A', 'A', 'B'], registry["A"]
    # a copy of A
    ns = notebook("""
        class Plugin:
            registry = {}
            order = []
            def __init_subclass__(cls, **kw):
                super().__init_subclass__(**kw)
                Plugin.registry[cls.__name__] = cls
                Plugin.order.append(cls.__name__)
        class A(Plugin):
            pass
        class Meta(type):
            made = []
            def __new__(mcs, name, bases, ns):
                Meta.made.append(name)
                return super().__new__(mcs, name, bases, ns)
        class WithMeta(metaclass=Meta):
            pass
    """)
    A = ns["A"]
    run(ns, """
        class B(Plugin):
            pass
        class Other(WithMeta):
            pass
        inside = list(Plugin.order), list(Meta.made)
        a = A()
    """)
    assert ns["inside"] == (["A", "B"], ["WithMeta", "Other"])  # as in a local cell
    assert ns["Plugin"].order == ["A", "B"] and ns["Meta"].made == ["WithMeta", "Other"]
    assert ns["Plugin"].registry["A"] is A and ns["Plugin"].registry["B"] is ns["B"]
    assert isinstance(ns["a"], A)


def test_singledispatch_functions_of_the_notebook_travel_and_come_back() -> None:
    # a trial: "cannot be sent: show.register (closure variable dispatch_cache)... a
    # ReferenceType object", for a standard decorator
    ns = notebook("""
        import functools
        @functools.singledispatch
        def show(x):
            "Say what x is."
            return "thing"
        @show.register
        def _(x: int):
            return "int" if x < 10 else show(str(x))  # (calls itself by its name)
        @show.register(list)
        def _(x):
            return "[" + ", ".join(show(v) for v in x) + "]"
        show.tag = "mine"
        def describe(v): return show(v)
    """)
    run(ns, """
        said = [show(1), show(12), show("s"), show([1, 2.0]), describe(3)]
        about = (show.__name__, show.__doc__, show.tag, show.__wrapped__.__name__)
        @show.register(float)
        def _(x):
            return "float"
        after = show(2.0)
    """, "H100", quiet=True)
    assert ns["said"] == ["int", "thing", "thing", "[int, thing]", "int"]
    assert ns["about"] == ("show", "Say what x is.", "mine", "show")
    assert ns["after"] == "float" and ns["show"](2.0) == "float" and ns["show"](3) == "int"


def test_a_name_the_cell_binds_before_deleting_it_is_not_sent_but_still_deleted() -> None:
    # its value is never read there: an unpicklable one must not stop the cell
    ns = notebook("import threading\nx = threading.Lock()\ny = threading.Lock()")
    run(ns, "x = 1\ndel x\nz = 2", "H100", quiet=True)
    assert "x" not in ns and ns["z"] == 2  # deleted, as a local run deletes it
    lock = ns["y"]
    run(ns, "try:\n    pass\nexcept ValueError as y:\n    pass", "H100", quiet=True)
    assert ns["y"] is lock  # no exception: the handler never bound (nor deleted) y
    run(ns, "try:\n    int('a')\nexcept ValueError as y:\n    pass", "H100", quiet=True)
    assert "y" not in ns  # Python deletes the handler's name
    ns["w"], ns["flag"] = lock, False
    report = run(ns, "w = 3\ndel w", "H100", dry_run=True)
    assert "cannot be sent" not in str(report)
    (row,) = report["inputs"]  # shown as what it is, and not sent (it read "NotSent, by value")
    assert row["type"] == "lock" and row["travels"].startswith("not sent"), row
    assert "NotSent" not in str(report)
    run(ns, "if flag:\n    w = 1\n    del w", "H100", return_names=["w"], quiet=True)
    assert ns["w"] is lock  # never bound there: the stand-in does not come back
    with pytest.raises(SerializationError, match="thread lock"):  # maybe unbound: read
        run(ns, "if flag:\n    w = 1\ndel w", "H100", quiet=True)
    # a notebook function the cell calls first reads the notebook's value: sent as it is
    # (found by a review: the function met the stand-in)
    ns2 = notebook("v = 41\ndef g(): return v + 1")
    run(ns2, "r = g()\nv = 0\ndel v", "H100", quiet=True)
    assert ns2["r"] == 42 and "v" not in ns2
    ns2["v"] = 5
    run(ns2, "r = eval('v')\nv = 0\ndel v", "H100", quiet=True)  # read by name: sent
    assert ns2["r"] == 5


def test_a_local_module_is_one_module_where_the_cell_runs_and_comes_back_as_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # its functions had a globals dict of their own there: `mod.SCALE = 10` did not reach
    # `mod.scaled()`, and the module came back as a copy outside sys.modules (found by a
    # newcomer's trial, with a helpers.py beside the notebook)
    name = f"helpers_{secrets.token_hex(4)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import functools
        SCALE = 1
        items = []
        REG = {}
        GONE = 1
        def register(f):
            REG[f.__name__] = f
            return f
        @register
        def scaled(x): return x * SCALE
        def set_scale(v):
            global SCALE
            SCALE = v
        def add(v): items.append(v)
        @functools.lru_cache(maxsize=None)
        def cached(x): return x + 1
        def other(x): return -x
        hook = scaled
    """))
    monkeypatch.chdir(tmp_path)  # the notebook's folder: its modules travel by value
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(name)
    try:
        items = mod.items
        ns = notebook("")
        ns["helpers"] = mod
        run(ns, "helpers.SCALE = 10\nr = helpers.scaled(1)", "H100", quiet=True)
        assert ns["r"] == 10  # as a local run gives
        assert ns["helpers"] is mod is sys.modules[name] and mod.SCALE == 10
        assert mod.scaled(1) == 10
        run(ns, "helpers.set_scale(7)\nr = (helpers.SCALE, helpers.scaled(1))", "H100",
            quiet=True)
        assert ns["r"] == (7, 7) and mod.SCALE == 7
        run(ns, "helpers.add(5)\nr = list(helpers.items)", "H100", quiet=True)
        assert ns["r"] == [5] and mod.items == [5] and mod.items is items  # changed in place
        ns2 = notebook("")
        ns2["scaled"] = mod.scaled
        run(ns2, "r = scaled(2)", "H100", quiet=True)
        assert ns2["r"] == 14 and ns2["scaled"] is mod.scaled
        # what the cell did not change stays the notebook's own (found by a review: a
        # registry of the module's functions came back holding copies)
        assert mod.REG["scaled"] is mod.scaled and mod.hook is mod.scaled
        # the cell's own import finds the module that arrived, and its functions use it
        run(ns, f"import {name} as h\nh.SCALE = 3\nr = helpers.scaled(1)\n"
            "h.hook = h.other\ndel h.GONE\nc = h.cached(1)", "H100", quiet=True)
        assert ns["r"] == 3 and ns["c"] == 2
        assert mod.SCALE == 3 and mod.hook is mod.other and not hasattr(mod, "GONE")
        assert ns["h"] is mod and mod.REG["scaled"] is mod.scaled
    finally:
        del sys.modules[name]


def test_a_file_beside_the_notebook_hides_no_standard_module_the_kernel_finds_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a trial: with profile.py beside the notebook, %prun failed in a %%gpu cell only: the
    # runner put the folder first on sys.path, where a Jupyter kernel has it after the
    # standard library
    # (a module no runner imports for itself: one already imported there is not looked for)
    (tmp_path / "tabnanny.py").write_text("FAKE = True\n")
    monkeypatch.chdir(tmp_path)
    stdlib = next(i for i, p in enumerate(sys.path)
                  if p == os.path.dirname(os.__file__))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    sys.path.insert(stdlib + 1, "")  # as ipykernel orders it
    ns = notebook("")
    run(ns, "import tabnanny\nfake = hasattr(tabnanny, 'FAKE')", "H100", quiet=True)
    assert ns["fake"] is False
    assert not hasattr(ns["tabnanny"], "FAKE")  # (and the one bound here is the same)
    # a kernel without its folder on sys.path (IPython's ignore_cwd, PYTHONSAFEPATH) too
    # (another module: the runner keeps what it imported)
    (tmp_path / "pyclbr.py").write_text("FAKE = True\n")
    sys.path.remove("")
    ns = notebook("")
    run(ns, "import pyclbr\nfake = hasattr(pyclbr, 'FAKE')", "H100", quiet=True)
    assert ns["fake"] is False


def test_a_traceback_through_a_local_module_shows_its_file_and_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a trial: the frame of helpers.boom() read "File <dynamic-code>:5" with no line shown
    # (the module travels by value, and cloudpickle drops its code's file name)
    name = f"helpers_{secrets.token_hex(4)}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("from . import deep\n")
    (tmp_path / name / "deep.py").write_text(
        "def boom():\n    readings = {}\n    return readings['missing']\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(name)
    try:
        ns = notebook("")
        ns["helpers"] = mod
        with pytest.raises(KeyError) as info:
            run(ns, "x = 1\nhelpers.deep.boom()", quiet=True)
        text = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
        assert f"File {tmp_path / name / 'deep.py'}:3, in boom()" in text, text
        assert "----> 3     return readings['missing']" in text, text
    finally:
        for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[m]


def test_a_local_module_the_cell_imports_is_the_notebook_s_not_its_file_read_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # the researcher's trial: `cfg.BATCH = 256` set in the notebook, then a cell's own
    # `import cfg` (or `from cfg import ...`, or one inside a notebook function it calls)
    # read cfg.py afresh where the cell ran: it printed 32, and `cfg.BATCH = 512` there never
    # came back. A silent wrong result.
    name = f"cfg_{secrets.token_hex(4)}"
    pkg = f"pkg_{secrets.token_hex(4)}"
    (tmp_path / f"{name}.py").write_text("BATCH = 32\ndef describe():\n    return BATCH\n")
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "sub.py").write_text("LR = 0.1\n")
    monkeypatch.chdir(tmp_path)  # the notebook's folder
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(name)
    sub = importlib.import_module(f"{pkg}.sub")
    try:
        mod.BATCH, sub.LR = 256, 0.5
        ns = notebook(f"def f():\n    import {name}\n    return {name}.describe()")
        run(ns, f"import {name}\nr = ({name}.BATCH, {name}.describe())", "H100", quiet=True)
        assert ns["r"] == (256, 256) and ns[name] is mod
        run(ns, f"from {name} import describe\nr = describe()", "H100", quiet=True)
        assert ns["r"] == 256 and ns["describe"] is mod.describe
        run(ns, "r = f()", "H100", quiet=True)
        assert ns["r"] == 256
        run(ns, f"import {pkg}.sub\nr = {pkg}.sub.LR\n{pkg}.sub.LR = 0.25", "H100", quiet=True)
        assert ns["r"] == 0.5 and sub.LR == 0.25
        # what the cell sets on it comes back onto the notebook's module
        run(ns, f"import {name}\n{name}.BATCH = 512", "H100", quiet=True)
        assert mod.BATCH == 512 and mod.describe() == 512
        # one the notebook has not imported is read from its file where the cell runs, as
        # before (nothing of it to send)
        (tmp_path / "fresh_mod.py").write_text("V = 7\n")
        run(ns, "import fresh_mod\nr = fresh_mod.V", "H100", quiet=True)
        assert ns["r"] == 7
        # and what the cell sets on it comes back, as locally, where the cell's import made
        # it the notebook's (the trial of the day's changes: it was dropped)
        sys.modules.pop("fresh_mod", None)
        (tmp_path / "fresh_two.py").write_text("W = 'from file'\ndef get():\n    return W\n")
        run(ns, "import fresh_mod, fresh_two\nfresh_mod.V = 9\nfresh_two.W = 'changed'",
            "H100", quiet=True)
        assert sys.modules["fresh_mod"].V == 9 and ns["fresh_mod"] is sys.modules["fresh_mod"]
        assert sys.modules["fresh_two"].get() == "changed"
        # one that cannot travel whole (it holds a lock) is read from its file there, as
        # before, and said (found by a review: the cell failed, naming nothing)
        (tmp_path / "locked_mod.py").write_text("import threading\nLOCK = threading.Lock()\n"
                                                "V = 1\n")
        locked = importlib.import_module("locked_mod")
        locked.V = 2
        run(ns, "import locked_mod\nr = locked_mod.V", "H100", quiet=True)
        assert ns["r"] == 1
        assert ("your module locked_mod cannot travel as this notebook holds it"
                in capsys.readouterr().err)
        # used as an input, without importing it in the cell, it must travel: the error
        # names what in it cannot (it said only "cannot pickle '_thread.lock' object")
        ns["locked_mod"] = locked
        with pytest.raises(SerializationError, match=r"locked_mod\.LOCK"):
            run(ns, "r = locked_mod.V", "H100", quiet=True)
        report = run(ns, "r = locked_mod.V", "H100", quiet=True, dry_run=True)
        assert "locked_mod.LOCK" in str(report) and "__builtins__" not in str(report)
        del ns["locked_mod"]
        # an attribute of the same name as a module is no import of it (a review: model.train()
        # sent a local train.py with every cell)
        from gpu_magic._payload import function_globals

        ns3 = notebook(f"def g(m):\n    return m.{name} + m.locked_mod")
        found: set[str] = set()
        function_globals([ns3["g"]], ns3, found)
        assert found == set()
        function_globals([ns["f"]], ns, found)
        assert found == {name}
    finally:
        for m in (name, pkg, f"{pkg}.sub", "fresh_mod", "fresh_two", "locked_mod"):
            sys.modules.pop(m, None)


def test_line_numbers_count_the_blank_lines_a_cell_starts_with() -> None:
    # IPython compiles a cell without its leading blank lines; the notebook counts them
    ns = notebook("")
    with pytest.raises(ZeroDivisionError) as info:
        run(ns, "\n\nx = 1\n1 / 0", "H100", quiet=True)
    shown = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
    assert "Cell, line 4\n      3 x = 1\n----> 4 1 / 0\n" in shown


def test_lines_of_stdout_and_stderr_arrive_whole_and_in_the_order_printed() -> None:
    # print() writes its text and its newline apart, and the two streams have a pipe each:
    # lines were cut by the other stream's text, and came out of order
    ns = notebook("")
    job = run(ns, """
        import sys
        for e in range(40):
            print(f"epoch {e} loss 0.1")
            print(f"warn {e}", file=sys.stderr)
        from multiprocessing import Process
        def child():
            print("from child"); print("child err", file=sys.stderr)
        p = Process(target=child); p.start(); p.join(5)
        code = p.exitcode
        del p
    """, "H100", quiet=True, background=True)
    job.wait()
    want = "".join(f"epoch {e} loss 0.1\nwarn {e}\n" for e in range(40))
    assert job.output.startswith(want), job.output[:400]
    # a forked child's lines arrive whole (its two streams keep no order between them: their
    # pipes' readers are threads of the cell's process, not of the child)
    rest = job.output[len(want):].splitlines()
    assert sorted(rest) == ["child err", "from child"] and ns["code"] == 0


def test_a_line_printed_without_its_end_shows_before_the_cell_ends() -> None:
    ns = notebook("")
    job = run(ns, "import time\nprint('working', end='')\ntime.sleep(3)\nprint(' done')", "H100",
              quiet=True, background=True)
    assert wait_for(lambda: job.output == "working", 2.5), job.output
    job.wait()
    assert job.output == "working done\n"


def test_a_star_import_in_a_cell_binds_its_names_here_too() -> None:
    import math

    ns = notebook("sqrt = 'the notebook had its own'")
    run(ns, "from math import *\nx = sqrt(16)", "H100", quiet=True)
    assert ns["x"] == 4.0 and ns["sqrt"] is math.sqrt and ns["pi"] == math.pi  # as here


def test_an_interrupt_while_results_download_says_the_job_finished(use_gateway: Any) -> None:
    # the cell has ended and its results are on their way: a Ctrl-C here stops the fetch;
    # it must say so (and how to fetch them), never return as if the cell had made nothing
    import os
    import signal
    import sys
    import threading
    import time

    from gpu_magic import JobCancelled
    from gpu_magic._client import GatewayClient

    main = threading.main_thread().ident

    def watch() -> None:  # a Ctrl-C when this process is inside the fetch of the results
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(main)
            while frame is not None:
                if frame.f_code.co_name == "_fetch_result":
                    time.sleep(0.03)  # into the download (200 MB take ~0.15 s here)
                    os.kill(os.getpid(), signal.SIGINT)
                    return
                frame = frame.f_back
            time.sleep(0.001)

    ns = notebook("")
    with GatewayClient(use_gateway.url, use_gateway.token, same_host=False) as c:
        threading.Thread(target=watch, daemon=True).start()
        with pytest.raises(JobCancelled, match="had finished") as info:
            run(ns, "import numpy as np\nbig = np.ones(200_000_000, dtype=np.uint8)\nsmall = 42",
                "H100", client=c, quiet=True)
        assert "big" not in ns and "small" not in ns  # nothing half-bound
        job_id = info.value.job_id
        attach(job_id, ns, client=c, quiet=True)
    assert ns["small"] == 42 and ns["big"].nbytes == 200_000_000


def test_results_that_cannot_be_written_say_the_cell_finished() -> None:
    # a full disk (here: a file size limit the cell sets) when the runner writes a large
    # result: the cell itself had finished, which is said, with what to do

    ns = notebook("")
    with pytest.raises(JobFailed) as info:
        run(ns, """
            import resource, numpy as np
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
            big = np.ones(8 << 20, dtype=np.uint8)
        """, "H100", quiet=True)
    text = str(info.value)
    assert "the cell finished, but its results could not be written" in text, text
    assert "failed before the cell could finish" not in text and "big" not in ns
    run(ns, "x = 1", "H100", quiet=True)  # the runner (its limit put back) takes the next
    assert ns["x"] == 1


def test_a_display_too_large_to_send_is_replaced_by_a_notice_and_the_cell_runs_on(
        capsys: pytest.CaptureFixture[str]) -> None:
    # seen in a trial: one such display failed the whole job, blamed on the runner
    ns = notebook("")
    got = run(ns, """
        from IPython.display import display, HTML
        display(HTML("<b>" + "z" * 80_000_000 + "</b>"))
        display({"text/plain": "\\x01" * 15_000_000}, raw=True)  # 90 MB once escaped
        print("after")
        v = 44
        v
    """, "H100", quiet=True)
    assert (got, ns["v"]) == (44, 44)
    out = capsys.readouterr()
    assert out.out == "after\n"
    assert out.err.count("too large to send") == 2, out.err[:2000]


def test_a_url_and_token_pasted_with_spaces_still_reach_the_gateway(
        gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # a newcomer's trial: GPU_MAGIC_URL="  http://...  " was refused as having no protocol
    monkeypatch.setenv("GPU_MAGIC_URL", f"  {gateway.url}\n")
    monkeypatch.setenv("GPU_MAGIC_TOKEN", f" {gateway.token}\n")
    assert gpu_magic.run("y = 6 * 7\ny", "H100", {"__name__": "__main__"}, quiet=True) == 42


def test_a_cell_assigning_ipython_s_own_names_is_told_they_stay_the_kernel_s(
        capsys: pytest.CaptureFixture[str]) -> None:
    # a newcomer's trial: `In = 'x'` in a cell vanished without a word
    ns = notebook("In = ['', 'x = 1']\nOut = {}")
    history, outputs = ns["In"], ns["Out"]
    run(ns, "In = 'mine'\nOut = 3\ny = 1", "H100", quiet=True)
    assert ns["In"] is history and ns["Out"] is outputs and ns["y"] == 1
    err = capsys.readouterr().err
    for name in ("In", "Out"):
        assert (f"[gpu_magic] {name} was not brought back: the kernel keeps that name for "
                "IPython's own use; give the value another name") in err, err
    assert "y was not" not in err
