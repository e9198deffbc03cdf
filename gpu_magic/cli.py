"""The ``gpu-magic`` command: serve, stop, pool, jobs, demo."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu-magic", description="Run Jupyter cells on remote GPUs.")
    sub = p.add_subparsers(dest="command", required=True)

    # (its usage in full is 13 lines: a refused value's one line came under all of them)
    s = sub.add_parser("serve", help="run a gateway for a GPU pool",
                       usage="gpu-magic serve [OPTIONS]", allow_abbrev=False)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    s.add_argument("--port", type=_port, default=8765, help="port (default 8765; 0: any free port)")
    s.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: runner subprocesses on this host; ray: tasks on a Ray cluster")
    s.add_argument("--ray-address", default=None, help="Ray cluster address (with --backend ray)")
    s.add_argument("--ray-type-map", type=Path, default=None, metavar="FILE",
                   help='JSON: Ray accelerator labels to GPU types, e.g. {"A100": [{"type": '
                        '"A100-80GB", "min_memory_gb": 60}, {"type": "A100-40GB"}]}')
    s.add_argument("--ray-autoscale", default=None, metavar="SPEC",
                   help="node types a Ray autoscaler can add, TYPE:GPUS_PER_NODE,... e.g. H100:8")
    s.add_argument("--simulate", type=_pool, default=None, metavar="SPEC",
                   help="a simulated pool such as 'H100:2,A100-80GB:4' (no GPU is used)")
    s.add_argument("--tokens-file", type=Path, default=None,
                   help='JSON {"user": "token", ...} or {"user": {"token": "...", '
                        '"admin": true, "max_jobs": 2, "max_gpus": 1}, ...}, mode 0600')
    s.add_argument("--state-dir", type=_folder, default=None, metavar="DIR",
                   help="jobs, blobs and limits (default: under Jupyter's data directory)")
    s.add_argument("--runtime-file", type=Path, default=None, help=argparse.SUPPRESS)
    s.add_argument("--idle-timeout", type=_seconds(), default=None,
                   help="exit after this many seconds with no jobs and no requests")
    s.add_argument("--max-timeout", type=_seconds(), default=None,
                   help="cap on any job's --timeout, in seconds (also on the default hour)")
    s.add_argument("--orphan-timeout", type=_seconds(), default=60.0,
                   help="cancel a foreground job nobody has followed for this many seconds "
                        "(default 60)")
    s.add_argument("--gateway-python", action="store_true",
                   help="run cells with the gateway's Python, not the submitting kernel's")
    s.add_argument("--isolation", choices=["auto", "none", "bwrap"], default="auto",
                   help="runner sandbox; auto: bubblewrap when several users share the gateway")
    s.add_argument("--certfile", type=Path, default=None, help="TLS certificate (PEM)")
    s.add_argument("--keyfile", type=Path, default=None, help="TLS private key (PEM)")
    s.add_argument("--retention", type=_seconds(), default=7 * 24 * 3600.0,
                   help="seconds to keep finished jobs, their output and unused blobs (7 days)")
    s.add_argument("--keep-warm", type=_seconds(zero=True), default=None,  # (default 300)
                   help="seconds a finished runner waits for the next cell of the same "
                        "notebook's kernel on the same GPUs (default 300; 0: fork a fresh one "
                        "from a warm zygote each time)")
    s.add_argument("--cold", action="store_true",
                   help="no warm runners: start a fresh interpreter for every job")
    s.add_argument("--max-jobs-per-user", type=_count("max_jobs"), default=None, metavar="N",
                   help="queued and running jobs a user may have (a user's own limit, set in "
                        "the tokens file or with PUT /v1/limits/USER, wins)")
    s.add_argument("--max-gpus-per-user", type=_count("max_gpus"), default=None, metavar="N",
                   help="GPUs a user's running jobs may hold together (likewise)")
    s.add_argument("--max-blob-bytes", type=_positive_size, default=None, metavar="SIZE",
                   help="largest blob a user may store, e.g. 4G")
    s.add_argument("--max-job-bytes", type=_positive_size, default=None, metavar="SIZE",
                   help="largest total of a job's inputs, e.g. 16G")
    s.add_argument("--blob-reserve", type=_size, default=None, metavar="SIZE",
                   help="disk and page cache kept written ahead for large blobs, e.g. 2G "
                        "(default: an eighth of memory, at most 8G; 0: none)")
    s.add_argument("--blob-port", type=_blob_port, default=0, metavar="PORT|off",
                   help="port for large blob uploads and downloads, faster than through "
                        "--port (default: any free one, told to clients with a token; a "
                        "client that cannot reach it uses --port); off: none")
    s.add_argument("--pass-env", type=_env_names, action="append", default=[],
                   metavar="NAMES",
                   help="with several users, cells get only the environment's PATH, locale, "
                        "Python, CUDA and proxy variables; these (NAME,NAME) too")
    s.add_argument("--force", action="store_true",
                   help="start even where it would be unsafe: off loopback without a tokens "
                        "file or without TLS, or several users without a runner sandbox")

    sub.add_parser("stop", help="stop this user's embedded local gateway")
    for name, what in (("pool", "the GPU pool as a table"), ("jobs", "your jobs as a table")):
        q = sub.add_parser(name, help=what, allow_abbrev=False)
        q.add_argument("--url", default=None, help="gateway URL (default: GPU_MAGIC_URL or local)")
        q.add_argument("--token", default=None, help="token (default: GPU_MAGIC_TOKEN)")
        if name == "jobs":
            q.add_argument("--all", action="store_true",
                           help="every user's jobs, with a user column (needs an admin token)")
    d = sub.add_parser("demo", help="a simulated pool and JupyterLab with the teaching notebooks",
                       allow_abbrev=False)
    d.add_argument("--simulate", type=_pool, default="H100:2,A100-80GB:4,T4:8", metavar="SPEC",
                   help="the simulated pool (default: %(default)s)")
    d.add_argument("--port", type=_port, default=8888, help="JupyterLab's port (default: 8888)")
    d.add_argument("--notebooks", type=_folder, default=None, metavar="DIR",
                   help="the folder JupyterLab opens (default: the teaching notebooks)")
    return p


def _port(text: str) -> int:
    """A TCP port, 0 to 65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port; give a whole number from 1 to 65535 (e.g. --port 8765), "
            "or 0 for any free port")
    return port


