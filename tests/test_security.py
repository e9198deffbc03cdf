"""Security: every route of the app needs a token, browsers from elsewhere are refused, limits
hold before anything large is read, the gateway never unpickles user data, and on a shared
gateway one user's cell cannot read the gateway's state or another user's data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from fastapi.routing import APIRoute

import gpu_magic
from gpu_magic._api import attach
from gpu_magic._client import GatewayClient
from gpu_magic.server.api import create_app
from gpu_magic.server.auth import Authenticator, User, write_private
from gpu_magic.server.backends.local import LocalBackend
from gpu_magic.server.backends.sandbox import (
    _relinkable,
    bwrap_command,
    gpu_device_files,
    python_paths,
    secret_folders,
)
from gpu_magic.server.gateway import Gateway as CoreGateway

from .conftest import Gateway, start_gateway, wait_for
from .test_gateway_http import finish, opts, submit

DEADLINE = 60.0


def test_every_route_of_the_app_needs_a_token(tmp_path: Path) -> None:
    """Enumerates the app object's own routes (not /openapi.json): a new route cannot slip in
    without authentication."""
    core = CoreGateway(LocalBackend("H100:1"), tmp_path)
    app = create_app(core, Authenticator({"t" * 43: User("me")}))
    routes = [(m, r.path) for r in app.fastapi.routes if isinstance(r, APIRoute)  # type: ignore[attr-defined]
              for m in r.methods]
    assert len(routes) >= 12

    async def probe() -> list[tuple[str, str, int, int]]:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        out = []
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as ac:
            for method, path in routes:
                url = path.replace("{digest}", "xxh3-128:" + "0" * 32).replace("{job_id}", "abc")
                url = url.replace("{name}", "someone")
                anonymous = await ac.request(method, url)
                wrong = await ac.request(method, url, headers={"Authorization": "Bearer " + "w" * 43})
                out.append((method, path, anonymous.status_code, wrong.status_code))
        return out

    for method, path, anonymous, wrong in asyncio.run(probe()):
        expected = 200 if path == "/v1/health" else 401
        assert (anonymous, wrong) == (expected, expected), (method, path)
    core.store.close()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Host": "evil.example:8765"}, 403),
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": "https://attacker.test:443"}, 403),
        ({"Origin": "http://127.0.0.1:8888"}, 200),
        ({"Origin": "http://localhost:8888"}, 200),
        ({"Host": "localhost:1234"}, 200),
    ],
)
def test_loopback_gateway_refuses_foreign_host_and_origin(gateway: Gateway, headers: dict[str, str],
                                                          status: int) -> None:
    for path, auth in (("/v1/pool", True), ("/v1/health", False)):
        h = dict(headers, **({"Authorization": f"Bearer {gateway.token}"} if auth else {}))
        resp = httpx.get(gateway.url + path, headers=h)
        assert resp.status_code == status, (path, resp.text)
        if status == 403:
            assert resp.json()["error"] in ("forbidden_host", "forbidden_origin")


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("limited"), "--max-blob-bytes", "100000",
                       "--max-job-bytes", "150000", "--max-jobs-per-user", "1",
                       "--max-gpus-per-user", "1")
    yield gw
    gw.stop()


def test_blob_over_the_limit_is_refused_from_its_header(limited: Gateway) -> None:
    data = os.urandom(200_000)
    digest = gpu_magic._payload.digest(data)
    resp = httpx.put(f"{limited.url}/v1/blobs/{digest}", content=data,
                     headers={"Authorization": f"Bearer {limited.token}"})
    assert resp.status_code == 413
    assert resp.json()["message"] == ("the blob is 195.3 KiB; this gateway takes at most "
                                      "97.7 KiB per blob (--max-blob-bytes)")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams
        for i in range(0, len(data), 10_000):
            yield data[i:i + 10_000]

    resp = httpx.put(f"{limited.url}/v1/blobs/{digest}", content=chunks(),
                     headers={"Authorization": f"Bearer {limited.token}"})
    assert resp.status_code == 413
    with limited.client() as c:
        assert c.missing([digest]) == [digest]  # nothing half-stored


def test_job_inputs_over_the_limit_are_refused(limited: Gateway) -> None:
    with limited.client() as c:
        rng = np.random.default_rng(0)  # arrays travel out of band, one blob each
        values = {"a": rng.bytes(90_000), "b": rng.bytes(90_000)}
        values = {k: np.frombuffer(v, dtype=np.uint8) for k, v in values.items()}
        with pytest.raises(gpu_magic.GatewayError) as info:
            submit(c, "len(a) + len(b)", "H100", values=values)
    assert info.value.status == 413
    assert "the job's inputs are 175." in str(info.value) and "at most 146.5 KiB" in str(info.value)


def test_per_user_job_and_gpu_limits(limited: Gateway) -> None:
    with limited.client() as c:
        with pytest.raises(gpu_magic.GatewayError) as info:
            submit(c, "1", "H100:2")
        assert info.value.status == 429
        assert str(info.value) == (
            "every option of 'H100:2' asks for more than your limit of 1 GPU(s) at once (this "
            "gateway's limit for every user, --max-gpus-per-user); ask for fewer.")
        first = submit(c, "import time\ntime.sleep(30)", "H100", background=True)
        try:
            with pytest.raises(gpu_magic.GatewayError) as info:
                submit(c, "1", "H100")
            assert info.value.status == 429
            assert str(info.value) == (
                "you have 1 job queued or running; your limit is 1 at once (this gateway's "
                "limit for every user, --max-jobs-per-user). Wait for one to finish or cancel "
                "one (%gpu jobs, %gpu cancel ID).")
            # both limits refuse this one: both are named, not one after the other
            with pytest.raises(gpu_magic.GatewayError) as info:
                submit(c, "1", "H100:2, A100-80GB:4")
            assert info.value.status == 429
            assert str(info.value).endswith(
                "cancel one (%gpu jobs, %gpu cancel ID). Also, every option of 'H100:2, "
                "A100-80GB:4' asks for more than your limit of 1 GPU(s) at once (this gateway's "
                "limit for every user, --max-gpus-per-user); ask for fewer."), info.value
        finally:
            c.cancel(first["id"])
            finish(c, first["id"])


def test_cell_too_large_is_refused(gateway: Gateway) -> None:
    with gateway.client() as c:
        with pytest.raises(gpu_magic.GatewayError) as info:
            submit(c, "x = 1\n" + "#" * 1_000_000, "H100")
    assert info.value.status == 413 and "takes at most 1000000" in str(info.value)


@pytest.mark.parametrize("char", ["é", "😀"])
def test_a_cell_within_the_character_limit_is_taken_however_json_writes_it(
        gateway: Gateway, char: str) -> None:
    # JSON writes a character as \uXXXX (a character outside the BMP as two): a legal cell of
    # 900,000 'é' was refused as a request of 5.2 MiB
    source = "#" + char * 899_000
    headers = {"Authorization": f"Bearer {gateway.token}", "Content-Type": "application/json"}
    body = {"source": source, "spec": opts("H100"),
            "inputs": gpu_magic._payload.pack_inputs({}, None, None).manifest,
            "input_names": [], "outputs": [], "deleted": [], "has_value": False}
    with httpx.Client(base_url=gateway.url, timeout=120) as http:
        resp = http.post("/v1/jobs", content=json.dumps(body).encode(), headers=headers)
        assert resp.status_code == 201, resp.text[:300]
    with gateway.client() as c:
        assert finish(c, resp.json()["id"])["state"] == "succeeded"


@pytest.mark.parametrize("size, status", [(14 << 20, 413), (1000, 422)])
def test_request_without_a_length_is_capped_like_one_with_it(gateway: Gateway, size: int,
                                                             status: int) -> None:
    # a chunked body gives no Content-Length to refuse it by: it is read up to the cap only
    def body() -> Any:
        for _ in range(size >> 16):
            yield b"x" * (1 << 16)
        yield b"x" * (size & 0xFFFF)

    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        resp = http.post("/v1/jobs", content=body(), headers={
            "Authorization": f"Bearer {gateway.token}", "Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    if status == 413:
        assert resp.json()["error"] == "too_large" and "at most" in resp.json()["message"]


class _Marker:
    """Unpickling this appends who unpickled it to a file: the gateway must never do so."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        code = (f"import os; open({self.path!r}, 'a').write("
                "f\"{os.getpid()} {'GPU_MAGIC_JOB_ID' in os.environ}\\n\")")
        return (exec, (code,))


