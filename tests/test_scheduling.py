"""Scheduling through the real gateway: concurrency, retries, OOM fallback, waits, orphans,
cancellation by kernel interrupt, and attaching to a job again."""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from nbclient import NotebookClient

import gpu_magic
from gpu_magic import JobCancelled, RunnerLost, WaitExpired
from gpu_magic._api import attach
from gpu_magic._client import GatewayClient

from .conftest import Gateway, start_class_gateway, start_gateway, wait_for
from .test_gateway_http import all_free, finish, follow, inline_body, opts, submit

DEADLINE = 60.0


def ns() -> dict[str, Any]:
    return {"__name__": "__main__"}


@pytest.mark.usefixtures("use_gateway")
def test_concurrent_clients_never_share_a_gpu(tmp_path: Path) -> None:
    """Each cell holds an O_EXCL lock file per granted GPU while it runs: a double grant fails."""
    cell = f"""
import json, os, time
g = json.loads(os.environ["GPU_MAGIC_GRANT"])
locks = [os.path.join({str(tmp_path)!r}, f"{{g['node']}}-{{i}}") for i in g["indices"]]
fds = [os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY) for p in locks]
time.sleep(0.2)
for fd, p in zip(fds, locks):
    os.close(fd); os.unlink(p)
got = (g["type"], g["count"])
"""
    results: queue.Queue[Any] = queue.Queue()

    def worker(spec: str) -> None:
        try:
            for _ in range(3):
                space = ns()
                gpu_magic.run(cell, spec, space, quiet=True)
                results.put(space["got"])
        except BaseException as exc:  # report it in the main thread
            results.put(exc)

    specs = ["H100:2, A100-80GB:2", "H100, A100-80GB", "A100-80GB:4, H100:2", "any", "any:2",
             "H100"]
    threads = [threading.Thread(target=worker, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE * 3)
    got = [results.get_nowait() for _ in range(results.qsize())]
    errors = [g for g in got if isinstance(g, BaseException)]
    assert not errors, errors
    assert len(got) == 3 * len(specs)


@pytest.mark.usefixtures("use_gateway")
def test_runner_killed_is_retried_and_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    space = ns()
    value = gpu_magic.run(
        "import json, os, signal\n"
        "attempt = json.loads(os.environ['GPU_MAGIC_GRANT'])['attempt']\n"
        "if attempt == 1:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "attempt", "H100", space, retries=1)
    assert value == 2
    err = capsys.readouterr().err
    assert "killed by signal SIGKILL" in err and "retrying (attempt 2 of 2)" in err


@pytest.mark.usefixtures("use_gateway")
def test_runner_killed_without_retries_is_a_clear_error(client: Any) -> None:
    with pytest.raises(RunnerLost, match="killed by signal SIGKILL") as info:
        gpu_magic.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "H100", ns())
    job = client.job(info.value.job_id)
    assert job["state"] == "lost"
    wait_for(lambda: all_free(client), DEADLINE)


@pytest.mark.usefixtures("use_gateway")
def test_segfaulting_cell_is_tried_retries_plus_one_times(client: Any) -> None:
    with pytest.raises(RunnerLost, match="SIGSEGV") as info:
        gpu_magic.run("import ctypes\nctypes.string_at(0)", "A100-80GB", ns(), retries=2)
    job = client.job(info.value.job_id)
    assert [a["attempt"] for a in job["attempts"]] == [1, 2, 3]


@pytest.mark.usefixtures("use_gateway")
def test_cell_that_raises_is_not_retried(client: Any) -> None:
    with pytest.raises(ZeroDivisionError):
        gpu_magic.run("1 / 0", "H100", ns(), retries=3)
    mine = [j for j in client.jobs() if j["source"] == "1 / 0"]
    assert mine and len(mine[-1]["attempts"]) == 1


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("small"), "--orphan-timeout", "2",
                       simulate="T4:1,A100-80GB:1")
    yield gw
    gw.stop()


