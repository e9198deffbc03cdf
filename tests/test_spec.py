"""Tests of the GPU spec parser (gpu_magic._spec)."""

from __future__ import annotations

import re
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpu_magic._errors import SpecError
from gpu_magic._spec import (
    CATALOGUE,
    GpuOption,
    GpuSpec,
    canonical_type,
    memory_gb,
    parse_spec,
)

KNOWN = "Known types: T4, L4, A10, L40S, A100, A100-40GB, A100-80GB, RTX-PRO-6000, H100, H200, B200"
RANGE = "a count must be between 1 and 8"
EMPTY_FIX = "separate options with commas, e.g. 'H100:2, A100'"
FORM = "write TYPE[:COUNT], e.g. H100:2 or any"
BAD_NAME = "(a type name has only letters, digits, '-', '_' and '.')"
NOT_LIST = (
    "looks like a Python list but cannot be read as a list of strings; quote each option, "
    "e.g. ['H100:2', 'A100'], or drop the brackets: H100:2, A100"
)
POOL = ("MI300X", "gtx-1080")

VALID = [
    (None, (), "any"),
    ("", (), "any"),
    ("  \t\n", (), "any"),
    ("any", (), "any"),
    ("Any", (), "any"),
    ("ANY:2", (), "any:2"),
    ("H100", (), "H100"),
    ("h100", (), "H100"),
    ("H100:1", (), "H100"),
    ("H100:2", (), "H100:2"),
    ("H100:8", (), "H100:8"),
    (" H100 : 2 ", (), "H100:2"),
    ("H100:02", (), "H100:2"),
    ("H100:0008", (), "H100:8"),
    ("H100:+3", (), "H100:3"),
    ("H100:2, A100-80GB:2, any", (), "H100:2, A100-80GB:2, any"),
    ("H100:2,A100-80GB:2,any", (), "H100:2, A100-80GB:2, any"),
    ("H100 | A100", (), "H100, A100"),
    ("H100|A100|T4", (), "H100, A100, T4"),
    ("H100, A100 | T4", (), "H100, A100, T4"),
    ("H100\t,\nA100", (), "H100, A100"),
    ("a10g", (), "A10"),
    ("A10G:4", (), "A10:4"),
    ("a10:4", (), "A10:4"),
    ("A10:1|A10:2|A10:3|A10:4", (), "A10, A10:2, A10:3, A10:4"),
    ("a100", (), "A100"),
    ("a100-40gb", (), "A100-40GB"),
    ("A100-80GB:8", (), "A100-80GB:8"),
    ("A100, A100-40GB", (), "A100, A100-40GB"),
    ("rtx-pro-6000", (), "RTX-PRO-6000"),
    ("l40s:3", (), "L40S:3"),
    ("t4, l4", (), "T4, L4"),
    ("t4:8", (), "T4:8"),
    ("h200:4", (), "H200:4"),
    ("b200:8", (), "B200:8"),
    ("H100:1, H100:2", (), "H100, H100:2"),
    ("any, any:2", (), "any, any:2"),
    (
        "H100,A100-80GB,H200,B200,L40S,L4,T4,A10,RTX-PRO-6000,A100-40GB,A100",
        (),
        "H100, A100-80GB, H200, B200, L40S, L4, T4, A10, RTX-PRO-6000, A100-40GB, A100",
    ),
    ('["h100", "a100-40gb:2"]', (), "H100, A100-40GB:2"),
    ("['H100:2']", (), "H100:2"),
    ("  [ 'T4' , 'any:2' ]  ", (), "T4, any:2"),
    (["h100", "a100-40gb:2"], (), "H100, A100-40GB:2"),
    (("T4",), (), "T4"),
    ([GpuOption("H100", 2), "any"], (), "H100:2, any"),
    ([GpuOption("a10g", 3)], (), "A10:3"),
    (GpuSpec((GpuOption("L4"),)), (), "L4"),
    ("mi300x", POOL, "MI300X"),
    ("gtx-1080:2, h100", POOL, "GTX-1080:2, H100"),
    ("MI300X:8 | any", ["mi300x"], "MI300X:8, any"),
    ("H100", "H100", "H100"),
    # quoted whole, as a trial wrote it: the quotes are not part of the spec
    ("'T4'", (), "T4"),
    ('"H100:2, any"', (), "H100:2, any"),
]


