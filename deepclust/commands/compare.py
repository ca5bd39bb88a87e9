"""``deepclust compare RUN_DIR...``: the runs' final metrics in one table (Markdown on stdout, HTML beside it)
and their kNN curves overlaid in one plot."""

from __future__ import annotations

import argparse
import html
from pathlib import Path
from typing import Any

from .pages import (
    BOOKKEEPING,
    figure_html,
    figure_uri,
    fmt,
    integer_epochs,
    is_number,
    page,
    pyplot,
    read_run,
    table,
)

LEADING = ("knn_top1", "knn_untrained", "loss", "nmi_labels", "nmi_prev", "label_change")


def final_metrics(config: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the last value the run logged (kNN of the untrained network apart); times summed."""
    trained = [r for r in rows if not r.get("untrained")]
    out: dict[str, Any] = {"method": config.get("method"), "backbone": config.get("backbone"),
                           "data": config.get("data"),
                           "epochs": max((r.get("global_epoch", -1) for r in trained), default=-1) + 1}
    base = next((r.get("knn_top1") for r in rows if r.get("untrained")), None)
    for row in trained:
        for key, value in row.items():
            if key not in BOOKKEEPING and is_number(value) and key != "time" and not key.endswith("_time"):
                out[key] = value
    if base is not None:
        out["knn_untrained"] = base
    times = [r["time"] for r in trained if is_number(r.get("time"))]
    if times:
        out["train_seconds"] = sum(times)
    return out


def run_names(dirs: list[Path]) -> list[str]:
    names = [d.name for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def markdown(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def curves(dirs_rows: list[tuple[str, list[dict[str, Any]]]], key: str, title: str) -> str | None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    drawn: list[int] = []
    for name, rows in dirs_rows:
        points = [(r["global_epoch"] + 1, r[key]) for r in rows if is_number(r.get(key)) and "global_epoch" in r]
        if points:
            x, y = zip(*sorted(points), strict=True)  # the untrained row (epoch -1) plots at epoch 0
            ax.plot(x, y, marker="o" if len(points) < 30 else None, ms=3, label=name)
            drawn += x
    if not drawn:
        pyplot().close(fig)
        return None
    ax.set_xlabel("epoch (0: the untrained network)" if key == "knn_top1" else "epoch")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    integer_epochs(ax, drawn)
    ax.legend(fontsize=8)
    return figure_html(figure_uri(fig), "", [key], alt=title)


def compare(dirs: list[Path]) -> tuple[str, str]:
    """(Markdown table, HTML page) of the runs in ``dirs``."""
    runs = [read_run(d) for d in dirs]
    names = run_names(dirs)
    finals = [final_metrics(config, rows) for config, rows in runs]
    keys: list[str] = []
    for f in finals:
        keys += [k for k in f if k not in keys]
    columns = ["run", *[k for k in ("method", "backbone", "data", "epochs", *LEADING, "train_seconds") if k in keys]]
    columns += [k for k in keys if k not in columns]
    rows = [[name, *[f.get(c) for c in columns[1:]]] for name, f in zip(names, finals, strict=True)]
    named = list(zip(names, [r for _, r in runs], strict=True))
    plots = [p for p in (curves(named, "knn_top1", "kNN top-1 (%)"), curves(named, "loss", "training loss")) if p]
    body = (f"<h1>deepclust: {len(dirs)} runs compared</h1><p class='sub'>"
            + html.escape(", ".join(str(d.resolve()) for d in dirs)) + "</p><h2>Final metrics</h2><div class='scroll'>"
            + table(columns, rows) + "</div><h2>Curves</h2><div class='grid'>" + "".join(plots) + "</div>")
    return markdown(columns, rows), page("deepclust: runs compared", body)


def run(args: argparse.Namespace) -> int:
    text, page_html = compare([Path(d) for d in args.run_dirs])
    print(text)
    out = Path(args.html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page_html)
    print(f"\nwrote {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="the final metrics of runs in one table, their kNN curves in one plot")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="deepclust train --out folders, one row each")
    p.add_argument("--html", default="compare.html", help="where to write the HTML page (default: compare.html)")
