"""The pool and the jobs as tables: HTML in notebooks, text in terminals."""

from __future__ import annotations

import html
import time
from typing import Any


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [
        len(h) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _html(headers: list[str], rows: list[list[str]], caption: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return (f'<table class="gpu-magic-table"><caption>{html.escape(caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _pool_rows(pool: dict[str, Any]) -> tuple[list[str], list[list[str]], str]:
    headers = ["type", "free", "total", "memory", "nodes"]
    rows = []
    for t in pool.get("types", []):
        nodes = sorted({n["name"] for n in pool.get("nodes", [])
                        for g in n["gpus"] if g["type"] == t["type"]})
        held = t.get("held") or 0
        free = f"{t['free']} ({held} held for a waiting job)" if held else str(t["free"])
        rows.append([t["type"], free, str(t["total"]),
                     f"{t['memory_gb']} GB" if t.get("memory_gb") else "?", ", ".join(nodes)])
    sim = "simulated pool" if pool.get("simulated") else "pool"
    caption = f"{sim} · backend {pool.get('backend')} · {pool.get('queue_length', 0)} queued"
    return headers, rows, caption


def pool_text(pool: dict[str, Any]) -> str:
    headers, rows, caption = _pool_rows(pool)
    notes = "".join(f"\nnote: {n}" for n in pool.get("notes") or [])
    if not rows:
        return caption + "\n(no GPUs)" + notes
    return caption + "\n" + _table(headers, rows) + notes


def pool_bundle(pool: dict[str, Any]) -> dict[str, str]:
    headers, rows, caption = _pool_rows(pool)
    notes = "".join(f"<p>note: {html.escape(n)}</p>" for n in pool.get("notes") or [])
    return {"text/plain": pool_text(pool), "text/html": _html(headers, rows, caption) + notes}


def _jobs_rows(jobs: list[dict[str, Any]],
               everyone: bool = False) -> tuple[list[str], list[list[str]]]:
    headers = ["id", *(["user"] if everyone else []), "state", "spec", "granted", "queued",
               "ran", "when"]
    rows = []
    for j in sorted(jobs, key=lambda j: j.get("created") or 0, reverse=True):
        g = j.get("grant") or {}
        granted = (f"{g['gpu_type']} ×{g['count']} on {g['node']} (option {g['option_index'] + 1})"
                   + (" simulated" if g.get("simulated") else "")) if g else "-"
        created, started, finished = j.get("created"), j.get("started"), j.get("finished")
        queued = f"{(started or finished or time.time()) - created:.1f} s" if created else "-"
        # (a job lost to a crash ran until its gateway was last seen, not until the restart)
        end = j.get("ran_until") or finished or time.time()
        ran = f"{end - started:.1f} s" if started else "-"
        when = _when(created) if created else "-"
        rows.append([j["id"], *([j.get("user", "?")] if everyone else []), j["state"],
                     j.get("spec", ""), granted, queued, ran, when])
    return headers, rows


def _when(created: float, now: float | None = None) -> str:
    """When a job was submitted: the time alone today, with its date on another day (a
    listing of a week's jobs said only 14:02:11)."""
    at, today = time.localtime(created), time.localtime(time.time() if now is None else now)
    same_day = (at.tm_year, at.tm_yday) == (today.tm_year, today.tm_yday)
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M", at)


JOBS_SHOWN = 50  # finished jobs a listing shows (with every job not ended)


def _older(jobs: list[dict[str, Any]], total: int | None) -> str:
    """What a listing left out: the gateway keeps finished jobs for days (thousands)."""
    left = (total or 0) - len(jobs)
    return (f"(and {left} older finished job{'s' if left != 1 else ''}, kept for the "
            "gateway's --retention)") if left > 0 else ""


def jobs_text(jobs: list[dict[str, Any]], everyone: bool = False,
              total: int | None = None) -> str:
    """The jobs as a text table; ``everyone``: every user's (an admin's view), with a user
    column; ``total``: how many there are, when ``jobs`` is the most recent of them."""
    headers, rows = _jobs_rows(jobs, everyone)
    older = _older(jobs, total)
    return (_table(headers, rows) if rows else "(no jobs)") + (f"\n{older}" if older else "")


def jobs_bundle(jobs: list[dict[str, Any]], everyone: bool = False,
                total: int | None = None) -> dict[str, str]:
    headers, rows = _jobs_rows(jobs, everyone)
    whose = " of every user" if everyone else ""
    older = _older(jobs, total)
    return {"text/plain": jobs_text(jobs, everyone, total),
            "text/html": _html(headers, rows, f"{len(rows)} job(s){whose}")
            + (f"<p>{html.escape(older)}</p>" if older else "")}