def test_gateway_never_unpickles_user_data(gateway: Gateway, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled-by"
    with gateway.client() as c:
        job = submit(c, "y = 1", "H100", values={"x": _Marker(str(marker))}, outputs=["y"])
        assert finish(c, job["id"])["state"] == "succeeded"
    lines = marker.read_text().splitlines()
    assert lines, "the runner should have unpickled the input"
    assert all(line.endswith(" True") for line in lines)  # only inside a runner
    assert str(gateway.proc.pid) not in {line.split()[0] for line in lines}


def _tokens(path: Path, **users: Any) -> dict[str, str]:
    tokens = {u: secrets.token_urlsafe(32) for u in users}
    path.write_text(json.dumps({u: ({"token": t, **users[u]} if users[u] else t)
                                for u, t in tokens.items()}))
    path.chmod(0o600)
    return tokens


def _alice_and_bob(tmp_path: Path, *extra: str, **kw: Any) -> tuple[Gateway, dict[str, str]]:
    """A gateway alice and bob share (so, sandboxed), and their tokens."""
    tokens_file = tmp_path / "tokens.json"
    tokens = _tokens(tokens_file, alice={}, bob={})
    return start_gateway(tmp_path, "--tokens-file", str(tokens_file), *extra, **kw), tokens


def _probe_and_stop(gw: Gateway, token: str, probe: str) -> Any:
    """The value of cell ``probe`` run by ``token``'s user; the gateway stopped after it."""
    try:
        with GatewayClient(gw.url, token) as user:
            return gpu_magic.run(probe, "H100", {"__name__": "__main__"}, client=user,
                                 quiet=True)
    finally:
        gw.stop()


needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="needs bubblewrap (make test installs it)")


@needs_bwrap
def test_shared_gateway_isolates_runners(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    tokens = _tokens(tokens_file, alice={}, bob={})
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file))
    try:
        bob = GatewayClient(gw.url, tokens["bob"])
        alice = GatewayClient(gw.url, tokens["alice"])
        secret = np.frombuffer(os.urandom(100_000), np.uint8)  # out of band: its own blob
        ns: dict[str, Any] = {"__name__": "__main__", "bobs": secret}
        gpu_magic.run("bobs_result = bobs[:10]", "H100", ns, client=bob, quiet=True)
        bob_blob = gpu_magic._payload.digest(secret.data).replace(":", "-")
        state = gw.state_dir
        probe = f"""
import os
seen = {{}}
for name, path in {{
    "tokens file": {str(tokens_file)!r},
    "gateway database": {str(state / "gateway.sqlite3")!r},
    "bob's blob": {str(state / "blobs" / "bob" / bob_blob)!r},
    "bob's jobs": {str(state / "jobs")!r},
    "blob reserve": {str(state / "reserve")!r},
}}.items():
    try:
        if os.path.isdir(path):
            seen[name] = os.listdir(path)
        else:
            with open(path, "rb") as f:
                seen[name] = len(f.read())
    except OSError as exc:
        seen[name] = type(exc).__name__
mine = len(own)
seen
"""
        own = np.frombuffer(os.urandom(100_000), np.uint8)
        space: dict[str, Any] = {"__name__": "__main__", "own": own}
        seen = gpu_magic.run(probe, "H100", space, client=alice, quiet=True)
        assert space["mine"] == len(own)  # its own inputs are there
        assert seen["tokens file"] in (0, "PermissionError")  # an unreadable stand-in
        assert seen["gateway database"] == "FileNotFoundError"
        assert seen["bob's blob"] == "FileNotFoundError"
        # files written ahead for large blobs are the gateway's: a runner that kept one open
        # could read what another user writes into it later
        assert seen["blob reserve"] == "FileNotFoundError"
        # the jobs folder shows alice's own job at most, never bob's
        alice_jobs = {j["id"] for j in alice.jobs()}
        listed = seen["bob's jobs"]
        assert listed == "FileNotFoundError" or set(listed) <= alice_jobs
        assert not {j["id"] for j in bob.jobs()} & set(listed if isinstance(listed, list) else [])
        bob.close()
        alice.close()
    finally:
        gw.stop()


@needs_bwrap
def test_a_sandboxed_cell_sees_none_of_the_gateway_account_s_own_folders(tmp_path: Path) -> None:
    # a trial: an instructor's shared gateway, run under their own account, let a student's
    # cell read the instructor's personal gateway's runtime file (its token) in their home,
    # and so run code outside any sandbox
    home, run_dir = tmp_path / "home", tmp_path / "run"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
    run_dir.mkdir()
    (run_dir / "jpserver-1.json").write_text('{"token": "personal"}')
    # (a red team: Jupyter's runtime folder under a JUPYTER_DATA_DIR outside the home)
    data_dir = tmp_path / "jupyter-data"
    (data_dir / "runtime").mkdir(parents=True)
    (data_dir / "runtime" / "gpu-magic-gateway-vm.json").write_text('{"token": "personal"}')
    tokens_file = tmp_path / "tokens.json"
    tokens = _tokens(tokens_file, alice={}, bob={})
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(run_dir), "JUPYTER_DATA_DIR": str(data_dir)}
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file), env=env)
    # (a red team: with HOME set elsewhere, as systemd's Environment= or sudo -E do, the
    # account's own home, root's personal gateway token in it, stayed readable)
    account = pwd.getpwuid(os.geteuid()).pw_dir
    # what the runner's Python imports from is shown again inside it (a pyenv under /root)
    needed = {Path(p).relative_to(account).parts[0]
              for p in python_paths(sys.executable, {**os.environ, **env})
              if p.startswith(account.rstrip("/") + "/")}
    probe = f"""
import os, numpy
seen = {{}}
for name, path in {{"key": {str(home / ".ssh" / "id_ed25519")!r},
                   "runtime file": {str(run_dir / "jpserver-1.json")!r},
                   "jupyter runtime": {str(data_dir / "runtime" / "gpu-magic-gateway-vm.json")!r},
                   }}.items():
    try:
        seen[name] = open(path).read()
    except OSError as exc:
        seen[name] = type(exc).__name__
seen["home"] = sorted(os.listdir(os.path.expanduser("~")))
seen["account home"] = os.listdir({account!r})
try:  # (a download into ~/.cache would fill the memory: read-only, as before)
    open(os.path.expanduser("~/.cache"), "w")
except OSError as exc:
    seen["write"] = type(exc).__name__
seen
"""
    seen = _probe_and_stop(gw, tokens["alice"], probe)
    assert set(seen.pop("account home")) <= needed < set(os.listdir(account))
    assert seen == {"key": "FileNotFoundError", "runtime file": "FileNotFoundError",
                    "jupyter runtime": "FileNotFoundError", "home": [], "write": "OSError"}, seen


def test_secret_files_are_hidden_with_their_folder_where_it_holds_nothing_else(
        tmp_path: Path) -> None:
    own = tmp_path / "gpu-magic"  # the tokens file, key and certificate, and leftovers
    (own / ".git").mkdir(parents=True)
    for name in ("tokens.json", "key.pem", "cert.pem", "tokens.json~", ".tokens.json.swp"):
        (own / name).write_text("x")
    shared = tmp_path / "course"  # the tokens file beside what cells read
    shared.mkdir()
    for name in ("tokens.json", "data.csv", "privkey1.pem"):
        (shared / name).write_text("x")
    dotted = tmp_path / "dotted"  # a dot-folder may hold data too (a red team's was hidden)
    (dotted / ".data").mkdir(parents=True)
    (dotted / "tokens.json").write_text("x")
    named = tmp_path / "named"  # and a folder named as a secret begins (a review's)
    (named / "tokens_course_data").mkdir(parents=True)
    (named / "tokens").write_text("x")
    home = tmp_path / "home"  # already hidden whole: nothing more to do...
    (home / "project" / "secret").mkdir(parents=True)
    (home / "tokens.json").write_text("x")
    # ...but for what a folder shown again there holds (a project on PYTHONPATH, a red team)
    (home / "project" / "helpers.py").write_text("x")
    (home / "project" / "tokens.json").write_text("x")
    (home / "project" / "secret" / "key.pem").write_text("x")
    live = tmp_path / "live"  # a link to a key elsewhere: its folder and its target's
    live.mkdir()
    (live / "key.pem").symlink_to(shared / "privkey1.pem")
    (tmp_path / "v1").mkdir()  # a link to the folder, as a release's `current`
    (tmp_path / "v1" / "tokens.json").write_text("x")
    (tmp_path / "current").symlink_to(tmp_path / "v1")
    files = [own / "tokens.json", own / "key.pem", own / "cert.pem", shared / "tokens.json",
             dotted / "tokens.json", named / "tokens", home / "tokens.json", home / "project" / "tokens.json",
             home / "project" / "secret" / "key.pem", live / "key.pem",
             shared / "privkey1.pem", tmp_path / "current" / "tokens.json"]
    folders, exposed = secret_folders(files, [str(home)], [str(home / "project")])
    assert folders == [str(own), str(home / "project" / "secret"), str(live),
                       str(tmp_path / "v1")], folders
    assert list(exposed) == [shared / "tokens.json", dotted / "tokens.json", named / "tokens",
                             home / "project" / "tokens.json", shared / "privkey1.pem",
                             tmp_path / "current" / "tokens.json"], exposed
    assert exposed[shared / "tokens.json"].startswith("it shares its folder with other files")
    assert exposed[tmp_path / "current" / "tokens.json"].startswith(
        f"it is reached through a link ({tmp_path / 'current'} leads to {tmp_path / 'v1'})")
    assert _relinkable(str(tmp_path / "current")) and not _relinkable(str(tmp_path / "v1"))
    if os.path.islink("/var/run"):  # (the system's own links are not a release's: a review)
        assert not _relinkable("/var/run/gpu-magic")


