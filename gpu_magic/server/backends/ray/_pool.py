"""The pool as a Ray cluster shows it: pure functions, no Ray import, no clock.

Ray describes a GPU node by its ``GPU`` count and an ``accelerator_type:LABEL`` resource whose
label comes from the NVML device name (``A100`` for both memory sizes, ``A10G`` for the A10).
Here those labels, plus the GPU memory a node reports, become our catalogue's types; a
configurable map overrides them. Node types an autoscaler can add appear as a virtual node whose
GPUs are always busy: feasible for the scheduler (a job is not refused), never free (nothing is
granted on a machine that does not exist yet).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...._spec import GpuOption, memory_gb, pool_type_note
from ...inventory import Gpu, nvml_type

ACCEL_PREFIX = "accelerator_type:"
UNTYPED = "GPU"  # a GPU node whose type Ray does not know: shown as such, matched by `any`
VIRTUAL_PREFIX = "autoscale-"

# Ray labels that our NVML name table would read differently (ray.util.accelerators names).
_LABELS: dict[str, str] = {"A10G": "A10", "A100-40G": "A100-40GB", "A100-80G": "A100-80GB"}
# Our types back to the label Ray puts on such a node, for autoscaler requests.
_RAY_LABELS: dict[str, str] = {"A10": "A10G", "A100-40GB": "A100", "A100-80GB": "A100"}


class PoolConfigError(ValueError):
    """A type map or autoscale spec that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Rule:
    """One way a Ray label becomes our type: at least ``min_memory_gb`` of GPU memory, if given."""

    type: str
    min_memory_gb: float | None = None
    memory_gb: int | None = None


