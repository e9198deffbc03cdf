"""Tests of the cell analyser (gpu_magic._capture): inputs, outputs, deletions, display value."""

from __future__ import annotations

import ast
import dataclasses
import sys
import warnings
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_magic._capture import CellAnalysis, analyze_cell
from gpu_magic._errors import CaptureError

# (cell, inputs, outputs, deleted). Inputs are exact: builtins a cell reads are listed too (the
# user may have shadowed them); the caller drops names its namespace lacks.
CASES: list[tuple[str, set[str], tuple[str, ...], set[str]]] = [
    # --- assignments ---
    ("x = 1\nprint(x)", {"print"}, ("x",), set()),
    ("y = x + 1", {"x"}, ("y",), set()),
    ("x = x + 1", {"x"}, ("x",), set()),
    ("a, (b, *c) = t", {"t"}, ("a", "b", "c"), set()),
    ("x = y = z", {"z"}, ("x", "y"), set()),
    ("obj.attr = v\nd[k] = w", {"obj", "v", "d", "k", "w"}, (), set()),
    ("x += 1", {"x"}, ("x",), set()),
    ("x = 0\nx += step", {"step"}, ("x",), set()),
    ("acc.total += k", {"acc", "k"}, (), set()),
    ("n: int", {"int"}, (), set()),
    ("n: int = 5\nprint(n)", {"int", "print"}, ("n",), set()),
    ("global x\nx = 1", set(), ("x",), set()),
    ("result = await fetch(url)", {"fetch", "url"}, ("result",), set()),
    ("print(len(data))", {"print", "len", "data"}, (), set()),
    ("ip = get_ipython()", set(), ("ip",), set()),
    # --- imports ---
    ("import numpy as np\nnp.zeros(n)", {"n"}, ("np",), set()),
    ("import os.path\nos.getcwd()", set(), ("os",), set()),
    ("import a.b as c", set(), ("c",), set()),
    ("from math import pi, tau as t\nr = pi * t", set(), ("pi", "t", "r"), set()),
    ("from . import sibling", set(), ("sibling",), set()),
    # --- functions ---
    (
        "def f(a, *args, b=d, **kw):\n    return a + b + g + len(args) + len(kw)\n",
        {"d", "g", "len"},
        ("f",),
        set(),
    ),
    ("@deco(opt)\ndef f(x: T) -> R:\n    return x\n", {"deco", "opt", "T", "R"}, ("f",), set()),
    ("def fact(n):\n    return 1 if n < 2 else n * fact(n - 1)\n", set(), ("fact",), set()),
    (
        "def f():\n    return model(x)\nmodel = load()\nx = 1\n",
        {"model", "x", "load"},
        ("f", "model", "x"),
        set(),
    ),
    ("scale = 2\ndef f(v):\n    return v * scale\n", set(), ("scale", "f"), set()),
    ("def f():\n    x = 1\n    return x\n", set(), ("f",), set()),
    ("def f():\n    print(x)\n    x = 1\n", {"print"}, ("f",), set()),  # x is local: unbound
    ("def f():\n    global counter\n    counter += 1\n", {"counter"}, ("f", "counter"), set()),
    ("def f():\n    global tmp\n    del tmp\n", {"tmp"}, ("f",), {"tmp"}),
    ("def f():\n    x = 1\n    del x\n", set(), ("f",), set()),
    ("def f():\n    x: Foo = 1\n    return x\n", set(), ("f",), set()),  # never evaluated
    (
        "def outer():\n    n = 0\n    def inc():\n        nonlocal n\n        n += step\n"
        "    return inc\n",
        {"step"},
        ("outer",),
        set(),
    ),
    (
        "def outer():\n    v = 1\n    def inner():\n        return v + w\n    return inner\n",
        {"w"},
        ("outer",),
        set(),
    ),
    (
        "def outer():\n    global g\n    def inner():\n        return g\n    return inner\n",
        {"g"},
        ("outer",),
        set(),
    ),
    (
        "async def fetch(url):\n    async with session.get(url) as r:\n        return await r.json()\n",
        {"session"},
        ("fetch",),
        set(),
    ),
    ("def f():\n    if (y := g()):\n        return y\n", {"g"}, ("f",), set()),
    (
        "def f():\n    global hit\n    return [hit := v for v in vs]\n",
        {"vs"},
        ("f", "hit"),
        set(),
    ),
    ("def f():\n    !echo $v\n", {"echo", "v"}, ("f",), set()),
    # --- lambdas ---
    ("f = lambda a, b=dflt: a + b + c", {"dflt", "c"}, ("f",), set()),
    ("sq = lambda x: x * x", set(), ("sq",), set()),
    ("fs = [lambda: i for i in r]", {"r"}, ("fs",), set()),
    # --- classes ---
    (
        "class A(Base, metaclass=Meta):\n    k = 1\n    def m(self):\n        return k\n",
        {"Base", "Meta", "k"},  # a method's bare `k` is a global, not the class attribute
        ("A",),
        set(),
    ),
    ("class A:\n    k = 1\n    j = k + 1\n", set(), ("A",), set()),
    ("class C:\n    x = x\n", {"x"}, ("C",), set()),
    ("class Node:\n    def clone(self):\n        return Node()\n", set(), ("Node",), set()),
    ("class Node:\n    me = Node\n", {"Node"}, ("Node",), set()),
    (
        "def f():\n    v = 1\n    class K:\n        a = v\n        def m(self):\n"
        "            return v\n    return K\n",
        set(),
        ("f",),
        set(),
    ),
    (  # v is assigned in the class body, so the earlier read skips f's v and looks in globals
        "def f():\n    v = 1\n    class K:\n        w = v\n        v = 2\n    return K\n",
        {"v"},
        ("f",),
        set(),
    ),
    (  # the first iterable runs in the class body; the rest cannot see class attributes
        "class A:\n    xs = [1, 2]\n    ys = [x * k for x in xs]\n    k = 3\n",
        {"k"},
        ("A",),
        set(),
    ),
    ("class A:\n    global reg\n    reg = 1\n", set(), ("reg", "A"), set()),
    # --- comprehensions ---
    ("sq = [x * x for x in xs if x > lim]", {"xs", "lim"}, ("sq",), set()),
    ("pairs = [(i, j) for i in rows for j in cols(i)]", {"rows", "cols"}, ("pairs",), set()),
    (
        "d = {k: v for k, v in items}\ns = {e for e in d}\ng = sum(t for t in s)",
        {"items", "sum"},
        ("d", "s", "g"),
        set(),
    ),
    ("[i for i in r]\nprint(i)", {"r", "print", "i"}, (), set()),
    ("x = [1]\ny = [x for x in x]", set(), ("x", "y"), set()),
    ("m = [[c for c in row] for row in grid]", {"grid"}, ("m",), set()),
    ("[last := v for v in vals]\nprint(last)", {"vals", "print", "last"}, ("last",), set()),
    # --- walrus ---
    ("if (n := len(a)) > 10:\n    print(n)\nprint(n)", {"len", "a", "print"}, ("n",), set()),
    ("ok = a or (b := f())\nprint(b)", {"a", "f", "print", "b"}, ("b", "ok"), set()),
    ("while (chunk := read()):\n    pass\nprint(chunk)", {"read", "print"}, ("chunk",), set()),
    # --- control flow: only bindings on every path count ---
    (
        "for i in range(n):\n    s = i\nprint(s, i)",
        {"range", "n", "print", "s", "i"},
        ("i", "s"),
        set(),
    ),
    (
        "for row in rows:\n    total = row\n    print(total)\n",
        {"rows", "print"},
        ("row", "total"),
        set(),
    ),
    ("if c:\n    a = 1\nprint(a)", {"c", "print", "a"}, ("a",), set()),
    ("if c:\n    a = 1\nelse:\n    a = 2\nprint(a)", {"c", "print"}, ("a",), set()),
    ("while go():\n    w = 1\nelse:\n    z = w\n", {"go", "w"}, ("w", "z"), set()),
    (
        "try:\n    import foo\nexcept ImportError as e:\n    foo = None\nprint(foo, e)",
        {"ImportError", "print", "e"},  # Python deletes `e` at the end of the handler
        ("foo", "e"),
        {"e"},
    ),
    (
        "try:\n    r = work()\nfinally:\n    done = True\nprint(r, done)",
        {"work", "print"},
        ("r", "done"),
        set(),
    ),
    (
        "try:\n    v = parse()\nexcept ValueError:\n    v = 0\nelse:\n    w = v\nprint(v, w)",
        {"parse", "ValueError", "print", "w"},
        ("v", "w"),
        set(),
    ),
    (
        "try:\n    del x\nexcept KeyError:\n    pass\nprint(x)",
        {"x", "KeyError", "print"},
        (),
        {"x"},
    ),
    (
        "with open(p) as fh:\n    data = fh.read()\nprint(fh, data)",
        {"open", "p", "print", "data"},  # a context manager may swallow the body's exception
        ("fh", "data"),
        set(),
    ),
    (
        "match cmd:\n    case Point(x=0, y=yy):\n        r = yy\n    case [first, *rest]:\n"
        "        r = first\n    case {'k': v, **kw}:\n        r = v\n    case Color.RED | None:\n"
        "        r = c\n    case _:\n        r = 0\nprint(r)",
        {"cmd", "Point", "Color", "c", "print", "r"},
        ("yy", "r", "first", "rest", "v", "kw"),
        set(),
    ),
    ("match p:\n    case (1 | 2) as n if n > lo:\n        pass\n", {"p", "lo"}, ("n",), set()),
    (
        "if c:\n    v = 1\n    def f():\n        return v\n",
        {"c"},
        ("v", "f"),
        set(),
    ),
    # --- del ---
    ("del x", {"x"}, (), {"x"}),
    ("x = 1\ndel x", {"x"}, ("x",), {"x"}),  # held, so that "gone" can mean "deleted"
    ("x = 1\ndel x\nprint(x)", {"print", "x"}, ("x",), {"x"}),
    ("del a[k], b.c", {"a", "k", "b"}, (), set()),
    # --- IPython syntax ---
    ("%timeit f(x)", {"f", "x"}, (), set()),
    ("!echo $x {y}", {"echo", "x", "y"}, (), set()),
    ("%%timeit\nf(x)\ny = 2\n", {"f", "x", "y"}, (), set()),  # %%timeit binds nothing
    ("x = !ls -la", {"ls", "la"}, ("x",), set()),
    ("%matplotlib inline", {"inline"}, (), set()),
    ("%time y = f(x)", {"f", "x", "y"}, ("y",), set()),
    ("%%capture out\nz = g()\n", {"out", "z", "g"}, ("out", "z"), set()),
    ("%%time\nfor i in range(3):\n    acc = i\n", {"i", "range", "acc"}, ("i", "acc"), set()),
    ("%%bash\necho $HOME\n", {"echo", "HOME"}, (), set()),
    ("f?", {"f"}, (), set()),
]


