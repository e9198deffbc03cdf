"""A small load run (the full 50 × 20 one is bench/bench_load.py): all jobs complete, none lost
or duplicated, no GPU double-granted (each cell holds an O_EXCL lock per granted GPU), every
output line delivered."""

from __future__ import annotations

import sys
from pathlib import Path

from .conftest import Gateway

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_load import run_load  # noqa: E402


def test_concurrent_clients_all_jobs_complete_exactly_once(gateway: Gateway, tmp_path: Path) -> None:
    result = run_load(gateway.url, gateway.token, clients=8, jobs=4, lockdir=str(tmp_path))
    assert result["problems"] == []
    assert result["completed"] == result["jobs"] == 32
    assert result["duplicates"] == 0
