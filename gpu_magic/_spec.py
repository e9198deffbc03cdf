"""The GPU spec of ``%%gpu``: ``H100:2, A100-80GB:2, any`` parsed into an ordered list of options.

Pure: no I/O, no clock. The catalogue is Modal's; a pool may add type names of its own
(``extra_types``), which the gateway checks. Every refusal is a :class:`SpecError` that says what
is wrong, quotes the offending value and shows how to write it instead.
"""

from __future__ import annotations

import ast
import difflib
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import SpecError

MAX_COUNT = 8
_UNKNOWN_MEMORY_RANK = 1_000_000  # `any` ranks pool types of unknown memory after known ones
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_COUNT = re.compile(r"[+-]?[0-9]+")
_FORM = "write TYPE[:COUNT], e.g. H100:2 or any"
# a count written as other tools write it: "H100 x2", "H100*2", "H100 × 2", "2x H100"
_TIMES = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*?)(?:\s*[xX×*]\s*|\s+)(?P<n>\d{1,4})")
_TIMES_FIRST = re.compile(r"(?P<n>\d{1,4})(?:\s*[xX×*]\s*|\s+)(?P<name>[A-Za-z][A-Za-z0-9_.-]*)")


@dataclass(frozen=True)
class GpuType:
    """One entry of the catalogue."""

    name: str
    memory_gb: int
    max_count: int = MAX_COUNT
    aliases: tuple[str, ...] = ()


CATALOGUE: dict[str, GpuType] = {
    t.name: t
    for t in (
        GpuType("T4", 16),
        GpuType("L4", 24),
        GpuType("A10", 24, max_count=4, aliases=("A10G",)),
        GpuType("L40S", 48),
        GpuType("A100-40GB", 40),
        GpuType("A100-80GB", 80),
        GpuType("RTX-PRO-6000", 96),
        GpuType("H100", 80),
        GpuType("H200", 141),
        GpuType("B200", 180),
    )
}
# A family name matches any of its members, the earlier ones preferred.
FAMILIES: dict[str, tuple[str, ...]] = {"A100": ("A100-40GB", "A100-80GB")}
_ALIASES = {alias: t.name for t in CATALOGUE.values() for alias in t.aliases}
# Every accepted name in catalogue order, each family just before its first member.
KNOWN_TYPES: tuple[str, ...] = tuple(
    name
    for entry in CATALOGUE
    for name in (*(f for f, members in FAMILIES.items() if members[0] == entry), entry)
)


def _resolve(name: str) -> str:
    upper = name.strip().upper()
    return _ALIASES.get(upper, upper)


def _extras(extra_types: Iterable[str]) -> tuple[str, ...]:
    if isinstance(extra_types, str):
        extra_types = (extra_types,)
    return tuple(dict.fromkeys(_resolve(e) for e in extra_types))


def memory_gb(gpu_type: str) -> int | None:
    """GPU memory of a catalogue type, alias or family (its smallest member); None if unknown."""
    name = _resolve(gpu_type)
    entry = CATALOGUE.get(FAMILIES.get(name, (name,))[0])
    return entry.memory_gb if entry else None


def pool_type_note(name: str, subject: str | None = None,
                   typos_only: bool = False) -> str | None:
    """A note on a pool's type that is not in the catalogue, or None for a known one.

    A pool may name types of its own, so an unknown name is kept; but ``H1000`` is more
    likely a typo of H100 than a new GPU, and nothing else would say so. ``subject`` names it
    where it was given (default: the simulated pool's type 'NAME'); ``typos_only``: no note for
    a name like no known one (a type declared on purpose)."""
    subject = subject or f"the simulated pool's type '{name}'"
    resolved = _resolve(name)
    if resolved in CATALOGUE or resolved in FAMILIES:
        return None
    close = difflib.get_close_matches(resolved, [*KNOWN_TYPES, *_ALIASES], n=1, cutoff=0.6)
    if close:
        return (f"{subject} is not a known GPU type; did you mean "
                f"{close[0]}? (keep it if you meant a type of your own)")
    if typos_only:
        return None
    return (f"{subject} is not a known GPU type ({', '.join(KNOWN_TYPES)}); "
            "it is offered as a type of its own")


def _without_memory(resolved: str, known: list[str]) -> str | None:
    """The type meant by a name with its memory size added (``H100-80GB``, ``A100-80G``):
    the catalogue's name with that size, else the name alone, if either is known (the
    closest spelling would have been ``A100-80GB`` for ``H100-80GB``)."""
    m = re.fullmatch(r"(.+?)[-_ ]?(\d+)\s*GB?", resolved)
    if m is None:
        return None
    stem = _resolve(m[1])
    for name in (f"{stem}-{m[2]}GB", stem):
        if name in known:
            return name
    return None


