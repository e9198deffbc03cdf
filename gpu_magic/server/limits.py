"""What one job and one user may use: sizes checked before any large read, counts at submit;
and the per-user limits an admin set, kept in the state directory across restarts."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

OVERRIDES_FILE = "limits.json"  # in the state directory: what admins set with PUT /v1/limits
USER_KEYS = ("max_jobs", "max_gpus")

GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    max_source_chars: int = 1_000_000
    max_blob_bytes: int = 64 * GiB
    max_job_bytes: int = 256 * GiB
    max_jobs: int | None = None  # queued + running jobs per user
    max_gpus: int | None = None  # GPUs held at once per user

    def for_user(self, overrides: dict[str, Any] | None) -> Limits:
        if not overrides:
            return self
        keep = {k: v for k, v in overrides.items() if k in USER_KEYS}
        return replace(self, **keep)


def load_overrides(state_dir: Path) -> dict[str, dict[str, int]]:
    """The per-user limits admins set on this state directory, {} when none were; ValueError,
    saying what is wrong, for a file that is not what :func:`save_overrides` writes."""
    path = state_dir / OVERRIDES_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the per-user limits an admin set, {path}: {exc}") from None
    ok = isinstance(data, dict) and all(
        isinstance(name, str) and isinstance(limits, dict) and all(
            key in USER_KEYS and type(n) is int and n >= 0 for key, n in limits.items())
        for name, limits in data.items())
    if not ok:
        raise ValueError(f"{path} is not the per-user limits an admin set: it must map each user "
                         f"to {{\"max_jobs\": N, \"max_gpus\": N}} (whole numbers, 0 or more)")
    return data


def save_overrides(state_dir: Path, overrides: dict[str, dict[str, int]]) -> None:
    """Keep the per-user limits admins set for the next gateway on this state directory:
    written whole, flushed to disk and then renamed over the old file (a crash, even of the
    machine, leaves one or the other), never readable by others (0600)."""
    from .auth import write_private

    write_private(state_dir / OVERRIDES_FILE, json.dumps(overrides, sort_keys=True, indent=1))


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def seconds(value: float) -> str:
    """A time in seconds as a person writes it: 3000000, not 3e+06; 2.5 stays 2.5."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}" if abs(value) < 1e15 else f"{value:g}"
