"""The Ray backend (issue 7): its pure parts with tables, then a real local multi-node Ray cluster.

One cluster serves the whole module: a head without GPUs and two nodes declaring fake GPUs and
accelerator types (H100 ×2, A100-80GB ×4), everything on loopback, token auth on, Ray's files in
a temporary folder. A gateway started with ``--backend ray`` drives it, and the client side runs
cells through it as usual. The nodes share this machine, so a cell's ``CUDA_VISIBLE_DEVICES``
holds Ray's fake device ids, and a runner's pid can be checked from here. Tests that add or
remove nodes come last.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import gpu_magic  # noqa: E402
from gpu_magic._client import GatewayClient  # noqa: E402
from gpu_magic._payload import pack_inputs  # noqa: E402
from gpu_magic._spec import GpuOption  # noqa: E402
from gpu_magic.server.backends.ray import BlobRefs, PoolConfigError, TypeMap, parse_autoscale  # noqa: E402
from gpu_magic.server.backends.ray._pool import (  # noqa: E402
    NodeNames,
    NodeView,
    build_pool,
    demand,
    label_type,
)
from gpu_magic.server.serve import ServeConfig, ServeError, build  # noqa: E402

from .conftest import Gateway, start_gateway, wait_for  # noqa: E402

DEADLINE_S = 60.0  # a no-hang deadline, never a claim about speed
FINAL_STATES = {"succeeded", "failed", "cancelled", "timed_out", "lost", "expired"}


# --- type names: Ray labels plus reported memory ---


@pytest.mark.parametrize(
    ("labels", "probed", "expected"),
    [
        pytest.param(["H100"], None, ("H100", 80), id="H100"),
        pytest.param(["A100"], None, ("A100-40GB", 40), id="A100-unknown-memory-is-40GB"),
        pytest.param(["A100"], ("A100-80GB", 80), ("A100-80GB", 80), id="A100-probed-80GB"),
        pytest.param(["A100", "A100-80G"], None, ("A100-80GB", 80), id="A100-sized-label-wins"),
        pytest.param(["A10G"], None, ("A10", 24), id="A10G-is-A10"),
        pytest.param(["A100-80GB"], None, ("A100-80GB", 80), id="catalogue-name"),
        pytest.param(["L40S"], None, ("L40S", 48), id="L40S"),
        pytest.param(["RTX-PRO-6000"], None, ("RTX-PRO-6000", 96), id="RTX-PRO-6000"),
        pytest.param(["V100"], None, ("V100", None), id="unknown-label-kept"),
        pytest.param([], None, ("GPU", None), id="untyped"),
        pytest.param([], ("T4", 16), ("T4", 16), id="untyped-but-probed"),
    ],
)
def test_ray_labels_map_to_catalogue(labels: list[str], probed: Any, expected: Any) -> None:
    assert TypeMap().resolve(labels, probed) == expected


def test_type_map_rules_use_memory_and_come_first() -> None:
    types = TypeMap.from_json({
        "A100": [{"type": "A100-80GB", "min_memory_gb": 60}, {"type": "a100-40gb"}],
        "MI300X": {"type": "MI300X", "memory_gb": 192},
        "H100": "H200",  # the operator's word beats Ray's label and the GPU's own name
    })
    assert types.resolve(["A100"], ("A100-80GB", 80)) == ("A100-80GB", 80)
    assert types.resolve(["A100"], ("A100-40GB", 40)) == ("A100-40GB", 40)
    assert types.resolve(["A100"], None) == ("A100-40GB", 40)
    assert types.resolve(["MI300X"], None) == ("MI300X", 192)
    assert types.resolve(["H100"], ("H100", 80)) == ("H200", 80)
    assert types.ray_label("MI300X") == "MI300X"
    assert TypeMap().ray_label("A10") == "A10G"
    assert label_type("A100", 80) == "A100-80GB"


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ([], "must be a JSON object"),
        ({"A100": 7}, "'A100' maps to 7"),
        ({"A100": {"type": "A100-80GB", "min_memory_gb": "big"}}, "min_memory_gb of 'A100'"),
        ({"A100": []}, "'A100' maps to nothing"),
        ({"A100": {"type": "A 100"}}, "not a type name"),
    ],
)
def test_bad_type_map_is_explained(data: Any, says: str) -> None:
    with pytest.raises(PoolConfigError, match=says):
        TypeMap.from_json(data)


def test_type_map_names_not_in_the_catalogue_are_noted() -> None:
    # a typo made a type nobody asks for by its real name, in silence
    notes = TypeMap.from_json({"H100": "H1000", "A10G": "A10", "X1": "FOO",
                               "MI300X": {"type": "MI300X", "memory_gb": 192},
                               "B": {"type": "B2000", "memory_gb": 192}}).notes()
    assert notes == [
        "the type 'B2000' that --ray-type-map gives Ray label B is not a known GPU type; did "
        "you mean B200? (keep it if you meant a type of your own)",
        "the type 'H1000' that --ray-type-map gives Ray label H100 is not a known GPU type; "
        "did you mean H100? (keep it if you meant a type of your own)",
        "the type 'FOO' that --ray-type-map gives Ray label X1 is not a known GPU type (T4, L4, "
        "A10, L40S, A100, A100-40GB, A100-80GB, RTX-PRO-6000, H100, H200, B200); it is offered "
        "as a type of its own",
    ]  # MI300X: a type declared with its memory, like no known one: meant


def test_autoscale_spec() -> None:
    assert parse_autoscale("H100:8, a10g, A100:2") == [("H100", 8), ("A10", 1), ("A100-40GB", 2)]
    assert parse_autoscale(None) == []
    for bad in ("H100:0", "H100:x", "H 100"):
        with pytest.raises(PoolConfigError, match="--ray-autoscale"):
            parse_autoscale(bad)


def test_gateway_refuses_a_bad_ray_config_before_connecting(tmp_path: Path) -> None:
    bad = tmp_path / "types.json"
    bad.write_text("{not json")
    for cfg in (ServeConfig(backend="ray", ray_type_map=bad, state_dir=tmp_path / "s"),
                ServeConfig(backend="ray", ray_autoscale="H100:99", state_dir=tmp_path / "s")):
        with pytest.raises(ServeError, match="types.json is not valid JSON|--ray-autoscale"):
            build(cfg)


# --- the pool as Ray shows it ---


def node(node_id: str, name: str, gpus: float, available: float, *labels: str,
         alive: bool = True) -> NodeView:
    return NodeView(node_id, name, alive, gpus, available, labels)


def test_pool_marks_gpus_others_hold_and_keeps_ours_free() -> None:
    nodes = [node("h", "head", 0, 0), node("a", "a", 4, 1, "A100-80GB"),
             node("b", "b", 2, 2, "H100"), node("c", "c", 2, 0, "H100", alive=False),
             node("d", "d", 1, 0.5, "")]
    # we hold GPUs 0 and 1 on node a; Ray says 3 of its 4 are in use, so one is someone else's
    gpus = build_pool(nodes, {"a": {0, 1}}, TypeMap())
    assert [(g.node, g.index, g.type, g.busy_foreign) for g in gpus] == [
        ("a", 0, "A100-80GB", False), ("a", 1, "A100-80GB", False),
        ("a", 2, "A100-80GB", False), ("a", 3, "A100-80GB", True),
        ("b", 0, "H100", False), ("b", 1, "H100", False),
        ("d", 0, "GPU", True),  # half a GPU used by another Ray user: busy
    ]
    assert all(not g.simulated and g.uuid is None for g in gpus)


def test_autoscaler_node_types_are_feasible_but_never_free() -> None:
    nodes = [node("b", "b", 2, 2, "H100")]
    gpus = build_pool(nodes, {}, TypeMap(), [("H100", 2), ("L4", 4), ("H200", 8)])
    virtual = [g for g in gpus if g.node.startswith("autoscale-")]
    assert {g.node for g in virtual} == {"autoscale-l4", "autoscale-h200"}  # H100 is live
    assert all(g.busy_foreign for g in virtual)
    assert [g.memory_gb for g in virtual if g.type == "L4"] == [24] * 4
    wanted = demand([[GpuOption("H100", 2), GpuOption("L4", 2)], [GpuOption("H200", 8)],
                     [GpuOption(None, 4)], [GpuOption("H100")]], gpus, TypeMap(),
                    [("H100", 2), ("L4", 4), ("H200", 8)])
    # H100:2 fits the live node, so the first job asks for its L4 option; `any` the smallest type
    assert wanted == [{"GPU": 2.0, "accelerator_type:L4": 0.001},
                      {"GPU": 8.0, "accelerator_type:H200": 0.001},
                      {"GPU": 4.0, "accelerator_type:L4": 0.001}]


def test_node_names_are_readable_unique_and_stable() -> None:
    names = NodeNames()
    names.update([{"NodeID": "aaaaaaaa1", "NodeManagerHostname": "gpu-1.example.org"},
                  {"NodeID": "bbbbbbbb2", "NodeManagerHostname": "box"},
                  {"NodeID": "cccccccc3", "NodeManagerHostname": "box"}])
    assert names.by_id == {"aaaaaaaa1": "gpu-1", "bbbbbbbb2": "box-bbbbbb", "cccccccc3": "box-cccccc"}
    names.update([{"NodeID": "dddddddd4", "NodeManagerHostname": "gpu-1"},
                  {"NodeID": "aaaaaaaa1", "NodeManagerHostname": "gpu-1"}])
    assert names.by_id["aaaaaaaa1"] == "gpu-1"  # never renamed under a running job
    assert names.by_id["dddddddd4"] == "gpu-1-dddddd"
    assert names.by_name["gpu-1-dddddd"] == "dddddddd4"


def test_an_input_blob_goes_to_the_object_store_once(tmp_path: Path) -> None:
    put: list[bytes] = []
    refs = BlobRefs(lambda data: put.append(data) or f"ref{len(put)}", max_bytes=10)
    a, b, c = (tmp_path / n for n in "abc")
    a.write_bytes(b"12345")
    b.write_bytes(b"678")
    c.write_bytes(b"9" * 8)
    assert [refs.ref(str(p)) for p in (a, b, a, b)] == ["ref1", "ref2", "ref1", "ref2"]
    assert put == [b"12345", b"678"]
    refs.ref(str(c))  # 16 bytes > 10: the least recently used go
    assert refs.ref(str(b)) == "ref4"
    assert refs.puts == 4


# --- a real cluster ---


@pytest.fixture(scope="module")
def ray_env() -> Iterator[dict[str, str]]:
    """Ray on loopback, with token auth and its files in a short temporary folder (Ray's socket
    paths must stay under 108 bytes), for this process and every process it starts."""
    tmp = Path(tempfile.mkdtemp(prefix="gmray-"))
    (tmp / "ray").mkdir()
    env = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every Ray service on 127.0.0.1
        "RAY_TMPDIR": str(tmp),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),  # nothing written under ~/.ray
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    yield env
    mp.undo()
    shutil.rmtree(tmp, ignore_errors=True)


# The cluster lives in a process of its own, driven over stdin/stdout with one JSON line per
# command: this process never becomes part of the cluster, and the cluster goes away with that
# process even if this one dies.
CONTROLLER = """
import json, sys
from ray.cluster_utils import Cluster

