"""The sidebar's server extension in a real Jupyter server, against a real simulated gateway."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient

# pytest-jupyter's fixtures, for this module only: loaded as a plugin (-p), its autouse event
# loop and server clean-up would wrap every test of the suite.
from pytest_jupyter.jupyter_server import *  # noqa: F403

from gpu_magic._api import Options, run, submit
from gpu_magic._embedded import (
    _pid_alive,
    ensure_local_gateway,
    running_local_gateway,
    runtime_path,
    stop_local_gateway,
)
from gpu_magic.serverext import GpuMagicProxy
from gpu_magic.serverext._proxy import NO_LOCAL_GATEWAY

from .conftest import Gateway, start_class_gateway, wait_for
from .test_gateway_http import finish
from .test_gateway_http import submit as submit_job

API = ("gpu-magic", "api")


def fetch(jp_fetch: Any, loop: Any, *path: str, **kw: Any) -> tuple[int, Any]:
    """One request to the server under test: (status, JSON body), errors included."""
    try:
        resp = loop.run_until_complete(jp_fetch(*API, *path, **kw))
    except tornado.httpclient.HTTPClientError as exc:
        assert exc.response is not None, exc
        resp = exc.response
    body = resp.body.decode() if resp.body else ""
    return resp.code, json.loads(body) if body.startswith(("{", "[")) else body


def _config(url: str | None = None, token: str | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"ServerApp": {"jpserver_extensions": {"gpu_magic.serverext": True}}}
    if url is not None:
        config["GpuMagicProxy"] = {"url": url, "token": token or ""}
    return config


@pytest.fixture(autouse=True)
def _current_loop(jp_asyncio_loop: Any) -> Iterator[None]:
    # jupyter_core caches one loop per thread without re-installing it, and a test elsewhere
    # that ran asyncio.run() leaves asyncio with no current loop, which tornado's fetch needs.
    asyncio.set_event_loop(jp_asyncio_loop)
    yield
    asyncio.set_event_loop(None)


@pytest.fixture(autouse=True)
def _no_gateway_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("GPU_MAGIC_")]:
        monkeypatch.delenv(k)


@pytest.fixture
def jp_server_config(gateway: Gateway) -> dict[str, Any]:
    return _config(gateway.url, gateway.token)


@pytest.fixture
def api(jp_fetch: Any, jp_asyncio_loop: Any):  # type: ignore[no-untyped-def]
    return lambda *path, **kw: fetch(jp_fetch, jp_asyncio_loop, *path, **kw)


def _submit(gateway: Gateway, source: str, meta: dict[str, str], follow: bool = True) -> dict[str, Any]:
    """Run (or only submit) a cell as gpu_magic.run does; the gateway's record of the job."""
    client = gateway.client()
    try:
        if follow:
            run(source, "H100", {}, client=client, quiet=True, meta=meta)
        else:
            submit(source, "H100", {}, Options(quiet=True, meta=meta), client=client)
        return next(j for j in client.jobs() if j["meta"] == meta)
    finally:
        client.close()


def test_status_and_pool(api: Any, gateway: Gateway) -> None:
    code, status = api("status")
    assert code == 200
    assert status["reachable"] is True and status["simulated"] is True
    assert status["shared"] is False  # one user's gateway: no "everyone" to offer
    assert status["url"] == gateway.url and status["source"] == "GpuMagicProxy.url"
    assert status["version"]
    assert "token" not in json.dumps(status).lower()

    code, pool = api("pool")
    assert code == 200 and pool["simulated"] is True
    totals = {t["type"]: t["total"] for t in pool["types"]}
    assert totals == {"H100": 2, "A100-80GB": 4}
    assert {"queue_length", "running", "nodes"} <= set(pool)


def test_jobs_with_grant_and_notebook_path(api: Any, gateway: Gateway, jp_root_dir: Path) -> None:
    nb = jp_root_dir / "sub" / "train.ipynb"
    meta = {"cell_id": "cell-abc", "notebook": str(nb)}
    rec = _submit(gateway, "y = 1", meta)
    assert rec["state"] == "succeeded"

    code, body = api("jobs")
    assert code == 200 and body["all"] is False and isinstance(body["now"], float)
    job = next(j for j in body["jobs"] if j["id"] == rec["id"])
    assert job["grant"]["gpu_type"] == "H100" and job["grant"]["count"] == 1
    assert job["grant"]["simulated"] is True and job["grant"]["option_index"] == 0
    assert job["meta"] == meta
    assert job["notebook_path"] == "sub/train.ipynb"  # relative to Jupyter's root

    code, one = api("jobs", rec["id"])
    assert code == 200 and one["id"] == rec["id"] and one["notebook_path"] == "sub/train.ipynb"

    # the owner token is an admin token: all=true passes through
    code, body = api("jobs", params={"all": "true"})
    assert code == 200 and body["all"] is True and any(j["id"] == rec["id"] for j in body["jobs"])

    code, body = api("jobs", params={"limit": "0"})
    assert code == 200 and all(j["state"] not in ("succeeded", "failed") for j in body["jobs"])


