"""``gpu-magic serve``: build the gateway and run it on uvicorn.

Binds loopback by default. With ``--runtime-file`` (the embedded default) it writes a 0600 file
with its URL, token, pid, host, version and configuration once it is listening, removes it on
exit, and exits by itself after ``--idle-timeout`` seconds with no jobs and no requests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Set
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .._errors import SpecError
from .._version import __version__
from .api import create_app
from .auth import (
    Authenticator,
    TokensFileError,
    User,
    load_tokens_file,
    owner_token,
    write_private,
)
from .backends.sandbox import (
    IsolationUnavailable,
    bwrap_path,
    private_dirs,
    python_paths,
    secret_folders,
)
from .gateway import Gateway
from .inventory import canonical_pool
from .limits import Limits, human, load_overrides, seconds
from .lock import StateDirBusy, describe, hold
from .reserve import default_cap


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    backend: str = "local"
    ray_address: str | None = None
    ray_type_map: Path | None = None  # JSON: Ray accelerator labels to our types
    ray_autoscale: str | None = None  # node types a Ray autoscaler can add, "H100:8,L4:1"
    simulate: str | None = None
    tokens_file: Path | None = None
    state_dir: Path | None = None
    runtime_file: Path | None = None
    idle_timeout: float | None = None
    max_timeout: float | None = None
    orphan_timeout: float = 60.0
    client_python: bool = True
    force: bool = False
    isolation: str = "auto"  # auto | none | bwrap
    certfile: Path | None = None
    keyfile: Path | None = None
    retention: float = 7 * 24 * 3600.0
    keep_warm: float | None = 300.0  # None: no warm runners at all (a fresh process per job)
    max_jobs_per_user: int | None = None
    max_gpus_per_user: int | None = None
    max_blob_bytes: int | None = None
    max_job_bytes: int | None = None
    blob_reserve: int | None = None  # bytes; None: an eighth of memory, at most 8 GiB
    blob_port: int | None = 0  # the bulk listener's port (0: any free one); None: none
    pass_env: tuple[str, ...] = ()  # more of the environment for a shared gateway's cells

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a running embedded gateway to be reused."""
        return {"backend": self.backend, "simulate": canonical_pool(self.simulate)}


def default_state_dir() -> Path:
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "gpu_magic" / socket.gethostname()


def _is_embedded_runtime(path: Path) -> bool:
    from .._embedded import runtime_path

    try:
        return Path(path).resolve() == runtime_path().resolve()
    except OSError:
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeError(Exception):
    """The gateway refuses to start; the message says why and what to do."""


def _check_tls(certfile: Path | None, keyfile: Path | None) -> None:
    """Load the certificate and key now: uvicorn's own failure to read them is a traceback."""
    import ssl

    if certfile is None:
        raise ServeError(f"--keyfile {keyfile} was given without --certfile; TLS needs the "
                         "certificate too: --certfile CERT.pem --keyfile KEY.pem")
    try:
        # (a certfile may hold the key too: then --keyfile is not needed)
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except OSError as exc:
        given = (("certfile", certfile), ("keyfile", keyfile))
        if isinstance(exc, ssl.SSLError):
            what = " and ".join(f"--{n} {p}" for n, p in given if p is not None)
            raise ServeError(
                f"{what}: not a PEM certificate and its private key ({exc.reason or exc}); give "
                "the PEM files of one certificate and its key") from None
        which = next((f"--{n} {p}" for n, p in given if p is not None and not os.access(p, os.R_OK)),
                     " or ".join(f"--{n} {p}" for n, p in given if p is not None))
        raise ServeError(f"cannot read {which}: {exc.strerror or exc}; give the path of a "
                         "readable PEM file") from None


