"""Turning a job's inputs (and results) into content-addressed blobs, and back.

All values of one direction travel in ONE cloudpickle (protocol 5), so two names for one object
stay one object and notebook functions share one globals dict. Large buffers (numpy arrays,
tensors, bytes) go out of band, each its own blob named by a self-describing digest
(``xxh3-128:<hex>``, or ``xxh3-128-16m:<hex>`` by its pieces): unchanged arrays are never
uploaded twice.

The namespace the notebook's functions live in is pickled as a *persistent id*, not by value: on
the other side it becomes the namespace the cell runs in (runner) or is bound into (client), so a
function sees the cell's later assignments as it would locally.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import copyreg
import ctypes
import dis
import functools
import gc
import io
import linecache
import os
import pickle
import re
import sys
import threading
import types
import typing
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import xxhash

from ._errors import SerializationError

DIGEST_PREFIX = "xxh3-128:"
# Buffers below this stay inside the pickle: a blob round trip costs more than copying them.
INLINE_LIMIT = 64 * 1024
NAMESPACE_PID = "gpu_magic:namespace"
INPUT_PID = "gpu_magic:input"
# an object inside an input (``models[0]``, ``params["W"]``), by its place in the inputs'
# pickle: it comes back as the sender's own object, its new state applied to it
INSIDE_PID = "gpu_magic:inside"


# A large blob may be named by the digest of its pieces instead, hashed on several threads:
# xxh3-128 of the concatenated 16-byte xxh3-128 digests of its 16 MiB pieces (only for blobs
# over 16 MiB). One pass of plain xxh3 was all of a rerun whose 1 GiB input had not changed
# (0.12 s on a 16-core GPU box, a fifth of its first upload): the pieces go in parallel. A
# client uses it where the gateway's health lists it in ``digests``.
PIECES_SCHEME = "xxh3-128-16m"
PIECES_PREFIX = PIECES_SCHEME + ":"
PIECE = 16 << 20
SCHEMES = ("xxh3-128", PIECES_SCHEME)
_POOL: list[Any] = []
_POOL_LOCK = threading.Lock()


def digest(data: bytes | bytearray | memoryview, pieces: bool = False) -> str:
    """The self-describing content digest of some bytes; ``pieces``: by its pieces where it
    is large enough to have several."""
    view = byte_view(data)
    if not pieces or view.nbytes <= PIECE:
        return DIGEST_PREFIX + xxhash.xxh3_128_hexdigest(view)
    parts = [view[i:i + PIECE] for i in range(0, view.nbytes, PIECE)]
    with _POOL_LOCK:
        if not _POOL:
            from concurrent.futures import ThreadPoolExecutor

            from ._reserve import usable_cores

            # (xxhash lets go of the GIL; memory bandwidth, not cores, bounds it past a few)
            _POOL.append(ThreadPoolExecutor(min(8, usable_cores()),
                                            thread_name_prefix="gpu_magic digest"))
    try:
        digests = list(_POOL[0].map(xxhash.xxh3_128_digest, parts))
    except RuntimeError:  # (the interpreter is shutting down: no new threads)
        digests = [xxhash.xxh3_128_digest(p) for p in parts]
    return PIECES_PREFIX + xxhash.xxh3_128_hexdigest(b"".join(digests))


def _forget_pool() -> None:
    # a forked child has the pool but none of its threads: it would wait on them for ever
    global _POOL_LOCK
    _POOL.clear()
    _POOL_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def digest_of(data: Any, like: str) -> str:
    """The digest of ``data`` in the scheme of the digest ``like`` (to check a claimed one)."""
    return digest(data, pieces=like.startswith(PIECES_PREFIX))


class Checker:
    """A running digest in the scheme of the digest ``like`` names (fed piece by piece, as an
    upload arrives): ``result()`` is what :func:`digest` gives for the bytes fed."""

    def __init__(self, like: str = DIGEST_PREFIX) -> None:
        self.pieces = like.startswith(PIECES_PREFIX)
        self._h = xxhash.xxh3_128()
        self._filled = 0
        self._digests: list[bytes] = []

    def update(self, data: Any) -> None:
        if not self.pieces:
            self._h.update(data)
            return
        view = byte_view(data)
        while view.nbytes:
            if self._filled == PIECE:  # (closed only once more follows: one piece is plain)
                self._digests.append(self._h.digest())
                self._h, self._filled = xxhash.xxh3_128(), 0
            take = min(view.nbytes, PIECE - self._filled)
            self._h.update(view[:take])
            self._filled += take
            view = view[take:]

    def result(self) -> str:
        if not self._digests:
            return DIGEST_PREFIX + self._h.hexdigest()
        return PIECES_PREFIX + xxhash.xxh3_128_hexdigest(b"".join([*self._digests,
                                                                   self._h.digest()]))


def byte_view(data: Any) -> memoryview:
    """``data`` as a flat view of bytes (an array's buffer may be typed or many-dimensional)."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def is_digest(value: str) -> bool:
    """Whether ``value`` looks like a digest we produce (used to validate untrusted input)."""
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


_DIGEST_RE = re.compile("(?:" + "|".join(map(re.escape, SCHEMES)) + "):[0-9a-f]{32}")


@dataclass
class Packed:
    """One pickle plus its out-of-band buffers, each named by digest."""

    pickle: bytes
    buffers: list[memoryview] = field(default_factory=list)
    buffer_digests: list[str] = field(default_factory=list)
    pickle_digest: str = ""
    # the classes it holds by value, by id, each with its attributes as sent (see loads)
    classes: dict[int, tuple[type, dict[str, Any]]] = field(default_factory=dict, repr=False)
    # the objects inside it that a cell may change in place, by their place in the pickle
    # (``dumps(..., keep_objects=True)``): what a result names with INSIDE_PID
    objects: SentObjects | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.pickle_digest:
            self.pickle_digest = digest(self.pickle)

    @property
    def manifest(self) -> dict[str, Any]:
        return {"pickle": self.pickle_digest, "buffers": list(self.buffer_digests)}

    def blobs(self) -> dict[str, memoryview]:
        """Every blob of this payload by digest (a buffer shared twice is listed once)."""
        out: dict[str, memoryview] = {self.pickle_digest: memoryview(self.pickle)}
        for d, b in zip(self.buffer_digests, self.buffers):
            out.setdefault(d, b)
        return out

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blobs().values())


def _ipython_shell() -> Any:
    """The IPython shell of this process (the notebook's kernel, or the runner's), if any."""
    ipython = sys.modules.get("IPython")
    return ipython.get_ipython() if ipython is not None else None


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, plus: the notebook namespace by reference, CUDA tensors onto the CPU."""

    def __init__(
        self,
        file: io.BytesIO,
        namespace: Mapping[str, Any] | None,
        input_refs: Mapping[int, str] | None = None,
        inside_refs: Places | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(file, protocol=5, **kw)
        self._namespace_id = id(namespace) if namespace is not None else None
        self._input_refs = input_refs or {}
        self._inside_refs = inside_refs
        self._inside_sent: set[int] = set()
        self._inside_new: set[int] = set()
        self.cuda_moved = 0
        self.globals_ref = _GlobalsRef(self)
        self._module_dicts: dict[int, types.ModuleType] | None = None
        self._makers: dict[int, _ModuleMaker] = {}
        self.classes: dict[int, tuple[type, dict[str, Any]]] = {}
        self._shell = _ipython_shell()
        # numpy views over memory another array of this pickle has (see _view): the arrays
        # pickled so far, by id, and the spans planned for views whose base is not sent
        self._arrays: dict[int, Any] | None = None
        self._spans: dict[int, tuple[Any, int]] = {}

    def by_value_module(self, dict_id: int) -> types.ModuleType | None:
        """The module sent by value (a local one) whose ``__dict__`` has this id, if any."""
        if self._module_dicts is None:
            # (none registered, as where cells run: no look through sys.modules for each
            # pickler, and a fingerprint makes one per input; a package registered by value
            # sends its submodules by value too)
            registered = cloudpickle.list_registry_pickle_by_value()
            self._module_dicts = {
                id(m.__dict__): m for name, m in list(sys.modules.items())
                if (name in registered or name.partition(".")[0] in registered)
                and isinstance(m, types.ModuleType)} if registered else {}
        return self._module_dicts.get(dict_id)

    def maker(self, module: types.ModuleType) -> _ModuleMaker:
        if id(module) not in self._makers:
            self._makers[id(module)] = _ModuleMaker(module.__name__)
        return self._makers[id(module)]

    def persistent_id(self, obj: Any) -> Any:
        if self._input_refs:
            name = self._input_refs.get(id(obj))
            if name is not None:
                return (INPUT_PID, name)
        if self._inside_refs is not None and self._inside_refs.by_id:
            place = self._inside_refs.get(obj)
            if place is not None:
                return self._inside(obj, place)
        if type(obj) is dict and self._namespace_id is not None:
            if obj is self.globals_ref.get(self._namespace_id):
                return NAMESPACE_PID
        return None

    def _inside(self, obj: Any, place: int) -> Any:
        """An object that arrived inside an input: a reference to the sender's own, with its
        state here the first time (it is the same object each time after that) and whether
        the cell changed it (a receiver without that object makes one of that state)."""
        if place in self._inside_sent:
            return (INSIDE_PID, place, None, type(obj), False)
        state = None if place in self._inside_new else in_place_state(obj)
        if state is None:
            self._inside_new.add(place)
            return None  # (cannot be changed in place there: it travels as a new object)
        self._inside_sent.add(place)
        assert self._inside_refs is not None
        changed = self._inside_refs.changed(obj, place)
        return (INSIDE_PID, place, state, type(obj), changed)

    def _view(self, obj: Any) -> Any:
        """A numpy view whose memory another array of this pickle holds (its base, pickled
        before it, or a span planned by :func:`plan_spans`) travels as a view of that array:
        sent as copies, ``X_train = X[:8]`` no longer saw ``X -= 100`` in the cell, and two
        overlapping views each came back over the other's part."""
        assert self._arrays is not None
        root = _root(obj)
        if root is not obj and id(root) in self._arrays:
            base, at = root, 0
        elif id(obj) in self._spans:
            base, at = self._spans[id(obj)]
        else:  # sent as itself: a view pickled after it can be of it
            self._arrays[id(obj)] = obj
            return None
        offset = _address(obj) - _address(root) - at
        return _view_of, (base, offset, obj.shape, obj.strides, obj.dtype, obj.flags.writeable)

    def reducer_override(self, obj: Any) -> Any:
        if obj is self._shell and obj is not None:
            # `ip = get_ipython()`: each side's own shell, as the name holds it in a local
            # cell (a trial: trying to copy the shell took 0.6 s, and the name came back
            # unbound with a note about its locks)
            return _ipython_shell, ()
        if isinstance(obj, io.IOBase) and not isinstance(obj, (io.BytesIO, io.StringIO)):
            # cloudpickle would quietly send a snapshot of a file open for reading; an open
            # file cannot really travel, so say so (diagnose() names the path to it)
            raise pickle.PicklingError(f"cannot send an open file ({type(obj).__name__})")
        if _is_cuda_tensor(obj):
            self.cuda_moved += 1
            return _on_cpu(obj).__reduce_ex__(5)
        if self._arrays is not None and type(obj) is _ndarray_type():
            reduced = self._view(obj)
            if reduced is not None:
                return reduced
        reduced = _reduce_storage(obj)
        if reduced is not None:
            return reduced
        if isinstance(obj, types.ModuleType) and self.by_value_module(id(obj.__dict__)) is obj:
            state = {k: v for k, v in vars(obj).items() if k != "__builtins__"}
            return _same_module, (self.maker(obj),), state, None, None, _fill_module
        if type(obj) in _BY_NAME_WRAPPERS:
            reduced = _reduce_wrapper(obj)
            if reduced is not None:
                return reduced
        if type(obj) is types.FunctionType and hasattr(obj, "registry"):
            reduced = _reduce_singledispatch(obj)
            if reduced is not None:
                return reduced
        if isinstance(obj, type) and not cloudpickle.cloudpickle._should_pickle_by_reference(obj):
            self.classes[id(obj)] = (obj, dict(vars(obj)))  # (once: pickle memoizes classes)
        if type(obj) is types.CodeType:
            lines = _cell_lines(obj.co_filename)
            if lines is not None:
                shift, lines = _shifted(obj.co_filename, lines)
                if shift:
                    obj = obj.replace(co_firstlineno=obj.co_firstlineno + shift)
                return _code_in_file, (cloudpickle.cloudpickle._code_reduce(obj),
                                       obj.co_filename, lines)
        return super().reducer_override(obj)