@pytest.fixture
def small_client(small_pool: Gateway) -> Iterator[Any]:
    c = small_pool.client()
    yield c
    c.close()


def test_out_of_memory_falls_back_to_a_gpu_with_more_memory(
    small_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    cell = ("import json, os\n"
            "g = json.loads(os.environ['GPU_MAGIC_GRANT'])\n"
            "if g['memory_gb'] < 40:\n"
            "    raise RuntimeError('CUDA out of memory. Tried to allocate 20.00 GiB')\n"
            "g['type']")
    client = small_client
    assert gpu_magic.run(cell, "T4, A100-80GB", ns(), client=client, oom_fallback=True) == "A100-80GB"
    assert "out of GPU memory on T4 (16 GB); retrying on a GPU with more memory" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        gpu_magic.run(cell, "T4", ns(), client=client, oom_fallback=True)


def test_a_job_cancelled_while_waiting_to_be_retried_says_it_ran(small_client: Any) -> None:
    # "cancelled while queued; nothing ran" of a job whose first attempt ran out of memory
    client = small_client
    holder = submit(client, "import time\ntime.sleep(60)", "A100-80GB", background=True)
    try:
        wait_for(lambda: client.job(holder["id"])["state"] == "running", DEADLINE)
        job = gpu_magic.run("print('tried')\nraise RuntimeError('CUDA out of memory.')",
                            "T4, A100-80GB", ns(), client=client, quiet=True, background=True,
                            oom_fallback=True)
        wait_for(lambda: client.job(job.id)["attempt"] == 2, DEADLINE)
        assert job.cancel()
        rec = finish(client, job.id)
        assert rec["state"] == "cancelled"
        assert rec["message"] == ("cancelled by job.cancel() while queued to be retried "
                                  "(attempt 2); its output so far is kept")
    finally:
        client.cancel(holder["id"])
        finish(client, holder["id"])


def test_out_of_memory_on_a_gpu_of_unknown_memory_says_so(tmp_path: Path) -> None:
    # a type whose memory the pool does not know (a Ray label of its own) was "0 GB", and
    # every option then counted as larger
    gw = start_gateway(tmp_path, simulate="V100:1,H100:1")
    try:
        with gw.client() as client:
            with pytest.raises(RuntimeError, match="CUDA out of memory"):
                gpu_magic.run("raise RuntimeError('CUDA out of memory.')", "V100, H100", ns(),
                              client=client, oom_fallback=True, quiet=True)
            job = max(client.jobs(), key=lambda j: j["created"])
            assert job["attempts"] == [] or len(job["attempts"]) == 1, job
            notes = " ".join(job["notices"])
            assert "ran out of GPU memory on V100, whose memory size this pool does not know" \
                in notes and "0 GB" not in notes
    finally:
        gw.stop()


def test_a_type_name_of_neither_catalogue_nor_pool_lists_the_pool_s_own(tmp_path: Path) -> None:
    # the refusal listed only the catalogue, not the names this pool adds (a Ray label)
    gw = start_gateway(tmp_path, simulate="V100:1,H100:1")
    try:
        with gw.client() as client:
            assert gpu_magic.run("1", "V100", ns(), client=client, quiet=True) == 1
            with pytest.raises(gpu_magic.SpecError) as info:
                gpu_magic.run("1", "V10", ns(), client=client, quiet=True)
            assert str(info.value).startswith("'V10' is not a GPU type; did you mean V100? ")
            assert "B200, V100 (or any)" in str(info.value)
    finally:
        gw.stop()


def test_wait_expires_and_leaves_nothing_behind(small_client: Any) -> None:
    client = small_client
    blocker = submit(client, "import time\ntime.sleep(60)", "T4", background=True)
    try:
        wait_for(lambda: client.job(blocker["id"])["state"] == "running", DEADLINE)
        # (and what it waited for: this user's own job on the only T4)
        with pytest.raises(WaitExpired, match=r"within --wait 0\.5 s \(T4: 0 of 1 free, held "
                           f"by your job {blocker['id']}\\); nothing ran"):
            gpu_magic.run("1", "T4", ns(), client=client, wait=0.5)
        assert client.pool()["queue_length"] == 0
    finally:
        client.cancel(blocker["id"])
        finish(client, blocker["id"])


def test_orphaned_foreground_job_is_cancelled_background_job_is_not(small_client: Any) -> None:
    client = small_client
    fg = submit(client, "import time\ntime.sleep(60)", "T4")
    bg = submit(client, "import time\ntime.sleep(3)\nx = 1", "A100-80GB", background=True,
                outputs=["x"])
    done = finish(client, fg["id"])
    assert done["state"] == "cancelled"
    assert "no client followed this foreground job for 2 s" in done["message"]
    assert finish(client, bg["id"])["state"] == "succeeded"


def test_a_client_that_drops_its_submit_and_follow_leaves_an_orphan(small_pool: Gateway,
                                                                    small_client: Any) -> None:
    # the stream of a submit-and-follow is the job's only follower: dropping it mid-job must
    # count as the client going away, or a killed kernel would hold its GPU to the timeout
    body = inline_body({}, "import time\ntime.sleep(60)", spec=opts("T4"))
    with httpx.Client(base_url=small_pool.url, timeout=DEADLINE,
                      headers={"Authorization": f"Bearer {small_pool.token}"}) as http:
        with http.stream("POST", "/v1/jobs?follow=true", json=body) as resp:
            assert resp.status_code == 201
            seen = []
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    seen.append(json.loads(line[5:]))
                    if seen[-1]["type"] == "started":
                        break
    job_id = seen[0]["job"]["id"]
    done = finish(small_client, job_id)
    assert done["state"] == "cancelled"
    assert "no client followed this foreground job for 2 s" in done["message"]
    assert all_free(small_client)


def test_attach_replays_output_and_binds_results(small_client: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    client = small_client
    job = submit(client, "print('hello from before')\ny = 41 + 1\ny", "T4", background=True,
                 outputs=["y"], has_value=True)
    finish(client, job["id"])
    space = ns()
    assert attach(job["id"], space, client=client, quiet=True) == 42
    assert space["y"] == 42
    assert "hello from before" in capsys.readouterr().out


def _interrupted(gateway: Gateway, code: str, tmp: Path) -> nbformat.NotebookNode:
    """Run ``code`` in a real kernel that nbclient interrupts (SIGINT, as the stop button does)
    after a few seconds; then check what the namespace holds."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in (
        "%load_ext gpu_magic\nkeep = 'untouched'", code, "print(keep, 'v' in globals())")]
    env = {"GPU_MAGIC_URL": gateway.url, "GPU_MAGIC_TOKEN": gateway.token}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=4, interrupt_on_timeout=True, allow_errors=True,
                       kernel_name="python3", resources={"metadata": {"path": str(tmp)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


@pytest.mark.parametrize("where", ["running", "queued"])
def test_kernel_interrupt_cancels_the_remote_job(small_pool: Gateway, small_client: Any,
                                                 where: str, tmp_path: Path) -> None:
    client = small_client
    blocker = None
    if where == "queued":
        blocker = submit(client, "import time\ntime.sleep(60)", "A100-80GB", background=True)
        wait_for(lambda: client.job(blocker["id"])["state"] == "running", DEADLINE)
    before = {j["id"] for j in client.jobs()}
    try:
        nb = _interrupted(
            small_pool,
            "%%gpu A100-80GB\nimport time\nprint('started', flush=True)\ntime.sleep(60)\nv = 1",
            tmp_path,
        )
        errors = [o for o in nb.cells[1].outputs if o.output_type == "error"]
        mine = [j for j in client.jobs() if j["id"] not in before and not j["background"]]
        assert len(mine) == 1
        job = finish(client, mine[0]["id"])
        # the contract: a kernel interrupt cancels the remote job (a running cell first gets
        # its KeyboardInterrupt there, as a local one, and the error shows where it stopped)
        assert [e.ename for e in errors] == ["JobCancelled"]
        assert job["state"] == "cancelled"
        if where == "running":
            assert "KeyboardInterrupt" in "\n".join(errors[0].traceback)
        else:
            assert job["started"] is None  # it never ran
        # nothing half-bound: the namespace is as before the cell
        assert nb.cells[2].outputs[0].text == "untouched False\n"
    finally:
        if blocker:
            client.cancel(blocker["id"])
            finish(client, blocker["id"])
    wait_for(lambda: all_free(client), DEADLINE)


def test_cancellation_is_not_an_exception() -> None:
    try:
        raise JobCancelled("x")
    except Exception:  # noqa: BLE001 - this is what user code does
        pytest.fail("except Exception swallowed a cancellation")
    except BaseException as exc:
        assert isinstance(exc, JobCancelled)


def test_queued_events_carry_position_and_estimate(small_client: Any) -> None:
    client = small_client
    first = submit(client, "import time\ntime.sleep(1)", "T4", background=True)
    second = submit(client, "x = 1", "T4", background=True)
    try:
        events = list(client.events(second["id"]))
        queued = [e for e in events if e["type"] == "queued"]
        assert queued[0]["position"] >= 1 and "estimate" in queued[0]
        granted = next(e for e in events if e["type"] == "granted")
        assert granted["gpu_type"] == "T4"
    finally:
        finish(client, first["id"])


# --- fair share among users, on a gateway alice, bob and carol share ---


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[dict[str, GatewayClient]]:
    """Clients of alice, bob and carol on a fresh shared gateway (H100:2, A100-80GB:4)."""
    gw, tokens = start_class_gateway(tmp_path)
    clients = {name: gw.client(token) for name, token in tokens.items()}
    yield clients
    for c in clients.values():
        c.close()
    gw.stop()


def hold_until(flag: Path) -> str:
    """A cell that holds its GPUs until ``flag`` exists."""
    return f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n    time.sleep(0.05)\n"


def running(client: GatewayClient, job: dict[str, Any]) -> bool:
    return client.job(job["id"])["state"] == "running"


def test_users_whose_jobs_each_take_a_whole_type_take_turns(
        shared: dict[str, GatewayClient], tmp_path: Path) -> None:
    """Each H100:2 takes the whole H100 pool, so whenever it frees every user has 0 jobs running:
    the tie goes to the user served least recently, not to carol's earlier submissions."""
    flag = tmp_path / "alice-done"
    alice = submit(shared["alice"], hold_until(flag), "H100:2")
    wait_for(lambda: running(shared["alice"], alice), DEADLINE)
    carols = [submit(shared["carol"], "x = 1", "H100:2") for _ in range(3)]
    bob = submit(shared["bob"], "x = 1", "H100:2")
    flag.touch()
    done = [finish(shared["carol"], j["id"]) for j in carols] + [finish(shared["bob"], bob["id"])]
    assert [r["state"] for r in done] == ["succeeded"] * 4
    order = [r["user"] for r in sorted(done, key=lambda r: r["started"])]
    assert order == ["carol", "bob", "carol", "carol"]


def test_queue_position_is_the_fair_order(shared: dict[str, GatewayClient], tmp_path: Path) -> None:
    """alice holds both H100s and has three more jobs queued; bob's job, submitted last, is
    first in line while she runs (he has nothing running), and his place in the queue says
    so. When her job ends, both have nothing running and her first job, waiting longer, starts
    beside his; her others after his."""
    alice, bob = shared["alice"], shared["bob"]
    flag = tmp_path / "alice-done"
    holder = submit(alice, hold_until(flag), "H100:2")
    wait_for(lambda: running(alice, holder), DEADLINE)
    alices = [submit(alice, "x = 1", "H100") for _ in range(3)]
    mine = submit(bob, "x = 1", "H100")
    try:
        assert mine["queue_position"] == 1  # the answer to the submit
        queued = follow(bob, mine["id"], until=lambda e: e["type"] == "queued")[-1]
        assert queued["position"] == 1  # what the cell's status shows
        listed = {j["id"]: j.get("queue_position") for j in alice.jobs() + bob.jobs()}
        assert listed[mine["id"]] == 1
        assert [listed[j["id"]] for j in alices] == [2, 3, 4]
        assert [alice.job(j["id"])["queue_position"] for j in alices] == [2, 3, 4]
    finally:
        flag.touch()
    done = [finish(alice, j["id"]) for j in alices]
    first = finish(bob, mine["id"])
    assert first["state"] == "succeeded"
    assert all(first["started"] <= r["started"] for r in done[1:])


def test_a_queued_job_names_the_jobs_of_its_own_user_that_hold_its_gpus_and_no_other(
        shared: dict[str, GatewayClient], tmp_path: Path) -> None:
    """A trial's student read "queued (position 1)" without a reason: it was their own job in
    another notebook. Said when it queues, and again when the holder changes, in the very
    pass that granted the new holder (a review: there it said nothing until the next pass);
    another user's job is counted, never named."""
    alice, bob, carol = shared["alice"], shared["bob"], shared["carol"]
    first, second = tmp_path / "carol-done", tmp_path / "alice-done"
    held = submit(carol, hold_until(first), "H100:2")
    try:
        wait_for(lambda: running(carol, held), DEADLINE)
        b = submit(alice, hold_until(second), "H100:2")
        c = submit(alice, "x = 1", "H100:2")
        d = submit(bob, "x = 1", "H100")
        for who, job in ((alice, b), (alice, c), (bob, d)):
            assert wait_for(lambda who=who, job=job: who.job(job["id"]).get("waiting_why"),
                            DEADLINE) == \
                "H100: 0 of 2 free", who.job(job["id"])
        first.touch()  # carol's job ends, and alice's b takes both H100s in that pass
        wait_for(lambda: running(alice, b), DEADLINE)
        mine = f"H100: 0 of 2 free, held by your job {b['id']}"
        assert wait_for(lambda: alice.job(c["id"]).get("waiting_why") == mine, DEADLINE)
        assert bob.job(d["id"]).get("waiting_why") == "H100: 0 of 2 free"  # (not alice's)
        # carol, an admin, reads alice's reason about alice, not about herself
        assert carol.job(c["id"]).get("waiting_why") == \
            f"H100: 0 of 2 free, held by alice's job {b['id']}"
    finally:
        first.touch()
        second.touch()
    for who, job in ((alice, c), (bob, d)):
        assert finish(who, job["id"])["state"] == "succeeded"
        # never a "queued" without its reason on the way (each pass that granted another
        # job had said none, till the next pass)
        said = [e for e in follow(who, job["id"]) if e["type"] == "queued"]
        assert said and all(e.get("waiting_for") for e in said), said
    # carol, an admin, following alice's job hears its reasons about alice too
    heard = [e["waiting_for"] for e in follow(carol, c["id"]) if e.get("waiting_for")]
    assert f"H100: 0 of 2 free, held by alice's job {b['id']}" in heard, heard
    assert not any("your" in w for w in heard), heard


def test_a_waiting_job_says_which_options_its_limit_rules_out(
        shared: dict[str, GatewayClient], tmp_path: Path) -> None:
    """A load trial: bob, at 1 of his 2 GPUs, waited for an H100 while the A100s his first
    option asked for were free, and was told only that the H100s were busy, then that "no
    GPU became free"."""
    alice, bob, carol = shared["alice"], shared["bob"], shared["carol"]
    flag = tmp_path / "done"
    carol._request("PUT", "/v1/limits/bob", json={"max_gpus": 2})
    held = [submit(alice, hold_until(flag), "H100"), submit(bob, hold_until(flag), "H100")]
    try:
        for who, job in zip((alice, bob), held):
            wait_for(lambda who=who, job=job: running(who, job), DEADLINE)
        with pytest.raises(WaitExpired) as info:
            gpu_magic.run("1", "A100-80GB:2, H100", {"__name__": "__main__"}, client=bob,
                          wait=1, quiet=True)
        message = str(info.value)
        assert "'A100-80GB:2, H100' got no GPU of the simulated pool within --wait 1 s (" \
            "A100-80GB:2 would take you past your limit of 2 GPU(s) at once while your other " \
            f"jobs hold 1; H100: 0 of 2 free, held by your job {held[1]['id']} and 1 other " \
            "job); nothing ran" in message, message
    finally:
        flag.touch()
        carol._request("PUT", "/v1/limits/bob", json={})


def test_a_job_kept_from_a_free_gpu_by_a_job_ahead_says_so(
        shared: dict[str, GatewayClient], tmp_path: Path) -> None:
    """alice holds one H100 of two, bob's H100:2 waits for both and so holds the free one:
    carol's H100 waits although the pool shows one free, and says for whom, to the end."""
    alice, bob, carol = shared["alice"], shared["bob"], shared["carol"]
    flag = tmp_path / "alice-done"
    holder = submit(alice, hold_until(flag), "H100")
    try:
        wait_for(lambda: running(alice, holder), DEADLINE)
        pair = submit(bob, "x = 1", "H100:2")
        late = submit(carol, "x = 1", "H100", wait=2)
        why = "1 H100 free, held for a job ahead that waits for H100:2"
        assert wait_for(lambda: carol.job(late["id"]).get("waiting_why"), DEADLINE) == why
        h100 = next(t for t in carol.pool()["types"] if t["type"] == "H100")
        assert h100["free"] == 1 and h100["held"] == 1  # free, and said to be kept for bob
        from gpu_magic._tables import pool_text
        assert "1 (1 held for a waiting job)" in pool_text(carol.pool())
        queued = follow(carol, late["id"], until=lambda e: e.get("waiting_for") == why)
        assert queued[-1]["type"] == "queued"
        expired = finish(carol, late["id"])
        assert expired["state"] == "expired"
        assert why in expired["message"] and "nothing ran" in expired["message"]
        assert "became free" not in expired["message"]
        assert bob.job(pair["id"])["state"] == "queued"
    finally:
        flag.touch()
    assert finish(bob, pair["id"])["state"] == "succeeded"


def test_a_queued_job_hears_its_place_move_up(
        shared: dict[str, GatewayClient], tmp_path: Path) -> None:
    """The cell's status says "position 2" only while one job is ahead of it: when that one
    leaves the queue (here cancelled; started is the same pass), a new "queued" event says 1."""
    alice = shared["alice"]
    flag = tmp_path / "holder-done"
    holder = submit(alice, hold_until(flag), "H100:2")
    wait_for(lambda: running(alice, holder), DEADLINE)
    ahead = submit(alice, "x = 1", "H100")
    behind = submit(alice, "x = 2", "H100")
    try:
        first = follow(alice, behind["id"], until=lambda e: e["type"] == "queued")
        assert first[-1]["position"] == 2
        alice.cancel(ahead["id"])
        moved = follow(alice, behind["id"], after=first[-1]["seq"],
                       until=lambda e: e["type"] == "queued")
        assert moved[-1]["position"] == 1
        assert alice.job(behind["id"])["queue_position"] == 1
    finally:
        flag.touch()
    assert finish(alice, behind["id"])["state"] == "succeeded"
