"""Benchmark harness: train every method under one fixed profile, evaluate it, tabulate.

    python -m benchmarks.run --profile smoke|cpu|medium|paper [--methods m1,m2] [--seeds 0,1,2] [--jobs J]
                             [--set key=value ...] [--data SPEC] [--test-data SPEC]
                             [--epochs N | --max-epochs N] [--threads T] [--timeout S] --out DIR

Each (method, seed) runs in its own subprocess (``--one METHOD --seed S``, so peak RSS is its own), trains
through ``deepclust.config.resolve`` + ``deepclust.train.train`` into DIR/METHOD/seedS, then evaluates the
final checkpoint: kNN top-1 (the trainer's last metrics row), a linear probe on pooled features and
clustering metrics on the method's eval features of the test set. The parent aggregates the seeds of each
method (mean ± std), compares every method with the untrained network (``random``) against the seed
spread, writes DIR/results.json, DIR/results.md and DIR/knn_curves.png, and exits 1 naming every failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from .hostload import CpuWatch, busy_note
from .profiles import PAPER_KNN, PAPER_KNN_HEADER, PROFILES
from .tables import fmt, fmt_pm, mean_std

REPO = Path(__file__).resolve().parents[1]
REFERENCE = "supervised"  # epoch times are given relative to this method's
UNTRAINED = "random"  # quality is given relative to this method's (the untrained network)
QUALITY = ("knn_top1", "linear_top1", "nmi", "ari", "acc")  # aggregated as mean ± std over seeds
PATH_KEYS = ("data", "test_data")

log = logging.getLogger("benchmarks")


# ---------------------------------------------------------------------------------------------- config


def method_order(available: list[str]) -> list[str]:
    """Every method in METHODS' order, with the reference first (its epoch time is the unit)."""
    return ([REFERENCE] if REFERENCE in available else []) + [m for m in available if m != REFERENCE]


def resolve_repo_path(value: Any) -> Any:
    """A profile's relative filesystem path ('../shared/...') is relative to the repository root."""
    if not isinstance(value, str) or Path(value).is_absolute():
        return value
    if value.startswith(("./", "../")):
        return os.path.normpath(REPO / value)
    return value


def build_layers(profile: str, method: str, args: argparse.Namespace) -> tuple[list[dict], dict, list[str]]:
    """Config layers for ``method``: profile < per-method override < command line.

    Returns (layers, applied per-method override, dropped override keys). Override keys the method
    does not accept are dropped (resolve() would reject them) and reported, never passed.
    """
    from deepclust.config import TrainConfig, field_types, parse_overrides
    from deepclust.methods import METHODS

    spec = PROFILES[profile]
    base = {k: resolve_repo_path(v) if k in PATH_KEYS else v for k, v in spec["train"].items()}
    if args.data is not None:  # a new training source: its test split, unless one is given
        base["data"], base["test_data"] = args.data, args.test_data
    elif args.test_data is not None:
        base["test_data"] = args.test_data
    valid = set(field_types(TrainConfig)) | set(field_types(METHODS[method].Config))
    override = spec["methods"].get(method, {})
    applied = {k: v for k, v in override.items() if k in valid}
    dropped = sorted(k for k in override if k not in valid)
    cli = {"method": method, "out": str(unit_dir(args.out, method, args.seed))}
    if args.seed is not None:
        cli["seed"] = args.seed
    if args.epochs is not None:
        cli["epochs"] = args.epochs
    if args.max_epochs is not None:
        if "stop_after" not in valid:
            raise ValueError("--max-epochs needs the trainer key stop_after, which this deepclust lacks; "
                             "use --epochs")
        cli["stop_after"] = args.max_epochs
    extra = parse_overrides(args.set or [])
    unknown = sorted(k for k in extra if k not in valid)
    if unknown:  # a --set key this method lacks applies to the methods that have it
        dropped += [f"{k} (--set)" for k in unknown]
    # "{seed}" in a --set value is this run's seed: e.g. init=runs/base/is/seed{seed}/checkpoint.pt starts each
    # seed from the network of the same seed (the finetune profile)
    cli.update({k: v.replace("{seed}", str(args.seed)) if isinstance(v, str) and args.seed is not None else v
                for k, v in extra.items() if k in valid})
    return [base, applied, cli], applied, dropped