# --- the source of notebook code ---
#
# cloudpickle sends code as from "<dynamic-code>": where the cell ran, inspect.getsource of a
# notebook function failed, and so did what needs it (torch.jit.script, triton.jit), and
# tracebacks had no line to show. Code from a notebook cell (a file linecache holds but no
# disk does) travels with its file name and the cell's lines, which the other side adds to
# its linecache (once per pickle: the lines are one object, memoized), unless it has that
# file already. Both ways: a function made in a %%gpu cell comes back with its source too.

CELL_SOURCE_MAX = 1 << 20  # a larger "cell" travels as cloudpickle sends it, without source


# The cell running here, by the name its code was compiled under, and how many lines the
# notebook counts before the first line it compiled (the %%gpu line, blank lines IPython took
# off): its code travels back numbered as the notebook numbers the cell (set by the runner).
CELL_SHIFTS: dict[str, int] = {}
_SHIFTED: dict[tuple[str, int], list[str]] = {}  # (one list per cell: pickle memoizes it)


def _shifted(filename: str, lines: list[str]) -> tuple[int, list[str]]:
    shift = CELL_SHIFTS.get(filename, 0)
    if not shift:
        return 0, lines
    key = (filename, shift)
    if key not in _SHIFTED:
        _SHIFTED.clear()
        _SHIFTED[key] = ["\n"] * shift + list(lines)
    return shift, _SHIFTED[key]


def _cell_lines(filename: str) -> list[str] | None:
    entry = linecache.cache.get(filename)
    if entry is None or len(entry) != 4 or entry[1] is not None:
        return None  # not a cell: a file on disk (or none), which the other side may not have
    lines = entry[2]
    return lines if isinstance(lines, list) and entry[0] <= CELL_SOURCE_MAX else None


def _code_in_file(reduced: tuple[Any, tuple[Any, ...]], filename: str,
                  lines: list[str]) -> types.CodeType:
    if filename not in linecache.cache:
        linecache.cache[filename] = (sum(map(len, lines)), None, list(lines), filename)
    make, args = reduced
    code: types.CodeType = make(*args)
    return code.replace(co_filename=filename)


# --- local modules: one module where the cell runs ---
#
# cloudpickle sends a local module's functions with a globals dict of their own and the module
# object with a copy of its __dict__: where the cell ran, `helpers.SCALE = 10` then did not
# reach `helpers.scaled()`, nor `helpers.set_scale(7)` the module. Here both are made around
# one new module, whose __dict__ is its functions' globals, as in the notebook.


class _ModuleMaker:
    """Unpickles as a new, empty module of that name (memoised: one per module sent)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return _new_module, (self.name,)


SENT_MARK = "__gpu_magic_sent__"  # in a module made where the cell runs from one sent by value


_ARRIVED: list[types.ModuleType] = []  # made by loads, taken by the runner (take_arrived)


def _new_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__[SENT_MARK] = True
    _ARRIVED.append(module)
    return module


def take_arrived() -> list[types.ModuleType]:
    """The local modules made by the loads since the last call."""
    made = list(_ARRIVED)
    _ARRIVED.clear()
    return made


def arrived_by_value(obj: Any) -> bool:
    """A local module made here from one sent by value (see _ModuleMaker)."""
    return isinstance(obj, types.ModuleType) and obj.__dict__.get(SENT_MARK) is True


def _is_code(value: Any) -> bool:
    """A module's functions, classes, submodules and wrapped functions: what the notebook's
    module has already, and what a cell's change to a module never brings back as a copy."""
    return isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type,
                               types.ModuleType, functools.partial)) or (
        type(value) in _BY_NAME_WRAPPERS)


def _own_attrs(module: types.ModuleType) -> dict[str, Any]:
    """A module's attributes but its dunders (its name, file, builtins, our marks)."""
    return {k: v for k, v in vars(module).items() if not (k.startswith("__") and
                                                          k.endswith("__"))}


def module_snapshot(module: types.ModuleType, namespace: Mapping[str, Any] | None = None,
                    known: Callable[[memoryview], str | None] | None = None) -> tuple[Any, ...]:
    """What a module that arrived holds, to tell afterwards what the cell changed in it:
    its data attributes' fingerprints, and every attribute's object (kept, so ids stay)."""
    attrs = _own_attrs(module)
    prints = {k: fingerprint(v, namespace, known, own_state=True)
              for k, v in attrs.items() if not _is_code(v)}
    return attrs, prints


def module_changes(module: types.ModuleType, snapshot: tuple[Any, ...],
                   namespace: Mapping[str, Any] | None = None,
                   known: Callable[[memoryview], str | None] | None = None,
                   ) -> tuple[Any, ...] | None:
    """``("module", ModuleType, name, changes, deleted)``: the attributes the cell set or
    changed (``("value", v)``, or ``("same_as", other)`` for another attribute's object as it
    arrived: the notebook's module has its own) and those it deleted; None if none."""
    attrs, prints = snapshot
    by_id = {id(v): k for k, v in attrs.items()}
    changes: dict[str, tuple[str, Any]] = {}
    now = _own_attrs(module)
    for k, v in now.items():
        if k in attrs and attrs[k] is v and _is_code(v):
            continue
        if (k not in attrs or attrs[k] is not v) and id(v) in by_id and attrs[by_id[id(v)]] is v:
            changes[k] = ("same_as", by_id[id(v)])  # (helpers.hook = helpers.other)
            continue
        if _is_code(v):
            if k not in attrs or attrs[k] is not v:
                if getattr(v, "__module__", None) != module.__name__:
                    changes[k] = ("value", v)  # made in the cell (or elsewhere): it travels
            continue
        fp = fingerprint(v, namespace, known, own_state=True)
        if fp is not None and (k not in prints or fp != prints[k]):
            changes[k] = ("value", v)
    deleted = [k for k in attrs if k not in now]
    if not changes and not deleted:
        return None
    return ("module", types.ModuleType, module.__name__, changes, deleted)


class _ModuleGlobals(dict):  # type: ignore[type-arg]
    """In the pickler's ``globals_ref``, a local module's __dict__: the globals cloudpickle
    gives that module's functions unpickle as the new module's own __dict__."""

    def __init__(self, maker: _ModuleMaker) -> None:
        super().__init__()
        self.maker = maker

    def __reduce__(self) -> tuple[Any, ...]:
        return _module_dict, (self.maker,)


class _GlobalsRef(dict):  # type: ignore[type-arg]
    """cloudpickle's ``id(func.__globals__) -> globals to send`` map, with local modules'
    __dict__ standing for themselves."""

    def __init__(self, pickler: _Pickler) -> None:
        super().__init__()
        # weakly: a cycle with the pickler kept it, and what it pickled (the inputs' places,
        # so a cell's inputs), until a collection, where a DataLoader's persistent workers
        # found their queues gone and waited 5 s each to be told to stop
        self._pickler = weakref.ref(pickler)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        pickler = self._pickler()
        if key not in self and pickler is not None:
            module = pickler.by_value_module(key)
            if module is not None:
                default = _ModuleGlobals(pickler.maker(module))
        return super().setdefault(key, default)


def _module_dict(module: types.ModuleType) -> dict[str, Any]:
    return module.__dict__


def _same_module(module: types.ModuleType) -> types.ModuleType:
    return module


WHOLE_MARK = "__gpu_magic_whole__"  # the module itself was sent, not only its functions


def _fill_module(module: types.ModuleType, state: dict[str, Any]) -> None:
    module.__dict__.update(state)
    module.__dict__.setdefault("__builtins__", builtins.__dict__)
    module.__dict__[WHOLE_MARK] = True


# --- notebook objects that pickle by name ---
#
# A cached function (functools.lru_cache, cache), a NewType and a cached_property pickle
# themselves by their qualified name, which names nothing where the cell runs when they were
# made in the notebook (__main__) or a module sent by value. They travel as what they wrap
# instead, made again there (an lru cache starts empty).


def _made_here(module: str | None) -> bool:
    return (module == "__main__" or module in cloudpickle.list_registry_pickle_by_value()
            or arrived_by_value(sys.modules.get(module or "")))


def _reduce_wrapper(obj: Any) -> tuple[Any, ...] | None:
    if isinstance(obj, functools.cached_property):
        # (a class sent by value carries it; 3.11's holds a lock, which cannot travel)
        return _cached_property, (obj.func, obj.attrname, obj.__doc__)
    if isinstance(obj, typing.NewType):
        if not _made_here(getattr(obj, "__module__", None)):
            return None
        return _new_type, (obj.__name__, obj.__supertype__, obj.__module__)
    wrapped = getattr(obj, "__wrapped__", None)
    if not callable(wrapped) or not _made_here(getattr(wrapped, "__module__", None)):
        return None
    params = obj.cache_parameters()
    # the function travels as state, after the cache itself is made: it may call itself
    # (through the name of its cache) and its pickle then finds the cache in the memo
    return (_lru_cache, (params["maxsize"], params["typed"]), (wrapped, dict(vars(obj))),
            None, None, _lru_cache_state)


class _Target:
    """What a cache made again calls: the function, once it has arrived."""

    __slots__ = ("func",)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)


def _lru_cache(maxsize: int | None, typed: bool) -> Any:
    return functools.lru_cache(maxsize=maxsize, typed=typed)(_Target())


def _lru_cache_state(cache: Any, state: tuple[Any, dict[str, Any]]) -> None:
    func, attrs = state
    cache.__wrapped__.func = func
    vars(cache).update(attrs)  # its name, doc, module and __wrapped__, as update_wrapper set


_DISPATCH_PARTS = frozenset({"registry", "dispatch", "register", "_clear_cache", "__wrapped__"})


def _reduce_singledispatch(obj: Any) -> tuple[Any, ...] | None:
    """A notebook function made by ``functools.singledispatch``: its closure holds a cache of
    weak references, which cannot travel ("cannot be sent: show.register (closure variable
    dispatch_cache)", a trial). It travels as its function, its implementations and its
    attributes, and is made again where it arrives (its cache empty)."""
    registry = getattr(obj, "registry", None)
    wrapped = getattr(obj, "__wrapped__", None)
    if not (isinstance(registry, types.MappingProxyType) and callable(wrapped)
            and callable(getattr(obj, "register", None))
            and _made_here(getattr(wrapped, "__module__", None))):
        return None
    impls = {cls: f for cls, f in registry.items() if cls is not object}
    attrs = {k: v for k, v in vars(obj).items() if k not in _DISPATCH_PARTS}
    # (as for a cache: made first, its parts after, so that an implementation calling the
    # function by its name finds it in the memo)
    return _singledispatch, (), (wrapped, impls, attrs), None, None, _singledispatch_state


def _singledispatch() -> Any:
    return functools.singledispatch(_Target())


def _singledispatch_state(made: Any, state: tuple[Any, dict[type, Any], dict[str, Any]]) -> None:
    func, impls, attrs = state
    made.registry[object].func = func
    functools.update_wrapper(made, func)  # its name, doc and module, as singledispatch set
    vars(made).update(attrs)
    for cls, impl in impls.items():
        made.register(cls, impl)


