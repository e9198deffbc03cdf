"""Tests of the payload (gpu_magic._payload): what a cell's inputs and results become on the way.

The serialisation cases are round-tripped through a fresh interpreter
(``payload_fixtures/mini_runner.py``), which loads the inputs the way the runner does, runs a
small cell in the rebuilt namespace and sends names back; the results are loaded here the way
the client does. What the "notebook" defined is ``exec``-ed in a dict whose ``__name__`` is
``__main__``, so the fresh process has never seen any of it.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import gpu_magic
from gpu_magic import _payload
from gpu_magic._api import _rehome

MINI_RUNNER = Path(__file__).parent / "payload_fixtures" / "mini_runner.py"
DIGEST_RE = re.compile(r"xxh3-128:[0-9a-f]{32}")
LARGE = 100_000  # float64 elements: 800 KB, well over the 64 KiB inline limit

# What the user defined in earlier notebook cells.
NOTEBOOK = """
import dataclasses
import enum
import math

factor = 3
unrelated = [0] * 200_000  # never used by a sent function: must not travel

def scale(v):
    return v * factor

def twice_scaled(v):
    return scale(scale(v))  # calls another notebook function through the globals

def make_adder(n):
    def add(v):
        return v + n
    return add

add5 = make_adder(5)
square = lambda v: v * v

def compose(f, g):
    return lambda v: f(g(v))

pipeline = compose(square, add5)

class Counter:
    def __init__(self, n=0):
        self.n = n

    def bump(self, k=1):
        self.n += k
        return self.n

    def scaled(self):
        return scale(self.n)

counter = Counter(2)

@dataclasses.dataclass
class Point:
    x: float
    y: float = 0.0

    def norm(self):
        return math.hypot(self.x, self.y)

pt = Point(3.0, 4.0)

class Color(enum.Enum):
    RED = 1
    GREEN = 2

fav = Color.GREEN

class Model:
    pass

class Log:
    pass

class Handler:
    pass
"""


def notebook() -> dict[str, Any]:
    """A fresh notebook namespace holding NOTEBOOK's definitions (``__module__ == '__main__'``)."""
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(NOTEBOOK, "<notebook>", "exec"), ns)
    return ns


@dataclass
class RoundTrip:
    """One trip to a fresh interpreter and back."""

    sent: _payload.Packed  # the inputs' payload
    back: dict[str, Any]  # the returned names, loaded here
    staging: dict[str, Any]  # the namespace they were loaded into (as the client does)
    back_digests: list[str]  # digests of the result's out-of-band buffers


def round_trip(
    tmp_path: Path,
    values: dict[str, Any],
    cell: str = "",
    returns: tuple[str, ...] = (),
    *,
    namespace: dict[str, Any] | None = None,
    local_dir: Path | None = None,
    refs: tuple[str, ...] = (),
) -> RoundTrip:
    """Send ``values`` to a fresh interpreter, run ``cell`` there, bring ``returns`` back.

    ``refs`` are the inputs the cell left unchanged: they come back as references to ours.
    """
    job = tmp_path / f"job-{uuid.uuid4().hex[:8]}"
    job.mkdir()
    sent = _payload.pack_inputs(values, namespace, local_dir)  # as the client's submit does
    (job / "in.pkl").write_bytes(sent.pickle)
    names = []
    for i, buf in enumerate(sent.buffers):
        names.append(f"in.{i}")
        (job / names[-1]).write_bytes(buf)
    spec = {"buffers": names, "cell": cell, "returns": list(returns), "refs": list(refs)}
    (job / "job.json").write_text(json.dumps(spec))
    # The fresh process must not find the test's or the notebook's modules on its path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(MINI_RUNNER), str(job)],
        cwd=job,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"the fresh interpreter failed:\n{proc.stderr}"
    out = json.loads((job / "out.json").read_text())
    # Writable buffers, as the client's downloads are.
    buffers = [bytearray((job / name).read_bytes()) for name in out["buffers"]]
    staging: dict[str, Any] = {"__name__": "__main__"}
    back = _payload.loads((job / "out.pkl").read_bytes(), buffers, namespace=staging, inputs=values)
    return RoundTrip(sent, back, staging, out["digests"])


def pack_error(
    values: dict[str, Any], namespace: dict[str, Any] | None = None
) -> gpu_magic.SerializationError:
    with pytest.raises(gpu_magic.SerializationError) as info:
        _payload.pack_inputs(values, namespace, None)
    return info.value


# --- digests and the payload's shape ---


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (_payload.digest(b"abc"), True),
        ("xxh3-128:" + "0" * 32, True),
        ("xxh3-128:" + "A" * 32, False),  # we write lower-case hex only
        ("xxh3-128:" + "0" * 31, False),
        ("xxh3-128:" + "0" * 33, False),
        ("sha256:" + "0" * 32, False),
        ("xxh3-128:../../etc/passwd0000000000", False),
        ("", False),
    ],
)
def test_is_digest(value: str, ok: bool) -> None:
    assert _payload.is_digest(value) is ok


def test_digest_is_self_describing_and_content_addressed() -> None:
    d = _payload.digest(b"hello")
    assert DIGEST_RE.fullmatch(d)
    assert d == _payload.digest(bytearray(b"hello")) == _payload.digest(memoryview(b"hello"))
    assert d != _payload.digest(b"hello!")


