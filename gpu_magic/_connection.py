"""Which gateway to talk to, first found wins: what `%gpu connect` said, else the magic's
configuration (`%config GPUMagic.url`), else GPU_MAGIC_URL, else the local one."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import sys
import threading

from ._client import LOCAL, GatewayClient
from ._errors import GatewayError

_lock = threading.Lock()
# (url, token, where they came from) -> its client
_clients: dict[tuple[str, str | None, str | None], GatewayClient] = {}
_override: tuple[str, str | None, str | None] | None = None  # url, token, the token's source
_configured: tuple[str, str] = ("", "")  # GPUMagic.url, GPUMagic.token ("": not set)
_embedded: dict[str, object] | None = None


def set_connection(url: str | None, token: str | None = None,
                   token_from: str | None = "%gpu connect --token") -> None:
    """Use this gateway from now on in this process (None: back to the configuration, the
    environment or the local one); ``token_from`` says where the token came from."""
    global _override
    with _lock:
        _override = (url.rstrip("/"), token, token_from) if url else None
    publish()


# --- what the sidebar shows: the gateway of the notebook in front, not of JupyterLab ---
#
# A notebook that ran `%gpu connect` (or set GPUMagic.url) uses a gateway JupyterLab's
# server extension cannot know of: the sidebar showed the local pool and jobs beside cells
# that ran elsewhere. The kernel leaves a note, readable by this user only, that the server
# extension reads for the notebook in front (by its kernel's id).

PUBLISHED_PREFIX = "gpu_magic-kernel-"


def published_path(kernel_id: str) -> str:
    from jupyter_core.paths import jupyter_runtime_dir

    return os.path.join(jupyter_runtime_dir(), f"{PUBLISHED_PREFIX}{kernel_id}.json")


def _kernel_id() -> str | None:
    """This process's Jupyter kernel id (its connection file's name), if it is a kernel."""
    if "ipykernel" not in sys.modules:
        return None
    try:
        from ipykernel.connect import get_connection_file

        name = os.path.basename(get_connection_file())
    except Exception:  # (IPython outside a kernel)
        return None
    m = re.fullmatch(r"kernel-([0-9A-Za-z-]{1,64})\.json", name)
    return m[1] if m else None


def publish() -> None:
    """Leave (or take back) the note of which gateway this kernel uses."""
    url, how = current_target()
    token, token_from = _token_for(url) if url is not None else (None, None)
    with _note_lock:  # (cells' connects in threads: background jobs' followers)
        if _published and _published[-1] == (url, token):
            return  # (asked at each cell's connect: unchanged, nothing to write)
        kernel = _kernel_id()
        if kernel is None:
            return
        path = published_path(kernel)
        if url is None:  # the local gateway: JupyterLab's server finds it itself
            _unpublish(path)
        elif not _write_note(path, {"url": url, "token": token, "source": how,
                                    "token_from": token_from, "pid": os.getpid()}):
            return  # (the sidebar then shows JupyterLab's gateway, as before; tried again)
        elif path not in _notes:
            _notes.add(path)
            atexit.register(_unpublish, path)  # (a kernel that ends takes its note back)
        _published.append((url, token))


def _write_note(path: str, note: dict[str, object]) -> bool:
    """Write ``note`` whole, readable by this user only: a file of its own (0600, a name no
    one else chose) moved into place."""
    import tempfile

    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".gpu_magic-note-", suffix=".tmp")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(note, f)
        os.replace(tmp, path)
    except OSError:
        _unpublish(tmp)
        return False
    return True


# what this kernel said, in order: (url, token), url None for the local gateway
_published: list[tuple[str | None, str | None]] = []
_notes: set[str] = set()
_note_lock = threading.Lock()


def _unpublish(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def get_connection() -> tuple[str, str | None, str | None] | None:
    """What `%gpu connect` set (to put it back after a failed connect)."""
    return _override


def configure(url: str, token: str) -> None:
    """The magic's traitlets (``GPUMagic.url`` and ``.token``; "" where not set)."""
    global _configured
    with _lock:
        _configured = (url.rstrip("/"), token)
    publish()


def current_target() -> tuple[str | None, str]:
    """(url or None for the local embedded gateway, how it was chosen)."""
    if _override is not None:
        return _override[0], "%gpu connect"
    if _configured[0]:
        return _configured[0], "GPUMagic.url config"
    url = (os.environ.get("GPU_MAGIC_URL") or "").strip()  # (pasted with a space or newline)
    if url:
        return url, "GPU_MAGIC_URL"
    return None, "local gateway"


# current_target's answers as the client names the source of a URL in its advice
_URL_FROM = {"%gpu connect": "%gpu connect", "GPUMagic.url config": "%config GPUMagic.url",
             "GPU_MAGIC_URL": "GPU_MAGIC_URL"}


def _token_for(url: str) -> tuple[str | None, str | None]:
    """The token for ``url`` and where it came from."""
    if _override is not None and _override[0] == url and _override[1]:
        return _override[1], _override[2]
    if _configured[1]:
        return _configured[1], "%config GPUMagic.token"
    token = (os.environ.get("GPU_MAGIC_TOKEN") or "").strip()
    return (token, "GPU_MAGIC_TOKEN") if token else (None, None)


