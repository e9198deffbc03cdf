"""The sidebar in a real JupyterLab, driven in headless Chromium, against a real simulated gateway.

One lab server and one browser for the module; screenshots land in test-artifacts/.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_magic._embedded import (
    ensure_local_gateway,
    running_local_gateway,
    runtime_path,
    stop_local_gateway,
)

from .browser_util import (  # noqa: F401 (the jp_* fixtures shadow pytest-jupyter's)
    WAIT_MS,
    LabServer,
    browser,
    chromium_or_skip,
    first_page,
    jp_asyncio_loop,
    jp_server_cleanup,
    lab_server,
    open_lab,
    open_notebook,
    run_cells,
    screenshot,
    write_notebook,
)
from .conftest import Gateway, start_class_gateway, wait_for
from .test_gateway_http import submit as submit_job

pytestmark = pytest.mark.slow

SIDEBAR_TAB = '.jp-SideBar [data-id="gpu-magic-sidebar"]'
PANEL = "#gpu-magic-sidebar"


@pytest.fixture(scope="module")
def lab(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    chromium_or_skip()
    root = tmp_path_factory.mktemp("lab-root")
    env = {"GPU_MAGIC_URL": gateway.url, "GPU_MAGIC_TOKEN": gateway.token}
    with lab_server(tmp_path_factory.mktemp("lab"), root, env) as server:
        yield server


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with browser(tmp_path_factory.mktemp("chromium")) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def page(lab: LabServer, context: Any) -> Any:
    p = first_page(context)
    open_lab(p, lab)
    return p


@pytest.fixture(autouse=True)
def _screenshot_on_failure(request: pytest.FixtureRequest, page: Any) -> Iterator[None]:
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:  # this test's call just failed
        screenshot(page, f"FAILED-{request.node.name}")


def show_sidebar(page: Any) -> Any:
    panel = page.locator(PANEL)
    if not panel.is_visible():
        page.locator(SIDEBAR_TAB).click()
    panel.wait_for(state="visible")
    return panel


def job_row(page: Any, cell_source_marker: str) -> Any:
    """The sidebar row of the one job whose notebook cell we know by what it prints."""
    return page.locator(f"{PANEL} .jp-GpuMagic-job", has_text=cell_source_marker)


def test_sidebar_shows_the_pool(page: Any, lab: LabServer, gateway: Gateway) -> None:
    panel = show_sidebar(page)
    h100 = panel.locator('.jp-GpuMagic-type[data-type="H100"]')
    h100.wait_for()
    assert "/2 free" in h100.inner_text()
    assert panel.locator('.jp-GpuMagic-type[data-type="A100-80GB"]').inner_text().count("/4 free")
    connection = panel.locator(".jp-GpuMagic-connection")
    assert gateway.url in connection.inner_text()
    assert "simulated" in connection.inner_text() and "reachable" in connection.inner_text()
    # nodes on expand
    h100.click()
    panel.locator(".jp-GpuMagic-node").first.wait_for()
    assert panel.locator(".jp-GpuMagic-node .jp-GpuMagic-gpu").count() == 2
    # every display of a simulated pool says so: each type row and each node row too
    for row in [*panel.locator(".jp-GpuMagic-type").all(),
                *panel.locator(".jp-GpuMagic-node").all()]:
        mark = row.locator(".jp-GpuMagic-badge.jp-mod-simulated")
        assert mark.is_visible() and mark.inner_text() == "simulated", row.inner_text()
        box, side = mark.bounding_box(), panel.bounding_box()  # whole, not cut off
        assert box["x"] + box["width"] <= side["x"] + side["width"], row.inner_text()
    screenshot(page, "sidebar-pool")
    # a personal gateway: its owner token is an admin, but nobody else's jobs are there to see
    panel.locator(".jp-GpuMagic-title", has_text="My jobs").wait_for()
    assert panel.locator(".jp-GpuMagic-all").count() == 0


def test_a_gpu_cell_shows_up_with_its_grant(page: Any, lab: LabServer) -> None:
    write_notebook(lab.root / "work" / "quick.ipynb", "%load_ext gpu_magic",
                   "%%gpu H100\nanswer = 41 + 1\nanswer")
    open_notebook(page, lab, "work/quick.ipynb")
    panel = show_sidebar(page)
    run_cells(page, [0, 1])
    row = panel.locator('.jp-GpuMagic-job[data-state="succeeded"]', has_text="quick.ipynb")
    row.wait_for(timeout=WAIT_MS * 2)
    text = row.inner_text()
    assert "H100 ×1 on" in text and "simulated" in text
    assert "option" not in text  # (a spec of one option: no choice to explain)
    assert "quick.ipynb · cell" in text
    # the cell's own output arrived too
    page.locator(".jp-OutputArea-output", has_text="42").first.wait_for()
    screenshot(page, "sidebar-job-succeeded")

    # clicking the job selects its cell in the notebook
    run_cells(page, [0])  # moves the active cell away from the %%gpu cell
    row.click()
    page.wait_for_function(
        "() => (document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) "
        ".jp-Cell.jp-mod-active') || {}).textContent?.includes('answer = 41 + 1')")


def test_the_sidebar_in_notebook_7(context: Any, lab: LabServer) -> None:
    """A JupyterHub trial: under Notebook 7 (a hub's default page) the plugin failed to
    activate for want of JupyterLab's shell, leaving no pool, no jobs and no Cancel."""
    write_notebook(lab.root / "work" / "classic.ipynb", "%load_ext gpu_magic",
                   "%%gpu H100\nprint('from notebook 7')")
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        page.goto(lab.url("notebooks/work/classic.ipynb"))
        page.wait_for_selector(".jp-Notebook .jp-Cell", state="visible")
        # (View > Left Sidebar names it by its label)
        page.locator(".lm-MenuBar-item", has_text="View").click()
        page.locator(".lm-Menu-item", has_text="Left Sidebar").hover()
        page.locator(".lm-Menu-item", has_text="GPU pool and jobs").click()
        panel = page.locator(PANEL)
        panel.wait_for(state="visible")
        for i in range(2):
            page.locator(".jp-Notebook .jp-Cell").nth(i).locator(".jp-InputArea-editor").click()
            page.keyboard.press("Shift+Enter")
        panel.locator('.jp-GpuMagic-job[data-state="succeeded"]',
                      has_text="classic.ipynb").wait_for(timeout=WAIT_MS * 2)
        page.locator(".jp-OutputArea-output", has_text="from notebook 7").first.wait_for()
        screenshot(page, "sidebar-notebook-7")
        assert not [e for e in errors if "gpu-magic" in e or "gpu_magic" in e], errors
    finally:
        page.close()


def test_cancel_a_long_job_from_the_sidebar(page: Any, lab: LabServer) -> None:
    write_notebook(lab.root / "long.ipynb", "%load_ext gpu_magic",
                   "%%gpu H100\nimport time\ntime.sleep(60)")
    open_notebook(page, lab, "long.ipynb")
    panel = show_sidebar(page)
    run_cells(page, [0, 1])
    row = panel.locator('.jp-GpuMagic-job[data-state="running"]', has_text="long.ipynb")
    row.wait_for(timeout=WAIT_MS * 2)
    assert "H100 ×1 on" in row.inner_text()
    # the grant on one line, not broken beside Cancel ("H100 ×1 on sim-" / "vm")
    where = row.locator(".jp-GpuMagic-where").bounding_box()
    assert where["height"] < 1.5 * row.locator(".jp-GpuMagic-state").bounding_box()["height"]
    # while it runs, the status bar says so
    page.locator(".jp-GpuMagic-status", has_text="GPU: H100 ×1 running (simulated)").wait_for()
    screenshot(page, "sidebar-job-running")
    job_id = row.get_attribute("data-job-id")
    # a screen reader hears which job a Cancel button cancels, not "Cancel" over and over
    assert row.locator(".jp-GpuMagic-cancel").get_attribute("aria-label") == \
        f"Cancel job {job_id}"
    # and the line naming its cell is a link the keyboard reaches (the row holds Cancel)
    origin = row.locator(".jp-GpuMagic-origin")
    assert origin.get_attribute("role") == "link" and origin.get_attribute("tabindex") == "0"
    # what has the keyboard's focus keeps it as the panel is built anew (a trial: it went
    # back to the page at each poll while jobs ran, so Tab never reached a Cancel button)
    panel.locator('.jp-GpuMagic-type[data-type="H100"]').focus()
    page.keyboard.press("Enter")
    panel.locator('.jp-GpuMagic-type[data-type="H100"][aria-expanded="true"]').wait_for()
    assert page.evaluate("document.activeElement.dataset.focusKey") == "type:H100"
    row.locator(".jp-GpuMagic-cancel").click()
    cancelled = panel.locator(f'.jp-GpuMagic-job[data-job-id="{job_id}"][data-state="cancelled"]')
    cancelled.wait_for()
    assert cancelled.locator(".jp-GpuMagic-cancel").count() == 0
    # the cell that waited for it learns it too
    page.locator(".jp-OutputArea-output", has_text="cancel").first.wait_for()
    screenshot(page, "sidebar-job-cancelled")


def test_the_status_bar_follows_a_job_with_the_sidebar_closed(page: Any, lab: LabServer) -> None:
    # with the panel closed the jobs were polled every 10 s: the item showed a job seconds
    # late, or not at all, and an ended one for seconds after
    write_notebook(lab.root / "statusbar.ipynb", "%load_ext gpu_magic",
                   "%%gpu H100\nimport time\ntime.sleep(4)",
                   "from gpu_magic import gpu\n\n@gpu('A100-80GB')\ndef nap():\n    import time\n"
                   "    time.sleep(4)", "nap()")
    open_notebook(page, lab, "statusbar.ipynb")
    if page.locator(PANEL).is_visible():
        page.locator(SIDEBAR_TAB).click()
    page.locator(PANEL).wait_for(state="hidden")
    run_cells(page, [0, 1])
    running = page.locator(".jp-GpuMagic-status", has_text="GPU: H100 ×1 running")
    running.wait_for(timeout=3500)  # while the 4 s cell runs
    page.locator(".jp-OutputArea-output .gpu-magic-status", has_text="succeeded").wait_for()
    running.wait_for(state="hidden", timeout=4000)
    # a call of a decorated function names no magic: the notebook's use of gpu_magic is enough
    # (it waited for the next poll, up to 10 s)
    run_cells(page, [2])
    page.wait_for_timeout(2500)  # past the looks that cell 2 (it names gpu_magic) set off
    run_cells(page, [3])
    page.locator(".jp-GpuMagic-status", has_text="GPU: A100-80GB ×1 running").wait_for(timeout=3000)


def test_the_sidebar_shows_the_gateway_of_the_notebook_in_front(
        page: Any, lab: LabServer, gateway: Gateway,
        shared: tuple[Gateway, dict[str, str]]) -> None:
    # an instructor rehearsing as alice (`%gpu connect`): her cells ran on the class's
    # gateway while the sidebar showed JupyterLab's own pool and jobs, hers never listed
    gw, tokens = shared
    write_notebook(lab.root / "as-alice.ipynb", "%load_ext gpu_magic",
                   f"%gpu connect {gw.url} --token {tokens['alice']}",
                   "%%gpu A100-80GB\nprint('alice ran')")
    open_notebook(page, lab, "as-alice.ipynb")
    panel = show_sidebar(page)
    run_cells(page, [0, 1, 2])
    page.locator(".jp-OutputArea-output", has_text="alice ran").first.wait_for(timeout=WAIT_MS)
    connection = panel.locator(".jp-GpuMagic-connection", has_text=gw.url)
    connection.wait_for(timeout=WAIT_MS)
    assert "this notebook's %gpu connect" in connection.inner_text()
    job_row(page, "as-alice.ipynb").first.wait_for(timeout=WAIT_MS)
    screenshot(page, "sidebar-notebook-connected")
    # another notebook in front: JupyterLab's own gateway again
    open_notebook(page, lab, "work/quick.ipynb")
    panel = show_sidebar(page)
    panel.locator(".jp-GpuMagic-connection", has_text=gateway.url).wait_for(timeout=WAIT_MS)


def test_advice_instead_of_a_blank_panel(context: Any, tmp_path: Path) -> None:
    """No gateway configured and none running: the panel says what to do."""
    with lab_server(tmp_path / "lab", tmp_path, {}) as lab:
        page = context.new_page()
        open_lab(page, lab)
        panel = show_sidebar(page)
        advice = panel.locator('.jp-GpuMagic-advice[data-error="no_gateway"]')
        advice.wait_for()
        assert "%%gpu" in advice.inner_text() and "GPU_MAGIC_URL" in advice.inner_text()
        # the first state of every new user: said plainly, with no red "not reachable"
        connection = panel.locator(".jp-GpuMagic-connection")
        assert "no gateway running" in connection.inner_text()
        assert "not reachable" not in connection.inner_text()
        assert connection.locator(".jp-GpuMagic-dot.jp-mod-none").count() == 1
        screenshot(page, "sidebar-no-gateway")
        page.close()


def test_the_sidebar_leaves_a_stopped_gateway_stopped(
        context: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With GPU_MAGIC_SIMULATE in JupyterLab's environment, `gpu-magic stop` stays done: the
    sidebar's polls only look, and say that the next %%gpu cell starts a gateway."""
    lab = LabServer(tmp_path / "lab", tmp_path, {"GPU_MAGIC_SIMULATE": "T4:1"})
    # the user's local gateway, as a %%gpu cell in this JupyterLab would have started it
    for name in ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR"):
        monkeypatch.setenv(name, lab.env[name])
    info = ensure_local_gateway("T4:1")
    lab.start()
    try:
        page = context.new_page()
        open_lab(page, lab)
        panel = show_sidebar(page)
        panel.locator('.jp-GpuMagic-type[data-type="T4"]').wait_for()
        assert info["url"] in panel.locator(".jp-GpuMagic-connection").inner_text()

        stopped = subprocess.run([sys.executable, "-m", "gpu_magic", "stop"], env=lab.env,
                                 capture_output=True, text=True, timeout=60)
        assert "stopped the local gpu_magic gateway" in stopped.stdout, stopped
        advice = panel.locator('.jp-GpuMagic-advice[data-error="no_gateway"]')
        advice.wait_for()  # before the fix, the next poll started a gateway and this never came
        assert ("no local gpu_magic gateway is running; the next %%gpu cell starts one, "
                "and your jobs show here" in advice.inner_text())
        # a note, not a warning: no warning colour on its edge (a trial read it as a fault)
        edge = advice.evaluate("e => getComputedStyle(e).borderLeftColor")
        warn = panel.evaluate("e => getComputedStyle(e).getPropertyValue('--jp-warn-color1')")
        assert edge and warn.strip() and edge != page.evaluate(
            "c => { const d = document.createElement('div'); d.style.color = c; "
            "document.body.append(d); const v = getComputedStyle(d).color; d.remove(); "
            "return v; }", warn.strip()), (edge, warn)
        assert "no gateway running" in panel.locator(".jp-GpuMagic-connection").inner_text()
        page.wait_for_timeout(3000)  # more polls: still nothing started
        assert running_local_gateway() is None and not runtime_path().exists()
        screenshot(page, "sidebar-gateway-stopped")
        page.close()
    finally:
        lab.stop()
        stop_local_gateway()


def test_both_extensions_are_installed_and_enabled(lab: LabServer) -> None:
    """What `pip install gpu-magic` must leave behind, as JupyterLab's own tools report it."""
    labext = lab.jupyter("labextension", "list")
    assert re.search(r"gpu-magic-labextension v\S+ enabled\s+OK \(python, gpu-magic\)", labext), labext
    serverext = lab.jupyter("server", "extension", "list")
    assert re.search(r"gpu_magic\.serverext enabled", serverext), serverext
    assert re.search(r"gpu_magic\.serverext\s+OK", serverext), serverext


def test_advice_when_the_server_extension_is_missing(context: Any, tmp_path: Path) -> None:
    """The lab extension without its server side (disabled here) explains, not a blank panel."""
    # the user's config wins over the environment's only without JUPYTER_PREFER_ENV_PATH
    lab = LabServer(tmp_path / "lab", tmp_path, {"JUPYTER_PREFER_ENV_PATH": "0"})
    (tmp_path / "lab" / "config" / "jupyter_server_config.json").write_text(json.dumps(
        {"ServerApp": {"jpserver_extensions": {"gpu_magic.serverext": False}}}))
    lab.start()
    try:
        page = context.new_page()
        open_lab(page, lab)
        panel = show_sidebar(page)
        advice = panel.locator('.jp-GpuMagic-advice[data-error="no_server_extension"]')
        advice.wait_for()
        assert "jupyter server extension list" in advice.inner_text()
        screenshot(page, "sidebar-no-server-extension")
        page.close()
    finally:
        lab.stop()


# --- an instructor's view of a shared gateway ---

@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, dict[str, str]]]:
    """A simulated gateway shared by alice, bob and carol, carol its admin (an instructor)."""
    gw, tokens = start_class_gateway(tmp_path_factory.mktemp("shared"))
    yield gw, tokens
    gw.stop()


