"""What GPUs a pool has: read from NVML, or a simulated inventory for teaching and CI.

NVML missing or failing means "no GPUs", never a crash: a CPU-only box still serves a simulated
pool, and says clearly that it has no real GPUs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from .._errors import SpecError
from .._spec import memory_gb

# NVML names ("NVIDIA H100 80GB HBM3", "Tesla T4", "NVIDIA A100-SXM4-40GB") to our catalogue.
_NVML_PATTERNS: list[tuple[str, str]] = [
    (r"\bB200\b", "B200"),
    (r"\bH200\b", "H200"),
    (r"\bH100\b", "H100"),
    (r"\bA100\b.*80\s*GB", "A100-80GB"),
    (r"\bA100\b", "A100-40GB"),
    (r"RTX PRO 6000", "RTX-PRO-6000"),
    (r"\bL40S\b", "L40S"),
    (r"\bA10G?\b", "A10"),
    (r"\bL4\b", "L4"),
    (r"\bT4\b", "T4"),
]


@dataclass(frozen=True)
class Gpu:
    """One GPU of the pool."""

    node: str
    index: int
    type: str
    memory_gb: int | None = None
    uuid: str | None = None
    simulated: bool = False
    busy_foreign: bool = False  # busy with processes that are not ours (NVML)
    virtual: bool = False  # of a node an autoscaler can add, not there yet

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "index": self.index,
            "type": self.type,
            "memory_gb": self.memory_gb,
            "uuid": self.uuid,
            "simulated": self.simulated,
        }


def nvml_type(name: str, memory_bytes: int | None = None) -> str:
    """Our catalogue type for an NVML device name (an unknown name is kept, upper-cased)."""
    for pattern, canon in _NVML_PATTERNS:
        if re.search(pattern, name, re.IGNORECASE):
            if canon == "A100-40GB" and memory_bytes and memory_bytes > 60 * 2**30:
                return "A100-80GB"
            return canon
    clean = re.sub(r"^(NVIDIA|Tesla)\s+", "", name.strip(), flags=re.IGNORECASE)
    return re.sub(r"\s+", "-", clean).upper() or "GPU"


def parse_simulated(spec: str, node: str | None = None) -> list[Gpu]:
    """``"H100:2,A100-80GB:4"`` (optionally ``TYPE:COUNT@node``) as simulated GPUs."""
    node = node or f"sim-{socket.gethostname()}"
    gpus: list[Gpu] = []
    counters: dict[str, int] = {}
    for raw in re.split(r"[,|]", spec) if spec.strip() else []:
        item = raw.strip()
        if not item:  # refused as a cell's spec refuses one: a typo, not a pool to guess at
            raise SpecError(
                f"empty entry in the simulated pool {spec!r}; separate entries with single "
                "commas, e.g. GPU_MAGIC_SIMULATE='H100:2,A100-80GB:4'",
                spec=spec,
            )
        # spaces around ':' and '@' allowed, as a cell's spec allows them ('H100 : 2')
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]*)(?:\s*:\s*(-?\d+))?(?:\s*@\s*([A-Za-z0-9_.-]+))?",
                         item)
        if m and m.group(1).lower() == "any":  # a spec's `any` means any type: none is called so
            raise SpecError(
                f"'{item}' in the simulated pool {spec!r}: 'any' is not a GPU type (in a cell's "
                "spec it means any type); name the type, e.g. GPU_MAGIC_SIMULATE='T4:2'",
                spec=spec,
            )
        if not m:
            raise SpecError(
                f"'{item}' in the simulated pool {spec!r} is not TYPE[:COUNT][@NODE]; "
                "write e.g. GPU_MAGIC_SIMULATE='H100:2,A100-80GB:4'",
                spec=spec,
            )
        gtype = m.group(1).upper()
        gtype = {"A10G": "A10", "A100": "A100-40GB"}.get(gtype, gtype)
        count = int(m.group(2) or 1)
        if not 1 <= count <= 64:
            raise SpecError(
                f"'{item}' in the simulated pool asks for {count} GPUs; use 1 to 64 per node",
                spec=spec,
            )
        where = m.group(3) or node
        for _ in range(count):
            idx = counters.get(where, 0)
            counters[where] = idx + 1
            gpus.append(Gpu(where, idx, gtype, memory_gb(gtype), f"SIM-{where}-{idx}", True))
    if not gpus:
        raise SpecError(f"the simulated pool {spec!r} has no GPUs; write e.g. 'H100:2,A100-80GB:4'")
    return gpus


def canonical_pool(spec: str | None) -> str | None:
    """A simulated pool in one spelling (``h100:2, T4`` and ``H100:2,T4:1`` are one pool:
    types as the pool names them, every count said, no spaces), so that kernels which write
    it differently share one local gateway. One that cannot be read is kept as written: it is
    refused where it is used, with what is wrong."""
    if not spec or not spec.strip():
        return None
    try:
        gpus = parse_simulated(spec, node="\0")  # (a node named by no one: the default)
    except SpecError:
        return spec
    runs = itertools.groupby(gpus, key=lambda g: (g.type, g.node))
    return ",".join(f"{t}:{len(list(run))}" + ("" if node == "\0" else f"@{node}")
                    for (t, node), run in runs)


def _descends_from(pid: int, ancestor: int) -> bool | None:
    """Whether process ``pid`` is ``ancestor`` or below it; None when this host's /proc does
    not show ``pid`` at all (another pid namespace: NVML in a container reports the host's)."""
    for depth in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None if depth == 0 else False
    return False


def _foreign(pids: list[int], own_pids: set[int], held: bool) -> bool:
    """Whether any of the processes computing on a GPU is not this gateway's. Its runners are
    its descendants, idle warm ones too (they keep their CUDA context between cells: counted
    foreign, their GPU was never granted again). A process /proc does not show cannot be told
    apart: on a GPU this gateway holds, it is taken for its own runner."""
    me = os.getpid()
    for pid in pids:
        if pid in own_pids:
            continue
        mine = _descends_from(pid, me)
        if mine or (mine is None and held):
            continue
        return True
    return False


# NVML stays initialised for the process, with each GPU's fixed facts read once: the pool is
# read on every submit and scheduling pass, and an init/shutdown pair per read put NVML's
# start-up on every cell's path on a real GPU host. Keyed by the module: a new one starts over.
_NVML: dict[str, Any] = {}


def _nvml_devices(pynvml: Any) -> list[tuple[Any, str, str, int]]:
    """(handle, name, uuid, total memory) per GPU, from the kept NVML session."""
    if _NVML.get("module") is not pynvml:
        _NVML.clear()
        pynvml.nvmlInit()
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            devices.append((h, name.decode() if isinstance(name, bytes) else name,
                            uuid.decode() if isinstance(uuid, bytes) else uuid,
                            pynvml.nvmlDeviceGetMemoryInfo(h).total))
        _NVML.update(module=pynvml, devices=devices)
    return _NVML["devices"]


def read_nvml(node: str | None = None, own_pids: set[int] | None = None,
              held: Collection[int] = ()) -> list[Gpu]:
    """The real GPUs of this host, or [] when NVML is absent or fails. ``held``: indices of
    the GPUs this gateway's runners hold (running or kept warm)."""
    node = node or socket.gethostname()
    try:
        import pynvml
    except Exception:
        return []
    try:
        devices = _nvml_devices(pynvml)
    except Exception:
        _NVML.clear()  # tried afresh next time (a driver being reloaded)
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
        return []
    gpus: list[Gpu] = []
    for i, (h, name, uuid, mem) in enumerate(devices):
        foreign = False
        try:
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
            foreign = _foreign([p.pid for p in procs], own_pids or set(), i in held)
        except Exception:
            pass
        gtype = nvml_type(name, mem)
        gpus.append(Gpu(node, i, gtype, round(mem / 2**30), uuid, False, foreign))
    return gpus

