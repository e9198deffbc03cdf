"""GPU inventory: NVML names to our types, simulated pools, and NVML failing cleanly.

NVML is the edge of the world here (this machine has no GPU), so a stand-in pynvml module is
used to feed real-looking device data through our code; the real thing runs in test_gpu.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import gpu_magic
from gpu_magic import SpecError
from gpu_magic.server.inventory import nvml_type, parse_simulated, read_nvml

from .conftest import start_gateway, wait_for


@pytest.mark.parametrize(
    ("name", "memory_gib", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 80, "H100"),
        ("NVIDIA H100 PCIe", 80, "H100"),
        ("NVIDIA H200", 141, "H200"),
        ("NVIDIA B200", 180, "B200"),
        ("NVIDIA A100-SXM4-40GB", 40, "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", 80, "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", 80, "A100-80GB"),
        ("NVIDIA A100-PCIE-40GB", 80, "A100-80GB"),  # memory decides when the name is unclear
        ("Tesla T4", 16, "T4"),
        ("NVIDIA L4", 24, "L4"),
        ("NVIDIA L40S", 48, "L40S"),
        ("NVIDIA A10G", 24, "A10"),
        ("NVIDIA A10", 24, "A10"),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", 96, "RTX-PRO-6000"),
        ("NVIDIA GeForce RTX 4090", 24, "GEFORCE-RTX-4090"),
    ],
)
def test_nvml_names_map_to_catalogue(name: str, memory_gib: int, expected: str) -> None:
    assert nvml_type(name, memory_gib * 2**30) == expected


def test_simulated_pool_parses_counts_nodes_and_aliases() -> None:
    gpus = parse_simulated("H100:2@a, a100:1@b, A10G", node="n0")
    assert [(g.node, g.index, g.type) for g in gpus] == [
        ("a", 0, "H100"), ("a", 1, "H100"), ("b", 0, "A100-40GB"), ("n0", 0, "A10")]
    assert all(g.simulated and g.uuid for g in gpus)
    assert gpus[0].memory_gb == 80
    # spaced as a cell's spec may be: the same pool
    assert parse_simulated("H100 : 2 @ a, a100: 1@b, A10G", node="n0") == gpus


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("H100:0", "'H100:0' in the simulated pool asks for 0 GPUs; use 1 to 64 per node"),
        ("H100:-1", "'H100:-1' in the simulated pool asks for -1 GPUs; use 1 to 64 per node"),
        # `any` in a spec means any type: a pool type of that name could never be asked for
        ("any:2", "'any:2' in the simulated pool 'any:2': 'any' is not a GPU type (in a cell's "
                  "spec it means any type); name the type, e.g. GPU_MAGIC_SIMULATE='T4:2'"),
        ("H100::2", "'H100::2' in the simulated pool 'H100::2' is not TYPE[:COUNT][@NODE]; write "
                    "e.g. GPU_MAGIC_SIMULATE='H100:2,A100-80GB:4'"),
        # an empty entry was skipped (a cell's spec refuses one): refused, as a typo
        ("H100:2,,", "empty entry in the simulated pool 'H100:2,,'; separate entries with "
                     "single commas, e.g. GPU_MAGIC_SIMULATE='H100:2,A100-80GB:4'"),
        (" , ", "empty entry in the simulated pool ' , '; separate entries with single commas, "
                "e.g. GPU_MAGIC_SIMULATE='H100:2,A100-80GB:4'"),
        ("  ", "the simulated pool '  ' has no GPUs; write e.g. 'H100:2,A100-80GB:4'"),
    ],
)
def test_bad_simulated_pool_is_explained(spec: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_simulated(spec)
    assert str(info.value) == message


class _Proc:
    def __init__(self, pid: int) -> None:
        self.pid = pid


class _Mem:
    def __init__(self, total: int) -> None:
        self.total = total


def _fake_pynvml(devices: list[dict[str, Any]], fail_init: bool = False) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    def init() -> None:
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: devices[i]  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: h["name"]  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUUID = lambda h: h["uuid"]  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = lambda h: _Mem(h["mem"])  # type: ignore[attr-defined]
    mod.nvmlDeviceGetComputeRunningProcesses = lambda h: [_Proc(p) for p in h["pids"]]  # type: ignore[attr-defined]
    return mod


def test_nvml_inventory_marks_gpus_busy_with_foreign_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = [
        {"name": b"NVIDIA H100 80GB HBM3", "uuid": "GPU-aaa", "mem": 80 * 2**30, "pids": []},
        {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-bbb", "mem": 80 * 2**30, "pids": [4242]},
        {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-ccc", "mem": 80 * 2**30, "pids": [77]},
    ]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(devices))
    gpus = read_nvml(node="box", own_pids={77})
    assert [(g.index, g.type, g.uuid, g.busy_foreign, g.simulated) for g in gpus] == [
        (0, "H100", "GPU-aaa", False, False),
        (1, "H100", "GPU-bbb", True, False),
        (2, "H100", "GPU-ccc", False, False),  # busy with our own runner: not foreign
    ]


def test_nvml_missing_or_failing_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([], fail_init=True))
    assert read_nvml() == []
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert read_nvml() == []


def test_our_own_runners_and_their_children_are_never_foreign(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # On a real GPU an idle warm runner keeps its CUDA context between cells. Counted as a
    # foreign process, its GPU was never granted again: the next cell queued for good (seen on
    # an H200). Our runners are this process's descendants; a child of ours is ours too.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        devices = [
            {"name": "NVIDIA H200", "uuid": "GPU-a", "mem": 141 * 2**30, "pids": [child.pid]},
            {"name": "NVIDIA H200", "uuid": "GPU-b", "mem": 141 * 2**30, "pids": [1]},  # init: not ours
            # pids /proc does not show (NVML in a container reports the host's): ours where
            # our runners hold the GPU, foreign where they do not
            {"name": "NVIDIA H200", "uuid": "GPU-c", "mem": 141 * 2**30, "pids": [2**22 + 7]},
            {"name": "NVIDIA H200", "uuid": "GPU-d", "mem": 141 * 2**30, "pids": [2**22 + 7]},
        ]
        monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(devices))
        gpus = read_nvml(node="box", own_pids=set(), held={0, 2})
        assert [g.busy_foreign for g in gpus] == [False, True, False, True]
    finally:
        child.kill()
        child.wait()



FAKE_NVML = """
import os
_DIR = os.environ["FAKE_NVML_DIR"]
def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetName(h): return "NVIDIA H200"
def nvmlDeviceGetUUID(h): return "GPU-fake-%d" % h
class _Mem: total = 141 * 2**30
def nvmlDeviceGetMemoryInfo(h): return _Mem()
class _Proc:
    def __init__(self, pid): self.pid = pid
