"""What a job looks like to the person who runs it.

``JobState`` folds the job's events into the facts worth showing (pure: time is passed in).
``render_text`` and ``render_html`` turn those facts into the text and HTML forms that every front
end can show: terminal IPython, nbconvert, a notebook saved and reopened without a kernel. The
live widget (``_widget.py``) shows the same HTML and carries these forms along as its fallback.

``TextView`` is the view where widgets cannot be shown: one display, updated in place (HTML in
notebooks, text in terminals), from the job's first moments (``SHOW_AFTER_S``) to its end.
"""

from __future__ import annotations

import html
import json
import re
import sys
import time
from typing import Any

from ._remote import where

# not the job's state: this client's, once it could no longer follow the job (its end unknown)
UNREACHABLE = "unreachable"
FINAL_STATES = ("succeeded", "failed", "cancelled", "timed_out", "lost", "expired")
# A foreground job's status appears once the job has run this long, before its first output,
# or when it ends: a quick cell shows one status instead of a first one and its update (in a
# kernel each display waits for the output thread; a terminal prints each one anew).
SHOW_AFTER_S = 0.1


def display_due(state: JobState, shown_at: float, now: float, force: bool = False) -> bool:
    """Whether a status shown but not displayed yet (``SHOW_AFTER_S``) is to be displayed."""
    return force or bool(state.cancel or state.interrupt) or now - shown_at >= SHOW_AFTER_S