# fast health checks, so that a removed node is declared dead within a second or two
checks = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
          "health_check_initial_delay_ms": 0}
cluster = Cluster(initialize_head=True, connect=False,
                  head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
                                  "_system_config": checks})
nodes = {}
try:
    def say(**answer):
        print(json.dumps(answer), flush=True)

    say(address=cluster.address, ips=[cluster.head_node.node_ip_address])
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "add":
            nodes[cmd["name"]] = cluster.add_node(num_cpus=1, num_gpus=cmd["gpus"],
                                                  resources={"accelerator_type:" + cmd["type"]: 1})
            cluster.wait_for_nodes()
            say(ip=nodes[cmd["name"]].node_ip_address)
        elif cmd["op"] == "remove":
            cluster.remove_node(nodes.pop(cmd["name"]), allow_graceful=False)
            say(ok=True)
finally:
    cluster.shutdown()
"""


class RayCluster:
    """A local Ray cluster in its own process: add and remove fake-GPU nodes by name."""

    def __init__(self) -> None:
        # its own process group: every Ray process it starts joins it, so that what a failed start
        # or shutdown leaves behind can be stopped without touching anything else on the machine
        self.proc = subprocess.Popen([sys.executable, "-c", CONTROLLER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            first = self._answer()
        except BaseException:
            self.close()
            raise
        self.address: str = first["address"]
        self.ips: list[str] = first["ips"]
        self.nodes: set[str] = set()

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the Ray cluster process ended (rc {self.proc.wait()})")
        return json.loads(line)

    def _ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def add(self, name: str, gpu_type: str, gpus: int) -> None:
        self.ips.append(self._ask(op="add", name=name, type=gpu_type, gpus=gpus)["ip"])
        self.nodes.add(name)

    def remove(self, name: str) -> None:
        self._ask(op="remove", name=name)
        self.nodes.discard(name)

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the cluster helper stopped everything, as it should


@pytest.fixture(scope="module")
def cluster(ray_env: dict[str, str]) -> Iterator[RayCluster]:
    c = RayCluster()
    try:
        c.add("h100", "H100", 2)
        c.add("a100", "A100-80GB", 4)
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def rgw(cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("raygw"), "--backend", "ray", "--ray-address",
                       cluster.address, "--ray-autoscale", "L4:2", simulate=None)
    yield gw
    gw.stop()


@pytest.fixture
def rc(rgw: Gateway) -> Iterator[GatewayClient]:
    c = rgw.client()
    yield c
    c.close()


@pytest.fixture
def on_ray(rgw: Gateway, monkeypatch: pytest.MonkeyPatch) -> Gateway:
    monkeypatch.setenv("GPU_MAGIC_URL", rgw.url)
    monkeypatch.setenv("GPU_MAGIC_TOKEN", rgw.token)
    return rgw


def submit(client: GatewayClient, source: str, spec: str, **fields: Any) -> dict[str, Any]:
    packed = pack_inputs({}, None, None)
    for d, blob in packed.blobs().items():
        client.upload(d, blob)
    options = []
    for part in spec.split(","):
        name, _, count = part.strip().partition(":")
        options.append({"type": name, "count": int(count or 1)})
    return client.submit({"source": textwrap.dedent(source), "spec": options,
                          "inputs": packed.manifest, "outputs": [], "deleted": [],
                          "has_value": False, "timeout": 120, **fields})


def follow(client: GatewayClient, job_id: str, until: Any = None,
           timeout: float = DEADLINE_S) -> list[dict[str, Any]]:
    """The job's events up to done (or the first that ``until`` accepts), read in a thread so
    that a stream that never ends fails the test instead of hanging it."""
    box: dict[str, Any] = {"events": []}

    def read() -> None:
        stream = client.events(job_id)
        try:
            for ev in stream:
                box["events"].append(ev)
                if until is not None and until(ev):
                    return
        except BaseException as exc:
            box["error"] = exc
        finally:
            stream.close()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"job {job_id} did not get there in {timeout} s: {box['events']}"
    if "error" in box:
        raise box["error"]
    return box["events"]


def stdout(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "stdout")


def free(client: GatewayClient) -> dict[str, tuple[int, int]]:
    return {t["type"]: (t["free"], t["total"]) for t in client.pool()["types"]}


def all_free(client: GatewayClient) -> bool:
    return all(f == t for name, (f, t) in free(client).items() if name != "L4")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie whose parent has not reaped it yet is gone as far as the GPU is concerned
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


SLEEPER = """
    import os, subprocess, time
    child = subprocess.Popen(["sleep", "300"])
    print("pids", os.getpid(), child.pid, os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
    time.sleep(300)
"""


def pids_of(events: list[dict[str, Any]]) -> tuple[int, int, str]:
    """(runner pid, the cell's child's pid, CUDA_VISIBLE_DEVICES) as a SLEEPER cell printed them."""
    runner, child, devices = stdout(events).split("pids", 1)[1].split()[:3]
    return int(runner), int(child), devices


def test_cluster_is_on_loopback(cluster: RayCluster) -> None:
    assert cluster.address.startswith("127.0.0.1:")
    assert cluster.ips == ["127.0.0.1"] * 3


def test_pool_shows_both_nodes_their_types_and_the_autoscaler_type(rc: GatewayClient) -> None:
    wait_for(lambda: all_free(rc), DEADLINE_S)
    pool = rc.pool()
    assert pool["backend"] == "ray"
    assert pool["simulated"] is False
    assert free(rc) == {"H100": (2, 2), "A100-80GB": (4, 4), "L4": (0, 2)}
    nodes = {n["name"]: sorted(g["type"] for g in n["gpus"]) for n in pool["nodes"]}
    real = {k: v for k, v in nodes.items() if not k.startswith("autoscale-")}
    assert sorted(real.values()) == [["A100-80GB"] * 4, ["H100"] * 2]  # the head has no GPU
    assert nodes["autoscale-l4"] == ["L4", "L4"]
    assert {t["type"]: t["memory_gb"] for t in pool["types"]} == {"H100": 80, "A100-80GB": 80,
                                                                  "L4": 24}


def test_run_brings_back_value_and_mutated_input(on_ray: Gateway,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(textwrap.dedent("""
        import numpy as np
        data = np.arange(100_000, dtype=np.float32)
        class Acc:
            def __init__(self): self.total = 0.0
            def add(self, v): self.total += float(v)
        acc = Acc()
    """), "<notebook>", "exec"), ns)
    value = gpu_magic.run(textwrap.dedent("""
        import os
        print("grant:", os.environ["GPU_MAGIC_GRANT"])
        print("devices:", os.environ["CUDA_VISIBLE_DEVICES"])
        print("omp:", os.environ.get("OMP_NUM_THREADS"))
        acc.add(data.sum())
        half = acc.total / 2
        half
    """), "H100:2, A100-80GB", ns)
    expected = float(np.arange(100_000, dtype=np.float32).sum())
    assert value == expected / 2 == ns["half"]
    assert ns["acc"].total == expected
    out = capsys.readouterr().out
    grant = json.loads(out.split("grant:", 1)[1].splitlines()[0])
    assert (grant["type"], grant["count"], grant["simulated"]) == ("H100", 2, False)
    assert grant["devices"] == "0,1"  # Ray chose them; the cell sees what the grant says
    assert out.split("devices:", 1)[1].split()[0] == "0,1"
    # not the 1 Ray sets for a task that asked for no CPU: the node's own setting
    assert out.split("omp:", 1)[1].split()[0] == str(os.environ.get("OMP_NUM_THREADS"))


def test_a_failing_cell_raises_its_own_error(on_ray: Gateway) -> None:
    ns: dict[str, Any] = {"__name__": "__main__"}
    with pytest.raises(ZeroDivisionError):
        gpu_magic.run("x = 1\n1 / 0\n", "A100-80GB", ns)


def test_fallback_to_another_node_when_the_first_option_is_busy(rc: GatewayClient) -> None:
    wait_for(lambda: all_free(rc), DEADLINE_S)
    blocker = submit(rc, SLEEPER, "H100:2")
    follow(rc, blocker["id"], until=lambda e: e["type"] == "stdout")
    assert free(rc)["H100"] == (0, 2)
    job = submit(rc, "import os\nprint(os.environ['CUDA_VISIBLE_DEVICES'])\n", "H100:2, A100-80GB")
    events = follow(rc, job["id"])
    granted = next(e for e in events if e["type"] == "granted")
    assert (granted["gpu_type"], granted["option_index"], granted["count"]) == ("A100-80GB", 1, 1)
    assert granted["passed_over"][0]["option"] == "H100:2"
    assert events[-1]["state"] == "succeeded"
    assert len(stdout(events).split(",")) == 1
    assert rc.job(blocker["id"])["state"] == "running"
    rc.cancel(blocker["id"])
    wait_for(lambda: all_free(rc), DEADLINE_S)


def test_multi_gpu_grants_on_one_node_get_disjoint_devices(rc: GatewayClient) -> None:
    wait_for(lambda: all_free(rc), DEADLINE_S)
    jobs = [submit(rc, SLEEPER, "A100-80GB:2") for _ in range(2)]
    seen = []
    for job in jobs:
        events = follow(rc, job["id"], until=lambda e: e["type"] == "stdout")
        granted = next(e for e in events if e["type"] == "granted")
        seen.append((granted["node"], pids_of(events)[2]))
    assert seen[0][0] == seen[1][0]  # both on the A100 node
    devices = [set(d.split(",")) for _, d in seen]
    assert all(len(d) == 2 for d in devices) and not devices[0] & devices[1]
    assert free(rc)["A100-80GB"] == (0, 4)
    for job in jobs:
        rc.cancel(job["id"])
    wait_for(lambda: all_free(rc), DEADLINE_S)


def test_cancel_stops_the_runner_group_and_frees_the_gpus(rc: GatewayClient) -> None:
    wait_for(lambda: all_free(rc), DEADLINE_S)
    job = submit(rc, SLEEPER, "H100:2")
    runner, child, devices = pids_of(follow(rc, job["id"], until=lambda e: e["type"] == "stdout"))
    assert devices == "0,1"
    assert not gone(runner) and not gone(child)
    rc.cancel(job["id"])
    events = follow(rc, job["id"])
    assert events[-1]["state"] == "cancelled"
    wait_for(lambda: gone(runner) and gone(child), DEADLINE_S)
    wait_for(lambda: free(rc)["H100"] == (2, 2), DEADLINE_S)


@pytest.mark.parametrize("how", ["cancel", "timeout", "killed"])
def test_a_cancelled_timed_out_or_killed_cell_s_own_sessions_end_with_it(rc: GatewayClient,
                                                                         how: str) -> None:
    # a researcher's trial: a child the cell started in a session of its own (as servers and
    # launchers do) outlived a cancel or a --timeout on Ray that had to kill the runner,
    # holding the job's GPUs; a runner killed outright (the OOM killer) left it too
    wait_for(lambda: all_free(rc), DEADLINE_S)
    cell = SLEEPER.replace('["sleep", "300"]', '["sleep", "300"], start_new_session=True')
    job = submit(rc, cell, "H100", **({"timeout": 4} if how == "timeout" else {}))
    runner, child, _ = pids_of(follow(rc, job["id"], until=lambda e: e["type"] == "stdout"))
    if how == "cancel":
        rc.cancel(job["id"])
    elif how == "killed":
        os.kill(runner, signal.SIGKILL)
    events = follow(rc, job["id"])
    assert events[-1]["state"] == {"cancel": "cancelled", "timeout": "timed_out",
                                   "killed": "lost"}[how]
    wait_for(lambda: gone(runner) and gone(child), DEADLINE_S)


def test_an_interrupt_cancels_on_ray_and_says_why(rc: GatewayClient) -> None:
    # Ray cannot interrupt a cell yet: the gateway says so, and the notebook cancels instead
    wait_for(lambda: all_free(rc), DEADLINE_S)
    job = submit(rc, SLEEPER, "H100")
    follow(rc, job["id"], until=lambda e: e["type"] == "stdout")
    with pytest.raises(gpu_magic.GatewayError) as info:
        rc.interrupt(job["id"])
    assert info.value.status == 409 and info.value.detail["error"] == "cannot_interrupt"
    rc.cancel(job["id"])
    assert follow(rc, job["id"])[-1]["state"] == "cancelled"
    before = {j["id"] for j in rc.jobs()}

    def interrupt_once_running() -> None:
        wait_for(lambda: any(j["state"] == "running" for j in rc.jobs()
                             if j["id"] not in before), DEADLINE_S)
        os.kill(os.getpid(), signal.SIGINT)  # (the cell sleeps for minutes: run() gets it)

    threading.Thread(target=interrupt_once_running, daemon=True).start()
    with pytest.raises(gpu_magic.JobCancelled) as cancelled:
        gpu_magic.run("import time\ntime.sleep(300)", "H100", {"__name__": "__main__"},
                      client=rc, quiet=True)
    assert ("was cancelled: this gateway's ray backend cannot interrupt a running cell, so the "
            "interrupt cancelled it instead; nothing was bound") in str(cancelled.value)
    # said before the gateway has stopped it: it must not say the GPUs are free already
    assert ("the gateway is stopping it (its GPUs are free once it has ended"
            in str(cancelled.value)), cancelled.value
    wait_for(lambda: all_free(rc), DEADLINE_S)


HOLDER = """
import sys, ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1], logging_level="error", log_to_driver=False)
pg = placement_group([{"GPU": 1, "accelerator_type:H100": 0.001}])
ray.get(pg.ready())
print("held", flush=True)
sys.stdin.read()
"""


def test_gpus_another_ray_user_holds_are_busy_and_the_job_waits(rc: GatewayClient,
                                                                 cluster: RayCluster) -> None:
    wait_for(lambda: all_free(rc), DEADLINE_S)
    other = subprocess.Popen([sys.executable, "-c", HOLDER, cluster.address],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert other.stdout is not None
        assert select.select([other.stdout], [], [], DEADLINE_S)[0], "the other driver hung"
        assert other.stdout.readline() == b"held\n"
        wait_for(lambda: free(rc)["H100"] == (1, 2), DEADLINE_S)
        job = submit(rc, "print('ran')\n", "H100:2")  # feasible, so queued, not refused
        assert job["state"] == "queued"
        time.sleep(1.5)  # a few of the gateway's looks at the pool: still nothing to grant
        assert rc.job(job["id"])["state"] == "queued"
    finally:
        assert other.stdin is not None and other.stdout is not None
        other.stdin.close()  # the other driver exits, and Ray gives its GPU back
        other.wait(DEADLINE_S)
        other.stdout.close()
    events = follow(rc, job["id"])
    assert events[-1]["state"] == "succeeded" and stdout(events) == "ran\n"


# Another Ray driver that reads the cluster's placement groups: name -> state, on each line asked.
GROUPS = """
import json, sys, ray
from ray.util import placement_group_table
ray.init(address=sys.argv[1], logging_level="error", log_to_driver=False)
print("ready", flush=True)
for _ in sys.stdin:
    print(json.dumps({g["name"]: g["state"] for g in placement_group_table().values()}),
          flush=True)