def canonical_type(name: str, extra_types: Iterable[str] = ()) -> str:
    """The canonical upper-case name of a GPU type (aliases resolved); SpecError if unknown."""
    return _canonical(name, _extras(extra_types), spec=name)


def _canonical(name: str, extras: tuple[str, ...], *, spec: str) -> str:
    resolved = _resolve(name)
    if resolved in CATALOGUE or resolved in FAMILIES or resolved in extras:
        return resolved
    known = [*KNOWN_TYPES, *(e for e in extras if e not in KNOWN_TYPES)]
    suggestion = _without_memory(resolved, known)
    if suggestion is None:
        close = difflib.get_close_matches(resolved, [*known, *_ALIASES], n=1, cutoff=0.6)
        suggestion = close[0] if close else None
    hint = f"did you mean {suggestion}? Known types" if suggestion else "known types"
    raise SpecError(
        f"'{name.strip()}' is not a GPU type; {hint}: {', '.join(known)} (or any)",
        spec=spec,
        suggestion=suggestion,
    )


def _check_count(gpu_type: str | None, count: int, option: str, count_text: str, spec: str) -> None:
    if not 1 <= count <= MAX_COUNT:
        raise SpecError(
            f"'{option}' asks for {count_text} GPUs; a count must be between 1 and {MAX_COUNT}",
            spec=spec,
        )
    entry = CATALOGUE.get(gpu_type or "")
    if entry and count > entry.max_count:
        raise SpecError(
            f"'{option}' asks for {count_text} GPUs; {gpu_type} allows at most "
            f"{entry.max_count} per job",
            spec=spec,
        )


@dataclass(frozen=True)
class GpuOption:
    """One alternative of a spec: ``count`` GPUs of ``type`` (None for any type) on one node."""

    type: str | None
    count: int = 1

    def __post_init__(self) -> None:
        gpu_type: Any = self.type
        if gpu_type is not None:
            if not isinstance(gpu_type, str) or not _NAME.fullmatch(gpu_type.strip()):
                raise SpecError(f"{gpu_type!r} is not a GPU type name; {_FORM}", spec=str(gpu_type))
            gpu_type = _resolve(gpu_type)
            object.__setattr__(self, "type", None if gpu_type == "ANY" else gpu_type)
        count: Any = self.count
        if isinstance(count, bool) or not isinstance(count, int):
            raise SpecError(f"a GPU count must be a whole number, not {count!r}", spec=str(self))
        _check_count(self.type, count, str(self), str(count), str(self))

    def __str__(self) -> str:
        name = self.type or "any"
        return name if self.count == 1 else f"{name}:{self.count}"

    def matches(self, gpu_type: str) -> bool:
        """Whether a GPU of type ``gpu_type`` satisfies this option's type."""
        if self.type is None:
            return True
        resolved = _resolve(gpu_type)
        return resolved == self.type or resolved in FAMILIES.get(self.type, ())

    def preference(self, gpu_type: str) -> int:
        """Rank of ``gpu_type`` among the types this option matches; lower is better."""
        resolved = _resolve(gpu_type)
        if self.type is None:
            memory = memory_gb(resolved)
            return _UNKNOWN_MEMORY_RANK if memory is None else memory
        members = FAMILIES.get(self.type, ())
        return members.index(resolved) if resolved in members else 0

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "count": self.count}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GpuOption:
        if not isinstance(d, dict) or "type" not in d:
            raise SpecError(f'{d!r} is not a GPU option; expected {{"type": "H100", "count": 2}}')
        return cls(d["type"], d.get("count", 1))


def _check_unique(options: Iterable[GpuOption], shown: str, spec: str) -> None:
    seen: set[GpuOption] = set()
    for option in options:
        if option in seen:
            raise SpecError(
                f"'{option}' appears twice in {shown}; list each option once", spec=spec
            )
        seen.add(option)


@dataclass(frozen=True)
class GpuSpec:
    """The options of a ``%%gpu`` cell in the user's order, most preferred first; never empty."""

    options: tuple[GpuOption, ...]

    def __post_init__(self) -> None:
        options = tuple(self.options)
        if not options or not all(isinstance(o, GpuOption) for o in options):
            raise SpecError(f"a GPU spec needs one or more GpuOption, not {self.options!r}")
        object.__setattr__(self, "options", options)
        _check_unique(options, f"'{self}'", str(self))

    def __str__(self) -> str:
        return ", ".join(str(o) for o in self.options)

    def __iter__(self) -> Iterator[GpuOption]:
        return iter(self.options)

    def __len__(self) -> int:
        return len(self.options)

    def __getitem__(self, index: int) -> GpuOption:
        return self.options[index]

    def to_json(self) -> list[dict[str, Any]]:
        return [o.to_json() for o in self.options]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> GpuSpec:
        if not isinstance(data, (list, tuple)):
            raise SpecError(f"a GPU spec in JSON is a list of options, not {data!r}")
        return cls(tuple(GpuOption.from_json(d) for d in data))

    @classmethod
    def parse(
        cls, spec: str | list | tuple | GpuSpec | None, *, extra_types: Iterable[str] = ()
    ) -> GpuSpec:
        return parse_spec(spec, extra_types=extra_types)


