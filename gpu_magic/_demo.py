"""``gpu-magic demo``: a simulated GPU pool and JupyterLab with the teaching notebooks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def notebooks_dir(explicit: Path | None = None) -> Path:
    """The teaching notebooks: given, beside a source checkout, or shipped in the package."""
    if explicit is not None:
        return explicit
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "notebooks", here / "notebooks"):
        if candidate.is_dir():
            return candidate
    raise SystemExit("gpu-magic demo: cannot find the teaching notebooks; pass --notebooks DIR")


COPY_DIR = "gpu-magic-notebooks"


def working_copy(src: Path, dest: Path) -> tuple[Path, list[str]]:
    """The teaching notebooks copied into ``dest``, where saving one (and the files its cells
    write) changes neither a source checkout's tracked files nor the installed package. A copy
    already there is kept: it is the user's, edited or not. Returns ``dest`` and the names
    copied now."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for nb in sorted(src.glob("*.ipynb")):
        target = dest / nb.name
        if not target.exists():
            shutil.copyfile(nb, target)
            copied.append(nb.name)
    return dest, copied


def _register(info: dict[str, object], started: bool) -> Path:
    """A note that this demo uses the gateway ``info`` (and whether it started it): the last
    demo using a gateway a demo started stops it; the others leave it running (stopping it
    would end the jobs of those still using it as lost)."""
    from ._embedded import runtime_path

    mark = runtime_path().parent / f"gpu-magic-demo-{os.getpid()}.json"
    mark.write_text(json.dumps({"pid": os.getpid(), "gateway": info.get("pid"),
                                "started": started}))
    return mark


def _other_demos(info: dict[str, object]) -> list[dict[str, object]]:
    """The notes of the other running demos that use the gateway ``info``."""
    from ._embedded import _pid_alive, runtime_path

    found = []
    for mark in runtime_path().parent.glob("gpu-magic-demo-*.json"):
        try:
            note = json.loads(mark.read_text())
            pid = int(note["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid == os.getpid():
            continue
        if not _pid_alive(pid):
            mark.unlink(missing_ok=True)  # (a demo killed outright leaves its note)
        elif note.get("gateway") == info.get("pid"):
            found.append(note)
    return found


def run_demo(simulate: str, port: int, notebooks: Path | None) -> int:
    from ._embedded import ensure_local_gateway, running_local_gateway, stop_local_gateway

    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        print("gpu-magic demo needs JupyterLab: pip install 'gpu-magic[demo]'", file=sys.stderr)
        return 1
    nb_dir = notebooks_dir(notebooks)
    if not nb_dir.is_dir():  # (before a gateway starts: it was left running, JupyterLab not)
        print(f"gpu-magic demo: --notebooks {nb_dir}: "
              + ("it is a file, not a folder" if nb_dir.exists() else "no such folder")
              + "; give the folder JupyterLab should open, or leave --notebooks out for the "
              "teaching notebooks", file=sys.stderr)
        return 2
    if notebooks is None:
        nb_dir, copied = working_copy(nb_dir, Path.cwd() / COPY_DIR)
        kept = len(list(nb_dir.glob("*.ipynb"))) - len(copied)
        if not copied:
            how = "kept as you left them; delete one to get it fresh"
        else:
            how = f"{len(copied)} copied now" + (f", {kept} kept as you left them" if kept else "")
        print(f"gpu_magic: the teaching notebooks are in {nb_dir}, yours to edit and save ({how})")
    os.environ["GPU_MAGIC_SIMULATE"] = simulate
    os.environ.pop("GPU_MAGIC_URL", None)
    before = running_local_gateway()
    info = ensure_local_gateway(simulate)
    # one already serving this pool (another demo's, or notebooks' of this user) is used, and
    # left running at the end: stopping it would end its other users' jobs as lost
    adopted = before is not None and before.get("pid") == info.get("pid")
    print(f"gpu_magic: simulated pool {simulate} served by the local gateway at {info['url']}"
          + (f" (already running, pid {info.get('pid')}: it is left running when this demo "
             "stops)" if adopted else ""))
    mark = _register(info, started=not adopted)
    # a gateway another demo started is this demo's to stop if it is the last to use it
    ours = not adopted or any(n.get("started") for n in _other_demos(info))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", f"--ServerApp.root_dir={nb_dir}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    first = sorted(nb_dir.glob("*.ipynb"))
    if first:
        cmd.append(f"--LabApp.default_url=/lab/tree/{first[0].name}")
    # said before JupyterLab starts: a print that fails (its reader gone) must not leave it
    # running, unwatched, in a session of its own
    print("gpu_magic: JupyterLab is starting; open the URL it prints (with its token). "
          "Ctrl-C stops everything.", flush=True)
    # its own session: Ctrl-C reaches us once, and we stop JupyterLab cleanly with SIGTERM
    lab = subprocess.Popen(cmd, cwd=nb_dir, start_new_session=True)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        if not stopping:  # once: a second signal (TERM then HUP) must not cut the clean-up
            stopping = True
            raise KeyboardInterrupt

    # `kill` and a closed terminal stop everything too, as Ctrl-C does: JupyterLab, in its own
    # session, would not hear them and would stay on the port with the gateway behind it
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        while lab.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stopping = True  # from here on no signal interrupts: the clean-up must run whole
        if lab.poll() is None:
            lab.terminate()
            try:
                lab.wait(10)
            except subprocess.TimeoutExpired:
                lab.kill()
                lab.wait(10)
        mark.unlink(missing_ok=True)
        others = sorted(int(str(n["pid"])) for n in _other_demos(info))
        if others:
            many = len(others) > 1
            print(f"gpu_magic: the local gateway (pid {info.get('pid')}) is left running: the "
                  f"demo{'s' if many else ''} of pid {', '.join(map(str, others))} "
                  f"use{'' if many else 's'} it too; `gpu-magic stop` stops it")
        elif not ours:
            print(f"gpu_magic: the local gateway (pid {info.get('pid')}) was running before "
                  "this demo and is left running; `gpu-magic stop` stops it")
        elif (now := running_local_gateway()) is not None and now.get("pid") != info.get("pid"):
            # (another start replaced ours meanwhile: not this demo's to stop)
            print(f"gpu_magic: the local gateway now running (pid {now.get('pid')}) is not the "
                  "one this demo started; it is left running")
        else:
            print(stop_local_gateway())
    return lab.returncode if lab.returncode and lab.returncode > 0 else 0