"""


def test_cells_back_to_back_keep_their_placement_group_then_give_it_back(
        rc: GatewayClient, cluster: RayCluster) -> None:
    # Ray takes 0.5-1 s to place a new group on GPUs just given back: each cell of a Run All
    # waited that long for the GPUs the cell before had freed
    wait_for(lambda: all_free(rc), DEADLINE_S)
    reader = subprocess.Popen([sys.executable, "-c", GROUPS, cluster.address],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert reader.stdin is not None and reader.stdout is not None

    def groups() -> dict[str, str]:
        reader.stdin.write("?\n")
        reader.stdin.flush()
        assert select.select([reader.stdout], [], [], DEADLINE_S)[0], "the other driver hung"
        return json.loads(reader.stdout.readline())

    try:
        assert select.select([reader.stdout], [], [], DEADLINE_S)[0], "the other driver hung"
        assert reader.stdout.readline() == "ready\n"
        first = submit(rc, "print('one')\n", "H100:2")
        assert stdout(follow(rc, first["id"])) == "one\n"
        assert free(rc)["H100"] == (2, 2)  # kept for the next cell, but ours: free for it
        second = submit(rc, "print('two')\n", "H100:2")
        events = follow(rc, second["id"])
        assert events[-1]["state"] == "succeeded" and stdout(events) == "two\n"
        # no group of its own: it ran in the one the first job had (named by the job that
        # made it: the first, or an earlier test's job, back to back with the first)
        held = groups()
        assert not [name for name in held if second["id"] in name], held
        # and nobody else's GPUs wait on it for long: it is given back
        wait_for(lambda: "CREATED" not in groups().values(), DEADLINE_S)
    finally:
        reader.stdin.close()
        reader.wait(DEADLINE_S)
        reader.stdout.close()
    wait_for(lambda: all_free(rc), DEADLINE_S)


def test_a_cell_after_a_smaller_one_waits_for_the_gpus_it_freed(rc: GatewayClient) -> None:
    # the group kept for the next cell on one H100 was given back for a cell on both, and Ray,
    # slow to place a new group on GPUs just freed, made it look held: the cell took its next
    # option, "H100:2: 1 of 2 H100 free", nothing else on the cluster
    wait_for(lambda: all_free(rc), DEADLINE_S)
    one = submit(rc, "print('one')\n", "H100")
    assert follow(rc, one["id"])[-1]["state"] == "succeeded"
    both = submit(rc, "print('both')\n", "H100:2, A100-80GB:2")
    events = follow(rc, both["id"])
    granted = next(e for e in events if e["type"] == "granted")
    assert (granted["gpu_type"], granted["count"], granted["option_index"]) == ("H100", 2, 0), \
        granted
    assert events[-1]["state"] == "succeeded" and stdout(events) == "both\n"
    wait_for(lambda: all_free(rc), DEADLINE_S)


# Another Ray user who asks for both H100s while our job holds them: Ray hands them over the
# moment our job gives them back, before the gateway's view of the pool says they are gone.
TAKER = """
import sys, ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1], logging_level="error", log_to_driver=False)
pg = placement_group([{"GPU": 2, "accelerator_type:H100": 0.001}])
print("asked", flush=True)
ray.get(pg.ready())
print("held", flush=True)
sys.stdin.read()
"""


class Taker:
    """A job of ours on both H100s, cancelled while another Ray user waits for them, then a
    job for ``spec``: the gateway believes the H100s free a moment longer than they are, so
    its grant there fails in Ray."""

    def __init__(self, rc: GatewayClient, cluster: RayCluster, spec: str) -> None:
        wait_for(lambda: all_free(rc), DEADLINE_S)
        ours = submit(rc, SLEEPER, "H100:2")
        follow(rc, ours["id"], until=lambda e: e["type"] == "stdout")
        self.proc = subprocess.Popen([sys.executable, "-c", TAKER, cluster.address],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.says("asked")
        rc.cancel(ours["id"])
        assert follow(rc, ours["id"])[-1]["state"] == "cancelled"
        self.says("held")
        # within the moment the gateway counts the GPUs it gave back as its own (Ray reports
        # them free a little later): it believes them free, and asks Ray for them
        self.job = submit(rc, "print('ran')\n", spec)

    def says(self, word: str) -> None:
        assert self.proc.stdout is not None
        assert select.select([self.proc.stdout], [], [], DEADLINE_S)[0], "the other driver hung"
        assert self.proc.stdout.readline() == f"{word}\n".encode()

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()  # the other driver exits, and Ray gives the GPUs back
        self.proc.wait(DEADLINE_S)
        self.proc.stdout.close()


def test_a_job_whose_gpus_ray_would_not_give_has_not_run(rc: GatewayClient,
                                                         cluster: RayCluster) -> None:
    # a job back in the queue after Ray refused its GPUs kept the time it was "started": a
    # queued job showed a running time, and one cancelled while queued said it ran 50 s
    taker = Taker(rc, cluster, "H100:2")
    job = taker.job
    try:
        time.sleep(1.5)  # (the gateway tries its grant, and Ray says no)
        record = rc.job(job["id"])
        assert record["state"] == "queued" and record["started"] is None, record
        rc.cancel(job["id"])
        events = follow(rc, job["id"])
        done = events[-1]
        assert done["message"] == "cancelled while queued; nothing ran"
        # it said what it waited for ("queued (position 1)" alone read as stuck), once: not
        # again at each of the gateway's looks
        said = [e.get("waiting_for") for e in events if e["type"] == "queued"]
        # (or, when the pool had already seen the other user's hold, that: nothing tried)
        assert any(w and (w.startswith("waiting for Ray to hold 2 H100 on ")
                          or "H100s on " in w and "in use by other work on the Ray cluster" in w)
                   for w in said), said
        assert all(a != b for a, b in zip(said, said[1:])), said
        assert done["timings"]["ran_s"] is None and done["timings"]["queued_s"] > 1.0, done
        assert rc.job(job["id"])["started"] is None
    finally:
        taker.close()
    job = submit(rc, "print('ran')\n", "H100:2")
    events = follow(rc, job["id"])
    assert events[-1]["state"] == "succeeded"


def test_a_job_whose_first_option_ray_would_not_give_takes_its_next(
        rc: GatewayClient, cluster: RayCluster) -> None:
    # it waited for the H100s another Ray user had taken, as long as they held them, while
    # its next option was free all along
    taker = Taker(rc, cluster, "H100:2, A100-80GB:2")
    job = taker.job
    try:
        events = follow(rc, job["id"], timeout=20.0)
        granted = next(e for e in events if e["type"] == "granted")
        assert (granted["gpu_type"], granted["option_index"]) == ("A100-80GB", 1), granted
        assert events[-1]["state"] == "succeeded"
        wait_for(lambda: free(rc)["H100"] == (0, 2), DEADLINE_S)  # the other user's
    finally:
        taker.close()
    wait_for(lambda: all_free(rc), DEADLINE_S)


def test_a_type_map_typo_is_noted_where_users_look(cluster: RayCluster, tmp_path: Path) -> None:
    # --simulate H1000:2 says "did you mean H100?" at start, in the pool and in refusals; a
    # type map to H1000 said nothing, and nobody could ask for the H100s by their name
    types = tmp_path / "types.json"
    types.write_text(json.dumps({"H100": "H1000"}))
    gw = start_gateway(tmp_path, "--backend", "ray", "--ray-address", cluster.address,
                       "--ray-type-map", str(types), simulate=None)
    note = ("the type 'H1000' that --ray-type-map gives Ray label H100 is not a known GPU type; "
            "did you mean H100? (keep it if you meant a type of your own)")
    try:
        assert f"gpu-magic serve: note: {note}" in (tmp_path / "gateway.log").read_text()
        with gw.client() as c:
            pool = c.pool()
            assert pool["notes"] == [note] and "H1000" in {t["type"] for t in pool["types"]}
            with pytest.raises(gpu_magic.NoFeasibleOption) as info:
                gpu_magic.run("1", "H100", {"__name__": "__main__"}, client=c, quiet=True)
            assert f"Note: {note}." in str(info.value), info.value
            # nodes join and leave a Ray cluster: not "can ever run"
            assert "can run on the Ray cluster as it is now" in str(info.value), info.value
            assert "--wait SECONDS" in str(info.value)
            # asked to wait, it waits for such a node to join (it was refused all the same)
            with pytest.raises(gpu_magic.WaitExpired) as waited:
                gpu_magic.run("1", "H100", {"__name__": "__main__"}, client=c, quiet=True,
                              wait=1)
            assert "no node for it is in the pool; nothing ran" in str(waited.value)
    finally:
        gw.stop()


def test_the_start_line_tells_an_autoscaler_s_types_from_the_gpus_there(
        cluster: RayCluster, tmp_path: Path) -> None:
    # "pool: H100 ×2, A100-80GB ×4, L4 ×2" read as if the L4s were there (found by a newcomer)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_magic", "serve", "--backend", "ray", "--ray-address",
         cluster.address, "--ray-autoscale", "L4:2", "--port", "0",
         "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = ""
        deadline = time.monotonic() + DEADLINE_S
        while not line.startswith("pool:") and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the gateway ended before it said its pool"
        assert line.rstrip() == "pool: A100-80GB ×4, H100 ×2; an autoscaler may add L4 ×2", line
    finally:
        proc.terminate()
        proc.wait(DEADLINE_S)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:6379", ("127.0.0.1", 6379)), ("head.lab:6380", ("head.lab", 6380)),
    ("[::1]:6379", ("::1", 6379)),
    ("::1", None), ("auto", None), ("ray://head:10001", None), ("head", None), (":6379", None),
])
def test_only_a_plain_host_and_port_is_looked_at_before_ray_connects(
        address: str, expected: tuple[str, int] | None) -> None:
    from gpu_magic.server.backends.ray._backend import _host_port

    assert _host_port(address) == expected


def test_an_address_where_no_ray_cluster_answers_is_refused_not_waited_on(
        ray_env: dict[str, str], tmp_path: Path) -> None:
    # Ray's client retried such an address for good, printing only its own C++ lines, and the
    # gateway never listened (found by a newcomer)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "gpu_magic", "serve", "--backend", "ray",
                          "--ray-address", f"127.0.0.1:{port}", "--port", "0",
                          "--state-dir", str(tmp_path / "state")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert (f"cannot connect to the Ray cluster at '127.0.0.1:{port}' (--ray-address) (nothing "
            f"answers at 127.0.0.1:{port}: Connection refused)") in out.stderr, out.stderr
    # one that answers but is no cluster's: given up on after a while
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        code = ("import gpu_magic.server.backends.ray._backend as b\nb.CONNECT_TIMEOUT_S = 3\n"
                f"b.RayBackend('127.0.0.1:{silent.getsockname()[1]}')")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120)
    assert out.returncode != 0
    assert "no connection within 3 s, though the address answers" in out.stderr, out.stderr


def test_a_cluster_found_without_ray_address_is_named_at_start(
        cluster: RayCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # it attached to whatever cluster Ray found, in silence. (Ray finds the last cluster
    # started under RAY_TMPDIR: this module's.)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    gw = start_gateway(tmp_path, "--backend", "ray", simulate=None)
    try:
        log = (tmp_path / "gateway.log").read_text()
        assert (f"gpu-magic: attached to the Ray cluster at {cluster.address}, found by Ray's "
                "auto-detection, as no --ray-address was given; name the cluster with "
                "--ray-address HEAD_IP:6379 to be sure of it") in log, log
        # (Ray connects off the main thread, and warns of a SIGTERM handler ours replaces)
        assert "SIGTERM handler is not set" not in log, log
    finally:
        gw.stop()


def test_a_node_that_joins_serves_a_job_waiting_for_its_type(rc: GatewayClient,
                                                             cluster: RayCluster) -> None:
    # (its --timeout counts from when its runner has it, not from the start of a worker on a
    # node that has just joined: a trial's 2 s timed out a cell that never ran)
    job = submit(rc, "import os, time\nprint(os.environ['CUDA_VISIBLE_DEVICES'])\n"
                     "time.sleep(0.5)\n", "L4", timeout=1.5)
    assert job["state"] == "queued"  # an autoscaler could add one: feasible, not refused
    # and it says what it waits for, not only "queued" as if GPUs were busy
    said = follow(rc, job["id"], until=lambda e: bool(e.get("waiting_for")))[-1]
    assert said["waiting_for"] == ("no node for L4 is in the pool yet: the autoscaler was "
                                   "asked for one")
    cluster.add("l4", "L4", 2)
    events = follow(rc, job["id"])
    assert events[-1]["state"] == "succeeded"
    granted = next(e for e in events if e["type"] == "granted")
    assert granted["gpu_type"] == "L4" and not granted["node"].startswith("autoscale-")
    assert free(rc)["L4"] == (2, 2)


def test_a_node_removed_mid_job_is_retried_on_another(rc: GatewayClient,
                                                      cluster: RayCluster) -> None:
    if "l4" not in cluster.nodes:
        pytest.skip("needs the node the previous test added")
    cell = """
        import json, os, time
        grant = json.loads(os.environ["GPU_MAGIC_GRANT"])
        print("on", grant["type"], grant["attempt"], flush=True)
        if grant["type"] == "L4":
            time.sleep(300)
    """
    job = submit(rc, cell, "L4, A100-80GB", retries=1)
    follow(rc, job["id"], until=lambda e: e["type"] == "stdout")
    cluster.remove("l4")
    events = follow(rc, job["id"])
    assert events[-1]["state"] == "succeeded"
    assert [e["gpu_type"] for e in events if e["type"] == "granted"] == ["L4", "A100-80GB"]
    assert "on A100-80GB 2" in stdout(events)
    assert "retrying" in "".join(e["text"] for e in events if e["type"] == "stderr")
    wait_for(lambda: free(rc)["L4"] == (0, 2), DEADLINE_S)  # virtual again


def test_a_node_removed_mid_job_ends_it_lost(rc: GatewayClient, cluster: RayCluster) -> None:
    job = submit(rc, SLEEPER, "H100")
    runner, child, _ = pids_of(follow(rc, job["id"], until=lambda e: e["type"] == "stdout"))
    cluster.remove("h100")
    events = follow(rc, job["id"])
    done = events[-1]
    assert done["state"] == "lost"
    assert "died or left the cluster" in done["message"]
    assert "last words" not in done["message"], done["message"]
    assert "before the cell finished" not in done["message"], done["message"]
    # out of the pool at once: a newcomer's trial saw it shown fully free after the job was
    # lost, and the next cell planned onto it, until Ray's own node list caught up
    assert "H100" not in free(rc)
    wait_for(lambda: gone(runner) and gone(child), DEADLINE_S)  # the cell's own child too
    # its folder (its inputs) stayed: the worker died before its clean-up. The next job on
    # this machine removes it (one stayed for good with every node lost mid-job)
    left = glob.glob(os.path.join(tempfile.gettempdir(), f"gpu-magic-{job['id']}-1-*"))
    assert left
    worker = int(Path(left[0], "worker.pid").read_text())  # (it ends a moment after its node)
    wait_for(lambda: gone(worker), DEADLINE_S)
    assert follow(rc, submit(rc, "x = 1", "A100-80GB")["id"])[-1]["state"] == "succeeded"
    assert not [p for p in left if os.path.exists(p)]


def test_a_job_sent_to_a_node_that_just_died_ends_instead_of_waiting_for_good(
        rc: GatewayClient, cluster: RayCluster) -> None:
    # a researcher's trial: a cell granted on a node killed a moment after the previous cell
    # ran there (its placement group kept for the next one) said "running" until its hour was
    # up; Ray keeps a task of a group whose node died waiting
    cluster.add("a10", "A10", 2)
    wait_for(lambda: free(rc).get("A10") == (2, 2), DEADLINE_S)
    assert follow(rc, submit(rc, "x = 1", "A10:2")["id"])[-1]["state"] == "succeeded"
    cluster.remove("a10")
    job = submit(rc, "print('ran', flush=True)", "A10:2, A100-80GB:2")
    events = follow(rc, job["id"])
    done, kinds = events[-1], [e["type"] for e in events]
    assert done["type"] == "done", done
    if done["state"] == "lost":
        assert "the Ray node" in done["message"], done
        assert "before the cell started (nothing ran)" in done["message"], done
        # nor did its status say "running": it was granted, and its runner never took it
        assert "granted" in kinds and "started" not in kinds, kinds
    else:  # (the pool already knew the node gone: its next option)
        assert done["state"] == "succeeded", done
        assert kinds.index("granted") < kinds.index("started") < kinds.index("stdout"), kinds
    wait_for(lambda: "A10" not in free(rc), DEADLINE_S)


# (last: it removes the cluster's last GPU node)
def test_a_type_of_the_pool_s_own_whose_node_left_can_still_be_waited_for(
        rc: GatewayClient, cluster: RayCluster) -> None:
    # a researcher's trial: with its node gone, `%%gpu V100 --wait 40` was refused as
    # "'V100' is not a GPU type; did you mean H100?", while a V100 job queued before waited
    cluster.add("v100", "V100", 1)
    wait_for(lambda: "V100" in {t["type"] for t in rc.pool()["types"]}, DEADLINE_S)
    cluster.remove("v100")
    wait_for(lambda: "V100" not in {t["type"] for t in rc.pool()["types"]}, DEADLINE_S)
    assert "V100" in rc.pool()["types_gone"]
    job = gpu_magic.run("1", "V100", {"__name__": "__main__"}, client=rc, quiet=True,
                        background=True, wait=30)
    wait_for(lambda: job.state == "queued", DEADLINE_S)
    cluster.add("v100b", "V100", 1)  # a node of its type joins: the job runs there
    job.wait(timeout=DEADLINE_S)
    assert job.state == "succeeded" and job.grant["gpu_type"] == "V100"
    cluster.remove("v100b")


def test_a_cluster_with_no_gpu_node_left_is_said_to_be_so(cluster: RayCluster,
                                                          tmp_path: Path) -> None:
    # the refusal spoke of NVML and told a user already on GPU_MAGIC_URL to set it (found by
    # a newcomer)
    gw = start_gateway(tmp_path, "--backend", "ray", "--ray-address", cluster.address,
                       simulate=None)
    try:
        for name in list(cluster.nodes):
            cluster.remove(name)
        with gw.client() as c:
            wait_for(lambda: not c.pool()["types"], DEADLINE_S)
            with pytest.raises(gpu_magic.NoFeasibleOption) as info:
                gpu_magic.run("1", "any", {"__name__": "__main__"}, client=c, quiet=True)
        said = str(info.value)
        assert (f"no option of 'any' can run now: the Ray cluster of this gateway "
                f"({cluster.address}) has no GPU node at the moment") in said, said
        assert "NVML" not in said and "GPU_MAGIC_URL" not in said
    finally:
        gw.stop()


@pytest.mark.parametrize("meta", [{"version": "0.1.0"}, {"wire": 0}])
def test_a_node_of_another_version_or_wire_format_refuses_the_cell(meta: dict[str, Any]) -> None:
    # a review: the node compared only versions, and every commit before the wire format
    # called itself 0.1.0, so a node on older code ran cells it could not read
    from gpu_magic._version import WIRE_FORMAT, __version__
    from gpu_magic.server.backends.ray._node import _run

    said = list(_run({"version": __version__, "wire": WIRE_FORMAT, **meta}, ()))
    assert [s[:1] for s in said] == [b"E", b"X"], said
    error = json.loads(said[0][1:])
    assert error["ename"] == "EnvironmentMismatch", error
    assert (f"this Ray node has gpu_magic {__version__} (wire format {WIRE_FORMAT}) but the "
            f"gateway has {meta.get('version', __version__)} (wire format "
            f"{meta.get('wire', WIRE_FORMAT)}); install the same version on every node"
            == error["evalue"]), error
