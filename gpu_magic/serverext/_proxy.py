"""Which gateway the sidebar shows, and forwarding a request to it.

The gateway is found the way the magic finds it: ``GpuMagicProxy.url``/``.token`` in Jupyter's
config, else ``GPU_MAGIC_URL``/``GPU_MAGIC_TOKEN`` in the server's environment, else this user's
local gateway from its runtime file. The sidebar only looks, as ``gpu-magic pool`` does: it never
starts a local gateway (a poll every few seconds would undo ``gpu-magic stop`` at once); the next
``%%gpu`` cell starts one, and until then the panel says so.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from traitlets import Float, Unicode
from traitlets.config import LoggingConfigurable

from .._client import _clause, usable_token
from .._errors import AuthError

# (also a new user's first sight of the panel: "again" read oddly there, and a JupyterHub's
# students cannot set what JupyterLab starts with; %gpu connect they can)
NO_LOCAL_GATEWAY = ("no local gpu_magic gateway is running; the next %%gpu cell starts one, "
                    "and your jobs show here")
SHARED_POOL_ADVICE = ("To use a shared GPU pool instead, run %gpu connect URL in a notebook, or "
                      "set GPU_MAGIC_URL and GPU_MAGIC_TOKEN in the environment JupyterLab "
                      "starts in (on a JupyterHub, the spawner's).")


def _reason(exc: BaseException) -> str:
    """Why a connection failed, as the magic says it ("Connection refused"): httpx's async
    client says only "All connection attempts failed", with the reason in its cause."""
    seen: BaseException | None = exc
    for _ in range(8):  # (a chain, not a cycle)
        if seen is None:
            break
        # (asyncio's text: "Connect call failed"); only a system errno: a TLS error's is
        # OpenSSL's, a name lookup's the resolver's (negative), and their text says it already
        if (isinstance(seen, OSError) and not isinstance(seen, ssl.SSLError)
                and (seen.errno or 0) > 0):
            return os.strerror(seen.errno)
        group = getattr(seen, "exceptions", None)  # (an exception group: its first)
        seen = (group[0] if group else None) or seen.__cause__ or seen.__context__
    return _clause(exc)


class ProxyError(Exception):
    """An answer for the browser: ``{"error": code, "message": advice}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message}


@dataclass(frozen=True)
class Target:
    url: str
    token: str | None
    source: str  # how it was chosen, shown in the panel
    token_from: str | None = None  # where a notebook's token came from (GPU_MAGIC_TOKEN, ...)


class GpuMagicProxy(LoggingConfigurable):
    """Forwards the sidebar's requests to the gpu_magic gateway, adding its token."""

    url = Unicode("", help="URL of the gateway (default: GPU_MAGIC_URL, else the user's local "
                  "gateway)").tag(config=True)
    token = Unicode("", help="token for the gateway (default: GPU_MAGIC_TOKEN)").tag(config=True)
    timeout = Float(10.0, help="seconds to wait for the gateway's answer").tag(config=True)

    def describe(self) -> str:
        if self.url:
            return self.url
        env = os.environ.get("GPU_MAGIC_URL")
        if env:
            return f"{env} (GPU_MAGIC_URL)"
        sim = os.environ.get("GPU_MAGIC_SIMULATE")
        return f"the local gateway{f', simulated {sim}' if sim else ''}"

    # --- which gateway ---

    async def target(self, kernel: str | None = None) -> Target:
        """The gateway to ask, or a ProxyError with advice when there is none. ``kernel``:
        the id of the kernel of the notebook in front; one that connected elsewhere (``%gpu
        connect``) left a note of its gateway, which wins (its cells run there)."""
        note = _kernel_note(kernel) if kernel else None
        if note is not None:
            return Target(str(note["url"]).rstrip("/"), note.get("token"),
                          "this notebook's " + ("%gpu connect" if note.get("source") ==
                                                "%gpu connect" else str(note.get("source"))),
                          note.get("token_from"))
        if self.url:
            return Target(self.url.rstrip("/"), self.token or os.environ.get("GPU_MAGIC_TOKEN"),
                          "GpuMagicProxy.url")
        url = os.environ.get("GPU_MAGIC_URL")
        if url:
            token = os.environ.get("GPU_MAGIC_TOKEN")
            if not token:
                raise ProxyError(503, "no_token",
                                 f"GPU_MAGIC_URL is {url} but GPU_MAGIC_TOKEN is not set in "
                                 "JupyterLab's environment: set both before starting JupyterLab.")
            return Target(url.rstrip("/"), token, "GPU_MAGIC_URL")
        info = _local_runtime_info()
        if info is not None:
            return Target(str(info["url"]), info.get("token"), "local gateway")
        # Only look: starting one here would undo `gpu-magic stop` within one poll.
        raise ProxyError(503, "no_gateway", _no_local_gateway_advice())

    # --- forwarding ---

    async def request(self, method: str, path: str, params: dict[str, str] | None = None,
                      target: Target | None = None,
                      kernel: str | None = None) -> tuple[Target, int, Any]:
        """Ask the gateway; (target, status, JSON body) or a ProxyError that says what to do."""
        target = target or await self.target(kernel)
        try:
            token = usable_token(target.token, whose=f"the token of {target.source}")
        except AuthError as exc:  # (never the token itself: it would show in the panel)
            raise ProxyError(400, "bad_token", str(exc)) from None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            # A client per request: the panel polls every few seconds, and a client bound to
            # one event loop must never outlive it (tests start a server per test).
            async with httpx.AsyncClient(base_url=target.url, timeout=self.timeout) as http:
                resp = await http.request(method, path, params=params, headers=headers)
        except httpx.TimeoutException:
            raise ProxyError(504, "gateway_timeout",
                             f"the gpu_magic gateway at {target.url} ({target.source}) did not "
                             f"answer within {self.timeout:g} s; it may be overloaded.")
        except httpx.HTTPError as exc:
            raise ProxyError(503, "gateway_unreachable",
                             f"cannot reach the gpu_magic gateway at {target.url} "
                             f"({target.source}): {_reason(exc)}. "
                             + _unreachable_advice(target))
        if resp.status_code in (401, 403):
            raise _refused(target)
        try:
            body = resp.json()
        except ValueError:
            raise ProxyError(502, "bad_gateway",
                             f"{target.url} answered {resp.status_code} with something other "
                             "than JSON: is it a gpu_magic gateway?")
        return target, resp.status_code, body

    async def status(self, kernel: str | None = None) -> dict[str, Any]:
        """The connection line of the panel; never an error status, it *is* the diagnosis."""
        try:
            target = await self.target(kernel)
        except ProxyError as exc:
            return {"reachable": False, "url": None, "source": None, **exc.body()}
        try:
            _, code, health = await self.request("GET", "/v1/health", target=target)
        except ProxyError as exc:
            return {"reachable": False, "url": target.url, "source": target.source, **exc.body()}
        if code != 200 or not isinstance(health, dict):
            return {"reachable": False, "url": target.url, "source": target.source,
                    "error": "bad_gateway",
                    "message": f"{target.url} answered {code} to /v1/health"}
        if health.get("authorized") is False:
            # it answers, but not to this token: what it serves is not known (a trial's panel
            # called a simulated pool "real GPUs" beside a refused token)
            return {"reachable": True, "url": target.url, "source": target.source,
                    "version": health.get("version"), "simulated": None,
                    "shared": health.get("shared"), **_refused(target).body()}
        out = {
            "reachable": True,
            "url": target.url,
            "source": target.source,
            "version": health.get("version"),
            "backend": health.get("backend"),
            "simulated": bool(health.get("simulated")),
            # whether several users share it: only then is "everyone" a view worth offering
            # (the owner token of a personal gateway is an admin too); None from gateways that
            # predate the field
            "shared": health.get("shared"),
        }
        # who the token is, so the panel offers "everyone" only to an admin (an instructor)
        try:
            _, code, me = await self.request("GET", "/v1/limits", target=target)
        except ProxyError:
            code, me = 0, None
        if code == 200 and isinstance(me, dict):
            out["user"], out["admin"] = me.get("user"), bool(me.get("admin"))
        return out