def _pool(text: str) -> str:
    """A simulated pool's spec: never empty (that quietly gave this host's real GPUs), and
    read before anything starts (``demo`` started a gateway that refused it, a traceback)."""
    from ._errors import SpecError
    from .server.inventory import parse_simulated

    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an empty pool: give the simulated GPUs, e.g. --simulate 'H100:2,A100-80GB:4', or "
            "leave out --simulate to use this machine's GPUs")
    try:
        parse_simulated(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(
            str(exc).replace("GPU_MAGIC_SIMULATE=", "--simulate ")) from None
    return text


def _folder(text: str) -> Path:
    """A folder's path, never empty (``--state-dir ''`` meant the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: give a folder, or leave the option out "
                                         "for the default")
    return Path(text)


def _seconds(zero: bool = False) -> Any:
    """An argparse type: a number of seconds, more than 0 (or 0 and more with ``zero``)."""
    least = "0 or more" if zero else "more than 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of seconds; write a plain number, e.g. 600") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a time of {least} seconds; write e.g. 600")
        return value

    return parse


def _env_names(text: str) -> tuple[str, ...]:
    """Names of environment variables, NAME,NAME (never a value: that would be in ps)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for n in names:
        if "=" in n or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n):
            raise argparse.ArgumentTypeError(
                f"{n!r} is not the name of an environment variable; give names only, "
                "separated by commas, e.g. --pass-env WANDB_MODE,DATA_ROOT (set their values "
                "in the environment the gateway starts in)")
    if not names:
        raise argparse.ArgumentTypeError("no names: give e.g. --pass-env DATA_ROOT")
    kept = [n for n in names if n in ("GPU_MAGIC_TOKEN", "GPU_MAGIC_URL")]
    if kept:
        raise argparse.ArgumentTypeError(
            f"{kept[0]} never reaches a cell (a cell must not reach the gateway as its user); "
            "leave it out")
    return names


