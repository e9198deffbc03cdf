"""The magic's own behaviour in real kernels: its configuration, its messages, its checks."""

from __future__ import annotations

import getpass
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import start_new_kernel

from .conftest import Gateway, plain, start_class_gateway, start_gateway, wait_for


class Kernel:
    """A real ipykernel; ``run`` executes one cell and returns what it showed."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.km, self.kc = start_new_kernel(kernel_name="python3", env=env, cwd=str(cwd))

    def run(self, code: str, stdin: bool = True) -> dict[str, Any]:
        msg_id = self.kc.execute(code, allow_stdin=stdin)
        seen: dict[str, Any] = {"stdout": "", "stderr": "", "result": None, "error": None,
                                "display": "", "bundles": []}
        while True:
            m = self.kc.get_iopub_msg(timeout=120)
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = m["msg_type"], m["content"]
            if kind == "status" and content["execution_state"] == "idle":
                return seen
            if kind == "stream":
                seen[content["name"]] += content["text"]
            elif kind == "execute_result":
                seen["result"] = content["data"]["text/plain"]
            elif kind == "display_data":
                seen["display"] += content["data"].get("text/plain", "")
                seen["bundles"].append(content["data"])
            elif kind == "error":  # (its traceback without IPython's colours)
                seen["error"] = {**content, "traceback": [plain(t) for t in content["traceback"]],
                                 "coloured": content["traceback"]}

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any gpu_magic settings, with runtime and data
    directories of the test's own (so a local gateway, should one start, is this test's, keeps
    its state there, and is stopped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_MAGIC_")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    env["JUPYTER_DATA_DIR"] = str(tmp_path / "data")  # (its state directory too)
    return {**env, **extra}


@pytest.fixture
def kernel_factory(tmp_path: Path) -> Iterator[Any]:
    kernels: list[Kernel] = []

    def make(**extra: str) -> Kernel:
        k = Kernel(_env(tmp_path, **extra), tmp_path)
        kernels.append(k)
        k.run("%load_ext gpu_magic")
        return k

    yield make
    for k in kernels:
        k.close()
    subprocess.run([sys.executable, "-m", "gpu_magic", "stop"], capture_output=True,
                   env=_env(tmp_path), timeout=60)


def _error_text(out: dict[str, Any]) -> str:
    err = out["error"]
    assert err is not None, out
    return "\n".join(err["traceback"])


@pytest.mark.parametrize("section", ["GPUMagic", "GPUMagics"])
def test_config_url_and_token_choose_the_gateway(gateway: Gateway, kernel_factory: Any,
                                                 section: str) -> None:
    # DESIGN.md spells it GPUMagic, an older README GPUMagics: both configure the magic
    k = kernel_factory()
    assert k.run(f'%config {section}.url = "{gateway.url}"')["error"] is None
    assert k.run(f'%config {section}.token = "{gateway.token}"')["error"] is None
    out = k.run("%%gpu A100-80GB\nimport os\nos.environ['GPU_MAGIC_GRANT'] != ''")
    assert out["result"] == "True", out
    status = k.run("%gpu status")["stdout"]
    assert status.startswith(f"gateway {gateway.url} (GPUMagic.url config)"), status
    user = getpass.getuser()  # the owner of a gateway with its own token, an admin
    assert f"the token from %config GPUMagic.token is accepted as user {user} (admin)" in status
    pool = k.run("%gpu pool")
    assert pool["error"] is None, pool


def test_connect_wins_over_the_config_until_connect_local(gateway: Gateway,
                                                          kernel_factory: Any) -> None:
    k = kernel_factory(GPU_MAGIC_TOKEN=gateway.token)
    k.run('%config GPUMagic.url = "http://127.0.0.1:9"')
    assert k.run(f"%gpu connect {gateway.url}")["stdout"].startswith("connected to")
    assert f"gateway {gateway.url} (%gpu connect)" in k.run("%gpu status")["stdout"]
    # `%gpu connect local` undoes the connect: back to what is configured, and says so
    back = k.run("%gpu connect local")["stdout"]
    assert back.startswith("back to the gateway http://127.0.0.1:9 (GPUMagic.url config)"), back
    # and an unreachable one names that setting, not GPU_MAGIC_URL that nobody set
    unreachable = _error_text(k.run("%gpu pool"))
    assert "(from %config GPUMagic.url)" in unreachable, unreachable
    assert "check %config GPUMagic.url" in unreachable and "GPU_MAGIC_URL" not in unreachable


def test_line_magics_report_an_unreachable_gateway_as_cleanly_as_a_cell(
        kernel_factory: Any) -> None:
    k = kernel_factory(GPU_MAGIC_URL="http://127.0.0.1:9", GPU_MAGIC_TOKEN="x" * 43)
    cell = _error_text(k.run("%%gpu\n1"))
    assert cell.startswith("GatewayError: cannot reach the gpu_magic gateway at "
                           "http://127.0.0.1:9"), cell
    for line in ("%gpu pool", "%gpu jobs", "%gpu cancel 0123456789abcdef",
                 "%gpu attach 0123456789abcdef"):  # (ids of the form the gateway makes)
        out = k.run(line)
        err = out["error"]
        assert err is not None, (line, out)
        # one line, the same message as the cell's, and none of our own stack
        assert err["traceback"] == [cell], (line, err["traceback"])
    # the diagnostic command says the same as its status, without an error
    out = k.run("%gpu status")
    assert out["error"] is None and out["stdout"] == cell.removeprefix("GatewayError: ") + "\n"


@pytest.mark.parametrize("flags, message", [
    ("--timeout 0", "--timeout 0: the cell's time limit must be more than 0"),
    ("--timeout -5", "--timeout -5: the cell's time limit must be more than 0"),
    ("--timeout nan", "--timeout nan: the cell's time limit must be more than 0"),
    ("--timeout 1e9", "--timeout 1000000000: the cell's time limit must be more than 0 and at "
                      "most"),
    ("--timeout 3000000", "--timeout 3000000: the cell's time limit"),  # (was echoed as 3e+06)
    ("--wait -1", "--wait -1: the time to wait in the queue must be 0 or more"),
    ("--retries -1", "--retries -1: the re-runs after a runner died must be a whole number "
                     "from 0 to 10"),
    ("--retries 11", "--retries 11: the re-runs after a runner died"),
    # the grant decides which GPUs a cell sees: on a shared node others may be another job's
    ("--env CUDA_VISIBLE_DEVICES=3", "--env CUDA_VISIBLE_DEVICES: the grant sets this"),
    ("--env GPU_MAGIC_GRANT={} --env A=1", "--env GPU_MAGIC_GRANT: GPU_MAGIC_ variables are "
                                           "gpu_magic's own where the cell runs"),
    # no value at all: said with what to write, not argparse's "expected one argument"
    ("--env", "--env needs KEY=VALUE (or KEY alone: this kernel's value), e.g. --env "
              "MY_SETTING=1"),
    ("--return", "--return needs the names to bring back, separated by commas, e.g. --return "
                 "model,loss"),
    ("--timeout", "--timeout needs a number of seconds, e.g. --timeout 600"),
])
def test_bad_option_values_are_refused_before_anything_is_sent(
        gateway: Gateway, kernel_factory: Any, flags: str, message: str) -> None:
    k = kernel_factory(GPU_MAGIC_URL=gateway.url, GPU_MAGIC_TOKEN=gateway.token)
    k.run("import numpy as np\nbig = np.random.default_rng().random(100_000)")
    with gateway.client() as client:
        before = len(client.jobs())
        out = k.run(f"%%gpu H100 {flags}\nbig.sum()")
        assert out["error"] is None and f"UsageError: {message}" in out["stderr"], out
        assert "leave it out" in out["stderr"]
        assert len(client.jobs()) == before
        big = k.run("from gpu_magic._payload import digest\ndigest(big.tobytes())")["result"]
        assert client.missing([big.strip("'")]) == [big.strip("'")]  # not uploaded either


def test_syntax_errors_and_tracebacks_number_the_lines_alike(gateway: Gateway,
                                                            kernel_factory: Any) -> None:
    # as the notebook numbers them: the %%gpu line is line 1 (so the remote traceback did)
    k = kernel_factory(GPU_MAGIC_URL=gateway.url, GPU_MAGIC_TOKEN=gateway.token)
    out = k.run("%%gpu\nx = 1\nz = 2 2")
    syntax = _error_text(out)
    # shown as a local cell's: where (its In[] number, as a local error says), the line, a
    # caret, SyntaxError
    assert re.match(r"  Cell In\[\d+\], line 3\n    z = 2 2\n", syntax), syntax
    assert "SyntaxError: invalid syntax" in syntax, syntax
    assert out["error"]["ename"] == "CellSyntaxError"  # a SyntaxError, for the code below
    caught = k.run("try:\n    get_ipython().run_cell_magic('gpu', 'H100', 'x = 1\\nz = 2 2')\n"
                   "except SyntaxError as e:\n    print('caught', e.lineno, e.msg)")
    assert caught["error"] is None and caught["stdout"] == "caught 3 invalid syntax\n", caught
    runtime = _error_text(k.run("%%gpu\nx = 1\nz = 1 / 0"))
    assert ", line 3" in runtime and "----> 3 z = 1 / 0" in runtime, runtime
    # and warnings too, under the cell's own name (not the runner's <ipython-input-...>)
    out = k.run("%%gpu\nimport warnings\nwarnings.warn('lr too high')")
    label = re.search(r"Cell In\[\d+\]", runtime)
    assert label is not None, runtime
    count = int(label.group(0)[8:-1]) + 1  # the next cell
    assert f"Cell In[{count}]:3: UserWarning: lr too high" in out["stderr"], out
    assert "ipython-input" not in out["stderr"]


@pytest.mark.parametrize("body, line, message", [
    ("for i in range(3):\n    pass\ncontinue", 4, "'continue' not properly in loop"),
    ("x = 1\nbreak", 3, "'break' outside loop"),
    ("\nreturn 5", 3, "'return' outside function"),
    ("yield 5", 2, "'yield' outside function"),
    ("def f():\n    nonlocal y", 3, "no binding for nonlocal 'y' found"),
])
def test_errors_the_compiler_finds_are_refused_before_anything_is_sent(
        gateway: Gateway, kernel_factory: Any, body: str, line: int, message: str) -> None:
    # the parser lets these through: found before a GPU is asked for, not on it
    k = kernel_factory(GPU_MAGIC_URL=gateway.url, GPU_MAGIC_TOKEN=gateway.token)
    with gateway.client() as client:
        before = len(client.jobs())
        text = _error_text(k.run(f"%%gpu H100\n{body}"))
        assert re.match(rf"  Cell In\[\d+\], line {line}\n", text), text
        assert f"SyntaxError: {message}" in text, text
        assert len(client.jobs()) == before


def test_the_syntax_error_display_leaves_other_exception_handlers_alone(
        kernel_factory: Any) -> None:
    k = kernel_factory()
    k.run("%unload_ext gpu_magic")
    k.run("def mine(self, etype, value, tb, tb_offset=None):\n    print('mine', value)\n"
          "get_ipython().set_custom_exc((ValueError,), mine)")
    k.run("%load_ext gpu_magic")
    assert k.run("raise ValueError('v')")["stdout"] == "mine v\n"  # still the user's
    assert re.match(r"  Cell In\[\d+\], line 2\n", _error_text(k.run("%%gpu\nz = 2 2")))
    k.run("%unload_ext gpu_magic")
    out = k.run("print(get_ipython().custom_exceptions)")
    assert out["stdout"] == "(<class 'ValueError'>,)\n", out
    assert k.run("raise ValueError('w')")["stdout"] == "mine w\n"


def test_a_refused_token_names_its_source(gateway: Gateway, kernel_factory: Any) -> None:
    k = kernel_factory()
    connect = _error_text(k.run(f"%gpu connect {gateway.url} --token {'w' * 43}"))
    assert connect.startswith(f"AuthError: the gateway at {gateway.url} refused the token from "
                              "%gpu connect --token"), connect
    assert "give it with %gpu connect URL --token TOKEN" in connect
    k.run(f'%config GPUMagic.url = "{gateway.url}"')
    k.run(f'%config GPUMagic.token = "{"v" * 43}"')
    cell = _error_text(k.run("%%gpu\n1"))
    assert "refused the token from %config GPUMagic.token" in cell, cell
    assert "set it with %config GPUMagic.token = 'TOKEN'" in cell


def test_a_wrong_token_is_said_as_such_by_the_first_cell(gateway: Gateway,
                                                         kernel_factory: Any) -> None:
    # a department's trial: a mistyped or revoked token made every cell say "the GPU runner
    # has Python  but this kernel has 3.11" (the health of a refused caller names no Python)
    k = kernel_factory(GPU_MAGIC_URL=gateway.url, GPU_MAGIC_TOKEN="y" * 40)
    cell = _error_text(k.run("%%gpu\nprint(1)"))
    assert cell.startswith(f"AuthError: the gateway at {gateway.url} refused the token from "
                           "GPU_MAGIC_TOKEN"), cell
    out = k.run("x = 1")
    dry = k.run("%%gpu --dry-run\ny = x")
    assert out["error"] is None and dry["error"] is None, dry
    text = f"{dry['stdout']}{dry['result']}{dry['display']}"
    assert "refused the token from GPU_MAGIC_TOKEN" in text, dry
    assert "not reachable" not in text


def test_a_pasted_token_s_white_space_is_dropped_and_never_shown(gateway: Gateway,
                                                                   kernel_factory: Any) -> None:
    # a department's trial: a token read from a file kept its line break, and httpx's
    # "Illegal header value b'Bearer <the whole token>\n'" went into the saved notebook
    k = kernel_factory(GPU_MAGIC_URL=gateway.url, GPU_MAGIC_TOKEN=f" {gateway.token}\n")
    out = k.run("%%gpu\nz = 6 * 7")
    assert out["error"] is None, out
    assert k.run("print(z)")["stdout"] == "42\n"
    half = gateway.token[:12]
    k = kernel_factory(GPU_MAGIC_URL=gateway.url,
                       GPU_MAGIC_TOKEN=f"{half}\n{gateway.token[12:]}")
    out = k.run("%%gpu\nz = 1")
    cell = _error_text(out)
    assert cell.startswith("AuthError: the token from GPU_MAGIC_TOKEN has a line break inside "
                           f"it (character 13 of {len(gateway.token) + 1})"), cell
    assert half not in str(out) and gateway.token[12:] not in str(out), out


def test_status_says_whether_the_token_is_accepted(gateway: Gateway, kernel_factory: Any) -> None:
    # health needs no token: status asks once more with it, so a wrong one does not pass
    k = kernel_factory(GPU_MAGIC_URL=gateway.url, GPU_MAGIC_TOKEN="w" * 43)
    out = k.run("%gpu status")
    assert out["error"] is None, out
    lines = out["stdout"].splitlines()
    assert lines[0].startswith(f"gateway {gateway.url} (GPU_MAGIC_URL): gpu_magic"), lines
    assert "None" not in lines[0], lines  # ("Python None, backend None": not told to it)
    # (said once: "the token from GPU_MAGIC_TOKEN is refused: the gateway at … refused the
    # token from GPU_MAGIC_TOKEN")
    assert lines[1].startswith(f"the gateway at {gateway.url} refused the token from "
                               "GPU_MAGIC_TOKEN (wrong, or no longer valid)"), lines
    assert lines[1].count("GPU_MAGIC_TOKEN") == 2 and "set GPU_MAGIC_TOKEN to it" in lines[1]


def test_status_of_a_configured_gateway_without_a_token_says_so(kernel_factory: Any) -> None:
    # it raised a GatewayError: the diagnostic command answers with a status
    k = kernel_factory()
    out = k.run('%config GPUMagic.url = "http://127.0.0.1:2"\n%gpu status')
    assert out["error"] is None, out
    assert out["stdout"].startswith("no token for the gateway at http://127.0.0.1:2: set "
                                    "GPU_MAGIC_TOKEN"), out


def test_connect_without_stdin_says_how_to_give_the_token(gateway: Gateway,
                                                          kernel_factory: Any) -> None:
    # nbconvert and nbclient take no input: getpass cannot ask for the token there
    k = kernel_factory()
    out = k.run(f"%gpu connect {gateway.url}", stdin=False)
    assert out["error"] is None, out  # a UsageError: a message, not a traceback
    assert f"%gpu connect {gateway.url} needs the gateway's token and cannot ask" in out["stderr"]
    assert "%gpu connect URL --token TOKEN" in out["stderr"] and "GPU_MAGIC_TOKEN" in out["stderr"]
    assert "StdinNotImplementedError" not in out["stderr"]


def test_connect_s_prompt_an_empty_answer_and_who_you_are(gateway: Gateway,
                                                           kernel_factory: Any) -> None:
    # Enter at the prompt said "run %gpu connect URL (it asks for the token)", what had just
    # been done; a token taken did not say as whom
    k = kernel_factory()

    def typed(answer: str) -> dict[str, Any]:
        msg_id = k.kc.execute(f"%gpu connect {gateway.url}", allow_stdin=True)
        request = k.kc.get_stdin_msg(timeout=60)
        assert request["content"]["password"], request  # (not echoed)
        k.kc.input(answer)
        seen: dict[str, Any] = {"stdout": "", "stderr": ""}
        while True:
            m = k.kc.get_iopub_msg(timeout=60)
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                return seen
            if m["msg_type"] == "stream":
                seen[m["content"]["name"]] += m["content"]["text"]

    out = typed("")
    assert ("no token was typed, so nothing changed: run %gpu connect "
            f"{gateway.url} again and paste the gateway's token") in out["stderr"], out
    out = typed(gateway.token)
    assert out["stdout"].startswith(f"connected to {gateway.url} as "), out


def test_connect_asks_for_a_token_when_the_one_set_is_refused(gateway: Gateway,
                                                                kernel_factory: Any) -> None:
    # an instructor's trial: a student given a new token, the old one still in
    # GPU_MAGIC_TOKEN, was refused by %gpu connect and never asked for the new one
    k = kernel_factory(GPU_MAGIC_TOKEN="x" * 43)
    msg_id = k.kc.execute(f"%gpu connect {gateway.url}", allow_stdin=True)
    request = k.kc.get_stdin_msg(timeout=60)
    assert request["content"]["password"], request
    assert request["content"]["prompt"].startswith(
        f"the gateway at {gateway.url} refused the token from GPU_MAGIC_TOKEN"), request
    k.kc.input(gateway.token)
    stdout = ""
    while True:
        m = k.kc.get_iopub_msg(timeout=60)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
        if m["msg_type"] == "stream":
            stdout += m["content"]["text"]
    assert stdout.startswith(f"connected to {gateway.url} as "), stdout
    out = k.run("%gpu status")
    assert "%gpu connect's prompt" in out["stdout"], out
    # where nobody can type, the refusal itself, saying where the token came from
    k = kernel_factory(GPU_MAGIC_TOKEN="x" * 43)
    out = k.run(f"%gpu connect {gateway.url}", stdin=False)
    assert out["error"] is not None and out["error"]["ename"] == "AuthError", out
    assert "refused the token from GPU_MAGIC_TOKEN" in out["error"]["evalue"], out


@pytest.mark.parametrize(("line", "spec", "flags"), [
    ("T4  # a small model will do", "T4", ""),
    ("H100:2, any --timeout 60 # tried first", "H100:2, any", "--timeout 60"),
    ('T4 --env "TAG=#3" # quoted: kept', "T4", '--env "TAG=#3"'),
    ("T4 --env TAG=#3", "T4", "--env TAG=#3"),  # (inside a word: not a comment)
    ("T4 --env MSG=don\\'t # c", "T4", "--env MSG=don\\'t"),  # (an escaped quote)
    ("# nothing but a note", "", ""),
])
def test_a_comment_on_the_magic_line_is_left_out(line: str, spec: str, flags: str) -> None:
    # a trial: `%%gpu T4  # ...` was refused as a spec that is not a GPU type
    from gpu_magic._magic import _split, _without_comment

    assert _split(_without_comment(line)) == (spec, flags)


def test_misspelled_options_and_commands_get_a_suggestion(kernel_factory: Any) -> None:
    # as spec errors do ('H1000' ... did you mean H100?); all refused before anything is sent
    k = kernel_factory(GPU_MAGIC_URL="http://127.0.0.1:9", GPU_MAGIC_TOKEN="x" * 43)
    for line, message in [
        ("%%gpu T4 --wiat 3\n1", "unrecognized arguments: --wiat; did you mean --wait?"),
        ("%%gpu T4 --timout=5\n1", "unrecognized arguments: --timout=5; did you mean --timeout?"),
        ("%%gpu --oom_fallback\n1", "did you mean --oom-fallback?"),
        ("%gpu stauts", "'stauts' is not a %gpu command; did you mean status?"),
        ("%gpu job", "'job' is not a %gpu command; did you mean jobs?"),
        ("%gpu connect http://127.0.0.1:9 --tokn abc",
         "%gpu connect does not take '--tokn'; did you mean --token?"),
        ("%gpu pool --all", "%gpu pool takes nothing after it, not '--all'"),
        # one % too few, and a quote left open (it was read as part of the spec)
        ("%gpu H100:2, any", "'H100:2, any' is not a %gpu command: to run a cell on a GPU, "
         "write %%gpu (two %) on the cell's first line and the code below it:\n"
         "%%gpu H100:2, any\n..."),
        ("%gpu cancel 'abc", "%gpu cancel 'abc cannot be read: no closing quotation; close "
         "each quote"),
    ]:
        out = k.run(line)
        assert out["error"] is None and message in out["stderr"], (line, out)
        assert out["stderr"].startswith("UsageError: "), (line, out)
    out = k.run("%%gpu T4 'unterminated\n1")
    assert out["error"]["traceback"][0].startswith(
        "SpecError: 'T4 'unterminated' is not a valid option: a GPU spec has no quotes"), out


def test_a_remote_traceback_is_coloured_as_the_notebook_s_local_ones(
        gateway: Gateway, kernel_factory: Any) -> None:
    # a trial: remote tracebacks came in black and white among the notebook's coloured ones
    k = kernel_factory(GPU_MAGIC_URL=gateway.url, GPU_MAGIC_TOKEN=gateway.token)
    k.run("def f(x):\n    y = x + 1\n    return y / 0")
    local = k.run("f(1)")["error"]["coloured"]
    remote = k.run("%%gpu A100-80GB --quiet\nf(1)")["error"]["coloured"]
    assert remote[0] == local[0] and "\x1b[" in local[0], (local, remote)  # the rule
    assert remote[-1] == local[-1], (local, remote)  # ZeroDivisionError: division by zero
    # the frame of f, as IPython colours it: its head, the arrow and the code in the theme's
    head = next(t for t in local if "in \x1b" in t).split("\n")[0]
    assert head in remote, (head, remote)
    code = plain(local[-2]).splitlines()[-1]
    assert any(plain(r) == code and r != code for r in remote), (code, remote)
    k.run("%colors nocolor")
    bare = k.run("%%gpu A100-80GB --quiet\nf(1)")["error"]["coloured"]
    assert not any("\x1b[" in t for t in bare), bare


def test_a_kernel_restarted_under_a_queued_cell_cancels_its_job(tmp_path: Path,
                                                               kernel_factory: Any) -> None:
    # a trial: a queued foreground job outlived its kernel's restart until the gateway's
    # orphan timeout, a minute in its place in the queue (the restart closes the kernel's
    # streams under the cell, and that broke off the follow without a cancel)
    (tmp_path / "gw").mkdir()
    gw = start_gateway(tmp_path / "gw", simulate="H100:1")
    try:
        k = kernel_factory(GPU_MAGIC_URL=gw.url, GPU_MAGIC_TOKEN=gw.token)
        with gw.client() as c:
            holder = k.run("%%gpu H100 --background --quiet\nimport time\ntime.sleep(60)")
            assert holder["error"] is None, holder
            before = {j["id"] for j in c.jobs()}
            k.kc.execute("%%gpu H100\nprint('queued one')")
            queued = wait_for(lambda: [j for j in c.jobs() if j["id"] not in before
                                       and j["state"] == "queued"], 60)
            k.km.restart_kernel(now=False)
            ended = wait_for(lambda: (r := c.job(queued[0]["id"]))["state"] != "queued" and r,
                             30)
            assert ended["state"] == "cancelled", ended
            assert "no client followed" not in str(ended.get("message")), ended
            for j in c.jobs():
                if j["state"] in ("queued", "running"):
                    c.cancel(j["id"])
    finally:
        gw.stop()


def test_help_asked_for_on_the_magic_line_is_shown_and_the_cell_not_run(
        kernel_factory: Any) -> None:
    # a trial: `%%gpu --help` answered "unrecognized arguments: --help"
    k = kernel_factory(GPU_MAGIC_URL="http://127.0.0.1:9", GPU_MAGIC_TOKEN="x" * 43)
    for line in ("%%gpu H100 --help\nran = 1", "%%gpu -h\nran = 1", "%gpu help",
                 "%gpu --help"):
        out = k.run(line)
        assert out["error"] is None and not out["stderr"], (line, out)
        assert "--timeout SECONDS  seconds the cell may run" in out["stdout"], (line, out)
        assert "%gpu pool | jobs" in out["stdout"], (line, out)
        assert ("the cell did not run" in out["stdout"]) == line.startswith("%%"), (line, out)
    assert k.run("print('ran' in globals())")["stdout"] == "False\n"


def test_an_admin_lists_every_user_s_jobs_with_jobs_all(tmp_path: Path,
                                                        kernel_factory: Any) -> None:
    # %gpu jobs showed a teacher "(no jobs)": only curl could list the class's jobs
    import gpu_magic

    gw, tokens = start_class_gateway(tmp_path)
    try:
        with gw.client(tokens["alice"]) as alice:
            gpu_magic.run("1", "H100", {"__name__": "__main__"}, client=alice, quiet=True)
            job = alice.jobs()[0]
        teacher = kernel_factory(GPU_MAGIC_URL=gw.url, GPU_MAGIC_TOKEN=tokens["carol"])
        assert teacher.run("%gpu jobs")["display"] == "(no jobs)"
        out = teacher.run("%gpu jobs --all")
        assert out["error"] is None, out
        lines = out["display"].splitlines()
        assert lines[0].split()[:3] == ["id", "user", "state"], lines
        assert any(ln.split()[:3] == [job["id"], "alice", "succeeded"] for ln in lines), lines
        student = kernel_factory(GPU_MAGIC_URL=gw.url, GPU_MAGIC_TOKEN=tokens["bob"])
        refused = _error_text(student.run("%gpu jobs --all"))
        assert refused == (
            f"GatewayError: %gpu jobs --all lists every user's jobs and needs an admin token; "
            f"the gateway at {gw.url} takes the token from GPU_MAGIC_TOKEN for user 'bob', who "
            "is not an admin. Leave out --all to list your own jobs."), refused
        typo = student.run("%gpu jobs --al")
        assert "UsageError: %gpu jobs takes only --all" in typo["stderr"], typo
    finally:
        gw.stop()


def test_an_admin_attaching_to_a_student_s_job_gets_no_script_of_theirs(
        tmp_path: Path, kernel_factory: Any) -> None:
    # a red team: a student's HTML and JavaScript displays, attached by the instructor, ran
    # in the instructor's page and wrote files as the instructor
    import gpu_magic

    gw, tokens = start_class_gateway(tmp_path)
    try:
        with gw.client(tokens["alice"]) as alice:
            job = gpu_magic.run(
                "from IPython.display import display, HTML, Javascript, Markdown\n"
                "display(HTML('<img src=x onerror=\"alert(1)\">'))\n"
                "display(Javascript('alert(2)'))\n"
                "display({'text/markdown': '<script>alert(3)</script>'}, raw=True)\n"
                "display({'text/plain': 'a table', 'text/html': '<table></table>'}, raw=True)\n"
                "print('printed')", "H100", {"__name__": "__main__"}, client=alice,
                quiet=True, background=True)
            job.wait()
        teacher = kernel_factory(GPU_MAGIC_URL=gw.url, GPU_MAGIC_TOKEN=tokens["carol"])
        out = teacher.run(f"%gpu attach {job.id}")
        assert "printed" in out["stdout"], out
        # (the status is gpu_magic's own, its text escaped)
        bundles = [b for b in out["bundles"] if not b["text/plain"].startswith("[gpu] ")]
        assert len(bundles) == 4, out
        assert all(set(b) <= {"text/plain"} for b in bundles), bundles
        shown = [b["text/plain"] for b in bundles]
        assert "[gpu_magic] alice's text/html output is not shown: it could run script in " \
            "your notebook" in shown, shown
        # a Markdown display comes as its source, as text only (nothing renders it)
        assert "<script>alert(3)</script>" in shown, shown
        assert "a table" in shown, shown
        # her own attach shows her displays as they were
        student = kernel_factory(GPU_MAGIC_URL=gw.url, GPU_MAGIC_TOKEN=tokens["alice"])
        mine = student.run(f"%gpu attach {job.id}")["bundles"]
        assert any("application/javascript" in b for b in mine), mine
    finally:
        gw.stop()


def test_a_misread_line_gets_the_line_to_write(kernel_factory: Any) -> None:
    # the hint rebuilt the line from leftover words (%%gpu c --return b c, %%gpu T4 --timeout
    # 5 T4), quotes were kept as part of a value, and argparse said "invalid float value"
    k = kernel_factory(GPU_MAGIC_URL="http://127.0.0.1:9", GPU_MAGIC_TOKEN="x" * 43)
    for line, message in [
        ("%%gpu T4 --return b c", "--return takes one value, the names separated by commas "
                                  "without spaces: --return b,c"),
        ("%%gpu --timeout 5 T4", "put the GPU spec before the options: %%gpu T4 --timeout 5"),
        ("%%gpu T4 --quiet H100", "put the GPU spec before the options: %%gpu T4, H100 --quiet"),
        ("%%gpu T4 --env MSG=hello world",
         "--env takes one KEY=VALUE, and 'world' is left over: quote a value with spaces, --env "
         "\"MSG=hello world\" (or set it in the kernel, os.environ['MSG'] = ..., and pass --env "
         "MSG)"),
        ("%%gpu T4 --env A=1 B=2", "give each variable its own --env: --env A=1 --env B=2"),
        ("%%gpu T4 --timeout 5 10", "'10' after --timeout is left over: --timeout takes one "
                                    "value; the GPU spec goes before the options"),
        ('%%gpu T4 --env "MSG=hello', "cannot be read: no closing quotation; close each quote"),
        ("%%gpu T4 --timeout abc", "argument --timeout: 'abc' is not a number of seconds; write "
                                   "a plain number, e.g. --timeout 600"),
        ("%%gpu T4 --timeout 10s", "argument --timeout: '10s': write the number of seconds "
                                   "alone, --timeout 10"),
        ("%%gpu T4 --wait 5m", "argument --wait: '5m': write the number of seconds alone, "
                               "--wait 300"),
        ("%%gpu T4 --retries two", "argument --retries: 'two' is not a whole number; write e.g. "
                                   "--retries 2"),
        ("%%gpu T4 --return a,1b", "--return a,1b: '1b' is not a name a cell can bind; list "
                                   "names separated by commas, e.g. --return model,loss"),
        ("%%gpu T4 --return a,,b", "--return a,,b: '' is not a name a cell can bind"),
        ("%%gpu T4 --return x,class", "--return x,class: 'class' is not a name a cell can "
                                      "bind"),
        # autocorrect's long dash, and a space after the dashes (it blamed the spec)
        ("%%gpu T4 \u2014timeout 5", "'\u2014timeout' starts with '\u2014', a long dash (as "
                                     "autocorrect writes '--'); write --timeout"),
        ("%%gpu h100 -- dry-run", "'-- dry-run' has a space after '--'; write --dry-run"),
        ("%%gpu T4 --timeout 5 --timeout 6",
         "--timeout is given twice (--timeout 5 and --timeout 6); give it once"),
        ("%%gpu T4 --quiet --quiet", "--quiet is given twice; give it once"),
        ("%%gpu T4 --env A=1 --env A=2", "--env A is given twice (A=1 and A=2); give it once"),
    ]:
        out = k.run(line + "\n1")
        assert out["error"] is None and out["stderr"].startswith("UsageError: "), (line, out)
        assert message in out["stderr"], (line, out["stderr"])
    for line, message in [
        ("%%gpu A100:80GB", "SpecError: 'A100:80GB' has a count that is not a whole number; "
                            "did you mean A100-80GB, the type (with '-', not ':')?"),
        ('%%gpu ("h100",)', "SpecError: (\"h100\",) is a Python tuple; write the options as a "
                            "list, ['h100'], or plainly: h100"),
    ]:
        assert _error_text(k.run(line + "\n1")).startswith(message), line


def test_env_values_with_spaces_are_quoted_as_in_a_shell(gateway: Gateway,
                                                         kernel_factory: Any) -> None:
    k = kernel_factory(GPU_MAGIC_URL=gateway.url, GPU_MAGIC_TOKEN=gateway.token)
    for line in ('%%gpu A100-80GB --env "MSG=hello world" --quiet',
                 '%%gpu A100-80GB --env MSG="hello world" --quiet',
                 "%%gpu A100-80GB --env 'MSG=hello world' --env B=2 --quiet"):
        out = k.run(line + "\nimport os\nos.environ['MSG']")
        assert out["error"] is None and out["result"] == "'hello world'", (line, out)


def test_cancel_says_what_became_of_the_job(gateway: Gateway, kernel_factory: Any) -> None:
    # "job … is succeeded" for a job that had ended; nothing said it was too late
    from .test_gateway_http import finish, submit

    with gateway.client() as client:
        done = submit(client, "1", "H100")
        finish(client, done["id"])
        held = submit(client, "import time\ntime.sleep(60)", "H100:2", background=True)
        waiting = submit(client, "1", "H100:2", background=True)
        k = kernel_factory(GPU_MAGIC_URL=gateway.url, GPU_MAGIC_TOKEN=gateway.token)
        k.run("%load_ext gpu_magic")
        out = k.run(f"%gpu cancel {done['id']}")
        assert out["stdout"] == (f"job {done['id']} had already ended (succeeded); nothing to "
                                 "cancel\n"), out
        out = k.run(f"%gpu cancel {waiting['id']}")
        assert out["stdout"] == f"cancelled job {waiting['id']} while it was queued: nothing ran\n"
        # the cell that waits for it says where it was cancelled
        done_ev = [e for e in client.events(waiting["id"]) if e["type"] == "done"][0]
        assert done_ev["cancelled_by"] == "%gpu cancel", done_ev
        # a path for an id named another route: the answer was a bare "Not Found"
        for cmd in ("cancel", "attach"):
            out = k.run(f"%gpu {cmd} ../../etc")
            assert out["stderr"] == (f"UsageError: %gpu {cmd}: '../../etc' is not a job id: job "
                                     "ids are 12 to 32 lowercase hex digits (0-9, a-f), such as "
                                     "3f9a1c2b7d4e5f60; `%gpu jobs` (or `gpu-magic jobs`) lists "
                                     "yours\n"), out
            out = k.run(f"%gpu {cmd} 0123456789abcdef")  # well formed: the gateway's answer
            assert out["error"]["evalue"] == ("there is no job '0123456789abcdef' of yours on "
                                              "this gateway"), out
        with pytest.raises(ValueError, match="'../blobs' is not a job id"):
            client.cancel("../blobs")
        client.cancel(held["id"])
        finish(client, held["id"])


def test_on_a_shared_gateway_cancel_says_whose_job_and_stop_leaves_it(
        kernel_factory: Any, tmp_path: Path) -> None:
    # "cancelling job 229c… (running)": the teacher could not tell it was a student's
    import secrets

    from .test_gateway_http import submit, write_tokens

    tokens = {"alice": secrets.token_urlsafe(24), "carol": secrets.token_urlsafe(24)}
    write_tokens(tmp_path / "tokens.json",
                 {"alice": tokens["alice"], "carol": {"token": tokens["carol"], "admin": True}})
    (tmp_path / "gw").mkdir()
    gw = start_gateway(tmp_path / "gw", "--tokens-file", str(tmp_path / "tokens.json"),
                       "--isolation", "none", "--force")
    try:
        from gpu_magic._client import GatewayClient

        with GatewayClient(gw.url, tokens["alice"]) as alice:
            job = submit(alice, "import time\ntime.sleep(60)", "H100", background=True)
            mine = submit(alice, "import time\ntime.sleep(60)", "H100", background=True)
            k = kernel_factory(GPU_MAGIC_URL=gw.url, GPU_MAGIC_TOKEN=tokens["carol"])
            out = k.run(f"%gpu cancel {job['id']}")
            assert out["stdout"].startswith(f"cancelling alice's job {job['id']} ("), out
            k = kernel_factory(GPU_MAGIC_URL=gw.url, GPU_MAGIC_TOKEN=tokens["alice"])
            out = k.run(f"%gpu cancel {mine['id']}")
            assert out["stdout"].startswith(f"cancelling job {mine['id']} ("), out
            # "no local gpu_magic gateway is running", and no word of the one cells use
            out = k.run("%gpu stop")
            assert out["stdout"] == (f"no local gpu_magic gateway is running; the gateway cells "
                                     f"use, {gw.url} (from GPU_MAGIC_URL), is not stopped by "
                                     "this: it is stopped where it was started\n"), out
            assert alice.pool()["types"]  # (still serving)
    finally:
        gw.stop()


@pytest.mark.parametrize("how", ["restart", "shutdown", "sigterm"])
def test_a_kernel_restarted_under_its_cell_cancels_the_cell_s_job(
        gateway: Gateway, kernel_factory: Any, how: str) -> None:
    # a job left to the gateway's orphan timeout holds its GPUs a minute for nobody (seen
    # once from JupyterLab; here the kernel's exit path cancels it, as its interrupt does)
    k = kernel_factory(GPU_MAGIC_URL=gateway.url, GPU_MAGIC_TOKEN=gateway.token)
    k.kc.execute("%%gpu A100-80GB:4\nimport time\ntime.sleep(120)")
    with gateway.client() as client:
        def mine() -> list[dict[str, Any]]:
            return [j for j in client.jobs() if j["spec"] == "A100-80GB:4"
                    and j["state"] not in ("succeeded", "failed", "cancelled")]

        wait_for(lambda: [j for j in mine() if j["state"] == "running"], 60)
        job = mine()[0]
        if how == "restart":
            k.km.restart_kernel(now=False)
        elif how == "shutdown":
            k.km.shutdown_kernel(now=False)
        else:  # what jupyter_client sends a kernel slow to exit (2.5 s after asking it)
            k.km.signal_kernel(signal.SIGTERM)
        record = wait_for(lambda: (r := client.job(job["id"]))["state"] == "cancelled" and r,
                          15)
        assert record["state"] == "cancelled"
        if how == "restart":
            k.kc.wait_for_ready(60)
        elif how == "sigterm":  # and the kernel still ends, as SIGTERM asked
            wait_for(lambda: not k.km.is_alive(), 15)


@pytest.fixture
def others_local_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """An idle local gateway of this user with a simulated H100:2 pool, as another
    notebook's first cell starts it, in runtime and data folders of this test's own (which
    every process this test starts inherits)."""
    from gpu_magic._embedded import ensure_local_gateway, stop_local_gateway

    for key in [k for k in os.environ if k.startswith("GPU_MAGIC_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    info = ensure_local_gateway("H100:2")
    yield info
    stop_local_gateway()


def _local_gateway_untouched(info: dict[str, Any]) -> None:
    """``info``'s gateway still runs, still named by the runtime file, and none other was
    ever started on its state folder."""
    from gpu_magic._embedded import _pid_alive, runtime_path
    from gpu_magic.server.serve import default_state_dir

    assert _pid_alive(int(info["pid"]))
    assert json.loads(runtime_path().read_text())["pid"] == info["pid"]
    assert (default_state_dir() / "gateway.log").read_text().count("gateway starting") == 1


def test_a_gpu_cell_inside_a_job_runs_there_and_leaves_local_gateways_alone(
        tmp_path: Path, others_local_gateway: dict[str, Any], kernel_factory: Any) -> None:
    # the job runs on a gateway of its own, whose runners see this user's runtime folder but
    # neither GPU_MAGIC_URL nor GPU_MAGIC_SIMULATE, as on a GPU machine. A %%gpu cell there
    # found the idle H100:2 gateway above, restarted it unsimulated (another notebook's) and
    # failed with NoFeasibleOption; on a one-GPU pool of its own it would wait for good
    # (started from a shell whose profile exports GPU_MAGIC_URL, as instructors.md shows: its
    # cells took that for their gateway, and `%gpu pool` there asked for a token)
    gw = start_gateway(tmp_path, simulate="T4:1", env={"GPU_MAGIC_URL": "http://127.0.0.1:9"})
    try:
        k = kernel_factory(GPU_MAGIC_URL=gw.url, GPU_MAGIC_TOKEN=gw.token)
        out = k.run('%%gpu T4 --quiet\n%load_ext gpu_magic\nimport gpu_magic\n'
                    'r = get_ipython().run_cell_magic("gpu", "H100 --quiet", "x = 5*5\\nx")\n'
                    'ns = {"base": 6}\n'
                    'y = gpu_magic.run("z = base * 7\\nz", "T4, any", ns)\n'
                    'r, x, y, ns["z"]')
        assert out["error"] is None, out
        assert out["result"] == "(25, 25, 42, 42)", out
        # one note, for the spec the job's GPU does not fit; nothing restarted
        notes = [line for line in out["stderr"].splitlines() if line.startswith("gpu_magic:")]
        assert len(notes) == 1, out
        assert "runs inside GPU job" in notes[0] and "right here on its T4 ×1, simulated" in \
            notes[0] and "not on H100 as its spec asks" in notes[0], notes
        # what needs a local gateway is refused in one line, and starts or stops none
        for line in ("%gpu pool", "%gpu stop"):
            err = _error_text(k.run(f"%%gpu T4 --quiet\n%load_ext gpu_magic\n{line}"))
            assert f"GatewayError: {line}: this runs inside GPU job " in err, err
            assert "never looks for, starts or stops a local gateway" in err, err
            # the cell's line and the refusal, not IPython's way into the magic
            assert "interactiveshell" not in err and f"----> 3 {line}" in err, err
        err = _error_text(k.run("%%gpu T4 --quiet\n%load_ext gpu_magic\n"
                                "get_ipython().run_cell_magic('gpu', '--background', '1')"))
        assert "--background: this code already runs inside GPU job" in err, err
        _local_gateway_untouched(others_local_gateway)
        with gw.client() as client:
            assert len(client.jobs()) == 4  # the outer cells' own, no more
    finally:
        gw.stop()


def test_status_pool_and_jobs_show_a_local_gateway_of_another_configuration_as_it_is(
        others_local_gateway: dict[str, Any], kernel_factory: Any) -> None:
    # another kernel's %gpu status restarted it with its own GPU_MAGIC_SIMULATE, and the first
    # kernel's next %gpu jobs restarted it back: a command that only looks restarts nothing
    info = others_local_gateway
    k = kernel_factory(GPU_MAGIC_SIMULATE="T4:2")
    status = k.run("%gpu status")
    assert status["error"] is None and "restarting" not in status["stderr"], status
    lines = status["stdout"].splitlines()
    assert lines[0].startswith(f"gateway {info['url']} (local gateway): gpu_magic "), lines
    assert lines[1] == (
        "the local gateway's configuration {'backend': 'local', 'simulate': 'H100:2'} differs "
        "from this kernel's configuration {'backend': 'local', 'simulate': 'T4:2'}: the next "
        "%%gpu cell here restarts it with this kernel's (once it has no jobs)"), lines
    for line in ("%gpu pool", "%gpu jobs"):
        out = k.run(line)
        assert out["error"] is None and "restarting" not in out["stderr"], (line, out)
        assert "gpu_magic: the local gateway's configuration" in out["stderr"], (line, out)
    assert "H100" in k.run("%gpu pool")["display"]
    _local_gateway_untouched(info)
    # a cell still restarts it, as DESIGN.md says, once
    out = k.run("%%gpu T4 --quiet\n1")
    assert out["error"] is None and out["result"] == "1", out
    assert out["stderr"].count("restarting the local gateway (configuration") == 1, out
    assert "differs" not in k.run("%gpu status")["stdout"]


def test_a_simulated_pool_that_cannot_be_read_is_not_promised_for_the_next_cell(
        others_local_gateway: dict[str, Any], kernel_factory: Any) -> None:
    # the README trial: %gpu status said the next cell restarts the gateway with this
    # kernel's pool, and the next cell refused the pool instead
    k = kernel_factory(GPU_MAGIC_SIMULATE="H100:2,,")
    lines = k.run("%gpu status")["stdout"].splitlines()
    assert lines[1].startswith("this kernel's GPU_MAGIC_SIMULATE='H100:2,,' cannot be read ("), lines
    assert lines[1].endswith("%%gpu cells here are refused until it is fixed, and the local "
                             "gateway keeps the pool it has"), lines
    out = k.run("%%gpu any\n1")
    assert "SpecError: GPU_MAGIC_SIMULATE='H100:2,,'" in _error_text(out), out
    _local_gateway_untouched(others_local_gateway)


def test_status_starts_no_local_gateway(kernel_factory: Any, tmp_path: Path) -> None:
    # %gpu status started the local gateway to report on it (found by a newcomer)
    from gpu_magic._embedded import runtime_path

    k = kernel_factory(GPU_MAGIC_SIMULATE="T4:2")
    out = k.run("%gpu status")
    assert out["error"] is None, out
    assert out["stdout"] == (
        "no gateway is configured (GPU_MAGIC_URL, %gpu connect URL) and no local one is "
        "running: the first %%gpu cell starts one here, with the simulated pool T4:2 "
        "(GPU_MAGIC_SIMULATE); %gpu pool starts it now and shows its GPUs\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
        assert not runtime_path().exists()
    assert k.run("%%gpu T4 --quiet\n1")["result"] == "1"
    assert k.run("%gpu status")["stdout"].startswith("gateway http://127.0.0.1:")


def test_the_help_shows_the_spec_before_the_options() -> None:
    # argparse put the spec last, an order the magic refuses (found by a newcomer)
    from gpu_magic._magic import GPUMagic

    doc = GPUMagic.gpu.__doc__ or ""
    usage = doc.split("::", 1)[-1].strip().splitlines()
    assert usage[0].startswith("%%gpu [SPEC] [--timeout SECONDS] [--wait SECONDS]"), usage[0]
    assert usage[1].strip().startswith("%gpu pool | jobs [--all]"), usage[1]


def test_python_api_jobs_say_which_notebook_cell_started_them(
        kernel_factory: Any, gateway: Gateway, tmp_path: Path) -> None:
    # the sidebar labelled jobs of gpu_magic.run and @gpu "no notebook", and %%gpu cells'
    # rows could be found, theirs not
    nb = str(tmp_path / "course.ipynb")
    k = kernel_factory(GPU_MAGIC_URL=gateway.url, GPU_MAGIC_TOKEN=gateway.token,
                       JPY_SESSION_NAME=nb)
    msg = k.kc.session.msg("execute_request", {
        "code": "import gpu_magic\nj = gpu_magic.run('x = 1', 'H100', namespace={})\n"
                "j2 = gpu_magic.run('y = 2', 'H100', namespace={}, background=True)\n"
                "j2.wait()",
        "silent": False, "store_history": True, "user_expressions": {},
        "allow_stdin": False, "stop_on_error": True}, metadata={"cellId": "cell-api-1"})
    k.kc.shell_channel.send(msg)
    reply = k.kc.get_shell_msg(timeout=120)
    while reply["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
        reply = k.kc.get_shell_msg(timeout=120)  # (the replies to earlier cells first)
    assert reply["content"]["status"] == "ok", reply["content"]
    with gateway.client() as c:
        jobs = c.jobs()
    metas = [j["meta"] for j in jobs if j["meta"].get("notebook") == nb]
    assert metas == [{"cell_id": "cell-api-1", "notebook": nb}] * 2, [j["meta"] for j in jobs]


@pytest.mark.parametrize("stdin, says", [
    (b"", "needs the gateway's token and cannot ask for it here"),
    (b"x" * 30 + b"\n", "127.0.0.1:9"),  # (a token read from the pipe: then not reached)
])
def test_connect_in_ipython_without_a_terminal_reads_stdin_without_getpass_warnings(
        tmp_path: Path, stdin: bytes, says: str) -> None:
    # a department's trial: `ipython -c ... < /dev/null` printed Python's GetPassWarning and
    # "Password input may be echoed" before the message
    import subprocess

    code = ("get_ipython().run_line_magic('load_ext', 'gpu_magic'); "
            "get_ipython().run_line_magic('gpu', 'connect http://127.0.0.1:9')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_MAGIC_")}
    out = subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", "--HistoryManager.enabled=False",
         "-c", code], input=stdin, capture_output=True, cwd=tmp_path, timeout=120,
        env={**env, "HOME": str(tmp_path), "IPYTHONDIR": str(tmp_path / "ipython")})
    said = (out.stdout + out.stderr).decode()
    assert "GetPassWarning" not in said and "may be echoed" not in said, said
    assert says in said, said
    if not stdin:
        assert "token for http://127.0.0.1:9: \nUsageError: " in said, said