@needs_bwrap
def test_a_running_cell_never_reads_the_tokens_file_after_it_is_replaced(
        tmp_path: Path) -> None:
    """A red team: a cover over the tokens file alone was dropped from running sandboxes when
    an admin replaced the file (as editors and write_private do: a new file renamed over it),
    and the running cell read every user's token. Kept in a folder of its own, the folder
    is what is hidden, and a rename inside it changes nothing a cell sees."""
    secret = tmp_path / "secret"
    secret.mkdir()
    tokens_file = secret / "tokens.json"
    tokens = _tokens(tokens_file, alice={}, bob={})
    go = tmp_path / "go"
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file))
    probe = f"""
import os, time
open("started", "w").close()
while not os.path.exists({str(go)!r}):
    time.sleep(0.02)
try:
    seen = open({str(tokens_file)!r}).read()
except OSError as exc:
    seen = type(exc).__name__
seen
"""
    out: dict[str, Any] = {}

    def cell() -> None:
        with GatewayClient(gw.url, tokens["alice"]) as alice:
            out["seen"] = gpu_magic.run(probe, "H100", {"__name__": "__main__"}, client=alice,
                                        quiet=True)
    import threading

    thread = threading.Thread(target=cell)
    thread.start()
    try:
        wait_for(lambda: list(gw.state_dir.glob("jobs/*/*/started")), DEADLINE)
        added = dict(json.loads(tokens_file.read_text()), carol="c" * 43)
        write_private(tokens_file, json.dumps(added))
        go.touch()
        thread.join(DEADLINE)
    finally:
        go.touch()
        thread.join(DEADLINE)
        gw.stop()
    assert out["seen"] == "FileNotFoundError", out
    log = (tmp_path / "gateway.log").read_text()
    assert "shares its folder" not in log, log


@needs_bwrap
def test_a_tokens_file_beside_other_files_is_warned_of_at_start(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("course notes")
    gw, _ = _alice_and_bob(tmp_path)
    gw.stop()
    log = (tmp_path / "gateway.log").read_text()
    assert (f"warning: a cell may read {tmp_path / 'tokens.json'} while it runs: it shares its "
            "folder with other files") in log, log
    # (the runtime file, written once before any cell, is not replaced under them)
    assert not [ln for ln in log.splitlines() if "a cell may read" in ln and "runtime-" in ln]


@needs_bwrap
def test_a_tokens_file_in_a_folder_python_imports_from_is_warned_of(tmp_path: Path) -> None:
    # a red team: a project folder on PYTHONPATH, in the account's home (hidden, then shown
    # again for Python), held the tokens file: a rename over it showed it to a running cell,
    # and serve said nothing
    project = tmp_path / "home" / "project"
    project.mkdir(parents=True)
    (project / "helpers.py").write_text("SCALE = 2\n")
    tokens = _tokens(project / "tokens.json", alice={}, bob={})
    gw = start_gateway(tmp_path, "--tokens-file", str(project / "tokens.json"),
                       env={"HOME": str(tmp_path / "home"), "PYTHONPATH": str(project)})
    try:
        with GatewayClient(gw.url, tokens["alice"]) as alice:  # (and cells still import)
            assert gpu_magic.run("from helpers import SCALE\nSCALE", "H100",
                                 {"__name__": "__main__"}, client=alice, quiet=True) == 2
    finally:
        gw.stop()
    log = (tmp_path / "gateway.log").read_text()
    assert f"warning: a cell may read {project / 'tokens.json'} while it runs" in log, log


@needs_bwrap
def test_a_secrets_folder_inside_a_folder_python_imports_from_stays_hidden(
        tmp_path: Path) -> None:
    # its own folder is hidden after the folders shown again for Python, which hold it
    project = tmp_path / "home" / "project"
    (project / "secret").mkdir(parents=True)
    (project / "helpers.py").write_text("SCALE = 2\n")
    tokens_file = project / "secret" / "tokens.json"
    tokens = _tokens(tokens_file, alice={}, bob={})
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file),
                       env={"HOME": str(tmp_path / "home"), "PYTHONPATH": str(project)})
    probe = f"""
from helpers import SCALE
try:
    seen = open({str(tokens_file)!r}).read()
except OSError as exc:
    seen = type(exc).__name__
SCALE, seen
"""
    got = _probe_and_stop(gw, tokens["alice"], probe)
    assert got == (2, "FileNotFoundError"), got
    assert "a cell may read" not in (tmp_path / "gateway.log").read_text()


@needs_bwrap
def test_a_sandboxed_cell_that_closes_its_event_pipe_does_not_outlive_its_job(
        tmp_path: Path) -> None:
    # a red team: the job ended "lost" and its GPUs went to the next job while the cell ran
    # on in its sandbox, past its --timeout, an admin's cancel and its user's GPU limit
    from .test_gateway_http import all_free, finish, submit

    cell = ("import os, stat, time\nprint(os.getpid(), flush=True)\ntime.sleep(0.5)\n"
            "for fd in map(int, os.listdir('/proc/self/fd')):\n"
            "    try:\n"
            "        if stat.S_ISFIFO(os.fstat(fd).st_mode):\n"
            "            os.close(fd)\n"
            "    except OSError:\n"
            "        pass\n"
            "time.sleep(120)")
    gw, tokens = _alice_and_bob(tmp_path, simulate="T4:1")
    try:
        with GatewayClient(gw.url, tokens["bob"]) as bob:
            victim = submit(bob, cell, "T4", background=True)
            assert any(ev["type"] == "stdout" for ev in bob.events(victim["id"]))
            # (its pid is the sandbox's own: found by the job id in its environment)
            mark = f"GPU_MAGIC_JOB_ID={victim['id']}".encode()

            def alive() -> list[int]:
                found = []
                for p in psutil.process_iter():
                    try:
                        environ = Path(f"/proc/{p.pid}/environ").read_bytes()
                        if mark in environ and p.status() != "zombie":
                            found.append(p.pid)
                    except (OSError, psutil.Error):
                        pass
                return found

            assert alive()
            ended = finish(bob, victim["id"])
            assert ended["state"] == "lost"
            assert alive() == []  # gone before its GPU is anyone else's
            # and said why: a SIGKILL out of nowhere read as a crash (a review)
            assert "the cell closed the runner's event pipe and went on; it was stopped 10 s " \
                "later" in ended["message"], ended
            wait_for(lambda: all_free(bob), 60)
    finally:
        gw.stop()