@pytest.mark.parametrize(("spec", "extra", "expected"), VALID)
def test_valid_specs_have_their_canonical_form(spec: object, extra: object, expected: str) -> None:
    parsed = parse_spec(spec, extra_types=extra)  # type: ignore[arg-type]
    assert isinstance(parsed, GpuSpec)
    assert str(parsed) == expected
    assert GpuSpec.parse(spec, extra_types=extra) == parsed  # type: ignore[arg-type]
    # The canonical form parses back to the same spec.
    assert parse_spec(expected, extra_types=extra) == parsed  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        (None, (GpuOption(None, 1),)),
        (
            "H100:2, A100-80GB:2, any",
            (GpuOption("H100", 2), GpuOption("A100-80GB", 2), GpuOption(None)),
        ),
        ("a10g:3", (GpuOption("A10", 3),)),
        ("a100", (GpuOption("A100", 1),)),
        ("rtx-pro-6000:2|t4", (GpuOption("RTX-PRO-6000", 2), GpuOption("T4", 1))),
    ],
)
def test_valid_specs_have_their_options(spec: str | None, options: tuple[GpuOption, ...]) -> None:
    parsed = parse_spec(spec)
    assert parsed.options == options
    assert tuple(parsed) == options
    assert len(parsed) == len(options)
    assert parsed[0] == options[0]
    assert parsed[-1] == options[-1]


def test_options_keep_the_users_order() -> None:
    assert [o.type for o in parse_spec("T4, B200, any, A100")] == ["T4", "B200", None, "A100"]


def test_a_spec_object_is_returned_as_is() -> None:
    spec = parse_spec("H100:2, any")
    assert parse_spec(spec) is spec