@pytest.fixture(scope="module")
def class_jobs(shared: tuple[Gateway, dict[str, str]]) -> Iterator[dict[str, str]]:
    """On H100:2 and A100-80GB:4: alice and bob each run a job and bob queues one; carol (the
    admin) queues one of her own. Job ids by name."""
    gw, tokens = shared
    clients = {name: gw.client(tokens[name]) for name in ("alice", "bob", "carol")}
    sleep = "import time\ntime.sleep(600)\n"
    ids: dict[str, str] = {}
    # background jobs: no one follows them here, and a foreground job nobody follows is
    # cancelled after a minute, which a slow first start of JupyterLab took (a CI run)
    bg = {"timeout": 900, "background": True}
    try:
        # a long spec: its row's first line wraps in a narrow sidebar
        ids["alice"] = submit_job(clients["alice"], sleep, "A100-80GB:2,H100:2", **bg)["id"]
        ids["bob"] = submit_job(clients["bob"], sleep, "H100", **bg)["id"]
        wait_for(lambda: all(clients[n].job(i)["state"] == "running" for n, i in ids.items()))
        ids["bob-queued"] = submit_job(clients["bob"], sleep, "H100:2", **bg)["id"]
        ids["carol"] = submit_job(clients["carol"], sleep, "H100:2", **bg)["id"]
        yield ids
    finally:
        for job_id in ids.values():
            try:
                clients["carol"].cancel(job_id)
            except Exception:  # already over
                pass
        for c in clients.values():
            c.close()