@needs_bwrap
def test_a_file_a_sandboxed_cell_leaves_in_its_folder_is_said_to_go_with_the_job(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # an ML trial: torch.save(..., 'ckpt.pt') in a cell of a class gateway printed its path,
    # and the file was gone when the job ended, without a word
    gw, tokens = _alice_and_bob(tmp_path)
    try:
        with GatewayClient(gw.url, tokens["alice"]) as alice:
            ns: dict[str, Any] = {"__name__": "__main__"}
            gpu_magic.run("open('ckpt.pt', 'wb').write(b'weights')\nx = 1", "H100", ns,
                          client=alice, quiet=True)
            assert ns["x"] == 1
            err = capsys.readouterr().err
            assert re.search(r"\[gpu_magic\] the cell wrote ckpt\.pt in its folder on the GPU "
                             r"machine \(/\S+\), which is removed when the job ends", err), err
            assert "data = open('ckpt.pt', 'rb').read()" in err
            # and the next cell that looks for it is told where it went (a trial: a bare
            # FileNotFoundError)
            with pytest.raises(FileNotFoundError) as info:
                gpu_magic.run("w = open('ckpt.pt', 'rb').read()", "H100", ns, client=alice,
                              quiet=True)
            shown = "\n".join(info.value._render_traceback_())  # type: ignore[attr-defined]
            assert "if an earlier %%gpu cell wrote 'ckpt.pt', it went with that job" in shown
            # wherever the cell went after (a review: a chdir kept it quiet)
            gpu_magic.run("import os\nos.makedirs('runs')\nos.chdir('runs')\n"
                          "open('b.pt', 'wb').write(b'y')", "H100", ns, client=alice, quiet=True)
            err = capsys.readouterr().err
            assert "the cell wrote runs/ in its folder" in err, err
            assert "bring what you need back as variables" in err
            gpu_magic.run("import tempfile\ny = 2", "H100", ns, client=alice, quiet=True)
            assert "the cell wrote" not in capsys.readouterr().err  # (nothing left: no word)
            # nor can it write beside its folder, into the state directory's stand-in (memory)
            where = str(gw.state_dir / "x")
            wrote = gpu_magic.run(f"try:\n    open({where!r}, 'w').write('x')\n"
                                  "    r = 'wrote'\nexcept OSError as e:\n    r = type(e).__name__\n"
                                  "r", "H100", ns, client=alice, quiet=True)
            assert wrote == "OSError", wrote
    finally:
        gw.stop()


@needs_bwrap
def test_a_shared_gateway_s_cells_get_only_the_environment_they_need(tmp_path: Path) -> None:
    # a red team: cells read the gateway account's AWS and webhook keys from its environment
    secrets_and_not = {"AWS_SECRET_ACCESS_KEY": "not-for-students", "DATA_ROOT": "/data",
                       "LC_ALL": "C.UTF-8", "WANDB_MODE": "offline",
                       "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                       "HF_TOKEN": "hf_not_for_students"}
    gw, tokens = _alice_and_bob(tmp_path, "--pass-env", "DATA_ROOT",
                                "--pass-env", "WANDB_MODE",  # (each flag adds: a review)
                                env=secrets_and_not)
    try:
        with GatewayClient(gw.url, tokens["alice"]) as alice:
            seen = gpu_magic.run(
                "import os\nwith open('/proc/1/environ', 'rb') as f:\n    first = f.read()\n"
                "dict(os.environ), first", "H100", {"__name__": "__main__"}, client=alice,
                quiet=True)
    finally:
        gw.stop()
    env, sandbox = seen
    assert "AWS_SECRET_ACCESS_KEY" not in env and b"not-for-students" not in sandbox
    assert "HF_TOKEN" not in env
    assert env["DATA_ROOT"] == "/data" and env["LC_ALL"] == "C.UTF-8"  # (passed, and a locale)
    assert env["WANDB_MODE"] == "offline"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"  # (the GPU stack's)
    assert env["PATH"] and env["GPU_MAGIC_GRANT"]


@needs_bwrap
def test_a_certfile_that_holds_the_key_is_hidden_from_cells(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --certfile may hold the private key too (then no --keyfile): only --keyfile was hidden
    import trustme

    from gpu_magic import _client

    ca = trustme.CA()
    both, bundle = tmp_path / "both.pem", tmp_path / "ca.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(both))
    ca.cert_pem.write_to_path(str(bundle))
    tokens_file = tmp_path / "tokens.json"
    tokens = _tokens(tokens_file, alice={}, bob={})
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file), "--certfile", str(both))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.setattr(_client, "_SSL", None)  # the context is built once per process
    try:
        probe = (f"try:\n    seen = len(open({str(both)!r}).read())\n"
                 "except OSError as exc:\n    seen = type(exc).__name__\nseen")
        with GatewayClient(gw.url, tokens["alice"], same_host=False) as alice:
            seen = gpu_magic.run(probe, "H100", {"__name__": "__main__"}, client=alice,
                                 quiet=True)
        assert seen in (0, "PermissionError"), seen  # an unreadable stand-in
    finally:
        gw.stop()
        monkeypatch.setattr(_client, "_SSL", None)


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="only under root does bwrap hand cells capabilities")
def test_a_sandboxed_cell_has_no_capabilities_to_undo_its_sandbox(tmp_path: Path) -> None:
    """A gateway run as root (a container) must not hand its cells root's capabilities: with
    CAP_SYS_ADMIN a cell unmounts the empty stand-ins and reads the tokens file and everyone's
    blobs. (What root may read outside them, the gateway says at start.)"""
    tokens_file = tmp_path / "tokens.json"
    tokens = _tokens(tokens_file, alice={}, bob={})
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file))
    try:
        alice = GatewayClient(gw.url, tokens["alice"])
        probe = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
caps = [int(line.split()[1], 16) for line in open("/proc/self/status")
        if line.startswith(("CapEff:", "CapPrm:", "CapAmb:"))]
undone = [p for p in ({str(tokens_file)!r}, {str(gw.state_dir)!r})
          if libc.umount2(p.encode(), 2) == 0]  # MNT_DETACH
try:
    tokens = len(open({str(tokens_file)!r}).read())
except OSError as exc:
    tokens = type(exc).__name__
