"""The Ray backend: the gateway as a Ray driver, each job one streaming Ray task on a GPU node.

Our scheduler keeps deciding (option order, fair share, feasibility); Ray holds the GPUs. Before a
grant is announced the gateway calls ``reserve``, which takes the chosen GPUs with a STRICT_PACK
placement group pinned to the chosen node (another Ray user may have taken them since we looked);
the job's task then runs inside that group, Ray picks the device indices and sets
``CUDA_VISIBLE_DEVICES``. The group is given back when the task ends, fails or is cancelled.

Nothing the task returns is unpickled here: it yields bytes (see ``_node``), decoded as JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from ...._spec import GpuOption
from ...._version import WIRE_FORMAT, __version__
from ...inventory import Gpu
from ..local import EventCallback, ExitCallback, RunSpec
from . import _node
from ._pool import NodeNames, NodeView, TypeMap, build_pool, demand, parse_autoscale

log = logging.getLogger("gpu_magic.ray")

NODE_ID_LABEL = "ray.io/node-id"
# Ray reports GPUs we gave back as free a moment later (here within 0.1 s): ours until then, or
# they would look held by someone else. No longer: while it lasts, GPUs another Ray user took
# the moment we gave them back look free too (a job asking for them fails once in Ray, then
# takes its next option, see _ours).
RELEASE_GRACE_S = 1.0
STALE_RESERVATION_S = 3.0  # a reservation the gateway stopped asking for is given back
# A placement group whose job ended is kept this long for the next job on as many of that node's
# GPUs: Ray takes 0.5-1 s to place a new group on GPUs just given back, while a task in a kept
# group starts within ~10 ms (measured here, ray 2.60), so a notebook's cells run back to back
# (Run All) no longer wait for Ray between them. Short: other Ray users wait for it too.
PARK_S = 2.0
# A group asked for on a node where we had just given GPUs back waits for Ray's own lag, not for
# another user: its GPUs count as ours (free to the scheduler) this long, so the job waits for
# them instead of taking its next option (a cell after a smaller one fell back to `any`).
OWN_LAG_S = 2.0
# A task not started yet is looked after this often: one sent into a placement group whose node
# had just died waits in Ray for good (a cell said "running" for its whole hour), so its node and
# group are looked at until its first frame comes.
START_WATCH_S = 1.0
# a node a task of ours saw die is left out of the pool until Ray's node list agrees, or this
# long (Ray's own health checks take seconds to tens of seconds to call a node dead)
DEAD_FOR_S = 120.0
CONNECT_TIMEOUT_S = 30.0  # ray.init takes ~2 s on a small machine; more is an address gone wrong


class _NoSigtermWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _host_port(address: str) -> tuple[str, int] | None:
    """``HOST:PORT`` of a cluster's GCS address, to look at before Ray tries; None for what
    Ray resolves itself (``auto``, ``ray://`` client addresses, anything else)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit() or not host:
        return None
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return None  # an IPv6 address without brackets: which colon ends the host is unclear
    return host.strip("[]"), int(port)
_BLOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _ray_available_per_node() -> dict[str, dict[str, float]] | None:
    # Per-node availability has no public API outside the dashboard's state API; without it, GPUs
    # held by other Ray users are not seen as busy (reserve still refuses to announce them).
    try:
        from ray._private import state

        return state.available_resources_per_node()
    except Exception:
        return None


class BlobRefs:
    """Input blobs in Ray's object store, one ObjectRef per blob file (least recently used
    dropped beyond ``max_bytes``), so an input used by many jobs crosses to Ray once."""

    def __init__(self, put: Callable[[bytes], Any], max_bytes: int = 2 << 30) -> None:
        self._put = put
        self._max = max_bytes
        self._refs: OrderedDict[tuple[str, int, int], tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.puts = 0

    def ref(self, path: str) -> Any:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._refs.get(key)
            if hit is not None:
                self._refs.move_to_end(key)
                return hit[0]
        with open(path, "rb") as f:
            data = f.read()
        ref = self._put(data)
        with self._lock:
            self.puts += 1
            self._refs[key] = (ref, len(data))
            self._bytes += len(data)
            # a task holds its own references to its arguments: dropping ours never breaks one
            while self._bytes > self._max and len(self._refs) > 1:
                _, (_, size) = self._refs.popitem(last=False)
                self._bytes -= size
        return ref

    def clear(self) -> None:
        with self._lock:
            self._refs.clear()
            self._bytes = 0


@dataclass
class Reservation:
    """A placement group taken (or being taken) for one attempt of a job."""

    key: tuple[str, int]
    node_id: str
    indices: tuple[int, ...]
    pg: Any
    ready: Any
    touched: float
    held: bool = False
    released: float | None = None
    parked: float | None = None  # when its job ended, while kept for the next one (PARK_S)
    made: float = field(default_factory=time.monotonic)


@dataclass
class RayHandle:
    """A running attempt: its task's stream and the reservation it runs in."""

    spec: RunSpec
    reservation: Reservation
    node: str
    gen: Any = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)  # its first frame came
    lost: str | None = None  # why the watch below gave it up before it started
    told: bool = False  # its end was told to the gateway (once)


class RayBackend:
    """Jobs as Ray tasks on the GPU nodes of a Ray cluster."""

    name = "ray"
    simulated = False
    client_python = False  # cells run with the nodes' Python, not the submitting kernel's
    poll_s = 1.0  # how often the gateway looks at the pool again while jobs wait
    outside = "in use by other work on the Ray cluster"
    outside_by_count = True  # (which of a node's GPUs Ray gives is Ray's; ours are counted)
    reports_start = True  # the runner's "interruptible" comes through: a --timeout counts from it

    def __init__(self, address: str | None = None, *, types: TypeMap | None = None,
                 autoscale: Sequence[tuple[str, int]] = (), refresh_s: float = 1.0,
                 reserve_wait_s: float = 0.05, workdir: str | None = None,
                 connect: bool = True) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or "auto"
        # where the address came from: said at start unless the operator named it
        self.address_from = ("--ray-address" if address else
                             "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else None)
        self.types = types or TypeMap()
        self.autoscale = list(autoscale)
        self.refresh_s = refresh_s
        self.reserve_wait_s = reserve_wait_s
        self.workdir = workdir
        self._lock = threading.RLock()
        self._names = NodeNames()
        self._snapshot: tuple[float, list[dict[str, Any]], dict[str, dict[str, float]] | None] | None = None
        self._probes: dict[str, Any] = {}  # node id -> ObjectRef, or the (type, memory) it answered
        self._reservations: dict[tuple[str, int], Reservation] = {}
        self._recent: list[Reservation] = []
        self._parked: list[Reservation] = []
        self._freed_at: dict[str, float] = {}  # node id -> when we last gave GPUs back there
        # nodes a task of ours saw die while Ray's node list still says alive (it says so
        # only after its health checks fail, seconds later): out of the pool meanwhile, for
        # DEAD_FOR_S at most (a node Ray still calls alive then is trusted again)
        self._dead: dict[str, float] = {}  # node id -> when we saw it die
        self._handles: dict[tuple[str, int], RayHandle] = {}
        self._demand: list[dict[str, float]] | None = None
        self._warned: set[str] = set()
        self.blobs = BlobRefs(ray.put)
        if connect:
            self._connect()

    # --- set-up ---

    @classmethod
    def from_config(cls, cfg: Any) -> RayBackend:
        from ...serve import ServeError
        from ._pool import PoolConfigError

        try:
            types = TypeMap.load(getattr(cfg, "ray_type_map", None))
            autoscale = parse_autoscale(getattr(cfg, "ray_autoscale", None))
        except PoolConfigError as exc:
            raise ServeError(str(exc)) from None
        try:
            backend = cls(cfg.ray_address, types=types, autoscale=autoscale)
        except ConnectionError as exc:
            raise ServeError(str(exc)) from None
        backend.wait_for_probes(10.0)
        return backend

    def _cannot(self, why: str) -> ConnectionError:
        where = (f"the Ray cluster at {self.address!r} ({self.address_from})"
                 if self.address_from else
                 "a Ray cluster by Ray's auto-detection on this machine (no --ray-address "
                 "was given, nor RAY_ADDRESS)")
        return ConnectionError(
            f"cannot connect to {where} ({why}). Start the gateway on "
            "a node of the cluster with --ray-address HEAD_IP:6379 (or RAY_ADDRESS set); "
            "with token auth, RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN or "
            "~/.ray/auth_token) must be set here too."
        )

    def _connect(self) -> None:
        # Ray's own client retries an address where nothing answers for good, printing only
        # its C++ log lines: look first, and give up after a while
        hostport = _host_port(self.address)
        if hostport is not None:
            try:
                socket.create_connection(hostport, timeout=CONNECT_TIMEOUT_S / 3).close()
            except OSError as exc:
                raise self._cannot(f"nothing answers at {self.address}: "
                                   f"{exc.strerror or exc}") from None
        done = threading.Event()
        failed: list[BaseException] = []

        def init() -> None:
            try:
                ray.init(address=self.address, namespace="gpu_magic",
                         logging_level=logging.WARNING, log_to_driver=False,
                         configure_logging=False)
            except BaseException as exc:  # noqa: BLE001 (said below, in the main thread)
                failed.append(exc)
            finally:
                done.set()

        # off the main thread Ray warns that it sets no SIGTERM handler: the gateway sets its
        # own (serve.py), so the warning would only alarm whoever reads its log
        logging.getLogger("ray._private.worker").addFilter(_NoSigtermWarning())
        threading.Thread(target=init, name="gpu-magic-ray-connect", daemon=True).start()
        if not done.wait(CONNECT_TIMEOUT_S):
            if hostport is None:  # Ray found the address itself (auto), or a ray:// one
                why = ("Ray may have found a cluster that is gone (the address it keeps in "
                       "its temporary folder, RAY_TMPDIR, from the last one started here): "
                       "name the cluster with --ray-address HEAD_IP:6379"
                       if self.address == "auto" else "is the address right?")
                raise self._cannot(f"no connection within {CONNECT_TIMEOUT_S:.0f} s; {why}")
            raise self._cannot(
                f"no connection within {CONNECT_TIMEOUT_S:.0f} s, though the address answers: "
                "is it the head node's GCS port (6379 by default)? A cluster on one machine "
                "kept on loopback needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 where the gateway "
                "starts too, or Ray looks for it at the machine's network address")
        if failed:
            exc = failed[0]
            raise self._cannot(f"{type(exc).__name__}: {exc}") from exc
        if self.address_from != "--ray-address":
            # Ray attaches to whatever cluster it finds (the last one started on this machine):
            # say which, so that a gateway on the wrong cluster does not go unnoticed
            try:
                attached = ray.get_runtime_context().gcs_address
            except Exception:
                attached = self.address
            how = ("from RAY_ADDRESS" if self.address_from else
                   "found by Ray's auto-detection, as no --ray-address was given")
            print(f"gpu-magic: attached to the Ray cluster at {attached}, {how}; name the cluster "
                  "with --ray-address HEAD_IP:6379 to be sure of it", file=sys.stderr, flush=True)
        if not _token_auth_on():
            print("gpu-magic: warning: this Ray cluster does not require a token; anyone who can "
                  "reach its ports can run code on it. Start it with RAY_AUTH_MODE=token (see "
                  "docs/ray.md).", file=sys.stderr, flush=True)

    def wait_for_probes(self, timeout: float) -> None:
        """Give GPU nodes a moment to report their GPUs (type, memory) before the pool is shown."""
        self.inventory()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                pending = [r for r in self._probes.values() if isinstance(r, ray.ObjectRef)]
            if not pending:
                return
            ray.wait(pending, num_returns=len(pending), timeout=max(0.0, deadline - time.monotonic()))
            self._collect_probes()

    # --- the pool ---

    def pool_notes(self) -> list[str]:
        """What may be wrong with the pool as configured (see ``TypeMap.notes``)."""
        return self.types.notes()

    def inventory(self) -> list[Gpu]:
        now = time.monotonic()
        with self._lock:
            self._sweep(now)
            snap = self._snapshot
            if snap is None or now - snap[0] > self.refresh_s:
                try:
                    nodes = ray.nodes()
                except Exception as exc:
                    self._warn("nodes", f"cannot read the Ray cluster's nodes: {exc}")
                    nodes = snap[1] if snap else []
                else:  # (Ray now says so itself, or has dropped it: nothing more to remember)
                    alive = {n["NodeID"] for n in nodes if n.get("Alive")}
                    self._dead = {k: t for k, t in self._dead.items()
                                  if k in alive and now - t < DEAD_FOR_S}
                snap = (now, nodes, _ray_available_per_node())
                self._snapshot = snap
                self._names.update(nodes)
                self._start_probes(nodes)
            _, nodes, available = snap
            nodes = [{**n, "Alive": False} if n["NodeID"] in self._dead else n for n in nodes]
            self._collect_probes()
            views = []
            for n in nodes:
                probed = self._probes.get(n["NodeID"])
                views.append(NodeView.from_ray(
                    n, self._names.by_id[n["NodeID"]],
                    available.get(n["NodeID"], {}) if available is not None else None,
                    probed if isinstance(probed, tuple) else None))
            ours, asked = self._ours()
            return build_pool(views, ours, self.types, self.autoscale, asked)

    def _ours(self) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
        """Per node: the GPUs Ray counts as in use on our account (our placement groups that
        Ray has placed, whether or not ``reserve`` has seen it yet, and those just given back),
        and the GPUs we asked Ray for that it has not given yet.

        The latter are busy, not ours: Ray would not give them a moment ago (someone else holds
        them). Counted as ours they hid that holder (foreign = in use - ours), so they looked
        free, the scheduler chose them for the job again and again, and the job waited for
        them as long as the other held them, its next option free all along.
        """
        pending = [r for r in self._reservations.values() if not r.held]
        placed: set[Any] = set()
        if pending:
            try:
                placed = set(ray.wait([r.ready for r in pending], num_returns=len(pending),
                                      timeout=0)[0])
            except Exception:
                placed = set()
        ours: dict[str, set[int]] = {}
        asked: dict[str, set[int]] = {}
        now = time.monotonic()
        for r in [*self._reservations.values(), *self._parked, *self._recent]:
            # (asked for lately, on a node where we had freed GPUs just before or since)
            lag = (now - r.made < OWN_LAG_S
                   and self._freed_at.get(r.node_id, -math.inf) >= r.made - OWN_LAG_S)
            mine = r.held or r.released is not None or r.ready in placed or lag
            (ours if mine else asked).setdefault(r.node_id, set()).update(r.indices)
        return ours, asked

    def _start_probes(self, nodes: list[dict[str, Any]]) -> None:
        for n in nodes:
            node_id = n["NodeID"]
            if n.get("Alive") and (n.get("Resources") or {}).get("GPU") and node_id not in self._probes:
                try:
                    self._probes[node_id] = _node.probe_gpus.options(
                        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                        name="gpu-magic:probe",
                    ).remote()
                except Exception as exc:
                    self._probes[node_id] = None
                    self._warn("probe", f"cannot ask Ray node {node_id[:8]} about its GPUs: {exc}")

    def _collect_probes(self) -> None:
        pending = {ref: nid for nid, ref in self._probes.items() if isinstance(ref, ray.ObjectRef)}
        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in done:
            node_id = pending[ref]
            result: Any = None
            try:
                gpus = json.loads(ray.get(ref))
                if gpus:
                    kinds = [(g["type"], g.get("memory_gb")) for g in gpus]
                    result = max(set(kinds), key=kinds.count)
            except Exception as exc:
                name = self._names.by_id.get(node_id, node_id)
                self._warn(f"probe-{node_id}", f"Ray node {name} did not say which GPUs it has "
                           f"(its Ray label is used): {_describe(exc, name)}")
            self._probes[node_id] = result

    def waiting(self, queued: Sequence[Sequence[GpuOption]]) -> None:
        """The options of the jobs still waiting: ask the autoscaler for the nodes they need."""
        if not self.autoscale:
            return
        wanted = demand(queued, self.inventory(), self.types, self.autoscale)
        if wanted == self._demand:
            return
        self._demand = wanted
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=wanted)
        except Exception as exc:
            self._warn("autoscale", f"cannot ask the Ray autoscaler for {wanted}: {exc}")

    # --- grants ---

    def reserve(self, run: RunSpec) -> bool:
        """Hold the granted GPUs in Ray before the grant is announced; False: not (yet) held."""
        node_id = self._names.by_name.get(run.gpus[0].node) if run.gpus else None
        key = (run.job_id, run.attempt)
        indices = tuple(sorted(g.index for g in run.gpus))
        with self._lock:
            res = self._reservations.get(key)
            if res is not None and (res.node_id, res.indices) != (node_id, indices):
                self._release(res)
                res = None
            if node_id is None or node_id in self._dead:
                return False  # (planned from a pool read before a task saw its node die)
            if res is None and self._adopt(node_id, key, indices):
                return True
            if res is None:
                self._unpark(node_id)  # ours, kept for another count: in the new group's way
                try:
                    pg = self._placement_group(node_id, len(indices), run)
                except Exception as exc:
                    self._warn("pg", f"Ray refused a placement group: {exc}")
                    return False
                res = Reservation(key, node_id, indices, pg, pg.ready(), time.monotonic())
                self._reservations[key] = res
            res.touched = time.monotonic()
        try:
            ready, _ = ray.wait([res.ready], timeout=self.reserve_wait_s)
            if not ready:
                return False  # kept a moment: the gateway asks again shortly
            placed = placement_group_table(res.pg).get("bundles_to_node_id", {})
            if set(placed.values()) != {node_id}:
                raise RuntimeError(f"placed on {placed}, not on {node_id}")
        except Exception as exc:
            self._warn("pg-wait", f"a placement group on {run.gpus[0].node} failed: {exc}")
            with self._lock:
                self._release(res)
            return False
        with self._lock:
            res.held = True
            self._snapshot = None
        return True

    def _adopt(self, node_id: str, key: tuple[str, int], indices: tuple[int, ...]) -> bool:
        """Take a kept placement group of as many GPUs on the node for this attempt (lock held).
        Which of the node's GPUs it holds is Ray's to say, as for a new one."""
        snap = self._snapshot
        if snap is not None and not any(
                n["NodeID"] == node_id and n.get("Alive") for n in snap[1]):
            return False  # (its node is gone: a task sent into its group would wait for good)
        for res in self._parked:
            if res.node_id == node_id and len(res.indices) == len(indices):
                self._parked.remove(res)
                res.key, res.indices, res.parked = key, indices, None
                res.touched = time.monotonic()
                self._reservations[key] = res
                self._snapshot = None
                return True
        return False

    def _park(self, res: Reservation) -> None:
        """Keep the placement group of an attempt that ended for the next job (lock held)."""
        if self._reservations.get(res.key) is res:
            del self._reservations[res.key]
        res.parked = time.monotonic()
        self._parked.append(res)
        self._snapshot = None
        timer = threading.Timer(PARK_S, self._unpark)
        timer.daemon = True
        timer.start()

    def _unpark(self, node_id: str | None = None, now: float | None = None) -> None:
        """Give back the kept placement groups on the node (all nodes: those kept PARK_S)."""
        with self._lock:
            now = time.monotonic() if now is None else now
            for res in list(self._parked):
                if node_id == res.node_id or (node_id is None
                                              and now - (res.parked or now) >= PARK_S - 0.05):
                    self._parked.remove(res)
                    self._release(res)

    def _placement_group(self, node_id: str, count: int, run: RunSpec) -> Any:
        name = f"gpu-magic-{run.job_id}-{run.attempt}"
        bundle = {"GPU": float(count)}
        try:
            return placement_group([bundle], strategy="STRICT_PACK", name=name,
                                   bundle_label_selector=[{NODE_ID_LABEL: node_id}])
        except TypeError:
            # Ray before label selectors: the node's own resource pins it (one node per address)
            ip = next((n["NodeManagerAddress"] for n in (self._snapshot or (0, [], None))[1]
                       if n["NodeID"] == node_id), None)
            if ip is None:
                raise
            return placement_group([{**bundle, f"node:{ip}": 0.001}], strategy="STRICT_PACK",
                                   name=name)

    def _release(self, res: Reservation) -> None:
        """Give a placement group back (lock held)."""
        if self._reservations.get(res.key) is res:
            del self._reservations[res.key]
        if res.released is None:
            res.released = self._freed_at[res.node_id] = time.monotonic()
            self._recent.append(res)
            try:
                remove_placement_group(res.pg)
            except Exception as exc:
                self._warn("pg-remove", f"cannot remove a placement group: {exc}")
        self._snapshot = None

    def _sweep(self, now: float) -> None:
        self._unpark(now=now)
        self._recent = [r for r in self._recent if now - (r.released or now) < RELEASE_GRACE_S]
        for res in list(self._reservations.values()):
            if not res.held and now - res.touched > STALE_RESERVATION_S:
                self._release(res)

    # --- running ---

    def start(self, run: RunSpec, on_event: EventCallback, on_exit: ExitCallback) -> RayHandle:
        key = (run.job_id, run.attempt)
        with self._lock:
            res = self._reservations.get(key)
        if res is None or not res.held:
            raise OSError(f"no Ray placement group holds the GPUs of job {run.job_id}; "
                          "reserve() must succeed first")
        try:
            run.job_dir.mkdir(parents=True, exist_ok=True)
            (run.job_dir / "out").mkdir(exist_ok=True)
            inputs = run.manifest["inputs"]
            paths = [inputs["pickle"], *inputs["buffers"]]
            refs = [self.blobs.ref(p) for p in paths]
            # Ray's CUDA_VISIBLE_DEVICES is the truth on the node; keeping the node's device order
            # keeps our indices and those of other Ray users' tasks naming the same GPUs
            env = {k: v for k, v in run.grant_env.items()
                   if k not in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
            meta = json.dumps({
                "job_id": run.job_id, "attempt": run.attempt, "version": __version__,
                "wire": WIRE_FORMAT,
                "names": [Path(p).name for p in paths], "manifest": run.manifest, "env": env,
                "workdir": self.workdir, "grace": 3.0,
            })
            strategy = PlacementGroupSchedulingStrategy(placement_group=res.pg,
                                                        placement_group_bundle_index=0)
            gen = _node.run_cell.options(
                num_gpus=len(res.indices), num_cpus=0, max_retries=0, num_returns="streaming",
                scheduling_strategy=strategy, name=f"gpu-magic:{run.job_id}:{run.attempt}",
            ).remote(meta, *refs)
        except Exception as exc:
            with self._lock:
                self._release(res)
            raise OSError(f"Ray did not take the job: {type(exc).__name__}: {exc}") from exc
        handle = RayHandle(run, res, run.gpus[0].node, gen)
        with self._lock:
            self._handles[key] = handle
        threading.Thread(target=self._follow, args=(handle, on_event, on_exit), daemon=True,
                         name=f"gpu-magic-ray-{run.job_id}").start()
        threading.Thread(target=self._watch_start, args=(handle, on_exit), daemon=True,
                         name=f"gpu-magic-ray-watch-{run.job_id}").start()
        return handle

    def _watch_start(self, handle: RayHandle, on_exit: ExitCallback) -> None:
        """Until the task's first frame: give it up, as lost, once its node is dead or its
        placement group is no longer placed (Ray would keep it waiting for good)."""
        res = handle.reservation
        while not handle.started.wait(START_WATCH_S) and not handle.done.is_set():
            if handle.cancelled:
                return
            try:
                alive = any(n["NodeID"] == res.node_id and n.get("Alive")
                            for n in ray.nodes())
                state = placement_group_table(res.pg).get("state")
            except Exception:
                continue  # the cluster is not answering: look again
            if alive and state == "CREATED":
                continue
            if not alive:
                self._died(res.node_id)
            handle.lost = (f"the Ray node {handle.node} died or left the cluster before the "
                           "cell started (nothing ran)")
            try:
                ray.cancel(handle.gen, force=True)
            except Exception:
                pass
            if handle.done.wait(5.0):
                return
            # the task's stream never ends (Ray keeps it waiting): the job ends here
            run = handle.spec
            with self._lock:
                if handle.told:  # (its stream ended meanwhile, and said so itself)
                    return
                handle.told = True
                self._release(res)
                self._handles.pop((run.job_id, run.attempt), None)
            on_exit(run.job_id, run.attempt, None, f"[gpu_magic] {handle.lost}")
            return

    def _follow(self, handle: RayHandle, on_event: EventCallback, on_exit: ExitCallback) -> None:
        run = handle.spec
        out = run.job_dir / "out"
        rc: int | None = None
        tail = ""
        ended = False
        try:
            for ref in handle.gen:
                handle.started.set()
                frame = ray.get(ref)
                if not isinstance(frame, bytes) or not frame:
                    raise ValueError(f"the Ray task sent {type(frame).__name__}, not a frame")
                kind, body = frame[:1], frame[1:]
                if kind == b"E":
                    for line in body.split(b"\n"):
                        try:
                            event = json.loads(line)
                        except (ValueError, RecursionError):
                            continue  # a cell may write anything on its pipe: noise
                        if isinstance(event, dict) and isinstance(event.get("type"), str):
                            on_event(run.job_id, run.attempt, event)
                elif kind == b"B":
                    head, _, chunk = body.partition(b"\n")
                    info = json.loads(head)
                    name = str(info.get("name", ""))
                    if not _BLOB_NAME.fullmatch(name):
                        raise ValueError(f"the Ray task sent a blob named {name!r}")
                    part = out / f".{name}.part"
                    with open(part, "ab") as f:
                        f.write(chunk)
                    if info.get("last"):
                        os.replace(part, out / name)
                elif kind == b"X":
                    info = json.loads(body)
                    rc = info.get("rc") if isinstance(info.get("rc"), int) else None
                    tail = str(info.get("tail") or "")
                    ended = True
            if not ended:
                tail = "[gpu_magic] the Ray task ended without the runner's exit status"
        except Exception as exc:
            rc = None
            if isinstance(exc, ray.exceptions.NodeDiedError):
                self._died(handle.reservation.node_id)
            tail = ("" if handle.cancelled else f"[gpu_magic] {handle.lost}" if handle.lost
                    else f"[gpu_magic] {_describe(exc, handle.node)}")
        finally:
            key = (run.job_id, run.attempt)
            with self._lock:
                told, handle.told = handle.told, True  # (the watch above may have said it)
                if not told and ended and not handle.cancelled:
                    # the task is over (its launcher killed what the cell left running): the
                    # group's GPUs are free for the next job, at once
                    self._park(handle.reservation)
                elif not told:  # a task cancelled or lost may still hold them: Ray sorts it
                    self._release(handle.reservation)
                self._handles.pop(key, None)
            if not told:
                try:
                    (run.job_dir / "runner.log").write_text(tail)
                except OSError:
                    pass
            handle.done.set()
            if not told:
                on_exit(run.job_id, run.attempt, rc, tail)

    def _died(self, node_id: str) -> None:
        """A task of ours saw node ``node_id`` die: out of the pool at once, not when Ray's
        node list says so (the next cell was planned there, and waited on it)."""
        with self._lock:
            self._dead[node_id] = time.monotonic()
            self._snapshot = None

    def cancel(self, handle: RayHandle, grace: float = 3.0) -> None:
        """Stop the task: its runner's process group first (KeyboardInterrupt in the task), then
        the task's worker itself if it has not ended ``grace`` seconds later."""
        handle.cancelled = True
        try:
            ray.cancel(handle.gen, force=False)
        except Exception as exc:
            self._warn("cancel", f"cannot cancel a Ray task: {exc}")

        def force_later() -> None:
            if not handle.done.wait(grace + 2.0):
                try:
                    ray.cancel(handle.gen, force=True)
                except Exception:
                    pass

        threading.Thread(target=force_later, daemon=True).start()

    def shutdown(self) -> None:
        with self._lock:
            handles = list(self._handles.values())
        for h in handles:
            self.cancel(h, grace=1.0)
        for h in handles:
            h.done.wait(5.0)
        with self._lock:
            for res in [*self._reservations.values(), *self._parked]:
                self._release(res)
            self._parked.clear()
        self.blobs.clear()
        try:
            if self.autoscale and self._demand:
                from ray.autoscaler.sdk import request_resources

                request_resources(bundles=[])
            ray.shutdown()
        except Exception:
            pass

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            print(f"gpu-magic: warning: {message}", file=sys.stderr, flush=True)


def _token_auth_on() -> bool:
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        return bool(get_authentication_mode() == AuthenticationMode.TOKEN)
    except Exception:
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def _describe(exc: BaseException, node: str) -> str:
    """What a Ray failure means for the cell, in words."""
    ex = ray.exceptions
    if isinstance(exc, ex.NodeDiedError):
        return f"the Ray node {node} that ran the cell died or left the cluster"
    if isinstance(exc, ex.OutOfMemoryError):
        return f"Ray's memory monitor killed the cell: node {node} ran out of memory"
    if isinstance(exc, ex.WorkerCrashedError):
        return f"the Ray worker that ran the cell on {node} died (killed, or out of memory)"
    if isinstance(exc, ex.TaskCancelledError):
        return "the Ray task was cancelled"
    if isinstance(exc, ex.RayTaskError) and isinstance(exc.cause, ModuleNotFoundError):
        return (f"Ray node {node} cannot import gpu_magic ({exc.cause}); install gpu-magic "
                f"{__version__} on every node of the cluster")
    if isinstance(exc, ex.RayError):
        return f"Ray failed the job on {node}: {type(exc).__name__}: {str(exc)[:500]}"
    return f"the Ray backend lost track of the job on {node}: {type(exc).__name__}: {exc}"