INVALID = [
    ("H1000", (), f"'H1000' is not a GPU type; did you mean H100? {KNOWN} (or any)"),
    ("h1000:2", (), f"'h1000' is not a GPU type; did you mean H100? {KNOWN} (or any)"),
    ("zzz", (), f"'zzz' is not a GPU type; k{KNOWN[1:]} (or any)"),
    ("H100, MI300X", (), f"'MI300X' is not a GPU type; k{KNOWN[1:]} (or any)"),
    (
        "mi300",
        POOL,
        f"'mi300' is not a GPU type; did you mean MI300X? {KNOWN}, MI300X, GTX-1080 (or any)",
    ),
    # a memory size added to a type's name: the type, not the closest spelling (A100-80GB)
    ("h100-80gb", (), f"'h100-80gb' is not a GPU type; did you mean H100? {KNOWN} (or any)"),
    ("A100-80G", (), f"'A100-80G' is not a GPU type; did you mean A100-80GB? {KNOWN} (or any)"),
    # a comma forgotten: said so, with the spec as it was meant
    ("H100:2 A100", (), "'H100:2 A100' is 2 options without commas between them; write "
                        "H100:2, A100"),
    ("H100 any, T4", (), "'H100 any' is 2 options without commas between them; write H100, any"),
    ('["h100 a100"]', (), "'h100 a100' is 2 options without commas between them; write "
                          "['h100', 'a100']"),
    # a comma inside one element: the advice itself must parse (it said ['H100:2,', 'any'])
    ('["H100:2, any"]', (), "'H100:2, any' is 2 options in one element of the list; write "
                            "['H100:2', 'any']"),
    ("['H100, A100', 'any']", (), "'H100, A100' is 2 options in one element of the list; "
                                  "write them as elements of their own: 'H100', 'A100'"),
    # not two types: no made-up advice
    ("H 100", (), "'H 100' is not a valid option (a type name has only letters, digits, '-', "
                  "'_' and '.'); write TYPE[:COUNT], e.g. H100:2 or any"),
    ("H100:9", (), f"'H100:9' asks for 9 GPUs; {RANGE}"),
    ("H100:0", (), f"'H100:0' asks for 0 GPUs; {RANGE}"),
    ("H100:-1", (), f"'H100:-1' asks for -1 GPUs; {RANGE}"),
    ("any:16", (), f"'any:16' asks for 16 GPUs; {RANGE}"),
    ("H100:" + "9" * 30, (), f"'H100:{'9' * 30}' asks for {'9' * 30} GPUs; {RANGE}"),
    ("A10:5", (), "'A10:5' asks for 5 GPUs; A10 allows at most 4 per job"),
    ("a10g:8", (), "'a10g:8' asks for 8 GPUs; A10 allows at most 4 per job"),
    (
        "H100:two",
        (),
        "'H100:two' has a count that is not a whole number; write TYPE:COUNT, e.g. H100:2",
    ),
    (
        "H100:2.5",
        (),
        "'H100:2.5' has a count that is not a whole number; write TYPE:COUNT, e.g. H100:2",
    ),
    ("H100:", (), "'H100:' has a count that is not a whole number; write TYPE:COUNT, e.g. H100:2"),
    ("any:x", (), "'any:x' has a count that is not a whole number; write TYPE:COUNT, e.g. any:2"),
    ("a10g:½", (), "'a10g:½' has a count that is not a whole number; write TYPE:COUNT, e.g. A10:2"),
    ("H100,,A100", (), f"empty option in 'H100,,A100'; {EMPTY_FIX}"),
    ("H100,", (), f"empty option in 'H100,'; {EMPTY_FIX}"),
    ("| H100", (), f"empty option in '| H100'; {EMPTY_FIX}"),
    (
        ["H100", " "],
        (),
        "empty option in ['H100', ' ']; give each element one option, e.g. ['H100:2', 'A100']",
    ),
    ("H100, H100", (), "'H100' appears twice in 'H100, H100'; list each option once"),
    ("h100, H100:1", (), "'H100' appears twice in 'h100, H100:1'; list each option once"),
    ("A10G, a10", (), "'A10' appears twice in 'A10G, a10'; list each option once"),
    ("any | ANY:1", (), "'any' appears twice in 'any | ANY:1'; list each option once"),
    ("['T4:2', 't4:2']", (), "'T4:2' appears twice in ['T4:2', 't4:2']; list each option once"),
    ("H100:2:3", (), f"'H100:2:3' has more than one ':'; {FORM}"),
    (":2", (), f"':2' has no GPU type before ':'; {FORM}"),
    ("H@100", (), f"'H@100' is not a valid option {BAD_NAME}; {FORM}"),
    ("A100 80GB", (), f"'A100 80GB' is not a valid option {BAD_NAME}; {FORM}"),
    ("\uff28100", (), f"'\uff28100' is not a valid option {BAD_NAME}; {FORM}"),
    ("-H100", (), f"'-H100' is not a valid option {BAD_NAME}; {FORM}"),
    # the memory size written as a count ("count is not a whole number" said nothing of it)
    ("A100:80GB", (), "'A100:80GB' has a count that is not a whole number; did you mean "
                      "A100-80GB, the type (with '-', not ':')? The number after ':' is how "
                      "many GPUs, e.g. A100-80GB:2"),
    ("h100:two", (), "'h100:two' has a count that is not a whole number; write TYPE:COUNT, "
                     "e.g. H100:2"),
    # a tuple was split at its commas: "'(\"h100\"' is not a valid option"
    ('("h100",)', (), "(\"h100\",) is a Python tuple; write the options as a list, ['h100'], "
                      "or plainly: h100"),
    ("('H100:2', 'any')", (), "('H100:2', 'any') is a Python tuple; write the options as a "
                              "list, ['H100:2', 'any'], or plainly: H100:2, any"),
    ("{'t4'}", (), "{'t4'} is a Python set; write the options as a list, ['t4'], or plainly: t4"),
    ("(H100)", (), "(H100) is not a GPU spec; write the options plainly, e.g. H100:2, any, or "
                   "as a list of strings, ['H100:2', 'any']"),
    ("[h100, a100]", (), f"[h100, a100] {NOT_LIST}"),
    ("[", (), f"[ {NOT_LIST}"),
    ("['H100'] + ['T4']", (), f"['H100'] + ['T4'] {NOT_LIST}"),
    (
        '["h100", 2]',
        (),
        "2 in [\"h100\", 2] is not a string; write each option as a string, e.g. ['H100:2', 'A100']",
    ),
    (
        ["h100", None],
        (),
        "None in ['h100', None] is not a string; write each option as a string, "
        "e.g. ['H100:2', 'A100']",
    ),
    ("[]", (), "[] lists no GPU options; give at least one, e.g. ['H100'] or 'any'"),
    ((), (), "[] lists no GPU options; give at least one, e.g. ['H100'] or 'any'"),
    (
        5,
        (),
        "a GPU spec is a string such as 'H100:2, any' or a list of strings, not int 5",
    ),
    (
        [GpuOption("A10", 4), GpuOption("A10", 4)],
        (),
        "'A10:4' appears twice in ['A10:4', 'A10:4']; list each option once",
    ),
    # a count written as other tools write it (an instructor's trial: a generic message)
    ("H100 x2", (), "'H100 x2': the count goes after a ':'; did you mean H100:2?"),
    ("h100*2, any", (), "'h100*2': the count goes after a ':'; did you mean H100:2?"),
    ("2 x A100-80GB", (), "'2 x A100-80GB': the count goes after a ':'; did you mean A100-80GB:2?"),
    ("H100X4", (), "'H100X4': the count goes after a ':'; did you mean H100:4?"),
    ("H1000 × 2", ("H1000",), "'H1000 × 2': the count goes after a ':'; did you mean H1000:2?"),
    ("2 H100", (), "'2 H100': the count goes after a ':'; did you mean H100:2?"),
    # never a suggestion that would itself be refused
    ("A100 80", (), "'A100 80' asks for 80 GPUs; a count must be between 1 and 8"),
]