def test_cancel_a_running_job(api: Any, gateway: Gateway) -> None:
    meta = {"cell_id": "cell-sleep", "notebook": "/elsewhere/x.ipynb"}
    rec = _submit(gateway, "import time\ntime.sleep(60)", meta, follow=False)
    wait_for(lambda: api("jobs", rec["id"])[1]["state"] == "running", timeout=60)

    code, body = api("jobs", rec["id"], method="DELETE")
    assert code == 200 and body["id"] == rec["id"]
    assert body["notebook_path"] is None  # outside Jupyter's root
    final = wait_for(lambda: (lambda j: j if j["state"] == "cancelled" else None)(
        api("jobs", rec["id"])[1]), timeout=60)
    assert final["finished"] is not None
    # and its cell says where it was cancelled: "cancelled: nothing was bound" said nothing
    with gateway.client() as c:
        done = [e for e in c.events(rec["id"]) if e["type"] == "done"][0]
    assert done["cancelled_by"] == "the sidebar", done


def test_unknown_and_malformed_job_ids(api: Any) -> None:
    code, body = api("jobs", "000000000000")
    assert code == 404 and body["error"] == "no_such_job"
    # nothing but an id reaches the gateway
    code, _ = api("jobs", "..%2Fpool")
    assert code == 404


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "status"), ("GET", "pool"), ("GET", "jobs"), ("GET", "jobs/abc123"),
    ("DELETE", "jobs/abc123"),
])
def test_unauthenticated_requests_are_refused(api: Any, method: str, path: str) -> None:
    code, body = api(*path.split("/"), method=method, headers={"Authorization": "token wrong"})
    assert code == 403
    assert "reachable" not in str(body) and "jobs" not in str(body)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gateway_down_gives_advice(api: Any, jp_serverapp: Any) -> None:
    _proxy_of(jp_serverapp).url = f"http://127.0.0.1:{_closed_port()}"
    code, body = api("pool")
    assert code == 503 and body["error"] == "gateway_unreachable"
    assert "cannot reach the gpu_magic gateway at http://127.0.0.1:" in body["message"]
    # as the magic says it (a trial: the panel said "All connection attempts failed")
    assert "(GpuMagicProxy.url): Connection refused. " in body["message"], body
    assert "gpu-magic serve" in body["message"]
    assert api("jobs")[0] == 503 and api("jobs", "abc", method="DELETE")[0] == 503

    code, status = api("status")
    assert code == 200 and status["reachable"] is False
    assert status["error"] == "gateway_unreachable" and status["url"].startswith("http://127.0.0.1:")


def test_wrong_gateway_token_is_not_a_jupyter_auth_error(
        api: Any, gateway: Gateway, jp_serverapp: Any) -> None:
    proxy = _proxy_of(jp_serverapp)
    proxy.token = "x" * 30
    code, body = api("pool")
    assert code == 502 and body["error"] == "gateway_unauthorized"
    assert "GPU_MAGIC_TOKEN" in body["message"] and "x" * 30 not in body["message"]
    # the connection line says so too, and never what the pool is: a trial's panel called
    # a simulated pool "real GPUs" beside a refused token
    code, status = api("status")
    assert code == 200 and status["reachable"] and status["error"] == "gateway_unauthorized"
    assert status["simulated"] is None and status["message"] == body["message"]


@pytest.mark.parametrize("jp_server_config", [_config()])
def test_nothing_configured_says_how_to_start(api: Any) -> None:
    code, body = api("pool")
    assert code == 503 and body["error"] == "no_gateway"
    assert "%%gpu" in body["message"] and "GPU_MAGIC_URL" in body["message"]
    assert "GPU_MAGIC_SIMULATE" in body["message"]
    assert body["message"].startswith(NO_LOCAL_GATEWAY)
    code, status = api("status")
    assert code == 200 and status == {"reachable": False, "url": None, "source": None, **body}