DEFAULT_SPEC = GpuSpec((GpuOption(None),))

# What the grant sets in a cell's environment: which GPUs it sees, and what it was granted.
_GRANT_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
              "HIP_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


def env_problem(env: Mapping[str, str], spell: str = "env") -> str | None:
    """Why these ``--env`` variables cannot be sent, or None: a cell must not pick other
    GPUs than its grant (on a shared node they may be another job's), nor relabel them."""
    for key, value in env.items():
        # what os.environ and exec refuse, refused here before a GPU is granted
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            return (f"{spell} {key!r}: not a name an environment variable can have (not "
                    "empty, no '=' and no NUL character); use a name such as MY_SETTING")
        if not isinstance(value, str) or "\0" in value:
            return (f"{spell} {key}={value!r}: the value must be text without a NUL character")
    ours = [k for k in env if k.startswith("GPU_MAGIC_")]
    if ours:
        return (f"{spell} {', '.join(ours)}: GPU_MAGIC_ variables are gpu_magic's own where "
                "the cell runs (GPU_MAGIC_GRANT says what it was granted); give yours another "
                f"name (MY_{ours[0][len('GPU_MAGIC_'):]}), or leave it out")
    taken = [k for k in env if k in _GRANT_ENV]
    if not taken:
        return None
    return (f"{spell} {', '.join(taken)}: the grant sets {'these' if len(taken) > 1 else 'this'} "
            "(which GPUs the cell sees); leave "
            f"{'them' if len(taken) > 1 else 'it'} out and ask for the GPUs in the spec, e.g. "
            "%%gpu H100:2")


def parse_spec(
    spec: str | list | tuple | GpuSpec | None, *, extra_types: Iterable[str] = ()
) -> GpuSpec:
    """Parse a spec (text, list literal, list of strings/options) into a :class:`GpuSpec`."""
    if isinstance(spec, GpuSpec):
        return spec
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return DEFAULT_SPEC
    items: list[Any]
    if isinstance(spec, str):
        raw = spec.strip()
        if len(raw) > 2 and raw[0] == raw[-1] and raw[0] in "'\"" and raw[0] not in raw[1:-1]:
            raw = raw[1:-1].strip()  # `%%gpu "H100:2, any"`: the quotes are not the spec's
        if raw[:1] in ("(", "{"):
            _refuse_other_literal(raw)
        is_list = raw.startswith("[")
        items = _literal_list(raw) if is_list else re.split(r"[,|]", raw)
        shown = raw if is_list else f"'{raw}'"
    elif isinstance(spec, (list, tuple)):
        items, is_list = list(spec), True
        shown = raw = repr([str(i) if isinstance(i, GpuOption) else i for i in items])
    else:
        raise SpecError(
            f"a GPU spec is a string such as 'H100:2, any' or a list of strings, "
            f"not {type(spec).__name__} {spec!r}",
            spec=repr(spec),
        )
    if not items:
        raise SpecError(
            f"{shown} lists no GPU options; give at least one, e.g. ['H100'] or 'any'", spec=raw
        )
    for item in items:
        if not isinstance(item, (str, GpuOption)):
            raise SpecError(
                f"{item!r} in {shown} is not a string; write each option as a string, "
                "e.g. ['H100:2', 'A100']",
                spec=raw,
            )
    extras = _extras(extra_types)
    options = [_parse_option(item, shown, raw, extras, is_list, only=len(items) == 1)
               for item in items]
    _check_unique(options, shown, raw)
    return GpuSpec(tuple(options))