@pytest.mark.parametrize(("spec", "extra", "message"), INVALID)
def test_invalid_specs_say_what_and_how_to_fix(spec: object, extra: object, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec, extra_types=extra)  # type: ignore[arg-type]
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("H1000:2, any", r"^'H1000' is not a GPU type; did you mean H100\? Known types: "),
        ("B2000", r"^'B2000' is not a GPU type; did you mean B200\? "),
        ("A100-80G", r"^'A100-80G' is not a GPU type; did you mean A100-80GB\? "),
        ("[1, 2]", r"^1 in \[1, 2\] is not a string; "),
        ("[[['H100']]]", r"^\[\['H100'\]\] in \[\[\['H100'\]\]\] is not a string; "),
    ],
)
def test_invalid_specs_matching(spec: str, pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern):
        parse_spec(spec)


def test_unknown_type_error_carries_spec_and_suggestion() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec("H1000:2, any")
    assert info.value.spec == "H1000:2, any"
    assert info.value.suggestion == "H100"
    with pytest.raises(SpecError) as info:
        parse_spec("zzz")
    assert info.value.suggestion is None


def test_list_literal_warnings_do_not_escape() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SpecError, match="is not a valid option"):
            parse_spec("['\\d']")


def test_canonical_type() -> None:
    assert canonical_type("h100") == "H100"
    assert canonical_type(" a10g ") == "A10"
    assert canonical_type("A100") == "A100"
    assert canonical_type("mi300x", ["MI300X"]) == "MI300X"
    with pytest.raises(SpecError, match=r"^'H1000' is not a GPU type; did you mean H100\?"):
        canonical_type("H1000")
    with pytest.raises(SpecError, match="is not a GPU type"):
        canonical_type("MI300X")