def build(cfg: ServeConfig) -> tuple[Gateway, Authenticator, Path | None]:
    # the tokens file first: one refused (its mode, a bad entry) leaves no state directory
    # made behind it (a red team found one)
    try:
        given_tokens = load_tokens_file(cfg.tokens_file) if cfg.tokens_file else None
    except TokensFileError as exc:
        raise ServeError(str(exc)) from None
    _refuse_options(cfg, given_tokens)
    # absolute, as the sandbox names them inside a new root (and the working folder may change)
    state_dir = (cfg.state_dir or default_state_dir()).expanduser().resolve()
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state_dir, 0o700)
    except OSError as exc:
        given = ("--state-dir" if cfg.state_dir else
                 "the default, in Jupyter's data directory (JUPYTER_DATA_DIR)")
        why = ("it is a file, not a folder" if state_dir.exists() and not state_dir.is_dir()
               else exc.strerror)
        raise ServeError(
            f"cannot use {state_dir} as the gateway's state directory ({given}): {why}; give "
            "a folder this user can create and write, e.g. --state-dir ~/gpu-magic-state"
        ) from None
    if not 0 <= cfg.port <= 65535:
        raise ServeError(f"{cfg.port} is not a port; give one from 1 to 65535 (e.g. --port "
                         "8765), or 0 for any free port")
    if cfg.certfile or cfg.keyfile:
        _check_tls(cfg.certfile, cfg.keyfile)
    try:  # before anything in it is read or changed (a restart marks running jobs lost)
        lock = hold(state_dir)
    except StateDirBusy as exc:
        raise ServeError(str(exc)) from None
    except OSError as exc:  # (made, but not writable: root's mkdir in /sys succeeds)
        raise ServeError(
            f"cannot use {state_dir} as the gateway's state directory: {exc.strerror}; give "
            "a folder this user can create and write, e.g. --state-dir ~/gpu-magic-state"
        ) from None
    try:
        gateway, auth, token_path = _build(cfg, state_dir, given_tokens)
    except BaseException:
        os.close(lock)
        raise
    gateway.state_lock = lock  # held until the process ends
    return gateway, auth, token_path


_UNISOLATED = ("gpu-magic serve: warning: cells of different users run without isolation "
               "(--force): each can read the tokens file and every user's data; install "
               "bubblewrap and leave out --force to sandbox them")


def _unisolated(users: int, cfg: ServeConfig, backend: Any) -> bool:
    """Whether cells of several users run here without a sandbox (only --force lets that)."""
    return users > 1 and cfg.backend == "local" and getattr(backend, "isolation", "none") == "none"


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _cells_run(backend: Any) -> str:
    """How a shared gateway runs its users' cells, for its start lines."""
    if backend.name != "local":
        return f"cells run in the {backend.name} backend's workers, not sandboxed by the gateway"
    if getattr(backend, "isolation", "none") != "bwrap":
        # (no clause on their environment: without a sandbox a cell reads the gateway's own)
        return "cells NOT isolated from each other (--force)"
    # (what of the environment they get: an admin's key there was a cell's to read)
    passed = getattr(backend, "pass_env", None) or ()
    unset = [n for n in passed if n not in os.environ]
    return ("each cell in a bubblewrap sandbox, with the environment's PATH, locale, Python, "
            "CUDA and proxy variables only"
            + (f" and {', '.join(passed)}" if passed else " (--pass-env NAMES for more)")
            + (f" ({', '.join(unset)} not set here: passed as nothing)" if unset else ""))


def _changes(before: set[str], after: set[str], admins_before: Set[str] = frozenset(),
             admins_after: Set[str] = frozenset()) -> str:
    """Who a reload of the tokens file added and removed (a refused student's first question),
    and who became or stopped being an admin (the right to cancel everyone's cells)."""
    kept = before & after
    said = [f"{verb} {', '.join(sorted(names))}" for verb, names in
            (("added", after - before), ("removed", before - after),
             ("made admin", (admins_after - admins_before) & kept),
             ("no longer admin", (admins_before - admins_after) & kept)) if names]
    return (f" ({'; '.join(said)})" if said
            else " (the same users; their tokens and limits as the file now says)")


def _no_idle_cancel(record: logging.LogRecord) -> bool:
    """Leave out uvicorn's "ERROR: Cancel 0 running task(s), timeout graceful shutdown
    exceeded": said at every stop while clients keep idle connections open, with nothing
    cancelled, it read to two trials as a fault."""
    idle = record.args == (0,) and str(record.msg).startswith("Cancel %s running task(s)")
    return not idle


def _revoked(cancelled: int, running: int) -> str:
    """What became of the removed users' jobs, for the reload's log line."""
    said = []
    if cancelled:
        said.append(f"{cancelled} queued job{'s' if cancelled != 1 else ''} of theirs cancelled")
    if running:
        said.append(f"{running} running job{'s' if running != 1 else ''} of theirs go"
                    f"{'es' if running == 1 else ''} on to the end (gpu-magic jobs --all lists "
                    "them; %gpu cancel ID with an admin token stops one)")
    return f"; {'; '.join(said)}" if said else ""


