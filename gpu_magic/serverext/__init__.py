"""The jupyter_server extension behind the JupyterLab sidebar.

It proxies a few read-mostly routes of the configured gateway under
``{base_url}/gpu-magic/api/`` (``status``, ``pool``, ``jobs``, ``jobs/{id}``, and ``DELETE
jobs/{id}`` to cancel), so the browser talks only to Jupyter (guarded by Jupyter's own auth, and
reachable wherever JupyterLab is, proxies included) and never holds the gateway's token.

``pip install gpu-magic`` enables it through ``etc/jupyter/jupyter_server_config.d/gpu_magic.json``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GpuMagicProxy"]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "gpu_magic.serverext"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Register the sidebar's API handlers on the running Jupyter server."""
    from ._handlers import add_handlers
    from ._proxy import GpuMagicProxy

    proxy = GpuMagicProxy(parent=serverapp, log=serverapp.log)
    add_handlers(serverapp.web_app, proxy)
    serverapp.log.info("gpu_magic: sidebar API at %sgpu-magic/api/ (gateway: %s)",
                       serverapp.web_app.settings.get("base_url", "/"), proxy.describe())


def __getattr__(name: str) -> Any:
    if name == "GpuMagicProxy":
        from ._proxy import GpuMagicProxy

        return GpuMagicProxy
    raise AttributeError(f"module 'gpu_magic.serverext' has no attribute {name!r}")