@pytest.mark.parametrize(
    ("name", "memory"),
    [
        ("T4", 16),
        ("l4", 24),
        ("A10", 24),
        ("a10g", 24),
        ("L40S", 48),
        ("A100", 40),
        ("A100-40GB", 40),
        ("A100-80GB", 80),
        ("RTX-PRO-6000", 96),
        ("H100", 80),
        ("H200", 141),
        ("B200", 180),
        ("MI300X", None),
        ("any", None),
    ],
)
def test_memory_gb(name: str, memory: int | None) -> None:
    assert memory_gb(name) == memory


def test_catalogue() -> None:
    assert list(CATALOGUE) == [
        "T4", "L4", "A10", "L40S", "A100-40GB", "A100-80GB", "RTX-PRO-6000", "H100", "H200", "B200",
    ]  # fmt: skip
    assert CATALOGUE["A10"].max_count == 4
    assert CATALOGUE["A10"].aliases == ("A10G",)
    assert all(t.max_count == 8 for name, t in CATALOGUE.items() if name != "A10")


@pytest.mark.parametrize(
    ("option_type", "gpu_type", "matches"),
    [
        (None, "H100", True),
        (None, "MI300X", True),
        ("A100", "A100-40GB", True),
        ("A100", "A100-80GB", True),
        ("A100", "A100", True),
        ("A100", "H100", False),
        ("A100-40GB", "A100-80GB", False),
        ("A100-40GB", "A100-40GB", True),
        ("A100-80GB", "a100-80gb", True),
        ("H100", "h100", True),
        ("H100", "H200", False),
        ("A10", "A10G", True),
        ("MI300X", "mi300x", True),
        ("MI300X", "H100", False),
    ],
)
def test_matches(option_type: str | None, gpu_type: str, matches: bool) -> None:
    assert GpuOption(option_type).matches(gpu_type) is matches


def test_preference_of_the_a100_family() -> None:
    option = GpuOption("A100", 2)
    assert option.preference("A100-40GB") == 0
    assert option.preference("A100-80GB") == 1
    assert GpuOption("A100-80GB").preference("A100-80GB") == 0
    assert GpuOption("H100").preference("H100") == 0


def test_any_prefers_the_least_memory_and_unknown_types_last() -> None:
    option = GpuOption(None)
    pool = ["B200", "MI300X", "H100", "T4", "A100-80GB", "L40S", "A10", "H200"]
    ranked = sorted(pool, key=option.preference)
    # H100 and A100-80GB both have 80 GB: the sort is stable, so they keep the pool's order.
    assert ranked == ["T4", "A10", "L40S", "H100", "A100-80GB", "H200", "B200", "MI300X"]
    assert option.preference("T4") < option.preference("L40S") < option.preference("B200")
    assert option.preference("B200") < option.preference("MI300X")


@pytest.mark.parametrize(
    ("option", "text"),
    [
        (GpuOption("H100", 2), "H100:2"),
        (GpuOption("H100"), "H100"),
        (GpuOption(None), "any"),
        (GpuOption(None, 2), "any:2"),
        (GpuOption("a10g", 4), "A10:4"),
        (GpuOption("any", 3), "any:3"),
    ],
)
def test_option_str(option: GpuOption, text: str) -> None:
    assert str(option) == text


@pytest.mark.parametrize(
    ("option_type", "count", "pattern"),
    [
        ("H100", 0, r"asks for 0 GPUs; a count must be between 1 and 8"),
        ("H100", 9, r"asks for 9 GPUs; a count must be between 1 and 8"),
        ("A10", 5, r"A10 allows at most 4 per job"),
        ("H100", True, r"not True"),
        ("H100", "2", r"not '2'"),
        (3, 1, r"3 is not a GPU type name"),
        ("H 100", 1, r"is not a GPU type name"),
    ],
)
def test_option_constructor_validates(option_type: object, count: object, pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern):
        GpuOption(option_type, count)  # type: ignore[arg-type]