def _refuse_options(cfg: ServeConfig, given_tokens: dict[str, User] | None) -> None:
    """ServeError for options that cannot go together, before anything is made (a refused
    gateway left a state folder and a token behind)."""
    try:
        ipaddress.ip_address(cfg.host)
    except ValueError:  # a name: one that does not resolve was refused as "not loopback"
        try:
            socket.getaddrinfo(cfg.host, None)
        except (socket.gaierror, UnicodeError) as exc:
            raise ServeError(
                f"--host {cfg.host}: no address has that name here ({exc}); give an address "
                "of this machine (127.0.0.1, the default, for loopback) or a name it resolves"
            ) from None
    if not _is_loopback(cfg.host) and not cfg.force:
        if not cfg.tokens_file:
            raise ServeError(
                f"refusing to listen on {cfg.host}, which is not loopback, with a single owner "
                "token: anyone who can reach it could run code here. Give --tokens-file, or "
                "--force if you really mean it."
            )
        if not (cfg.certfile and cfg.keyfile):
            raise ServeError(
                f"refusing to listen on {cfg.host}, which is not loopback, without TLS: tokens "
                "and cells would cross the network in clear text. Give --certfile and --keyfile "
                "(or put the gateway behind a TLS proxy and bind it to loopback), or --force."
            )
    ray_only = [flag for flag, given in (("--ray-address", cfg.ray_address),
                                         ("--ray-type-map", cfg.ray_type_map),
                                         ("--ray-autoscale", cfg.ray_autoscale)) if given]
    if cfg.backend != "ray" and ray_only:
        # the local backend would ignore them in silence: a gateway meant for the cluster
        # would start on this machine's GPUs (or a simulated pool)
        raise ServeError(
            f"{', '.join(ray_only)} {'are options' if len(ray_only) > 1 else 'is an option'} "
            f"of the Ray backend, and this gateway uses the {cfg.backend} backend: add "
            f"--backend ray to use the Ray cluster, or leave {'them' if len(ray_only) > 1 else 'it'} "
            "out.")
    if cfg.backend == "ray":
        # options of the local backend, which Ray's would ignore in silence
        if cfg.isolation == "bwrap":
            raise ServeError(
                "--isolation bwrap sandboxes the local backend's runners; with --backend ray "
                "cells run in Ray workers on the nodes, which the gateway does not sandbox. Leave "
                "out --isolation, and share a Ray gateway only among people you would give Ray "
                "access to (docs/ray.md, Security); or use --backend local for sandboxed cells.")
        if cfg.simulate:
            raise ServeError(
                f"--simulate {cfg.simulate} makes a simulated pool of the local backend; with "
                "--backend ray the pool is the Ray cluster's GPU nodes. Leave out --simulate to "
                f"use the cluster; for a simulated pool, --backend local --simulate "
                f"{cfg.simulate}, or a one-machine Ray cluster with fake GPUs (docs/ray.md, "
                "\"Trying it on one machine\").")
    users = len({u.name for u in given_tokens.values()}) if given_tokens else 1
    if users > 1 and cfg.backend == "ray" and not cfg.force:
        # (before the sandbox's advice: bubblewrap would not help, Ray's workers run the cells)
        raise ServeError(
            f"this gateway would serve {users} users on Ray, whose workers run cells "
            "without the gateway's sandbox, as the Ray workers' own account. Give each group its "
            "own cluster and gateway, or --force if every user may see everything the workers "
            "can (see docs/ray.md)."
        )