def _cached_property(func: Any, attrname: str | None, doc: str | None) -> Any:
    prop = functools.cached_property(func)
    prop.attrname = attrname  # (set by the class statement, which a class sent by value skips)
    prop.__doc__ = doc
    return prop


def _new_type(name: str, supertype: Any, module: str) -> Any:
    made = typing.NewType(name, supertype)
    made.__module__ = module
    return made


_BY_NAME_WRAPPERS = frozenset({
    type(functools.lru_cache(maxsize=None)(len)), functools.cached_property, typing.NewType})


def _is_cuda_tensor(obj: Any) -> bool:
    # torch only if it is already imported: the client never imports it itself; storages are
    # not asked (their is_cuda warns that TypedStorage is deprecated)
    torch = sys.modules.get("torch")
    if torch is None or not type(obj).__module__.startswith("torch"):
        return False
    return isinstance(obj, torch.Tensor) and bool(obj.is_cuda)


# --- torch storages out of band ---
#
# torch pickles a tensor as its storage plus where it lies in it, and a storage as a torch.save
# of its bytes made in band: four copies, ~1 GiB/s, and a whole new payload when one small
# input changed. A CPU storage travels here as its own bytes instead, out of band like an
# array's (no copy; unchanged ones are never sent again), and everything else about the tensor
# (its type, Parameter, dtype, view, requires_grad, state) stays torch's own pickling. The
# pickler's memo keeps one storage one storage, so views and tied weights still share it.


def _reduce_storage(obj: Any) -> tuple[Any, ...] | None:
    torch = sys.modules.get("torch")
    if torch is None or not type(obj).__module__.startswith("torch"):
        return None
    t = type(obj)
    if t is torch.storage.TypedStorage:
        untyped = obj._untyped_storage
        # only if its bytes can travel our way: torch's own way pickles a typed storage whole
        # (an untyped one it pickles cannot be loaded: UntypedStorage has no dtype)
        if _reduce_storage(untyped) is None:
            return None
        return (_typed_storage, (untyped, obj.dtype))
    if t is not torch.UntypedStorage or obj.device.type != "cpu":
        return None
    try:
        import numpy as np  # (a storage's bytes are seen through a numpy array)
        flat = _storage_bytes(torch, obj)
        # through DLPack, not .numpy(): that marks the storage not resizable for good, and
        # the notebook's own tensor could then no longer be resized (x.resize_(), out=). The
        # price: nothing stops another thread resizing it while its bytes are being sent
        # (hashed, written, uploaded), which would read freed memory. Only a thread the
        # notebook or the cell started could; a numpy array is locked by its export instead.
        view = np.from_dlpack(flat)
    except Exception:
        return None  # torch's own way, then
    return (_untyped_storage, (pickle.PickleBuffer(view),))


def _storage_bytes(torch: Any, storage: Any) -> Any:
    """A CPU storage's bytes as a flat uint8 tensor on them (on the CPU whatever torch's
    default device: torch.set_default_device("cuda") in a cell)."""
    return torch.empty(0, dtype=torch.uint8, device="cpu").set_(
        storage, 0, (storage.nbytes(),), (1,))


def _untyped_storage(buf: Any) -> Any:
    import torch

    view = byte_view(buf)
    if view.nbytes == 0:
        return torch.UntypedStorage(0)
    if not view.readonly and view.nbytes >= INLINE_LIMIT:
        data = torch.frombuffer(view, dtype=torch.uint8)
        if data.data_ptr() % 16 == 0:
            # on the very memory its bytes arrived in, uncopied: a copy into fresh memory cost
            # as much again as the whole trip (0.1-0.25 s per 256 MiB on the VMs measured).
            # The price: torch cannot resize a storage on memory it did not allocate
            # (x.resize_(), an out= tensor of another size), as numpy cannot such an array.
            return data.untyped_storage()
    # small, read-only or at an odd offset: memory of torch's own, writable, aligned and
    # resizable as a storage torch unpickles is
    own = torch.empty(view.nbytes, dtype=torch.uint8, device="cpu")
    try:
        import numpy as np

        np.from_dlpack(own)[:] = np.frombuffer(view, dtype=np.uint8)  # (.numpy() would pin it)
    except ImportError:
        own.copy_(torch.frombuffer(bytearray(view) if view.readonly else view, dtype=torch.uint8))
    return own.untyped_storage()


def _typed_storage(untyped: Any, dtype: Any) -> Any:
    import torch

    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _on_cpu(tensor: Any) -> Any:
    """A CUDA tensor's copy on the CPU, as it would pickle on the CPU: a copy such as
    ``.cpu()`` makes is a plain tensor computed from it (a model's Parameters came back as
    tensors that were no Parameters), so the type, leafness and attributes are put back."""
    torch = sys.modules["torch"]
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return tensor.cpu()  # a subclass: its own ``.cpu()`` knows what it is
    moved = tensor.detach().cpu()
    if type(tensor) is torch.nn.Parameter:
        moved = torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
    elif tensor.requires_grad:
        moved.requires_grad_(True)  # as torch rebuilds a tensor that needs gradients
    if tensor.__dict__:
        moved.__dict__.update(tensor.__dict__)
    return moved


_REGISTRY_LOCK = threading.RLock()  # (a diagnosis pickles inside a dumps-like hold)

# (base folder, module name, file) -> whether that module is a local one; resolving every
# module's path on every cell cost ~100 ms with a few thousand modules imported
_LOCAL_CACHE: dict[tuple[str, str, str], bool] = {}


def installed_top_levels() -> set[str]:
    """Top-level import names that belong to an installed distribution (editable ones too):
    those are importable on the runner and travel by reference, even if they sit beside the
    notebook (a project checked out with `pip install -e .`)."""
    global _INSTALLED
    if _INSTALLED is None:
        from importlib import metadata

        try:
            _INSTALLED = set(metadata.packages_distributions())
        except Exception:
            _INSTALLED = set()
        _INSTALLED.add("gpu_magic")
    return _INSTALLED


_INSTALLED: set[str] | None = None


def is_local(base: Path, name: str, file: str) -> bool:
    """Whether module ``name`` (from ``file``) is the user's own, beside the notebook under
    ``base``: not installed (editable installs included), not in the interpreter's prefixes."""
    key = (str(base), name, file)
    hit = _LOCAL_CACHE.get(key)
    if hit is not None:
        return hit
    local = False
    if name.partition(".")[0] in installed_top_levels():
        _LOCAL_CACHE[key] = False
        return False
    if not os.path.isabs(file):
        _LOCAL_CACHE[key] = False  # a synthetic module (torch.ops has '_ops.py'): not a file here
        return False
    try:
        path = Path(file).resolve()
        prefixes = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
        local = (path.is_relative_to(base)
                 and not any(path.is_relative_to(p) for p in prefixes)
                 and "site-packages" not in path.parts and "dist-packages" not in path.parts)
    except (OSError, ValueError):
        local = False
    _LOCAL_CACHE[key] = local
    return local


def _local_modules(base: Path | None) -> list[types.ModuleType]:
    """User modules beside the notebook (under ``base``), which must travel by value."""
    if base is None:
        return []
    # sys.modules rarely changes between two cells: a new import grows it or changes its last
    # key (dicts keep insertion order), so (size, last key) tells when to look again. (The
    # folder as given: resolving it, a few system calls, cost more than the rest of a hit.)
    modules = sys.modules
    key = (str(base), len(modules), next(reversed(modules), None))
    hit = _LOCAL_MODULES.get(key)
    if hit is not None and all(modules.get(m.__name__) is m for m in hit):
        return list(hit)
    base = base.resolve()
    found: dict[str, types.ModuleType] = {}
    for name, mod in list(modules.items()):
        file = getattr(mod, "__file__", None)
        if not file or name == "__main__" or not file.endswith(".py"):
            continue
        if is_local(base, name, file):
            found[name.partition(".")[0]] = sys.modules.get(name.partition(".")[0], mod)
    _LOCAL_MODULES.clear()
    _LOCAL_MODULES[key] = list(found.values())
    return list(found.values())


_LOCAL_MODULES: dict[tuple[str, int, str | None], list[types.ModuleType]] = {}


@contextlib.contextmanager
def by_value_here(local_dir: Path | None) -> Iterator[None]:
    """The notebook's own modules (under ``local_dir``) pickled by value meanwhile."""
    local = _local_modules(local_dir)
    # cloudpickle's by-value registry is global: threads pickling at once take turns
    with _REGISTRY_LOCK if local else contextlib.nullcontext():
        registered = []
        for mod in local:
            try:
                cloudpickle.register_pickle_by_value(mod)
                registered.append(mod)
            except ValueError:
                pass
        try:
            yield
        finally:
            for mod in registered:
                try:
                    cloudpickle.unregister_pickle_by_value(mod)
                except ValueError:
                    pass


