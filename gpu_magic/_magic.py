"""``%%gpu`` and ``%gpu``: the IPython face of :func:`gpu_magic.run`.

Cell form::

    %%gpu [SPEC] [--timeout S] [--wait S] [--retries N] [--oom-fallback]
                 [--return NAMES | --no-return] [--background] [--env KEY=VALUE]... [--quiet]
                 [--dry-run]

Line form: ``%gpu pool | jobs [--all] | connect URL [--token TOKEN] | cancel JOB_ID | status | stop``.
"""

from __future__ import annotations

import difflib
import getpass
import keyword
import os
import re
import shlex
import sys
from argparse import ArgumentTypeError
from collections.abc import Iterable
from typing import Any

from IPython.core.error import StdinNotImplementedError, UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, kwds, magic_arguments, parse_argstring
from traitlets import Unicode, observe

from . import _api, _injob
from ._client import LOCAL, checked_job_id
from ._connection import (
    configure,
    connect,
    current_target,
    get_connection,
    local_difference,
    set_connection,
)
from ._errors import (
    AuthError,
    CellSyntaxError,
    GatewayError,
    GpuMagicError,
    SpecError,
    one_line,
)
from ._spec import parse_spec
from ._tables import JOBS_SHOWN, jobs_bundle, pool_bundle

_LINE_COMMANDS = ("pool", "jobs", "connect", "cancel", "attach", "status", "stop")
_ENDED = ("succeeded", "failed", "cancelled", "timed_out", "lost", "expired")


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean --wait?"`` for the choice closest to a misspelled ``word``, or ""."""
    bare = word.split("=", 1)[0].lstrip("-").lower()
    names = {c.lstrip("-"): c for c in choices}
    starts = [c for n, c in names.items() if bare and n.startswith(bare)]
    close = starts if len(starts) == 1 else [
        names[n] for n in difflib.get_close_matches(bare.replace("_", "-"), names, n=1, cutoff=0.6)]
    return f"; did you mean {close[0]}?" if close else ""


_NUMBER = re.compile(r"-\d+(\.\d*)?([eE][+-]?\d+)?|-\.\d+|-inf|-nan", re.IGNORECASE)


def _is_spec(text: str) -> bool:
    """Whether ``text`` reads as a GPU spec of known types (``T4``, ``H100:2, any``)."""
    try:
        parse_spec(text)
    except SpecError:
        return False
    return bool(text.strip())


def _quoted(text: str) -> str:
    """``text`` quoted for the magic's line, with double quotes where that is enough."""
    return f'"{text}"' if not any(c in text for c in '"\\$`') else shlex.quote(text)


_UNIT = re.compile(r"(\d+(?:\.\d*)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)",
                   re.IGNORECASE)
_PER_UNIT = {"s": 1, "m": 60, "h": 3600}


def _seconds(flag: str) -> Any:
    """argparse's type for a number of seconds: its refusal says seconds, and turns ``10s``
    or ``5m`` into the number to write (argparse's own says only "invalid float value")."""

    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            pass
        m = _UNIT.fullmatch(text.strip())
        if m:
            value = float(m.group(1)) * _PER_UNIT[m.group(2)[0].lower()]
            fix = f"{flag} {int(value) if value.is_integer() else value}"
            raise ArgumentTypeError(f"'{text}': write the number of seconds alone, {fix}")
        raise ArgumentTypeError(f"'{text}' is not a number of seconds; write a plain number, "
                                f"e.g. {flag} 600")

    return parse


def _whole(flag: str) -> Any:
    """argparse's type for a whole number, refused in words (not "invalid int value")."""

    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ArgumentTypeError(f"'{text}' is not a whole number; write e.g. {flag} 2") from None

    return parse


# what an option given without its value needs (argparse said "expected one argument")
_VALUE_NEEDED = {
    "--env": "KEY=VALUE (or KEY alone: this kernel's value), e.g. --env MY_SETTING=1",
    "--return": "the names to bring back, separated by commas, e.g. --return model,loss",
    "--timeout": "a number of seconds, e.g. --timeout 600",
    "--wait": "a number of seconds, e.g. --wait 60 (0: only a GPU free right now)",
    "--retries": "a whole number of re-runs, e.g. --retries 2",
}