def test_json_round_trip() -> None:
    spec = parse_spec("H100:2, A100, a10g:4, any:3, MI300X", extra_types=["MI300X"])
    data = spec.to_json()
    assert data == [
        {"type": "H100", "count": 2},
        {"type": "A100", "count": 1},
        {"type": "A10", "count": 4},
        {"type": None, "count": 3},
        {"type": "MI300X", "count": 1},
    ]
    assert GpuSpec.from_json(data) == spec
    assert GpuOption.from_json({"type": "t4"}) == GpuOption("T4", 1)


@pytest.mark.parametrize(
    "data",
    [
        [],
        "H100",
        None,
        [{"count": 2}],
        [["H100", 2]],
        [{"type": 3}],
        [{"type": "H100", "count": 9}],
    ],
)
def test_from_json_refuses_malformed_data(data: object) -> None:
    with pytest.raises(SpecError):
        GpuSpec.from_json(data)  # type: ignore[arg-type]


def test_spec_constructor_refuses_empty_and_duplicates() -> None:
    with pytest.raises(SpecError):
        GpuSpec(())
    with pytest.raises(SpecError, match=re.escape("'H100' appears twice in 'H100, H100'")):
        GpuSpec((GpuOption("H100"), GpuOption("h100")))
    assert GpuSpec([GpuOption("T4")]).options == (GpuOption("T4"),)  # type: ignore[arg-type]


# ---------------------------------------------------------------- properties

TYPES = [*CATALOGUE, "A100", "MI300X", "GTX-1080"]


@st.composite
def options(draw: st.DrawFn) -> GpuOption:
    gpu_type = draw(st.sampled_from([None, *TYPES]))
    cap = CATALOGUE[gpu_type].max_count if gpu_type in CATALOGUE else 8
    return GpuOption(gpu_type, draw(st.integers(1, cap)))


specs = st.lists(options(), min_size=1, max_size=8, unique=True).map(lambda o: GpuSpec(tuple(o)))


@given(specs)
def test_canonical_form_round_trips(spec: GpuSpec) -> None:
    assert parse_spec(str(spec), extra_types=POOL) == spec
    assert GpuSpec.from_json(spec.to_json()) == spec
    assert parse_spec([str(o) for o in spec], extra_types=POOL) == spec


@given(specs, st.data())
def test_any_case_and_separator_parses_the_same(spec: GpuSpec, data: st.DataObject) -> None:
    parts = []
    for option in spec:
        text = str(option)
        flips = data.draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
        parts.append("".join(c.swapcase() if f else c for c, f in zip(text, flips, strict=True)))
    separators = data.draw(
        st.lists(
            st.sampled_from([",", "|", " , ", "\t| "]), min_size=len(parts), max_size=len(parts)
        )
    )
    text = parts[0] + "".join(sep + part for sep, part in zip(separators, parts[1:], strict=False))
    assert parse_spec(text, extra_types=POOL) == spec


SPECISH = st.text(alphabet="HhAa1084-:,|[]'\" any\tGBT+.0xé")


@given(st.one_of(st.text(), SPECISH, st.builds(lambda s: "[" + s, SPECISH)))
def test_arbitrary_text_raises_only_spec_error(text: str) -> None:
    try:
        result = parse_spec(text, extra_types=POOL)
    except SpecError as exc:
        assert str(exc)
    else:
        assert isinstance(result, GpuSpec) and len(result) >= 1
        assert parse_spec(str(result), extra_types=POOL) == result


@given(st.lists(st.one_of(st.text(), st.integers(), st.none(), SPECISH), max_size=5))
def test_arbitrary_lists_raise_only_spec_error(items: list[object]) -> None:
    try:
        result = parse_spec(items)
    except SpecError as exc:
        assert str(exc)
    else:
        assert len(result) == len(items)
