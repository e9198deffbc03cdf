"""Runner isolation for gateways shared by several users.

A cell is arbitrary code, so the boundary is the runner: in multi-user mode each runner starts
inside a bubblewrap sandbox where the gateway's state directory (tokens, every user's blobs,
results and event logs), the tokens file and the runtime file are replaced by empty stand-ins,
and only the job's own folder and its own input blobs are visible. (Running each user's cells
under their own Unix account is the other way DESIGN.md allows; it is not built yet.)
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


class IsolationUnavailable(Exception):
    """The requested isolation cannot be provided on this machine."""


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


# The device files an NVIDIA GPU is used through (the pool is NVML's): one per GPU, the
# control and unified-memory ones, MIG's capabilities. bwrap's own /dev has none of them.
GPU_DEVICE_PATTERNS = ("nvidia*", "nvidia-caps")


def gpu_device_files(dev: Path = Path("/dev")) -> list[str]:
    """The GPU device files under ``dev`` (none on a machine without a GPU). The unified
    memory one is made by the driver's helper on the first use of CUDA on the host: inside a
    sandbox no cell could make it, so it is made here first where it is missing."""
    if (dev / "nvidiactl").exists() and not (dev / "nvidia-uvm").exists() and \
            dev == Path("/dev"):
        _make_uvm_device()
    found: set[str] = set()
    for pattern in GPU_DEVICE_PATTERNS:
        found.update(str(p) for p in dev.glob(pattern))
    return sorted(found)


def _make_uvm_device() -> None:
    helper = shutil.which("nvidia-modprobe")
    if helper is None:
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run([helper, "-u", "-c=0"], timeout=10, capture_output=True, check=False)


def private_dirs() -> list[str]:
    """The gateway account's own folders, each an empty, read-only one in a sandbox: its
    home (SSH keys, its other gateways' tokens and state, Jupyter's runtime files) and its
    runtime folders. A student's cell read an instructor's personal gateway's token this way
    (the shared one ran under the instructor's account), and could then run code outside any
    sandbox. (/tmp stays as it was, read-only: what is there is anyone's to read.)"""
    from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir

    found: dict[str, str] = {}
    # Jupyter's folders as Jupyter finds them, not only where the usual variables put them:
    # with JUPYTER_DATA_DIR or XDG_DATA_HOME set, its runtime files (a personal gateway's
    # token) and the personal gateways' state lie outside the home (a red team read one).
    # The account's home as the system has it too: a gateway started with HOME set elsewhere
    # (systemd's Environment=, sudo -E) left /root readable, and root's personal token in it
    for d in (os.path.expanduser("~"), _account_home(), os.environ.get("XDG_RUNTIME_DIR"),
              f"/run/user/{os.getuid()}", os.environ.get("JUPYTER_RUNTIME_DIR"),
              jupyter_runtime_dir(), jupyter_data_dir()):
        if d and os.path.isabs(d) and os.path.isdir(d):
            real = os.path.realpath(d)
            if real not in ("/", "/tmp", "/var/tmp"):  # (hiding / would hide everything)
                found.setdefault(real, real)
    return sorted(found, key=lambda d: d.count("/"))  # (a folder inside another after it)


def _account_home() -> str | None:
    """The account's home as the system names it, where it is a person's or root's: a
    service account's (/usr/sbin, /var/www) is a system folder cells may need."""
    try:
        home = os.path.realpath(pwd.getpwuid(os.geteuid()).pw_dir)
    except (KeyError, OSError):  # (a uid with no entry, in a container)
        return None
    return home if home == "/root" or home.startswith("/home/") else None


def secret_folders(files: Sequence[Path], hidden: Sequence[str], shown: Sequence[str] = ()
                   ) -> tuple[list[str], dict[Path, str]]:
    """Where the files a cell must not read (tokens, TLS key) are hidden: (folders a sandbox
    shows empty, and the files left to a cover of their own, each with why), decided once at
    the gateway's start. ``hidden``: folders already empty in a sandbox (:func:`private_dirs`,
    the state directory); ``shown``: folders shown again inside them (:func:`python_paths`).

    A file covered on its own is shown again to sandboxes already running when it is
    replaced by a rename (an editor's save, a rotation, :func:`~..auth.write_private`): Linux
    drops a mount whose mount point is renamed over in another namespace, and a red team's
    running cell read every token after an admin added a user. So a file is hidden with its
    folder, which a rename inside cannot undo, where that folder holds nothing else a cell
    may need: the files hidden, and dotfiles, ``#…#`` and ``…~`` leftovers (an editor's) and a
    version control's folder. Files in a folder already hidden need neither, unless a folder
    shown again holds them (a project folder on PYTHONPATH in the account's home)."""
    hidden = [os.path.realpath(d) for d in hidden]
    shown = [os.path.realpath(d) for d in shown]

    def within(path: str, folders: Sequence[str]) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in folders)

    # (each file under its own name and where links lead: a link's folder, and its target's)
    place = {f: os.path.realpath(os.path.dirname(os.path.abspath(f))) for f in files}
    folders: dict[str, None] = {}
    exposed: dict[Path, str] = {}
    for f, parent in place.items():
        if within(parent, hidden) and not within(parent, shown):
            continue
        names = {os.path.basename(g) for g, p in place.items() if p == parent}
        try:
            entries = os.listdir(parent)
        except OSError:
            entries = ["?"]  # (unreadable: what else is there is unknown)
        if parent == "/" or any(within(p, [parent]) for p in shown) or \
                not all(_leftover(parent, e, names) for e in entries):
            exposed[f] = ("it shares its folder with other files, so it is hidden by a cover "
                          "of its own, which Linux drops in running sandboxes when the file "
                          "is replaced (an editor's save, a rotation)")
            continue
        folders[parent] = None
        linked = os.path.dirname(os.path.abspath(f))
        if _relinkable(linked):
            # a link to the folder (a release's `current`) re-pointed shows its new target to
            # the sandboxes running then; the target hidden at start is the old one
            exposed[f] = (f"it is reached through a link ({linked} leads to {parent}), and a "
                          "link re-pointed shows its new folder to cells running then; name "
                          "the folder itself")
    return list(folders), exposed


def _relinkable(folder: str) -> bool:
    """Whether a link on the way to ``folder`` may be re-pointed (a release's ``current``):
    any but the system's own layout, links right under /, /usr or /var (/var/run -> /run)."""
    path = "/"
    for part in os.path.normpath(folder).split("/")[1:]:
        parent, path = path, os.path.join(path, part)
        if os.path.islink(path):
            if parent not in ("/", "/usr", "/var"):
                return True
            path = os.path.realpath(path)
    return False


_VCS = frozenset({".git", ".hg", ".svn"})


def _leftover(folder: str, entry: str, hidden: set[str]) -> bool:
    """Whether ``entry`` of a secret file's folder is the secret's own or nothing a cell may
    need: an editor's backup or swap file, a version control's history (of the secrets)."""
    if entry in hidden or entry in _VCS:
        return True
    if os.path.isdir(os.path.join(folder, entry)):
        # (a dot-folder, or tokens_data/ beside tokens, may hold a course's data: a red team's
        # and a review's were hidden with the secrets)
        return False
    return (entry.startswith((".", "#")) or entry.endswith("~")
            or any(entry.startswith(h) for h in hidden))  # (tokens.json.bak, .old, .1)


# what decides where an interpreter imports from, besides the interpreter itself
_PATH_ENV = ("PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "HOME", "LD_LIBRARY_PATH")
_PATHS: dict[tuple[str, tuple[tuple[str, str], ...]], list[str]] = {}


def python_paths(python: str, env: Mapping[str, str]) -> list[str]:
    """What ``python`` imports from with ``env`` (its prefixes and ``sys.path``): shown
    again, read-only, where :func:`private_dirs` hid them (a virtual environment in the
    account's home). Asked once per interpreter and environment; a failed answer is not
    kept, and raises :class:`IsolationUnavailable`."""
    key = (python, tuple((k, env[k]) for k in _PATH_ENV if k in env))
    if key not in _PATHS:
        probe = ("import json, os, sys; print(json.dumps([sys.prefix, sys.base_prefix, "
                 "sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)), "
                 "*sys.path[1:]]))")  # (sys.path[0]: the probe's own folder)
        try:
            out = subprocess.run([python, "-c", probe], capture_output=True, text=True,
                                 env=dict(key[1]), cwd="/", timeout=60, check=True).stdout
            _PATHS[key] = [p for p in json.loads(out) if isinstance(p, str) and os.path.isabs(p)]
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise IsolationUnavailable(
                f"cannot ask {python} where it imports from, to show those folders in the "
                f"sandbox: {exc}") from None
    return [p for p in _PATHS[key] if os.path.exists(p)]


def bwrap_command(
    argv: Sequence[str],
    *,
    job_dir: Path,
    state_dir: Path,
    readable: Sequence[str],
    hidden_files: Sequence[Path] = (),
    cwd: str | None = None,
    devices: Sequence[str] | None = None,
    hidden_dirs: Sequence[str] | None = None,
    python: Sequence[str] = (),
    hidden_folders: Sequence[str] = (),
) -> list[str]:
    """The runner command wrapped in a bubblewrap sandbox. Builds a list, runs nothing.

    ``devices``: device files to bring into the sandbox's /dev (default: this host's GPU
    device files; none for a simulated pool). All of a host's GPUs are there, as outside a
    sandbox: which one a cell uses is set by ``CUDA_VISIBLE_DEVICES`` of its grant; the
    sandbox keeps the users' data apart, not their GPUs. ``hidden_dirs`` (default
    :func:`private_dirs`) are empty, and so are ``hidden_folders`` (:func:`secret_folders`);
    ``python``: folders the runner's interpreter needs (:func:`python_paths`), shown again
    read-only inside them."""
    bwrap = bwrap_path()
    if bwrap is None:
        raise IsolationUnavailable(
            "bubblewrap (bwrap) is not installed; install it (apt-get install bubblewrap)"
        )
    # --cap-drop ALL: a gateway run as root (in a container, say) would otherwise hand the
    # cell every capability, and with CAP_SYS_ADMIN it unmounts the stand-ins below and reads
    # the tokens file and every user's blobs (or remounts / writable)
    cmd = [bwrap, "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--cap-drop", "ALL",
           "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    hidden = private_dirs() if hidden_dirs is None else list(hidden_dirs)
    for d in hidden:
        cmd += ["--tmpfs", d]
    for path in dict.fromkeys(python):
        real = os.path.realpath(path)
        # never a hidden folder back, whole or as part of one of its parents (PYTHONPATH=~)
        if not any(d == real or d.startswith(real.rstrip("/") + "/") for d in hidden):
            cmd += ["--ro-bind", path, path]
    # the secrets' folders after the folders shown again: one of those may hold one (a red
    # team's tokens file in a project folder on PYTHONPATH, in the home)
    secret = [d for d in hidden_folders if d not in hidden]
    for d in secret:
        cmd += ["--tmpfs", d]
    hidden += secret
    cmd += ["--tmpfs", str(state_dir)]
    # without them a cell was told "H100 ×1" and found no GPU (a department's trial)
    for d in gpu_device_files() if devices is None else devices:
        cmd += ["--dev-bind-try", d, d]
    for f in hidden_files:  # (where not hidden with their folder)
        if f.exists() and os.path.realpath(os.path.dirname(os.path.abspath(f))) not in \
                hidden_folders:
            cmd += ["--ro-bind", "/dev/null", str(f)]
    cmd += ["--bind", str(job_dir), str(job_dir)]
    # everything else is read-only (the home folder is an empty one): IPython, matplotlib
    # and tempfile would each warn, on every cell, that they fall back to a temporary folder
    scratch = job_dir / "scratch"
    cmd += ["--dir", str(scratch), "--setenv", "TMPDIR", str(scratch),
            "--setenv", "IPYTHONDIR", str(scratch / "ipython"),
            "--setenv", "MPLCONFIGDIR", str(scratch / "matplotlib")]
    for path in dict.fromkeys(readable):
        cmd += ["--ro-bind", path, path]
    # read-only once what is shown inside them is (a cell's downloads into ~/.cache would
    # fill the memory); the folders bound into them keep their own modes
    for d in hidden:
        cmd += ["--remount-ro", d]
    # the state directory's stand-in too: a cell filled it, in memory, without a bound (a red
    # team); the job's own folder, bound into it, stays writable
    cmd += ["--remount-ro", str(state_dir)]
    cmd += ["--chdir", cwd or str(job_dir), "--", *argv]
    return cmd


def sandboxed_pid(bwrap_pid: int, inner: int) -> int | None:
    """The pid on this host of the process that is ``inner`` inside the sandbox bubblewrap
    process ``bwrap_pid`` started (``--unshare-pid`` numbers the sandbox's processes apart),
    found among that process's descendants; None if there is none (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    todo = list(children.get(bwrap_pid, []))
    while todo:
        pid = todo.pop(0)  # breadth first: the runner is near the top, the cell's below
        try:
            with open(f"/proc/{pid}/status") as f:
                nspid = next((ln.split()[1:] for ln in f if ln.startswith("NSpid:")), [])
        except OSError:
            continue
        if nspid and int(nspid[-1]) == inner:
            return pid
        todo += children.get(pid, [])
    return None