def unit_dir(out: str | Path, method: str, seed: int | None) -> Path:
    """Where one (method, seed) run writes: OUT/METHOD/seedS (OUT/METHOD without a seed)."""
    return Path(out) / method / f"seed{seed}" if seed is not None else Path(out) / method


# ---------------------------------------------------------------------------------------------- child


def peak_rss_mb() -> float:
    """Process-wide peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def evaluate(cfg, device, need_knn: bool) -> dict[str, Any]:
    """Linear probe (pooled, un-normalised) and clustering metrics (eval feature) of the final checkpoint.

    kNN top-1 too when ``need_knn`` (a run cut short by stop_after logs none for its last epoch).
    """
    from deepclust.checkpoint import backbone_from_checkpoint, load_checkpoint
    from deepclust.data import load_train_test
    from deepclust.eval import evaluate_backbone

    payload = load_checkpoint(Path(cfg.out) / "checkpoint.pt")
    model = backbone_from_checkpoint(payload).to(device)
    size = payload["backbone"]["image_size"]
    train, test = load_train_test(cfg.data, cfg.test_data, size, cfg.bad_images, cfg.subset, cfg.test_subset)
    if test is None:
        raise ValueError(f"no test split for data {cfg.data!r}; pass --test-data")
    protocols = ("linear", "cluster", "knn") if need_knn else ("linear", "cluster")
    out: dict[str, Any] = {"eval_feature": payload["eval_feature"], "train_images": len(train),
                           "test_images": len(test)}
    out.update(evaluate_backbone(model, train, test, payload["eval_feature"], protocols, device,
                                 cfg.knn_k, cfg.knn_tau))
    if need_knn:
        out["knn_source"] = "harness (the last metrics row had none)"
    return out


def finish_curve(result: dict[str, Any]) -> None:
    """A kNN top-1 the harness computed (run cut short) ends the curve at the last epoch run."""
    if result.get("knn_source") and result.get("knn_top1") is not None:
        result["knn_curve"].append([result.get("epochs_run", 0), result["knn_top1"]])


def run_one(args: argparse.Namespace) -> int:
    """Train and evaluate one method in this process; write DIR/METHOD/result.json. 0 when all went well."""
    import torch

    from deepclust.config import as_dict, resolve
    from deepclust.methods import METHODS
    from deepclust.train import read_metrics, resolve_device, train

    method = args.one
    mdir = unit_dir(args.out, method, args.seed)
    mdir.mkdir(parents=True, exist_ok=True)
    result_path = mdir / "result.json"
    result_path.unlink(missing_ok=True)
    t_start, watch = time.perf_counter(), CpuWatch()
    result: dict[str, Any] = {"method": method, "seed": args.seed, "status": "failed", "stage": "config"}
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    result.update(rss_after_imports_mb=peak_rss_mb(), load_average_start=os.getloadavg())
    try:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        cls = METHODS[method]
        result.update(views=cls.views, trains=cls.trains)
        layers, applied, dropped = build_layers(args.profile, method, args)
        result.update(overrides=applied, dropped_overrides=dropped)
        cfg, hparams = resolve(layers)
        result["config"] = as_dict(cfg, hparams)
        device = resolve_device(cfg.device)
        result.update(device=str(device), torch_threads=torch.get_num_threads())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result["stage"] = "train"
        t0 = time.perf_counter()
        # A rerun recomputes the unit (an old run there is moved aside, kept), unless --resume continues it.
        train(cfg, hparams, resume=args.resume, overwrite=not args.resume)
        result["train_wall_s"] = time.perf_counter() - t0
        result["peak_rss_train_mb"] = peak_rss_mb()
        if cuda:
            result["gpu_peak_train_mb"] = torch.cuda.max_memory_allocated() / 2**20
        rows = read_metrics(mdir / "metrics.jsonl")
        untrained = next((r["knn_top1"] for r in rows if r.get("untrained")), None)
        rows = [r for r in rows if not r.get("untrained")]
        times = [r["time"] for r in rows if "time" in r]
        result.update(
            epochs_run=len(times),
            epoch_times_s=times,
            epoch_time_median_s=statistics.median(times) if times else None,
            targets_time_median_s=statistics.median(r.get("targets_time", 0.0) for r in rows) if times else None,
            knn_top1=rows[-1].get("knn_top1") if rows else None,
            knn_untrained=untrained,
            knn_curve=([[0, untrained]] if untrained is not None else [])
            + [[r["global_epoch"] + 1 if "time" in r else r["global_epoch"], r["knn_top1"]]
               for r in rows if r.get("knn_top1") is not None],
            label_change_curve=[[r["global_epoch"] + 1, r["label_change"]] for r in rows if "label_change" in r],
            last_row={k: v for k, v in rows[-1].items() if isinstance(v, (int, float, str))} if rows else {},
        )
        result["stage"] = "eval"
        t0 = time.perf_counter()
        result.update(evaluate(cfg, device, need_knn=result["knn_top1"] is None))
        result["eval_wall_s"] = time.perf_counter() - t0
        finish_curve(result)
        result["status"] = "ok"
        del result["stage"]
    except Exception as err:  # report any failure as a result, never as a hole
        traceback.print_exc()
        result["error"] = f"{result['stage']}: {type(err).__name__}: {err}".strip()
    finally:
        result["peak_rss_mb"] = peak_rss_mb()
        result["load_average_end"] = os.getloadavg()
        result["other_cores"] = watch.other_cores()
        if cuda:
            result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["wall_s"] = time.perf_counter() - t_start
        result_path.write_text(json.dumps(result, indent=1))
    return 0 if result["status"] == "ok" else 1


# ---------------------------------------------------------------------------------------------- parent


def child_command(args: argparse.Namespace, method: str, seed: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.run", "--one", method, "--profile", args.profile, "--out", args.out]
    for flag, value in (("--data", args.data), ("--test-data", args.test_data), ("--epochs", args.epochs),
                        ("--max-epochs", args.max_epochs), ("--threads", args.threads), ("--seed", seed)):
        if value is not None:
            cmd += [flag, str(value)]
    for pair in args.set or []:
        cmd += ["--set", pair]
    if args.resume:
        cmd.append("--resume")
    return cmd


def log_tail(path: Path, lines: int = 3) -> str:
    if not path.is_file():
        return ""
    text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:])


def run_child(args: argparse.Namespace, method: str, seed: int | None) -> dict[str, Any]:
    mdir = unit_dir(args.out, method, seed)
    mdir.mkdir(parents=True, exist_ok=True)
    result_path = mdir / "result.json"
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    failure = None
    with open(mdir / "log.txt", "w") as logf:
        try:
            proc = subprocess.run(child_command(args, method, seed), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                  timeout=args.timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc, failure = None, f"timed out after {args.timeout} s"
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {"method": method, "seed": seed, "status": "failed"}
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
        except json.JSONDecodeError as err:
            failure = failure or f"unreadable result.json ({err})"
    if failure or result.get("status") != "ok":
        result["status"] = "failed"
        result["error"] = failure or result.get("error") or (
            f"exit code {rc} without a result; log: {log_tail(mdir / 'log.txt')}")
        if rc is not None and rc < 0:
            result["error"] += f" (killed by signal {-rc})"
    elif rc != 0:
        result.update(status="failed", error=f"exit code {rc} after a successful result")
    result["subprocess_wall_s"] = wall
    result["log"] = str(mdir / "log.txt")
    return result


def mean_curve(curves: list[list[list[float]]]) -> tuple[list[list[float]], list[float]]:
    """Per-epoch mean and std of the seeds' curves, at the epochs every seed logged."""
    if not curves or not all(curves):
        return [], []
    points = [dict((x, y) for x, y in c) for c in curves]
    epochs = sorted(set.intersection(*(set(p) for p in points)))
    stats = [mean_std([p[x] for p in points]) for x in epochs]
    return [[x, m] for x, (m, _) in zip(epochs, stats, strict=True)], [sd or 0.0 for _, sd in stats]