def _refuse_other_literal(text: str) -> None:
    """Refuse a spec written as a tuple or set literal, with the list or plain form to write
    (split at its commas, ``("h100",)`` read as an option named ``("h100"``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        value = None
    if isinstance(value, (tuple, set, frozenset)) and value and all(
            isinstance(v, str) for v in value):
        items = list(value) if isinstance(value, tuple) else sorted(value)
        kind = "tuple" if isinstance(value, tuple) else "set"
        raise SpecError(
            f"{text} is a Python {kind}; write the options as a list, {items!r}, or plainly: "
            f"{', '.join(items)}",
            spec=text,
        )
    raise SpecError(
        f"{text} is not a GPU spec; write the options plainly, e.g. H100:2, any, or as a list "
        "of strings, ['H100:2', 'any']",
        spec=text,
    )


def _literal_list(text: str) -> list[Any]:
    try:
        with warnings.catch_warnings():  # e.g. invalid escape sequences inside the literal
            warnings.simplefilter("ignore")
            value = ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        value = None
    if not isinstance(value, list):
        raise SpecError(
            f"{text} looks like a Python list but cannot be read as a list of strings; quote "
            "each option, e.g. ['H100:2', 'A100'], or drop the brackets: H100:2, A100",
            spec=text,
        )
    return value


def _is_type(name: str, extras: tuple[str, ...]) -> bool:
    resolved = _resolve(name)
    return name.upper() == "ANY" or resolved in CATALOGUE or resolved in FAMILIES or resolved in extras


def _parse_option(
    item: str | GpuOption, shown: str, spec: str, extras: tuple[str, ...], in_list: bool,
    only: bool = False,
) -> GpuOption:
    text = (str(item) if isinstance(item, GpuOption) else item).strip()
    if not text:
        fix = (
            "give each element one option, e.g. ['H100:2', 'A100']"
            if in_list
            else "separate options with commas, e.g. 'H100:2, A100'"
        )
        raise SpecError(f"empty option in {shown}; {fix}", spec=spec)
    words = [w for w in re.split(r"[\s,]+", text) if w]
    if len(words) > 1 and all(_is_type(w.partition(":")[0], extras) for w in words):
        if in_list:  # (a comma inside one element, too: each option is an element)
            what = "in one element of the list" if "," in text else "without commas between them"
            each = ", ".join(f"'{w}'" for w in words)
            fix = f"[{each}]" if only else f"them as elements of their own: {each}"
        else:
            fix, what = ", ".join(words), "without commas between them"
        raise SpecError(f"'{text}' is {len(words)} options {what}; write {fix}", spec=spec)
    name, colon, count_text = (part.strip() for part in text.partition(":"))
    if ":" in count_text:
        raise SpecError(f"'{text}' has more than one ':'; {_FORM}", spec=spec)
    if not name:
        raise SpecError(f"'{text}' has no GPU type before ':'; {_FORM}", spec=spec)
    times = None if colon else _TIMES.fullmatch(text) or _TIMES_FIRST.fullmatch(text)
    if times and int(times["n"]) > 0 and _is_type(times["name"], extras) \
            and not _is_type(name, extras):
        # H100 x2, H100*2, 2x H100: as other tools write a count
        typed = _canonical(times["name"], extras, spec=spec) if times["name"].upper() != "ANY" \
            else "any"
        # (only a suggestion that would itself be taken: "A100 80" meant no 80 A100s)
        _check_count(None if typed == "any" else typed, int(times["n"]), text, times["n"], spec)
        raise SpecError(f"'{text}': the count goes after a ':'; did you mean "
                        f"{typed}:{int(times['n'])}?", spec=spec)
    if not _NAME.fullmatch(name) and any(q in text for q in "'\""):
        # (%%gpu T4 'unterminated: the quote came before any --option, so into the spec)
        raise SpecError(
            f"'{text}' is not a valid option: a GPU spec has no quotes (they group an "
            f"option's value with spaces, after the spec: --env \"MSG=hello world\"); {_FORM}",
            spec=spec,
        )
    if not _NAME.fullmatch(name):
        raise SpecError(
            f"'{text}' is not a valid option (a type name has only letters, digits, '-', '_' "
            f"and '.'); {_FORM}",
            spec=spec,
        )
    gpu_type = None if name.upper() == "ANY" else _canonical(name, extras, spec=spec)
    if not colon:
        return GpuOption(gpu_type)
    if not _COUNT.fullmatch(count_text):
        # A100:80GB: the memory size written as a count; the type is spelled with a '-'
        joined = _resolve(f"{name}-{count_text}")
        if gpu_type is not None and (joined in CATALOGUE or joined in extras):
            raise SpecError(
                f"'{text}' has a count that is not a whole number; did you mean {joined}, the "
                f"type (with '-', not ':')? The number after ':' is how many GPUs, e.g. "
                f"{joined}:2",
                spec=spec,
            )
        raise SpecError(
            f"'{text}' has a count that is not a whole number; write TYPE:COUNT, "
            f"e.g. {gpu_type or 'any'}:2",
            spec=spec,
        )
    digits = count_text.lstrip("+-").lstrip("0") or "0"
    count = int(digits) if len(digits) <= 4 else 10**4  # never int() a huge digit string
    _check_count(gpu_type, -count if count_text.startswith("-") else count, text, count_text, spec)
    return GpuOption(gpu_type, count)
