"""The job's widget in a real JupyterLab, in headless Chromium: it shows the grant, and its Cancel
button cancels a running *foreground* cell (the kernel is busy in %%gpu all along).

Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .browser_util import (  # noqa: F401 (the jp_* fixtures shadow pytest-jupyter's)
    LabServer,
    browser,
    chromium_or_skip,
    first_page,
    jp_asyncio_loop,
    jp_server_cleanup,
    lab_server,
    open_notebook,
    run_cells,
    screenshot,
    write_notebook,
)
from .conftest import Gateway, wait_for
from .test_gateway_http import all_free, finish

pytestmark = pytest.mark.slow

WIDGET = ".jp-OutputArea-output .jupyter-widgets.gpu-magic-widget"


def kernel_status(page: Any) -> str:
    """What the status bar says of the kernel ("Busy", "Idle", ...)."""
    found = page.evaluate(
        "() => [...document.querySelectorAll('#jp-main-statusbar *')]"
        ".filter(e => e.children.length === 0 && /\\|\\s*\\w+\\s*$/.test(e.textContent || ''))"
        ".map(e => e.textContent.split('|').pop().trim())")
    assert found, "no kernel status in the status bar"
    return str(found[0])


@pytest.fixture(scope="module")
def lab(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    chromium_or_skip()
    root = tmp_path_factory.mktemp("lab-root")
    write_notebook(
        root / "cancel.ipynb",
        "%load_ext gpu_magic\nkeep = 'untouched'",
        "%%gpu H100, A100-80GB\nimport time\nprint('widget-test started', flush=True)\n"
        "time.sleep(300)\nv = 1",
        "print('after:', keep, 'v' in globals())",
    )
    write_notebook(
        root / "background.ipynb",
        "%load_ext gpu_magic",
        "%%gpu H100 --background\nimport time\nprint('bg-line one', flush=True)\n"
        "time.sleep(2)\nprint('bg-line two')",
    )
    write_notebook(
        root / "reload.ipynb",
        "%load_ext gpu_magic",
        "%%gpu H100 --background\nimport time\nprint('before the reload', flush=True)\n"
        "time.sleep(6)\nprint('after the reload')",
    )
    env = {"GPU_MAGIC_URL": gateway.url, "GPU_MAGIC_TOKEN": gateway.token}
    with lab_server(tmp_path_factory.mktemp("lab"), root, env) as server:
        yield server


@pytest.fixture(scope="module")
def page(lab: LabServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with browser(tmp_path_factory.mktemp("chromium")) as context:
        yield first_page(context)


def test_widget_shows_the_grant_and_cancel_stops_a_foreground_cell(
        lab: LabServer, page: Any, client: Any) -> None:
    before = {j["id"] for j in client.jobs()}
    open_notebook(page, lab, "cancel.ipynb")
    run_cells(page, [0, 1])
    widget = page.locator(WIDGET).first
    widget.wait_for(state="visible")
    # the grant is the headline, and the clock ticks while it runs
    page.wait_for_function(
        "s => { const w = document.querySelector(s);"
        " return w && /H100 ×1/.test(w.textContent) && /running/.test(w.textContent); }",
        arg=WIDGET)
    text = widget.inner_text()
    assert "H100 ×1" in text and "sim-vm" in text and "option 1 of 2" in text
    assert "simulated" in text
    page.locator(".jp-OutputArea-output", has_text="widget-test started").first.wait_for()
    # a tick of the widget's clock later, the subshell JupyterLab opened for the widget's comms
    # has come and gone: its busy/idle must not make the kernel read "Idle" mid-cell
    seconds = widget.inner_text()
    page.wait_for_function(
        "([s, before]) => { const w = document.querySelector(s);"
        " return w && w.textContent !== before; }", arg=[WIDGET, seconds])
    assert kernel_status(page) == "Busy"
    running = screenshot(page, "widget-running")
    assert running.stat().st_size > 0

    # in a narrow notebook Cancel goes under the status, not off its side (a trial: at 500
    # px, the sidebar open, it was reached only by scrolling the widget sideways)
    size = page.viewport_size
    page.set_viewport_size({"width": 560, "height": size["height"]})
    button = widget.locator("button", has_text="Cancel")
    page.wait_for_timeout(300)  # (JupyterLab lays the panels out again)
    output = widget.locator("xpath=ancestor::div[contains(@class, 'jp-OutputArea-output')]")
    box, area = button.bounding_box(), output.first.bounding_box()
    assert box["x"] + box["width"] <= area["x"] + area["width"] + 1, (box, area)
    page.set_viewport_size(size)

    # reached by keyboard, its focus ring shows on its orange (a trial: JupyterLab's thin
    # blue one was all but invisible there)
    button.focus()
    page.keyboard.press("Shift")  # (a key pressed: the focus is the keyboard's, as by Tab)
    ring = button.evaluate("b => { const s = getComputedStyle(b);"
                           " return [document.activeElement === b, s.outlineStyle,"
                           " s.outlineWidth, s.outlineOffset]; }")
    assert ring == [True, "solid", "2px", "2px"], ring

    # the kernel is busy in the foreground cell, and the click still gets through
    assert button.is_visible()
    button.click()
    error = page.locator(".jp-OutputArea-output", has_text="JobCancelled").first
    error.wait_for()
    # ended, the widget gives way to its final status as HTML (the same words), which a
    # notebook opened again without its kernel shows too
    final = page.locator(".jp-OutputArea-output .gpu-magic-status",
                         has_text="cancelled by the Cancel button").first
    final.wait_for()
    assert "nothing was bound" in final.inner_text()
    assert page.locator(WIDGET).count() == 0
    assert not page.locator(".jp-OutputArea-output button", has_text="Cancel").count()
    screenshot(page, "widget-cancelled")

    # the kernel is free again, with the namespace as before the cell
    run_cells(page, [2])
    page.locator(".jp-OutputArea-output", has_text="after: untouched False").first.wait_for()
    mine = [j for j in client.jobs() if j["id"] not in before]
    assert len(mine) == 1 and finish(client, mine[0]["id"])["state"] == "cancelled"
    wait_for(lambda: all_free(client), 60)


def test_a_background_cell_keeps_its_output_when_saved_and_opened_again(
        lab: LabServer, page: Any) -> None:
    """The job ends after its cell did (no cell runs then): its widget gives way to the final
    status with what it printed, which the saved notebook keeps and shows when opened again
    (a widget there said "Error displaying widget: model not found", its output lost)."""
    open_notebook(page, lab, "background.ipynb")
    run_cells(page, [0, 1])
    cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
    cell.locator(".jupyter-widgets.gpu-magic-widget", has_text="bg-line one").wait_for()
    final = cell.locator(".gpu-magic-status", has_text="succeeded")
    final.wait_for(timeout=60_000)
    assert cell.locator(".gpu-magic-output", has_text="bg-line two").is_visible()
    assert cell.locator(".jupyter-widgets").count() == 0
    page.keyboard.press("Control+s")
    path = lab.root / "background.ipynb"

    def saved_outputs() -> list[dict[str, Any]]:
        return json.loads(path.read_text())["cells"][1]["outputs"]

    wait_for(lambda: any("bg-line two" in json.dumps(o) for o in saved_outputs()), 30)
    [kept] = saved_outputs()
    assert "application/vnd.jupyter.widget-view+json" not in kept["data"]
    assert "bg-line one\nbg-line two" in "".join(kept["data"]["text/plain"])

    page.reload()
    open_notebook(page, lab, "background.ipynb")
    cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
    cell.locator(".gpu-magic-output", has_text="bg-line two").wait_for()
    assert "succeeded" in cell.locator(".gpu-magic-status").inner_text()
    assert not page.get_by_text("Error displaying widget").count()
    screenshot(page, "background-reopened")


def test_a_background_job_that_ends_after_the_page_is_reloaded_shows_how_it_ended(
        lab: LabServer, page: Any) -> None:
    """A browser trial: the page reloaded (the notebook saved) while a background job ran
    showed its widget again, and the cell went blank when the job ended: the display update
    that replaces the widget has no place after a reload, and the widget had been closed."""
    open_notebook(page, lab, "reload.ipynb")
    run_cells(page, [0, 1])
    cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
    cell.locator(".jupyter-widgets.gpu-magic-widget", has_text="before the reload").wait_for()
    page.keyboard.press("Control+s")
    path = lab.root / "reload.ipynb"
    wait_for(lambda: "before the reload" in path.read_text(), 30)
    page.reload()
    open_notebook(page, lab, "reload.ipynb")
    cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
    widget = cell.locator(".jupyter-widgets.gpu-magic-widget")
    widget.filter(has_text="after the reload").wait_for(timeout=60_000)
    widget.filter(has_text="succeeded").wait_for(timeout=30_000)
    assert "before the reload" in widget.inner_text()
    assert not cell.get_by_text("Error displaying widget").count()
    screenshot(page, "background-ended-after-reload")


def test_artifacts_folder_is_ignored() -> None:
    ignore = (Path(__file__).resolve().parent.parent / ".gitignore").read_text().split()
    assert "test-artifacts/" in ignore