del libc
(caps, undone, tokens)
"""
        caps, undone, read = gpu_magic.run(probe, "H100", {"__name__": "__main__"},
                                           client=alice, quiet=True)
        assert undone == [] and read in (0, "PermissionError")
        assert caps == [0, 0, 0]
        alice.close()
        assert ("note: running as root, so sandboxed cells run as root too"
                in (tmp_path / "gateway.log").read_text())
    finally:
        gw.stop()


@needs_bwrap
def test_a_shared_gateway_started_with_relative_paths_runs_and_hides_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `gpu-magic serve --tokens-file tokens.json --state-dir state`, as the README writes it:
    # the sandbox named these paths inside its new root, where they did not resolve, and every
    # cell was lost ("bwrap: Can't create file at tokens.json")
    monkeypatch.chdir(tmp_path)
    tokens = _tokens(tmp_path / "tokens.json", alice={}, bob={})
    link = tmp_path / "users.json"
    link.symlink_to("tokens.json")
    gw = start_gateway(tmp_path, "--tokens-file", "users.json", state_dir=Path("state"))
    try:
        with GatewayClient(gw.url, tokens["alice"]) as alice:
            ns: dict[str, Any] = {"__name__": "__main__"}
            gpu_magic.run(f"import os\nseen = {{}}\n"
                          f"for p in {[str(link), str(tmp_path / 'tokens.json')]!r}:\n"
                          "    try:\n        seen[p] = len(open(p).read())\n"
                          "    except OSError as exc:\n        seen[p] = type(exc).__name__",
                          "H100", ns, client=alice, quiet=True)
        # the file is hidden both under the name given and where the link leads
        assert set(ns["seen"].values()) <= {0, "PermissionError"}, ns["seen"]
        # a sandboxed runner killed by a signal is said to be, as an unsandboxed one
        with GatewayClient(gw.url, tokens["alice"]) as alice:
            with pytest.raises(gpu_magic.RunnerLost, match="killed by signal SIGKILL"):
                gpu_magic.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "H100",
                              {"__name__": "__main__"}, client=alice, quiet=True)
    finally:
        gw.stop()


@needs_bwrap
def test_a_sandboxed_cell_has_a_writable_scratch_folder_and_no_warnings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the sandbox is read-only outside the job's folder, the home folder too: IPython,
    # matplotlib and tempfile warned on every cell that they fell back to a temporary folder
    tokens_file = tmp_path / "tokens.json"
    tokens = _tokens(tokens_file, alice={}, bob={})
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file))
    try:
        with GatewayClient(gw.url, tokens["alice"]) as alice:
            ns: dict[str, Any] = {"__name__": "__main__"}
            gpu_magic.run("import tempfile, matplotlib.pyplot\n"
                          "with tempfile.NamedTemporaryFile() as f:\n"
                          "    f.write(b'x')\n    where = f.name",
                          "H100", ns, client=alice, quiet=True)
        assert ns["where"].startswith(str(gw.state_dir))  # the job's own folder
        err = capsys.readouterr().err
        assert "not a writable location" not in err and "Matplotlib" not in err, err
    finally:
        gw.stop()


@needs_bwrap
def test_a_sandboxed_cell_can_neither_change_its_stored_result_nor_leave_files(
        tmp_path: Path) -> None:
    # a result file the cell still held open was moved into the store, then rewritten
    # through that descriptor after its check; and what a cell wrote in its folder stayed
    # on the gateway's disk for the retention period (days)
    tokens_file = tmp_path / "tokens.json"
    tokens = _tokens(tokens_file, alice={}, bob={})
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file))
    try:
        with GatewayClient(gw.url, tokens["alice"]) as alice:
            cell = '''
import os, sys, threading, time
from gpu_magic._payload import digest
em = None
for f in sys._current_frames().values():
    while f is not None and em is None:
        em = getattr(f.f_locals.get("self"), "emitter", None)
        f = f.f_back
folder = os.path.dirname(os.environ["TMPDIR"])
open(os.path.join(folder, "leftover.bin"), "wb").write(b"x" * 1000)
content = b"checked " * 100_000
d = digest(memoryview(content))
out = os.path.join(folder, "out")
os.makedirs(out, exist_ok=True)
fd = os.open(os.path.join(out, d.replace(":", "-")), os.O_RDWR | os.O_CREAT, 0o600)
os.write(fd, content)
em.emit({"type": "result", "blob": d, "buffers": [], "names": []}, always=True)
time.sleep(2)
os.pwrite(fd, b"SWAPPED!", 0)
time.sleep(0.5)
'''
            job = submit(alice, cell, "H100", timeout=60)
            finish(alice, job["id"])
            content = b"checked " * 100_000
            d = gpu_magic._payload.digest(memoryview(content))
            assert bytes(alice.download(d)) == content  # as checked, not as changed later
            wait_for(lambda: not (gw.state_dir / "jobs" / job["id"] / "attempt-1").exists(),
                     DEADLINE)
    finally:
        gw.stop()


@needs_bwrap
def test_a_sandboxed_result_over_the_limit_leaves_nothing_in_the_store(tmp_path: Path) -> None:
    # the copy out of the sandbox stopped at the limit and left its partial file behind:
    # every later try of the cell then failed with "File exists"
    tokens_file = tmp_path / "tokens.json"
    tokens = _tokens(tokens_file, alice={}, bob={})
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file), "--max-blob-bytes",
                       str(10 << 20))
    try:
        with GatewayClient(gw.url, tokens["alice"]) as alice:
            for _ in range(2):
                with pytest.raises(gpu_magic.GpuMagicError,
                                   match="takes at most 10.0 MiB per blob.*bring back less"):
                    gpu_magic.run("import numpy as np\ny = np.full(1_500_000, 7.0)", "H100",
                                  {"__name__": "__main__"}, client=alice, quiet=True)
        assert not [p for p in (gw.state_dir / "blobs").rglob("*") if p.name.endswith(".adopt")]
    finally:
        gw.stop()


def test_shared_gateway_without_isolation_refuses_to_start(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    _tokens(tokens_file, alice={}, bob={})
    with pytest.raises(RuntimeError, match="serves 2 users but would run their cells without "
                                           "isolation"):
        start_gateway(tmp_path, "--tokens-file", str(tokens_file), "--isolation", "none")


def test_non_loopback_bind_needs_tokens_file_and_tls(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="with a single owner token"):
        start_gateway(tmp_path, "--host", "0.0.0.0")
    tokens_file = tmp_path / "tokens.json"
    _tokens(tokens_file, alice={})
    with pytest.raises(RuntimeError, match="without TLS"):
        start_gateway(tmp_path, "--host", "0.0.0.0", "--tokens-file", str(tokens_file))


def test_a_job_held_by_the_user_s_own_gpu_limit_says_so(tmp_path: Path) -> None:
    # GPUs are free, but alice's other job holds the one GPU she may use at once: "queued"
    # and "no GPU became free" would both be untrue
    tokens_file = tmp_path / "tokens.json"
    tokens = _tokens(tokens_file, alice={"max_gpus": 1})
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file), "--isolation", "none",
                       "--force")
    try:
        with GatewayClient(gw.url, tokens["alice"]) as alice:
            first = gpu_magic.run("import time\ntime.sleep(30)", "H100", {"__name__": "__main__"},
                                  client=alice, quiet=True, background=True)
            with pytest.raises(gpu_magic.WaitExpired) as info:
                gpu_magic.run("1", "H100", {"__name__": "__main__"}, client=alice, quiet=True,
                              wait=2)
            assert "your other jobs hold 1 of the 1 GPU(s) your limit lets you use at once" \
                in str(info.value)
            assert "became free" not in str(info.value)
            queued = [e for j in alice.jobs() if j["state"] == "expired"
                      for e in alice.events(j["id"]) if e["type"] == "queued"]
            assert any("your other jobs hold" in (e.get("held") or "") for e in queued)
            first.cancel()
            # an option over her limit is dropped, and said, not passed over in silence
            job = gpu_magic.run("1", "H100:2, A100-80GB", {"__name__": "__main__"},
                                client=alice, quiet=True, background=True)
            job.wait(timeout=DEADLINE)
            assert job.grant["gpu_type"] == "A100-80GB"
            assert job._job.state.dropped == [{
                "option": "H100:2",
                "reason": "asks for more than your limit of 1 GPU(s) at once"}]
            # her limit is her own, from the tokens file: not "this gateway allows"
            with pytest.raises(gpu_magic.GatewayError) as refusal:
                gpu_magic.run("1", "H100:2", {"__name__": "__main__"}, client=alice, quiet=True)
            assert "your limit of 1 GPU(s) at once (set for you in the gateway's tokens file)" \
                in str(refusal.value)
    finally:
        gw.stop()


@contextlib.contextmanager
def _bob_behind_alice(tmp_path: Path) -> Iterator[tuple[Any, Any, Any, dict[str, Any]]]:
    """A class gateway where bob may hold 2 GPUs (set by carol, the admin) and alice's job
    holds both H100s; yields alice's, bob's and carol's clients and alice's job."""
    from .conftest import start_class_gateway

    gw, tokens = start_class_gateway(tmp_path)
    try:
        with gw.client(tokens["alice"]) as alice, gw.client(tokens["bob"]) as bob, \
                gw.client(tokens["carol"]) as carol:
            carol._request("PUT", "/v1/limits/bob", json={"max_gpus": 2})
            first = submit(alice, "import time\ntime.sleep(60)", "H100:2")
            wait_for(lambda: alice.job(first["id"])["state"] == "running")
            yield alice, bob, carol, first
    finally:
        gw.stop()


def test_a_queued_job_a_lowered_limit_rules_out_fails_at_once(tmp_path: Path) -> None:
    # it stayed queued for ever, said to wait for "0 of the 1 GPU(s) your limit lets you use"
    with _bob_behind_alice(tmp_path) as (alice, bob, carol, first):
        job = submit(bob, "1", "H100:2")
        other = submit(bob, "1", "H100:2, H100")
        assert bob.job(job["id"])["state"] == bob.job(other["id"])["state"] == "queued"
        carol._request("PUT", "/v1/limits/bob", json={"max_gpus": 1})
        done = wait_for(lambda: (r := bob.job(job["id"]))["state"] != "queued" and r, 15)
        assert done["state"] == "failed"
        assert done["message"] == (
            "every option of 'H100:2' asks for more than your limit of 1 GPU(s) at once "
            "(set for you by an admin); ask for fewer. Your limit was changed while this "
            "job waited in the queue; nothing ran.")
        # one with an option the new limit leaves waits for it, and says what it dropped
        waiting = bob.job(other["id"])
        assert waiting["state"] == "queued" and waiting["options"] == ["H100"]
        assert waiting["dropped"] == [
            {"option": "H100:2", "reason": "asks for more than your limit of 1 GPU(s) at once"}]
        alice.cancel(first["id"])
        assert finish(bob, other["id"])["state"] == "succeeded"


def test_an_option_dropped_for_a_limit_comes_back_when_an_admin_raises_it(
        tmp_path: Path) -> None:
    # dropped at submit, it stayed dropped: the job waited for an H100 while the raised limit
    # let it have the four A100s that were free
    with _bob_behind_alice(tmp_path) as (alice, bob, carol, first):
        job = submit(bob, "1", "A100-80GB:4, H100")
        assert bob.job(job["id"])["dropped"] == [{
            "option": "A100-80GB:4",
            "reason": "asks for more than your limit of 2 GPU(s) at once"}]
        carol._request("PUT", "/v1/limits/bob", json={"max_gpus": 4})
        done = wait_for(lambda: (r := bob.job(job["id"]))["state"] != "queued" and r, 15)
        assert done["grant"]["gpu_type"] == "A100-80GB"
        assert finish(bob, job["id"])["state"] == "succeeded"
        assert bob.job(job["id"])["dropped"] == []
        alice.cancel(first["id"])


def test_limits_an_admin_set_outlive_a_restart(tmp_path: Path) -> None:
    # kept in memory only: a restarted gateway gave every student its defaults again
    from .conftest import start_class_gateway

    gw, tokens = start_class_gateway(tmp_path)
    try:
        with gw.client(tokens["carol"]) as carol:
            carol._request("PUT", "/v1/limits/bob", json={"max_gpus": 1, "max_jobs": 3})
    finally:
        gw.stop()
    kept = gw.state_dir / "limits.json"
    assert kept.stat().st_mode & 0o777 == 0o600
    again = start_gateway(tmp_path, "--tokens-file", str(tmp_path / "tokens.json"),
                          state_dir=gw.state_dir)
    try:
        with again.client(tokens["bob"]) as bob, again.client(tokens["carol"]) as carol:
            assert carol._request("GET", "/v1/limits").json()["overrides"] == {
                "bob": {"max_gpus": 1, "max_jobs": 3}}
            with pytest.raises(gpu_magic.GatewayError) as info:
                submit(bob, "1", "H100:2")
            assert info.value.status == 429
            assert "your limit of 1 GPU(s) at once (set for you by an admin)" in str(info.value)
    finally:
        again.stop()
    # a file that is not what the gateway wrote is refused at start, not taken as no limits
    kept.write_text("{not json")
    with pytest.raises(RuntimeError, match="cannot read the per-user limits an admin set"):
        start_gateway(tmp_path, "--tokens-file", str(tmp_path / "tokens.json"),
                      state_dir=gw.state_dir)


def test_admin_sets_per_user_limits(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    tokens = _tokens(tokens_file, teacher={"admin": True}, student={"max_jobs": 5})
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file), "--isolation", "none",
                       "--force")
    try:
        student = {"Authorization": f"Bearer {tokens['student']}"}
        teacher = {"Authorization": f"Bearer {tokens['teacher']}"}
        assert httpx.get(gw.url + "/v1/limits", headers=student).json()["limits"]["max_jobs"] == 5
        resp = httpx.put(gw.url + "/v1/limits/student", json={"max_jobs": 0}, headers=student)
        assert resp.status_code == 403
        resp = httpx.put(gw.url + "/v1/limits/student", json={"max_jobs": 0}, headers=teacher)
        assert resp.status_code == 200
        # the admin sees what is in force for everyone (only overrides were shown: the tokens
        # file's limits were nowhere to be seen); a student sees only their own
        seen = httpx.get(gw.url + "/v1/limits", headers=teacher).json()
        assert seen["users"]["student"]["max_jobs"] == 0, seen
        assert set(seen["users"]) == {"student", "teacher"}
        assert "users" not in httpx.get(gw.url + "/v1/limits", headers=student).json()
        # a typo is refused, not taken as a user nobody is
        resp = httpx.put(gw.url + "/v1/limits/studnet", json={"max_jobs": 0}, headers=teacher)
        assert resp.status_code == 404
        assert "no user 'studnet'" in resp.text and "student, teacher" in resp.text
        for wrong in ("2", True, 10**30):  # (a number past any pool was stored as it was)
            resp = httpx.put(gw.url + "/v1/limits/student", json={"max_gpus": wrong},
                             headers=teacher)
            assert resp.status_code == 422 and "max_gpus" in resp.text, resp.text
        with GatewayClient(gw.url, tokens["student"]) as c:
            with pytest.raises(gpu_magic.GatewayError) as info:
                submit(c, "1", "H100")
        assert info.value.status == 429
        # nothing to wait for or cancel: whoever set the limit is the one to ask
        assert str(info.value) == (
            "your limit on this gateway is 0 jobs (set for you by an admin), so no job of "
            "yours can run here. Ask whoever runs the gateway (your instructor) to raise it.")
        resp = httpx.put(gw.url + "/v1/limits/student", json={"max_jobs": 3, "max_gpus": 0},
                         headers=teacher)
        assert resp.status_code == 200
        with GatewayClient(gw.url, tokens["student"]) as c:
            with pytest.raises(gpu_magic.GatewayError) as info:
                submit(c, "1", "H100")
        assert info.value.status == 429
        assert str(info.value) == (
            "your limit on this gateway is 0 GPUs (set for you by an admin), so no job of "
            "yours can run here. Ask whoever runs the gateway (your instructor) to raise it.")
    finally:
        gw.stop()


def test_an_admin_attaching_to_a_student_s_job_sees_its_output_and_loads_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the results are the student's pickles: never unpickled in the teacher's kernel (it
    # used to end in "this gateway holds no blob ... of yours", which reads like lost data)
    tokens_file = tmp_path / "tokens.json"
    tokens = _tokens(tokens_file, teacher={"admin": True}, student={})
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file), "--isolation", "none",
                       "--force")
    try:
        with GatewayClient(gw.url, tokens["student"]) as student, \
                GatewayClient(gw.url, tokens["teacher"]) as teacher:
            done = gpu_magic.run("print('from the student')\nx = 42\nx", "H100",
                                 {"__name__": "__main__"}, client=student, background=True,
                                 quiet=True)
            failed = gpu_magic.run("1 / 0", "H100", {"__name__": "__main__"}, client=student,
                                   background=True, quiet=True)
            assert done.wait() == 42
            with pytest.raises(ZeroDivisionError):
                failed.wait()
            capsys.readouterr()
            ns: dict[str, Any] = {"__name__": "__main__"}
            assert attach(done.id, ns, client=teacher, quiet=True) is None
            assert "x" not in ns
            out, err = capsys.readouterr()
            assert "from the student" in out
            assert f"job {done.id} is student's" in err and "nothing will be bound" in err
            with pytest.raises(gpu_magic.RemoteError) as info:
                attach(failed.id, ns, client=teacher, quiet=True)
            assert "ZeroDivisionError" in str(info.value)
            # the student's own attach still brings the results back
            mine: dict[str, Any] = {"__name__": "__main__"}
            assert attach(done.id, mine, client=student, quiet=True) == 42
            assert mine["x"] == 42
    finally:
        gw.stop()


# a cell can write anything on its runner's event pipe, and anything into its out folder
_FORGE = """
import glob, os, sys
em = None
for f in sys._current_frames().values():  # the runner's own frame holds its event writer
    while f is not None and em is None:
        em = getattr(f.f_locals.get("self"), "emitter", None)
        f = f.f_back