def _build(cfg: ServeConfig, state_dir: Path, given_tokens: dict[str, User] | None,
           ) -> tuple[Gateway, Authenticator, Path | None]:
    token_path = None
    if given_tokens is not None:
        tokens = given_tokens
    else:
        try:
            tokens, token_path = owner_token(state_dir)
        except TokensFileError as exc:
            raise ServeError(str(exc)) from None
    users = {u.name for u in tokens.values()}
    isolation = cfg.isolation
    if isolation == "auto":
        isolation = "bwrap" if len(users) > 1 and bwrap_path() else "none"
    if len(users) > 1 and isolation == "none" and not cfg.force and cfg.backend != "ray":
        raise ServeError(
            f"this gateway serves {len(users)} users but would run their cells without "
            "isolation: one user's cell could read the tokens file and everyone's data. Install "
            "bubblewrap (apt-get install bubblewrap) for --isolation bwrap, or --force if every "
            "user may see everything."
        )
    if isolation == "bwrap" and not bwrap_path():
        raise ServeError("--isolation bwrap needs bubblewrap: apt-get install bubblewrap")
    multi = len(users) > 1
    # under their own names and where links lead: a cell must read none of them
    hidden = tuple(dict.fromkeys(
        q for p in (cfg.tokens_file, cfg.runtime_file, cfg.keyfile, cfg.certfile)
        if p is not None  # (a certfile may hold the key too)
        for q in (p.expanduser().absolute(), p.expanduser().resolve())))
    if cfg.backend == "local":
        from .backends.local import LocalBackend

        exposed: dict[Path, str] = {}
        backend: Any = LocalBackend(
            cfg.simulate,
            # never run a client-chosen interpreter or folder for several users
            client_python=cfg.client_python and not multi,
            isolation=isolation, state_dir=state_dir, hidden_files=hidden,
            keep_warm=cfg.keep_warm, pass_env=cfg.pass_env if multi else None)
        if isolation == "bwrap":
            try:  # (what the runners' Python imports from is shown again in their sandbox)
                shown = python_paths(sys.executable, backend.runner_env())
            except IsolationUnavailable:
                shown = []  # (the runners cannot start either: each job says why)
            folders, exposed = secret_folders(hidden, [*private_dirs(), str(state_dir)], shown)
            backend.hidden_folders = tuple(folders)
        # (the runtime file is written once, before any cell: its cover is not replaced)
        runtime = {os.path.realpath(cfg.runtime_file)} if cfg.runtime_file else set()
        backend.exposed_on_replace = {
            str(f): why for f, why in exposed.items() if os.path.realpath(f) not in runtime}
    elif cfg.backend == "ray":
        try:
            from .backends.ray import RayBackend
        except ImportError as exc:
            raise ServeError(f"--backend ray needs Ray: pip install 'gpu-magic[ray]' ({exc})") from None
        backend = RayBackend.from_config(cfg)
    else:
        raise ServeError(f"unknown backend {cfg.backend!r}; use --backend local or ray")
    limits = Limits()
    limits = replace(limits, **{k: v for k, v in {
        "max_jobs": cfg.max_jobs_per_user, "max_gpus": cfg.max_gpus_per_user,
        "max_blob_bytes": cfg.max_blob_bytes, "max_job_bytes": cfg.max_job_bytes,
    }.items() if v is not None})
    try:
        overrides = load_overrides(state_dir)
    except ValueError as exc:  # not started without them: students would get the defaults
        raise ServeError(f"{exc}; fix it, or remove it to start with no per-user limits set "
                         "by an admin") from None
    gateway = Gateway(backend, state_dir, max_timeout=cfg.max_timeout,
                      orphan_timeout=cfg.orphan_timeout, limits=limits, retention=cfg.retention,
                      blob_reserve=default_cap() if cfg.blob_reserve is None else cfg.blob_reserve,
                      user_limits=overrides)
    gateway.embedded = bool(cfg.runtime_file) and _is_embedded_runtime(cfg.runtime_file)
    return gateway, Authenticator(tokens), token_path


