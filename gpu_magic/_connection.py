"""Which gateway to talk to: what `%gpu connect` said, else GPU_MAGIC_URL, else the local one."""

from __future__ import annotations

import os
import threading

from ._client import GatewayClient
from ._errors import GatewayError

_lock = threading.Lock()
_clients: dict[tuple[str, str | None], GatewayClient] = {}
_override: tuple[str, str | None] | None = None
_embedded: dict[str, object] | None = None


def set_connection(url: str | None, token: str | None = None) -> None:
    """Use this gateway from now on in this process (None: back to the default)."""
    global _override
    with _lock:
        _override = (url.rstrip("/"), token) if url else None


def current_target() -> tuple[str | None, str]:
    """(url or None for the local embedded gateway, how it was chosen)."""
    if _override is not None:
        return _override[0], "%gpu connect"
    url = os.environ.get("GPU_MAGIC_URL")
    if url:
        return url, "GPU_MAGIC_URL"
    return None, "local gateway"


def connect(url: str | None = None, token: str | None = None) -> GatewayClient:
    """A client for the configured gateway, starting the local one if nothing is configured."""
    if url is None and _override is not None:
        url, token = _override[0], token or _override[1]
    if url is None:
        url = os.environ.get("GPU_MAGIC_URL") or None
    if url is not None:
        token = token or os.environ.get("GPU_MAGIC_TOKEN")
        if not token:
            raise GatewayError(
                f"no token for the gateway at {url}: set GPU_MAGIC_TOKEN, or run "
                "%gpu connect URL (it asks for the token)"
            )
    else:
        info = _local_info()
        url, token = str(info["url"]), info.get("token")  # type: ignore[assignment]
    key = (url.rstrip("/"), token)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = GatewayClient(url, token)
    return client


def forget(client: GatewayClient) -> None:
    """Drop a cached client (its gateway went away)."""
    with _lock:
        for key, c in list(_clients.items()):
            if c is client:
                del _clients[key]


def _local_info() -> dict[str, object]:
    """The local gateway's runtime info; re-checked only when its process is gone or the
    wanted configuration changed (a health request per cell would cost more than the cell)."""
    global _embedded
    from ._embedded import _pid_alive, ensure_local_gateway, wanted_config

    simulate = os.environ.get("GPU_MAGIC_SIMULATE") or None
    info = _embedded
    if (
        info is None
        or info.get("config") != wanted_config(simulate)
        or not _pid_alive(int(info.get("pid", 0)))  # type: ignore[arg-type]
    ):
        info = _embedded = ensure_local_gateway(simulate)
    return info


def invalidate_local() -> None:
    """Forget the cached local gateway (a request to it failed); the next connect re-checks."""
    global _embedded
    _embedded = None