out = max(glob.glob({state!r} + "/jobs/*/attempt-*"), key=os.path.getmtime) + "/out"
os.makedirs(out, exist_ok=True)
d = "xxh3-128:" + "ab" * 16
path = os.path.join(out, d.replace(":", "-"))
{make}
em.emit({{"type": "result", "blob": {blob}, "buffers": [], "names": []}}, always=True)
"""


@pytest.mark.parametrize(("make", "blob"), [
    ("", "{secret!r}"),  # a path instead of a digest
    ("", "d, 'junk': 'j' * (5 << 20)"),  # a result event of any size, kept in the job's log
    ("", "'../' * 6 + {secret!r}"),
    ("os.symlink({secret!r}, path)", "d"),  # a link in the out folder
    ("os.mkfifo(path)", "d"),  # a FIFO: reading it would block the gateway's thread forever
    ("os.mkdir(path)", "d"),
], ids=["path", "huge", "relative", "symlink", "fifo", "folder"])
def test_a_cell_cannot_make_the_gateway_take_a_file_it_names(
        tmp_path: Path, make: str, blob: str) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the gateway's own file")
    secret_digest = gpu_magic._payload.digest(memoryview(secret.read_bytes()))
    gw = start_gateway(tmp_path)
    try:
        with gw.client() as c:
            source = _FORGE.format(state=str(gw.state_dir), make=make.format(secret=str(secret)),
                                   blob=blob.format(secret=str(secret)))
            job = submit(c, source, "H100", timeout=30)
            record = finish(c, job["id"])
            assert record["state"] in ("failed", "lost"), record
            said = json.dumps(list(c.events(job["id"])))
            assert "malformed result" in said or "not a regular file" in said or "is a link" in said, said
            assert "is not a folder" not in said, said  # (the file is at fault, not its folder)
            assert secret.read_text() == "the gateway's own file"  # still there, untouched
            with pytest.raises(gpu_magic.GatewayError):
                c.download(secret_digest)
            assert not list((gw.state_dir / "blobs").rglob("*.adopt"))
            assert all(t["free"] == t["total"] for t in c.pool()["types"])  # nothing held
    finally:
        gw.stop()


@needs_bwrap
def test_a_sandboxed_cell_s_result_that_is_a_link_is_said_to_be_one(tmp_path: Path) -> None:
    # a red team: a result file swapped for a link was refused, as "out is not a folder"
    secret = tmp_path / "secret.txt"
    secret.write_text("the gateway's own file")
    gw, tokens = _alice_and_bob(tmp_path)
    try:
        with GatewayClient(gw.url, tokens["alice"]) as alice:
            source = _FORGE.format(state=str(gw.state_dir), blob="d",
                                   make=f"os.symlink({str(secret)!r}, path)")
            job = submit(alice, source, "H100", timeout=30)
            assert finish(alice, job["id"])["state"] in ("failed", "lost")
            said = json.dumps(list(alice.events(job["id"])))
            assert "is a link, not a file" in said and "not a folder" not in said, said
    finally:
        gw.stop()


def test_a_cell_cannot_make_its_out_folder_a_link_to_another_s_blobs(tmp_path: Path) -> None:
    # the file named by the digest was opened without following links, but the folder it
    # was in was followed: a link to another user's blob folder took their blob
    victim = tmp_path / "victim"
    victim.mkdir()
    content = b"another user's blob"
    d = gpu_magic._payload.digest(memoryview(content))
    (victim / d.replace(":", "-")).write_bytes(content)
    gw = start_gateway(tmp_path)
    try:
        with gw.client() as c:
            source = _FORGE.split("d = ")[0].format(state=str(gw.state_dir)) + (
                f"import shutil\nshutil.rmtree(out)\nos.symlink({str(victim)!r}, out)\n"
                f"em.emit({{'type': 'result', 'blob': {d!r}, 'buffers': [], 'names': []}}, "
                "always=True)\n")
            job = submit(c, source, "H100", timeout=30)
            assert finish(c, job["id"])["state"] in ("failed", "lost")
            said = json.dumps(list(c.events(job["id"])))
            assert "out is not a folder" in said, said
            assert (victim / d.replace(":", "-")).read_bytes() == content  # still theirs
            with pytest.raises(gpu_magic.GatewayError):
                c.download(d)
    finally:
        gw.stop()


@pytest.mark.parametrize("make", ["os.symlink({secret!r}, log)", "os.mkfifo(log)"],
                         ids=["link", "fifo"])
def test_a_runner_s_log_is_read_from_the_gateway_s_own_descriptor(tmp_path: Path,
                                                                   make: str) -> None:
    # the gateway read runner.log by name for a lost runner's last words: a link made it
    # show the cell any file it could read (the tokens file), a FIFO blocked it for good
    secret = tmp_path / "secret.txt"
    secret.write_text("the gateway's own secret")
    gw = start_gateway(tmp_path, "--cold")  # a fresh process per cell: one with a log
    try:
        with gw.client() as c:
            cell = (f"import os, sys\nlog = os.path.join(sys.argv[1], 'runner.log')\n"
                    f"os.unlink(log)\n{make.format(secret=str(secret))}\nos._exit(1)")
            job = submit(c, cell, "H100", timeout=30)
            record = finish(c, job["id"], timeout=30)
            assert record["state"] == "lost", record
            assert "the gateway's own secret" not in json.dumps([record, *c.events(job["id"])])
            assert all(t["free"] == t["total"] for t in c.pool()["types"])
    finally:
        gw.stop()


def test_a_cell_that_writes_odd_lines_or_fake_outcomes_on_its_pipe_still_ends(
        tmp_path: Path) -> None:
    gw = start_gateway(tmp_path)
    head = _FORGE.split("d = ")[0].format(state=str(gw.state_dir))
    try:
        with gw.client() as c:
            # nested past the JSON parser's recursion limit: the reader broke, the job never
            # ended and kept its GPU
            job = submit(c, head + "em._f.write(b'[' * 100000 + b'\\n')\nprint('after')",
                         "H100", timeout=30)
            assert finish(c, job["id"], timeout=30)["state"] == "succeeded"
            assert [e["text"] for e in c.events(job["id"]) if e["type"] == "stdout"] == ["after\n"]
            # a runner_error of any size was kept whole in the job's record and listing
            job = submit(c, head + "em.emit({'type': 'runner_error', 'ename': 'X', "
                                   "'evalue': 'A' * (5 << 20)}, always=True)\nos._exit(3)",
                         "H100", timeout=30)
            record = finish(c, job["id"], timeout=30)
            assert record["state"] == "failed" and len(record["message"]) < 5000, len(
                record["message"])
            # a result said early stopped the timeout: the cell ran on, holding its GPU
            job = submit(c, head + "d = 'xxh3-128:' + '0' * 32\nem.emit({'type': 'result', "
                                   "'blob': d, 'buffers': [], 'names': []}, always=True)\n"
                                   "import time\ntime.sleep(120)", "H100", timeout=2)
            record = finish(c, job["id"], timeout=40)
            assert record["state"] == "timed_out", record
            assert all(t["free"] == t["total"] for t in c.pool()["types"])
    finally:
        gw.stop()


def test_an_endless_line_on_the_event_pipe_stops_the_runner_not_the_gateway(
        tmp_path: Path) -> None:
    # one 300 MiB line used to cost the gateway minutes of a core (each read copied all that
    # had come before) and ever more memory, slowing every other user
    gw = start_gateway(tmp_path)
    try:
        with gw.client() as c:
            flood = _FORGE.split("d = ")[0] + (
                "chunk = b'x' * (1 << 20)\n"
                "for _ in range(80):\n    em._f.write(chunk)\n"
                "import time; time.sleep(30)")
            job = submit(c, flood.format(state=str(gw.state_dir)), "H100", timeout=60)
            record = finish(c, job["id"], timeout=30)
            said = json.dumps(list(c.events(job["id"])))
            assert record["state"] in ("failed", "lost") and "more than 64 MiB" in said, said
            assert all(t["free"] == t["total"] for t in c.pool()["types"])
            # and the gateway serves the next cell as before
            ns: dict[str, Any] = {"__name__": "__main__"}
            gpu_magic.run("print('x' * 3_000_000)\nok = 1", "H100", ns, client=c, quiet=True)
            assert ns["ok"] == 1
    finally:
        gw.stop()


def test_output_past_the_cap_is_cut_with_a_notice_and_the_cell_goes_on(tmp_path: Path) -> None:
    # a cell printing without end used to fill the gateway's memory and its disk
    gw = start_gateway(tmp_path)
    try:
        with gw.client() as c:
            job = submit(c, "import sys\nline = 'x' * 1023 + '\\n'\n"
                            "for _ in range(66 * 1024):\n    sys.stdout.write(line)\n"
                            "sys.stdout.flush()\nprint('end', file=sys.stderr)\ndone = 1",
                         "H100", timeout=120)
            assert finish(c, job["id"], timeout=120)["state"] == "succeeded"
            events = list(c.events(job["id"]))
            out = "".join(e["text"] for e in events if e["type"] == "stdout")
            err = "".join(e["text"] for e in events if e["type"] == "stderr")
            # each event also counts 64 bytes, and a busy machine gathers fewer lines into one
            # (even part of a line, as the pipe gives it): most of the 64 MiB is text still
            assert 48 << 20 < len(out) <= 64 << 20, len(out)
            assert "output passed 64.0 MiB: the rest is neither kept nor shown" in err
            assert "end" not in err  # cut, as said
            # fields a cell adds to its output events are not kept (nor would they count)
            forged = submit(c, _FORGE.split("d = ")[0].format(state=str(gw.state_dir)) + (
                "em.emit({'type': 'stdout', 'text': 'x\\n', 'junk': 'j' * (1 << 20)})\n"
                "em.emit({'type': 'display', 'data': {'text/plain': 'y'}, 'junk': 'j' * 9})\n"),
                "H100", timeout=60)
            assert finish(c, forged["id"])["state"] == "succeeded"
            kept = [e for e in c.events(forged["id"]) if e["type"] in ("stdout", "display")]
            assert [e.get("text") or e["data"] for e in kept] == ["x\n", {"text/plain": "y"}]
            assert not any("junk" in e for e in kept)
    finally:
        gw.stop()


def test_token_files_are_private(gateway: Gateway) -> None:
    assert (gateway.state_dir / "token").stat().st_mode & 0o777 == 0o600
    assert gateway.runtime_file.stat().st_mode & 0o777 == 0o600
    assert gateway.state_dir.stat().st_mode & 0o777 == 0o700
    assert len(gateway.token) >= 22
    # the job records and event logs too (they were 0644, guarded only by their folder)
    with gateway.client() as c:
        submit(c, "print('x')", "H100")
    db = sorted(gateway.state_dir.glob("gateway.sqlite3*"))
    assert len(db) >= 2 and {p.stat().st_mode & 0o777 for p in db} == {0o600}, db


def test_users_whose_names_differ_only_in_odd_characters_keep_apart(tmp_path: Path) -> None:
    # 'ann lee' and 'ann_lee' were given one folder: each could read the other's blobs
    names = ["ann lee", "ann_lee", "Ann_lee", "ann.lee", "ann%20lee"]
    tokens_file = tmp_path / "tokens.json"
    tokens = _tokens(tokens_file, **{n: {} for n in names})
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens_file), "--isolation", "none",
                       "--force")
    try:
        stored = {}
        for name in names:
            data = f"{name}'s private data".encode()
            stored[name] = gpu_magic._payload.digest(data)
            with GatewayClient(gw.url, tokens[name]) as c:
                c.upload(stored[name], memoryview(data))
        for name in names:
            with GatewayClient(gw.url, tokens[name]) as c:
                others = [d for n, d in stored.items() if n != name]
                assert c.missing(others) == others, name
                for d in others:
                    resp = httpx.get(f"{gw.url}/v1/blobs/{d}",
                                     headers={"Authorization": f"Bearer {tokens[name]}"})
                    assert resp.status_code == 404, (name, resp.text)
                assert bytes(c.download(stored[name])) == f"{name}'s private data".encode()
        assert len(list((gw.state_dir / "blobs").iterdir())) == len(names)
    finally:
        gw.stop()


def test_finished_jobs_do_not_keep_their_requests_in_the_gateway_s_memory(
        tmp_path: Path) -> None:
    # Each finished job kept its whole request (up to a megabyte of source, --env, the
    # inputs' manifest) for the 7 days of retention: one user's short jobs grew the gateway
    # without bound (the red team's: 54 MB to 526 MB in 100 jobs, through a 4 MiB `meta`).
    import psutil

    from gpu_magic._errors import GatewayError

    gw = start_gateway(tmp_path, simulate="H100:2")
    try:
        with gw.client() as c:
            packed = gpu_magic._payload.pack_inputs({}, None, None)
            c.upload(packed.pickle_digest, memoryview(packed.pickle))
            with pytest.raises(GatewayError) as info:  # where a cell came from stays small
                c.submit({"source": "1", "spec": [{"type": "H100"}], "inputs": packed.manifest,
                          "meta": {"notebook": "x" * (1 << 20)}})
            assert info.value.status == 422
            big = "# " + "x" * 900_000 + "\ny = 1"

            def jobs(n: int) -> None:
                for _ in range(n):
                    job = c.submit({"source": big, "spec": [{"type": "H100"}],
                                    "inputs": packed.manifest})
                    assert [e for e in c.events(job["id"])][-1]["state"] == "succeeded"

            gateway = psutil.Process(gw.proc.pid)
            jobs(5)
            before = gateway.memory_info().rss
            jobs(40)
            grew = gateway.memory_info().rss - before
        assert grew < 15 << 20, f"the gateway grew by {grew >> 20} MiB over 40 finished jobs"
    finally:
        gw.stop()


def test_a_job_held_by_a_user_limit_starts_when_an_admin_raises_it(tmp_path: Path) -> None:
    # the limit took effect only at the next job's start or end: raised while alice's first
    # job ran on, her second stayed queued behind a limit that no longer held it
    from .conftest import start_class_gateway

    gw, tokens = start_class_gateway(tmp_path)
    try:
        with gw.client(tokens["alice"]) as alice, gw.client(tokens["carol"]) as carol:
            carol._request("PUT", "/v1/limits/alice", json={"max_gpus": 1})
            first = gpu_magic.run("import time\ntime.sleep(60)", "H100", {"__name__": "__main__"},
                                  client=alice, quiet=True, background=True)
            wait_for(lambda: alice.job(first.id)["state"] == "running")
            second = gpu_magic.run("x = 1", "H100", {"__name__": "__main__"}, client=alice,
                                   quiet=True, background=True)
            held = wait_for(lambda: alice.job(second.id).get("waiting_why"))
            assert held == "your other jobs hold 1 of the 1 GPU(s) your limit lets you use at once"
            carol._request("PUT", "/v1/limits/alice", json={"max_gpus": 2})
            assert wait_for(lambda: alice.job(second.id)["state"] == "succeeded", 15)
            assert alice.job(first.id)["state"] == "running"
            first.cancel()
    finally:
        gw.stop()


def test_gpu_device_files_are_nvidia_s(tmp_path: Path) -> None:
    # (the pool is NVML's: an AMD GPU's kfd and dri would be GPUs nobody was granted)
    for name in ("nvidia0", "nvidia3", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "kfd",
                 "null", "sda", "fuse"):
        (tmp_path / name).touch()
    for folder in ("nvidia-caps", "dri", "shm"):
        (tmp_path / folder).mkdir()
    found = [Path(p).name for p in gpu_device_files(tmp_path)]
    assert found == ["nvidia-caps", "nvidia-uvm", "nvidia-uvm-tools", "nvidia0", "nvidia3",
                     "nvidiactl"]
    assert gpu_device_files(tmp_path / "absent") == []


@needs_bwrap
@pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs a device file bwrap's /dev "
                    "lacks (/dev/fuse) to stand for a GPU's")
def test_a_sandboxed_runner_has_the_gpu_device_files(tmp_path: Path) -> None:
    # a department's trial: the sandbox's /dev held only null, zero, tty..., so a cell granted
    # an H100 found no GPU; device files given are brought in as the host's own
    job, state = tmp_path / "job", tmp_path / "state"
    job.mkdir()
    state.mkdir()
    probe = ("import os, stat\n"
             "print(stat.S_ISCHR(os.stat('/dev/fuse').st_mode), os.path.exists('/dev/kvm'))")
    argv = [sys.executable, "-c", probe]

    def run(devices: list[str]) -> subprocess.CompletedProcess[str]:
        cmd = bwrap_command(argv, job_dir=job, state_dir=state, readable=[], devices=devices,
                            python=python_paths(sys.executable, os.environ))
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    given = run(["/dev/fuse"])
    assert given.returncode == 0 and given.stdout.strip() == "True False", given
    assert "FileNotFoundError" in run([]).stderr  # (bwrap's own /dev lacks it)


def test_another_user_s_display_shows_only_text_and_images_whatever_it_holds() -> None:
    # a review: a cell can write event lines of its own, and a display whose data was not a
    # bundle ended an admin's %gpu attach with an AttributeError
    from gpu_magic._api import _inert

    assert _inert({"type": "display", "data": "x"}, "bob")["data"] == {}
    shown = _inert({"type": "display", "data": {"text/plain": 3, "image/svg+xml": "<svg/>",
                                                "image/png": "AAAA"},
                    "metadata": ["not", "a", "dict"]}, "bob")
    assert shown["data"] == {"text/plain": "3", "image/png": "AAAA"} and shown["metadata"] == {}
    named = _inert({"type": "display", "data": {"text/html": "<b>x</b>"}}, "bob")["data"]
    assert named == {"text/plain": "[gpu_magic] bob's text/html output is not shown: it could "
                                   "run script in your notebook"}
    # a department's trial: display(HTML(...)) and display(Markdown(...)) showed the teacher
    # only '<IPython.core.display.HTML object>'
    from IPython.display import HTML, Markdown

    html = {"text/plain": repr(HTML("<b>x</b>")), "text/html": "<b>x</b>"}
    assert _inert({"type": "display", "data": html}, "bob")["data"] == named
    md = {"text/plain": repr(Markdown("# hi")), "text/markdown": "# hi"}
    assert _inert({"type": "display", "data": md}, "bob")["data"] == {"text/plain": "# hi"}
    # a table's text form says something: kept as it is, its HTML left out
    table = {"text/plain": "   a\n0  1", "text/html": "<table>...</table>"}
    assert _inert({"type": "display", "data": table}, "bob")["data"] == {
        "text/plain": "   a\n0  1"}