def dumps(
    obj: Any,
    *,
    namespace: Mapping[str, Any] | None = None,
    local_dir: Path | None = None,
    input_refs: Mapping[int, str] | None = None,
    inside_refs: Places | None = None,
    keep_objects: bool = False,
    inline_limit: int = INLINE_LIMIT,
    hash_buffers: bool = True,
    views_among: Mapping[str, Any] | None = None,
) -> tuple[Packed, int]:
    """Pickle ``obj`` in one go; return the payload and how many CUDA tensors moved to the CPU.

    ``input_refs`` maps ``id()`` of objects the other side already holds to their input name:
    those travel as a reference and come back as the receiver's own object. ``inside_refs``
    does so for objects inside the inputs, by their place in the inputs' pickle (what
    ``loads(..., places=...)`` gave); ``keep_objects`` keeps those places of this pickle
    (``Packed.objects``), for the answer to name them.
    ``hash_buffers=False`` leaves ``buffer_digests`` empty for a caller that hashes the
    buffers while it writes them (one pass over a large result instead of two).
    ``views_among``: the named values (inside ``obj``) whose numpy views keep sharing memory
    with each other and with their bases where it is unpickled (see :func:`arrays_first`).
    """
    buffers: list[memoryview] = []

    def keep_out_of_band(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < inline_limit:
            return True  # True means: serialise in band
        buffers.append(raw)
        return False

    with by_value_here(local_dir):
        f = io.BytesIO()
        p = _Pickler(f, namespace, input_refs, inside_refs, buffer_callback=keep_out_of_band)
        if views_among is not None:
            p._arrays, p._spans = {}, plan_spans(views_among.values())
        p.dump(obj)
    data = f.getvalue()
    f.close()  # (its buffer: the pickler, kept for its memo, holds the file)
    packed = Packed(data, buffers, [digest(b) for b in buffers] if hash_buffers else [],
                    classes=p.classes,
                    # (CUDA inputs came back on the CPU, never fitting their own: and the
                    # pickler holds the host copies it made of them)
                    objects=SentObjects(p) if keep_objects and not p.cuda_moved else None)
    return packed, p.cuda_moved


class SentObjects:
    """The objects of a pickle we sent, by their place in it: read from its pickler's memo
    only when an answer names one (a memo of 600,000 entries takes 0.7 s to read here)."""

    def __init__(self, pickler: pickle.Pickler) -> None:
        self._pickler: pickle.Pickler | None = pickler
        self._by_place: dict[int, Any] = {}

    def get(self, place: int) -> Any:
        if self._pickler is not None:
            memo = self._pickler.memo.copy()
            self._pickler = None
            self._by_place = {i: o for i, o in memo.values() if _changeable(o)}
        return self._by_place.get(place)


# what a pickle's memo holds that is never changed in place (a cheap first test)
_UNCHANGEABLE = frozenset({
    str, bytes, tuple, int, float, complex, bool, frozenset, type(None), range, slice,
    types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType,
    types.CodeType, types.CellType, memoryview, pickle.PickleBuffer, staticmethod,
    classmethod, property})


def _changeable(obj: Any) -> bool:
    """Whether a cell may have changed ``obj`` in place and :func:`apply_in_place` could bring
    that back (checked fully when its state is taken; this only drops the many that cannot)."""
    t = type(obj)
    if t in _UNCHANGEABLE or t in _BY_NAME_WRAPPERS or isinstance(obj, type) or (
            t.__name__.endswith("Storage") and t.__module__.startswith("torch")):
        return False  # (a wrapper, a storage, travel their own way: see reducer_override)
    if t in _CONTAINERS:
        return True
    return t.__dictoffset__ != 0 or t.__module__ in ("numpy", "torch", "torch.nn.parameter")


class _Unpickler(pickle.Unpickler):
    def __init__(
        self,
        file: io.BytesIO,
        namespace: dict[str, Any],
        buffers: Iterable[Any],
        inputs: Mapping[str, Any],
    ) -> None:
        super().__init__(file, buffers=buffers)
        self._namespace = namespace
        self._inputs = inputs
        self.made: list[Any] | None = None
        self.classes: Mapping[int, tuple[type, dict[str, Any]]] = {}
        self.objects: SentObjects | None = None  # the sender's, by place
        self.changed: list[tuple[Any, tuple[Any, ...]]] = []  # (own object, its new state)
        self._inside: dict[int, Any] = {}  # place -> what it is here, once met
        self.filled: list[type] = []  # the classes sent by value filled so far

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if module.startswith("cloudpickle") and name == "_class_setstate":
            fill = functools.partial(_class_setstate, found, self.classes) if self.classes \
                else found
            return functools.partial(_class_filled, fill, self.filled)
        if module.startswith("cloudpickle") and name in _MAKERS:
            made, filled = self.made, self.filled

            def make(*args: Any, **kwargs: Any) -> Any:
                # making a class runs its bases' __init_subclass__ and its metaclass, which
                # may register it in a class filled already, whose state says so already: a
                # trial's Plugin.order came back ['A', 'A', 'B'], registry['A'] a copy
                kept = _class_containers(filled) if filled and name != "_make_function" else []
                obj = found(*args, **kwargs)
                _undo_changes(kept)
                if made is not None:
                    made.append(obj)
                return obj

            return make
        if name == "_frombuffer" and module in _NUMPY_NUMERIC:
            return functools.partial(_array_from_buffer, found)
        return found

    def persistent_load(self, pid: Any) -> Any:
        if pid == NAMESPACE_PID:
            return self._namespace
        if isinstance(pid, tuple) and len(pid) == 2 and pid[0] == INPUT_PID:
            if pid[1] in self._inputs:
                return self._inputs[pid[1]]
            raise MissingInput(pid[1])
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == INSIDE_PID:
            return self._inside_object(*pid[1:])
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")

    def _inside_object(self, place: int, state: tuple[Any, ...] | None, t: type,
                       changed: bool) -> Any:
        """The object at ``place`` in the inputs we sent: our own, its new state noted in
        ``changed`` if the cell changed it (applied when the results are bound, all or
        nothing); a new one of that state where we have none (attached elsewhere, or changed
        here meanwhile past fitting)."""
        obj = self._inside.get(place)
        mine = self.objects.get(place) if self.objects is not None else None
        if obj is None:
            own = mine
            if own is not None and type(own) is t and (state is None or fits(own, state)):
                obj = own
            elif state is not None:
                obj = fresh_from_state(state)
                state = None  # (already in it)
            else:  # met inside itself before its state (a cycle): filled when that comes
                obj = t() if issubclass(t, (list, set, bytearray, dict)) else t.__new__(t)
            self._inside[place] = obj
        if state is not None:
            if obj is mine:
                if changed:
                    self.changed.append((obj, state))
            else:
                apply_in_place(obj, state)  # (one made here: nobody else holds it yet)
        return obj


class MissingInput(pickle.UnpicklingError):
    """A result holds an input the cell left unchanged (sent back as the input's name), and the
    namespace it is rebuilt in has no such name: another kernel's %gpu attach."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


_NUMPY_NUMERIC = frozenset({"numpy.core.numeric", "numpy._core.numeric"})


def _ndarray_type() -> Any:
    numpy = sys.modules.get("numpy")
    return numpy.ndarray if numpy is not None else None


def _address(arr: Any) -> int:
    return int(arr.__array_interface__["data"][0])


def _root(arr: Any) -> Any:
    """The array whose memory the view ``arr`` is of (itself if it has its own), where a view
    of it can be made again: of a plain numpy array, in one piece (C or Fortran order)."""
    root = arr
    while type(root.base) is type(arr):
        root = root.base
    if root is arr or root.dtype.hasobject or not (
            root.flags.c_contiguous or root.flags.f_contiguous):
        return arr
    return root


def _array_extent(arr: Any) -> tuple[int, int]:
    """The bytes of memory the numpy array ``arr`` spans, from its first element's address."""
    lo = hi = 0
    for n, step in zip(arr.shape, arr.strides):
        if step < 0:
            lo += step * (n - 1)
        else:
            hi += step * (n - 1)
    return lo, hi + arr.itemsize


def plan_spans(values: Iterable[Any]) -> dict[int, tuple[Any, int]]:
    """For views among ``values`` whose base is not among them, but that overlap another
    view of the same base: the part of the base they cover together (one array, sent once)
    and where it begins, keyed by the view's id. Only where that part costs no more than
    the views would apart: ``big[::1000]`` beside ``big[1::1000]`` spans all of ``big``."""
    kind = _ndarray_type()
    if kind is None:
        return {}
    ids = {id(v) for v in values}
    groups: dict[int, list[tuple[int, int, Any]]] = {}
    roots: dict[int, Any] = {}
    for v in values:
        if type(v) is kind and v.size and (root := _root(v)) is not v and id(root) not in ids:
            at = _address(v) - _address(root)
            lo, hi = _array_extent(v)
            groups.setdefault(id(root), []).append((at + lo, at + hi, v))
            roots[id(root)] = root
    spans: dict[int, tuple[Any, int]] = {}
    for key, views in groups.items():
        clusters: list[list[tuple[int, int, Any]]] = []
        for view in sorted(views, key=lambda t: t[0]):
            if clusters and view[0] < max(hi for _, hi, _ in clusters[-1]):
                clusters[-1].append(view)
            else:
                clusters.append([view])
        flat = roots[key].reshape(-1, order="A")  # (in one piece: see _root)
        for cluster in clusters:
            lo, hi = cluster[0][0], max(hi for _, hi, _ in cluster)
            if len(cluster) < 2 or hi - lo > sum(v.nbytes for _, _, v in cluster):
                continue
            span = kind((hi - lo,), dtype="u1", buffer=flat, offset=lo)
            spans.update((id(v), (span, lo)) for _, _, v in cluster)
    return spans


def arrays_first(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with the numpy arrays that others are views of first: a view pickled after
    its base travels as a view of it (see _Pickler._view)."""
    kind = _ndarray_type()
    if kind is None:
        return dict(values)
    bases = {id(_root(v)) for v in values.values() if type(v) is kind}
    first = {n: v for n, v in values.items() if id(v) in bases}
    return {**first, **values}


def _view_of(base: Any, offset: int, shape: tuple[int, ...], strides: tuple[int, ...],
             dtype: Any, writeable: bool) -> Any:
    view = _ndarray_type()(shape, dtype, buffer=base, offset=offset, strides=strides)
    if not writeable and view.flags.writeable:
        view.flags.writeable = False
    return view


def _array_from_buffer(frombuffer: Callable[..., Any], buf: Any, *args: Any) -> Any:
    """numpy's own rebuilding of an array pickled with protocol 5 (a view of the bytes that
    arrived), except that a small one gets memory of its own: it can then be resized in place
    (``a.resize(n)``), as a local array can. A large one stays on the bytes that arrived,
    uncopied (see _untyped_storage)."""
    arr = frombuffer(buf, *args)
    if arr.nbytes >= INLINE_LIMIT:
        return arr
    own = arr.copy(order="K")
    if not arr.flags.writeable:
        own.flags.writeable = False
    return own


def _class_setstate(setstate: Callable[[type, Any], Any],
                    sent: Mapping[int, tuple[type, dict[str, Any]]], cls: type, state: Any) -> Any:
    """cloudpickle's filling of a class that came back: a class we sent is our own class again
    (cloudpickle tracks it), and cloudpickle sets every attribute the copy had onto it. Only
    what the cell changed is set: the notebook's methods stay themselves (their source file
    known to tracebacks, ``inspect``, ``torch.jit``), and one patched here meanwhile stays
    patched (a background job's class was reverted to what it sent)."""
    own = sent.get(id(cls))
    if own is None or own[0] is not cls:
        return setstate(cls, state)  # made by the cell, or not one of ours
    attrs, slots = state
    before = own[1]
    changed = {k: v for k, v in attrs.items() if k not in before or not same_state(before[k], v)}
    return setstate(cls, (changed, slots))


def _class_filled(fill: Callable[[type, Any], Any], filled: list[type], cls: type,
                  state: Any) -> Any:
    made = fill(cls, state)
    filled.append(cls)
    return made


def _class_containers(classes: list[type]) -> list[tuple[Any, Any]]:
    """The lists, dicts and sets the attributes of ``classes`` hold, each with a copy."""
    return [(v, v.copy()) for cls in classes for v in vars(cls).values()
            if type(v) in (list, dict, set)]


def _undo_changes(kept: list[tuple[Any, Any]]) -> None:
    """Bring each container back to its copy where it changed since the copy was taken."""
    for value, was in kept:
        if type(value) is dict:
            same = len(value) == len(was) and all(
                a is b and x is y for (a, x), (b, y) in zip(value.items(), was.items()))
        elif type(value) is list:
            same = len(value) == len(was) and all(a is b for a, b in zip(value, was))
        else:
            same = len(value) == len(was) and all(a in was for a in value)
        if not same:
            value.clear()
            if type(value) is list:
                value.extend(was)
            else:
                value.update(was)


# cloudpickle's constructors of the classes and functions it sends by value
_MAKERS = frozenset({"_make_skeleton_class", "_make_skeleton_enum", "_make_function"})


def loads(
    data: bytes | memoryview,
    buffers: Iterable[Any] = (),
    *,
    namespace: dict[str, Any],
    inputs: Mapping[str, Any] | None = None,
    made: list[Any] | None = None,
    classes: Mapping[int, tuple[type, dict[str, Any]]] | None = None,
    places: Places | None = None,
    objects: SentObjects | None = None,
    changed: list[tuple[Any, tuple[Any, ...]]] | None = None,
) -> Any:
    """Unpickle a payload; notebook functions in it get ``namespace`` as their globals and
    references to inputs resolve to the objects in ``inputs``. ``made``: a list that
    receives each class and function the payload brought by value. ``classes``: those of
    the payload this one answers (``Packed.classes``), which keep what the cell left alone.
    ``places`` receives the objects of this payload a cell may change in place, by id (for
    ``dumps(..., inside_refs=)``); ``objects`` are the sender's own by place (``Packed.objects``)
    and ``changed`` receives those of them the answer changed, each with its new state."""
    u = _Unpickler(io.BytesIO(data), namespace, buffers, {} if inputs is None else inputs)
    u.made = made
    u.classes = classes or {}
    u.objects = objects
    value = u.load()
    if changed is not None:
        changed += u.changed
    if places is not None:
        places.read(u.memo.copy())
    return value


# how the runner says its inputs failed to load, and the client finds the class it names
INPUTS_NOT_REBUILT = "while rebuilding the cell's inputs on the GPU machine"


def failing_code(tb: types.TracebackType | None) -> str | None:
    """``BadSet.__setstate__``: the first frame of the traceback that is neither pickle's,
    cloudpickle's nor ours (the code of the object being rebuilt, not what it called)."""
    ours = os.path.dirname(os.path.abspath(__file__))
    while tb is not None:
        code = tb.tb_frame.f_code
        where = os.path.abspath(code.co_filename)
        if not (where.startswith(ours) or os.path.basename(where) in ("pickle.py",
                "copyreg.py") or "cloudpickle" in where):
            owner = tb.tb_frame.f_locals.get("self")
            return (f"{type(owner).__qualname__}.{code.co_name}" if owner is not None
                    else getattr(code, "co_qualname", code.co_name))
        tb = tb.tb_next
    return None


class Places:
    """Where each object that arrived inside the inputs stood in their pickle, by ``id()``
    (for ``dumps(..., inside_refs=)``), and what each was before the cell: those a cell may
    change in place. Only a cell's answer tells the sender which of them the cell changed."""

    # More than this many inside the inputs (a list of 200,000 small lists): they come back as
    # new objects, as any result; taking their states before the cell would cost more than
    # reading the inputs did.
    LIMIT = 20_000
    ITEMS = 200_000  # nor when the lists and dicts among them hold more than this in all

    def __init__(self) -> None:
        self.by_id: dict[int, int] = {}
        # the object, or a weak reference where it takes one: a cell that drops an array of
        # its input (params["W"] = None) frees it, as it would locally (an id is checked
        # against its object before it is used: a freed one's may be taken again)
        self._held: dict[int, Any] = {}
        self._before: dict[int, Any] = {}
        self._known: Callable[[memoryview], str | None] | None = None
        self._namespace: Mapping[str, Any] | None = None

    def read(self, memo: dict[int, Any]) -> None:
        with _collector_held():
            self._read(memo)

    def _read(self, memo: dict[int, Any]) -> None:
        found = [(i, o) for i, o in memo.items()
                 if (t := type(o)) in _CONTAINERS or t not in _UNCHANGEABLE and _changeable(o)]
        if len(found) > self.LIMIT or sum(  # (a bytearray's bytes are compared at once)
                len(o) for _, o in found if type(o) in _CONTAINERS and type(o) is not bytearray
        ) > self.ITEMS:
            return
        for i, o in found:
            if type(o).__module__ == "numpy":  # (numpy refuses to resize an array that a weak
                self._held[i] = o              # reference points to: `a.resize(n)` in a cell)
            else:
                try:
                    self._held[i] = weakref.ref(o)
                except TypeError:  # (a list, a dict: held, with what it holds now)
                    self._held[i] = o
            self.by_id[id(o)] = i

    def get(self, obj: Any) -> int | None:
        place = self.by_id.get(id(obj))
        if place is None:
            return None
        held = self._held.get(place)
        return place if (held() if isinstance(held, weakref.ref) else held) is obj else None

    def take_before(self, namespace: Mapping[str, Any], inputs: Iterable[Any] = (),
                    known: Callable[[memoryview], str | None] | None = None) -> None:
        """What each is before the cell runs (its own state: what it holds that arrived
        inside the inputs too, by place). The inputs themselves travel back by name; one
        met otherwise (rebound, but still held) is taken as changed, its own state not taken
        (a list of a million floats: 0.4 s)."""
        self._known, self._namespace = known, namespace
        with _collector_held():
            self._take_before({id(v) for v in inputs})

    def _take_before(self, top: set[int]) -> None:
        # first which are places: one that cannot be changed in place (a storage, a numpy
        # scalar, an enum member, an object of its own __reduce__) travels whole, as part of
        # what holds it, and one already gone was a part of the pickle only (a tensor's
        # storage). Only then their states: one that holds such an object takes it whole,
        # before the cell as after it
        states: dict[int, tuple[Any, Any]] = {}
        for place, h in list(self._held.items()):
            obj = h() if isinstance(h, weakref.ref) else h
            if type(obj) in _CONTAINERS:
                states[place] = (obj, None)
            elif obj is None or (state := in_place_state(obj)) is None:
                del self._held[place]
            else:
                states[place] = (obj, state)
        self.by_id = {i: p for i, p in self.by_id.items() if p in self._held}
        for place, (obj, state) in states.items():
            if id(obj) not in top:
                self._before[place] = self.signature(obj, state)

    def changed(self, obj: Any, place: int) -> bool:
        before = self._before.get(place)
        return before is None or self.signature(obj) != before

    def signature(self, obj: Any, state: tuple[Any, ...] | None = None) -> Any:
        """(see _signature); one that cannot be taken differs from every other: the object
        is taken as changed, and the job goes on."""
        try:
            return self._signature(obj, state)
        except Exception:
            return object()

    def _signature(self, obj: Any, state: tuple[Any, ...] | None = None) -> Any:
        """What ``obj`` holds itself, to compare (None: cannot be told): plain values as
        they are, what arrived inside the inputs by place, arrays by their bytes' digest,
        anything else by the digest of its pickle. Not a pickle of it all: 20,000 small
        lists took 0.25 s so, a look at each of their items 20 ms."""
        t, sig = type(obj), self._sig
        if t in _CONTAINERS:  # (most of them: a model's hook dicts)
            if t is bytearray:
                return (t, bytes(obj))
            if t is list or t is set:
                return (t, [sig(x) for x in obj])
            return (t, [(sig(k), sig(v)) for k, v in obj.items()],
                    sig(getattr(obj, "default_factory", None)))
        state = in_place_state(obj) if state is None else state
        if state is None:
            return None
        kind = state[0]
        if kind == "ndarray":
            body: Any = (state[3].str, state[4], state[5], self._bytes(state[2].raw()))
        elif kind == "state":
            body = (sig(state[2]), sig(state[3]), sig(state[4]))
        elif state[2].device.type == "cpu":  # a tensor (a model: a thousand of them)
            new = state[2]
            storage = new.untyped_storage()
            raw = memoryview((ctypes.c_char * storage.nbytes()).from_address(
                storage.data_ptr())) if storage.nbytes() else memoryview(b"")
            body = (new.dtype, tuple(new.shape), new.stride(), new.storage_offset(),
                    state[3], self._bytes(raw.cast("B")))
        else:  # (one the cell moved to a GPU)
            body = self._deep(state)
        return (kind, state[1], body)

    def _sig(self, v: Any) -> Any:
        t = type(v)
        if t in _PLAIN_VALUES:
            return (t, v)  # (1, 1.0 and True are equal: their types are not)
        place = self.get(v)
        if place is not None:
            return (Places, place)
        if t is tuple or t is list:  # (a state's own lists, not places)
            return (t, tuple(self._sig(x) for x in v))
        if t is dict:
            return (t, tuple((self._sig(k), self._sig(x)) for k, x in v.items()))
        return self._deep(v)

    def _bytes(self, raw: memoryview) -> str:
        name = self._known(raw) if self._known is not None else None
        return name if name is not None else xxhash.xxh3_128_hexdigest(raw)

    def _deep(self, v: Any) -> Any:
        h = xxhash.xxh3_128()

        def hash_buffer(buf: pickle.PickleBuffer) -> bool:
            h.update(self._bytes(buf.raw()).encode())
            return False

        f = io.BytesIO()
        try:
            _ShallowPickler(f, self._namespace, places=self,
                            buffer_callback=hash_buffer).dump(v)
        except Exception:
            return object()  # (equal to nothing: taken as changed)
        h.update(f.getbuffer())
        return h.hexdigest()


_PLAIN_VALUES = frozenset({int, float, str, bytes, bool, type(None), complex})


@contextlib.contextmanager
def _collector_held() -> Iterator[None]:
    """The garbage collector off meanwhile: set off by the many small tuples made while the
    places are read and their states taken, it walked the whole model again and again (130 ms
    for a model of 500 layers, 30 ms without)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class _OwnStatePickler(_Pickler):
    """Pickles a notebook function as what it is itself (code, defaults, closure, attributes)
    and not with the values of the globals it uses: those are names of their own, and a
    change to one of them is not a change to every function that reads it."""

    every_dynamic = False  # every function sent by value, whatever its globals

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.FunctionType and (
                self._namespace_id is not None and id(obj.__globals__) == self._namespace_id
                or self.every_dynamic
                and not cloudpickle.cloudpickle._should_pickle_by_reference(obj)):
            cells = []
            for cell in obj.__closure__ or ():
                try:
                    cells.append(cell.cell_contents)
                except ValueError:  # not yet assigned
                    cells.append("<empty cell>")
            # its qualified name a string of its own: the function's and its code's are one
            # object here, two in a copy that came back, and pickle writes the two differently
            return (_function_state, (obj.__code__, obj.__defaults__, obj.__kwdefaults__,
                                      tuple(cells), obj.__dict__, "".join(obj.__qualname__)))
        rv = super().reducer_override(obj)
        if isinstance(obj, type) and isinstance(rv, tuple) and len(rv) > 2 and isinstance(
                rv[2], tuple) and rv[2] and isinstance(rv[2][0], dict) and \
                "__slotnames__" in rv[2][0]:
            # the cache copyreg sets on a class as its instances are pickled (as their state
            # before the cell is taken): the class of every instance a cell read looked changed
            state = ({k: v for k, v in rv[2][0].items() if k != "__slotnames__"}, *rv[2][1:])
            rv = (*rv[:2], state, *rv[3:])
        return rv


class _ShallowPickler(_OwnStatePickler):
    """An object's own state: what it holds that arrived inside the inputs by place (its own
    change is told apart from theirs)."""

    def __init__(self, file: io.BytesIO, namespace: Mapping[str, Any] | None, *,
                 places: Places, **kw: Any) -> None:
        super().__init__(file, namespace, **kw)
        self._places = places

    def persistent_id(self, obj: Any) -> Any:
        place = self._places.get(obj)
        return ("place", place) if place is not None else super().persistent_id(obj)


def _function_state(*state: Any) -> Any:
    """Named in fingerprints of functions (see _OwnStatePickler); they are never loaded."""
    return state


class _SameStatePickler(_OwnStatePickler):
    """Functions by their own state wherever their globals are (a copy that came back has a
    staging namespace's): see same_state."""

    every_dynamic = True


def same_state(a: Any, b: Any, depth: int = 0) -> bool:
    """Whether ``b`` is ``a`` as it was sent and came back (a class attribute the cell did not
    change): functions by their code (its file name aside, which cloudpickle does not send),
    defaults, closure and attributes, whatever their globals; the wrappers of functions
    through them; other values by their pickles (False if either does not pickle)."""
    if a is b:
        return True
    if type(a) is not type(b) or depth > 8:
        return False
    if type(a) is types.FunctionType:
        cells = ([tuple(c.cell_contents for c in f.__closure__ or ()) for f in (a, b)]
                 if _filled(a, b) else None)
        return (a.__code__ == b.__code__ and a.__qualname__ == b.__qualname__
                and cells is not None and len(cells[0]) == len(cells[1])
                and all(same_state(x, y, depth + 1) for x, y in zip(*cells))
                and same_state(a.__defaults__, b.__defaults__, depth + 1)
                and same_state(a.__kwdefaults__, b.__kwdefaults__, depth + 1)
                and same_state(a.__dict__, b.__dict__, depth + 1))
    if isinstance(a, (staticmethod, classmethod)):
        return same_state(a.__func__, b.__func__, depth + 1)
    if isinstance(a, property):
        return all(same_state(getattr(a, n), getattr(b, n), depth + 1)
                   for n in ("fget", "fset", "fdel")) and a.__doc__ == b.__doc__
    if isinstance(a, type):
        return False  # (a class we sent comes back as itself: another one is another class)
    prints = []  # anything else in one pickle each (a list of a million: one pass, not one each)
    for obj in (a, b):
        f = io.BytesIO()
        try:
            _SameStatePickler(f, None, buffer_callback=lambda _b: True).dump(obj)
        except Exception:
            return False
        prints.append(f.getvalue())
    return prints[0] == prints[1]




def _filled(*functions: types.FunctionType) -> bool:
    """Whether every closure cell of these functions holds a value (an empty one raises)."""
    try:
        for f in functions:
            for c in f.__closure__ or ():
                c.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def fingerprint(obj: Any, namespace: Mapping[str, Any] | None = None,
                known: Callable[[memoryview], str | None] | None = None,
                own_state: bool = False) -> str | None:
    """A digest of an object's pickled state (to see whether a cell changed it); None if
    unpicklable. ``known`` may name a buffer's content without reading it (a mapped input
    the cell did not write), else the buffer is hashed. ``own_state``: notebook functions
    count by their own state, not their globals' (:class:`_OwnStatePickler`)."""
    h = xxhash.xxh3_128()

    def hash_buffer(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        name = known(raw) if known is not None else None
        if name is not None:
            h.update(name.encode())
        else:
            h.update(raw)
        return False

    f = io.BytesIO()
    try:
        pickler = _OwnStatePickler if own_state else _Pickler
        pickler(f, namespace, buffer_callback=hash_buffer).dump(obj)
    except Exception:
        return None
    h.update(f.getbuffer())
    return h.hexdigest()


# --- Inputs changed in place: their new state, applied to the client's own object ---
#
# An input a cell changed in place came back as a new object, so the notebook's other
# references to it (an alias, a dict holding the model, a view of the array) kept the old
# state, unlike a local run. Instead its new state travels, and is applied to the object the
# client sent: for containers, arrays and tensors their contents, for other objects what
# unpickling would do to a fresh instance (``__setstate__`` or the ``__dict__``).


_DICTS = (dict, collections.OrderedDict, collections.defaultdict, collections.Counter)
_CONTAINERS = frozenset({list, set, bytearray, *_DICTS})


@functools.lru_cache(maxsize=4096)
def _imports_of(code: types.CodeType) -> frozenset[str]:
    """The modules a code object's own import statements name (its attribute names, also in
    co_names, are not imports: `model.train()` must not send a local train.py)."""
    return frozenset(str(i.argval) for i in dis.get_instructions(code)
                     if i.opname == "IMPORT_NAME")


def function_globals(values: Iterable[Any], namespace: Mapping[str, Any],
                     code_names: set[str] | None = None) -> dict[str, Any]:
    """The notebook's globals that travel with ``values``' notebook functions and classes
    (cloudpickle sends those a function's code names, and on, through the functions among
    them): what a result may name as already here. Not the whole namespace: what a job keeps
    stays alive as long as the job. ``code_names`` gathers the modules their code imports."""
    found: dict[str, Any] = {}
    stack = list(values)
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        codes = []
        if isinstance(obj, types.FunctionType) and obj.__globals__ is namespace:
            codes.append(obj.__code__)
        elif isinstance(obj, type) and obj.__module__ == "__main__":
            codes += [getattr(v, "__func__", v).__code__ for v in vars(obj).values()
                      if isinstance(getattr(v, "__func__", v), types.FunctionType)]
        while codes:
            code = codes.pop()
            if code_names is not None:
                code_names.update(_imports_of(code))
            for name in code.co_names:
                if name in namespace and name not in found:
                    found[name] = namespace[name]
                    stack.append(namespace[name])
            codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return found


IMPORTED_KEY = "import "  # (+ a module's name) an input no cell can name: see local_imports


def local_imports(names: Iterable[str], local_dir: Path | None) -> dict[str, types.ModuleType]:
    """The notebook's own modules (beside it, see ``_local_modules``) among ``names``: those
    the cell imports, or the notebook functions it calls import. Sent whole, they are what
    the cell's ``import cfg`` finds where it runs, as in the notebook: the module as the
    notebook left it (``cfg.BATCH = 256`` set here), not its file read afresh."""
    local = {m.__name__ for m in _local_modules(local_dir)}
    if not local:
        return {}
    found: dict[str, types.ModuleType] = {}
    for name in names:
        parts = name.split(".")
        if parts[0] not in local:
            continue
        for i in range(1, len(parts) + 1):  # `import pkg.sub`: pkg, then pkg.sub
            module = sys.modules.get(".".join(parts[:i]))
            if isinstance(module, types.ModuleType):
                found[module.__name__] = module
    return found


# --- two background jobs changing one list or dict ---
#
# Each job's result is the whole state of what it changed: a second job, sent the object as it
# was before the first one's change came back, replaced that change with its own state
# (`scores["A"]` gone once `scores["B"]` came). What it is sent is kept (a shallow copy), and its
# change merged into what the object holds by then, as the two changes made in turn would.


BASES_LIMIT = 20_000  # containers kept as sent per background job (beyond: not merged)


def shallow_bases(values: Iterable[Any]) -> dict[int, tuple[Any, tuple[str, Any]]]:
    """Each list, set, dict and array in ``values`` and nested in them (a defaultdict's
    lists, a dict of dicts), by id: the object (kept, so its id stays its own) and its
    shallow base."""
    found: dict[int, tuple[Any, tuple[str, Any]]] = {}
    stack = list(values)
    while stack and len(found) < BASES_LIMIT:
        obj = stack.pop()
        if id(obj) in found:
            continue
        base = shallow_base(obj)
        if base is None:
            continue
        found[id(obj)] = (obj, base)
        kind, was = base
        # (only containers go on: a list of a million floats is one pass, not a million pops)
        if kind != "array":
            stack.extend(x for x in (was.values() if kind == "dict" else was)
                         if type(x) in _MERGEABLE or _is_array(x))
    return found


def _is_array(obj: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and type(obj) is np.ndarray and not obj.dtype.hasobject


def _array_print(arr: Any) -> tuple[Any, ...]:
    """An array's shape, type and a digest of its bytes (datetime64's too, which export no
    buffer): whether it changed here since a background job was sent it."""
    np = sys.modules["numpy"]
    return (arr.shape, arr.dtype.str, digest(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))


_MERGEABLE = _CONTAINERS - {bytearray}  # (a bytearray has no entries to merge)


def shallow_base(obj: Any) -> tuple[str, Any] | None:
    """What a background job is sent of a list, set or dict, to merge its change later (of
    an array, its fingerprint: to say when the job's state replaces a change made here)."""
    t = type(obj)
    if t is list:
        return ("items", list(obj))
    if t is set:
        return ("set", set(obj))
    if t in _DICTS:
        return ("dict", dict(obj))
    if _is_array(obj):  # not merged: told apart, so that a change here lost is said
        return ("array", _array_print(obj))
    return None


def _same(a: Any, b: Any) -> bool:
    """The same value, as far as a merge can tell: one that came back from the job as a
    copy (a float, a numpy scalar) counts as unchanged where it is equal, NaN included."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        eq = a == b
        if not isinstance(eq, bool) and getattr(eq, "shape", None) == ():
            eq = bool(eq)  # a numpy scalar's comparison
        if not isinstance(eq, bool):
            return False  # (an array's == is an array: not the same, to be safe)
        return eq or bool(a != a and b != b)  # NaN is not equal to itself
    except Exception:
        return False


def merged_state(base: tuple[str, Any], current: Any, state: tuple[Any, ...]
                 ) -> tuple[tuple[Any, ...], bool, list[str]] | None:
    """The job's new ``state`` of ``current`` with what changed here since it was sent
    (``base``) kept: (the state to apply, whether anything here had changed, the entries both
    changed, where the job's value wins). None where the two cannot both be kept (a list
    changed here other than by appending): the job's state wins."""
    kind, was = base
    if kind == "dict" and state[0] == "dict" and type(current) in _DICTS:
        if len(current) == len(was) and all(k in was and current[k] is was[k] for k in current):
            return state, False, []
        theirs = dict(zip(*state[2]))
        merged = dict(current)
        both = []
        counts = state[1] is collections.Counter
        for k, v in theirs.items():
            if k not in was or not _same(v, was[k]):  # the job set it
                here = current.get(k, _NOT_THERE)
                if here is not _NOT_THERE and not _same(here, was.get(k, _NOT_THERE)):
                    if counts and all(isinstance(x, (int, float)) for x in
                                      (here, v, was.get(k, 0))):
                        # a Counter counts: both counts added (what each job and a cell
                        # added, as run one after the other), equal ones too
                        merged[k] = here + v - was.get(k, 0)
                        continue
                    if not _same(here, v):
                        both.append(short_repr(k))
                merged[k] = v
        for k in was:
            if k not in theirs and k in merged and _same(merged[k], was[k]):
                del merged[k]  # the job deleted it, and it was not changed here since
        return ("dict", state[1], [list(merged), list(merged.values())], *state[3:]), True, both
    if kind == "set" and state[0] == "items" and type(current) is set:
        if current == was:
            return state, False, []
        theirs = set(state[2])
        return ("items", set, list((current - (was - theirs)) | (theirs - was))), True, []
    if kind == "items" and state[0] == "items" and type(current) is list:
        n = len(was)
        if len(current) == n and all(a is b for a, b in zip(current, was)):
            return state, False, []
        theirs = state[2]
        appended_here = len(current) >= n and all(_same(a, b) for a, b in zip(current, was))
        appended_there = len(theirs) >= n and all(_same(a, b) for a, b in zip(theirs, was))
        if appended_here and appended_there:  # both appended: both kept, ours first
            return ("items", list, list(current) + list(theirs[n:])), True, []
        return None
    if kind == "array" and state[0] == "ndarray" and _is_array(current):
        # two changes of one array's bytes cannot be merged: the job's state, and a note
        return (state, False, []) if _array_print(current) == was else None
    return state, False, []


_NOT_THERE = object()


def short_repr(key: Any) -> str:
    try:
        return repr(key)[:40]
    except Exception:
        return f"<a {type(key).__name__} key>"


def in_place_state(obj: Any) -> tuple[Any, ...] | None:
    """What it takes to bring the client's copy of ``obj`` to its state here, as
    ``(kind, type, ...)``; None if that cannot be done in place (then ``obj`` travels as a
    new object)."""
    t = type(obj)
    if t is list or t is set or t is bytearray:
        return ("items", t, bytes(obj) if t is bytearray else list(obj))
    if t in _DICTS:  # keys and values as lists: the client repairs functions in lists
        return ("dict", t, [list(obj.keys()), list(obj.values())],
                getattr(obj, "default_factory", None))
    np = sys.modules.get("numpy")
    if np is not None and (t is np.ndarray or t is np.memmap):
        if obj.dtype.hasobject:
            return None
        data = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)  # (Fortran order)
        try:
            buf = pickle.PickleBuffer(data)
        except ValueError:  # datetime64 and timedelta64 export no buffer: their bytes do
            buf = pickle.PickleBuffer(data.reshape(-1).view(np.uint8))
        # (a memory-mapped input arrives as a copy of its data: its state is a plain array's)
        return ("ndarray", np.ndarray, buf, obj.dtype, obj.shape, bool(obj.flags.writeable))
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        if t not in (torch.Tensor, torch.nn.Parameter) or obj.is_sparse or getattr(
                obj, "is_nested", False) or obj.layout is not torch.strided:
            return None
        return ("tensor", t, obj.detach(), obj.requires_grad)
    try:
        reduced = obj.__reduce_ex__(5)
    except Exception:
        return None
    if (not isinstance(reduced, tuple) or len(reduced) < 2 or reduced[0] is not copyreg.__newobj__
            or tuple(reduced[1]) != (t,) or not hasattr(obj, "__dict__")):
        return None  # built some other way than a plain instance plus its state
    rest = list(reduced[2:]) + [None] * (5 - len(reduced))
    state, items, pairs = rest[0], rest[1], rest[2]
    if pairs is not None:
        pairs = [list(p) for p in pairs]
    return ("state", t, state, None if items is None else list(items), pairs)


def fits(obj: Any, state: tuple[Any, ...]) -> bool:
    """Whether :func:`apply_in_place` can bring ``obj`` to ``state``: an object of the type
    it was taken from (and for an array or a tensor, of its shape, type and device)."""
    kind, t = state[0], state[1]
    # a memory-mapped array travels as a plain one: written here, its change reaches its file
    mapped = kind == "ndarray" and type(obj).__name__ == "memmap" and isinstance(obj, t)
    if type(obj) is not t and not mapped:
        return False
    if kind == "ndarray":
        _, _, _, dtype, shape, _ = state
        if not obj.flags.writeable:
            return False
        if obj.shape == tuple(shape) and obj.dtype == dtype:
            return True
        return _retyped(obj, dtype, shape) is not None
    if kind == "tensor":
        new = state[2]
        if obj.dtype != new.dtype or obj.device != new.device or obj.is_inference():
            return False  # (an inference tensor refuses in-place writes outside that mode)
        if _same_layout(obj, new):
            return True
        # reshaped in place (unsqueeze_, resize_, an out= of another size): the object takes
        # the new shape on its own storage, grown if it must hold more
        if obj.is_sparse or new.is_sparse or obj.is_quantized or not obj.is_leaf:
            return False  # (set_ refuses these, or would: a new object, as before)
        storage = obj.untyped_storage()
        return _extent(new) <= storage.nbytes() or storage.resizable()
    return True


def _retyped(arr: Any, dtype: Any, shape: Any) -> Any:
    """A view of ``arr`` given ``dtype`` and ``shape`` the way a cell does it in place, or None
    where numpy would refuse that (another size, memory not in one piece)."""
    view = arr.view()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (setting them may one day be deprecated)
            view.dtype = dtype
            view.shape = tuple(shape)
    except (ValueError, TypeError, AttributeError):
        return None
    return view


def _reshape_in_place(torch: Any, obj: Any, new: Any) -> Callable[[], None]:
    """The cell changed ``obj``'s shape in place: the bytes its new shape covers come back
    into its own storage (grown if need be: its views here see what the cell's saw, the rest
    of the storage is left as it is here), then the shape, as on the GPU machine. Returns
    how to put it all back."""
    storage = obj.untyped_storage()
    start, end = new.storage_offset() * new.element_size(), _extent(new)
    before = (storage.nbytes(), obj.storage_offset(), obj.size(), obj.stride())

    kept = _storage_bytes(torch, storage)[start:min(end, before[0])].clone()

    def undo() -> None:
        with torch.no_grad():
            _storage_bytes(torch, storage)[start:start + kept.numel()].copy_(kept)
            if storage.nbytes() != before[0]:
                storage.resize_(before[0])
            obj.set_(storage, *before[1:])

    try:
        if end > before[0]:
            storage.resize_(end)
        theirs = _storage_bytes(torch, new.untyped_storage())
        _storage_bytes(torch, storage)[start:end].copy_(theirs[start:end])
        obj.set_(storage, new.storage_offset(), new.size(), new.stride())
    except BaseException:
        undo()  # nothing half done: the results are bound all at once or not at all
        raise
    return undo


def _extent(t: Any) -> int:
    """Where in its storage a tensor's last byte ends."""
    if t.numel() == 0:
        return t.storage_offset() * t.element_size()
    last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.size(), t.stride()))
    return (last + 1) * t.element_size()