class JobState:
    """The facts about one job the views show, folded from its events. Pure."""

    def __init__(self, spec: str, job_id: str | None = None, *, background: bool = False) -> None:
        self.spec = spec
        self.job_id = job_id
        self.background = background
        self.state = "submitting"
        self.grant: dict[str, Any] | None = None
        # the pool is simulated: said from the first moment, not only once granted
        self.simulated = False
        self.options: list[str] = [o.strip() for o in spec.split(",")]
        self.position: int | None = None
        self.held: str | None = None  # why it waits though GPUs may be free (the user's limit)
        self.waiting_for: str | None = None  # no node can run it now: what it waits to join
        self.estimate: float | None = None
        self.dropped: list[dict[str, str]] = []
        # one entry per grant: {"attempt", "grant", "end"}; "end" says how that attempt ended
        self.attempts: list[dict[str, Any]] = []
        self.timings: dict[str, Any] = {}
        self.message: str | None = None
        self.error: str | None = None
        self.sent_bytes = 0
        self.reused = 0
        self.received_bytes = 0
        self.queued_at: float | None = None  # when it was first seen waiting in the queue
        self.created_wall: float | None = None  # its submission by the clock, when attached later
        self.started_wall: float | None = None  # its start by the clock, when attached later
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.bound: list[str] = []
        self.imported: list[str] = []  # modules the cell imported (bound too, said apart)
        self.deleted: list[str] = []
        self.kept_local: list[str] = []  # returned names not bound: reassigned here meanwhile
        self.pending: list[str] = []  # returned names waiting for a safe point to be bound
        self.pending_deleted: list[str] = []  # of those, the ones the cell deleted
        self.pending_imported: list[str] = []  # and the modules it imported
        self.notices: list[str] = []
        self.cancel: str | None = None  # who asked: "the Cancel button", "job.cancel()", ...
        self.cancelled_by: str | None = None  # an admin the gateway says cancelled it
        self.cancel_error: str | None = None
        self.interrupt: str | None = None  # who asked to interrupt the cell: "an interrupt"
        self.interrupted = False  # the cell got it (its except and finally blocks run)
        self.had_output = False  # the cell printed or displayed something
        self.interrupted_by: str | None = None  # an admin who interrupted it: "carol (admin)"
        # while its follower cannot reach the gateway and tries again: why ("connection refused")
        self.away: str | None = None
        # cancelled from here (an interrupt) and the gateway has not said it ended: its GPUs
        # are not known to be free yet
        self.ending = False

    # --- folding ---

    def apply(self, ev: dict[str, Any], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        kind = ev.get("type")
        if ev.get("simulated"):
            self.simulated = True
        if kind == "queued":
            self.state = "queued"
            if self.queued_at is None:
                self.queued_at = now
                if self.created_wall is not None and not self.attempts:  # attached later
                    self.queued_at = now - max(0.0, time.time() - self.created_wall)
            self.position = ev.get("position")
            self.estimate = ev.get("estimate")
            self.held = ev.get("held")
            self.waiting_for = ev.get("waiting_for")
            self.dropped = list(ev.get("dropped") or self.dropped)
            self.notices = list(ev.get("notices") or self.notices)
        elif kind == "granted":
            self.queued_at = None  # (a retry queues it again: its wait counts from then)
            self.state = "granted"
            self.grant = ev
            self.attempts.append({"attempt": ev.get("attempt", len(self.attempts) + 1),
                                  "grant": ev, "end": None})
        elif kind == "started":
            self.state = "running"
            self.started_at = now
            if self.started_wall is not None:  # followed again later: when it really started
                self.started_at = now - max(0.0, time.time() - self.started_wall)
        elif kind in ("stdout", "display", "update_display"):
            self.had_output = True
        elif kind == "stderr":
            self.had_output = True
            # the gateway says why an attempt ended when it retries (runner died, out of memory)
            text = str(ev.get("text", ""))
            if text.startswith("[gpu_magic]") and "retrying" in text and self.attempts:
                self.attempts[-1]["end"] = text[len("[gpu_magic]"):].strip()
        elif kind == "interrupted":
            self.interrupted = True
            self.interrupted_by = ev.get("by") or self.interrupted_by
        elif kind == "error":
            self.error = f"{ev.get('ename', 'Exception')}: {ev.get('evalue', '')}".rstrip(": ")
            self.interrupted_by = ev.get("by") or self.interrupted_by
        elif kind == "done":
            self.ending = False
            self.state = ev.get("state", "done")
            self.cancelled_by = ev.get("cancelled_by")
            self.timings = ev.get("timings") or {}
            self.message = ev.get("message")
            self.notices = list(ev.get("notices") or self.notices)
            self.finished_at = now
            if self.attempts and self.attempts[-1]["end"] is None:
                self.attempts[-1]["end"] = self.state

    def cancelled_here(self, now: float | None = None) -> None:
        """Cancelled from this side (an interrupt) before the gateway said it ended: how long it
        ran as far as is known here, and its GPUs not said to be free."""
        now = time.monotonic() if now is None else now
        self.state, self.ending, self.finished_at = "cancelled", True, now
        if self.started_at is not None:
            self.timings = {"ran_s": now - self.started_at}
        elif self.queued_at is not None:  # (as the Cancel button's end says it)
            self.timings = {"queued_s": now - self.queued_at, "total_s": now - self.queued_at}

    def _gpus(self) -> str:
        return ("its GPUs are free once the gateway has stopped it (%gpu jobs says when)"
                if self.ending else "its GPUs are released")

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def elapsed(self, now: float) -> float | None:
        """Seconds the cell has been running (None before it starts)."""
        if self.started_at is None:
            return None
        return (self.finished_at or now) - self.started_at

    # --- words ---

    def option_text(self) -> str:
        """``option 2 of 3 (H100:2: busy)``: which option of the list won, and why not earlier;
        nothing for a spec of one option (no choice was made)."""
        g = self.grant or {}
        if len(self.options) == 1:
            return ""
        text = f"option {int(g.get('option_index', 0)) + 1} of {len(self.options)}"
        passed = g.get("passed_over") or []
        if passed:
            text += " (" + "; ".join(f"{p['option']}: {p['reason']}" for p in passed) + ")"
        return text

    def headline(self) -> str:
        g = self.grant
        if g is None:
            spec = self.spec + (" on the simulated pool" if self.simulated else "")
            if self.state == "queued":
                est = f", about {self.estimate:g} s" if self.estimate else ""
                if self.held or self.waiting_for:
                    why = self.held or self.waiting_for
                    return f"queued for {spec} (position {self.position}; {why})"
                return f"queued for {spec} (position {self.position}{est})"
            if self.final or self.state == UNREACHABLE:  # said by progress(), beside this
                return f"requested {spec}"
            return f"{self.state} · requested {spec}"
        text = " · ".join(x for x in (where(g), self.option_text()) if x)
        if g.get("memory_gb"):
            text += f" · {g['memory_gb']:g} GB"
        return text

    def progress(self, now: float) -> str:
        """Where the job is now, with its times: ``running 3.2 s``, ``succeeded · ran 1.2 s``."""
        t = self.timings
        if self.final:
            parts = [self.state.replace("_", " ")]
            if t.get("queued_s") is not None:
                parts.append(f"queued {t['queued_s']:.1f} s")
            if t.get("ran_s") is not None:
                parts.append(f"ran {t['ran_s']:.1f} s")
            if t.get("total_s") is not None:
                parts.append(f"total {t['total_s']:.1f} s")
            return " · ".join(parts)
        if self.state == "running":
            ran = self.elapsed(now) or 0.0
            # (a status shown before the widget is not updated: "running 0.0 s" read as stuck)
            return f"running {_seconds(ran)}" if ran >= 1 else "running"
        if self.state == "queued":
            est = f", about {self.estimate:g} s" if self.estimate else ""
            waited = "" if self.queued_at is None else f" {_seconds(now - self.queued_at)}"
            why = self.held or self.waiting_for
            return f"queued{waited} (position {self.position}{f'; {why}' if why else est})"
        if self.state == UNREACHABLE:
            return "no longer followed"
        return self.state

    def transfer(self) -> str:
        parts = []
        if self.sent_bytes or self.reused:
            cached = f", {self.reused} input buffer{'s' if self.reused != 1 else ''} reused " \
                     "from the gateway cache" if self.reused else ""
            parts.append(f"sent {human_size(self.sent_bytes)}{cached}")
        if self.received_bytes:
            parts.append(f"received {human_size(self.received_bytes)}")
        return " · ".join(parts)

    def away_text(self) -> str:
        """While the gateway does not answer and the follower tries again."""
        if not self.away or self.final or self.state == UNREACHABLE:
            return ""
        return (f"the gateway does not answer ({self.away}): trying to reach it again; the "
                "output goes on from where it stopped if it does")

    def cancel_error_text(self) -> str:
        """A cancel that did not get through: while the job goes on, and at its end why it
        was not cancelled (a job cancelled after all, from elsewhere, needs no such line)."""
        if not self.cancel_error or self.state == "cancelled":
            return ""
        if self.final:
            return f"{self.cancel_error}; the job went on to its end"
        return self.cancel_error

    def interrupt_text(self) -> str:
        """While an interrupt is on its way to the cell, or the cell is taking it."""
        if self.interrupted_by and self.interrupted and not self.final:
            # (its user did not ask: said who did, as the gateway's message will)
            return (f"interrupted by {self.interrupted_by}: the cell is ending (its except and "
                    "finally blocks run)")
        if not self.interrupt or self.final or self.cancel:
            return ""
        if self.interrupted:
            return ("interrupted: the cell is ending (its except and finally blocks run); "
                    "interrupt again to cancel it")
        return "interrupting the cell… (interrupt again to cancel it)"

    def attempt_lines(self) -> list[str]:
        """One line per attempt, in order, when there was more than one (retries, OOM fallback)."""
        if len(self.attempts) < 2:
            return []
        lines = []
        for a in self.attempts:
            end = a["end"] or ("running" if self.state == "running" else "granted")
            lines.append(f"attempt {a['attempt']}: {where(a['grant'])} — {end}")
        return lines

    def _kept(self) -> str:
        """Where the output so far is, if the cell printed anything ("the box below" of a
        cell that printed nothing sent people looking for one)."""
        if not self.had_output:
            return ""
        return f"; the output so far is kept {'in the box below' if self.background else 'below'}"

    def outcome(self) -> str:
        """What became of the results and the output once it ended; empty while it runs."""
        if self.state == "cancelled" and self.interrupted and self.interrupted_by:
            # an admin's interrupt: its user did not ask, so nothing of the cell was bound
            return (f"interrupted by {self.interrupted_by}: {self.error or 'KeyboardInterrupt'} "
                    f"· nothing was bound (the namespace is as before){self._kept()}; "
                    f"{self._gpus()}")
        if self.state == "cancelled" and self.interrupted:
            # ended by the interrupt: bound what it had bound by then, as a local cell leaves it
            # (nothing bound: the cell had assigned nothing, or a second interrupt cancelled
            # it at once; either way, said as it is)
            names = self.bound + self.imported  # (an import is bound too)
            bound = (f"bound {_names(names)} (what the cell had assigned when it was "
                     "interrupted)" if names else "nothing was bound")
            return (f"cancelled by an interrupt: {self.error or 'KeyboardInterrupt'} · {bound}; "
                    f"{self._gpus()}")
        if self.state == "cancelled":
            who = self.cancel or self.cancelled_by
            who = f" by {who}" if who else ""
            if self.bound:
                return f"cancelled{who} after its results arrived: bound {_names(self.bound)}"
            if self.grant is None:
                return f"cancelled{who} before it was granted a GPU: nothing ran, nothing was bound"
            return (f"cancelled{who}: nothing was bound (the namespace is as before)"
                    f"{self._kept()}; {self._gpus()}")
        if self.state in ("timed_out", "lost", "expired"):
            message = self.message or self.state.replace("_", " ")
            if not self.background:
                # the error raised just below says it all, with what to do: said twice, the
                # advice read as two problems
                message = first_sentence(message)
            return then(message, "nothing was bound")
        if self.state == UNREACHABLE:
            message = self.message or ""
            return message if "nothing was bound" in message else then(message,
                                                                        "nothing was bound")
        if self.state == "failed":
            return then(self.error or self.message or "failed", "nothing was bound")
        if self.state != "succeeded":
            return ""
        parts = []
        if self.pending:
            binds = [n for n in self.pending
                     if n not in self.pending_deleted and n not in self.pending_imported]
            will = [f"bind {_names(binds)}"] if binds else []
            if self.pending_imported:
                will.append(f"import {_names(self.pending_imported)}")
            if self.pending_deleted:
                will.append(f"delete {_names(self.pending_deleted)}")
            # (as it will say once done: "bound z · imported os, time · deleted scores")
            parts.append(f"will {' · '.join(will)} before the next cell runs "
                         "(or at job.wait())")
        if self.bound:
            parts.append(f"bound {_names(self.bound)}")
        if self.imported:
            parts.append(f"imported {_names(self.imported)}")
        if self.deleted:
            parts.append(f"deleted {_names(self.deleted)}")
        if self.kept_local:
            parts.append(f"kept your {_names(self.kept_local)} (reassigned since submitting; "
                         "the job's value is in job.result)")
        return " · ".join(parts)


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def first_sentence(text: str) -> str:
    """Up to the first full stop that a capital follows (``2.5 s`` and ``e.g.`` go on)."""
    found = re.search(r"\.\s+(?=[A-Z%])", text)
    return text[:found.start() + 1] if found else text


def then(text: str, clause: str) -> str:
    """``text; clause``, or ``text. Clause.`` after a sentence that ended: never ``.;``."""
    text = text.rstrip()
    if text.endswith((".", "!", "?")):
        return f"{text} {clause[:1].upper()}{clause[1:]}."
    return f"{text}; {clause}"


def cancelled_text(subject: str, who: str, message: str | None) -> str:
    """``GPU job 1f2e was cancelled by an interrupt while queued; nothing ran``: the gateway's
    message says 'cancelled' itself, which is not said twice."""
    detail = (message or "").strip()
    if detail.lower().startswith("cancelled"):
        detail = detail[len("cancelled"):]
    detail = detail.strip()
    if who.strip() and detail.startswith(who.strip()):  # (the gateway names who too now)
        detail = detail[len(who.strip()):].strip()
    text = f"{subject} was cancelled{who}"
    if detail.startswith((":", ";", ",")):
        return text + detail
    return f"{text} {detail}" if detail else text


def _names(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + ("…" if len(names) > most else "")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):  # (powers of 1024, named so: as --dry-run says)
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# --- the text and HTML forms ---

def render_text(state: JobState, now: float) -> str:
    """The text form: a first line with where it stands and the grant, then the details."""
    first = [state.headline()]
    if state.final or state.state in ("running", "granted", UNREACHABLE):
        first.insert(0, state.progress(now))
    lines = ["[gpu] " + " · ".join(first)]
    details = [state.transfer(), *state.attempt_lines(), state.outcome(), state.away_text()]
    details.append(state.interrupt_text())
    if state.cancel and not state.final:
        details.append(f"cancelling ({state.cancel})")
    details.append(state.cancel_error_text())
    details += [f"note: {n}" for n in state.notices]
    details += [f"dropped {d['option']}: {d['reason']}" for d in state.dropped]
    lines += [f"      {d}" for d in details if d]
    return "\n".join(lines)


# JupyterLab's theme colours (a dark theme lightens them), each after its fixed colour: the
# sanitizer of an untrusted notebook drops a var() declaration whole, fallback and all
def _themed(prop: str, var: str, fixed: str) -> str:
    return f"{prop}:{fixed};{prop}:var({var},{fixed})"


_OK, _BAD, _WARN = (("--jp-success-color1", "#15803d"), ("--jp-error-color1", "#b91c1c"),
                    ("--jp-warn-color1", "#92400e"))
_BLUE, _MUTED, _FAINT = (("--jp-brand-color1", "#1d4ed8"), ("--jp-ui-font-color2", "#4b5563"),
                         ("--jp-ui-font-color3", "#6b7280"))
_STATE_COLOURS = {"succeeded": _OK, "failed": _BAD, "cancelled": _WARN, "timed_out": _BAD,
                  "lost": _BAD, "expired": _WARN, "running": _BLUE, "queued": _MUTED,
                  "granted": _BLUE, UNREACHABLE: _WARN}


def _colour(theme: tuple[str, str]) -> str:
    return _themed("color", *theme)


_BADGE = ('<span class="gpu-magic-badge" style="background:#fde68a;color:#713f12;'
          'border-radius:3px;padding:0 4px;margin-left:6px;font-size:0.85em">simulated</span>')


def _detail_rows(state: JobState, outcome: bool = False) -> list[str]:
    """The HTML rows below the status line: attempts, away, interrupt, cancelling, the outcome
    (``outcome``), notes and dropped options."""
    e = html.escape
    rows = []
    attempts = state.attempt_lines()
    if attempts:
        rows.append('<ol class="gpu-magic-attempts" style="margin:2px 0 2px 1.2em;padding:0">'
                    + "".join(f"<li>{e(a.split(': ', 1)[1])}</li>" for a in attempts) + "</ol>")
    if state.away_text():
        rows.append(f'<div class="gpu-magic-away" style="{_colour(_WARN)}">'
                    f"{e(state.away_text())}</div>")
    if state.interrupt_text():
        rows.append(f"<div>{e(state.interrupt_text())}</div>")
    if state.cancel and not state.final:
        rows.append(f"<div>cancelling ({e(state.cancel)})…</div>")
    cancel_error = state.cancel_error_text()
    if cancel_error:
        rows.append(f'<div style="{_colour(_BAD)}">{e(cancel_error)}</div>')
    if outcome and state.outcome():
        rows.append(f'<div class="gpu-magic-outcome">{e(state.outcome())}</div>')
    for n in state.notices:
        rows.append(f'<div style="{_colour(_WARN)}">note: {e(n)}</div>')
    for d in state.dropped:
        rows.append(f'<div style="{_colour(_FAINT)}">dropped {e(d["option"])}: {e(d["reason"])}</div>')
    return rows


def render_html(state: JobState, now: float, *, compact: bool = False) -> str:
    """The HTML form: the grant as the headline, then progress, transfer, attempts, outcome.

    ``compact``: one line, for a job that finished before a widget was worth showing.
    """
    e = html.escape
    g = state.grant
    colour = _STATE_COLOURS.get(state.state, ("--jp-ui-font-color1", "#374151"))
    status = (f'<span class="gpu-magic-state" style="{_colour(colour)};font-weight:600">'
              f"{e(state.progress(now))}</span>")
    if g is None:
        head = f"requested <b>{e(state.spec)}</b>" + (_BADGE if state.simulated else "")
    else:
        head = (f'<b class="gpu-magic-grant">{e(str(g.get("gpu_type")))} ×{e(str(g.get("count")))}'
                f"</b> on <b>{e(str(g.get('node')))}</b>")
        if state.option_text():
            head += f" · {e(state.option_text())}"
        if g.get("memory_gb"):  # ("each" of one GPU read oddly)
            head += f" · {g['memory_gb']:g} GB" + (" each" if g.get("count", 1) > 1 else "")
        if g.get("simulated"):
            head += _BADGE
    if compact:
        rest = " · ".join(x for x in (state.transfer(), state.outcome()) if x)
        tail = f" · {e(rest)}" if rest else ""
        # one line, unless the job has more to say (a note, its attempts): said beneath it,
        # as the text form says it
        more = "".join(_detail_rows(state))
        return f'<div class="gpu-magic-status"><b>GPU</b> {status} · {head}{tail}{more}</div>'
    rows = [f'<div style="font-size:1.05em"><b>GPU</b> {head}</div>', f"<div>{status}</div>"]
    if state.transfer():
        rows.append(f'<div style="{_colour(_MUTED)}">{e(state.transfer())}</div>')
    rows += _detail_rows(state, outcome=True)
    if state.job_id:
        rows.append(f'<div style="{_colour(_FAINT)};font-size:0.85em">job {e(state.job_id)}</div>')
    return (f'<div class="gpu-magic-status" style="border-left:3px solid {colour[1]};'
            f'border-left-color:var({colour[0]},{colour[1]});padding:2px 8px;line-height:1.45">'
            + "".join(rows) + "</div>")


def bundle(state: JobState, now: float, *, compact: bool = False) -> dict[str, str]:
    """The text and HTML forms together, as a display bundle."""
    return {"text/plain": render_text(state, now),
            "text/html": render_html(state, now, compact=compact)}


# --- a background job's output, as a saved notebook keeps it ---
# Its live output area is a widget, which a notebook opened again shows as "model not found"
# (front ends keep no widget state by default): once the job ends its display becomes these.

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
_BACKSPACED = re.compile(r"[^\x08\n]\x08")
_IMAGES = ("image/png", "image/jpeg", "image/gif", "image/webp")
_PRE = ("margin:0;white-space:pre-wrap;word-break:break-word;"
        "font-family:var(--jp-code-font-family,monospace);font-size:var(--jp-code-font-size,13px)")
_STDERR = _themed("background", "--jp-rendermime-error-background", "#fdd") + ";"
# what the saved form keeps of a job's output: its whole output is in job.output (text) and in
# the cell's live output area while it runs; a notebook holding 100 MB of it would not open
SAVED_MAX = 4 << 20
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                   "source", "track", "wbr"})