@pytest.mark.parametrize("jp_server_config", [_config()])
def test_the_sidebar_only_looks_and_never_starts_a_gateway(
        api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpu-magic stop` stays stopped: the panel's and the status bar's polls start no local
    gateway, not even with GPU_MAGIC_SIMULATE set (the next %%gpu cell starts that one)."""
    monkeypatch.setenv("GPU_MAGIC_SIMULATE", "T4:1")
    info = ensure_local_gateway("T4:1")
    try:
        status = api("status")[1]
        assert status["reachable"] and status["simulated"] and status["url"] == info["url"]
        assert "stopped" in stop_local_gateway()
        wait_for(lambda: not _pid_alive(int(info["pid"])))
        for _ in range(3):  # a few rounds of polls
            code, status = api("status")
            assert code == 200 and status["reachable"] is False, status
            assert status["error"] == "no_gateway"
            assert api("pool")[1]["error"] == "no_gateway"
            assert api("jobs")[0] == 503
        assert status["message"].startswith(NO_LOCAL_GATEWAY)
        assert "simulated: T4:1" in status["message"]
        assert running_local_gateway() is None and not runtime_path().exists()
    finally:
        stop_local_gateway()


@pytest.mark.parametrize("jp_server_config", [_config()])
def test_environment_and_runtime_file(api: Any, gateway: Gateway,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # GPU_MAGIC_URL without a token: refused with the fix
    monkeypatch.setenv("GPU_MAGIC_URL", gateway.url)
    code, body = api("pool")
    assert code == 503 and body["error"] == "no_token" and "GPU_MAGIC_TOKEN" in body["message"]
    monkeypatch.setenv("GPU_MAGIC_TOKEN", gateway.token)
    code, status = api("status")
    assert status["reachable"] and status["source"] == "GPU_MAGIC_URL"
    monkeypatch.delenv("GPU_MAGIC_URL")
    monkeypatch.delenv("GPU_MAGIC_TOKEN")

    # this user's local gateway, found through its runtime file (here: the test gateway's)
    path = runtime_path()
    info = json.loads(gateway.runtime_file.read_text())
    info["host"] = socket.gethostname()
    path.write_text(json.dumps(info))
    code, status = api("status")
    assert status["reachable"] and status["source"] == "local gateway"
    assert api("pool")[0] == 200

    # a runtime file whose process is gone counts as no gateway
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({**info, "pid": dead.pid}))
    assert api("pool")[1]["error"] == "no_gateway"


def _proxy_of(serverapp: Any) -> GpuMagicProxy:
    for rule in serverapp.web_app.default_router.rules:
        for sub in getattr(rule.target, "rules", []):
            proxy = (sub.target_kwargs or {}).get("proxy")
            if isinstance(proxy, GpuMagicProxy):
                return proxy
    raise AssertionError("the gpu_magic handlers are not registered")


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, dict[str, str]]]:
    """A gateway shared by alice and bob, with carol as its admin (an instructor)."""
    gw, tokens = start_class_gateway(tmp_path_factory.mktemp("shared"))
    yield gw, tokens
    gw.stop()


def test_an_admin_token_sees_and_cancels_every_users_jobs(
        api: Any, jp_serverapp: Any, shared_gateway: tuple[Gateway, dict[str, str]]) -> None:
    gw, tokens = shared_gateway
    alice, bob = gw.client(tokens["alice"]), gw.client(tokens["bob"])
    try:
        mine = submit_job(alice, "a = 1\n")
        theirs = submit_job(bob, "import time\ntime.sleep(60)\n")
        proxy = _proxy_of(jp_serverapp)
        proxy.url = gw.url

        proxy.token = tokens["alice"]  # a user: all=true still answers with her own jobs
        status = api("status")[1]
        assert status["user"] == "alice" and status["admin"] is False  # no "everyone" box
        assert status["shared"] is True
        body = api("jobs", params={"all": "true"})[1]
        ids = {j["id"] for j in body["jobs"]}
        assert mine["id"] in ids and theirs["id"] not in ids
        # and says so: the panel must not take her own jobs for everyone's
        assert body["all"] is False
        assert api("jobs", theirs["id"], method="DELETE")[0] == 404

        proxy.token = tokens["carol"]  # the admin
        status = api("status")[1]
        assert status["user"] == "carol" and status["admin"] is True and status["shared"]
        assert {j["id"] for j in api("jobs")[1]["jobs"]} == set()  # her own: none
        body = api("jobs", params={"all": "true"})[1]
        assert body["all"] is True
        jobs = {j["id"]: j for j in body["jobs"]}
        assert jobs[mine["id"]]["user"] == "alice" and jobs[theirs["id"]]["user"] == "bob"
        code, body = api("jobs", theirs["id"], method="DELETE")
        assert code == 200
        assert finish(bob, theirs["id"])["state"] == "cancelled"
    finally:
        alice.close()
        bob.close()


def test_the_sidebar_shows_the_gateway_the_notebook_in_front_connected_to(
        api: Any, gateway: Gateway, shared_gateway: tuple[Gateway, dict[str, str]],
        jp_serverapp: Any, jp_asyncio_loop: Any) -> None:
    # a notebook that ran `%gpu connect` (an instructor rehearsing as alice) ran its cells on
    # that gateway while the sidebar and status bar showed JupyterLab's own, and its jobs
    # never appeared there
    import uuid

    from jupyter_core.paths import jupyter_runtime_dir

    gw, tokens = shared_gateway
    kernels = jp_serverapp.kernel_manager  # (one of this server's kernels, as a notebook's)
    kid = jp_asyncio_loop.run_until_complete(kernels.start_kernel(kernel_name="python3"))
    from jupyter_client import BlockingKernelClient

    kc = BlockingKernelClient()
    kc.load_connection_info(kernels.get_kernel(kid).get_connection_info())
    kc.start_channels()
    kc.wait_for_ready(timeout=60)

    def run_in_kernel(code: str) -> None:
        reply = kc.execute_interactive(code, timeout=60, output_hook=lambda _m: None)
        assert reply["content"]["status"] == "ok", reply["content"]

    try:
        run_in_kernel("%load_ext gpu_magic")
        run_in_kernel(f"%gpu connect {gw.url} --token {tokens['alice']}")
        run_in_kernel("%%gpu H100\nx = 1")
        status = api("status", params={"kernel": kid})[1]
        assert status["url"] == gw.url and status["user"] == "alice", status
        assert status["source"] == "this notebook's %gpu connect"
        jobs = api("jobs", params={"kernel": kid})[1]["jobs"]
        assert jobs and {j["user"] for j in jobs} == {"alice"}
        assert api("pool", params={"kernel": kid})[1]["types"]
        # another notebook (another kernel), or none: JupyterLab's own gateway, as before
        assert api("status", params={"kernel": str(uuid.uuid4())})[1]["url"] == gateway.url
        assert api("status")[1]["url"] == gateway.url
        # the note is this user's alone: it holds the token
        note = Path(jupyter_runtime_dir()) / f"gpu_magic-kernel-{kid}.json"
        assert note.stat().st_mode & 0o777 == 0o600
        run_in_kernel("%gpu connect local")  # back: the note goes
        assert not note.exists()
        assert api("status", params={"kernel": kid})[1]["url"] == gateway.url
        run_in_kernel(f"%gpu connect {gw.url} --token {tokens['bob']}")
        assert api("status", params={"kernel": kid})[1]["user"] == "bob"
        # a token the gateway no longer takes (revoked): the fix is %gpu connect, wherever
        # the token came from (a trial: "again" was said of a connect never run)
        import json

        kept = note.read_text()
        note.write_text(json.dumps({**json.loads(kept), "token": "x" * 30}))
        code, body = api("pool", params={"kernel": kid})
        assert code == 502 and body["error"] == "gateway_unauthorized", body
        assert f"run %gpu connect {gw.url} in the notebook and paste your current token at " \
            "its prompt; the notebook's token came from %gpu connect --token" in body["message"]
        note.write_text(kept)
        # a note no kernel of this server wrote is not read (any id a page may send)
        stray = Path(jupyter_runtime_dir()) / "gpu_magic-kernel-not-a-kernel.json"
        stray.write_text(note.read_text())
        assert api("status", params={"kernel": "not-a-kernel"})[1]["url"] == gateway.url
    finally:
        kc.stop_channels()
        jp_asyncio_loop.run_until_complete(kernels.shutdown_kernel(kid, now=False))
    assert not note.exists()  # a kernel that ends takes its note back
    assert api("status", params={"kernel": kid})[1]["url"] == gateway.url


@pytest.mark.parametrize(("cause", "said"), [
    (ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)"), "Connection refused"),
    (OSError(113, "Connect call failed ('10.0.0.9', 8765)"), "No route to host"),
    (TimeoutError(110, "Connect call failed"), "Connection timed out"),
])
def test_a_connection_failure_is_said_as_the_magic_says_it(cause: OSError, said: str) -> None:
    # a trial: the panel said "All connection attempts failed" where the cell said
    # "Connection refused"; a review: an untrusted certificate then read "Operation not
    # permitted", and an unknown host "Unknown error -2"
    import socket
    import ssl

    import httpx

    from gpu_magic.serverext._proxy import _reason

    def failed(inner: BaseException, text: str = "All connection attempts failed") -> Exception:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise httpx.ConnectError(text) from exc
        except httpx.ConnectError as outer:
            return outer

    assert _reason(failed(cause)) == said
    tls = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
                                          "failed: self-signed certificate")
    assert "CERTIFICATE_VERIFY_FAILED" in _reason(failed(tls, str(tls)))
    dns = socket.gaierror(-2, "Name or service not known")
    assert _reason(failed(dns, "[Errno -2] Name or service not known")) == \
        "Name or service not known"
