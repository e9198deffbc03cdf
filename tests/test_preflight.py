"""``--dry-run``: the whole pre-flight report, every input that cannot be sent marked by the path
to the object at fault, and nothing uploaded or submitted. Real gateway, real kernel."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

import gpu_magic
from gpu_magic._payload import digest

from .conftest import Gateway
from .test_kernel import execute, make_notebook, texts

SETUP = """\
import os
import threading
import numpy as np
class Holder:
    def __init__(self):
        self.n = 1
        self.guard = {"lock": threading.Lock()}
        self.out = open(os.devnull, "w")
holder = Holder()
log = open(os.devnull)
big = np.arange(50_000, dtype=np.float64)
"""
CELL = "print(holder.n, log.name, big.sum())"


def test_dry_run_lists_every_input_that_cannot_be_sent(use_gateway: Gateway) -> None:
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(textwrap.dedent(SETUP), "<notebook>", "exec"), ns)
    with use_gateway.client() as client:
        before = len(client.jobs())
        report = gpu_magic.run(CELL, "H100", ns, dry_run=True)
        rows = {r["name"]: r for r in report["inputs"]}
        assert set(rows) == {"holder", "log", "big"}
        assert rows["holder"]["path"] == "holder.guard['lock']"
        assert "a thread lock" in rows["holder"]["problem"]
        # every object at fault in it, not only the first to fix
        assert rows["holder"]["paths"] == ["holder.guard['lock']", "holder.out"]
        assert rows["log"]["path"] == "log" and "an open file" in rows["log"]["problem"]
        assert rows["big"]["travels"] == "by value" and rows["big"]["bytes"] >= 400_000
        text = repr(report)
        assert "2 of them cannot be sent" in text
        assert "holder.guard['lock']: a thread lock" in text and "log: an open file" in text
        assert "holder.out: an open file" in text
        # nothing submitted, nothing uploaded (the array's buffer is still unknown to it)
        assert len(client.jobs()) == before
        assert client.missing([digest(ns["big"].tobytes())]) == [digest(ns["big"].tobytes())]
    ns.pop("log").close()
    ns["holder"].out.close()


def test_dry_run_in_a_kernel_shows_the_report(use_gateway: Gateway, tmp_path: Path) -> None:
    nb = make_notebook("%load_ext gpu_magic", SETUP, f"%%gpu H100 --dry-run\n{CELL}")
    with use_gateway.client() as client:
        before = len(client.jobs())
        execute(nb, tmp_path)
        assert len(client.jobs()) == before
    report = texts(nb.cells[2], "execute_result")
    assert report.startswith("dry run for H100: 3 input(s)"), report
    assert "holder.guard['lock']: a thread lock" in report
    assert "log: an open file" in report
    assert texts(nb.cells[2], "error") == ""


@pytest.mark.parametrize("options, message", [
    ({"timeout": -5}, "timeout=-5: the cell's time limit must be more than 0"),
    ({"wait": -1}, "wait=-1: the time to wait in the queue must be 0 or more"),
    ({"retries": -1}, "retries=-1: the re-runs after a runner died must be a whole number"),
    # a number given as text: its type is what is wrong (it said 10 was out of range)
    ({"timeout": "10"}, "timeout='10' is a str, not a number; write timeout=10"),
    ({"wait": "soon"}, "wait='soon' is a str, not a number; write wait=60 (seconds)"),
    ({"retries": "2"}, "retries='2' is a str, not a number; write retries=2"),
])
def test_bad_option_values_are_refused_by_the_python_api(use_gateway: Gateway,
                                                         options: dict[str, Any],
                                                         message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        gpu_magic.run("1", "H100", {"__name__": "__main__"}, **options)


def test_the_report_says_how_many_faults_it_did_not_list() -> None:
    import threading

    from gpu_magic._api import _dry_run
    from gpu_magic._errors import GatewayError

    def no_gateway() -> Any:
        raise GatewayError("not reachable")

    many = {f"k{i}": threading.Lock() for i in range(30)}
    report = _dry_run({"many": many}, "H100", no_gateway, Path("."),  # type: ignore[arg-type]
                      {"__name__": "__main__"})
    text = repr(report)
    # nothing can be sent: no size (it said "5 B in all", the pickle of no inputs)
    assert text.startswith("dry run for H100: 1 input(s) (gateway not reachable: cache "
                           "unknown); 1 of them cannot be sent"), text
    assert report["total_bytes"] == 0
    assert text.count(": a thread lock") == 10  # one line per fault listed
    assert "… and 20 more part(s) of many that cannot be sent" in text
    assert report["inputs"][0]["unlisted"] == {"many": 20}