def _joined(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def as_shown(text: str) -> str:
    """Stream text as a terminal leaves it: colour codes and hyperlinks dropped, a backspaced
    character gone, and a line rewritten with ``\r`` (a progress bar) in its last form."""
    text = _ANSI.sub("", text)
    while "\x08" in text:
        shorter = _BACKSPACED.sub("", text)
        if shorter == text:
            text = text.replace("\x08", "")
            break
        text = shorter
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))


def _balanced(markup: str) -> str:
    """``markup`` with the elements it leaves open closed at its end: one output's unclosed
    ``<table><td>`` took every later output into its cell (JupyterLab renders each output
    apart; here they share one piece of HTML)."""
    from html.parser import HTMLParser

    open_tags: list[str] = []

    class Opened(HTMLParser):
        def handle_starttag(self, tag: str, attrs: Any) -> None:
            if tag not in _VOID:
                open_tags.append(tag)

        def handle_endtag(self, tag: str) -> None:
            if tag in open_tags:
                del open_tags[len(open_tags) - 1 - open_tags[::-1].index(tag):]

    try:
        parser = Opened(convert_charrefs=False)
        parser.feed(markup)
        parser.close()
    except Exception:  # (never fatal: at worst as it came)
        return markup
    return markup + "".join(f"</{t}>" for t in reversed(open_tags))