def nvmlDeviceGetComputeRunningProcesses(h):
    try:
        pids = open(os.path.join(_DIR, "gpu%d" % h)).read().split()
    except OSError:
        return []
    return [_Proc(int(p)) for p in pids if os.path.exists("/proc/" + p)]
"""


def test_a_warm_runner_holding_a_cuda_context_does_not_block_its_gpu(tmp_path: Path) -> None:
    # Seen on an H200: the second CUDA cell queued for good, because the first cell's warm
    # runner kept its CUDA context and NVML listed it as a process on the GPU. NVML is the
    # edge of the world here: a stand-in module lists as computing on GPU 0 the processes the
    # cells name in a file, as a CUDA context would show them.
    (tmp_path / "nvml").mkdir()
    (tmp_path / "nvml" / "pynvml.py").write_text(FAKE_NVML)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "nvml"), *sys.path]),
           "FAKE_NVML_DIR": str(tmp_path)}
    gw = start_gateway(tmp_path, simulate=None, env=env)
    try:
        hold = (f"import os\nopen({str(tmp_path / 'gpu0')!r}, 'a').write(f'{{os.getpid()}} ')\n"
                "pid = os.getpid()")
        pids = []
        with gw.client() as c:
            assert [g["type"] for n in c.pool()["nodes"] for g in n["gpus"]] == ["H200"]
            for _ in range(2):
                ns: dict[str, Any] = {"__name__": "__main__"}
                gpu_magic.run(hold, "H200", ns, client=c, quiet=True, wait=20)
                pids.append(ns["pid"])
            assert pids[0] == pids[1]  # the same warm runner took the second cell
            # a process that is not the gateway's on that GPU still makes it busy
            other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                     start_new_session=True)
            try:
                (tmp_path / "gpu0").write_text(f"{other.pid} ")
                assert wait_for(lambda: c.pool()["nodes"][0]["gpus"][0]["foreign"], 10)
            finally:
                other.kill()
                other.wait()
    finally:
        gw.stop()


def test_a_cell_waiting_for_a_gpu_held_outside_says_so_and_starts_when_it_is_free(
        tmp_path: Path) -> None:
    # Nothing here says when a process gpu_magic did not start lets go of its GPU: a cell
    # queued behind one waited for good (until some other job came or ended), saying only
    # "queued", on a box where nobody else used gpu_magic
    (tmp_path / "nvml").mkdir()
    (tmp_path / "nvml" / "pynvml.py").write_text(FAKE_NVML)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "nvml"), *sys.path]),
           "FAKE_NVML_DIR": str(tmp_path)}
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             start_new_session=True)
    gw = start_gateway(tmp_path, simulate=None, env=env)
    try:
        (tmp_path / "gpu0").write_text(f"{other.pid} ")
        with gw.client() as c:
            with pytest.raises(gpu_magic.WaitExpired) as info:
                gpu_magic.run("1", "H200", {"__name__": "__main__"}, client=c, quiet=True,
                              wait=2)
            node = c.pool()["nodes"][0]["name"]
            assert str(info.value).endswith(
                f"'H200' did not start within --wait 2 s: GPU 0 (H200) on {node} is in use by "
                "a process gpu_magic did not start (nvidia-smi lists it: a notebook kernel "
                "that used CUDA itself counts too); nothing ran. Wait "
                "longer (--wait) or add fallback options (%gpu pool shows what is free).")
            ns: dict[str, Any] = {"__name__": "__main__"}
            # its first runner dies: the retry waits for nothing held outside any more
            cell = (f"import os\nflag = {str(tmp_path / 'died')!r}\n"
                    "if not os.path.exists(flag):\n    open(flag, 'w').close()\n"
                    "    os._exit(3)\nx = 41 + 1")
            job = gpu_magic.run(cell, "H200", ns, client=c, quiet=True, background=True,
                                retries=1)
            said = next(e for e in c.events(job.id) if e.get("waiting_for"))
            assert said["type"] == "queued" and said["waiting_for"] == (
                f"GPU 0 (H200) on {node} is in use by a process gpu_magic did not start "
                "(nvidia-smi lists it: a notebook kernel that used CUDA itself counts too); "
                "the cell starts when it is free")
            assert c.job(job.id)["waiting_why"] == said["waiting_for"]  # (the sidebar's)
            other.kill()
            other.wait()
            job.wait(20)  # no other job comes or ends meanwhile
            assert ns["x"] == 42
            events = list(c.events(job.id))
            retried = [e for e in events if e["type"] == "queued" and e["attempt"] == 2]
            assert retried and not any(e.get("waiting_for") for e in retried), retried
            assert [e["type"] for e in events].count("started") == 2
    finally:
        other.kill()
        gw.stop()


def test_nvml_is_started_once_and_asked_only_for_processes_after(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the pool is read on every submit: NVML's start-up on each read was on every cell's path
    devices = [{"name": "NVIDIA H200", "uuid": "GPU-a", "mem": 141 * 2**30, "pids": []}]
    fake = _fake_pynvml(devices)
    calls: list[str] = []
    for name in ("nvmlInit", "nvmlShutdown", "nvmlDeviceGetName"):
        real = getattr(fake, name)
        setattr(fake, name, lambda *a, _n=name, _r=real: (calls.append(_n), _r(*a))[1])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    first = read_nvml(node="box")
    devices[0]["pids"] = [1]  # a process appears: seen on the next read
    second = read_nvml(node="box")
    assert [g.busy_foreign for g in first + second] == [False, True]
    assert calls == ["nvmlInit", "nvmlDeviceGetName"]


def test_the_outside_note_names_gpus_where_the_backend_can_tell_which() -> None:
    from gpu_magic.server.backends.local import LocalBackend
    from gpu_magic.server.backends.ray import RayBackend
    from gpu_magic.server.gateway import _outside_note

    held = parse_simulated("H100:3@box")[1:]
    assert _outside_note(held[:1], LocalBackend) == (
        "GPU 1 (H100) on box is in use by a process gpu_magic did not start (nvidia-smi lists "
        "it: a notebook kernel that used CUDA itself counts too); the cell starts when it is "
        "free")
    assert _outside_note(held, LocalBackend).startswith("GPUs 1, 2 (H100) on box are in use")
    # which of a node's GPUs Ray gives is Ray's: how many are taken, not made-up indices
    assert _outside_note(held, RayBackend) == (
        "2 H100s on box are in use by other work on the Ray cluster; the cell starts when "
        "they are free")
    assert _outside_note([], LocalBackend) is None
