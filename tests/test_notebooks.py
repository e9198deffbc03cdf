"""The teaching notebooks run top to bottom against a simulated pool, are stored stripped, and
pass ruff with the bodies of their ``%%gpu`` cells linted too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _source(cell: dict[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, (
                f"{path.name}: strip outputs before committing")
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", (
        f"{path.name}: the kernelspec must be python3, the kernel every installation has")


def test_notebooks_pass_ruff(tmp_path: Path) -> None:
    # ruff lints notebooks itself but skips every cell that starts with a cell magic, which here
    # is most of the code: lint copies whose `%%gpu` lines are comments. `_` (the previous
    # cell's value, how a notebook keeps a background job's handle) is an IPython builtin.
    copies = []
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code" and _source(cell).startswith("%%gpu"):
                cell["source"] = "# " + _source(cell)
        copy = tmp_path / path.name
        copy.write_text(json.dumps(nb))
        copies.append(str(copy))
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--config",
         str(ROOT / "pyproject.toml"), "--config", 'builtins = ["_"]', *copies],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.usefixtures("use_gateway")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    if any("import torch" in c.source for c in nb.cells if c.cell_type == "code"):
        pytest.importorskip("torch", reason=f"{path.name} trains a PyTorch model: "
                            "pip install torch==2.13.0 (the test extra has it)")
    client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}})
    # a cell that keeps a background job's handle from `_`, run again as students do: it
    # broke when the cell itself showed a value (`job = _; job.state` made `_` the state)
    takers = [i for i, c in enumerate(nb.cells)
              if c.cell_type == "code" and re.search(r"^\w+ = _$", c.source, re.M)]
    again = []
    # a student runs these again and again: what they make in the temporary folder must go
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with client.setup_kernel(env={**os.environ, "TMPDIR": str(scratch)}):
        for i, cell in enumerate(nb.cells):
            client.execute_cell(cell, i)
            if i in takers:
                rerun = nbformat.v4.new_code_cell(cell.source)
                client.execute_cell(rerun, i)
                again += [f"cell {i} run again: {o.ename}: {o.evalue}" for o in rerun.outputs
                          if o.output_type == "error"]
    assert not again, again
    # (the simulated pool's nvidia-smi folder stays on purpose: one per account, reused)
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("gpu-magic-simulated-")]
    assert not left, f"{path.name} left {left} in the temporary folder"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        expected = "raises-exception" in cell.metadata.get("tags", [])
        if expected:
            assert errors, f"{path.name} cell {i} is tagged raises-exception but did not raise"
        else:
            assert not errors, f"{path.name} cell {i} failed: {errors[0].ename}: {errors[0].evalue}"
        # what a notebook shows is what it teaches: no warning of the tools it runs (06's
        # gateway warned of a tokens file beside its state, until it got a folder of its own)
        shown = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        assert ": warning:" not in shown, f"{path.name} cell {i} shows a warning: {shown}"
    if path.name.startswith("04"):
        # its text says the line printed before the cancel stays in the job's cell
        from .test_widget import saved

        kept = [saved(c)[0] for c in nb.cells if c.cell_type == "code"
                and "--background" in c.source]
        assert any(k.endswith("\nstarted\n") and "cancelled" in k for k in kept), kept