def _capped(text: str, room: list[int]) -> tuple[str, bool]:
    """At most what ``room`` has left of SAVED_MAX; whether some was left out."""
    keep = text[:max(0, room[0])]
    room[0] -= len(keep)
    return keep, len(keep) < len(text)


def _left_out() -> str:
    return (f"[gpu_magic] the output goes on: its first {human_size(SAVED_MAX)} are kept here "
            "(job.output has all the text the job printed)\n")


def outputs_text(outputs: list[dict[str, Any]]) -> str:
    """What the outputs read as text: the streams, and each display's text/plain."""
    parts, room = [], [SAVED_MAX]
    for o in outputs:
        if o.get("output_type") == "stream":
            text = as_shown(o.get("text", ""))
        elif "text/plain" in (o.get("data") or {}):
            text = _ANSI.sub("", _joined(o["data"]["text/plain"])).rstrip("\n") + "\n"
        else:
            continue
        kept, cut = _capped(text, room)
        parts.append(kept)
        if cut:
            parts.append(("\n" if kept and not kept.endswith("\n") else "")
                         + _left_out())
            break
    return "".join(parts)


def _display_html(data: dict[str, Any], metadata: dict[str, Any]) -> str:
    if "text/html" in data:
        return f"<div>{_balanced(_joined(data['text/html']))}</div>"
    for mime in _IMAGES:
        if mime in data:
            size = metadata.get(mime) if isinstance(metadata.get(mime), dict) else {}
            attrs = "".join(f' {k}="{int(size[k])}"' for k in ("width", "height")
                            if isinstance(size.get(k), (int, float)))
            b64 = html.escape("".join(_joined(data[mime]).split()), quote=True)
            return f'<img src="data:{mime};base64,{b64}"{attrs} alt="{mime}">'
    if "image/svg+xml" in data:
        return f"<div>{_balanced(_joined(data['image/svg+xml']))}</div>"
    for mime in ("text/markdown", "text/latex", "text/plain"):
        if mime in data:
            return f'<pre style="{_PRE}">{html.escape(_ANSI.sub("", _joined(data[mime])))}</pre>'
    for mime, value in data.items():  # application/json and the like: shown as JSON
        if mime.endswith("json"):
            return f'<pre style="{_PRE}">{html.escape(json.dumps(value, indent=1))}</pre>'
    return ""


