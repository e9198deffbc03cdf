"""The gpu-magic command: pool and jobs tables against a real gateway, serve's refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

import gpu_magic
from gpu_magic.server.auth import MIN_TOKEN_CHARS, owner_token

from .conftest import Gateway, start_class_gateway, start_gateway, wait_for


def gm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpu_magic", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_pool_table(gateway: Gateway) -> None:
    out = gm("pool", "--url", gateway.url, "--token", gateway.token)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("simulated pool · backend local")
    assert lines[1].split() == ["type", "free", "total", "memory", "nodes"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert rows["H100"][2] == "2" and rows["A100-80GB"][2] == "4"


def test_jobs_table_lists_my_jobs(gateway: Gateway) -> None:
    with gateway.client() as c:
        gpu_magic.run("v = 1", "A100-80GB:2", {"__name__": "__main__"}, client=c, quiet=True)
        newest = max(c.jobs(), key=lambda j: j["created"])
    out = gm("jobs", "--url", gateway.url, "--token", gateway.token)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith(newest["id"]))
    assert "succeeded" in line and "A100-80GB ×2" in line and "simulated" in line


def test_jobs_lists_the_jobs_not_ended_and_the_last_50_that_ended(tmp_path: Path) -> None:
    # a soak trial: a week of cells was 5,179 lines of %gpu jobs, and 3.9 MB at each of the
    # sidebar's polls
    gw = start_gateway(tmp_path)
    try:
        with gw.client() as c:
            ns = {"__name__": "__main__"}
            for i in range(53):
                gpu_magic.run(f"v = {i}", "A100-80GB", ns, client=c, quiet=True)
            running = gpu_magic.run("import time\ntime.sleep(60)", "H100", ns, client=c,
                                    quiet=True, background=True)
            jobs, total = c.recent_jobs(2)
            assert total == 54 and len(jobs) == 3, (total, jobs)
            assert running.id in {j["id"] for j in jobs}
            ended = sorted((j for j in c.jobs() if j["state"] == "succeeded"),
                           key=lambda j: j["created"])
            assert {j["id"] for j in jobs} - {running.id} == {j["id"] for j in ended[-2:]}
            out = gm("jobs", "--url", gw.url, "--token", gw.token)
            assert out.returncode == 0, out.stderr
            lines = out.stdout.splitlines()
            assert len(lines) == 1 + 51 + 1, out.stdout  # header, 51 jobs, the rest
            assert lines[-1] == "(and 3 older finished jobs, kept for the gateway's --retention)"
            assert any(ln.startswith(running.id) for ln in lines)
            running.cancel()
    finally:
        gw.stop()


def test_jobs_all_lists_every_user_s_jobs_for_an_admin_only(tmp_path: Path) -> None:
    # `gpu-magic jobs --all` was an argparse error; an instructor had to use curl
    gw, tokens = start_class_gateway(tmp_path)
    try:
        with gw.client(tokens["alice"]) as alice:
            gpu_magic.run("1", "H100", {"__name__": "__main__"}, client=alice, quiet=True)
            job = alice.jobs()[0]
        out = gm("jobs", "--all", "--url", gw.url, "--token", tokens["carol"])
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split()[:3] == ["id", "user", "state"], lines
        assert any(ln.split()[:3] == [job["id"], "alice", "succeeded"] for ln in lines), lines
        # an admin's plain `jobs` stays their own
        mine = gm("jobs", "--url", gw.url, "--token", tokens["carol"])
        assert mine.stdout.strip() == "(no jobs)", mine
        # a student is told, not shown their own jobs as if nobody else had any
        out = gm("jobs", "--all", "--url", gw.url, "--token", tokens["bob"])
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr == (
            f"gpu-magic jobs: gpu-magic jobs --all lists every user's jobs and needs an admin "
            f"token; the gateway at {gw.url} takes the token from --token for user 'bob', who "
            "is not an admin. Leave out --all to list your own jobs.\n"), out.stderr
    finally:
        gw.stop()


def test_a_token_that_starts_with_a_dash_is_taken_after_token(tmp_path: Path) -> None:
    # a tokens file's token may start with '-' (one urlsafe token in 64 does): argparse read
    # it as an option and said --token had no value
    token = "-" + "x" * 42
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"alice": token}))
    tokens.chmod(0o600)
    gw = start_gateway(tmp_path, "--tokens-file", str(tokens))
    try:
        out = gm("jobs", "--url", gw.url, "--token", token)
        assert out.returncode == 0 and "no jobs" in out.stdout.lower(), (out.stdout, out.stderr)
        out = gm("jobs", "--url", gw.url, "--token", "--all")  # a forgotten value stays one
        assert out.returncode == 2 and "--token" in out.stderr, out.stderr
    finally:
        gw.stop()


def test_wrong_token_is_a_clear_error(gateway: Gateway, tmp_path: Path) -> None:
    # it says whose token was refused and where the right one is: a gateway of one user (its
    # owner's file) or a shared one (ask whoever runs it); not the HTTP header to send
    out = gm("pool", "--url", gateway.url, "--token", "w" * 43)
    assert out.returncode == 1
    assert f"the gateway at {gateway.url} refused the token from --token" in out.stderr
    assert "<state-dir>/token" in out.stderr and "pass it with --token TOKEN" in out.stderr
    assert "Bearer" not in out.stderr
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"alice": "a" * 43, "bob": "b" * 43}))
    tokens.chmod(0o600)
    shared = start_gateway(tmp_path, "--tokens-file", str(tokens), "--isolation", "none",
                           "--force")
    try:
        # the open health route says whether the gateway is shared, and only that
        assert httpx.get(shared.url + "/v1/health").json()["shared"] is True
        assert httpx.get(gateway.url + "/v1/health").json()["shared"] is False
        env = {**os.environ, "GPU_MAGIC_URL": shared.url, "GPU_MAGIC_TOKEN": "w" * 43}
        out = gm("jobs", env=env)
        assert out.returncode == 1
        assert "refused the token from GPU_MAGIC_TOKEN" in out.stderr, out.stderr
        assert "ask whoever runs the gateway for your token" in out.stderr
        assert "set GPU_MAGIC_TOKEN to it" in out.stderr and "Bearer" not in out.stderr
    finally:
        shared.stop()


def test_unreachable_gateway_is_a_clear_error() -> None:
    # the advice names where the URL came from: GPU_MAGIC_URL was never set here
    out = gm("pool", "--url", "http://127.0.0.1:9", "--token", "x" * 43)
    assert out.returncode == 1
    assert "cannot reach the gpu_magic gateway at http://127.0.0.1:9 (from --url)" in out.stderr
    assert "check --url" in out.stderr and "GPU_MAGIC_URL" not in out.stderr
    env = {**os.environ, "GPU_MAGIC_URL": "http://127.0.0.1:9", "GPU_MAGIC_TOKEN": "x" * 43}
    out = gm("pool", env=env)
    assert "(from GPU_MAGIC_URL)" in out.stderr and "check GPU_MAGIC_URL" in out.stderr


def test_tls_problems_get_tls_advice(tmp_path: Path, gateway: Gateway) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")  # not 127.0.0.1: an address it is not made out to
    chain, key, bundle = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(bundle))
    tls = start_gateway(tmp_path, "--certfile", str(chain), "--keyfile", str(key))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPU_MAGIC_") and k != "SSL_CERT_FILE"}
    try:
        named = tls.url.replace("127.0.0.1", "localhost")
        out = gm("pool", "--url", named, "--token", tls.token, env=env)  # a CA it does not know
        assert out.returncode == 1
        assert "CERTIFICATE_VERIFY_FAILED" in out.stderr
        assert "set SSL_CERT_FILE=/path/to/ca.pem" in out.stderr, out.stderr
        assert "Is it running" not in out.stderr and "GPU_MAGIC_URL" not in out.stderr
        env["SSL_CERT_FILE"] = str(bundle)
        assert gm("pool", "--url", named, "--token", tls.token, env=env).returncode == 0
        out = gm("pool", "--url", tls.url, "--token", tls.token, env=env)
        assert "is not made out to 127.0.0.1" in out.stderr, out.stderr
        # plain http to a TLS gateway, and https to a plain one
        out = gm("pool", "--url", named.replace("https:", "http:"), "--token", tls.token, env=env)
        assert f"It speaks https (--certfile): use {named}" in out.stderr, out.stderr
    finally:
        tls.stop()
    out = gm("pool", "--url", gateway.url.replace("http:", "https:"), "--token", gateway.token,
             env=env)
    assert "speaks plain http, not https" in out.stderr, out.stderr
    assert f"use {gateway.url}" in out.stderr


def test_serve_refuses_a_bad_simulated_pool(tmp_path: Path) -> None:
    out = gm("serve", "--port", "0", "--simulate", "H100:0", "--state-dir", str(tmp_path / "s"))
    assert out.returncode != 0
    assert "'H100:0' in the simulated pool asks for 0 GPUs" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "s").exists()  # refused before it made its state folder and token


@pytest.mark.parametrize(("args", "says"), [
    (["--port", "99999"], "argument --port: '99999' is not a port; give a whole number from 1 to "
                          "65535"),
    (["--state-dir", "/proc/gpu-magic-nowhere"],
     "cannot use /proc/gpu-magic-nowhere as the gateway's state directory (--state-dir): No "
     "such file or directory; give a folder"),
    (["--state-dir", "{file}"], "as the gateway's state directory (--state-dir): it is a file, "
                                "not a folder"),
    (["--certfile", "{missing}", "--keyfile", "{missing}"],
     "cannot read --certfile {missing}: No such file or directory"),
    (["--certfile", "{file}", "--keyfile", "{file}"], "not a PEM certificate and its private key"),
    (["--max-timeout", "-5"], "argument --max-timeout: '-5' is not a time of more than 0 seconds"),
    (["--max-timeout", "10s"], "argument --max-timeout: '10s' is not a number of seconds"),
    (["--keep-warm", "-1"], "argument --keep-warm: '-1' is not a time of 0 or more seconds"),
    (["--max-jobs-per-user", "-1"], "'-1' is not a whole number of 1 or more"),
    # every job refused: a user's own limit may be 0 (tokens file), the whole gateway's not
    (["--max-gpus-per-user", "0"], "'0' is not a whole number of 1 or more; write e.g. 2 (to "
                                   "hold one user's jobs, give that user \"max_gpus\": 0 in the "
                                   "tokens file)"),
    (["--max-blob-bytes", "0"], "'0' is not a size of one byte or more"),
    (["--max-job-bytes", "1x"], "'1x' is not a size; write it as bytes or with K, M, G or T"),
    (["--simulate", "H100:2,,"], "empty entry in the simulated pool 'H100:2,,'; separate entries "
                                 "with single commas, e.g. --simulate 'H100:2,A100-80GB:4'"),
    # a newcomer's trial: '' served from the working directory, a prefix was taken for the
    # option, --cold beside --keep-warm was silently one of them, and a token passed to cells
    (["--state-dir", ""], "argument --state-dir: an empty path: give a folder"),
    # a name that does not resolve was refused as "not loopback, with a single owner token"
    (["--host", "not.a.host.invalid"], "--host not.a.host.invalid: no address has that name "
                                       "here"),
    (["--keep-war", "5"], "unrecognized arguments: --keep-war 5; did you mean --keep-warm?"),
    (["--cold", "--keep-warm", "5"], "--cold and --keep-warm contradict each other"),
    (["--pass-env", "DATA_ROOT,GPU_MAGIC_TOKEN"], "argument --pass-env: GPU_MAGIC_TOKEN never "
                                                  "reaches a cell"),
    # it quietly served this host's real GPUs: the opposite of what was asked
    (["--simulate", ""], "argument --simulate: an empty pool: give the simulated GPUs, e.g. "
                         "--simulate 'H100:2,A100-80GB:4', or leave out --simulate"),
])
def test_serve_refuses_bad_values_in_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    # --port 99999 and an impossible --state-dir ended in a Python traceback
    file = tmp_path / "a-file"
    file.write_text("not a folder, nor a certificate\n")
    where = {"file": str(file), "missing": str(tmp_path / "missing.pem")}
    args = [a.format(**where) for a in args]
    extra = [] if "--state-dir" in args else ["--state-dir", str(tmp_path / "state")]
    out = gm("serve", "--port", "0", "--simulate", "T4:1", *extra, *args)
    assert out.returncode == 2, out.stdout
    assert "Traceback" not in out.stderr
    assert says.format(**where) in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("gpu-magic serve: ")


def test_serve_refuses_a_state_folder_it_cannot_write_in_one_line(tmp_path: Path) -> None:
    # root's mkdir of /sys/kernel succeeds, and the lock file then failed: a traceback (a
    # newcomer's trial); a lock file that cannot be opened fails the same way for anyone
    state = tmp_path / "state"
    (state / "gateway.lock").mkdir(parents=True)
    out = gm("serve", "--port", "0", "--simulate", "T4:1", "--state-dir", str(state))
    assert out.returncode == 2, out.stdout
    assert "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        f"gpu-magic serve: cannot use {state} as the gateway's state directory: Is a "
        "directory; give a folder this user can create and write, e.g. --state-dir "
        "~/gpu-magic-state"), out.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--ray-address", "127.0.0.1:1"],
     "--ray-address is an option of the Ray backend, and this gateway uses the local backend: "
     "add --backend ray to use the Ray cluster, or leave it out."),
    (["--ray-autoscale", "H100:8", "--simulate", "T4:1"],
     "--ray-autoscale is an option of the Ray backend"),
])
def test_serve_refuses_ray_options_without_the_ray_backend(tmp_path: Path, args: list[str],
                                                           says: str) -> None:
    # the README trial: --ray-address without --backend ray started a local gateway in
    # silence, the address ignored
    out = gm("serve", "--port", "0", "--state-dir", str(tmp_path / "state"), *args)
    assert out.returncode == 2, out.stdout
    assert not (tmp_path / "state").exists()  # (a refused gateway left a folder and a token)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-magic serve: "), out.stderr
    assert says in out.stderr, out.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--isolation", "bwrap"], "--isolation bwrap sandboxes the local backend's runners; with "
                               "--backend ray cells run in Ray workers on the nodes, which the "
                               "gateway does not sandbox. Leave out --isolation"),
    (["--simulate", "H100:2"], "--simulate H100:2 makes a simulated pool of the local backend; "
                               "with --backend ray the pool is the Ray cluster's GPU nodes. "
                               "Leave out --simulate to use the cluster; for a simulated pool, "
                               "--backend local --simulate H100:2, or a one-machine Ray"),
    # several users: Ray's advice, not the sandbox's (bubblewrap does not help on Ray)
    (["--tokens-file", "{tokens}", "--isolation", "none"],
     "this gateway would serve 2 users on Ray, whose workers run cells without the gateway's "
     "sandbox"),
])
def test_serve_refuses_local_backend_options_with_ray(tmp_path: Path, args: list[str],
                                                      says: str) -> None:
    # both started in silence on Ray: cells unsandboxed, the cluster's GPUs instead of a
    # simulated pool. Refused before any Ray cluster is looked for (there is none here).
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"alice": "a" * 43, "bob": "b" * 43}))
    tokens.chmod(0o600)
    args = [a.format(tokens=tokens) for a in args]
    out = gm("serve", "--port", "0", "--state-dir", str(tmp_path / "state"), "--backend", "ray",
             "--ray-address", "127.0.0.1:1", *args)
    assert out.returncode == 2, out.stdout
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-magic serve: "), out.stderr
    assert says in out.stderr, out.stderr
    assert not (tmp_path / "state").exists()  # (refused before it made a folder and a token)


def test_a_simulated_pool_s_unknown_type_names_are_noted_where_users_look(
        tmp_path: Path) -> None:
    # H1000 and GARBAGE started pools of those names in silence; a pool may name its own
    # types, so they are kept, and said: in the log, the pool view and the refusal they cause
    gw = start_gateway(tmp_path, simulate="H1000:2,GARBAGE:1,T4:1")
    try:
        typo = ("the simulated pool's type 'H1000' is not a known GPU type; did you mean H100? "
                "(keep it if you meant a type of your own)")
        custom = "the simulated pool's type 'GARBAGE' is not a known GPU type ("
        log = (tmp_path / "gateway.log").read_text()
        assert f"gpu-magic serve: note: {typo}" in log and custom in log, log
        assert "'T4'" not in log
        out = gm("pool", "--url", gw.url, "--token", gw.token)
        assert out.returncode == 0, out.stderr
        assert f"\nnote: {typo}\n" in out.stdout and f"\nnote: {custom}" in out.stdout
        with gw.client() as c:
            with pytest.raises(gpu_magic.NoFeasibleOption) as info:
                gpu_magic.run("1", "H100", {"__name__": "__main__"}, client=c, quiet=True)
            assert f"Note: {typo}." in str(info.value), info.value
            # a name meant as the pool's own still runs
            ns = {"__name__": "__main__"}
            gpu_magic.run("x = 1", "H1000", ns, client=c, quiet=True)
            assert ns["x"] == 1
    finally:
        gw.stop()


def test_serve_s_simulate_advice_names_the_flag(tmp_path: Path) -> None:
    out = gm("serve", "--port", "0", "--simulate", "T4;8", "--state-dir", str(tmp_path))
    assert out.returncode == 2
    assert "'T4;8' in the simulated pool 'T4;8' is not TYPE[:COUNT][@NODE]" in out.stderr
    assert "write e.g. --simulate 'H100:2,A100-80GB:4'" in out.stderr, out.stderr
    assert "GPU_MAGIC_SIMULATE" not in out.stderr


@pytest.mark.parametrize("args, says", [
    (["serve", "--max-timout", "5"], "gpu-magic serve: error: unrecognized arguments: "
                                     "--max-timout 5; did you mean --max-timeout?"),
    (["pool", "--urll=http://x"], "gpu-magic pool: error: unrecognized arguments: "
                                  "--urll=http://x; did you mean --url?"),
    (["serv"], "gpu-magic: error: 'serv' is not a command; did you mean serve?"),
    (["launch"], "'launch' is not a command (choose from serve, stop, pool, jobs, demo)"),
    (["--foo", "serve"], "gpu-magic: error: unrecognized arguments: --foo"),
])
def test_a_misspelt_command_or_option_is_answered_with_the_one_meant(
        args: list[str], says: str) -> None:
    # argparse printed the top-level usage, and no suggestion
    out = gm(*args)
    assert out.returncode == 2 and says in out.stderr, out.stderr
    assert f"usage: gpu-magic {args[0]}" in out.stderr or args[0] in ("serv", "launch", "--foo")


def test_serve_says_it_does_not_read_gpu_magic_simulate(tmp_path: Path) -> None:
    # an admin who set the magic's variable for `serve` got "pool: no GPUs" and no word why
    gw = start_gateway(tmp_path, simulate=None, env={"GPU_MAGIC_SIMULATE": "A100-80GB:2,T4:1"})
    try:
        log = (tmp_path / "gateway.log").read_text()
        assert ("note: GPU_MAGIC_SIMULATE='A100-80GB:2,T4:1' is set, but serve takes its pool "
                "from --simulate" in log), log
        assert "start it with --simulate A100-80GB:2,T4:1" in log
        with gw.client() as c:
            pool = c.pool()
            assert not pool["simulated"]
            if not pool["types"]:  # (a machine with GPUs has a pool: nothing is refused)
                # its users, who cannot change its pool, are told to ask whoever runs it
                with pytest.raises(gpu_magic.NoFeasibleOption) as info:
                    gpu_magic.run("1", "T4", {"__name__": "__main__"}, client=c, quiet=True)
                said = str(info.value)
                assert "this gateway has no GPUs" in said and "Tell whoever runs it" in said
                assert "--simulate 'H100:2,A100-80GB:4'" in said, said
                assert "GPU_MAGIC_SIMULATE" not in said, said
    finally:
        gw.stop()
    gw = start_gateway(tmp_path, simulate="T4:1", env={"GPU_MAGIC_SIMULATE": "H100:1"})
    gw.stop()
    assert (tmp_path / "gateway.log").read_text().count("GPU_MAGIC_SIMULATE=") == 1


def test_a_gateways_own_token_can_follow_token_on_a_command_line(tmp_path: Path) -> None:
    # a urlsafe token starts with '-' one time in 64, and argparse then reads
    # `--token -abc...` as a missing value; the tokens a gateway makes never do
    firsts = set()
    for i in range(300):
        (tmp_path / str(i)).mkdir()
        tokens, _ = owner_token(tmp_path / str(i))
        token = next(iter(tokens))
        assert len(token) >= MIN_TOKEN_CHARS
        firsts.add(token[0])
    assert "-" not in firsts and len(firsts) > 10


def test_pool_looks_at_the_running_local_gateway_without_restarting_it(tmp_path: Path) -> None:
    # a demo's gateway is simulated (GPU_MAGIC_SIMULATE in the notebooks' environment); a
    # terminal without that variable must see it, not restart it as one with no GPUs
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_MAGIC_")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    env["JUPYTER_DATA_DIR"] = str(tmp_path / "data")
    start = subprocess.run(
        [sys.executable, "-c", "from gpu_magic._embedded import ensure_local_gateway as e; "
         "print(e('H100:2')['pid'])"], capture_output=True, text=True, timeout=120, env=env)
    assert start.returncode == 0, start.stderr
    try:
        for command in ("pool", "jobs"):
            out = gm(command, env=env)
            assert out.returncode == 0, out.stderr
            assert "restarting" not in out.stderr
        assert gm("pool", env=env).stdout.startswith("simulated pool")
        info = json.loads(next((tmp_path / "runtime").glob("gpu-magic-gateway-*.json")).read_text())
        assert info["pid"] == int(start.stdout) and info["config"]["simulate"] == "H100:2"
    finally:
        gm("stop", env=env)


def test_terminal_errors_give_terminal_advice(gateway: Gateway) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_MAGIC_")}
    out = gm("pool", "--url", gateway.url, env=env)
    assert out.returncode == 1
    assert "pass --token TOKEN or set GPU_MAGIC_TOKEN" in out.stderr
    assert "%config" not in out.stderr and "%gpu" not in out.stderr
    # a URL where nothing listens is said to be that, not a missing token (an API trial)
    out = gm("pool", "--url", "http://127.0.0.1:1", env=env)
    assert out.returncode == 1
    assert "nothing answers at http://127.0.0.1:1 (" in out.stderr and "token" not in \
        out.stderr, out.stderr
    # the API's /v1, copied along with the address, is not doubled
    out = gm("pool", "--url", gateway.url + "/v1/", "--token", gateway.token, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("simulated pool")


def _line_with(stream: Any, word: str) -> str:
    """The next line of an unbuffered pipe that holds ``word`` (a buffered reader may hold
    the next lines where select cannot see them)."""
    import select
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if select.select([stream], [], [], 1.0)[0]:
            line = stream.readline().decode()
            if word in line:
                return str(line)
            assert line, f"ended before a line with {word!r}"
    raise AssertionError(f"no line with {word!r}")


def test_serve_s_log_says_its_limits_why_it_stops_and_what_it_marked_lost(
        tmp_path: Path) -> None:
    # an admin's terminal showed nothing of a SIGTERM, of jobs it cut short, or of its limits
    import signal

    from gpu_magic._client import GatewayClient

    from .test_gateway_http import submit

    def serve() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "gpu_magic", "serve", "--port", "0", "--simulate", "T4:1",
             "--state-dir", str(tmp_path), "--max-jobs-per-user", "3", "--max-timeout", "600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)

    proc = serve()
    try:
        url = _line_with(proc.stdout, "listening on").split("listening on ")[1].split()[0]
        assert _line_with(proc.stdout, "limits:") == (
            "limits: a cell runs at most 600 s, 3 jobs per user (a user's own job and GPU "
            "limits, from the tokens file or PUT /v1/limits, win)\n")
        with GatewayClient(url, (tmp_path / "token").read_text().strip()) as c:
            job = submit(c, "import time\ntime.sleep(60)", "T4", background=True)
            submit(c, "1", "T4", background=True)  # (queued behind it)
            wait_for(lambda: c.job(job["id"])["state"] == "running", 60)
        proc.send_signal(signal.SIGTERM)
        assert _line_with(proc.stderr, "stopping") == (
            "gpu-magic: stopping (SIGTERM): 1 running and 1 queued job(s) end with it, as "
            "lost\n")
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    proc = serve()
    try:
        # they ended with it, saying why (a gateway killed outright leaves them to the next,
        # which says so: test_reliability)
        url = _line_with(proc.stdout, "listening on").split("listening on ")[1].split()[0]
        with GatewayClient(url, (tmp_path / "token").read_text().strip()) as c:
            record = c.job(job["id"])
            assert record["state"] == "lost"
            assert record["message"] == ("the gateway was stopped (SIGTERM) while this job was "
                                         "running; its output so far is kept. Run the cell "
                                         "again."), record
            ended = list(c.events(job["id"]))[-1]
            assert ended["type"] == "done" and ended["state"] == "lost"
            queued = [j for j in c.jobs() if j["id"] != job["id"]]
            assert [j["message"] for j in queued] == [
                "the gateway was stopped (SIGTERM) while this job waited in the queue; nothing "
                "ran. Run the cell again."]
    finally:
        proc.terminate()
        proc.wait(60)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_serve_stops_on_ctrl_c_without_a_traceback(tmp_path: Path) -> None:
    # the refusal of a second gateway tells users to press Ctrl-C where it runs: that ended in
    # "stopping", then a KeyboardInterrupt traceback uvicorn raised again once it had stopped
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_magic", "serve", "--port", "0", "--simulate", "T4:1",
         "--state-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "listening on" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert err == "gpu-magic: stopping (Ctrl-C)\n", err
    assert proc.returncode == 0


def test_pool_and_jobs_start_no_local_gateway(tmp_path: Path) -> None:
    # they only look: with none running they say so, and none is started (it would have no
    # GPUs and live an hour)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_MAGIC_")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    env["JUPYTER_DATA_DIR"] = str(tmp_path / "data")
    try:
        for command in ("pool", "jobs"):
            out = gm(command, env=env)
            assert out.returncode == 1, out
            assert out.stderr.startswith(f"gpu-magic {command}: no local gpu_magic gateway is "
                                         "running"), out.stderr
            assert "`gpu-magic serve`" in out.stderr and "--url URL" in out.stderr
            assert "%%gpu cell" in out.stderr
        assert not list((tmp_path / "runtime").glob("gpu-magic-gateway-*.json"))
    finally:
        gm("stop", env=env)


def test_serve_takes_blob_limits_with_units(tmp_path: Path) -> None:
    # --blob-reserve took 2G; --max-blob-bytes refused 1G with "write e.g. 2" (two bytes?)
    from .conftest import start_gateway

    gw = start_gateway(tmp_path, "--max-blob-bytes", "1M", "--max-job-bytes", "3K")
    try:
        with gw.client() as c:
            limits = c._request("GET", "/v1/limits").json()["limits"]
        assert (limits["max_blob_bytes"], limits["max_job_bytes"]) == (1 << 20, 3 << 10)
    finally:
        gw.stop()


@pytest.mark.parametrize("command", ["pool", "jobs", "stop", "serve"])
def test_a_reader_that_stops_early_gets_no_traceback(
        command: str, gateway: Gateway, tmp_path: Path) -> None:
    # `gpu-magic jobs | head -1` printed a BrokenPipeError's traceback when head had gone
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_MAGIC_")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")  # stop: nobody else's gateway
    args = {"pool": ["--url", gateway.url, "--token", gateway.token],
            "jobs": ["--url", gateway.url, "--token", gateway.token],
            "stop": [],
            "serve": ["--port", "0", "--state-dir", str(tmp_path / "state"),
                      "--simulate", "T4:1"]}[command]
    proc = subprocess.Popen([sys.executable, "-m", "gpu_magic", command, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the command writes: every write fails
    try:
        err = proc.stderr.read()
        proc.wait(60)
    finally:
        proc.stderr.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert err == ""
    assert proc.returncode == 141  # as a shell reports `ls` writing into a closed pipe


def test_a_second_gateway_on_a_hand_served_state_directory_says_how_to_stop_that_one(
        tmp_path: Path) -> None:
    # it said `gpu-magic stop`, which stops only the embedded gateway (found by a newcomer)
    first = start_gateway(tmp_path)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "gpu_magic", "serve", "--port", "0", "--simulate", "T4:1",
             "--state-dir", str(first.state_dir)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"stop it first (Ctrl-C where it runs, or kill {first.proc.pid})" in second.stderr
        assert "gpu-magic stop" not in second.stderr, second.stderr
    finally:
        first.stop()


@pytest.mark.parametrize(("holder", "stop"), [
    ({"pid": 5}, "kill 5"),  # still starting: not known to be the embedded one
    ({"pid": 5, "url": "http://127.0.0.1:1", "embedded": True}, "gpu-magic stop, or kill 5"),
    ({"pid": 5, "url": "http://127.0.0.1:1", "embedded": False}, "Ctrl-C where it runs, or kill 5"),
])
def test_the_state_directory_busy_message_says_how_to_stop_its_holder(
        holder: dict[str, object], stop: str) -> None:
    from gpu_magic.server.lock import StateDirBusy

    assert f"stop it first ({stop})," in str(StateDirBusy(Path("/state"), holder))


@pytest.mark.parametrize("isolation", ["none", "bwrap"])
def test_a_shared_gateway_says_how_it_runs_cells_and_who_a_reload_changed(
        tmp_path: Path, isolation: str) -> None:
    # a department's trial: --force (given to get past the TLS check) turned the sandbox off
    # without a word, the start lines never said whether cells were sandboxed, and a reload
    # did not say who it added or removed; "1 jobs per user"
    import secrets
    import signal

    if isolation == "bwrap" and shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap (make test installs it)")
    tokens = tmp_path / "tokens.json"

    def write(*users: str, admins: tuple[str, ...] = ()) -> None:
        tokens.write_text(json.dumps({u: {"token": secrets.token_hex(16), "admin": u in admins}
                                      for u in users}))
        tokens.chmod(0o600)

    write("alice", "bob")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_magic", "serve", "--port", "0", "--simulate", "T4:1",
         "--state-dir", str(tmp_path / "state"), "--tokens-file", str(tokens),
         "--isolation", isolation, *(["--force"] if isolation == "none" else []),
         "--max-jobs-per-user", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        how = ("cells NOT isolated from each other (--force)" if isolation == "none"
               else "each cell in a bubblewrap sandbox, with the environment's PATH, locale, "
                    "Python, CUDA and proxy variables only (--pass-env NAMES for more)")
        assert _line_with(proc.stdout, "users:") == f"users: 2, {how}\n"
        assert _line_with(proc.stdout, "limits:").startswith("limits: 1 job per user (")
        if isolation == "none":
            assert "each can read the tokens file and every user's data" in _line_with(
                proc.stderr, "warning:")
        write("alice", "carol")
        proc.send_signal(signal.SIGHUP)
        assert _line_with(proc.stderr, "reloaded").endswith(
            f"reloaded {tokens} (added carol; removed bob)\n")
        # (a teacher's trial: an admin's right taken away went unsaid)
        write("alice", "carol", admins=("alice",))
        proc.send_signal(signal.SIGHUP)
        assert _line_with(proc.stderr, "reloaded").endswith(
            f"reloaded {tokens} (made admin alice)\n")
        write("alice", "carol")
        proc.send_signal(signal.SIGHUP)
        assert _line_with(proc.stderr, "reloaded").endswith(
            f"reloaded {tokens} (no longer admin alice)\n")
    finally:
        proc.terminate()
        proc.wait(60)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_a_stop_with_nothing_to_cancel_logs_no_error() -> None:
    # two trials read uvicorn's "ERROR: Cancel 0 running task(s), timeout graceful shutdown
    # exceeded", said at each stop while clients kept idle connections, as a fault
    import logging

    from gpu_magic.server.serve import _no_idle_cancel

    def record(n: int) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1,
                                 "Cancel %s running task(s), timeout graceful shutdown exceeded",
                                 (n,), None)

    assert not _no_idle_cancel(record(0))
    assert _no_idle_cancel(record(2))  # (tasks really cancelled are still said)


def test_a_job_listing_dates_jobs_from_another_day() -> None:
    # a department's trial: `%gpu jobs` and `gpu-magic jobs` said only "14:02:11" of jobs
    # from several days
    import time

    from gpu_magic._tables import jobs_text

    now = time.time()
    recs = [{"id": f"{i:016x}", "state": "succeeded", "spec": "T4", "created": at}
            for i, at in enumerate((now, now - 3 * 86400))]
    rows = {ln.split()[0]: ln.rstrip() for ln in jobs_text(recs).splitlines()[1:]}
    assert rows[f"{0:016x}"].endswith(time.strftime("%H:%M:%S", time.localtime(now)))
    assert rows[f"{1:016x}"].endswith(time.strftime("%Y-%m-%d %H:%M",
                                                    time.localtime(now - 3 * 86400)))