@dataclass
class TypeMap:
    """Ray accelerator labels (plus reported GPU memory) to our type names."""

    rules: dict[str, list[Rule]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> TypeMap:
        """Read a JSON map such as ``{"A100": [{"type": "A100-80GB", "min_memory_gb": 60},
        {"type": "A100-40GB"}], "MI300X": {"type": "MI300X", "memory_gb": 192}}``."""
        if path is None:
            return cls()
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise PoolConfigError(f"cannot read the Ray type map {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise PoolConfigError(f"the Ray type map {path} is not valid JSON: {exc}") from None
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data: Any, where: str = "the Ray type map") -> TypeMap:
        example = ('write e.g. {"A100": [{"type": "A100-80GB", "min_memory_gb": 60}, '
                   '{"type": "A100-40GB"}], "A10G": "A10"}')
        if not isinstance(data, dict):
            raise PoolConfigError(f"{where} must be a JSON object of Ray label to type; {example}")
        rules: dict[str, list[Rule]] = {}
        for label, value in data.items():
            items = value if isinstance(value, list) else [value]
            out = []
            for item in items:
                if isinstance(item, str):
                    item = {"type": item}
                if not (isinstance(item, dict) and isinstance(item.get("type"), str)
                        and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", item["type"])
                        and set(item) <= {"type", "min_memory_gb", "memory_gb"}):
                    raise PoolConfigError(f"{where}: {label!r} maps to {item!r}, which is not a type "
                                          f"name or a rule with type, min_memory_gb, memory_gb; "
                                          f"{example}")
                for key in ("min_memory_gb", "memory_gb"):
                    v = item.get(key)
                    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                        raise PoolConfigError(f"{where}: {key} of {label!r} is {v!r}; use a number "
                                              "of gigabytes")
                mem = item.get("memory_gb")
                out.append(Rule(_canonical(item["type"]), item.get("min_memory_gb"),
                                int(mem) if mem is not None else None))
            if not out:
                raise PoolConfigError(f"{where}: {label!r} maps to nothing; {example}")
            rules[label.upper()] = out
        return cls(rules)

    def notes(self) -> list[str]:
        """What may be wrong with the map's types: a name that is not in the catalogue (``H1000``:
        did you mean H100?). Users ask for a node's GPUs by the mapped name only, so a typo here
        makes a type nobody asks for. A rule that gives ``memory_gb`` declares a type of its
        own: noted only when its name is close to a known one."""
        out = []
        for label, rules in sorted(self.rules.items()):
            for rule in rules:
                note = pool_type_note(
                    rule.type, f"the type '{rule.type}' that --ray-type-map gives Ray label {label}",
                    typos_only=rule.memory_gb is not None)
                if note and note not in out:
                    out.append(note)
        return out

    def resolve(self, labels: Iterable[str], probed: tuple[str, int | None] | None) -> tuple[str, int | None]:
        """(type, memory in GB) of a GPU node from its Ray labels and what its GPUs reported.

        The map decides first (the operator's word), then the GPU's own NVML name, then the Ray
        label; a node with neither is ``GPU``, which only ``any`` asks for.
        """
        label = _most_specific(labels)
        probed_type, probed_mem = probed if probed else (None, None)
        if label is not None and label.upper() in self.rules:
            for rule in self.rules[label.upper()]:
                if rule.min_memory_gb is None or (probed_mem is not None
                                                  and probed_mem >= rule.min_memory_gb):
                    return rule.type, rule.memory_gb or probed_mem or memory_gb(rule.type)
        if probed_type:
            return probed_type, probed_mem or memory_gb(probed_type)
        if label is None:
            return UNTYPED, probed_mem
        gtype = label_type(label, probed_mem)
        return gtype, probed_mem or memory_gb(gtype)

    def memory_of(self, gtype: str) -> int | None:
        """GPU memory of our type ``gtype``: as the map states it, else the catalogue's."""
        for rules in self.rules.values():
            for r in rules:
                if r.type == gtype and r.memory_gb:
                    return r.memory_gb
        return memory_gb(gtype)

    def ray_label(self, gtype: str) -> str:
        """The accelerator label Ray gives a node of our type ``gtype`` (for autoscaler requests)."""
        for label, rules in self.rules.items():
            if any(r.type == gtype for r in rules):
                return label
        return _RAY_LABELS.get(gtype, gtype)


def label_type(label: str, memory: int | None = None) -> str:
    """Our type for a Ray accelerator label; ``A100`` needs the memory to tell its two sizes."""
    upper = label.strip().upper()
    if upper in _LABELS:
        return _LABELS[upper]
    return nvml_type(label, memory * 2**30 if memory else None)


def _most_specific(labels: Iterable[str]) -> str | None:
    # A node may carry both Ray's own label and a sized one an operator added (A100, A100-80G).
    found = sorted({lb for lb in labels if lb}, key=lambda lb: (-len(lb), lb))
    return found[0] if found else None


def _canonical(name: str) -> str:
    upper = name.strip().upper()
    return {"A10G": "A10", "A100": "A100-40GB"}.get(upper, upper)


def parse_autoscale(spec: str | None) -> list[tuple[str, int]]:
    """``"H100:8,L4:1"``: node types an autoscaler can add, as (type, GPUs per node)."""
    out: list[tuple[str, int]] = []
    for raw in re.split(r"[,|]", spec or ""):
        item = raw.strip()
        if not item:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]*)(?::(\d+))?", item)
        if not m or not 1 <= int(m.group(2) or 1) <= 64:
            raise PoolConfigError(
                f"'{item}' in --ray-autoscale {spec!r} is not TYPE[:GPUS_PER_NODE] with 1 to 64 "
                "GPUs; write e.g. --ray-autoscale 'H100:8,L4:1'"
            )
        out.append((_canonical(m.group(1)), int(m.group(2) or 1)))
    return out


@dataclass
class NodeView:
    """One Ray node as the backend last read it."""

    node_id: str
    name: str
    alive: bool
    gpus: float  # total GPU resource
    available: float  # GPU resource not held by anyone
    labels: tuple[str, ...] = ()
    probed: tuple[str, int | None] | None = None  # NVML type and memory, when the node answered

    @classmethod
    def from_ray(cls, node: Mapping[str, Any], name: str, available: Mapping[str, float] | None,
                 probed: tuple[str, int | None] | None = None) -> NodeView:
        res = node.get("Resources") or {}
        total = float(res.get("GPU", 0.0))
        free = float((available or {}).get("GPU", 0.0)) if available is not None else total
        labels = tuple(k[len(ACCEL_PREFIX):] for k in res if k.startswith(ACCEL_PREFIX))
        return cls(node["NodeID"], name, bool(node.get("Alive")), total, free, labels, probed)