def _same_layout(a: Any, b: Any) -> bool:
    return (a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset())


def fresh_from_state(state: tuple[Any, ...]) -> Any:
    """A new object with ``state``: where the client has no object of that type to update
    (``%gpu attach`` in another kernel, a name reassigned meanwhile)."""
    kind, t = state[0], state[1]
    if kind == "ndarray":
        import numpy as np

        _, _, buf, dtype, shape, writeable = state
        arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
        if not writeable:
            arr.flags.writeable = False
        return arr
    if kind == "tensor":
        _, _, new, requires_grad = state
        if t is not type(new):  # a Parameter: it travelled detached, as a plain tensor
            return t(new, requires_grad=requires_grad)
        return new.requires_grad_(requires_grad) if new.is_leaf else new
    obj = t() if kind in ("items", "dict") else t.__new__(t)
    apply_in_place(obj, state)
    return obj


def _update_module(module: types.ModuleType, changes: dict[str, tuple[str, Any]],
                   deleted: list[str]) -> Callable[[], None]:
    """Bring the cell's changes onto the notebook's own module (the one in sys.modules): an
    attribute it changed in place (a list it appended to) is changed in place here too, so
    the module's functions and other references see it. All or nothing."""
    missing = object()
    before = dict(module.__dict__)
    undo: list[Callable[[], None]] = []

    def put(name: str, value: Any) -> None:
        old = module.__dict__.get(name, missing)
        undo.append(lambda: module.__dict__.pop(name, None) if old is missing
                    else module.__dict__.__setitem__(name, old))
        module.__dict__[name] = value

    def undo_all() -> None:
        for u in reversed(undo):
            u()

    try:
        for name, (kind, value) in changes.items():
            if kind == "same_as":
                if value in before:
                    put(name, before[value])
                continue
            old = before.get(name, missing)
            state = in_place_state(value) if old is not missing else None
            if state is not None and fits(old, state):
                undo.append(apply_in_place(old, state))
            else:
                put(name, value)
        for name in deleted:
            if name in module.__dict__:
                old = module.__dict__.pop(name)
                undo.append(lambda name=name, old=old: module.__dict__.__setitem__(name, old))
    except BaseException:
        undo_all()
        raise
    return undo_all