def _count(key: str) -> Any:
    """An argparse type: a whole number, 1 and more (``key``: a user's own limit of it)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 1:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number of 1 or more; write e.g. 2"
                + (f" (to hold one user's jobs, give that user \"{key}\": 0 in the tokens "
                   "file)" if value == 0 else ""))
        return value

    return parse


def _positive_size(text: str) -> int:
    """A size as :func:`_size` reads it, of one byte or more."""
    value = _size(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size of one byte or more; write "
                                         "it as bytes or with K, M, G or T, e.g. 4G")
    return value


def _blob_port(text: str) -> int | None:
    if text.strip().lower() == "off":
        return None
    try:
        return _port(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--port 8765", "--blob-port 8766")
                                         + "; or off for none") from None


def _size(text: str) -> int:
    """``512M``, ``2G``, ``0`` or a number of bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t[-1:] in units and t[-1:] else (t, "")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; write it as bytes or with K, M, G or T, e.g. 2G") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size of zero or more bytes; "
                                         "write it as bytes or with K, M, G or T, e.g. 2G")
    return int(value)


# what a shell reports of a command that wrote to a closed pipe (128 + SIGPIPE), as for `ls`
BROKEN_PIPE_EXIT = 141


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # (a closed pipe shows here, not at the interpreter's exit)
        return code
    except BrokenPipeError:
        # Whoever read our output stopped (`gpu-magic jobs | head -1`): nothing is left to say,
        # and a traceback would be noise. Python flushes stdout once more at exit, which must
        # find somewhere to write, or it prints the error after all.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE_EXIT


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, with a misspelt command or option answered with the one meant, in the
    usage of its own command (argparse printed the top-level usage and no suggestion)."""
    import difflib

    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in subs.choices and argv and argv[0] == first:
        near = difflib.get_close_matches(first, list(subs.choices), n=1)
        parser.error(f"{first!r} is not a command" + (f"; did you mean {near[0]}?" if near else
                                                      f" (choose from {', '.join(subs.choices)})"))
    args, extra = parser.parse_known_args(argv)
    if extra and argv.index(extra[0]) < argv.index(args.command):
        parser.error("unrecognized arguments: " + " ".join(extra))  # (before the command)
    if extra:
        sub = subs.choices[args.command]
        options = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
        meant = [near[0] for word in extra if word.startswith("-") and (
            near := difflib.get_close_matches(word.split("=", 1)[0], options, n=1, cutoff=0.75))]
        sub.error("unrecognized arguments: " + " ".join(extra)
                  + (f"; did you mean {' '.join(meant)}?" if meant else ""))
    return args


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = _parse(parser, _token_values_kept(sys.argv[1:] if argv is None else argv))
    if args.command == "serve":
        from .server.serve import ServeConfig, serve

        if args.cold and args.keep_warm is not None:
            subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            subs.choices["serve"].error(
                "--cold and --keep-warm contradict each other (--cold: no warm runner at all); "
                "use one of them")

        cfg = ServeConfig(
            host=args.host, port=args.port, backend=args.backend, ray_address=args.ray_address,
            ray_type_map=args.ray_type_map, ray_autoscale=args.ray_autoscale,
            simulate=args.simulate, tokens_file=args.tokens_file, state_dir=args.state_dir,
            runtime_file=args.runtime_file, idle_timeout=args.idle_timeout,
            max_timeout=args.max_timeout, orphan_timeout=args.orphan_timeout,
            client_python=not args.gateway_python, force=args.force,
            isolation=args.isolation, certfile=args.certfile,
            keyfile=args.keyfile, retention=args.retention,
            keep_warm=None if args.cold else ServeConfig.keep_warm if args.keep_warm is None
            else args.keep_warm,
            max_jobs_per_user=args.max_jobs_per_user, max_gpus_per_user=args.max_gpus_per_user,
            max_blob_bytes=args.max_blob_bytes, max_job_bytes=args.max_job_bytes,
            blob_reserve=args.blob_reserve, blob_port=args.blob_port,
            pass_env=tuple(dict.fromkeys(n for names in args.pass_env for n in names)),
        )
        return serve(cfg)
    if args.command == "stop":
        from ._embedded import stop_local_gateway

        print(stop_local_gateway())
        return 0
    if args.command in ("pool", "jobs"):
        from ._errors import GpuMagicError
        from ._tables import JOBS_SHOWN, jobs_text, pool_text

        try:
            client = _looking_client(args.url, args.token)
            if args.command == "pool":
                print(pool_text(client.pool()))
            elif args.all:
                jobs, total = client.all_jobs("gpu-magic jobs --all", JOBS_SHOWN)
                print(jobs_text(jobs, everyone=True, total=total))
            else:
                jobs, total = client.recent_jobs(JOBS_SHOWN)
                print(jobs_text(jobs, total=total))
        except GpuMagicError as exc:
            print(f"gpu-magic {args.command}: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(args.simulate, args.port, args.notebooks)
    return 2


def _looking_client(url: str | None, token: str | None) -> Any:
    """A client for a command that only looks: the local gateway that is running, as it is.
    Asking for one with this shell's GPU_MAGIC_SIMULATE would restart a demo's simulated
    gateway as one with no GPUs, under the notebooks using it."""
    from ._client import LOCAL, GatewayClient
    from ._connection import connect, current_target
    from ._embedded import running_local_gateway, runtime_path
    from ._errors import GatewayError

    target = url or current_target()[0]
    if target is None:
        info = running_local_gateway()
        if info is None:
            # starting one here would make a gateway with no GPUs that lives an hour
            raise GatewayError(
                f"no local gpu_magic gateway is running (none is recorded in {runtime_path()}), "
                "and this command only looks: a %%gpu cell starts one, `gpu-magic serve` runs "
                "one in this terminal, or look at another gateway with --url URL (or "
                "GPU_MAGIC_URL)")
        return GatewayClient(str(info["url"]), token or info.get("token"),
                             token_from="--token" if token else LOCAL)
    elif not (token or os.environ.get("GPU_MAGIC_TOKEN")):
        # first whether anything answers there (health needs no token): a mistyped URL was
        # told to find a token
        import httpx

        try:
            httpx.get(target.rstrip("/") + "/v1/health", timeout=5.0)
        except httpx.ConnectError as exc:
            raise GatewayError(f"nothing answers at {target} ({exc}): is the gateway running "
                               "there, and is the URL right?") from None
        except httpx.HTTPError:
            pass  # (it answers, in some way: the token is what is missing)
        # connect()'s advice (%config, %gpu connect) is the notebook's, no help in a terminal
        raise GatewayError(f"no token for the gateway at {target}: pass --token TOKEN or set "
                           "GPU_MAGIC_TOKEN")
    return connect(url, token, url_from="--url" if url else None,
                   token_from="--token" if token else None)


def _token_values_kept(argv: list[str]) -> list[str]:
    """``--token -x...`` as ``--token=-x...``: a token from a tokens file may start with '-',
    which argparse reads as an option and then says --token has no value. (A word starting
    with '--' after --token is taken as the option it looks like: none of ours takes a
    one-dash form.)"""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--token" and i + 1 < len(argv) and argv[i + 1][:1] == "-" \
                and argv[i + 1][:2] != "--":
            out.append(f"--token={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out