class NodeNames:
    """Stable, readable node names: the host name, or host name and id where hosts repeat.

    A name never changes once given, so a running job's grant keeps pointing at its node.
    """

    def __init__(self) -> None:
        self.by_id: dict[str, str] = {}
        self.by_name: dict[str, str] = {}

    def update(self, nodes: Sequence[Mapping[str, Any]]) -> None:
        hosts: dict[str, int] = {}
        for n in nodes:
            host = _host(n)
            hosts[host] = hosts.get(host, 0) + 1
        for n in nodes:
            node_id = n["NodeID"]
            if node_id in self.by_id:
                continue
            host = _host(n)
            name = host if hosts[host] == 1 and host not in self.by_name else f"{host}-{node_id[:6]}"
            self.by_id[node_id] = name
            self.by_name[name] = node_id


def _host(node: Mapping[str, Any]) -> str:
    host = str(node.get("NodeManagerHostname") or node.get("NodeManagerAddress") or "ray-node")
    return re.sub(r"[^A-Za-z0-9_.-]", "-", host.split(".")[0] or host) or "ray-node"


def build_pool(nodes: Sequence[NodeView], ours: Mapping[str, set[int]], types: TypeMap,
               autoscale: Sequence[tuple[str, int]] = (),
               asked: Mapping[str, set[int]] | None = None) -> list[Gpu]:
    """The GPUs of the live nodes, those held by other Ray users marked busy, plus the virtual
    nodes of the autoscaler's node types that no live node provides yet.

    ``ours``: per node id, the GPU indices our own placement groups hold (or just gave back, which
    Ray may not report as free yet); the rest of the GPUs in use on a node belong to others.
    ``asked``: per node id, GPU indices we asked Ray for and it has not given yet: busy (Ray
    would not give them now), so a job waiting for them may take its next option instead.
    """
    gpus: list[Gpu] = []
    real: dict[str, int] = {}
    for node in nodes:
        count = int(node.gpus + 1e-9)
        if not node.alive or count < 1:
            continue
        gtype, mem = types.resolve(node.labels, node.probed)
        real[gtype] = max(real.get(gtype, 0), count)
        mine = ours.get(node.node_id, set())
        in_use = math.ceil(max(0.0, node.gpus - node.available) - 1e-6)
        foreign = max(0, in_use - len(mine))
        # which physical GPUs others hold is Ray's secret; mark the highest indices we do not hold
        others = [i for i in reversed(range(count)) if i not in mine][:foreign]
        refused = (asked or {}).get(node.node_id, set()) - mine
        for i in range(count):
            gpus.append(Gpu(node.name, i, gtype, mem, None, False, i in others or i in refused))
    for gtype, count in autoscale:
        if real.get(gtype, 0) >= count:
            continue  # a live node of this type exists; the pool shows it as it is
        name = VIRTUAL_PREFIX + gtype.lower()
        mem = types.memory_of(gtype)
        gpus.extend(Gpu(name, i, gtype, mem, None, False, True, virtual=True)
                    for i in range(count))
    return gpus


def demand(waiting: Sequence[Sequence[GpuOption]], pool: Sequence[Gpu], types: TypeMap,
           autoscale: Sequence[tuple[str, int]]) -> list[dict[str, float]]:
    """Resource bundles to ask an autoscaler for: for each waiting job, its first option that only
    a node not started yet could run."""
    per_node: dict[tuple[str, str], int] = {}
    for g in pool:
        if not g.node.startswith(VIRTUAL_PREFIX):
            per_node[(g.node, g.type)] = per_node.get((g.node, g.type), 0) + 1
    bundles: list[dict[str, float]] = []
    for options in waiting:
        for opt in options:
            if any(opt.matches(t) and n >= opt.count for (_, t), n in per_node.items()):
                continue  # a live node can run it once it is free
            fits = [(memory_gb(t) or 10**6, t) for t, n in autoscale if opt.matches(t) and n >= opt.count]
            if fits:
                gtype = min(fits)[1]
                bundles.append({"GPU": float(opt.count),
                                ACCEL_PREFIX + types.ray_label(gtype): 0.001})
                break
    return bundles
