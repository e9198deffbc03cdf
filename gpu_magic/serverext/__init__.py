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
    _untrack_subshell_status(serverapp)
    serverapp.log.info("gpu_magic: sidebar API at %sgpu-magic/api/ (gateway: %s)",
                       serverapp.web_app.settings.get("base_url", "/"), proxy.describe())


# JupyterLab 4.5+ opens a kernel subshell for a widget's comms (on the control channel) when a
# widget first shows; the kernel's busy/idle for that request set the status bar to "Idle" while
# the foreground %%gpu cell that showed the widget still ran. The status of these requests says
# nothing about the kernel's work, like the kernel_info and debug requests already left out.
SUBSHELL_MESSAGE_TYPES = tuple(f"{verb}_subshell_{end}" for verb in ("create", "delete", "list")
                               for end in ("request", "reply"))


def _untrack_subshell_status(serverapp: Any) -> None:
    manager = getattr(serverapp, "kernel_manager", None)
    current = getattr(manager, "untracked_message_types", None)
    if current is None:
        return
    merged = list(current) + [t for t in SUBSHELL_MESSAGE_TYPES if t not in current]
    manager.untracked_message_types = merged
    # JupyterLab copies the list into its page config when it loads; it may have loaded first
    page = serverapp.web_app.settings.get("page_config_data")
    if isinstance(page, dict) and "untracked_message_types" in page:
        page["untracked_message_types"] = list(merged)


def __getattr__(name: str) -> Any:
    if name == "GpuMagicProxy":
        from ._proxy import GpuMagicProxy

        return GpuMagicProxy
    raise AttributeError(f"module 'gpu_magic.serverext' has no attribute {name!r}")