@pytest.mark.parametrize(("cell", "inputs", "outputs", "deleted"), CASES)
def test_cases(cell: str, inputs: set[str], outputs: tuple[str, ...], deleted: set[str]) -> None:
    result = analyze_cell(cell)
    assert set(result.inputs) == inputs
    assert result.outputs == outputs
    assert set(result.deleted) == deleted
    assert result.string_names <= result.inputs
    assert result.deleted <= result.inputs  # so that the runner can tell a deletion


def test_case_table_is_large_and_distinct() -> None:
    assert len(CASES) >= 50
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="except* is Python 3.11+")
def test_except_star() -> None:
    result = analyze_cell("try:\n    run()\nexcept* ValueError as eg:\n    log(eg)\n")
    assert result.inputs == {"run", "ValueError", "log", "eg"}  # every deleted name is held
    assert result.outputs == ("eg",)
    assert result.deleted == {"eg"}


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("!echo $x {y}", {"echo", "x", "y"}),
        ("%timeit -n 10 f(x)", {"n", "f", "x"}),
        ("%%timeit -r 3\nfor v in vals:\n    g(v)\n", {"r", "v", "vals", "g"}),  # no keywords
        ("files = !ls $folder", {"ls", "folder"}),
        ("x = 1\ny = x + 1", set()),
        # names a cell looks up in its namespace by a string: read, as a local cell reads them
        ('if "model" not in globals():\n    model = build()', {"model"}),
        ('runs = globals().get("runs", 0) + 1', {"runs"}),
        ('def f():\n    return globals()["cfg"]', {"cfg"}),
        ('ok = "w" in vars() and "b" not in dir()', {"w", "b"}),
        # other strings are text, even beside a look-up
        ('print(sorted(globals()), "log", open("data"))', set()),
        ('def f():\n    return locals().get("x")', set()),  # (a function's own locals)
    ],
)
def test_string_names(cell: str, expected: set[str]) -> None:
    result = analyze_cell(cell)
    assert result.string_names == expected
    assert result.string_names <= result.inputs


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("x", True),
        ("x;", False),
        ("x;  # a comment", False),
        ("x;\n# trailing\n\n", False),
        ("f(x)\n\n", True),
        ("x; y", True),
        ("'a;'", True),  # a ';' inside a string is not display suppression
        ("s = 'a;'\ns", True),
        ("x = 1", False),
        ("x = 1;", False),
        ("if x:\n    y", False),
        ("def f():\n    return 1", False),
        ("", False),
        ("# only a comment", False),
        ("%timeit f()", True),  # IPython displays a magic's value too
        ("%time f(x);", False),
    ],
)
def test_has_value(cell: str, expected: bool) -> None:
    assert analyze_cell(cell).has_value is expected