def _without_comment(line: str) -> str:
    """The magic's line without a trailing `# comment` (a '#' that starts a word outside
    quotes, as a shell reads it): `%%gpu T4  # small model` is T4."""
    quote, escaped = "", False
    for i, c in enumerate(line):
        if escaped:  # (a backslash takes the next character as it is, but in '...')
            escaped = False
        elif c == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


_FLAG_NAMES = ("timeout", "wait", "retries", "oom-fallback", "return", "no-return",
               "background", "env", "quiet", "dry-run")


def _misdashed(line: str) -> str | None:
    """What is wrong with an option written with a long dash (autocorrect makes ``--`` into
    ``—``) or with a space after its dashes, and the option meant; None if nothing."""
    try:
        words = shlex.split(line)
    except ValueError:  # (an unclosed quote: said by the parser)
        return None
    for word, after in zip(words, [*words[1:], ""]):
        m = re.fullmatch(r"([\u2012\u2013\u2014\u2015\u2212]+-?)([A-Za-z][\w-]*)(=.*)?", word)
        if m:
            return (f"'{m[1]}{m[2]}' starts with '{m[1]}', a long dash (as autocorrect writes "
                    f"'--'); write --{m[2]}")
        if word in ("-", "--") and after.lower() in _FLAG_NAMES:
            return f"'{word} {after}' has a space after '{word}'; write --{after.lower()}"
    return None


def _split(line: str) -> tuple[str, str]:
    """Separate the spec (free text, may hold commas, spaces, a list literal) from the flags."""
    m = re.search(r"(^|\s)--?[A-Za-z]", line)
    if m is None:
        return line.strip(), ""
    return line[: m.start()].strip(), line[m.start():].strip()


