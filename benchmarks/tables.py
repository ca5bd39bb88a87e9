"""What the table scripts share: mean ± std over seeds, a ``benchmarks.run`` folder's results, and one method's
seeds paired with another's. ``run``, ``protocols``, ``finetune_table``, ``recipe_table``, ``scale_trend`` and
``voc_transfer`` format their tables through these, so a one-seed row reads the same in all of them."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for a single value: no spread is known)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ms(ms: tuple[float | None, float | None] | None, digits: int = 2, signed: bool = False) -> str:
    """'mean ± std' of a ``mean_std`` pair; the mean alone when there is one value, '-' when there is none."""
    if ms is None or ms[0] is None:
        return "-"
    mean, std = ms
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def pm(values: list[float], digits: int = 2, signed: bool = False) -> str:
    """'mean ± std' of the values."""
    return fmt_ms(mean_std(values), digits, signed)


def fmt_pm(row: dict[str, Any], key: str, digits: int = 2) -> str:
    """'mean ± std' of an aggregated row's ``key`` and ``key_std`` (the mean alone when there is one seed)."""
    return fmt_ms((row.get(key), row.get(f"{key}_std")), digits)


def read_results(folder: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A ``benchmarks.run`` folder's results.json, and the methods in it that ran ok, by name."""
    summary = json.loads((Path(folder) / "results.json").read_text())
    return summary, {m["method"]: m for m in summary["methods"] if m.get("status") == "ok"}


def seed_values(entry: dict[str, Any], metric: str) -> dict[int, float]:
    """{seed: value} of one aggregated method entry of results.json."""
    return dict(zip(entry["seeds"], entry[f"{metric}_values"], strict=True))


def seed_gaps(a: dict[str, Any], b: dict[str, Any], metric: str) -> list[float]:
    """``a``'s ``metric`` minus ``b``'s, each seed against the same seed, over the seeds both ran."""
    va, vb = seed_values(a, metric), seed_values(b, metric)
    return [va[s] - vb[s] for s in sorted(va) if s in vb]