@pytest.fixture(scope="module")
def admin_page(shared: tuple[Gateway, dict[str, str]], class_jobs: dict[str, str],
               context: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """JupyterLab with carol's (the admin's) token, its sidebar open with "everyone" ticked."""
    gw, tokens = shared
    env = {"GPU_MAGIC_URL": gw.url, "GPU_MAGIC_TOKEN": tokens["carol"]}
    root = tmp_path_factory.mktemp("admin-root")
    with lab_server(tmp_path_factory.mktemp("admin-lab"), root, env) as server:
        page = context.new_page()
        open_lab(page, server)
        panel = show_sidebar(page)
        panel.locator(".jp-GpuMagic-all").check()
        panel.locator(f'.jp-GpuMagic-job[data-job-id="{class_jobs["alice"]}"]').wait_for()
        yield page
        page.close()


def test_a_job_cancelled_in_the_queue_never_ran(admin_page: Any,
                                                 class_jobs: dict[str, str]) -> None:
    panel = show_sidebar(admin_page)
    job = f'.jp-GpuMagic-job[data-job-id="{class_jobs["bob-queued"]}"]'
    panel.locator(f'{job}[data-state="queued"] .jp-GpuMagic-cancel').click()
    row = panel.locator(f'{job}[data-state="cancelled"]')
    row.wait_for()
    assert "nothing ran" in row.inner_text()
    # how long it waited, never "ran N s"
    assert re.fullmatch(r"queued \d+(\.\d)? s", row.locator(".jp-GpuMagic-elapsed").inner_text())
    assert "ran" not in row.locator(".jp-GpuMagic-jobline").inner_text()
    screenshot(admin_page, "sidebar-cancelled-in-queue")


def test_a_queued_job_says_what_keeps_it_waiting(
        admin_page: Any, shared: tuple[Gateway, dict[str, str]],
        class_jobs: dict[str, str]) -> None:
    gw, tokens = shared
    panel = show_sidebar(admin_page)
    row = panel.locator(f'.jp-GpuMagic-job[data-job-id="{class_jobs["carol"]}"]')
    with gw.client(tokens["carol"]) as carol:
        # her own running job holds 1 of the 2 GPUs a new limit lets her have: her queued
        # H100:2 waits for it (a limit under 2 would fail that job: it could never run)
        extra = submit_job(carol, "import time\ntime.sleep(600)\n", "A100-80GB", timeout=900)
        try:
            wait_for(lambda: carol.job(extra["id"])["state"] == "running")
            carol._request("PUT", "/v1/limits/carol", json={"max_gpus": 2})
            row.locator(".jp-GpuMagic-grant", has_text="your limit").wait_for()
            assert re.fullmatch(
                r"#\d+ in the queue: your other jobs hold 1 of the 2 GPU\(s\) your limit "
                r"lets you use at once", row.locator(".jp-GpuMagic-grant").inner_text())
            screenshot(admin_page, "sidebar-queued-why")
        finally:
            carol._request("PUT", "/v1/limits/carol", json={})
            carol.cancel(extra["id"])
            wait_for(lambda: carol.job(extra["id"])["state"] == "cancelled")
    # lifted: its place in the queue, and what it waits for again (others' jobs hold the
    # H100 it still needs, counted and not named)
    row.locator(".jp-GpuMagic-grant", has_text="your limit").wait_for(state="detached")
    assert re.fullmatch(r"#\d+ in the queue: H100: 1 of 2 free",
                        row.locator(".jp-GpuMagic-grant").inner_text())


def test_a_free_gpu_held_for_a_waiting_job_is_said_so(
        admin_page: Any, class_jobs: dict[str, str]) -> None:
    # bob holds one H100 of two and an H100:2 waits: the other one is free but kept for it
    panel = show_sidebar(admin_page)
    free = panel.locator('.jp-GpuMagic-type[data-type="H100"] .jp-GpuMagic-free')
    free.filter(has_text="(1 held)").wait_for()
    assert free.inner_text() == "1/2 free (1 held)"
    assert "held for the first waiting job" in (free.get_attribute("title") or "")


def test_the_status_bar_counts_only_the_viewers_own_jobs(
        admin_page: Any, class_jobs: dict[str, str]) -> None:
    """With "everyone" ticked the panel lists alice's and bob's jobs; the status bar still
    speaks of carol's own: her one queued job."""
    panel = show_sidebar(admin_page)
    assert panel.locator(".jp-GpuMagic-all").is_checked()  # offered: a shared gateway's admin
    panel.locator(f'.jp-GpuMagic-job[data-job-id="{class_jobs["bob"]}"]').wait_for()
    status = admin_page.locator(".jp-GpuMagic-status")
    status.wait_for()
    assert status.inner_text() == "GPU: 1 queued (simulated)"


def test_the_everyone_view_leads_with_the_user_and_keeps_cancel_in_place(
        admin_page: Any, class_jobs: dict[str, str]) -> None:
    panel = show_sidebar(admin_page)
    owners = {"alice": "alice", "bob": "bob", "carol": "carol"}
    rows = {}
    for name, user in owners.items():
        row = panel.locator(f'.jp-GpuMagic-job[data-job-id="{class_jobs[name]}"]')
        row.wait_for()
        rows[name] = row
        # the user's name opens the job's first line, as prominent as its state
        first = row.locator(".jp-GpuMagic-jobline > *").first
        assert first.get_attribute("class") == "jp-GpuMagic-user" and first.inner_text() == user
        look = first.evaluate("e => { const s = getComputedStyle(e); const t = getComputedStyle("
                              "e.parentElement.querySelector('.jp-GpuMagic-state'));"
                              " return [s.color === t.color, s.fontSize === t.fontSize,"
                              " s.fontWeight === t.fontWeight]; }")
        assert look == [True, True, True], (user, look)
    # Cancel sits in the same corner of every active row, however its first line wraps
    # (alice's long spec wraps it in the default sidebar width)
    spots = set()
    for row in rows.values():
        box, button = row.bounding_box(), row.locator(".jp-GpuMagic-cancel").bounding_box()
        spots.add((round(button["y"] - box["y"]), round(box["x"] + box["width"]
                                                        - button["x"] - button["width"])))
    assert len(spots) == 1, spots
    screenshot(admin_page, "sidebar-everyone")
    # the user's own view names nobody
    panel.locator(".jp-GpuMagic-all").uncheck()
    panel.locator(".jp-GpuMagic-title", has_text="My jobs").wait_for()
    assert panel.locator(".jp-GpuMagic-user").count() == 0
    panel.locator(".jp-GpuMagic-all").check()
    panel.locator(".jp-GpuMagic-title", has_text="Jobs").wait_for()
