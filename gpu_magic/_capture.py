"""Which names a notebook cell reads from, and binds into, the user namespace.

The magic must ship a cell together with the variables it uses and bring back the variables it
makes, without running it. ``analyze_cell`` reads the cell the way IPython will run it (after
IPython's own input transforms, so ``%timeit f(x)`` and ``!echo $x`` are ordinary calls) and
applies Python's scoping rules with ``ast``. It is pure: no I/O, no clock, no namespace access.

Errors lean towards shipping too much: the caller drops every input the user namespace lacks, so
an extra input costs a little bandwidth while a missing one breaks the remote run.
"""

from __future__ import annotations

import ast
import functools
import io
import keyword
import re
import tokenize
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from IPython.core.inputtransformer2 import TransformerManager

from gpu_magic._errors import (
    CaptureError,
    CellIndentationError,
    CellSyntaxError,
    CellTabError,
)

__all__ = ["CellAnalysis", "analyze_cell"]


@dataclass(frozen=True)
class CellAnalysis:
    source: str  # the Python source after IPython's transforms (what will be executed)
    inputs: frozenset[str]  # names the cell may read from the user (global) namespace
    outputs: tuple[str, ...]  # names the cell may bind at top level, in order of first binding
    deleted: frozenset[str]  # names the cell may delete at top level
    has_value: bool  # the last statement is an expression whose value IPython would display
    string_names: frozenset[str]  # identifiers inside magic/shell command strings (in inputs)
    # inputs only so that the runner can tell whether the cell deleted them: it binds each
    # before any `del` of it (or it is an `except ... as` name), so their values are never
    # read and a stand-in travels instead (an unpicklable one must not stop the cell)
    held: frozenset[str] = frozenset()
    # modules the cell imports anywhere in its code, by their full names (`import a.b`: a.b)
    imports: frozenset[str] = frozenset()


# get_ipython().<method>(...) calls produced by IPython's transforms, and which positional
# arguments hold user text (the magic's name itself is not user text).
_MAGIC_TEXT_ARGS = {
    "run_line_magic": (1,),
    "run_cell_magic": (1, 2),
    "system": (0,),
    "getoutput": (0,),
}
# Magics that run their code in the user namespace, so its bindings are the cell's bindings.
# Other magics (%%timeit, %%bash, %%writefile ...) are covered by the identifier scan alone.
_NAMESPACE_MAGICS = frozenset({"time", "capture", "prun", "debug"})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# calls that give the cell's namespace, where names are looked up by strings
_NAMESPACE_LOOKUPS = frozenset({"globals", "locals", "vars", "dir"})
_LOOKUP_METHODS = frozenset({"get", "pop", "setdefault", "__contains__", "__getitem__"})
_TRAILING_TOKENS = (tokenize.ENDMARKER, tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)
# The runner's IPython provides its own; the local one is the shell and must never be shipped.
_NEVER_INPUTS = frozenset({"get_ipython"})


@dataclass(eq=False)
class _Scope:
    kind: str  # "module", "class" or "function" (lambdas and comprehensions are functions)
    parent: _Scope | None = None
    comprehension: bool = False
    runs_later: bool = False  # its code runs after the statement defining it (function bodies)
    local: set[str] = field(default_factory=set)
    globals: set[str] = field(default_factory=set)
    nonlocals: set[str] = field(default_factory=set)
    definite: set[str] = field(default_factory=set)  # flow state of module and class bodies
    kills: list[str] = field(default_factory=list)  # every `del` so far, to undo definiteness


