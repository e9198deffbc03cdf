"""What one job and one user may use: sizes checked before any large read, counts at submit."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

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
        keep = {k: v for k, v in overrides.items() if k in ("max_jobs", "max_gpus")}
        return replace(self, **keep)


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