def outputs_html(outputs: list[dict[str, Any]]) -> str:
    """The outputs as one piece of HTML: streams as preformatted text (stderr tinted), displays
    by their richest form HTML can hold (HTML, an image, else their text)."""
    parts, room = [], [SAVED_MAX]
    for o in outputs:
        if o.get("output_type") == "stream":
            tint = _STDERR if o.get("name") == "stderr" else ""
            text, cut = _capped(as_shown(o.get("text", "")), room)
            parts.append(f'<pre style="{tint}{_PRE}">{html.escape(text)}</pre>')
        elif o.get("output_type") in ("display_data", "execute_result"):
            shown = _display_html(o.get("data") or {}, o.get("metadata") or {})
            cut = len(shown) > room[0]
            room[0] -= len(shown)
            parts.append("" if cut else shown)
        else:
            continue
        if cut:
            parts.append(f'<pre style="{_PRE}">{html.escape(_left_out())}</pre>')
            break
    if not any(parts):
        return ""
    return '<div class="gpu-magic-output" style="margin-top:4px">' + "".join(parts) + "</div>"


# --- views ---

class NullView:
    """No display at all (``--quiet``, or plain Python outside IPython)."""

    has_output_area = False
    _reshow = False  # a clear_output(wait=True) will clear the status with the next output

    def __init__(self, state: JobState) -> None:
        self.state = state
        # a display the cell already shows (what it sends, while large inputs go up): the
        # status takes its place instead of appearing below it
        self.first: Any = None
        self._said = False  # (its notes said on stderr, for a view that shows none)

    def _show_status(self, data: dict[str, Any]) -> Any:
        """Display ``data`` as the status (in ``first`` when there is one); its handle."""
        from IPython.display import display

        first, self.first = self.first, None
        if first is not None:
            first.update(data, raw=True)
            return first
        return display(data, raw=True, display_id=True)

    def show(self) -> None:
        pass

    def refresh(self, force: bool = False) -> None:
        pass

    def tick(self) -> None:
        pass

    def finish(self) -> None:
        """No status shows the job's notes and the options it dropped (why no larger GPU
        was tried, why ``T4:2`` could never be granted): said once on stderr instead, as
        the notes on names not brought back are."""
        if self._said:
            return
        self._said = True
        lines = [f"note: {n}" for n in self.state.notices]
        lines += [f"dropped {d['option']}: {d['reason']}" for d in self.state.dropped]
        for line in lines:
            print(f"[gpu_magic] {line}", file=sys.stderr)

    def reopen(self) -> None:
        pass

    def append_output(self, ev: dict[str, Any]) -> None:
        pass

    def before_output(self) -> None:
        """The cell is about to show output of its own (the status stays above it)."""

    def after_clear(self, wait: bool = False) -> None:
        """The cell cleared its output (``clear_output``), and with it the status above; with
        ``wait``, the front end clears only when the next output comes."""

    def before_value(self) -> None:
        """The cell's value or error is shown next: if a ``clear_output(wait=True)`` waits for
        it, it would clear the status with it, so the status is shown again first."""
        if self._reshow:
            self.before_output()

    def comm_ids(self) -> set[str]:
        return set()