def test_source_is_the_transformed_cell() -> None:
    assert analyze_cell("%timeit f(x)").source == "get_ipython().run_line_magic('timeit', 'f(x)')\n"
    assert analyze_cell("x = !ls").source == "x = get_ipython().getoutput('ls')\n"
    assert analyze_cell("x = 1\ny = x").source == "x = 1\ny = x\n"


def test_empty_cell() -> None:
    result = analyze_cell("")
    assert result == CellAnalysis(result.source, frozenset(), (), frozenset(), False, frozenset())
    assert result.source.strip() == ""


def test_result_is_frozen() -> None:
    result = analyze_cell("x = 1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.outputs = ()  # type: ignore[misc]


@pytest.mark.parametrize(
    "cell",
    ["from numpy import *", "x = 1\nfrom os.path import *\n", "%%time\nfrom torch import *\n"],
)
def test_star_import_binds_nothing_the_analysis_could_name(cell: str) -> None:
    # the names come back from where the cell ran, bound there (runner); the analysis only
    # must not refuse the cell (fastai's `from fastai.vision.all import *` is the idiom)
    result = analyze_cell(cell)
    assert "*" not in result.outputs


def test_star_import_in_a_file_written_by_a_magic_is_fine() -> None:
    result = analyze_cell("%%writefile helper.py\nfrom math import *\n")
    assert result.outputs == ()
    assert "math" in result.string_names


def test_syntax_error_names_the_line() -> None:
    with pytest.raises(CaptureError) as info:
        analyze_cell("x = 1\ndef f(:\n    pass\n")
    message = str(info.value)
    assert "line 2" in message
    assert "def f(:" in message


def test_syntax_error_counts_the_lines_before_the_source() -> None:
    # the %%gpu line is line 1 of the cell, as the remote tracebacks number it
    with pytest.raises(CaptureError, match="syntax error on line 3: ") as info:
        analyze_cell("x = 1\nz = 2 2\n", line_offset=1)
    # a SyntaxError too, in the notebook's numbering: `except SyntaxError` finds its line
    assert isinstance(info.value, SyntaxError)
    assert (info.value.lineno, info.value.text) == (3, "z = 2 2") and info.value.offset


@pytest.mark.parametrize("source, line", [
    ("for i in range(3):\n    pass\ncontinue\n", 3),
    ("\n\nreturn 5\n", 3),  # leading blank lines counted, as the notebook counts them
    ("async def f():\n    yield 1\n    return 2\n", 3),
    ("def f():\n    nonlocal y\n", 2),
    ("def f():\n    from .h import *\n", 2),
])
def test_errors_the_compiler_finds_name_their_line(source: str, line: int) -> None:
    # the parser lets these through; the compiler (in IPython, on the GPU) would not
    with pytest.raises(SyntaxError) as info:
        analyze_cell(source)
    assert isinstance(info.value, CaptureError) and info.value.lineno == line


@pytest.mark.parametrize("source", [
    "import asyncio\nawait asyncio.sleep(0)\n",  # IPython runs top-level await
    "x = 1\nfrom __future__ import annotations\n",  # IPython compiles statement by statement
    "%time y = 1\n!echo hi\n",
])
def test_what_ipython_compiles_is_not_refused(source: str) -> None:
    analyze_cell(source)


def test_the_line_python_names_inside_its_message_is_the_notebooks_too() -> None:
    # "(detected at line 1)" counted the parsed text's lines, not the notebook's
    with pytest.raises(CaptureError) as info:
        analyze_cell('\nx = 1\ny = "abc', line_offset=1)
    assert "on line 4: unterminated string literal (detected at line 4)" in str(info.value)


def test_syntax_error_after_a_magic_shows_the_users_line() -> None:
    with pytest.raises(CaptureError) as info:
        analyze_cell("%matplotlib inline\nx = = 1\n")
    assert "line 2" in str(info.value)
    assert "x = = 1" in str(info.value)


def test_escape_warnings_are_not_errors() -> None:
    # pytest turns warnings into errors here; the compiler's invalid-escape warning must not
    # become a CaptureError.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert analyze_cell('pattern = "\\d+"').outputs == ("pattern",)


@pytest.mark.parametrize("cell", ["-" * 5000 + "x", "1" + " + 1" * 200_000, "x = 1\x00", "("])
def test_pathological_cells_raise_capture_error(cell: str) -> None:
    with pytest.raises(CaptureError):
        analyze_cell(cell)


# --- properties ------------------------------------------------------------------------------

FRAGMENTS = [
    *"x y f def class lambda global nonlocal del for in if else try except finally with as".split(),
    *"import from * match case async await return yield := = += ( ) [ ] { } : , . ; 1".split(),
    *"% %% ! ? $ ' \" # \\".split(),
    "\n",
    "    ",
    " ",
]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_raises_only_capture_error(text: str) -> None:
    try:
        result = analyze_cell(text)
    except CaptureError:
        return
    assert result.string_names <= result.inputs
    assert len(set(result.outputs)) == len(result.outputs)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_python_like_text_raises_only_capture_error(text: str) -> None:
    try:
        analyze_cell(text)
    except CaptureError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:  # what Python itself refuses to compile
                compile(text, "<cell>", "exec", dont_inherit=True,
                        flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            except (SyntaxError, ValueError):
                return
        assert "import" in text, text  # valid Python is refused only for a star import


# Differential check of soundness. A generated cell runs in the full namespace (as a local cell
# would) and in a namespace holding only its inputs (as the runner does). Outcomes must match;
# after a successful run the result is applied the way the runner and magic apply it (outputs
# that exist remotely are bound locally, deleted names gone remotely are deleted locally), and
# the namespace must then equal the local run's.

NAMES = ["a", "b", "c", "f", "g", "K"]


class U:
    """A value that survives most operations, so generated cells run far."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __repr__(self) -> str:
        return f"U({self.label})"

    def __call__(self, *args: object) -> U:
        return self

    def __add__(self, other: object) -> U:
        return self

    __radd__ = __add__

    def __iter__(self) -> Any:
        return iter([1, 2])

    def __enter__(self) -> U:
        return self

    def __exit__(self, kind: type | None, *rest: object) -> bool:
        return kind is not None and issubclass(kind, (NameError, TypeError))


def _indent(lines: list[str]) -> list[str]:
    return ["    " + line for line in lines]


_name = st.sampled_from(NAMES)
_atom = st.one_of(_name, st.integers(0, 3).map(str))
_expr = st.recursive(
    _atom,
    lambda e: st.one_of(
        st.tuples(e, e).map(lambda t: f"({t[0]} + {t[1]})"),
        e.map(lambda x: f"{x}()"),
        st.tuples(_name, e).map(lambda t: f"({t[0]} := {t[1]})"),
        st.tuples(e, _name, e).map(lambda t: f"[{t[0]} for {t[1]} in {t[2]}]"),
        st.tuples(e, e).map(lambda t: f"({t[0]} or {t[1]})"),
        e.map(lambda x: f"(lambda: {x})"),
    ),
    max_leaves=4,
)
_simple = st.one_of(
    st.tuples(_name, _expr).map(lambda t: f"{t[0]} = {t[1]}"),
    _name.map(lambda n: f"{n} += 1"),
    _name.map(lambda n: f"del {n}"),
    _expr,
).map(lambda s: [s])


def _compound(block: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    # No decorators, and no calls in class bodies: a function's or method's body running
    # before its own name is bound is the one case the analysis knowingly leaves out.
    class_line = st.tuples(_name, _atom).map(lambda t: [f"{t[0]} = {t[1]}"])
    return st.one_of(
        st.tuples(_expr, block, block).map(
            lambda t: [f"if {t[0]}:", *_indent(t[1]), "else:", *_indent(t[2])]
        ),
        st.tuples(_expr, block).map(lambda t: [f"if {t[0]}:", *_indent(t[1])]),
        st.tuples(_name, _expr, block).map(lambda t: [f"for {t[0]} in {t[1]}:", *_indent(t[2])]),
        st.tuples(_name, block).map(lambda t: [f"def {t[0]}():", *_indent(t[1])]),
        st.tuples(_name, _name, block).map(
            lambda t: [f"def {t[0]}():", f"    global {t[1]}", *_indent(t[2])]
        ),
        st.tuples(_name, _name, block).map(
            lambda t: [f"def {t[0]}():", f"    nonlocal {t[1]}", *_indent(t[2])]
        ),
        st.tuples(
            _name,
            st.lists(
                st.one_of(
                    class_line,
                    st.tuples(_name, block).map(lambda t: [f"def {t[0]}(self):", *_indent(t[1])]),
                ),
                min_size=1,
                max_size=3,
            ),
        ).map(lambda t: [f"class {t[0]}:", *_indent([line for part in t[1] for line in part])]),
        st.tuples(block, _name, block).map(
            lambda t: ["try:", *_indent(t[0]), f"except NameError as {t[1]}:", *_indent(t[2])]
        ),
        st.tuples(block, block).map(lambda t: ["try:", *_indent(t[0]), "finally:", *_indent(t[1])]),
        st.tuples(_name, _name, block).map(lambda t: [f"with {t[0]} as {t[1]}:", *_indent(t[2])]),
    )


_block = st.recursive(
    _simple,
    lambda b: st.one_of(
        _compound(b), st.lists(b, min_size=1, max_size=3).map(lambda ls: sum(ls, []))
    ),
    max_leaves=8,
)
_cells = st.lists(_block, min_size=1, max_size=4).map(lambda ls: "\n".join(sum(ls, [])) + "\n")

_MISSING = object()


def _describe(value: object) -> object:
    if value is _MISSING:
        return "<missing>"
    if isinstance(value, (int, U)):
        return repr(value)
    if isinstance(value, list):
        return [_describe(item) for item in value]
    return f"{type(value).__name__}:{getattr(value, '__qualname__', '')}"


def _run(code: Any, namespace: dict[str, object]) -> str:
    try:
        exec(code, namespace)
    except Exception as exc:  # the cells are generated: any outcome will do, if it's the same
        return f"{type(exc).__name__}: {exc}"
    return "ok"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cells, st.sets(_name))
def test_generated_cells_need_only_their_inputs(cell: str, present: set[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = compile(cell, "<cell>", "exec")
        except SyntaxError:  # e.g. `nonlocal` with nothing to refer to: refused before sending
            with pytest.raises(CaptureError, match="syntax error"):
                analyze_cell(cell)
            return
    result = analyze_cell(cell)
    before = {name: U(name) for name in sorted(present)}
    local = dict(before)
    remote = {name: value for name, value in before.items() if name in result.inputs}
    local_outcome = _run(code, local)
    remote_outcome = _run(code, remote)
    assert remote_outcome == local_outcome, cell
    if local_outcome != "ok":  # a failed cell binds nothing locally
        return
    applied = dict(before)
    for name in result.outputs:
        if name in remote:
            applied[name] = remote[name]
    for name in result.deleted:
        if name not in remote:
            applied.pop(name, None)
    local.pop("__builtins__")
    assert {k: _describe(v) for k, v in applied.items()} == {
        k: _describe(v) for k, v in local.items()
    }, cell


def test_a_cell_analysed_again_gives_the_same_answer_and_the_same_refusal() -> None:
    # analyses are remembered by source: what is remembered must not be changeable by its user,
    # and a refusal must come again rather than be remembered as an answer
    src = "y = x + 1\ndel z\ny"
    first, again = analyze_cell(src), analyze_cell(src)
    assert first == again
    with pytest.raises(dataclasses.FrozenInstanceError):
        again.outputs = ("changed",)  # type: ignore[misc]
    assert isinstance(again.inputs, frozenset) and isinstance(again.outputs, tuple)
    assert analyze_cell(src).outputs == ("y",)
    for _ in range(2):
        with pytest.raises(CaptureError, match="syntax"):
            analyze_cell("y = (")


def test_syntax_error_counts_the_blank_lines_a_cell_starts_with() -> None:
    # IPython drops them before parsing; the notebook counts them (the %%gpu line is 1)
    with pytest.raises(SyntaxError) as info:
        analyze_cell("\n\n\nx = (1,", line_offset=1)
    assert (info.value.lineno, info.value.text) == (5, "x = (1,")
    assert "line 5" in str(info.value)


def test_the_caret_of_an_indented_cell_is_in_the_notebooks_columns() -> None:
    # IPython dedents the cell before parsing; the column must count the indent back in
    with pytest.raises(SyntaxError) as info:
        analyze_cell("    x = 1\n    y = foo(1, 2 3)", line_offset=1)
    err = info.value
    assert (err.lineno, err.text) == (3, "    y = foo(1, 2 3)")
    assert err.text[err.offset - 1] == "2"
    shown = err._render_traceback_()  # type: ignore[attr-defined]
    code, caret = shown[1], shown[2]
    assert code[caret.index("^")] == "2", shown


@pytest.mark.parametrize("source, kind", [
    ("if 1:\n  x = 1\n y = 2\n", IndentationError),  # found by IPython's tokenizing
    ("if 1:\nx = 1\n", IndentationError),  # found by the parser
    ("x = 1\n  y = 2\n", IndentationError),  # an unexpected indent
    ("if 1:\n\tx = 1\n        y = 2\n", TabError),
])
def test_indentation_errors_stay_indentation_errors(source: str, kind: type) -> None:
    # `except IndentationError` / `except TabError` must still take them, as in a local run
    import pickle

    with pytest.raises(kind) as info:
        analyze_cell(source)
    err = info.value
    assert isinstance(err, CaptureError) and type(err).__name__.startswith("Cell")
    assert f"{kind.__name__}: " in "\n".join(err._render_traceback_())  # type: ignore[attr-defined]
    # it can travel back from a GPU machine: every field survives a pickle
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err) and str(again) == str(err)
    assert (again.lineno, again.offset, again.text, again.msg) == (
        err.lineno, err.offset, err.text, err.msg)


def test_a_cell_syntax_error_survives_a_pickle() -> None:
    import pickle

    with pytest.raises(SyntaxError) as info:
        analyze_cell("x = 1\nz = 2 2\n", line_offset=1)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is type(info.value) and str(again) == str(info.value)
    assert (again.lineno, again.offset, again.text) == (3, info.value.offset, "z = 2 2")


def test_a_too_deeply_nested_cell_says_so() -> None:
    with pytest.raises(CaptureError) as info:
        analyze_cell("x = " + "-" * 20000 + "1")
    message = str(info.value)
    assert "nested too deeply" in message and "smaller steps" in message, message
    assert "()" not in message


def test_a_null_byte_is_named_on_its_line() -> None:
    with pytest.raises(SyntaxError) as info:
        analyze_cell("x = 1\ny = 2\x00\n", line_offset=1)
    err = info.value
    assert err.lineno == 3 and "null byte" in str(err) and "line 3" in str(err)
    assert "y = 2\\x00" in str(err) and "remove it" in str(err)


@pytest.mark.parametrize("cell, held", [
    ("x = 1\ndel x", {"x"}),
    ("try:\n    f()\nexcept ValueError as e:\n    pass", {"e"}),
    ("del x", set()),  # needs x to exist
    ("if c:\n    x = 1\ndel x", set()),  # x may be the notebook's
    ("x = 1\ndel x\nx = x", set()),  # read after the del: the notebook's
    ("def f():\n    global x\n    del x\nf()", set()),
    ("x = 1\ndel x\nprint(f'{x}')", set()),
])
def test_names_bound_before_every_del_are_held_not_read(cell: str, held: set[str]) -> None:
    got = analyze_cell(cell)
    assert got.held == held
    assert held <= got.inputs and held <= got.deleted  # still named, so deletion is seen
