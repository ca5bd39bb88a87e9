"""What the report and compare pages share: reading a run, self-contained HTML, PNGs embedded as base64."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..data import DataError
from ..train import read_metrics

BOOKKEEPING = ("round", "epoch", "global_epoch", "untrained")  # how a row is indexed, not what was measured

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 12px; }
.grid.wide { grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); }
figure { margin: 0; } figure img { width: 100%; } figcaption { font-size: 0.85em; color: #555; }
table { border-collapse: collapse; font-size: 0.8em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; } td.l, th.l { text-align: left; }
.scroll { overflow: auto; max-height: 520px; max-width: 100%; }
.montage img { image-rendering: pixelated; display: block; max-width: 100%; }
.montage p { margin: 10px 0 2px 0; font-size: 0.9em; }
.note { color: #666; font-size: 0.9em; }
"""


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run folder's config (config.yaml) and metrics rows (metrics.jsonl)."""
    if not (run_dir / "metrics.jsonl").is_file():
        raise DataError(f"{run_dir} holds no metrics.jsonl; give the --out folder of a deepclust train run")
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return config or {}, read_metrics(run_dir / "metrics.jsonl")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any) -> str:
    """A cell: floats to 6 significant digits, None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def table(columns: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    def cell(value: Any) -> str:
        align = ' class="l"' if isinstance(value, str) else ""  # text left, numbers right
        return f"<td{align}>{html.escape(fmt(value))}</td>"

    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_uri(fig, tight: bool = True) -> str:
    """A matplotlib figure as an embedded PNG (the figure is closed); ``tight=False`` keeps its exact size."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return png_uri(buf.getvalue())


def array_uri(image: np.ndarray) -> str:
    """(H, W, 3) uint8 as an embedded PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return png_uri(buf.getvalue())


def figure_html(uri: str, caption: str, metrics: list[str] | None = None, alt: str | None = None) -> str:
    """A figure; ``data-metrics`` names the logged keys it plots."""
    keys = f' data-metrics="{html.escape(" ".join(metrics))}"' if metrics else ""
    text = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure{keys}><img src="{uri}" alt="{html.escape(alt or caption)}">{text}</figure>'


def integer_epochs(ax, epochs: list[int]) -> None:
    """Epoch axes tick at whole epochs only (each one when there are few); one epoch gets room around it."""
    from matplotlib.ticker import MaxNLocator

    distinct = sorted(set(epochs))
    if len(distinct) == 1:
        ax.set_xlim(distinct[0] - 1, distinct[0] + 1)
    if len(distinct) <= 12:
        ax.set_xticks(distinct)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
