"""GPU inventory: NVML names to our types, simulated pools, and NVML failing cleanly.

NVML is the edge of the world here (this machine has no GPU), so a stand-in pynvml module is
used to feed real-looking device data through our code; the real thing runs in test_gpu.py.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from gpu_magic import SpecError
from gpu_magic.server.inventory import nvml_type, parse_simulated, read_nvml


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


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("H100:0", "'H100:0' in the simulated pool asks for 0 GPUs; use 1 to 64 per node"),
        ("H100::2", "'H100::2' in the simulated pool 'H100::2' is not TYPE[:COUNT][@NODE]; write "
                    "e.g. GPU_MAGIC_SIMULATE='H100:2,A100-80GB:4'"),
        (" , ", "the simulated pool ' , ' has no GPUs; write e.g. 'H100:2,A100-80GB:4'"),
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