@pytest.mark.parametrize(("nbytes", "out_of_band"), [(64 * 1024 - 8, False), (64 * 1024, True)])
def test_inline_limit(nbytes: int, out_of_band: bool) -> None:
    packed, _ = _payload.dumps({"a": np.zeros(nbytes // 8)})
    assert bool(packed.buffers) is out_of_band


def test_blobs_list_a_shared_buffer_once() -> None:
    a, b = np.zeros(LARGE), np.zeros(LARGE)  # two arrays, the same bytes
    packed, cuda_moved = _payload.dumps({"a": a, "b": b, "small": [1, 2]})
    assert cuda_moved == 0
    assert len(packed.buffers) == 2
    d = packed.buffer_digests[0]
    assert packed.buffer_digests == [d, d]
    assert d == _payload.digest(a.tobytes())
    assert packed.pickle_digest == _payload.digest(packed.pickle)
    assert packed.manifest == {"pickle": packed.pickle_digest, "buffers": [d, d]}
    json.dumps(packed.manifest)  # the manifest travels as JSON
    blobs = packed.blobs()
    assert list(blobs) == [packed.pickle_digest, d]
    assert bytes(blobs[packed.pickle_digest]) == packed.pickle
    assert bytes(blobs[d]) == a.tobytes()
    assert packed.nbytes == len(packed.pickle) + a.nbytes


# --- numpy arrays, through a fresh interpreter ---

ARRAY_CELL = """
writable = x.flags.writeable
layout = (x.flags.c_contiguous, x.flags.f_contiguous)
total = float(x.sum())
x *= 2  # in place: fails on a read-only array
x.flat[0] = -1
"""


@pytest.mark.parametrize(
    ("make", "out_of_band"),
    [
        pytest.param(lambda: np.arange(LARGE, dtype=np.float64), True, id="large"),
        pytest.param(
            lambda: np.arange(2 * LARGE, dtype=np.float64)[LARGE // 2 : LARGE * 3 // 2],
            True,
            id="slice-of-large",
        ),
        pytest.param(
            lambda: np.arange(2 * LARGE, dtype=np.float64).reshape(400, 500)[:, ::2],
            None,
            id="strided-view-of-large",
        ),  # numpy copies it in band; either is fine
        pytest.param(
            lambda: np.asfortranarray(np.arange(2 * LARGE, dtype=np.int64).reshape(400, 500)),
            True,
            id="fortran-order",
        ),
        pytest.param(lambda: np.arange(10, dtype=np.int32), False, id="small"),
    ],
)
def test_array_round_trip(
    tmp_path: Path, make: Callable[[], np.ndarray], out_of_band: bool | None
) -> None:
    arr = make()
    original = arr.copy(order="K")
    rt = round_trip(tmp_path, {"x": arr}, ARRAY_CELL, ("x", "writable", "layout", "total"))

    if out_of_band is not None:
        assert bool(rt.sent.buffers) is out_of_band
        assert bool(rt.back_digests) is out_of_band
    if out_of_band:
        # only the array's own bytes travel, not the whole base of a view
        assert sum(b.nbytes for b in rt.sent.buffers) == arr.nbytes
    for d, buf in zip(rt.sent.buffer_digests, rt.sent.buffers):
        assert DIGEST_RE.fullmatch(d) and d == _payload.digest(buf)
    assert all(DIGEST_RE.fullmatch(d) for d in rt.back_digests)

    assert rt.back["writable"] is True
    if arr.flags.c_contiguous or arr.flags.f_contiguous:  # (a strided view arrives compacted)
        assert rt.back["layout"] == (arr.flags.c_contiguous, arr.flags.f_contiguous)
    assert rt.back["total"] == float(original.sum())
    expected = original * 2
    expected.flat[0] = -1
    got = rt.back["x"]
    assert got.dtype == arr.dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(arr, original)  # ours was not touched
    assert got.flags.writeable


# --- torch tensors: their storages travel out of band, the rest as torch pickles it ---

TENSOR_CELL = """
shared_in = v.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
x.mul_(2)  # in place, on the storage rebuilt here: v, a view of x, sees it too
with torch.no_grad():
    w.add_(1)
param = type(w).__name__ == "Parameter" and w.requires_grad
"""


def test_tensor_storages_travel_out_of_band(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    x = torch.arange(LARGE, dtype=torch.float32)
    half = torch.arange(LARGE, dtype=torch.bfloat16)
    w = torch.nn.Parameter(torch.ones(LARGE // 4))
    values = {"torch": torch, "x": x, "v": x[10:20], "w": w, "h": half[::2],
              "small": torch.arange(3)}
    rt = round_trip(tmp_path, values, TENSOR_CELL,
                    ("shared_in", "x", "v", "w", "h", "small", "param"))

    # each storage once, as its own buffer (a view brings its storage, as torch does);
    # nothing large in the pickle itself
    assert sorted(b.nbytes for b in rt.sent.buffers) == sorted(
        [x.nbytes, half.nbytes, w.nbytes])
    assert len(rt.sent.pickle) < 10_000
    for d, buf in zip(rt.sent.buffer_digests, rt.sent.buffers):
        assert d == _payload.digest(buf)
    assert len(rt.back_digests) == 3

    back = rt.back
    assert back["shared_in"] is True and back["param"] is True
    assert torch.equal(back["x"], torch.arange(LARGE, dtype=torch.float32) * 2)
    assert torch.equal(back["v"], back["x"][10:20])
    assert back["v"].untyped_storage().data_ptr() == back["x"].untyped_storage().data_ptr()
    assert type(back["w"]) is torch.nn.Parameter and back["w"].requires_grad
    assert torch.equal(back["w"].detach(), torch.full((LARGE // 4,), 2.0))
    assert back["h"].dtype == torch.bfloat16 and torch.equal(back["h"], half[::2])
    assert torch.equal(back["small"], torch.arange(3))
    assert torch.equal(x, torch.arange(LARGE, dtype=torch.float32))  # ours was not touched


def test_an_unchanged_tensor_keeps_its_digest_beside_a_changed_input() -> None:
    torch = pytest.importorskip("torch")
    x = torch.randn(LARGE)
    first, _ = _payload.dumps({"x": x, "step": 1})
    second, _ = _payload.dumps({"x": x, "step": 2})
    # what a rerun with a new small input uploads: a new pickle, never the tensor again
    assert first.pickle_digest != second.pickle_digest
    assert first.buffer_digests == second.buffer_digests and len(first.buffer_digests) == 1


@pytest.mark.parametrize("n", [3, LARGE])
def test_tensors_pickled_under_another_default_device_load_as_they_were(n: int) -> None:
    # a cell that ran torch.set_default_device("cuda") returns its CPU (and moved CUDA)
    # tensors all the same ("meta" here: the same default device that is not the CPU)
    torch = pytest.importorskip("torch")
    x = torch.arange(n, dtype=torch.float32)
    torch.set_default_device("meta")
    try:
        packed, _ = _payload.dumps({"x": x, "s": x.untyped_storage()})
    finally:
        torch.set_default_device(None)
    assert [b.nbytes for b in packed.buffers] == ([x.nbytes] if n == LARGE else [])
    got = _payload.loads(packed.pickle, [bytearray(b) for b in packed.buffers], namespace={})
    assert got["x"].device.type == "cpu" and torch.equal(got["x"], x)
    assert bytes(got["s"]) == bytes(x.untyped_storage())


def test_a_small_tensor_that_travelled_can_be_resized_a_large_one_is_not_copied() -> None:
    torch = pytest.importorskip("torch")
    small, large = torch.arange(3, dtype=torch.float32), torch.arange(LARGE, dtype=torch.float32)
    packed, _ = _payload.dumps({"small": small, "large": large})
    [buf] = [bytearray(b) for b in packed.buffers]
    got = _payload.loads(packed.pickle, [buf], namespace={})
    # in band: copied into torch's own memory, resizable as one torch unpickled
    got["small"].resize_(6)  # (and torch.cat(..., out=small) into a tensor of another size)
    assert torch.equal(got["small"][:3], small)
    got["small"].untyped_storage().resize_(0)  # freeing a storage's memory
    # out of band: on the very bytes that arrived (a copy cost as much as the trip), which
    # torch cannot resize, as numpy cannot an array on them
    got["large"][0] = -1.0
    assert memoryview(buf).cast("f")[0] == -1.0
    with pytest.raises(RuntimeError, match="not resizable"):
        got["large"].resize_(2 * LARGE)


def test_sending_a_tensor_leaves_it_resizable() -> None:
    torch = pytest.importorskip("torch")
    for x in (torch.arange(3.0), torch.arange(float(LARGE))):
        packed, _ = _payload.dumps({"x": x})
        _payload.fingerprint(x)
        assert x.untyped_storage().resizable()
        del packed
        x.resize_(2 * x.numel())  # as in the notebook after the cell: torch.cat(..., out=x)


def test_tensors_load_where_their_bytes_cannot_be_seen_through_numpy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # torch without numpy: a storage goes torch's own way, whole, and still loads
    torch = pytest.importorskip("torch")

    x = torch.arange(LARGE, dtype=torch.float32)
    monkeypatch.setitem(sys.modules, "numpy", None)  # (an import of it fails)
    packed, _ = _payload.dumps({"x": x, "v": x[5:]})
    monkeypatch.undo()
    assert packed.buffers == []  # in the pickle, as torch pickles it
    got = _payload.loads(packed.pickle, packed.buffers, namespace={})
    assert torch.equal(got["x"], x) and torch.equal(got["v"], x[5:])


@pytest.mark.parametrize("make", [
    pytest.param(lambda n: bytes(n), id="read-only"),
    pytest.param(lambda n: memoryview(bytearray(n + 1))[1:], id="odd-offset"),
])
def test_a_tensor_on_a_buffer_torch_cannot_use_as_it_is_gets_its_own_memory(
        make: Callable[[int], Any]) -> None:
    import warnings

    torch = pytest.importorskip("torch")
    packed, _ = _payload.dumps({"x": torch.ones(LARGE)})
    [buf] = packed.buffers
    given = make(buf.nbytes)
    byte_view = memoryview(given).cast("B")
    if not byte_view.readonly:
        byte_view[:] = buf
    else:
        given = bytes(buf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when handed memory it may not write
        x = _payload.loads(packed.pickle, [given], namespace={})["x"]
    assert x.data_ptr() % 16 == 0
    x.add_(1)
    assert float(x.sum()) == 2 * LARGE


def test_a_cuda_tensor_moved_to_the_cpu_pickles_as_it_would_have() -> None:
    # The move itself needs a GPU (tests/test_gpu.py); here, what is put back after it: a
    # copying op on a Parameter gives a plain tensor computed from it, no leaf
    torch = pytest.importorskip("torch")
    w = torch.nn.Parameter(torch.ones(3))
    w.tag = "weight"
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    loss = (torch.ones(2, requires_grad=True) * 2).sum()
    for given in (w, frozen, loss, torch.arange(3)):
        moved = _payload._on_cpu(given)
        assert type(moved) is type(given) and moved.is_leaf
        assert moved.requires_grad == given.requires_grad
        assert torch.equal(moved.detach(), given.detach())
    assert _payload._on_cpu(w).tag == "weight"


# --- identity: two names for one object stay one object, both ways ---


def test_shared_references_survive_both_ways(tmp_path: Path) -> None:
    shared = [1]
    big = np.ones(LARGE)
    values = {"a": shared, "b": shared, "c": {"k": shared}, "x": big, "y": big}
    cell = """
same_in = a is b and c["k"] is a and x is y
a.append(2)
x[0] = 5.0
p = [3]
q = p
r = {"p": p}
"""
    rt = round_trip(tmp_path, values, cell, ("same_in", "a", "b", "c", "p", "q", "r", "x", "y"))
    assert len(rt.sent.buffers) == 1  # the array shared by two names is sent once
    assert rt.back["same_in"] is True
    assert rt.back["a"] is rt.back["b"] is rt.back["c"]["k"]
    assert rt.back["a"] == [1, 2]
    assert rt.back["p"] is rt.back["q"] is rt.back["r"]["p"]
    assert rt.back["x"] is rt.back["y"]
    assert rt.back["x"][0] == 5.0
    assert len(rt.back_digests) == 1


def test_input_refs_bring_back_our_own_object() -> None:
    obj = {"weights": np.ones(LARGE)}
    packed, _ = _payload.dumps({"x": obj, "y": [obj]}, input_refs={id(obj): "x"})
    assert packed.buffers == []  # a reference: the weights are not in the payload
    got = _payload.loads(packed.pickle, packed.buffers, namespace={}, inputs={"x": obj})
    assert got["x"] is obj and got["y"][0] is obj
    with pytest.raises(_payload.MissingInput) as missing:  # (named: the message says it)
        _payload.loads(packed.pickle, packed.buffers, namespace={})
    assert missing.value.name == "x"


def test_unchanged_inputs_come_back_as_the_same_object(tmp_path: Path) -> None:
    model = {"weights": np.ones(LARGE)}
    cfg = [1, 2]
    cell = """
alias = model
pair = (model, cfg)
cfg.append(3)
"""
    # the runner sends back unchanged inputs as references to the client's objects
    rt = round_trip(
        tmp_path, {"model": model, "cfg": cfg}, cell, ("alias", "pair", "cfg"), refs=("model",)
    )
    assert rt.back["alias"] is model
    assert rt.back["pair"][0] is model
    assert rt.back["pair"][1] is rt.back["cfg"]
    assert rt.back["cfg"] == [1, 2, 3] and rt.back["cfg"] is not cfg
    assert rt.back_digests == []  # the weights did not travel back


# --- notebook functions and classes, through a fresh interpreter ---


def test_notebook_functions_share_the_cells_namespace(tmp_path: Path) -> None:
    nb = notebook()
    values = {"scale": nb["scale"], "twice_scaled": nb["twice_scaled"], "counter": nb["counter"]}
    cell = """
globals_are_ns = [f.__globals__ is globals() for f in (scale, twice_scaled, type(counter).scaled)]
before = (scale(2), twice_scaled(1), counter.scaled())
factor = 5  # a later assignment in the cell: every notebook function must see it
after = (scale(2), twice_scaled(1), counter.scaled())
unrelated_sent = "unrelated" in globals()
"""
    rt = round_trip(
        tmp_path,
        values,
        cell,
        ("globals_are_ns", "before", "after", "unrelated_sent"),
        namespace=nb,
    )
    assert rt.back["globals_are_ns"] == [True, True, True]
    assert rt.back["before"] == (6, 9, 6)
    assert rt.back["after"] == (10, 25, 10)
    assert rt.back["unrelated_sent"] is False
    assert nb["factor"] == 3


def test_closures_lambdas_classes_dataclasses_enums(tmp_path: Path) -> None:
    nb = notebook()
    names = ("add5", "square", "pipeline", "twice_scaled", "Counter", "Point", "pt", "Color", "fav")
    cell = """
import dataclasses
got = {
    "add5": add5(1),
    "square": square(4),
    "pipeline": pipeline(1),
    "twice_scaled": twice_scaled(1),
    "counter": Counter(1).bump(2),
    "norm": pt.norm(),
    "point_eq": Point(3.0, 4.0) == pt,
    "fields": [f.name for f in dataclasses.fields(pt)],
    "isinstance": isinstance(pt, Point),
    "enum_identity": Color(2) is fav and Color["GREEN"] is fav and fav is Color.GREEN,
    "enum_eq": fav == Color.GREEN and fav != Color.RED,
    "modules": {add5.__module__, square.__module__, Counter.__module__, Point.__module__},
}
"""
    rt = round_trip(tmp_path, {n: nb[n] for n in names}, cell, ("got",), namespace=nb)
    assert rt.back["got"] == {
        "add5": 6,
        "square": 16,
        "pipeline": 36,
        "twice_scaled": 9,
        "counter": 3,
        "norm": 5.0,
        "point_eq": True,
        "fields": ["x", "y"],
        "isinstance": True,
        "enum_identity": True,
        "enum_eq": True,
        "modules": {"__main__"},
    }


def test_notebook_class_instances_come_back_as_our_classes(tmp_path: Path) -> None:
    nb = notebook()
    cell = """
counter.bump(10)
made = Counter(7)
new_pt = Point(1.0, 2.0)
color = Color.RED
"""
    sent = ("counter", "pt", "fav", "Counter", "Point", "Color")
    rt = round_trip(
        tmp_path,
        {n: nb[n] for n in sent},
        cell,
        ("counter", "made", "new_pt", "color", "fav"),
        namespace=nb,
    )
    back = rt.back
    assert type(back["counter"]) is nb["Counter"] and back["counter"].n == 12
    assert isinstance(back["made"], nb["Counter"]) and back["made"].n == 7
    assert back["new_pt"] == nb["Point"](1.0, 2.0)
    assert back["color"] is nb["Color"].RED
    assert back["fav"] is nb["Color"].GREEN


def test_returned_functions_and_instances_are_rehomed(tmp_path: Path) -> None:
    """The client binds returned notebook functions and classes to its own namespace."""
    nb = notebook()
    cell = """
def cube(v):
    return v ** 3 * factor
made = Counter(2)
"""
    rt = round_trip(
        tmp_path, {n: nb[n] for n in ("scale", "Counter")}, cell, ("cube", "made"), namespace=nb
    )
    bound = {n: _rehome(v, rt.staging, nb) for n, v in rt.back.items()}  # as _Job._take_result
    cube, Counter = bound["cube"], nb["Counter"]
    assert cube.__globals__ is nb
    assert isinstance(bound["made"], Counter)
    assert Counter.scaled.__globals__ is nb
    nb["factor"] = 7  # a later local cell
    assert cube(1) == 7
    assert bound["made"].scaled() == 14
    assert Counter(1).scaled() == 7


def test_a_nested_instance_coming_back_leaves_its_class_in_the_notebook(tmp_path: Path) -> None:
    """cloudpickle resets the state of our (tracked) class when an instance of it comes back:
    its methods must still read the notebook's globals, even if the instance sat in a list."""
    nb = notebook()
    rt = round_trip(
        tmp_path, {"Counter": nb["Counter"]}, "items = [Counter(3)]", ("items",), namespace=nb
    )
    bound = {n: _rehome(v, rt.staging, nb) for n, v in rt.back.items()}  # as _Job._take_result
    Counter = nb["Counter"]
    assert isinstance(bound["items"][0], Counter)
    nb["factor"] = 7  # a later local cell
    assert Counter(1).scaled() == 7
    assert bound["items"][0].scaled() == 21


# --- the user's own modules beside the notebook travel by value ---

MODULE_SOURCE = """
OFFSET = 100

def shift(v):
    return v + OFFSET

class Box:
    def __init__(self, v):
        self.v = v

    def get(self):
        return shift(self.v)
"""


@pytest.fixture(params=["module", "package"])
def local_module(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[ModuleType, Path]]:
    """A module (or a package's submodule) in a notebook's directory, imported from there."""
    nbdir = tmp_path / "notebook-dir"
    nbdir.mkdir()
    top = f"nbmod_{uuid.uuid4().hex[:8]}"
    if request.param == "module":
        (nbdir / f"{top}.py").write_text(MODULE_SOURCE)
        name = top
    else:
        (nbdir / top).mkdir()
        (nbdir / top / "__init__.py").write_text("")
        (nbdir / top / "core.py").write_text(MODULE_SOURCE)
        name = f"{top}.core"
    sys.path.insert(0, str(nbdir))
    try:
        yield importlib.import_module(name), nbdir
    finally:
        sys.path.remove(str(nbdir))
        for mod in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[mod]


def test_local_module_travels_by_value(
    tmp_path: Path, local_module: tuple[ModuleType, Path]
) -> None:
    mod, nbdir = local_module
    values = {"shift": mod.shift, "box": mod.Box(1), "mod": mod, "modname": mod.__name__}
    cell = """
import importlib.util
importable_there = importlib.util.find_spec(modname.partition(".")[0]) is not None
got = (shift(1), box.get(), mod.shift(2), mod.Box(3).get())
"""
    rt = round_trip(tmp_path, values, cell, ("importable_there", "got"), local_dir=nbdir)
    assert rt.back["importable_there"] is False  # so it really travelled by value
    assert rt.back["got"] == (101, 101, 102, 103)
    # dumps registers the module by value only for its own call
    by_ref, _ = _payload.dumps(mod.shift)
    assert b"OFFSET" not in by_ref.pickle and mod.__name__.encode() in by_ref.pickle


# --- travel_mode: what the dry-run report says ---


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(np, id="numpy"),
        pytest.param(json, id="json"),
        pytest.param(np.ndarray, id="np.ndarray"),
        pytest.param(np.float32, id="np.float32"),
        pytest.param(json.dumps, id="json.dumps"),
        pytest.param(np.mean, id="np.mean"),
        pytest.param(np.sqrt, id="np.sqrt (a ufunc)"),
        pytest.param(math.sqrt, id="math.sqrt (a builtin)"),
    ],
)
def test_installed_things_travel_by_reference(value: Any) -> None:
    assert _payload.travel_mode(value) == "by reference"


@pytest.mark.parametrize("name", ["scale", "add5", "square", "Counter", "Point", "Color"])
def test_notebook_things_travel_by_value(name: str) -> None:
    assert _payload.travel_mode(notebook()[name]) == "by value"


def test_local_module_things_travel_by_value(local_module: tuple[ModuleType, Path]) -> None:
    mod, nbdir = local_module
    for value in (mod, mod.shift, mod.Box):
        assert _payload.travel_mode(value, nbdir) == "by value"
        assert _payload.travel_mode(value) == "by reference"  # without knowing the notebook's dir


# --- fingerprint: did the cell change an input in place? ---


def _set_attr(obj: Any) -> None:
    obj.n = 99


@pytest.mark.parametrize(
    ("make", "change"),
    [
        pytest.param(
            lambda nb: np.zeros(LARGE), lambda a: a.__setitem__(LARGE // 2, 1.0), id="large-array"
        ),
        pytest.param(lambda nb: np.zeros(10), lambda a: a.__setitem__(9, 1.0), id="small-array"),
        pytest.param(lambda nb: __import__("torch").zeros(LARGE),
                     lambda t: t.__setitem__(LARGE // 2, 1.0), id="large-tensor"),
        pytest.param(lambda nb: [1, 2], lambda x: x.append(3), id="list-append"),
        pytest.param(
            lambda nb: {"a": {"b": 1}}, lambda d: d["a"].__setitem__("b", 2), id="nested-dict"
        ),
        pytest.param(lambda nb: nb["Counter"](1), _set_attr, id="attribute-set"),
        pytest.param(lambda nb: nb["Counter"](1), lambda c: c.bump(), id="method-call"),
        pytest.param(
            lambda nb: nb["Point"](1.0), lambda p: setattr(p, "extra", None), id="new-attribute"
        ),
    ],
)
def test_fingerprint_sees_in_place_changes(
    make: Callable[[dict[str, Any]], Any], change: Callable[[Any], Any]
) -> None:
    nb = notebook()
    obj = make(nb)
    before = _payload.fingerprint(obj, nb)
    assert isinstance(before, str)
    assert _payload.fingerprint(obj, nb) == before
    change(obj)
    assert _payload.fingerprint(obj, nb) != before


def test_fingerprint_depends_on_state_only() -> None:
    assert _payload.fingerprint([1, {"a": 2}]) == _payload.fingerprint([1, {"a": 2}])
    assert _payload.fingerprint(np.arange(LARGE)) == _payload.fingerprint(np.arange(LARGE))
    assert _payload.fingerprint(np.arange(LARGE)) != _payload.fingerprint(np.arange(1, LARGE + 1))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: threading.Lock(), id="lock"),
        pytest.param(lambda: (i for i in range(3)), id="generator"),
        pytest.param(lambda: {"cfg": [threading.RLock()]}, id="nested-rlock"),
    ],
)
def test_fingerprint_of_unpicklable_is_none(make: Callable[[], Any]) -> None:
    assert _payload.fingerprint(make()) is None


# --- inputs that cannot be sent: which object, and what to do ---


# Every mode: cloudpickle on its own would send a text file open for reading as an io.StringIO
# holding a snapshot of the whole file, which is not the file the cell expects.
@pytest.mark.parametrize("mode", ["r", "rb", "w", "a", "r+"])
def test_open_file(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "data.txt"
    path.write_text("some data\n")
    with open(path, mode) as f:
        err = pack_error({"f": f})
    assert (
        str(err)
        == "variable 'f' (an open file) cannot be sent to the GPU: open it inside the cell instead"
    )
    assert (err.name, err.path) == ("f", "f")
    assert isinstance(err, gpu_magic.GpuMagicError)


def test_open_file_deep_inside_an_object(tmp_path: Path) -> None:
    nb = notebook()
    model = nb["Model"]()
    model.weights = [1.0, 2.0]
    model.log = nb["Log"]()
    model.log.name = "train"
    handler = nb["Handler"]()
    handler.level = 10
    model.log.handlers = [handler]
    with open(tmp_path / "train.log", "w") as stream:
        handler.stream = stream
        err = pack_error({"epochs": 3, "model": model}, nb)
    assert str(err) == (
        "variable 'model' (a Model object) cannot be sent to the GPU: "
        "model.log.handlers[0].stream: an open file; open it inside the cell instead"
    )
    assert (err.name, err.path) == ("model", "model.log.handlers[0].stream")


@pytest.mark.parametrize(
    ("values", "name", "path", "message"),
    [
        pytest.param(
            {"lr": 0.1, "cfg": {"lr": 0.1, "lock": threading.Lock()}},
            "cfg",
            "cfg['lock']",
            "variable 'cfg' (a dict object) cannot be sent to the GPU: cfg['lock']: a thread lock; "
            "create it inside the cell instead (pickle said: TypeError: cannot pickle "
            "'_thread.lock' object)",
            id="lock-in-dict",
        ),
        pytest.param(
            {"batches": [[1], (i for i in range(3))]},
            "batches",
            "batches[1]",
            "variable 'batches' (a list object) cannot be sent to the GPU: batches[1]: "
            "a generator; turn it into a list first, or create it inside the cell "
            "(pickle said: TypeError: cannot pickle 'generator' object)",
            id="generator-in-list",
        ),
        pytest.param(
            # a thread, not the lock inside it: that is what the user put there
            {"job": {"worker": threading.Thread(target=print)}},
            "job",
            "job['worker']",
            "variable 'job' (a dict object) cannot be sent to the GPU: job['worker']: a thread; "
            "start it inside the cell instead (pickle said: TypeError: cannot pickle "
            "'_thread.lock' object)",
            id="thread-in-dict",
        ),
    ],
)
def test_unpicklable_nested_input(
    values: dict[str, Any], name: str, path: str, message: str
) -> None:
    err = pack_error(values)
    assert str(err) == message
    assert (err.name, err.path) == (name, path)


def test_a_state_that_setstate_renames_is_applied_as_unpickling_reads_it() -> None:
    # a review: applying only the changed attributes wrote the state's keys as attributes
    # (a stray `t`) and lost the change, for a class whose __setstate__ renames them
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(
        "import threading\n"
        "class Acc:\n"
        "    def __init__(self):\n"
        "        self.total, self.lock = [1], threading.Lock()\n"
        "    def __getstate__(self):\n"
        "        return {'t': list(self.total)}\n"
        "    def __setstate__(self, s):\n"
        "        self.total, self.lock = list(s['t']), None\n", "<notebook>", "exec"), ns)
    here, there = ns["Acc"](), ns["Acc"]()
    lock = here.lock
    there.total.append(2)
    _payload.apply_in_place(here, _payload.in_place_state(there))
    assert vars(here) == {"total": [1, 2], "lock": lock}


def test_registries_that_hold_the_classes_holding_them_arrive_whole() -> None:
    # a review: undoing what making a class did to registries once emptied a registry that
    # unpickling had not filled yet when its class was filled
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(
        "REG = []\nclass Plugin:\n    registry = REG\nREG += [Plugin, 'x']\n"
        "D = {}\nclass Base:\n    table = D\nD.update(base=Base, n=3)\n", "<notebook>", "exec"),
        ns)
    packed = _payload.pack_inputs({"REG": ns["REG"], "D": ns["D"]}, ns, None)
    got = _payload.loads(packed.pickle, packed.buffers, namespace={"__name__": "__main__"})
    assert [type(v).__name__ for v in got["REG"]] == ["type", "str"]
    assert got["REG"][0].registry is got["REG"] and got["REG"][0].__name__ == "Plugin"
    assert list(got["D"]) == ["base", "n"] and got["D"]["base"].table is got["D"]


def test_an_input_nested_too_deeply_is_said_to_be_so() -> None:
    # a trial: a linked list of 5,000 nodes was said to need Node __getstate__/__setstate__
    class Node:
        def __init__(self, nxt: Any = None) -> None:
            self.nxt = nxt

    chain = None
    for _ in range(5 * sys.getrecursionlimit()):
        chain = Node(chain)
    deep: list[Any] = []
    cur = deep
    for _ in range(5 * sys.getrecursionlimit()):
        cur.append([])
        cur = cur[0]
    node = f"a {Node.__qualname__} object"
    for name, value, top in (("chain", chain, node), ("deep", deep, "a list object")):
        err = pack_error({name: value})
        assert str(err).startswith(
            f"variable '{name}' ({top}) cannot be sent to the GPU: it is nested too deeply to "
            "pickle"), err
        assert "sys.setrecursionlimit" in str(err) and "__getstate__" not in str(err)
        assert (err.name, err.path) == (name, name)


def test_unpicklable_closure_variable() -> None:
    nb = notebook()
    exec(
        "import threading\n"
        "def make():\n"
        "    lk = threading.Lock()\n"
        "    def guarded(v):\n"
        "        with lk:\n"
        "            return v\n"
        "    return guarded\n"
        "guarded = make()\n",
        nb,
    )
    err = pack_error({"guarded": nb["guarded"]}, nb)
    assert err.path == "guarded (closure variable lk)"
    expected = "guarded (closure variable lk): a thread lock; create it inside the cell instead"
    assert expected in str(err)


def test_installed_packages_beside_the_notebook_travel_by_reference() -> None:
    """A project checked out and installed in editable mode sits under the notebook's folder, yet
    is importable on the runner: it must not be pickled by value."""
    import gpu_magic as gm

    repo = Path(gm.__file__).resolve().parent.parent
    assert _payload.travel_mode(gm.run, repo) == "by reference"
    assert gm not in _payload._local_modules(repo)


def test_concurrent_dumps_with_local_modules_do_not_interfere(tmp_path: Path) -> None:
    import importlib
    import threading

    (tmp_path / "conc_local_mod.py").write_text("def f():\n    return 7\n")
    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.import_module("conc_local_mod")
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(50):
                    _payload.dumps({"f": mod.f}, local_dir=tmp_path)
            except BaseException as exc:  # collected for the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("conc_local_mod", None)


def test_every_object_at_fault_is_named_once_where_it_is_first_reached() -> None:
    import threading

    from gpu_magic._payload import find_all_unpicklable

    class Holder:
        pass

    h, a, root = Holder(), Holder(), Holder()
    h.lock = threading.Lock()
    a.x = a.y = h  # shared: h's lock is one fault, not also "a.y"
    assert [p for p, _ in find_all_unpicklable(a, "a")] == ["a.x.lock"]
    root.lock, root.child = threading.Lock(), Holder()
    root.child.parent = root  # a cycle back to the top
    root.child.file = open(os.devnull)
    try:
        assert [p for p, _ in find_all_unpicklable(root, "root")] == [
            "root.lock", "root.child.file"]
    finally:
        root.child.file.close()


NOTEBOOK_FAULTS = """\
import functools
import os
import threading
lk = threading.Lock()
def uses_lock():
    return lk.locked()
with_default = lambda x, _l=lk: x
def kw_default(*, _l=lk):
    return _l
to_devnull = functools.partial(print, file=open(os.devnull, "w"))
class Cfg:
    lock = lk
cfg = Cfg()
class Layer:
    pass
class Model:
    pass
m = Model()
m.layers = [Layer(), Layer(), Layer()]
m.layers[0].hook = m.layers[1].hook = lk
m.layers[2].hook = m
class Worker:
    def __init__(self):
        self.guard = threading.Lock()
    def run(self):
        return 1
bound = Worker().run
"""


@pytest.mark.parametrize("name, path", [
    ("uses_lock", "uses_lock (global lk)"),
    ("with_default", "with_default (default of _l)"),
    ("kw_default", "kw_default (default of _l)"),
    ("to_devnull", "to_devnull.keywords['file']"),
    ("cfg", "cfg (class attribute lock)"),
    ("Cfg", "Cfg.lock"),
    ("bound", "bound.__self__.guard"),
])
def test_the_fault_is_named_inside_what_a_notebook_object_carries(name: str, path: str) -> None:
    # globals, defaults, a partial's arguments, a class's attributes: all travel by value
    from gpu_magic._payload import find_all_unpicklable

    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(NOTEBOOK_FAULTS, ns)
    try:
        assert [p for p, _ in find_all_unpicklable(ns[name], name)] == [path]
    finally:
        ns["to_devnull"].keywords["file"].close()


def test_an_importable_function_is_not_searched_for_its_globals() -> None:
    from gpu_magic._payload import find_all_unpicklable

    # os.path.join travels by reference: whatever its module holds does not travel with it
    assert [p for p, _ in find_all_unpicklable([os.path.join, threading.Lock()], "x")] == ["x[1]"]


def test_a_part_that_fails_only_through_a_cycle_is_no_culprit() -> None:
    from gpu_magic._payload import find_all_unpicklable

    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(NOTEBOOK_FAULTS, ns)
    try:
        # m.layers[2] fails only because it leads back to m, whose faults are named
        assert [p for p, _ in find_all_unpicklable(ns["m"], "m")] == [
            "m.layers[0].hook", "m.layers[1].hook"]
    finally:
        ns["to_devnull"].keywords["file"].close()

    class Broken:
        def __reduce__(self) -> Any:
            raise TypeError("no")

    b = Broken()
    b.me = b  # what fails in it leads back to itself: it is the one at fault
    assert [p for p, _ in find_all_unpicklable([b], "x")] == ["x[0]"]


def test_faults_past_the_limit_are_counted() -> None:
    from gpu_magic._payload import find_all_unpicklable

    many = {f"k{i}": threading.Lock() for i in range(30)}
    unlisted: dict[str, int] = {}
    assert len(find_all_unpicklable(many, "many", unlisted=unlisted)) == 10
    assert unlisted == {"many": 20}


def test_same_state_tells_a_copy_that_came_back_from_a_change() -> None:
    """Class attributes compared as sent and as they came back: functions by their code, the
    rest by their pickles in one pass (a list took a pickler per item: 9 s for a million)."""
    nb = notebook()
    f = nb["Counter"].scaled
    copy = _payload.loads(_payload.dumps(f, namespace=nb)[0].pickle, namespace={})
    assert copy is not f and _payload.same_state(f, copy)
    assert _payload.same_state({"a": [f, 1]}, {"a": [copy, 1]})  # inside containers too
    vocab = [f"tok{i}" for i in range(100_000)]
    assert _payload.same_state(vocab, pickle.loads(pickle.dumps(vocab)))
    assert not _payload.same_state(vocab, [*vocab[:-1], "changed"])
    assert not _payload.same_state({"a": f}, {"a": lambda v: v})


def test_a_background_job_s_change_merges_with_changes_made_meanwhile() -> None:
    # a review: values that come back as copies (numpy scalars, NaN) read as changed by the
    # job, so its stale copy overwrote what another job had set meanwhile
    np = pytest.importorskip("numpy")
    from gpu_magic._payload import in_place_state, merged_state, shallow_base

    nan = float("nan")
    sent = {"A": np.float64(0.5), "B": np.float64(0.5), "gone": 1, "x": nan}
    base = shallow_base(sent)
    assert base is not None
    # the job set B, deleted "gone" and touched nothing else (its values came back as copies)
    job = {"A": np.float64(0.5), "B": np.float64(0.7), "x": float("nan")}
    here = dict(sent, A=np.float64(0.9))  # another job set A meanwhile
    got = merged_state(base, here, in_place_state(job))
    assert got is not None
    state, changed_here, both = got
    merged = dict(zip(*state[2]))
    assert changed_here and both == []
    assert merged["A"] == 0.9 and merged["B"] == 0.7 and "gone" not in merged
    # both changed one entry: the job's value, said
    here = dict(sent, B=np.float64(0.1))
    state, _, both = merged_state(base, here, in_place_state(job))  # type: ignore[misc]
    assert dict(zip(*state[2]))["B"] == 0.7 and both == ["'B'"]
    # nothing changed here: the job's state as it came
    assert merged_state(base, sent, in_place_state(job)) == (in_place_state(job), False, [])
    # lists: appended on both sides keeps both, in order; anything else is the job's
    lst = [np.float64(1.0)]
    state, _, _ = merged_state(shallow_base(lst), lst + [2.0],  # type: ignore[arg-type,misc]
                               in_place_state([np.float64(1.0), 3.0]))
    assert state[2] == [1.0, 2.0, 3.0]
    assert merged_state(shallow_base(lst), [9.0], in_place_state([1.0, 3.0])) is None  # type: ignore[arg-type]


def test_counts_add_up_even_when_two_jobs_add_the_same() -> None:
    # a review: two jobs' `c["x"] += 1` from an empty Counter made 1, not 2 (the equal
    # values read as one change)
    import collections

    from gpu_magic._payload import _changeable, in_place_state, merged_state, shallow_base

    sent = collections.Counter()
    base = shallow_base(sent)
    assert base is not None
    after_first = collections.Counter(x=1)  # the first job's count, bound already
    state, _, both = merged_state(base, after_first,  # type: ignore[misc]
                                  in_place_state(collections.Counter(x=1)))
    assert dict(zip(*state[2])) == {"x": 2} and both == []
    # (the merge's own set of containers is apart from the one that decides what keeps its
    # identity inside the inputs, a bytearray among them)
    assert _changeable(bytearray(b"ab"))


@pytest.mark.parametrize("size", [0, 1, _payload.PIECE - 1, _payload.PIECE, _payload.PIECE + 1,
                                  3 * _payload.PIECE + 5])
def test_a_digest_by_pieces_is_the_documented_one_and_streams_alike(size: int) -> None:
    import xxhash

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    d = _payload.digest(data, pieces=True)
    if size <= _payload.PIECE:  # one piece: the plain digest, shared with older clients
        assert d == "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)
    else:
        parts = [data[i:i + _payload.PIECE] for i in range(0, size, _payload.PIECE)]
        assert d == "xxh3-128-16m:" + xxhash.xxh3_128_hexdigest(
            b"".join(xxhash.xxh3_128_digest(p) for p in parts))
    assert _payload.is_digest(d) and _payload.digest_of(data, like=d) == d
    # as an upload arrives: in chunks that straddle the pieces' edges, or match them
    for step in (7_777_777, _payload.PIECE):
        checker = _payload.Checker(d)
        for i in range(0, size, step):
            checker.update(memoryview(data)[i:i + step])
        assert checker.result() == d
    assert _payload.digest(data) == "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)


def test_a_forked_child_names_by_pieces_too() -> None:
    # the pool's threads do not live in a child: it waited on them for ever (a review)
    import time
    import warnings

    data = bytes(2 * _payload.PIECE + 1)
    named = _payload.digest(data, pieces=True)  # the pool is made here, before the fork
    with warnings.catch_warnings():  # (3.12 warns of fork() beside threads: the point here)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        os._exit(0 if _payload.digest(data, pieces=True) == named else 1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's digest did not end within 20 s")