def _refused(target: Target) -> ProxyError:
    """The gateway refused the token: what to do, by where the token came from."""
    # (a notebook's token may come from GPU_MAGIC_TOKEN too: %gpu connect asks for a new one
    # whatever was set, so that is the fix for all of them)
    whence = f"; the notebook's token came from {target.token_from}" if target.token_from else ""
    fix = (f"run %gpu connect {target.url} in the notebook and paste your current token at its "
           f"prompt{whence}" if target.source.startswith("this notebook's") else
           "set the right GPU_MAGIC_TOKEN (or GpuMagicProxy.token) and restart JupyterLab")
    return ProxyError(502, "gateway_unauthorized", f"the gpu_magic gateway at {target.url} "
                      f"refused the token ({target.source}): {fix}.")


def _kernel_note(kernel: str) -> dict[str, Any] | None:
    """The gateway the kernel ``kernel`` connected to, from the note it left (see
    ``gpu_magic._connection.publish``), if it did and its process is still alive."""
    from .._connection import published_path
    from .._embedded import _read

    if not re.fullmatch(r"[0-9A-Za-z-]{1,64}", kernel):
        return None
    note = _read(Path(published_path(kernel)))
    pid = note.get("pid") if note else None
    if not note or not note.get("url") or not isinstance(pid, int) or not _runs(pid):
        return None  # (a kernel killed outright leaves its note: its process is gone)
    return note


def _runs(pid: int) -> bool:
    """Whether process ``pid`` runs, without reaping it: a kernel is this server's child, and
    a wait here would take its exit status from the server."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OverflowError, ValueError):
        return False  # (another user's process is no kernel of ours)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True  # (no /proc: alive as far as can be told)


def _local_runtime_info() -> dict[str, Any] | None:
    """This user's local gateway from its runtime file, if its process is alive on this host."""
    from .._embedded import _pid_alive, _read, runtime_path

    info = _read(runtime_path())
    if info is None or info.get("host") != socket.gethostname():
        return None
    if not _pid_alive(int(info.get("pid", 0))):
        return None
    return info


def _no_local_gateway_advice() -> str:
    simulate = os.environ.get("GPU_MAGIC_SIMULATE")
    if simulate:
        return (f"{NO_LOCAL_GATEWAY} (simulated: {simulate}, from GPU_MAGIC_SIMULATE). "
                f"{SHARED_POOL_ADVICE}")
    return (f"{NO_LOCAL_GATEWAY}. To try a simulated pool without GPUs, set "
            "GPU_MAGIC_SIMULATE='H100:2,A100-80GB:4' before starting JupyterLab. "
            f"{SHARED_POOL_ADVICE}")


def _unreachable_advice(target: Target) -> str:
    if target.source.startswith("local"):
        return ("The local gateway seems to have stopped (it exits after an idle hour); the next "
                "%%gpu cell starts it again.")
    return "Check that the gateway runs (`gpu-magic serve`) and that the URL is right."