@magics_class
class GPUMagic(Magics):
    """Run a cell on a GPU of a gpu_magic pool."""

    url = Unicode("", help="URL of the gateway (default: GPU_MAGIC_URL, else the local one)").tag(
        config=True)
    token = Unicode("", help="token for the gateway (default: GPU_MAGIC_TOKEN)").tag(config=True)

    @classmethod
    def section_names(cls) -> list[str]:
        # the README once spelled the class GPUMagics: that configuration is read too
        # (GPUMagic, the contract's spelling, wins where both are set)
        names = super().section_names()
        return [*names[:-1], "GPUMagics", names[-1]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        configure(self.url, self.token)  # from a config file, read as the magic is made

    @observe("url", "token")
    def _configured(self, change: Any) -> None:
        configure(self.url, self.token)  # %config GPUMagic.url = ...

    @magic_arguments()
    # argparse's own usage would put the spec last, an order the magic refuses ('%' doubled:
    # argparse formats the usage with %; IPython puts one more before it)
    @kwds(usage="%%gpu [SPEC] [--timeout SECONDS] [--wait SECONDS] [--retries N] "
                "[--oom-fallback] [--return NAMES | --no-return] [--background] "
                "[--env KEY=VALUE]... [--quiet] [--dry-run]\n"
                "       %%gpu pool | jobs [--all] | connect URL [--token TOKEN] | cancel JOB_ID | "
                "attach JOB_ID | status | stop")
    @argument("spec", nargs="*",
              help="GPU options, most preferred first: 'H100:2, A100-80GB:2, any' (default any)")
    @argument("--timeout", type=_seconds("--timeout"), default=None, metavar="SECONDS",
              help="seconds the cell may run (default 3600)")
    @argument("--wait", type=_seconds("--wait"), default=None, metavar="SECONDS",
              help="seconds to wait in the queue (default: no limit)")
    @argument("--retries", type=_whole("--retries"), default=0, metavar="N",
              help="re-runs if the runner dies (not if the cell raises)")
    @argument("--oom-fallback", action="store_true",
              help="after a CUDA out-of-memory error, re-run on the next option with more GPU memory")
    @argument("--return", dest="return_names", default=None, metavar="NAMES",
              help="comma-separated names to bring back (default: every name the cell binds)")
    @argument("--no-return", action="store_true", help="bring no names back")
    @argument("--background", action="store_true", help="return at once with a job handle")
    @argument("--env", action="append", default=[], metavar="KEY=VALUE",
              help="environment variable for the cell; KEY alone passes this kernel's value")
    @argument("--quiet", action="store_true", help="no status display, only the cell's output")
    @argument("--dry-run", action="store_true", help="show what would be sent; send nothing")
    @line_cell_magic
    def gpu(self, line: str, cell: str | None = None) -> Any:
        """Run the cell on a GPU of the pool (%%gpu: the spec first, then the options), or
        manage the pool and jobs (%gpu ...)."""
        try:
            return self._line(line) if cell is None else self._cell(line, cell)
        except CellSyntaxError:
            raise  # a SyntaxError, for `except SyntaxError`: shown by show_cell_syntax_errors
        except GpuMagicError as exc:
            one_line(exc)
            raise

    def _cell(self, line: str, cell: str) -> Any:
        misdashed = _misdashed(_without_comment(line))
        if misdashed:
            raise UsageError(f"{misdashed}\nusage: %%gpu [SPEC] [options]; see %gpu? for the "
                             "options")
        spec_text, flags = _split(_without_comment(line))
        words = self._words(flags)
        if "--help" in words or "-h" in words:
            self._help("\n(the cell did not run: take --help off to run it)")
            return None
        twice = self._given_twice(words)
        if twice:
            raise UsageError(twice)
        try:
            # the words as a shell splits them (IPython's own split keeps the quotes, so
            # --env "MSG=hello world" could not be written)
            args = self._defaults() if not words else self.gpu.parser.parse_args(words)
        except UsageError as exc:
            m = re.search(r"argument (--[\w-]+): expected one argument", str(exc))
            if m and m[1] in _VALUE_NEEDED:
                raise UsageError(f"{m[1]} needs {_VALUE_NEEDED[m[1]]}; leave it out for the "
                                 "default\nusage: %%gpu [SPEC] [options]; see %gpu? for the "
                                 "options") from None
            raise UsageError(f"{exc}{self._flag_hint(flags)}\nusage: %%gpu [SPEC] [options]; "
                             "see %gpu? for the options") from None
        if args.spec:
            raise UsageError(self._stray_hint(spec_text, words))
        if args.return_names is not None and args.no_return:
            raise UsageError("--return and --no-return contradict each other; use one of them")
        if args.return_names is not None:
            bad = [n for n in args.return_names.split(",")
                   if not n.strip().isidentifier() or keyword.iskeyword(n.strip())]
            if bad:
                raise UsageError(
                    f"--return {args.return_names}: {bad[0].strip()!r} is not a name a cell "
                    "can bind; list names separated by commas, e.g. --return model,loss")
        problem = _api.option_problem(args.timeout, args.wait, args.retries,
                                      spell=lambda name: f"--{name} ") or _api.env_problem(
                                          self._env(args.env), "--env")
        if problem:
            raise UsageError(problem)
        opts = _api.Options(
            timeout=args.timeout, wait=args.wait, retries=args.retries,
            oom_fallback=args.oom_fallback,
            return_names=[n.strip() for n in args.return_names.split(",") if n.strip()]
            if args.return_names is not None else None,
            no_return=args.no_return, env=self._env(args.env), quiet=args.quiet,
            dry_run=args.dry_run, background=args.background, line_offset=1,
            label=self._label(), meta=self._meta(), show_value=True,
        )
        shell = self.shell
        assert shell is not None
        # IPython's own names stay here; the outputs it keeps (_, __, ___, _5) are the user's
        hidden = {n for n in shell.user_ns_hidden if not _api.HISTORY_NAME.fullmatch(n)}
        return _api.run(cell, spec_text or None, shell.user_ns, hidden=hidden, **vars(opts))

    def _help(self, after: str = "") -> None:
        """What %gpu? shows of the options (argparse's -h is off in IPython's magics)."""
        print(self.gpu.parser.format_help().removeprefix("::\n\n").rstrip() + after)

    @staticmethod
    def _words(flags: str) -> list[str]:
        """The options' words, split as a shell does: quotes group a value with spaces."""
        try:
            return shlex.split(flags)
        except ValueError as exc:  # "No closing quotation"
            raise UsageError(f"the options {flags!r} cannot be read: {str(exc).lower()}; close "
                             'each quote, e.g. --env "MSG=hello world"') from None

    def _given_twice(self, words: list[str]) -> str | None:
        """An option of one value given twice (--timeout 5 --timeout 6): argparse keeps the
        last in silence, which may not be the one meant. --env may repeat."""
        actions = self.gpu.parser._option_string_actions
        seen: dict[str, str] = {}
        for i, word in enumerate(words):
            option, eq, inline = word.partition("=")
            action = actions.get(option) if option.startswith("--") else None
            if action is None or action.dest == "env":
                continue
            value = inline if eq else (words[i + 1] if action.nargs != 0 and i + 1 < len(words)
                                       else "")
            if action.dest in seen:
                if action.nargs == 0:
                    return f"{option} is given twice; give it once"
                shown = " and ".join(f"{option} {v}" for v in (seen[action.dest], value))
                return f"{option} is given twice ({shown}); give it once"
            seen[action.dest] = value
        return None

    def _strays(self, words: list[str]) -> list[tuple[int, str | None]]:
        """Each word no option took (argparse files them under the spec), with the option
        just before it: ``--return b c`` leaves ``c`` after ``--return``."""
        actions = self.gpu.parser._option_string_actions
        strays: list[tuple[int, str | None]] = []
        before, i = None, 0
        while i < len(words):
            word = words[i]
            if word.startswith("-") and len(word) > 1 and not _NUMBER.fullmatch(word):
                name, eq, _ = word.partition("=")
                found = {a for o, a in actions.items() if o == name} or {
                    a for o, a in actions.items() if o.startswith(name)}  # (abbreviations)
                action = found.pop() if len(found) == 1 else None
                before = max(action.option_strings, key=len) if action else name
                takes = action is not None and action.nargs != 0 and not eq
                i += 2 if takes else 1
            else:
                strays.append((i, before))
                i += 1
        return strays

    def _stray_hint(self, spec_text: str, words: list[str]) -> str:
        """What to write instead of a line with words after the options that no option took."""
        strays = self._strays(words)
        at = {i for i, _ in strays}
        left = [words[i] for i, _ in strays]
        rest = [w for i, w in enumerate(words) if i not in at]
        option = strays[0][1] if strays else None
        # the value the option took: the word before the first stray, or --opt=VALUE
        before = words[strays[0][0] - 1] if strays and strays[0][0] > 0 else ""
        value = (before.partition("=")[2] if before.startswith("-") and "=" in before
                 else None if before.startswith("-") or not before else before)
        if option in ("--return", "--env") and value is not None and (
                spec_text or not _is_spec(" ".join(left))):
            if option == "--return":
                names = [n.strip() for w in (value, *left) for n in w.split(",") if n.strip()]
                return (f"--return takes one value, the names separated by commas without "
                        f"spaces: --return {','.join(names)}")
            if all("=" in w for w in left):
                each = " ".join(f"--env {shlex.quote(w)}" for w in (value, *left))
                return f"--env takes one KEY=VALUE; give each variable its own --env: {each}"
            joined = " ".join((value, *left))
            key = joined.partition("=")[0]
            return (f"--env takes one KEY=VALUE, and '{left[0]}' is left over: quote a value "
                    f"with spaces, --env {_quoted(joined)} (or set it in the kernel, "
                    f"os.environ[{key!r}] = ..., and pass --env {key})")
        joined = " ".join(left)
        if _is_spec(joined):
            spec = f"{spec_text}, {joined}" if spec_text else joined
            return f"put the GPU spec before the options: %%gpu {spec} {shlex.join(rest)}"
        action = self.gpu.parser._option_string_actions.get(option or "")
        takes = ("" if action is None else
                 f"{option} takes no value" if action.nargs == 0 else f"{option} takes one value")
        after = f"after {option}" if option else "among the options"
        return (f"'{joined}' {after} is left over: {takes + '; ' if takes else ''}the GPU spec "
                "goes before the options (%%gpu H100:2, any --timeout 600), and a value with "
                'spaces is quoted (--env "MSG=hello world")')

    def _flag_hint(self, flags: str) -> str:
        """The closest option to the first one argparse cannot know (``--wiat``), if any."""
        known = list(self.gpu.parser._option_string_actions)
        try:
            words = shlex.split(flags)
        except ValueError:
            words = flags.split()
        for word in words:
            name = word.split("=", 1)[0]
            if word.startswith("-") and not any(k.startswith(name) for k in known):
                return _did_you_mean(name, known)
        return ""

    def _defaults(self) -> Any:
        """The options of a cell without flags (most cells): argparse's answer, kept (only
        read below), instead of asking argparse again each time."""
        if GPUMagic._default_args is None:
            GPUMagic._default_args = parse_argstring(self.gpu, "")
        return GPUMagic._default_args

    _default_args: Any = None

    def _label(self) -> str:
        # IPython counts the running cell before it runs, so the count already points past it
        count = getattr(self.shell, "execution_count", None)
        return f"Cell In[{count - 1}]" if isinstance(count, int) and count > 1 else "Cell"

    def _meta(self) -> dict[str, str]:
        meta = _api.kernel_cell_meta()
        path = os.environ.get("JPY_SESSION_NAME")
        if path:
            meta["notebook"] = path
        return meta

    @staticmethod
    def _env(items: list[str]) -> dict[str, str]:
        env = {}
        for item in items:
            key, eq, value = item.partition("=")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise UsageError(f"--env {item!r}: write KEY=VALUE, or KEY to pass this kernel's value")
            if not eq:
                if key not in os.environ:
                    raise UsageError(f"--env {key}: this kernel has no environment variable {key}")
                value = os.environ[key]
            if key in env:
                raise UsageError(f"--env {key} is given twice ({key}={env[key]} and "
                                 f"{key}={value}); give it once")
            env[key] = value
        return env

    def _line(self, line: str) -> Any:
        from IPython.display import display

        try:
            words = shlex.split(line)
        except ValueError as exc:  # "No closing quotation"
            raise UsageError(f"%gpu {line.strip()} cannot be read: {str(exc).lower()}; close "
                             "each quote") from None
        if words and words[0] in ("help", "--help", "-h"):
            self._help()
            return None
        if words and words[0] not in _LINE_COMMANDS and _is_spec(line.split("--")[0]):
            # one % too few: the line magic took the spec for a command
            raise UsageError(
                f"'{line.strip()}' is not a %gpu command: to run a cell on a GPU, write "
                f"%%gpu (two %) on the cell's first line and the code below it:\n"
                f"%%gpu {line.strip()}\n...")
        if not words or words[0] not in _LINE_COMMANDS:
            what = (f"'{words[0]}' is not a %gpu command{_did_you_mean(words[0], _LINE_COMMANDS)}"
                    "\n" if words else "")
            raise UsageError(
                f"{what}usage: %gpu pool | jobs [--all] | connect URL [--token TOKEN] | cancel JOB_ID | attach JOB_ID | "
                "status | stop"
                " (and %%gpu [SPEC] ... as a cell magic; see %gpu?)"
            )
        cmd, rest = words[0], words[1:]
        if cmd in ("pool", "status", "stop") and rest:
            raise UsageError(f"%gpu {cmd} takes nothing after it, not {' '.join(rest)!r}")
        if cmd == "jobs" and rest and rest != ["--all"]:
            raise UsageError(f"%gpu jobs takes only --all (every user's jobs, for an admin), "
                             f"not {' '.join(rest)!r}{_did_you_mean(rest[0], ['--all'])}")
        if cmd == "connect":
            return self._connect(rest)
        if _injob.current_job() and current_target()[0] is None:
            # a cell running on a GPU: its machine's local gateway is not the notebook's
            raise _injob.refuse_local_gateway(f"%gpu {cmd}")
        if cmd == "stop":
            from ._embedded import stop_local_gateway

            said = stop_local_gateway()
            url, how = current_target()
            if url is not None:  # cells go elsewhere: that gateway is not this command's
                said += (f"; the gateway cells use, {url} (from {how}), is not stopped by "
                         "this: it is stopped where it was started")
            print(said)
            return None
        if cmd in ("cancel", "attach") and len(rest) == 1:
            try:  # refused here: sent, a malformed id names some other route, or none
                checked_job_id(rest[0])
            except ValueError as exc:
                raise UsageError(f"%gpu {cmd}: {exc}") from None
        if cmd == "status" and current_target()[0] is None:
            from ._embedded import running_local_gateway

            if running_local_gateway() is None:  # said as it is: starting one is no status
                sim = os.environ.get("GPU_MAGIC_SIMULATE")
                pool = (f"with the simulated pool {sim} (GPU_MAGIC_SIMULATE)" if sim
                        else "with this machine's GPUs")
                print("no gateway is configured (GPU_MAGIC_URL, %gpu connect URL) and no local "
                      f"one is running: the first %%gpu cell starts one here, {pool}; "
                      "%gpu pool starts it now and shows its GPUs")
                return None
        # these only look at the gateway and its jobs: one running with another configuration
        # is shown as it is, and restarted (if it must be) by the next cell, not here
        try:
            client = connect(looking=True)
        except GatewayError as exc:
            if cmd != "status":
                raise
            print(exc)  # (no token for a configured URL: the diagnostic command says so)
            return None
        differs = local_difference()
        if differs and cmd != "status":
            print(f"gpu_magic: {differs}", file=sys.stderr)
        if cmd == "pool":
            display(pool_bundle(client.pool()), raw=True)
        elif cmd == "jobs" and rest:
            jobs, total = client.all_jobs("%gpu jobs --all", JOBS_SHOWN)
            display(jobs_bundle(jobs, everyone=True, total=total), raw=True)
        elif cmd == "jobs":
            jobs, total = client.recent_jobs(JOBS_SHOWN)
            display(jobs_bundle(jobs, total=total), raw=True)
        elif cmd == "cancel":
            if len(rest) != 1:
                raise UsageError("usage: %gpu cancel JOB_ID (see %gpu jobs for the ids)")
            before = client.job(rest[0])
            if before["state"] in _ENDED:
                ended = before["state"].replace("_", " ")
                print(f"job {before['id']} had already ended ({ended}); nothing to cancel")
                return None
            rec = client.cancel(rest[0], via="magic")
            # an admin's cancel of another user's job: whose it was
            me = client.whoami().get("user")
            whose = f"{rec['user']}'s " if rec.get("user") not in (None, me) else ""
            if rec["state"] in ("queued", "running"):
                print(f"cancelling {whose}job {rec['id']} ({rec['state']}): its runner is stopped "
                      "and its GPUs freed within seconds")
            else:
                retry = before["state"] == "queued" and before.get("started")
                print(f"cancelled {whose}job {rec['id']} while it "
                      + ("waited to be retried: its output so far is kept" if retry else
                         f"was {before['state']}"
                         + (": nothing ran" if before["state"] == "queued" else "")))
        elif cmd == "attach":
            if len(rest) != 1:
                raise UsageError("usage: %gpu attach JOB_ID (see %gpu jobs for the ids)")
            assert self.shell is not None
            return _api.attach(rest[0], self.shell.user_ns, client=client)
        elif cmd == "status":
            url, how = current_target()
            try:
                health = client.health(refresh=True)
            except AuthError:
                raise
            except GatewayError as exc:  # the diagnostic command: it says so, not raises
                print(exc)
                return None
            sim = " (simulated pool)" if health.get("simulated") else ""
            # (what runs the cells is told only to a token it takes: see below)
            runs = (f", Python {health.get('python')}, backend {health.get('backend')}{sim}"
                    if health.get("python") else "")
            print(f"gateway {client.url} ({how}): gpu_magic {health.get('version')}{runs}")
            if differs:
                print(differs)
            whose = ("the local gateway's own token" if client.token_from == LOCAL
                     else f"the token from {client.token_from}" if client.token_from
                     else "the token")
            try:
                me = client.whoami()  # the health above asks for no token: this one does
            except AuthError as exc:
                print(exc)  # (it says whose token, and where to get the right one)
                return None
            user = me.get("user")
            who = f" as user {user}" + (" (admin)" if me.get("admin") else "") if user else ""
            print(f"{whose} is accepted{who}")
        return None

    def _connect(self, rest: list[str]) -> None:
        if not rest:
            raise UsageError("usage: %gpu connect URL [--token TOKEN]  (or %gpu connect local)")
        url = rest[0]
        if url.startswith("-"):
            raise UsageError(f"%gpu connect: the gateway's URL comes first, not {url!r}: "
                             "%gpu connect URL [--token TOKEN]")
        token = None
        i = 1
        while i < len(rest):
            word = rest[i]
            if word == "--token":
                if i + 1 >= len(rest):
                    raise UsageError("--token needs a value; or leave it out to be asked for it")
                token, i = rest[i + 1], i + 2
            elif word.startswith("--token="):
                token, i = word.split("=", 1)[1], i + 1
            else:  # (a misspelled --token would otherwise be dropped and the token asked for)
                raise UsageError(f"%gpu connect does not take {word!r}"
                                 f"{_did_you_mean(word, ['--token'])}; usage: %gpu connect URL "
                                 "[--token TOKEN]")
        if url == "local":
            set_connection(None)
            target, how = current_target()
            print("using the local gpu_magic gateway" if target is None
                  else f"back to the gateway {target} ({how})")
            return
        token_from = "%gpu connect --token"
        if not token:
            token, token_from = self.token, "%config GPUMagic.token"
        if not token:
            token, token_from = os.environ.get("GPU_MAGIC_TOKEN", ""), "GPU_MAGIC_TOKEN"
        if not token:
            token, token_from = _ask_token(url), "%gpu connect's prompt"
        try:
            health, me = _try_connection(url, token, token_from)
        except AuthError as exc:
            if token_from in ("%gpu connect --token", "%gpu connect's prompt"):
                raise
            # a student given a new token whose old one is still set where Jupyter starts:
            # ask, as a connect without any token does, rather than refuse
            token = _ask_token(url, refused=exc, prompt=(
                f"the gateway at {url} refused the token from {token_from} (wrong, or no "
                f"longer valid); paste the one you were given (this kernel then uses it; "
                f"change {token_from} too, for new kernels): "))
            token_from = "%gpu connect's prompt"
            health, me = _try_connection(url, token, token_from)
        user = me.get("user")
        who = f" as {user}" + (" (admin)" if me.get("admin") else "") if user else ""
        print(f"connected to {url}{who} (gpu_magic {health.get('version')})")


def _getpass(prompt: str) -> str:
    """getpass.getpass, but where stdin is no terminal and no kernel took the prompt over
    (ipython with stdin from a file or a pipe) the line is read as it is, without Python's
    "GetPassWarning: Can not control echo" lines before our own message."""
    stdlib = getattr(getpass, "unix_getpass", None), getattr(getpass, "win_getpass", None)
    if getpass.getpass in stdlib and not (sys.stdin and sys.stdin.isatty()):
        print(prompt, end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline() if sys.stdin else ""
        if not line:
            print(file=sys.stderr)  # (the message then starts on a line of its own)
            raise EOFError
        return line.rstrip("\n")
    return getpass.getpass(prompt)


def _ask_token(url: str, refused: AuthError | None = None, prompt: str = "") -> str:
    """The token typed at a prompt that does not echo it; where nobody can type one, the
    refusal that made us ask (``refused``), or a UsageError saying how to give it."""
    try:
        token = _getpass(prompt or f"token for {url}: ")
    except (StdinNotImplementedError, EOFError):
        if refused is not None:
            raise refused from None
        # nbconvert, nbclient, papermill: nobody to type it
        raise UsageError(
            f"%gpu connect {url} needs the gateway's token and cannot ask for it here "
            "(this front end takes no input): write %gpu connect URL --token TOKEN, or "
            "set GPU_MAGIC_TOKEN (or %config GPUMagic.token) and connect again"
        ) from None
    if not token.strip():
        raise UsageError(f"no token was typed, so nothing changed: run %gpu connect "
                         f"{url} again and paste the gateway's token at its prompt "
                         "(or write %gpu connect URL --token TOKEN)")
    return token


def _try_connection(url: str, token: str, token_from: str) -> tuple[dict[str, Any],
                                                                    dict[str, Any]]:
    """Use the gateway at ``url`` with ``token`` from now on if it accepts the token: its
    health and who the token is; else the connection stays as it was and the error goes up."""
    before = get_connection()
    set_connection(url, token, token_from)
    try:
        health = connect().health(refresh=True)
        me = connect().whoami()  # (asks with the token: a wrong one is refused here)
    except GpuMagicError:
        if before is None:
            set_connection(None)
        else:
            set_connection(*before)
        raise
    return health, me


# the name the README once used, for code that imported it
GPUMagics = GPUMagic


def show_cell_syntax_errors(shell: Any, on: bool = True) -> None:
    """Show a %%gpu cell's syntax error as the cell's line and a caret, and a remote
    SyntaxError or exception group with its remote traceback. Each is of its own type
    (``except SyntaxError`` takes it), and IPython shows any uncaught SyntaxError or exception
    group its own way (the stack it was raised in: ours), never asking the exception's
    ``_render_traceback_``; a custom exception handler, IPython's hook for this, shows ours as
    ``_render_traceback_`` says instead, and any other as IPython would. A handler set before
    ours keeps its exceptions, and gets them back when the extension is unloaded."""
    types, handler = shell.custom_exceptions, getattr(shell, "CustomTB", None)
    mine = getattr(handler, "__func__", None)
    before = getattr(mine, "gpu_magic_before", None)
    if before is not None:  # ours is set: start from what was there before it
        types, handler = before
    if not on:
        if before is not None:
            shell.custom_exceptions, shell.CustomTB = types, handler
        return
    groups = (BaseExceptionGroup,) if sys.version_info >= (3, 11) else ()  # noqa: F821
    taken = (CellSyntaxError, SyntaxError, *groups)
    others = tuple(t for t in types if t not in taken)

    def show(self: Any, etype: type, value: BaseException, tb: Any,
             tb_offset: int | None = None) -> list[str] | None:
        if isinstance(value, CellSyntaxError) or getattr(value, "gpu_magic_remote", False):
            stb = value._render_traceback_()  # type: ignore[attr-defined]
            self._showtraceback(etype, value, stb)
            return stb
        if handler and isinstance(value, tuple(types)):
            return handler(etype, value, tb, tb_offset=tb_offset)
        # not ours: as IPython shows it. A SyntaxError comes here from parsing a cell too (a
        # typo: IPython shows the line and a caret, without its own frames), or from running
        # one (compile() or eval() in it: with the stack, which then begins in run_code)
        if isinstance(value, SyntaxError):
            running = tb is not None and tb.tb_frame.f_code.co_name == "run_code"
            if isinstance(value, IndentationError) and not running:
                self.showindentationerror()
            else:
                self.showsyntaxerror(running_compiled_code=running)
            return None
        self.showtraceback(running_compiled_code=True)
        return None

    shell.set_custom_exc((*others, *taken), show)
    shell.CustomTB.__func__.gpu_magic_before = (types, handler)
