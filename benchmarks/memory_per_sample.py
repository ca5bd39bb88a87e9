"""Bytes per training sample of each method, for the "samples per GiB" table (issue 14).

    python -m benchmarks.memory_per_sample [--backbone resnet18_cifar] [--out FILE.json]

- state: each method is built with its default config (``configs/<method>.yaml``) for N = 2,000 and 4,000
  samples; (state_dict bytes at 4,000 - at 2,000) / 2,000 is what one more sample costs (bank rows, labels,
  vote history, k = N / 50 centroids, ...), with ``bank_dtype`` float32 and float16. The state lives on the
  training device (the GPU when training on one) and in every checkpoint.
- feature pass: ``before_epoch`` runs once (epoch 0, and round 1 for AND) with ``ctx.extract`` recording what
  it is asked for; the largest request is N x D float32 on the training device while the epoch's targets are
  made. D is read from the backbone's real output on a few images; the rows handed back are random unit
  vectors (the values do not change the sizes).
- pixels: a uint8 (N, 3, S, S) tensor in memory, 3 S^2 bytes a sample in RAM, and on the GPU too when
  training there with num_workers = 0 (the trainer moves them there); none with a ``deepclust prepare`` cache.
  Labels: 8 bytes a sample (int64) in RAM.

With ``--cache DIR`` (a ``deepclust prepare`` folder) it also times reading from it: random batches of 256 rows
and a sequential pass in slices of 1,024, against indexing the same pixels held in memory (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deepclust.backbones import Backbone
from deepclust.config import resolve
from deepclust.data import load_data
from deepclust.eval import extract_features
from deepclust.methods import METHODS, EpochContext

SMALL, LARGE = 2000, 4000
GIB = 2**30


def build(method: str, n: int, backbone: str, **keys):
    _, hparams = resolve([{"method": method, "backbone": backbone, **keys}])
    cls = METHODS[method]
    labels = torch.arange(n) % 10 if cls.uses_labels else None
    return cls(Backbone(backbone, 32), n, hparams, labels=labels)


def state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def per_sample_state(method: str, backbone: str, **keys) -> float:
    return (state_bytes(build(method, LARGE, backbone, **keys)) - state_bytes(build(method, SMALL, backbone, **keys))) \
        / (LARGE - SMALL)


def feature_pass_floats(method: str, backbone: str) -> int:
    """The most float32 values per sample one ``ctx.extract`` returned while making targets (0: no pass)."""
    m = build(method, SMALL, backbone)
    images = load_data("digits").images[:4]
    dims = {f: extract_features(m.backbone, images, f).shape[1] for f in ("pooled", "embedding")}
    asked: list[int] = []

    def extract(feature: str = "embedding", normalize: bool = True) -> torch.Tensor:
        asked.append(dims[feature])
        return F.normalize(torch.randn(SMALL, dims[feature]), dim=1)

    for round_ in ((0, 1) if method == "and" else (0,)):
        ctx = EpochContext(round_, 0, 10, 2, round_, torch.Generator().manual_seed(0), torch.device("cpu"), extract,
                           torch.arange(SMALL) % 10)
        m.before_epoch(ctx)
    return max(asked, default=0)


def cache_read_times(cache: str, repeats: int = 30) -> dict[str, float]:
    """Median seconds: a random batch of 256 rows and a pass in slices of 1,024, from disk and from memory."""
    disk = load_data(cache).images
    held = disk[:]
    gen = torch.Generator().manual_seed(0)

    def median_time(images, batch: bool, n: int) -> float:
        times = []
        for _ in range(n):
            index = torch.randperm(len(disk), generator=gen)[:256]
            t = time.perf_counter()
            _ = images[index] if batch else [images[s:s + 1024] for s in range(0, len(disk), 1024)]
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    out = {}
    for name, images in (("disk", disk), ("memory", held)):
        out[f"batch256_{name}"] = median_time(images, True, repeats)
        out[f"pass_{name}"] = median_time(images, False, 5)
    return out


def per_gib(nbytes: float, unit: float = 1e6) -> str:
    return f"{nbytes:.0f} B: {GIB / nbytes / unit:.2f} {'M' if unit == 1e6 else 'k'}" if nbytes else "0 B: no limit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18_cifar")
    parser.add_argument("--out", help="also write the numbers to this JSON file")
    parser.add_argument("--cache", help="a deepclust prepare folder to time reads from")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = {}
    for method, cls in METHODS.items():
        has_bank = "bank_dtype" in cls.Config.__dataclass_fields__
        rows[method] = {"state": per_sample_state(method, args.backbone),
                        "state_fp16": per_sample_state(method, args.backbone, bank_dtype="float16") if has_bank
                        else None,
                        "feature_floats": feature_pass_floats(method, args.backbone)}
    pixels = {s: load_data("digits", image_size=s).images for s in (32, 224)}
    pixel_bytes = {s: x.numel() * x.element_size() / len(x) for s, x in pixels.items()}
    labels = load_data("digits").labels
    label_bytes = labels.numel() * labels.element_size() / len(labels)
    print(f"backbone {args.backbone}; bytes per sample; samples per GiB = 2^30 / bytes\n")
    print("| method | state (float32 bank) | state (bank_dtype float16) | feature pass | GPU, cache | "
          "GPU, cache + float16 bank | GPU, in memory 32 px | RAM, in memory 32 px / 224 px | RAM, cache |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, r in rows.items():
        fp = 4 * r["feature_floats"]
        half = r["state_fp16"] if r["state_fp16"] is not None else r["state"]
        gpu, gpu16, gpu32 = r["state"] + fp, half + fp, r["state"] + fp + pixel_bytes[32]
        ram32, ram224 = pixel_bytes[32] + label_bytes, pixel_bytes[224] + label_bytes
        fp16 = f"{r['state_fp16']:.0f}" if r["state_fp16"] is not None else "-"
        print(f"| {method} | {r['state']:.0f} | {fp16} | {fp} ({r['feature_floats']} floats) | {per_gib(gpu)} | "
              f"{per_gib(gpu16)} | {per_gib(gpu32)} | {GIB / ram32 / 1e3:.0f} k / {GIB / ram224 / 1e3:.1f} k | "
              f"{GIB / label_bytes / 1e6:.0f} M |")
    reads = cache_read_times(args.cache) if args.cache else None
    if reads:
        n = len(load_data(args.cache))
        print(f"\n{args.cache}: {n} rows; random batch of 256: disk {reads['batch256_disk'] * 1e3:.1f} ms, memory "
              f"{reads['batch256_memory'] * 1e3:.1f} ms; pass in slices of 1,024: disk {reads['pass_disk'] * 1e3:.1f} "
              f"ms, memory {reads['pass_memory'] * 1e3:.1f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps({"backbone": args.backbone, "methods": rows, "pixel_bytes": pixel_bytes,
                                              "label_bytes": label_bytes, "cache_reads": reads}, indent=1))


if __name__ == "__main__":
    main()