def connect(url: str | None = None, token: str | None = None, *,
            url_from: str | None = None, token_from: str | None = None,
            looking: bool = False) -> GatewayClient:
    """A client for the configured gateway, starting the local one if nothing is configured.
    ``url_from``/``token_from`` name where a given ``url``/``token`` came from (``--url``).
    ``looking``: for commands that only look at the gateway or its jobs (``%gpu status``):
    a running local gateway is used whatever its configuration, never restarted for it."""
    if url is None:
        url, how = current_target()
        url_from = _URL_FROM.get(how)
        publish()  # (GPU_MAGIC_URL set in the kernel since: the sidebar follows)
    if url is not None:
        if not token:
            token, token_from = _token_for(url)
        if not token:
            raise GatewayError(
                f"no token for the gateway at {url}: set GPU_MAGIC_TOKEN (or "
                "%config GPUMagic.token), or run %gpu connect URL (it asks for the token)"
            )
    else:
        info = _local_info(looking)
        url, token = str(info["url"]), info.get("token")  # type: ignore[assignment]
        key = (url.rstrip("/"), token, LOCAL)
        with _lock:
            client = _clients.get(key)
            if client is None:
                # one local gateway at a time: the client of one stopped since holds its
                # sockets for good (a soak trial's kernel, 2-3 per restart)
                for old in [k for k in _clients if k[2] == LOCAL]:
                    _clients.pop(old).let_go()
                client = _clients[key] = GatewayClient(url, token, url_from=LOCAL,
                                                       token_from=LOCAL)
                client.on_unreachable = lambda: _drop_local(key)
                client.relocate = _local_now
        return client
    key = (url.rstrip("/"), token, f"{url_from} {token_from}")
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = GatewayClient(url, token, url_from=url_from,
                                                   token_from=token_from)
    return client


def _drop_local(key: tuple[str, str | None, str | None]) -> None:
    """The local gateway refused a connection (stopped, or its pid now names another
    process): forget it and its client, so that the next cell finds or starts a fresh one."""
    global _embedded
    with _lock:
        dropped = _clients.pop(key, None)
        if dropped is not None:  # (jobs may still hold it: its sockets, not the object)
            dropped.let_go()
        if _embedded is not None and (str(_embedded.get("url")), _embedded.get("token")) == key[:2]:
            _embedded = None


def _local_now() -> tuple[str, str | None] | None:
    """Where this user's local gateway runs now, if one does (only looks: starts none). A
    local gateway started again keeps its state folder, so it knows the jobs of the last."""
    from ._embedded import running_local_gateway

    info = running_local_gateway()
    return (str(info["url"]), info.get("token")) if info else None


def forget(client: GatewayClient) -> None:
    """Drop a cached client (its gateway went away)."""
    with _lock:
        for key, c in list(_clients.items()):
            if c is client:
                del _clients[key]
    client.let_go()


def _local_info(looking: bool = False) -> dict[str, object]:
    """The local gateway's runtime info; re-checked only when its process is gone or the
    wanted configuration changed (a health request per cell would cost more than the cell).
    ``looking``: any running one will do (see ``connect``)."""
    global _embedded
    from ._embedded import _pid_alive, difference, ensure_local_gateway, running_local_gateway
    from ._injob import current_job, refuse_local_gateway

    if current_job():
        raise refuse_local_gateway("reaching the local gateway")
    simulate = os.environ.get("GPU_MAGIC_SIMULATE") or None
    info = _embedded
    if info is not None and not _pid_alive(int(info.get("pid", 0))):  # type: ignore[arg-type]
        info = None
    if looking and info is None:
        info = running_local_gateway()
    if info is None or (not looking and difference(info, simulate) is not None):
        info = ensure_local_gateway(simulate)
    # (one found by looking is kept even when its configuration differs: the next cell's
    # connect sees that and restarts it, as it would have)
    _embedded = info
    return info


def local_difference() -> str | None:
    """A line saying how the local gateway this process uses (found by looking) runs
    otherwise than this kernel would start it, and what happens next; None where it does
    not, or where a URL is configured."""
    from ._embedded import difference, wanted_config
    from ._version import __version__

    info, simulate = _embedded, os.environ.get("GPU_MAGIC_SIMULATE") or None
    what = None if current_target()[0] is not None or info is None else difference(info, simulate)
    if what is None:
        return None
    if simulate:
        from ._errors import SpecError
        from .server.inventory import parse_simulated

        try:
            parse_simulated(simulate)
        except SpecError as exc:  # (the next cell refuses it: not "restarts it")
            return (f"this kernel's GPU_MAGIC_SIMULATE={simulate!r} cannot be read ({exc}): "
                    "%%gpu cells here are refused until it is fixed, and the local gateway "
                    "keeps the pool it has")
    want = (f"version {__version__}" if what.startswith("version")
            else f"configuration {wanted_config(simulate)}")
    return (f"the local gateway's {what} differs from this kernel's {want}: the next %%gpu "
            "cell here restarts it with this kernel's (once it has no jobs)")


def invalidate_local() -> None:
    """Forget the cached local gateway (a request to it failed); the next connect re-checks."""
    global _embedded
    _embedded = None