def _slots(obj: Any) -> list[str]:
    return [n for n in copyreg._slotnames(type(obj)) if n not in ("__dict__", "__weakref__")]


def apply_in_place(obj: Any, state: tuple[Any, ...]) -> Callable[[], None]:
    """Bring ``obj`` to ``state`` (it :func:`fits`); return how to undo it."""
    kind = state[0]
    if kind == "module":
        return _update_module(obj, state[3], state[4])
    if kind == "items":
        t, items = state[1], state[2]
        old = obj.copy()
        if t is set:
            obj.clear()
            obj.update(items)
            return lambda: (obj.clear(), obj.update(old))
        obj[:] = items
        return lambda: obj.__setitem__(slice(None), old)
    if kind == "dict":
        _, t, (keys, values), factory = state
        before = list(obj.items()), getattr(obj, "default_factory", None)

        def put(pairs: Any, default: Any) -> None:
            obj.clear()
            for k, v in pairs:  # not update(): a Counter's adds
                obj[k] = v
            if t is collections.defaultdict:
                obj.default_factory = default

        put(zip(keys, values), factory)
        return lambda: put(*before)
    if kind == "ndarray":
        import numpy as np

        _, _, buf, dtype, shape, writeable = state
        if obj.shape != tuple(shape) or obj.dtype != dtype:
            # given a new shape or type of the same size in place (`a.shape = (2, 3)`,
            # `a.dtype = np.int64`): so is this one, as its other names see it locally
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj.dtype, obj.shape = dtype, tuple(shape)  # (checked by fits, on a view)
        np.copyto(obj, np.frombuffer(buf, dtype=dtype).reshape(shape))
        if not writeable:
            obj.flags.writeable = False
        return lambda: None  # last of all: it cannot fail once checked
    if kind == "tensor":
        import torch

        _, _, new, requires_grad = state
        undo: Callable[[], None] = lambda: None  # noqa: E731
        with torch.no_grad():
            if _same_layout(obj, new):
                obj.copy_(new)
            else:
                undo = _reshape_in_place(torch, obj, new)
        if obj.requires_grad != requires_grad and obj.is_leaf:
            obj.requires_grad_(requires_grad)
        return undo
    _, _, new, items, pairs = state
    if items is None and pairs is None and isinstance(new, dict):
        undo = _apply_changed_attributes(obj, new)
        if undo is not None:
            return undo
    # an instance of a class with __slots__ only has no __dict__ (on the GPU machine the
    # rebuilt class may have one: its state then comes as a dict of what the slots hold)
    has_dict = hasattr(obj, "__dict__")
    saved = dict(obj.__dict__) if has_dict else {}
    slots = {n: getattr(obj, n) for n in _slots(obj) if hasattr(obj, n)}

    def undo() -> None:
        if has_dict:
            obj.__dict__.clear()
            obj.__dict__.update(saved)
        for n in _slots(obj):
            if n in slots:
                object.__setattr__(obj, n, slots[n])
            elif hasattr(obj, n):
                object.__delattr__(obj, n)

    try:
        if has_dict:
            obj.__dict__.clear()  # as unpickling starts: an instance with nothing set
        for n in slots:
            object.__delattr__(obj, n)
        setstate = getattr(obj, "__setstate__", None)
        if setstate is not None:
            setstate(new)
        elif new is not None:
            attrs, slotstate = new if isinstance(new, tuple) and len(new) == 2 else (new, None)
            if attrs and has_dict:
                obj.__dict__.update(attrs)
            elif attrs:
                for k, v in attrs.items():
                    object.__setattr__(obj, k, v)
            for k, v in (slotstate or {}).items():
                setattr(obj, k, v)
        if items is not None:
            del obj[:]
            obj.extend(items)
        if pairs is not None:
            obj.clear()
            for k, v in pairs:
                obj[k] = v
    except BaseException:
        undo()
        raise
    return undo