class TextView(NullView):
    """The text/HTML status where widgets cannot be shown, one display updated in place.

    It changes only when the job moves on (queued, granted, running, ended), never to tick a
    clock, and never to say again what it says already: a terminal prints every update anew.
    """

    def __init__(self, state: JobState) -> None:
        super().__init__(state)
        self._handle: Any = None
        self._last: tuple[Any, ...] = ()
        self._text = ""  # the text form last displayed
        self._shown_at: float | None = None  # shown, not displayed yet (see SHOW_AFTER_S)
        self._reshow = False  # a clear_output(wait=True) will clear it with the next output

    def _key(self) -> tuple[Any, ...]:
        s = self.state
        moved = "running" if s.state == "granted" else s.state  # granted → running: one step
        # names bound while the job still runs: its end, right after, says so
        bound = tuple(s.bound) if s.final else ()
        return (moved, s.position, len(s.attempts), s.cancel, s.cancel_error, bound,
                tuple(s.pending), tuple(s.pending_deleted), tuple(s.pending_imported),
                s.interrupt, s.interrupted,
                s.interrupted_by)

    def _bundle(self) -> dict[str, Any]:
        self._last = self._key()
        data = bundle(self.state, time.monotonic())
        self._text = data.get("text/plain", "")
        return data

    def show(self) -> None:
        from IPython import get_ipython

        if get_ipython() is not None:
            self._shown_at = time.monotonic()
            if self.state.background:  # it returns at once: say so now
                self._display_pending()

    def before_output(self) -> None:
        self._display_pending()
        if self._reshow:  # this display is the output a clear_output(wait=True) waited for
            self._reshow = False
            self._handle.display(self._bundle(), raw=True)

    def after_clear(self, wait: bool = False) -> None:
        from IPython import get_ipython

        # in a kernel the front end cleared the status with the cell's output: show it again
        # (same display id, so its updates still land); a terminal only cleared a line
        if self._handle is not None and getattr(get_ipython(), "kernel", None) is not None:
            if wait:
                self._reshow = True  # shown now, it would itself be the output waited for
            else:
                self._handle.display(self._bundle(), raw=True)

    def _display_pending(self) -> None:
        if self._shown_at is not None:
            self._shown_at = None
            self._handle = self._show_status(self._bundle())

    def tick(self) -> None:
        if self._shown_at is not None and display_due(self.state, self._shown_at,
                                                      time.monotonic()):
            self._display_pending()

    def refresh(self, force: bool = False) -> None:
        if self._shown_at is not None:
            if display_due(self.state, self._shown_at, time.monotonic(), force):
                self._display_pending()
            return
        if self._handle is None:
            return
        if self._key() != self._last:
            self._handle.update(self._bundle(), raw=True)
        elif force:  # the end: only if it says something new (a terminal prints it anew)
            data = bundle(self.state, time.monotonic())
            if data.get("text/plain") != self._text:
                self._text = data.get("text/plain", "")
                self._handle.update(data, raw=True)

    def finish(self) -> None:
        self.refresh(force=True)

    def reopen(self) -> None:
        self.refresh(force=True)