def serve(cfg: ServeConfig) -> int:
    import uvicorn

    try:
        gateway, auth, token_path = build(cfg)
    except (ServeError, SpecError) as exc:
        message = str(exc)
        if isinstance(exc, SpecError) and cfg.simulate and cfg.runtime_file is None:
            # the simulated pool's own advice names GPU_MAGIC_SIMULATE, where the embedded
            # gateway's pool comes from; a person who typed `serve --simulate` fixes the flag
            message = message.replace("GPU_MAGIC_SIMULATE=", "--simulate ")
        print(f"gpu-magic serve: {message}", file=sys.stderr)
        return 2
    app = create_app(gateway, auth, loopback_only=_is_loopback(cfg.host))
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this: without it small answers wait ~40 ms for delayed ACKs.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as exc:
        print(f"gpu-magic serve: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}; "
              "choose another --port", file=sys.stderr)
        return 2
    sock.listen(2048)
    port = sock.getsockname()[1]
    bulk = None
    if cfg.blob_port is not None:
        try:
            bulk = _open_bulk(cfg, family, gateway, auth, app)
        except OSError as exc:
            sock.close()
            print(f"gpu-magic serve: cannot listen on {cfg.host}:{cfg.blob_port} for large "
                  f"blobs: {exc.strerror}; choose another --blob-port, or --blob-port off "
                  "(blobs then go through --port)", file=sys.stderr)
            return 2
        gateway.bulk = bulk
    host = cfg.host if ":" not in cfg.host else f"[{cfg.host}]"
    scheme = "https" if cfg.certfile else "http"
    url = f"{scheme}://{host}:{port}"
    # Keep-alive longer than clients idle between cells: a server closing an idle connection
    # just as a client reuses it loses that request ("Server disconnected").
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                            lifespan="off", timeout_keep_alive=300,
                            ssl_certfile=str(cfg.certfile) if cfg.certfile else None,
                            ssl_keyfile=str(cfg.keyfile) if cfg.keyfile else None)
    logging.getLogger("uvicorn.error").addFilter(_no_idle_cancel)

    stopping: dict[str, str] = {}  # why, for the log
    ended: list[tuple[int, int]] = []  # the running and queued jobs that ended as lost

    async def end_jobs() -> None:
        """Once: jobs whose results are being stored end as they ran, and the others as lost,
        saying why, to their followers too (a cell following one raises RunnerLost at once,
        rather than trying to resume its stream for half a minute and then saying that the
        job may still be running)."""
        if ended:
            return
        if gateway.bulk is not None:
            await asyncio.to_thread(gateway.bulk.close)  # (uploads under way end; none kept)
        await gateway.drain()
        ended.append(gateway.lose_unfinished(stopping.get("why", "asked to stop")))
        await gateway.streams_told(timeout=1.0)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # (its handler while it serves)
            stopping.setdefault("why", "Ctrl-C" if sig == signal.SIGINT else "SIGTERM")
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Any = None) -> None:
            # as uvicorn's own shutdown begins: no new request while the jobs end, idle
            # connections closed, and a moment for requests under way (a result being sent)
            for listening in getattr(self, "servers", []):
                listening.close()
            for connection in list(self.server_state.connections):
                connection.shutdown()
            await asyncio.sleep(0.1)
            with asked_again_stops():
                await end_jobs()
            # event streams still open end where they are: uvicorn would wait for them, then
            # cancel them mid-write (a traceback in the log); their clients say how to
            # attach again
            gateway.end_streams()
            await super().shutdown(sockets=sockets)

    server = Server(config)

    @contextlib.contextmanager
    def asked_again_stops() -> Any:
        """While jobs end within uvicorn's shutdown, where uvicorn's handlers would only take
        note of a second Ctrl-C or TERM: ours, which stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = {s: signal.signal(s, stop_serving) for s in (signal.SIGTERM, signal.SIGINT)}
        stopping["served"] = "yes"
        try:
            yield
        finally:
            # (uvicorn replays the signal it took once it has stopped: not a second one)
            stopping.pop("served", None)
            for s, handler in before.items():
                signal.signal(s, handler)

    def stop_serving(signum: int, _frame: object) -> None:
        if stopping.get("served"):
            # asked again while it ends its jobs and stores what they sent: at once, as a
            # kill would (the next gateway on this state directory marks them lost)
            print("gpu-magic: stopped at once; jobs that had not ended are marked lost by the "
                  "next gateway on this state directory", file=sys.stderr, flush=True)
            os._exit(130 if signum == signal.SIGINT else 143)
        if server.should_exit:  # (uvicorn replays the signal it took once it has stopped)
            server.force_exit = True
        stopping.setdefault("why", "Ctrl-C" if signum == signal.SIGINT else "SIGTERM")
        server.should_exit = True

    # uvicorn takes SIGTERM while it serves, then sends it again to whatever handled it
    # before: with the default handler the process died there, before the cleanup below (no
    # flush of the job store, runners and the runtime file left behind). Ours only asks the
    # server to stop, so a TERM before, during or after serving ends in an orderly exit.
    # Ctrl-C likewise: uvicorn raised the KeyboardInterrupt again once it had stopped, a
    # traceback after "stopping".
    if threading.current_thread() is threading.main_thread():  # signals go to that one only
        signal.signal(signal.SIGTERM, stop_serving)
        signal.signal(signal.SIGINT, stop_serving)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gateway.start(loop)
        if gateway.cut_short:  # (their users' cells say so; the admin reads it here)
            n = len(gateway.cut_short)
            print(f"gpu-magic: {n} job{'s' if n != 1 else ''} that had not ended when the last "
                  f"gateway on {gateway.state_dir} stopped {'are' if n != 1 else 'is'} marked "
                  "lost", file=sys.stderr, flush=True)

        # isolation, runners' interpreters, warm runners and the same-host path were chosen
        # for this many users at start: a reload cannot make a one-user gateway shared
        shared_at_start = len(auth.users()) > 1

        def reload_tokens() -> None:
            if cfg.tokens_file:
                try:
                    tokens = load_tokens_file(cfg.tokens_file)
                    users = {u.name for u in tokens.values()}
                    if len(users) > 1 and not shared_at_start and not cfg.force:
                        how = ("runs cells without isolation (its runners can read the state "
                               "directory and the tokens file)"
                               if getattr(gateway.backend, "isolation", "none") == "none" else
                               "runs cells with the submitting kernel's own Python and folder")
                        raise TokensFileError(
                            f"{cfg.tokens_file} now names {len(users)} users, but this gateway "
                            f"started for one user and {how}. Restart it with the new file to "
                            "serve several users.")
                    before = set(auth.users())
                    admins = {n for n in before if (u := auth.user(n)) is not None and u.admin}
                    auth.replace(tokens)
                    revoked = gateway.tokens_reloaded({u.name: u for u in tokens.values()},
                                                      before - users)
                    now_admins = {u.name for u in tokens.values() if u.admin}
                    print(f"gpu-magic: reloaded {cfg.tokens_file}"
                          f"{_changes(before, users, admins, now_admins)}"
                          f"{_revoked(*revoked)}", file=sys.stderr)
                    if len(before) <= 1 and _unisolated(len(users), cfg, gateway.backend):
                        print(_UNISOLATED, file=sys.stderr, flush=True)  # (--force let it)
                except TokensFileError as exc:
                    print(f"gpu-magic: kept the old tokens: {exc}", file=sys.stderr)

        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, reload_tokens)
        notes = gateway.pool_notes()
        wanted = os.environ.get("GPU_MAGIC_SIMULATE", "").strip()
        if wanted and cfg.simulate is None and cfg.backend == "local":
            # the magic's variable, read where a kernel starts its own gateway: an admin who set
            # it for `serve` got a real pool (no GPUs here) and no word why
            notes.append(f"GPU_MAGIC_SIMULATE={wanted!r} is set, but serve takes its pool from "
                         f"--simulate (the variable is the magic's, for the local gateway a "
                         f"kernel starts): this pool is this host's real GPUs; for a simulated "
                         f"one, start it with --simulate {shlex.quote(wanted)}")
        for note in notes:  # (the embedded gateway's go to its log)
            print(f"gpu-magic serve: note: {note}", file=sys.stderr, flush=True)
        if _unisolated(len(auth.users()), cfg, gateway.backend):
            # --force lets past the TLS check and this one alike: said, whatever it was for
            print(_UNISOLATED, file=sys.stderr, flush=True)
        if getattr(gateway.backend, "isolation", None) == "bwrap" and os.geteuid() == 0:
            print("gpu-magic serve: note: running as root, so sandboxed cells run as root too "
                  "(with no capabilities: they cannot undo the sandbox, but they read every "
                  "root-owned file it does not hide); run the gateway as a dedicated account",
                  file=sys.stderr, flush=True)
        for path, why in getattr(gateway.backend, "exposed_on_replace", {}).items():
            print(f"gpu-magic serve: warning: a cell may read {path} while it runs: {why}. "
                  "Keep the tokens file, certificate and key in a folder of their own, such "
                  "as /etc/gpu-magic (certbot's: copy them there from a --deploy-hook), which "
                  "cells see empty", file=sys.stderr, flush=True)
        info = {
            "url": url, "host": socket.gethostname(), "pid": os.getpid(),
            "version": __version__, "config": cfg.fingerprint(),
            "state_dir": str(gateway.state_dir), "started": time.time(),
            # the embedded one (`gpu-magic stop` stops it), not one served by hand
            "embedded": gateway.embedded,
        }
        if token_path is not None:
            info["token"] = token_path.read_text().strip()
        # who holds the state directory: named by a second start, found by a kernel whose
        # runtime file was removed (a tmp cleaner)
        if gateway.state_lock is not None:
            with contextlib.suppress(OSError):
                describe(gateway.state_lock, info)
        if cfg.runtime_file:
            write_private(cfg.runtime_file, json.dumps(info, indent=1))
        else:
            where = f" (token in {token_path})" if token_path else ""
            print(f"gpu-magic gateway {__version__} listening on {url}{where}", flush=True)
            pool = gateway.pool()
            # an autoscaler's node types are no GPUs yet: said apart
            counts = collections.Counter((g.type, g.virtual) for g in gateway.gpus())

            def listed(virtual: bool) -> str:
                return ", ".join(f"{t['type']} ×{n}" for t in pool["types"]
                                 if (n := counts[(t["type"], virtual)]))

            kinds, later = listed(False) or "no GPUs", listed(True)
            sim = " (simulated)" if pool["simulated"] else ""
            more = f"; an autoscaler may add {later}" if later else ""
            print(f"pool: {kinds}{sim}{more}", flush=True)
            if len(auth.users()) > 1:
                print(f"users: {len(auth.users())}, {_cells_run(gateway.backend)}", flush=True)
            limits = [text for text, given in (
                (f"a cell runs at most {seconds(cfg.max_timeout or 0)} s", cfg.max_timeout),
                (f"{_count(cfg.max_jobs_per_user, 'job')} per user", cfg.max_jobs_per_user),
                (f"{_count(cfg.max_gpus_per_user, 'GPU')} per user", cfg.max_gpus_per_user),
                (f"blobs up to {human(cfg.max_blob_bytes or 0)}", cfg.max_blob_bytes),
                (f"a job's inputs up to {human(cfg.max_job_bytes or 0)}", cfg.max_job_bytes),
            ) if given is not None]
            if limits:
                own = (" (a user's own job and GPU limits, from the tokens file or PUT "
                       "/v1/limits, win)" if cfg.max_jobs_per_user or cfg.max_gpus_per_user
                       else "")
                print(f"limits: {', '.join(limits)}{own}", flush=True)

        async def idle_watch() -> None:
            while not server.should_exit:
                await asyncio.sleep(min(5.0, cfg.idle_timeout or 5.0))
                idle = time.monotonic() - gateway.last_activity
                if cfg.idle_timeout and not gateway.busy and idle > cfg.idle_timeout:
                    stopping.setdefault("why", f"idle for {cfg.idle_timeout:g} s")
                    server.should_exit = True

        watcher = asyncio.create_task(idle_watch())
        if bulk is not None:
            bulk.start()
        try:
            await server.serve(sockets=[sock])
        finally:
            stopping["served"] = "yes"
            watcher.cancel()
            await end_jobs()  # (done already, unless serving failed before its shutdown)
            why = stopping.get("why", "asked to stop")
            running, queued = ended[0]
            print(f"gpu-magic: stopping ({why})"
                  + (f": {running} running and {queued} queued job(s) end with it, as lost"
                     if running or queued else ""), file=sys.stderr, flush=True)
            gateway.close()
            if cfg.runtime_file:
                with contextlib.suppress(OSError):
                    current = json.loads(cfg.runtime_file.read_text())
                    if current.get("pid") == os.getpid():
                        cfg.runtime_file.unlink()

    factory = _loop_factory()
    if factory is None or sys.version_info < (3, 11):  # (asyncio.Runner is 3.11's)
        asyncio.run(main())
    else:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
    return 0


def _open_bulk(cfg: ServeConfig, family: int, gateway: Gateway, auth: Authenticator,
               app: Any) -> Any:
    """The bulk listener (server/bulk.py) on ``cfg.host``, with the main port's TLS."""
    import ssl

    from .bulk import BulkListener

    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.host, cfg.blob_port or 0))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    context = None
    if cfg.certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cfg.certfile, cfg.keyfile)
    return BulkListener(sock, gateway, auth, loopback_only=_is_loopback(cfg.host),
                        ssl_context=context, note_refusal=app.note_refusal)


def _loop_factory() -> Any:
    """uvloop where it is installed (uvicorn[standard] brings it on Linux and macOS): uploads
    arrive about a third faster (256 MiB in 0.1 s instead of 0.12-0.16 s here)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