def _apply_changed_attributes(obj: Any, new: dict[str, Any]) -> Callable[[], None] | None:
    """For an object whose class has a ``__getstate__`` of its own: only the attributes the
    cell changed, as a local cell would have. What that ``__getstate__`` leaves out (an open
    file, a cache) never travelled: set from the state that came back, it was lost here (a
    trial's ``ds._fh`` became None, its file left open). Which attributes changed is what
    unpickling makes of the state sent and of the state back, each on a blank instance (its
    ``__setstate__`` may rename or rebuild them). None where this does not apply."""
    cls = type(obj)
    own = getattr(cls, "__getstate__", None)
    attrs = getattr(obj, "__dict__", None)
    if own is None or own is getattr(object, "__getstate__", None) or type(attrs) is not dict:
        return None
    try:
        sent = obj.__getstate__()  # what it gave when it was sent (unchanged here since)
        before, after = _unpickled_attrs(cls, sent), _unpickled_attrs(cls, new)
    except Exception:
        return None
    if before is None or after is None:
        return None
    changed = {k: v for k, v in after.items() if not (k in before and _same(before[k], v))}
    gone = [k for k in before if k not in after and k in attrs]
    saved = dict(attrs)

    def undo() -> None:
        attrs.clear()
        attrs.update(saved)

    try:
        for k in gone:
            del attrs[k]
        attrs.update(changed)
    except BaseException:
        undo()
        raise
    return undo


def _unpickled_attrs(cls: type, state: Any) -> dict[str, Any] | None:
    """The attributes an instance of ``cls`` unpickled from ``state`` has (None: no dict)."""
    if not isinstance(state, dict):
        return None
    blank = cls.__new__(cls)  # (as unpickling makes it)
    setstate = getattr(blank, "__setstate__", None)
    if setstate is not None:
        setstate(dict(state))
    else:
        blank.__dict__.update(state)
    got = getattr(blank, "__dict__", None)
    return dict(got) if type(got) is dict else None


# --- Diagnosis: which object inside an input cannot be pickled, and what to do about it ---

_KNOWN_UNPICKLABLE: list[tuple[Callable[[Any], bool], str, str]] = [
    (lambda o: isinstance(o, io.IOBase), "an open file", "open it inside the cell instead"),
    (lambda o: type(o).__name__ in ("lock", "RLock", "_RLock", "Condition", "Semaphore"),
     "a thread lock", "create it inside the cell instead"),
    (lambda o: isinstance(o, threading.Thread), "a thread", "start it inside the cell instead"),
    (lambda o: type(o).__name__ == "socket", "a network socket", "connect inside the cell instead"),
    (lambda o: isinstance(o, types.GeneratorType), "a generator",
     "turn it into a list first, or create it inside the cell"),
    (lambda o: type(o).__name__ == "Connection" and "sqlite3" in type(o).__module__,
     "a database connection", "connect inside the cell instead"),
    (lambda o: isinstance(o, (types.FrameType, types.TracebackType)), "a stack frame",
     "do not keep frames or tracebacks in variables the cell uses"),
]


