"""Feature extraction with a timm backbone (issue 32): deepclust's pass (``deepclust embed``'s
``extract_features``: uint8 -> the model's own normalisation -> channels_last -> timm's ``num_classes=0`` forward)
against timm's own forward loop over the same images, same batches, same threads, taking turns.

    OMP_NUM_THREADS=1 python -m benchmarks.timm_features [--model vit_small_patch16_224] [--images 256] \
        [--sizes 224,32] [--repeats 3] [--out DIR]

Random weights and random images (speed does not depend on them); nothing downloaded. Prints a Markdown table
(images/s, median of the repeats, and ours / timm's) and writes DIR/timm_features.json when --out is given.
Also times the whole ``deepclust embed`` command once per size (reading an .npz of the images, writing features).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deepclust.backbones import Backbone
from deepclust.cli import main as deepclust_main
from deepclust.eval import extract_features

BATCH = 128  # extract_features' CPU batch


def timm_loop(model: torch.nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """timm's own forward in the plain way: float, normalised, a batch at a time, eval mode, no_grad."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), BATCH):
            x = (images[start:start + BATCH].float() / 255 - mean) / std
            out.append(model(x))
    return torch.cat(out)


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(name: str, size: int, count: int, repeats: int) -> dict:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    ours = Backbone(f"timm:{name}", size).eval()
    theirs = ours.trunk  # the same module and weights: the difference is the wrapper around the forward
    mean = torch.tensor(ours.mean).view(1, 3, 1, 1)
    std = torch.tensor(ours.std).view(1, 3, 1, 1)
    rates: dict[str, list[float]] = {"deepclust": [], "timm": []}
    passes = {"deepclust": lambda: extract_features(ours, images, "pooled", normalize=False),
              "timm": lambda: timm_loop(theirs, images, mean, std)}
    extract_features(ours, images[:8], "pooled")  # warm-up: the first forward's allocations, not counted
    timm_loop(theirs, images[:8], mean, std)
    diff = 0.0
    for repeat in range(repeats):  # taking turns, in alternating order: a busy neighbour slows both alike
        features = {}
        for who in (("deepclust", "timm") if repeat % 2 == 0 else ("timm", "deepclust")):
            seconds, features[who] = timed(passes[who])
            rates[who].append(count / seconds)
        diff = max(diff, float((features["deepclust"] - features["timm"]).abs().max()))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images.npz"
        np.savez(data, images=images.permute(0, 2, 3, 1).numpy())
        save = Path(tmp) / "weights.pth"
        torch.save(theirs.state_dict(), save)
        t_cli, _ = timed(lambda: deepclust_main(["embed", "--checkpoint", str(save), "--backbone", f"timm:{name}",
                                                 "--image-size", str(size), "--data", str(data),
                                                 "--out", str(Path(tmp) / "f.npz"), "--feature", "pooled"]))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"model": name, "size": size, "images": count, "threads": torch.get_num_threads(),
            "deepclust_img_s": med["deepclust"], "timm_img_s": med["timm"], "ratio": med["deepclust"] / med["timm"],
            "runs": rates, "max_abs_diff": diff, "embed_command_s": t_cli, "embed_command_img_s": count / t_cli}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="a timm model name")
    parser.add_argument("--images", default="128,512", help="random images per size, comma-separated (or one "
                        "count for all)")
    parser.add_argument("--sizes", default="224,32", help="image sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each, taking turns")
    parser.add_argument("--out", help="a folder for timm_features.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(c) for c in args.images.split(",")]
    counts = counts * len(sizes) if len(counts) == 1 else counts
    rows = [measure(args.model, size, count, args.repeats) for size, count in zip(sizes, counts, strict=True)]
    print("| model | px | images | deepclust img/s | timm img/s | ours / timm | max abs diff | whole `embed` img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['size']} | {r['images']} | {r['deepclust_img_s']:.1f} | {r['timm_img_s']:.1f} | "
              f"{r['ratio']:.3f} | {r['max_abs_diff']:.1e} | {r['embed_command_img_s']:.1f} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "timm_features.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
