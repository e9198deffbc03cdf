"""The sidebar's routes under ``{base_url}/gpu-magic/api/``: thin, authenticated forwards."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from ._proxy import GpuMagicProxy, ProxyError

FINAL_STATES = ("succeeded", "failed", "cancelled", "timed_out", "lost", "expired")
DEFAULT_LIMIT = 50
# Job ids are the gateway's hex; anything else never reaches it (no "../" games).
JOB_ID = r"([A-Za-z0-9_-]{1,64})"


class _Base(APIHandler):
    proxy: GpuMagicProxy

    def initialize(self, proxy: GpuMagicProxy) -> None:
        self.proxy = proxy

    def _kernel(self) -> str | None:
        """The kernel of the notebook in front (``?kernel=ID``): its own gateway, if it
        connected to one, is the one shown. Only a kernel this server runs."""
        kernel = self.get_argument("kernel", None) or None
        manager = self.settings.get("kernel_manager")
        try:
            return kernel if kernel and manager is not None and kernel in manager else None
        except Exception:  # (a manager that cannot say)
            return None

    async def _forward(self, method: str, path: str,
                       params: dict[str, str] | None = None) -> tuple[int, Any]:
        try:
            _, code, body = await self.proxy.request(method, path, params,
                                                     kernel=self._kernel())
        except ProxyError as exc:
            return exc.status, exc.body()
        return code, body

    def _answer(self, code: int, body: Any) -> None:
        self.set_status(code)
        self.finish(json.dumps(body))

    def _root(self) -> str:
        root = getattr(self.contents_manager, "root_dir", None) or self.settings.get(
            "server_root_dir", "")
        return os.path.realpath(os.path.expanduser(str(root))) if root else ""

    def _with_path(self, job: Any, root: str) -> Any:
        """Add ``notebook_path``: the notebook relative to Jupyter's root, as JupyterLab names it.

        The kernel reports the notebook's absolute path (JPY_SESSION_NAME); only this server
        knows its root, so the mapping happens here.
        """
        if not isinstance(job, dict):
            return job
        nb = (job.get("meta") or {}).get("notebook")
        job["notebook_path"] = None
        if nb and root:
            try:
                rel = Path(os.path.realpath(nb)).relative_to(root)
            except ValueError:
                pass
            else:
                job["notebook_path"] = rel.as_posix()
        return job


class StatusHandler(_Base):
    @tornado.web.authenticated
    async def get(self) -> None:
        self._answer(200, await self.proxy.status(self._kernel()))


class PoolHandler(_Base):
    @tornado.web.authenticated
    async def get(self) -> None:
        self._answer(*await self._forward("GET", "/v1/pool"))


class JobsHandler(_Base):
    @tornado.web.authenticated
    async def get(self) -> None:
        """Active jobs, then the most recent finished ones (``limit``, default 50), newest first.

        ``all=true`` asks for every user's jobs; the gateway grants that only to admin tokens
        and answers others with their own jobs. ``all`` in the answer says which it gave.
        """
        everyone = self.get_argument("all", "false").lower() in ("1", "true", "yes")
        try:
            # (the gateway takes at most a million: more is all of them anyway)
            limit = min(max(0, int(self.get_argument("limit", str(DEFAULT_LIMIT)))), 1_000_000)
        except ValueError:
            raise tornado.web.HTTPError(400, "limit must be a whole number")
        # (the gateway picks them: a week of cells is thousands of records at every poll)
        code, body = await self._forward("GET", "/v1/jobs", {"limit": str(limit), **(
            {"all": "true"} if everyone else {})})
        if code == 200 and isinstance(body, dict) and isinstance(body.get("jobs"), list):
            jobs = sorted(body["jobs"], key=lambda j: j.get("created") or 0, reverse=True)
            active = [j for j in jobs if j.get("state") not in FINAL_STATES]
            done = [j for j in jobs if j.get("state") in FINAL_STATES]
            root = self._root()
            body = {"jobs": [self._with_path(j, root) for j in active + done[:limit]],
                    # what the gateway gave, not what was asked: a user who is not an admin
                    # gets their own jobs. (False from a gateway too old to say: the panel
                    # then never labels a list as everyone's that may be the caller's own.)
                    "total": body.get("total", len(jobs)),
                    "all": everyone and body.get("all") is True,
                    # the panel times elapsed against this clock, not the browser's
                    "now": time.time()}
        self._answer(code, body)


class JobHandler(_Base):
    @tornado.web.authenticated
    async def get(self, job_id: str) -> None:
        code, body = await self._forward("GET", f"/v1/jobs/{job_id}")
        self._answer(code, self._with_path(body, self._root()) if code == 200 else body)

    @tornado.web.authenticated
    async def delete(self, job_id: str) -> None:
        """Cancel: a queued job leaves the queue, a running one is stopped."""
        code, body = await self._forward("DELETE", f"/v1/jobs/{job_id}", {"via": "sidebar"})
        self._answer(code, self._with_path(body, self._root()) if code == 200 else body)


def add_handlers(web_app: Any, proxy: GpuMagicProxy) -> None:
    base = url_path_join(web_app.settings.get("base_url", "/"), "gpu-magic", "api")
    kw = {"proxy": proxy}
    web_app.add_handlers(".*$", [
        (url_path_join(base, "status"), StatusHandler, kw),
        (url_path_join(base, "pool"), PoolHandler, kw),
        (url_path_join(base, "jobs"), JobsHandler, kw),
        (url_path_join(base, "jobs", JOB_ID), JobHandler, kw),
    ])