def _recognised(obj: Any) -> tuple[str, str] | None:
    """The name and fix of a kind of object known not to pickle, or None."""
    for test, what, fix in _KNOWN_UNPICKLABLE:
        try:
            if test(obj):
                return what, fix
        except Exception:
            continue
    return None


def describe(obj: Any) -> tuple[str, str]:
    """A human name for an unpicklable object and the fix to suggest."""
    known = _recognised(obj)
    if known is not None:
        return known
    tname = type(obj).__qualname__
    return (
        f"{'an' if tname[:1].lower() in 'aeiou' else 'a'} {tname} object",
        f"create it inside the cell, or give {tname} __getstate__/__setstate__ so it can be pickled",
    )


def _pickles(obj: Any) -> bool:
    return pickle_error(obj) is None


def pickle_error(obj: Any) -> str | None:
    """What pickling ``obj`` raises, as ``KeyError: 'cache'`` (None: it pickles)."""
    try:
        _Pickler(io.BytesIO(), None, buffer_callback=lambda b: False).dump(obj)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".rstrip(": ")
    return None


def _by_value(obj: Any) -> bool:
    """Whether cloudpickle sends a function or class by value (its code and contents: one
    defined in the notebook), not by reference (importable where it runs)."""
    try:
        return not cloudpickle.cloudpickle._should_pickle_by_reference(obj)
    except Exception:  # a private helper of cloudpickle's: if it moves, guess as it would
        return getattr(obj, "__module__", None) == "__main__"


# entries cloudpickle leaves out of a class it sends by value (see its _class_getstate)
_CLASS_SKIPPED = frozenset({"__dict__", "__weakref__", "_abc_impl", "_abc_cache",
                            "_abc_negative_cache", "_abc_negative_cache_version", "_abc_registry"})


def _class_items(cls: type) -> Iterable[tuple[str, Any]]:
    """What cloudpickle sends of a class that travels by value: its own attributes, for it
    and each base that travels by value too."""
    for klass in cls.__mro__:
        if klass is object or not _by_value(klass):
            continue
        slots = getattr(klass, "__slots__", ())
        slots = {slots} if isinstance(slots, str) else set(slots or ())
        for k, v in list(vars(klass).items())[:1000]:
            if k not in _CLASS_SKIPPED and k not in slots:
                yield k, v


def _code_globals(code: types.CodeType) -> Iterable[str]:
    """The global names a function's code (and the code nested in it) may read: cloudpickle
    sends those of them its globals hold."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_globals(const)


def _children(obj: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in list(obj.items())[:1000]:
            yield f"[{k!r}]", v
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj[:1000]):
            yield f"[{i}]", v
        return
    if isinstance(obj, (set, frozenset)):
        for v in list(obj)[:1000]:
            yield f" (set member {v!r:.40})", v
        return
    if isinstance(obj, functools.partial):
        # pickled as what it calls with what: a fault is in one of those
        yield ".func", obj.func
        for i, v in enumerate(obj.args[:1000]):
            yield f".args[{i}]", v
        for k, v in list(obj.keywords.items())[:1000]:
            yield f".keywords[{k!r}]", v
    if isinstance(obj, types.MethodType):  # pickled as its function and the object it is bound to
        yield ".__self__", obj.__self__
        yield ".__func__", obj.__func__
        return
    if isinstance(obj, type):
        if _by_value(obj):  # its attributes travel with it, methods (and their globals) too
            for k, v in _class_items(obj):
                yield f".{k}", v
        return
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        module = isinstance(obj, types.ModuleType)
        for k, v in list(state.items())[:1000]:
            if module and k.startswith("__") and k.endswith("__"):
                continue  # (a module's __builtins__, __loader__...: not what the user made)
            yield f".{k}", v
    for slot in getattr(type(obj), "__slots__", ()) or ():
        if isinstance(slot, str) and hasattr(obj, slot):
            yield f".{slot}", getattr(obj, slot)
    if isinstance(obj, types.FunctionType):
        if _by_value(obj):
            yield from _function_children(obj)
        return
    if not isinstance(obj, types.ModuleType) and _by_value(type(obj)):
        # an instance of a notebook class carries the class along, by value
        for k, v in _class_items(type(obj)):
            yield f" (class attribute {k})", v


def _function_children(func: types.FunctionType) -> Iterable[tuple[str, Any]]:
    """What cloudpickle sends with a notebook function: the globals it uses, its defaults
    and its closure."""
    code = func.__code__
    names = dict.fromkeys(_code_globals(code))  # once each, in order of appearance
    for name in list(names)[:1000]:
        if name in func.__globals__:
            yield f" (global {name})", func.__globals__[name]
    positional = code.co_varnames[:code.co_argcount]
    defaults = func.__defaults__ or ()
    for name, v in zip(positional[len(positional) - len(defaults):], defaults):
        yield f" (default of {name})", v
    for name, v in (func.__kwdefaults__ or {}).items():
        yield f" (default of {name})", v
    for name, cell in zip(code.co_freevars, func.__closure__ or ()):
        try:
            yield f" (closure variable {name})", cell.cell_contents
        except ValueError:  # not yet assigned
            continue


def find_unpicklable(obj: Any, path: str) -> tuple[str, Any]:
    """The deepest attribute path below ``obj`` that fails to pickle (``obj`` itself if none)."""
    return find_all_unpicklable(obj, path, limit=1)[0]


def find_all_unpicklable(obj: Any, path: str, limit: int = 10,
                         unlisted: dict[str, int] | None = None) -> list[tuple[str, Any]]:
    """Every deepest attribute path below ``obj`` that fails to pickle, at most ``limit``
    (``obj`` itself if no part of it fails alone): a report should name all of them, not
    only the one to fix first. ``unlisted``, if given, receives for each path where the
    limit cut the search short how many more of its parts fail (each holding a fault or more)."""
    walk = _FaultWalk(limit, unlisted)
    found, _ = walk.visit(obj, path, 0)
    # every part that fails led back to obj itself (a cycle): obj is the one at fault
    return found or [(path, obj)]


class _FaultWalk:
    """One search for the objects at fault below an object (see find_all_unpicklable)."""

    def __init__(self, limit: int, unlisted: dict[str, int] | None) -> None:
        self.limit = limit
        self.unlisted = unlisted
        self.found = 0
        self.done: set[int] = set()  # named already, or found sound apart from those named
        self.open: set[int] = set()  # being searched: an ancestor of where the search is

    def visit(self, obj: Any, path: str, depth: int) -> tuple[list[tuple[str, Any]], set[int]]:
        """The objects at fault below ``obj``, and the ancestors (ids) whose own fault may be
        what makes it fail: a part that is failing only because it leads back to an ancestor
        is no culprit, the ancestor or what is at fault in it is."""
        if id(obj) in self.open:
            return [], {id(obj)}
        if id(obj) in self.done:
            return [], set()  # reached again (shared): named where it was reached first
        if depth > 30 or _recognised(obj) is not None:
            self.found += 1
            return [(path, obj)], set()  # a thread, not the lock inside it
        self.open.add(id(obj))
        found: list[tuple[str, Any]] = []
        waits: set[int] = set()
        failing = skipped = 0
        for suffix, child in _children(obj):
            if self.found >= self.limit and self.unlisted is None:
                break
            if _pickles(child):
                continue
            failing += 1
            if self.found >= self.limit:
                skipped += 1  # counted, not searched: the report says how many were left
                continue
            more, wait = self.visit(child, path + suffix, depth + 1)
            found += more
            waits |= wait
        self.open.discard(id(obj))
        self.done.add(id(obj))
        if skipped and self.unlisted is not None:
            self.unlisted[path] = skipped
        if found:
            return found, set()
        if not failing or waits == {id(obj)}:
            # nothing in it fails, or what fails only leads back to it: it is at fault itself
            self.found += 1
            return [(path, obj)], set()
        # every part that fails was named elsewhere, or waits on an ancestor of this one
        return [], waits - {id(obj)}


def diagnose(name: str, value: Any, error: BaseException | None = None) -> SerializationError:
    """The error to raise for an input ``name`` that cannot be sent."""
    if error is not None and _too_deep(error):
        # (what is at fault is the depth, not the type found at the bottom: "give Node
        # __getstate__" sent a trial's user after a linked list of 5,000 nodes)
        top, _ = describe(value)
        return SerializationError(
            f"variable '{name}' ({top}) cannot be sent to the GPU: it is nested too deeply to "
            f"pickle (one object inside another, deeper than Python's recursion limit of "
            f"{sys.getrecursionlimit()} lets pickle go). Keep it flatter (a linked list as a "
            "list of its values, a deep tree as arrays), build it inside the cell, or raise "
            "the limit here with sys.setrecursionlimit(...)", name=name, path=name)
    path, culprit = find_unpicklable(value, name)
    what, fix = describe(culprit)
    if path == name:
        msg = f"variable '{name}' ({what}) cannot be sent to the GPU: {fix}"
    else:
        top, _ = describe(value)
        msg = f"variable '{name}' ({top}) cannot be sent to the GPU: {path}: {what}; {fix}"
    if error is not None and not isinstance(culprit, io.IOBase):
        msg += f" (pickle said: {type(error).__name__}: {error})"
    return SerializationError(msg, name=name, path=path)


def _too_deep(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, RecursionError) or (
                isinstance(seen, pickle.PicklingError) and "recursion" in str(seen).lower()):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class NotSent:
    """Where the cell runs, a notebook value the cell never reads: it binds the name before it
    deletes it (see CellAnalysis.held). The runner still sees the name, so it can tell
    whether the cell deleted it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<the notebook's {self.name}, not sent: the cell binds it before deleting it>"

    def __reduce__(self) -> tuple[Any, ...]:
        return NotSent, (self.name,)


def pack_inputs(
    values: Mapping[str, Any], namespace: Mapping[str, Any] | None, local_dir: Path | None,
    keep_objects: bool = False, hash_buffers: bool = True,
) -> Packed:
    """Pickle a job's inputs together, or raise a SerializationError naming the culprit.
    ``keep_objects``: keep what is inside them by place, for the results to name;
    ``hash_buffers=False``: for :func:`name_buffers` once the digest scheme is known."""
    try:
        ordered = arrays_first(values)
        packed, _ = dumps(ordered, namespace=namespace, local_dir=local_dir,
                          keep_objects=keep_objects, hash_buffers=hash_buffers,
                          views_among=ordered)
    except Exception as exc:
        with by_value_here(local_dir):  # (a module of the notebook's is sent whole)
            for name, value in values.items():
                if not _pickles(value):
                    raise diagnose(name, value, exc) from None
        raise SerializationError(
            f"the cell's inputs cannot be pickled together: {type(exc).__name__}: {exc}"
        ) from exc
    return packed


def name_buffers(packed: Packed, pieces: bool) -> None:
    """Name the out-of-band buffers of ``packed`` by their digests (``pieces``: see
    :data:`PIECES_SCHEME`)."""
    packed.buffer_digests = [digest(b, pieces) for b in packed.buffers]


def travel_mode(value: Any, local_dir: Path | None = None) -> str:
    """How a value travels: 'by reference' (importable where it runs) or 'by value' (its bytes)."""
    local = {m.__name__ for m in _local_modules(local_dir)}
    if isinstance(value, types.ModuleType):
        return "by value" if value.__name__.partition(".")[0] in local else "by reference"
    if callable(value) or isinstance(value, type):
        modname = getattr(value, "__module__", None) or "__main__"
        mod = sys.modules.get(modname)
        if mod is not None and modname != "__main__" and modname.partition(".")[0] not in local:
            for attr in ("__qualname__", "__name__"):
                found: Any = mod
                for part in str(getattr(value, attr, "")).split("."):
                    found = getattr(found, part, None)
                if found is value:
                    return "by reference"
    return "by value"