def aggregate(method: str, runs: list[dict]) -> dict[str, Any]:
    """One row per method: quality as mean ± std over its seeds, times as medians, memory as the maximum."""
    ok = [r for r in runs if r["status"] == "ok"]
    row: dict[str, Any] = {"method": method, "status": "ok" if ok and len(ok) == len(runs) else "failed",
                           "seeds": [r.get("seed") for r in runs], "seeds_ok": len(ok),
                           "errors": [f"seed {r.get('seed')}: {r.get('error')}" for r in runs if r["status"] != "ok"]}
    first = ok[0] if ok else runs[0]
    for key in ("views", "trains", "overrides", "dropped_overrides", "other_cores", "eval_feature"):
        row[key] = first.get(key)
    for key in QUALITY:
        values = [r[key] for r in ok if r.get(key) is not None]
        row[key], row[f"{key}_std"] = mean_std(values)
        row[f"{key}_values"] = values
    for key in ("epoch_time_median_s", "targets_time_median_s", "train_wall_s", "eval_wall_s", "subprocess_wall_s",
                "rss_after_imports_mb", "gpu_peak_mb", "epochs_run"):
        values = [r[key] for r in ok if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    peaks = [r["peak_rss_mb"] for r in runs if r.get("peak_rss_mb") is not None]
    row["peak_rss_mb"] = max(peaks) if peaks else None
    row["other_cores"] = max((r["other_cores"] for r in runs if r.get("other_cores") is not None), default=None)
    for key in ("knn_curve", "label_change_curve"):
        row[key], row[f"{key}_std"] = mean_curve([r.get(key) or [] for r in ok])
    paired = [r["knn_top1"] - r["knn_untrained"] for r in ok
              if r.get("knn_top1") is not None and r.get("knn_untrained") is not None]
    row["knn_gain_paired"] = bool(ok) and len(paired) == len(ok)  # every seed measured its network untrained
    if row["knn_gain_paired"]:
        row["knn_gain"], row["knn_gain_spread"] = mean_std(paired)
    return row


def add_comparisons(rows: list[dict]) -> float | None:
    """Epoch time relative to the reference's; quality relative to the untrained network's, against the spread.

    The spread of a difference is the sum of the two rows' seed standard deviations: a difference no larger
    than it is marked as within the spread (not evidence of a change).
    """
    ref = next((r.get("epoch_time_median_s") for r in rows if r["method"] == REFERENCE), None)
    base = next((r for r in rows if r["method"] == UNTRAINED and r["status"] == "ok"), None)
    for r in rows:
        t = r.get("epoch_time_median_s")
        r["ratio_to_supervised"] = t / ref if ref and t is not None else None
        views = r.get("views") or 1
        r["ratio_per_view"] = r["ratio_to_supervised"] / views if views == 2 and r["ratio_to_supervised"] else None
        r["paper_knn"] = PAPER_KNN.get(r["method"])
        if r.get("knn_gain_paired"):  # set by aggregate(): against the same networks before training
            continue
        if base is None or r is base or r.get("knn_top1") is None or base.get("knn_top1") is None:
            r["knn_gain"] = r["knn_gain_spread"] = None
            continue
        r["knn_gain"] = r["knn_top1"] - base["knn_top1"]
        stds = [r.get("knn_top1_std"), base.get("knn_top1_std")]
        r["knn_gain_spread"] = sum(stds) if all(v is not None for v in stds) else None
    return ref


def fmt_gain(row: dict[str, Any]) -> str:
    gain, spread = row.get("knn_gain"), row.get("knn_gain_spread")
    if gain is None:
        return "-"
    mark = " paired" if row.get("knn_gain_paired") else ""
    if spread is None:
        return f"{gain:+.2f}{mark} (spread unknown: one seed)"
    if abs(gain) <= spread:
        return f"{gain:+.2f}{mark} (within spread {spread:.2f})"
    return f"{gain:+.2f}{mark} ({abs(gain) / spread:.1f}x spread)" if spread > 0 else f"{gain:+.2f}{mark}"


def markdown(summary: dict[str, Any]) -> str:
    results = summary["methods"]
    cfg = summary["profile_train"]
    seeds = summary.get("seeds") or [cfg.get("seed")]
    lines = [
        f"# deepclust benchmark: profile `{summary['profile']}`",
        "",
        f"- data: `{cfg.get('data')}` (test: `{cfg.get('test_data') or 'its own test split'}`), subset "
        f"{fmt(cfg.get('subset'))}, test subset {fmt(cfg.get('test_subset'))}",
        f"- backbone `{cfg.get('backbone')}`" + (f" width {cfg['width']}" if cfg.get("backbone") == "convnet" else "")
        + f", epochs {cfg.get('epochs')} per round"
        + (f" (stopped after {cfg['stop_after']} in all: --max-epochs)" if cfg.get("stop_after") else "")
        + f", batch {cfg.get('batch_size')}, lr {cfg.get('lr')}, "
        f"decay at {cfg.get('lr_decay_at')}, eval every {cfg.get('eval_every')}",
        f"- seeds: {', '.join(str(s) for s in seeds)} (quality: mean ± sample std over the seeds)"
        + (f"; --set {' '.join(summary['sets'])}" if summary.get("sets") else ""),
        f"- started {summary['started']}, total wall {summary['total_wall_s']:.1f} s, {summary.get('jobs', 1)} "
        f"job(s) at once, host: {summary['host']}",
        f"- reference ({REFERENCE}) median epoch: {fmt(summary['reference_epoch_s'], 3)} s",
    ]
    others = [r["other_cores"] for r in results if r.get("other_cores") is not None]
    busy = busy_note(max(others) if others else None)
    if busy:
        lines.append(f"- **{busy}** (worst method; see run details)")
    if not summary["complete"]:
        lines.append(f"- **incomplete**: {len(summary['runs'])} of {summary['units']} runs done so far")
    lines += [
        "",
        f"| method | kNN top-1 | kNN vs untrained | linear top-1 | NMI | ARI | acc | epoch s | ratio to supervised "
        f"| ratio per view | peak RSS MB | {PAPER_KNN_HEADER} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        name = r["method"] if r["status"] == "ok" else f"{r['method']} (FAILED {len(r['errors'])})"
        lines.append(
            f"| {name} | {fmt_pm(r, 'knn_top1')} | {fmt_gain(r)} | {fmt_pm(r, 'linear_top1')} | {fmt_pm(r, 'nmi', 3)} "
            f"| {fmt_pm(r, 'ari', 3)} | {fmt_pm(r, 'acc')} | {fmt(r.get('epoch_time_median_s'))} "
            f"| {fmt(r.get('ratio_to_supervised'))} | {fmt(r.get('ratio_per_view'))} | {fmt(r.get('peak_rss_mb'), 0)} "
            f"| {r.get('paper_knn') or '-'} |")
    lines += ["", "Run details (medians over seeds):", "",
              "| method | seeds ok | views | epochs run | targets s | train s | eval s | subprocess s "
              "| RSS after imports MB | GPU peak MB | other cores | overrides |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        overrides = ", ".join(f"{k}={v}" for k, v in (r.get("overrides") or {}).items()) or "-"
        if r.get("dropped_overrides"):
            overrides += f" (dropped, not keys of this method: {', '.join(r['dropped_overrides'])})"
        lines.append(
            f"| {r['method']} | {r['seeds_ok']}/{len(r['seeds'])} | {fmt(r.get('views'))} | {fmt(r.get('epochs_run'))} "
            f"| {fmt(r.get('targets_time_median_s'), 3)} | {fmt(r.get('train_wall_s'), 1)} "
            f"| {fmt(r.get('eval_wall_s'), 1)} | {fmt(r.get('subprocess_wall_s'), 1)} "
            f"| {fmt(r.get('rss_after_imports_mb'), 0)} | {fmt(r.get('gpu_peak_mb'), 0)} | {fmt(r.get('other_cores'))} "
            f"| {overrides} |")
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        lines += [""] + [f"FAILED: {r['method']} ({'; '.join(r['errors'])})" for r in failed]
    lines += ["", "kNN / linear / acc in %; NMI, ARI in [0, 1] (ARI in [-1, 1]). kNN vs untrained: 'paired' is the "
              "mean over seeds of each run's kNN minus that of its own network before training (the trainer's "
              "baseline row: same seed, same feature), against the std of those differences; otherwise the "
              f"difference from the `{UNTRAINED}` row (pooled features), against the sum of the two rows' seed std. "
              "'within spread' marks a difference no larger than the spread. epoch s: median of the trainer's "
              "per-epoch `time` (targets + steps, no kNN pass). ratio per view: for 2-view methods. "
              f"{PAPER_KNN_HEADER}: published CIFAR-10 ResNet-18 numbers (METHODS.md); comparable only with the "
              "paper profile run in full.", "", "![kNN curves](knn_curves.png)", ""]
    return "\n".join(lines)


def plot_curves(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    last_epoch = max((p[0] for r in results for p in r.get("knn_curve") or []), default=1)
    for r in results:
        curve = r.get("knn_curve") or []
        if not curve:
            continue
        xs, ys = zip(*curve, strict=True)
        if not r.get("trains", True):  # untrained reference: a level, not a curve
            ax.axhline(ys[-1], linestyle=":", color="gray", label=f"{r['method']} (untrained)")
        else:
            line, = ax.plot(xs, ys, marker="o", markersize=3, label=r["method"])
            std = r.get("knn_curve_std") or []
            if any(std):
                lo = [y - s for y, s in zip(ys, std, strict=True)]
                hi = [y + s for y, s in zip(ys, std, strict=True)]
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlim(0, max(1, last_epoch))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%), mean ± std over seeds")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no kNN results", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_label_change(results: list[dict], path: Path, title: str) -> None:
    """ODC's (and UIC's) label-change ratio over epochs: how fast the pseudo-labels settle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(r["method"], r["label_change_curve"]) for r in results if r.get("label_change_curve")]
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves:
        xs, ys = zip(*curve, strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of samples whose label changed")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    order = [m for m in summary["selected"] if any(r["method"] == m for r in summary["runs"])]
    summary["methods"] = [aggregate(m, [r for r in summary["runs"] if r["method"] == m]) for m in order]
    summary["reference_epoch_s"] = add_comparisons(summary["methods"])
    summary["failed"] = [r["method"] for r in summary["methods"] if r["status"] != "ok"]
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(markdown(summary))
    try:
        plot_curves(summary["methods"], out / "knn_curves.png", f"kNN top-1, profile {summary['profile']}")
        plot_label_change(summary["methods"], out / "label_change.png",
                          f"fraction of labels changed per epoch, profile {summary['profile']}")
    except Exception as err:  # a plot problem must not hide the numbers
        log.warning("could not draw the plots: %s", err)


def host_info(threads: int | None) -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({threads or torch.get_num_threads()} threads), {gpu}")


def run_all(args: argparse.Namespace) -> int:
    from deepclust.methods import METHODS

    available = list(METHODS)
    if args.methods:
        selected = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in selected if m not in METHODS]
        if unknown:
            print(f"benchmarks.run: unknown method(s) {', '.join(unknown)}; choose from {', '.join(available)}",
                  file=sys.stderr)
            return 2
        selected = method_order(selected)
    else:
        selected = method_order(available)
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
        layers, _, _ = build_layers(args.profile, selected[0], args)
    except ValueError as err:
        print(f"benchmarks.run: {err}", file=sys.stderr)
        return 2
    data = layers[0]["data"]
    if (data.startswith(("/", "./", "../")) or os.sep in data) and not Path(data).exists():
        print(f"benchmarks.run: no data at {data}; pass --data SPEC", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    units = [(m, s) for m in selected for s in seeds]
    jobs = max(1, min(args.jobs, len(units)))
    if jobs > 1 and args.threads is None:  # jobs sharing the cores must not each take all of them
        args.threads = max(1, (os.cpu_count() or 1) // jobs)
    summary: dict[str, Any] = {
        "profile": args.profile, "argv": sys.argv, "selected": selected,
        "seeds": [s for s in seeds if s is not None] or [layers[0].get("seed")], "sets": args.set or [],
        "jobs": jobs, "units": len(units),
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "host": host_info(args.threads),
        "profile_train": layers[0] | {k: v for k, v in layers[2].items() if k in ("epochs", "stop_after")},
        "profile_methods": PROFILES[args.profile]["methods"], "runs": [], "methods": [], "complete": False,
        "total_wall_s": 0.0,
    }
    if REFERENCE not in selected:
        print(f"note: {REFERENCE} is not selected, so there is no epoch-time reference", file=sys.stderr)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:  # each thread waits on one child process
        futures = {pool.submit(run_child, args, m, s): (m, s) for m, s in units}
        for done, future in enumerate(as_completed(futures), 1):
            r = future.result()
            summary["runs"].append(r)
            summary["total_wall_s"] = time.perf_counter() - t0
            label = r["method"] + (f" seed {r['seed']}" if r.get("seed") is not None else "")
            if r["status"] == "ok":
                print(f"[{done}/{len(units)}] {label} ok in {r['subprocess_wall_s']:.1f} s: kNN "
                      f"{fmt(r.get('knn_top1'))}, linear {fmt(r.get('linear_top1'))}, NMI {fmt(r.get('nmi'), 3)}, "
                      f"epoch {fmt(r.get('epoch_time_median_s'))} s", flush=True)
            else:
                print(f"[{done}/{len(units)}] {label} FAILED in {r['subprocess_wall_s']:.1f} s: {r.get('error')} "
                      f"(log: {r['log']})", flush=True)
            write_outputs(summary, out)
    summary["complete"] = True
    summary["total_wall_s"] = time.perf_counter() - t0
    write_outputs(summary, out)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'knn_curves.png'} "
          f"({summary['total_wall_s']:.1f} s)")
    for r in summary["methods"]:
        if r["status"] != "ok":
            print(f"FAILED: {r['method']} ({'; '.join(r['errors'])})", file=sys.stderr)
    return 1 if summary["failed"] else 0


def merge_runs(sources: list[str], out: Path) -> int:
    """One table from the runs of several harness outputs (e.g. a profile run method by method across days).

    Runs of one method from different sources are pooled as seeds; all sources must share one profile.
    """
    from deepclust.methods import METHODS

    summaries = [json.loads((Path(s) / "results.json").read_text()) for s in sources]
    profiles = {s["profile"] for s in summaries}
    if len(profiles) != 1:
        print(f"benchmarks.run: --merge needs one profile, got {', '.join(sorted(profiles))}", file=sys.stderr)
        return 2
    runs = [r for s in summaries for r in s.get("runs", [])]
    present = {r["method"] for r in runs}
    selected = method_order([m for m in METHODS if m in present]) + sorted(present - set(METHODS))
    first = summaries[0]
    out.mkdir(parents=True, exist_ok=True)
    # a source stopped part-way planned more units than it ran; one stopped after its last unit (its "complete"
    # still False) lacks none, so the merge is complete when every source ran every unit it planned
    units = sum(max(s.get("units", 0), len(s.get("runs", []))) for s in summaries)
    summary = {**first, "argv": sys.argv, "merged_from": sources, "selected": selected, "runs": runs,
               "units": units, "complete": len(runs) >= units,
               "seeds": sorted({r.get("seed") for r in runs if r.get("seed") is not None}),
               "sets": sorted({x for s in summaries for x in s.get("sets", [])}),
               "total_wall_s": sum(s.get("total_wall_s", 0.0) for s in summaries)}
    write_outputs(summary, out)
    print(f"wrote {out / 'results.md'} from {len(runs)} runs of {len(selected)} methods")
    return 1 if summary["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=tuple(PROFILES))
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="no training: one table (into --out) from the results.json of earlier runs of one profile")
    p.add_argument("--methods", help="comma-separated method names (default: every method, supervised first)")
    p.add_argument("--data", help="training data spec, replacing the profile's (its test split unless --test-data)")
    p.add_argument("--test-data", help="test data spec, replacing the profile's")
    p.add_argument("--epochs", type=int,
                   help="epochs per round for every method, replacing the profile's (the lr schedule scales "
                        "with it)")
    p.add_argument("--max-epochs", type=int,
                   help="stop every method after this many epochs in all, keeping the profile's schedule "
                        "(trainer key stop_after): a timed check of a long profile")
    p.add_argument("--seeds", help="comma-separated seeds: each method runs once per seed into OUT/METHOD/seedS, "
                                   "and the table gives mean ± std (default: the profile's seed, into OUT/METHOD)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a config key for every method that has it, after the profile's (repeatable)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once; each then gets cpu_count / jobs torch threads unless --threads is given")
    p.add_argument("--threads", type=int, help="torch intra-op threads in each method's process (default: torch's)")
    p.add_argument("--timeout", type=float, help="seconds allowed per method (default: no limit)")
    p.add_argument("--out", required=True, help="output folder; each method writes into OUT/METHOD")
    p.add_argument("--resume", action="store_true",
                   help="continue each unit from its checkpoint in OUT (a finished one is only evaluated again) "
                        "instead of moving it aside and starting again")
    p.add_argument("--one", metavar="METHOD", help=argparse.SUPPRESS)  # internal: run one method in-process
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # internal: the seed of that run
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (("--epochs", args.epochs), ("--max-epochs", args.max_epochs)):
        if value is not None and value < 1:
            build_parser().error(f"{flag} must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.merge:
        return merge_runs(args.merge, Path(args.out))
    if args.profile is None:
        build_parser().error("--profile is required (or --merge DIR ...)")
    return run_one(args) if args.one else run_all(args)


if __name__ == "__main__":
    sys.exit(main())
