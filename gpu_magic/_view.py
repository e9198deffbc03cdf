"""What a job looks like to the person who runs it: a status line updated from its events.

Shown in the cell as a display with a ``display_id`` (HTML in notebooks, text in terminals and
nbconvert), updated in place as the job goes queued → granted → running → finished.
"""

from __future__ import annotations

import html
import time
from typing import Any

from ._remote import where


class JobState:
    """The facts about one job the views show, folded from its events. Pure."""

    def __init__(self, spec: str, job_id: str | None = None) -> None:
        self.spec = spec
        self.job_id = job_id
        self.state = "submitting"
        self.grant: dict[str, Any] | None = None
        self.options: list[str] = [o.strip() for o in spec.split(",")]
        self.position: int | None = None
        self.estimate: float | None = None
        self.attempts: list[dict[str, Any]] = []
        self.timings: dict[str, Any] = {}
        self.message: str | None = None
        self.sent_bytes = 0
        self.reused = 0
        self.received_bytes = 0
        self.started_at: float | None = None
        self.bound: list[str] = []
        self.notices: list[str] = []

    def apply(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "queued":
            self.state = "queued"
            self.position = ev.get("position")
            self.estimate = ev.get("estimate")
            self.notices = list(ev.get("notices") or self.notices)
        elif kind == "granted":
            self.state = "granted"
            self.grant = ev
            self.attempts.append(ev)
        elif kind == "started":
            self.state = "running"
            self.started_at = time.monotonic()
        elif kind == "done":
            self.state = ev.get("state", "done")
            self.timings = ev.get("timings") or {}
            self.message = ev.get("message")

    def headline(self) -> str:
        g = self.grant
        if g is None:
            if self.state == "queued":
                est = f", about {self.estimate:g} s" if self.estimate else ""
                return f"queued for {self.spec} (position {self.position}{est})"
            return f"{self.state} · requested {self.spec}"
        n = len(self.options)
        text = f"{where(g)} · option {int(g.get('option_index', 0)) + 1} of {n}"
        passed = g.get("passed_over") or []
        if passed:
            text += " (" + "; ".join(f"{p['option']}: {p['reason']}" for p in passed) + ")"
        if g.get("memory_gb"):
            text += f" · {g['memory_gb']} GB"
        return text

    def summary(self) -> str:
        parts = [self.headline()]
        t = self.timings
        if self.state in ("succeeded", "failed", "cancelled", "timed_out", "lost", "expired"):
            parts.insert(0, self.state)
            if t.get("queued_s") is not None:
                parts.append(f"queued {t['queued_s']:.1f} s")
            if t.get("ran_s") is not None:
                parts.append(f"ran {t['ran_s']:.1f} s")
        elif self.state == "running" and self.started_at is not None:
            parts.insert(0, "running")
            parts.append(f"{time.monotonic() - self.started_at:.1f} s")
        if len(self.attempts) > 1:
            parts.append(f"attempt {len(self.attempts)}")
        if self.sent_bytes or self.reused:
            parts.append(f"sent {_size(self.sent_bytes)}, {self.reused} cached")
        if self.bound:
            parts.append("bound " + ", ".join(self.bound[:8]) + ("…" if len(self.bound) > 8 else ""))
        return " · ".join(parts)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


class StatusView:
    """A one-line status in the cell output, updated in place (a no-op outside IPython)."""

    def __init__(self, state: JobState, quiet: bool = False) -> None:
        self.state = state
        self._handle: Any = None
        self._quiet = quiet
        self._last = ""

    def _bundle(self) -> dict[str, str]:
        text = self.state.summary()
        sim = self.state.grant and self.state.grant.get("simulated")
        badge = (' <span style="background:#fde68a;border-radius:3px;padding:0 4px">simulated</span>'
                 if sim else "")
        return {
            "text/plain": f"[gpu] {text}",
            "text/html": f'<div class="gpu-magic-status"><b>GPU</b> {html.escape(text)}{badge}</div>',
        }

    def show(self) -> None:
        if self._quiet:
            return
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None:
            return
        self._last = self.state.summary()
        self._handle = display(self._bundle(), raw=True, display_id=True)

    def refresh(self, force: bool = False) -> None:
        if self._handle is None:
            return
        text = self.state.summary()
        if text != self._last or force:
            self._last = text
            self._handle.update(self._bundle(), raw=True)