@functools.lru_cache(maxsize=64)
def analyze_cell(source: str, line_offset: int = 0) -> CellAnalysis:
    """Analyse one cell; raises CaptureError for a syntax error.

    ``line_offset``: lines of the cell before ``source`` (the ``%%gpu`` line: 1), so that a
    syntax error names its line as the notebook and the remote tracebacks number it.
    Remembered by source (the analysis is immutable and depends on nothing else): a cell run
    again is not parsed again."""
    transformed, tree = _transform_and_parse(source, line_offset)
    walker = _Walker()
    try:
        walker.run(tree.body)
    except RecursionError:
        raise CaptureError(
            "the cell is nested too deeply to be analysed; split the deepest expression into "
            "several statements"
        )
    last_is_expr = bool(tree.body) and isinstance(tree.body[-1], ast.Expr)
    read, outputs, deleted = walker.result()
    # The runner reports a deleted name as deleted when it is gone after the run, so it must
    # have held the name before, even one the cell binds before deleting it: `if c: x = 1;
    # del x` must not delete the user's x when c is false.
    return CellAnalysis(
        source=transformed,
        inputs=frozenset((read | deleted) - _NEVER_INPUTS),
        outputs=outputs,
        deleted=frozenset(deleted),
        has_value=last_is_expr and not _ends_with_semicolon(source, transformed),
        string_names=frozenset(walker.string_names - _NEVER_INPUTS),
        held=frozenset(deleted - read - _NEVER_INPUTS),
        imports=frozenset(walker.imports),
    )


def leading_blank_lines(source: str) -> int:
    """How many blank lines a cell starts with: IPython's transforms drop them before the
    cell is compiled, and keep the rest's numbering, so the compiled line numbers are short
    by that many of the notebook's."""
    return next((i for i, line in enumerate(source.splitlines()) if line.strip()), 0)


def _transform_and_parse(source: str, line_offset: int = 0) -> tuple[str, ast.Module]:
    if "\x00" in source:
        # the parser only says "source code string cannot contain null bytes", with no line
        raise _null_byte_error(source, line_offset)
    # The compiler turns doubtful escapes ("\d") into warnings, and into SyntaxErrors where
    # warnings are errors (pytest's filterwarnings): neither is ours to report.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            transformed = TransformerManager().transform_cell(source)
        except SyntaxError as exc:  # IndentationError from IPython's tokenizing: as Python's
            raise _cell_syntax_error(exc, source, line_offset) from None
        except Exception as exc:  # IPython's transforms raise assorted types on broken input
            raise CaptureError(
                f"IPython cannot read the cell ({type(exc).__name__}: {exc}); fix its syntax"
            )
        try:
            tree = ast.parse(transformed)
            # What the parser lets through and the compiler refuses ('return' or 'yield'
            # outside a function, 'break' outside a loop, a 'nonlocal' with no binding):
            # found here, not after a GPU was granted. One statement at a time, as IPython
            # compiles a cell (a __future__ import need not come first), top-level await
            # allowed, as IPython allows it.
            for node in tree.body:
                compile(ast.Module([node], []), "<cell>", "exec", dont_inherit=True,
                        flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            return transformed, tree
        except SyntaxError as exc:
            raise _cell_syntax_error(exc, source, line_offset) from None
        except (RecursionError, MemoryError) as exc:
            # CPython's parser gives up on deep nesting with a bare MemoryError (no message)
            raise CaptureError(
                f"the cell is nested too deeply for Python's parser ({type(exc).__name__}: "
                f"an expression with too many brackets or operators one inside another); "
                f"split it into smaller steps, assigning parts to variables"
            ) from None
        except ValueError as exc:
            raise CaptureError(
                f"the cell cannot be parsed ({type(exc).__name__}: {exc}); fix its syntax"
            ) from None


def _cell_syntax_error(exc: SyntaxError, source: str, line_offset: int) -> CellSyntaxError:
    """``exc`` in the notebook's lines and columns, of the kind Python raised (an
    IndentationError stays one, so ``except IndentationError`` still takes it)."""
    lines = source.splitlines()
    lineno = (exc.lineno or 0) + leading_blank_lines(source)
    # Transforms keep line numbers, so the user's own line is the one to show.
    text = lines[lineno - 1] if 0 < lineno <= len(lines) else (exc.text or "")
    offset = exc.offset
    parsed = (exc.text or "").rstrip("\r\n")
    if offset is not None and parsed and text.endswith(parsed.lstrip()):
        # IPython dedents an indented cell before it is parsed: the column counts from the
        # dedented line, the caret is shown under the notebook's
        offset += (len(text) - len(text.lstrip())) - (len(parsed) - len(parsed.lstrip()))
    kind = (CellTabError if isinstance(exc, TabError)
            else CellIndentationError if isinstance(exc, IndentationError) else CellSyntaxError)
    what = "an indentation error" if kind is not CellSyntaxError else "a syntax error"
    shift = lineno + line_offset - (exc.lineno or 0)
    # Python's own "(detected at line 1)" counts as the parsed text does: the notebook's way
    msg = re.sub(r"\((detected at|started at) line (\d+)\)",
                 lambda m: f"({m[1]} line {int(m[2]) + shift})", exc.msg or "")
    return kind(
        f"the cell has {what} on line {lineno + line_offset}: {msg}\n"
        f"    {text.strip()}\nfix that line and run the cell again",
        msg=msg, lineno=lineno + line_offset, offset=offset, text=text,
    )


def _null_byte_error(source: str, line_offset: int) -> CellSyntaxError:
    """The error for a cell with a null byte (pasted binary, a bad encoding), on its line."""
    lines = source.splitlines()
    lineno = next(i for i, line in enumerate(lines, 1) if "\x00" in line)
    text = lines[lineno - 1].replace("\x00", "\\x00")  # shown, not swallowed by the terminal
    return CellSyntaxError(
        f"the cell has a null byte (\\x00) on line {lineno + line_offset}\n"
        f"    {text.strip()}\nremove it (Python source cannot contain null bytes) and run "
        f"the cell again",
        msg="source code cannot contain null bytes", lineno=lineno + line_offset,
        offset=lines[lineno - 1].index("\x00") + 1, text=text,
    )


def _ends_with_semicolon(*texts: str) -> bool:
    """IPython's display suppression: the last token, bar comments and newlines, is ';'."""
    for text in texts:  # the original first; the transformed text if the original won't tokenize
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
        except (tokenize.TokenError, SyntaxError, ValueError):
            continue
        for tok in reversed(tokens):
            if tok.type not in _TRAILING_TOKENS:
                return tok.type == tokenize.OP and tok.string == ";"
        return False
    return False


class _Walker(ast.NodeVisitor):
    """Walks statements in execution order, tracking which globals are surely bound.

    Reads in module (and class) bodies are decided on the spot against the flow state. Reads and
    bindings in other scopes are recorded and decided at the end, once every scope's local names
    and ``global``/``nonlocal`` declarations are known, as Python's symbol table does.
    """

    def __init__(self) -> None:
        self.module = _Scope("module")
        self.scope = self.module
        self.inputs: set[str] = set()
        self.string_names: set[str] = set()
        self.imports: set[str] = set()
        self._cond = 0  # >0 while inside a part of an expression that may not be evaluated
        self._defining: set[str] = set()  # top-level classes whose bodies are being walked
        # (scope, name, surely bound globally by then, surely bound in the class body by then)
        self._reads: list[tuple[_Scope, str, bool, bool]] = []
        self._binds: list[tuple[_Scope, str]] = []
        self._dels: list[tuple[_Scope, str]] = []

    def run(self, body: Iterable[ast.stmt]) -> None:
        for stmt in body:
            self.visit(stmt)

    def result(self) -> tuple[set[str], tuple[str, ...], set[str]]:
        """The names the cell reads from the user's namespace, binds there and deletes."""
        read = self.inputs | self.string_names
        for scope, name, bound_globally, bound_in_class in self._reads:
            if not bound_globally and _reads_global(scope, name, bound_in_class):
                read.add(name)
        outputs = dict.fromkeys(n for s, n in self._binds if _binds_global(s, n))
        deleted = {n for s, n in self._dels if _binds_global(s, n)}
        return read, tuple(outputs), deleted

    # --- names -------------------------------------------------------------------------------
    def _read(self, name: str) -> None:
        scope = self.scope
        if scope.kind == "module":
            if name not in scope.definite:
                self.inputs.add(name)
            return
        bound = name in self.module.definite or (scope.runs_later and name in self._defining)
        self._reads.append((scope, name, bound, scope.kind == "class" and name in scope.definite))

    def _bind(self, name: str, scope: _Scope | None = None) -> None:
        scope = scope or self.scope
        scope.local.add(name)
        self._binds.append((scope, name))
        if not self._cond and scope is self.scope:
            scope.definite.add(name)

    def _kill(self, name: str) -> None:
        self.scope.local.add(name)  # `del x` makes x local to a function, like a binding
        self.scope.definite.discard(name)
        self.scope.kills.append(name)
        self._dels.append((self.scope, name))

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store):
            self._bind(node.id)
        else:  # Load, and Del: `del x` needs x to exist
            self._read(node.id)
            if isinstance(node.ctx, ast.Del):
                self._kill(node.id)

    def visit_Global(self, node: ast.Global) -> None:
        if self.scope.kind != "module":
            self.scope.globals.update(node.names)

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        self.scope.nonlocals.update(node.names)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:  # `import a.b` binds a; `import a.b as c` binds c
            self._bind(alias.asname or alias.name.partition(".")[0])
            self.imports.add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and not node.level:
            self.imports.add(node.module)
        for alias in node.names:
            # `import *` binds names only the module knows: where the cell ran, the runner
            # sees them bound and sends them back; a name the cell reads after it is still
            # sent from the notebook if it has one (the import then replaces it, as here)
            if alias.name != "*":
                self._bind(alias.asname or alias.name)

    # --- statements whose evaluation order differs from the field order -------------------------
    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self.visit(target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self._read(node.target.id)
            self.visit(node.value)
            self._bind(node.target.id)
        else:
            self.visit(node.target)
            self.visit(node.value)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        if not isinstance(node.target, ast.Name):
            self.visit(node.target)
        elif node.value is not None:
            self._bind(node.target.id)
        else:
            self.scope.local.add(node.target.id)  # `x: int` in a function still makes x local
        if self.scope.kind != "function":  # annotations of function locals are never evaluated
            self.visit(node.annotation)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        target = self.scope
        while target.comprehension and target.parent is not None:  # PEP 572: binds outside
            target = target.parent
        self._bind(node.target.id, target)

    # --- control flow: only what surely ran stays definite --------------------------------------
    def _block(
        self, stmts: Iterable[ast.stmt], base: set[str], prelude: Callable[[], None] | None = None
    ) -> set[str]:
        """Walk stmts from the flow state base; return the state at their end, restore ours."""
        saved, self.scope.definite = self.scope.definite, set(base)
        if prelude is not None:
            prelude()
        self.run(stmts)
        result, self.scope.definite = self.scope.definite, saved
        return result

    def _killed_since(self, mark: int) -> set[str]:
        return set(self.scope.kills[mark:])

    def _maybe(self, *blocks: tuple[Iterable[ast.stmt], Callable[[], None] | None]) -> None:
        """Blocks that may run, partly or not at all: they leave only their deletions."""
        mark, start = len(self.scope.kills), self.scope.definite
        for stmts, prelude in blocks:
            self._block(stmts, start - self._killed_since(mark), prelude)
        self.scope.definite = start - self._killed_since(mark)

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        start = self.scope.definite
        # Bound on both branches is bound: exactly one of them runs to completion.
        self.scope.definite = self._block(node.body, start) & self._block(node.orelse, start)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        self._maybe((node.body, lambda: self.visit(node.target)), (node.orelse, None))

    visit_AsyncFor = visit_For

    def visit_While(self, node: ast.While) -> None:
        self.visit(node.test)  # evaluated at least once, so a walrus in it surely binds
        self._maybe((node.body, None), (node.orelse, None))

    def visit_With(self, node: ast.With | ast.AsyncWith) -> None:
        for item in node.items:
            self.visit(item.context_expr)
            if item.optional_vars is not None:
                self.visit(item.optional_vars)
        self._maybe((node.body, None))  # a context manager may swallow an exception

    visit_AsyncWith = visit_With

    def visit_Match(self, node: ast.Match) -> None:
        self.visit(node.subject)

        def prelude(case: ast.match_case) -> Callable[[], None]:
            def run() -> None:
                self.visit(case.pattern)  # captures bind only if this case is taken
                if case.guard is not None:
                    self.visit(case.guard)

            return run

        self._maybe(*((case.body, prelude(case)) for case in node.cases))

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.pattern is not None:
            self.visit(node.pattern)
        if node.name is not None:
            self._bind(node.name)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name is not None:
            self._bind(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        self.generic_visit(node)
        if node.rest is not None:
            self._bind(node.rest)

    def visit_Try(self, node: ast.Try) -> None:
        start, mark = self.scope.definite, len(self.scope.kills)
        after = self._block(node.orelse, self._block(node.body, start))
        for handler in node.handlers:
            # The body may have stopped anywhere: a handler starts from what held before it.
            state = self._block(
                handler.body, start - self._killed_since(mark), self._prelude(handler)
            )
            if handler.name:  # Python deletes `e` when the handler ends
                self._kill(handler.name)
                state.discard(handler.name)
            after &= state
        final_mark = len(self.scope.kills)
        final = self._block(node.finalbody, start - self._killed_since(mark))
        self.scope.definite = (after | final) - self._killed_since(final_mark)

    visit_TryStar = visit_Try

    def _prelude(self, handler: ast.ExceptHandler) -> Callable[[], None]:
        def run() -> None:
            if handler.type is not None:
                self.visit(handler.type)
            if handler.name:
                self._bind(handler.name)

        return run

    # --- expressions that may be partly skipped (a walrus there binds only maybe) ---------------
    def _visit_maybe(self, nodes: Iterable[ast.AST | None]) -> None:
        self._cond += 1
        for node in nodes:
            if node is not None:
                self.visit(node)
        self._cond -= 1

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        self.visit(node.values[0])
        self._visit_maybe(node.values[1:])

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self.visit(node.test)
        self._visit_maybe([node.body, node.orelse])

    def visit_Compare(self, node: ast.Compare) -> None:
        for left, op, right in zip([node.left, *node.comparators], node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)) and self._namespace_call(right):
                self._looked_up(left)  # "model" not in globals()
        self.visit(node.left)
        self.visit(node.comparators[0])
        self._visit_maybe(node.comparators[1:])

    def visit_Assert(self, node: ast.Assert) -> None:
        self.visit(node.test)
        self._visit_maybe([node.msg])

    # --- scopes --------------------------------------------------------------------------------
    def _enter(self, kind: str, *, runs_later: bool, comprehension: bool = False) -> _Scope:
        self.scope = _Scope(kind, self.scope, comprehension, runs_later or self.scope.runs_later)
        return self.scope

    def _leave(self) -> None:
        assert self.scope.parent is not None
        self.scope = self.scope.parent

    def _outer_args(self, args: ast.arguments) -> None:
        """Defaults and annotations are evaluated where the function is defined."""
        for default in [*args.defaults, *args.kw_defaults]:
            if default is not None:
                self.visit(default)
        for arg in [*args.posonlyargs, *args.args, args.vararg, *args.kwonlyargs, args.kwarg]:
            if arg is not None and arg.annotation is not None:
                self.visit(arg.annotation)

    def _params(self, args: ast.arguments) -> None:
        for arg in [*args.posonlyargs, *args.args, args.vararg, *args.kwonlyargs, args.kwarg]:
            if arg is not None:
                self.scope.local.add(arg.arg)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        self._outer_args(node.args)
        if node.returns is not None:
            self.visit(node.returns)
        # The body runs only after the name is bound, so a recursive call reads no input.
        self._bind(node.name)
        self._enter("function", runs_later=True)
        self._params(node.args)
        self.run(node.body)
        self._leave()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._outer_args(node.args)
        self._enter("function", runs_later=True)
        self._params(node.args)
        self.visit(node.body)
        self._leave()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        top_level = self.scope is self.module
        if top_level:  # methods run after the class name is bound, so they may use it
            self._defining.add(node.name)
        self._enter("class", runs_later=False)
        self.run(node.body)
        self._leave()
        if top_level:
            self._defining.discard(node.name)
        self._bind(node.name)

    def _comprehension(self, generators: list[ast.comprehension], *elts: ast.expr) -> None:
        self.visit(generators[0].iter)  # the first iterable is evaluated in the enclosing scope
        self._enter("function", runs_later=False, comprehension=True)
        self._cond += 1
        for i, gen in enumerate(generators):
            if i:
                self.visit(gen.iter)
            self.visit(gen.target)
            for condition in gen.ifs:
                self.visit(condition)
        for elt in elts:
            self.visit(elt)
        self._cond -= 1
        self._leave()

    def visit_ListComp(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp) -> None:
        self._comprehension(node.generators, node.elt)

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._comprehension(node.generators, node.key, node.value)

    # --- IPython's magic and shell calls -------------------------------------------------------
    # --- names looked up in the namespace by a string ---------------------------------------
    # (sent where the notebook has them, as a local cell finds them: without, `if "model" not
    # in globals(): model = build()` built a new model over the trained one, in silence)
    def _namespace_call(self, node: ast.AST) -> bool:
        """``globals()``, or ``vars()``/``locals()``/``dir()`` where they mean the same."""
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _NAMESPACE_LOOKUPS and not node.args and not node.keywords
                and (node.func.id == "globals" or self.scope is self.module))

    def _looked_up(self, node: ast.AST | None) -> None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.isidentifier() and not keyword.iskeyword(node.value):
            self.string_names.add(node.value)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if self._namespace_call(node.value):  # globals()["cfg"]
            self._looked_up(node.slice)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in _LOOKUP_METHODS and node.args \
                and self._namespace_call(func.value):  # globals().get("runs", 0)
            self._looked_up(node.args[0])
        self.generic_visit(node)
        if not (
            isinstance(func, ast.Attribute)
            and func.attr in _MAGIC_TEXT_ARGS
            and isinstance(func.value, ast.Call)
            and isinstance(func.value.func, ast.Name)
            and func.value.func.id == "get_ipython"
        ):
            return
        texts = [_str_arg(node, i) for i in _MAGIC_TEXT_ARGS[func.attr]]
        for text in texts:
            self.string_names.update(
                word for word in _IDENTIFIER.findall(text) if not keyword.iskeyword(word)
            )
        magic = _str_arg(node, 0) if func.attr.startswith("run_") else ""
        if magic in _NAMESPACE_MAGICS and self.scope is self.module:
            self._namespace_magic(magic, *texts)

    def _namespace_magic(self, magic: str, line: str, cell: str | None = None) -> None:
        """%time x = f() and %%capture out bind names in the user namespace: outputs."""
        if cell is not None and magic == "capture":  # `%%capture [--no-stderr] out`
            for word in line.split():
                if word.isidentifier() and not keyword.iskeyword(word):
                    self._binds.append((self.module, word))
        try:
            _, tree = _transform_and_parse(line if cell is None else cell)
        except CaptureError:  # options before the code, or not Python: the scan must do
            return
        self._maybe((tree.body, None))


def _str_arg(node: ast.Call, index: int) -> str:
    if index < len(node.args):
        arg = node.args[index]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
    return ""


def _binds_global(scope: _Scope, name: str) -> bool:
    return scope.kind == "module" or name in scope.globals


def _reads_global(scope: _Scope, name: str, bound_in_class: bool) -> bool:
    """Whether a read of name in scope (not the module) resolves to the global namespace."""
    if name in scope.globals:
        return True
    if name in scope.local:
        # A class body looks a name up in its own namespace first, then in the globals.
        return scope.kind == "class" and not bound_in_class
    if name in scope.nonlocals:
        return False
    outer = scope.parent
    while outer is not None and outer.kind != "module":
        # Class bodies are not enclosing scopes for the functions inside them.
        if outer.kind == "function":
            if name in outer.globals:
                return True
            if name in outer.local or name in outer.nonlocals:
                return False
        outer = outer.parent
    return True
