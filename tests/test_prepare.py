"""`deepclust prepare` and data read from its cache: the same pixels as the in-memory loaders, clear errors for
broken caches, training whose memory does not grow with the dataset, and the float16 memory bank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepclust.backbones import Backbone
from deepclust.checkpoint import load_checkpoint
from deepclust.cli import main
from deepclust.cluster import centroid_sums, knn_graph
from deepclust.commands.prepare import prepare_cache
from deepclust.data import DataError, DiskImages, load_data
from deepclust.eval.layers import layer_features
from deepclust.memory import MemoryBank
from deepclust.train import train
from tests.helpers import run_cfg

REPO = Path(__file__).resolve().parents[1]


def png_folder(root: Path, broken: bool = False) -> Path:
    """Two classes of PNGs of mixed sizes and modes (one RGBA, one grayscale); optionally one corrupt file."""
    rng = np.random.default_rng(1)
    sizes = [(20, 30), (40, 40), (24, 18), (33, 33), (16, 50), (28, 28), (45, 21)]
    for i, (h, w) in enumerate(sizes):
        cls = "cat" if i % 2 else "dog"
        (root / cls).mkdir(parents=True, exist_ok=True)
        mode = {3: "RGBA", 5: "L"}.get(i, "RGB")
        shape = (h, w) if mode == "L" else (h, w, len(mode))
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / cls / f"{i}.png")
    if broken:
        (root / "cat" / "2_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_png_folder_cache_equals_in_memory_loader(tmp_path):
    root = png_folder(tmp_path / "pngs", broken=True)
    header = prepare_cache(str(root), tmp_path / "cache", 16, bad_images="skip", chunk=2)  # chunks of 2 files
    assert header["num_images"] == 7 and header["skipped"] == 1 and header["bad_images"] == "skip"
    cached = load_data(str(tmp_path / "cache"))
    memory = load_data(str(root), image_size=16, bad_images="skip")
    assert isinstance(cached.images, DiskImages) and cached.images.shape == memory.images.shape == (7, 3, 16, 16)
    assert torch.equal(cached.images[:], memory.images)
    assert torch.equal(cached.labels, memory.labels) and cached.classes == memory.classes == ["cat", "dog"]
    assert cached.paths == memory.paths and cached.paths[0] == "cat/1.png"
    assert [Path(p).name for p in cached.skipped] == ["2_broken.png"]
    with pytest.raises(DataError, match="bad_images=skip"):  # the default policy fails, and leaves nothing behind
        prepare_cache(str(root), tmp_path / "strict", 16, chunk=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "pngs"]


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("caches") / "digits32"
    assert main(["prepare", "digits", "--out", str(out), "--size", "32", "--chunk", "500"]) == 0
    return out


def test_digits_cache_reads_rows_as_the_in_memory_tensor_does(digits_cache):
    cached, memory = load_data(str(digits_cache)), load_data("digits", image_size=32)
    disk, ram = cached.images, memory.images
    assert torch.equal(disk[:], ram) and torch.equal(cached.labels, memory.labels) and cached.paths is None
    index = torch.tensor([900, 3, 4, 5, 3, 1437, 0, 6])  # unsorted, a repeat, runs to coalesce, both ends
    assert torch.equal(disk[index], ram[index]) and torch.equal(disk[index.tolist()], ram[index])
    assert torch.equal(disk[7], ram[7]) and torch.equal(disk[90:101:3], ram[90:101:3])
    assert disk[torch.tensor([], dtype=torch.long)].shape == (0, 3, 32, 32)
    mask = cached.labels == 3
    assert torch.equal(disk[mask], ram[mask])
    for keys in ({"subset": 300}, {"subset_imbalance": 8.0}, {"subset": 500, "subset_imbalance": 4.0}):
        a, b = load_data(str(digits_cache), **keys), load_data("digits", image_size=32, **keys)
        assert isinstance(a.images, DiskImages) and torch.equal(a.images[:], b.images)
        assert torch.equal(a.labels, b.labels)
    twice = cached.subset(torch.arange(100, 200)).subset(torch.tensor([5, 1]))  # views of views: no pixels copied
    assert torch.equal(twice.images[:], ram[[105, 101]])


def test_npz_is_streamed_into_the_cache(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (23, 20, 26, 3), dtype=np.uint8)  # non-square: resized and centre-cropped
    np.savez_compressed(tmp_path / "x.npz", images=images, labels=np.arange(23) % 3)
    prepare_cache(str(tmp_path / "x.npz"), tmp_path / "cache", 12, chunk=5)
    cached, memory = load_data(str(tmp_path / "cache")), load_data(str(tmp_path / "x.npz"), image_size=12)
    assert torch.equal(cached.images[:], memory.images) and torch.equal(cached.labels, memory.labels)


def test_broken_caches_raise_data_errors_naming_the_fix(tmp_path, digits_cache):
    with pytest.raises(DataError, match="holds 32x32 images.*--size 48"):
        load_data(str(digits_cache), image_size=48)
    with pytest.raises(DataError, match="exists; give a new --out"):
        prepare_cache("digits", digits_cache, 32)
    assert main(["prepare", "digits", "--out", str(digits_cache), "--size", "32"]) == 2  # the CLI: a message, exit 2
    header = json.loads((digits_cache / "cache.json").read_text())

    def broken(name: str, header_text: str | None, pixels: bytes) -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "images.u8").write_bytes(pixels)
        if header_text is not None:
            (folder / "cache.json").write_text(header_text)
        return str(folder)

    one_image = bytes(3 * 32 * 32)
    with pytest.raises(DataError, match="no cache.json: an unfinished or interrupted deepclust prepare.*again"):
        load_data(broken("partial", None, one_image))
    with pytest.raises(DataError, match="not a valid cache header.*deepclust prepare"):
        load_data(broken("garbled", '{"format": "deepclust-cache", "num_im', one_image))
    with pytest.raises(DataError, match=r"holds 3072 bytes, but the header's 1438 x 3 x 32 x 32 images need "
                                        r"4417536: the cache is damaged"):
        load_data(broken("truncated", json.dumps(header), one_image))
    with pytest.raises(DataError, match="not a deepclust-cache version 1 header"):
        load_data(broken("future", json.dumps({**header, "num_images": 1, "version": 99}), one_image))


def test_killed_prepare_leaves_no_cache_that_looks_complete(tmp_path):
    """A prepare killed (SIGKILL) after its first chunk: --out never appears; the hidden leftover is refused."""
    script = ("import os, signal, sys\nfrom pathlib import Path\nimport deepclust.commands.prepare as p\n"
              "calls = []\nresize = p.square_uint8\n"
              "def dying(images, size):\n    calls.append(1)\n"
              "    if len(calls) == 2:\n        os.kill(os.getpid(), signal.SIGKILL)\n    return resize(images, size)\n"
              "p.square_uint8 = dying\np.prepare_cache('digits', Path(sys.argv[1]), 32, chunk=500)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache")], cwd=REPO, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert not (tmp_path / "cache").exists()
    (leftover,) = tmp_path.glob(".cache.partial-*")
    assert (leftover / "images.u8").stat().st_size == 500 * 3 * 32 * 32  # the first chunk had been written
    with pytest.raises(DataError, match="unfinished or interrupted deepclust prepare"):
        load_data(str(leftover))


def test_embed_and_knn_eval_from_the_cache_equal_in_memory(tmp_path, digits_cache, trained_checkpoint, capsys):
    test_cache = tmp_path / "digits_test"
    prepare_cache("digits", test_cache, 32, split="test")
    outs = []
    for data in (str(digits_cache), "digits"):
        out = tmp_path / f"{Path(data).name}.npz"
        assert main(["embed", "--checkpoint", str(trained_checkpoint), "--data", data, "--out", str(out)]) == 0
        outs.append(np.load(out))
    assert np.array_equal(outs[0]["features"], outs[1]["features"])
    assert np.array_equal(outs[0]["labels"], outs[1]["labels"])
    knn = []
    for train_data, test_data in ((str(digits_cache), str(test_cache)), ("digits", "digits:test")):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(trained_checkpoint), "--data", train_data, "--test-data", test_data,
                     "--json"]) == 0
        knn.append(json.loads(capsys.readouterr().out)["knn_top1"])
    assert knn[0] == knn[1] and knn[0] > 20  # 10 classes: well above chance after one epoch
    csvs = []
    for data in (str(digits_cache), "digits:train"):  # not "digits": that is the run's own (subset) data
        out = tmp_path / f"{Path(data).name}.csv"
        assert main(["cluster", "--checkpoint", str(trained_checkpoint), "--data", data, "--k", "10", "--restarts", "1",
                     "--out", str(out)]) == 0
        csvs.append(out.read_text())
    assert csvs[0] == csvs[1] and len(csvs[0].splitlines()) == 1439
    model = Backbone("convnet", 32, width=8)
    a = layer_features(model, load_data(str(digits_cache)).images[:], ["block2"])
    b = layer_features(model, DiskImages(digits_cache / "images.u8", 1438, 32), ["block2"])
    assert torch.equal(a["block2"], b["block2"])


GROWTH = """
import json, sys
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
import torch
from deepclust.config import resolve
from deepclust.data import load_data
from deepclust.train import train
torch.set_num_threads(1)
before = status("VmRSS")  # everything imported, nothing loaded
cfg, hp = resolve([json.loads(sys.argv[1])])
train(cfg, hp)
trained = status("VmHWM")
held = load_data(cfg.data).images[:]  # the same pixels held in memory, to show the measure sees them
print(json.dumps({"before": before, "trained": trained, "held": status("VmHWM")}))
"""


def test_training_from_a_cache_bigger_than_its_memory_growth(tmp_path):
    """Issue 14's acceptance: NPID trains an epoch on a cache whose pixels exceed the peak resident memory the
    process gains from loading the data to the end of training, so the dataset was never held whole."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "small.npz", images=rng.integers(0, 256, (8000, 16, 16, 3), dtype=np.uint8),
             labels=np.arange(8000) % 10)
    prepare_cache(str(tmp_path / "small.npz"), tmp_path / "cache", 64)  # upsampled: 8000 x 3 x 64 x 64
    cache_bytes = (tmp_path / "cache" / "images.u8").stat().st_size
    assert cache_bytes == 8000 * 3 * 64 * 64
    keys = {"method": "npid", "data": str(tmp_path / "cache"), "backbone": "convnet", "width": 4, "epochs": 1,
            "batch_size": 16, "out": str(tmp_path / "run"), "progress": False, "eval_every": 0,
            "bank_init": "random", "bank_dtype": "float16", "threads": 1}
    done = subprocess.run([sys.executable, "-c", GROWTH, json.dumps(keys)], cwd=REPO, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    rss = json.loads(done.stdout.decode().strip().splitlines()[-1])
    growth = rss["trained"] - rss["before"]
    assert 0 < growth < cache_bytes, f"peak growth {growth / 2**20:.1f} MiB vs cache {cache_bytes / 2**20:.1f} MiB"
    assert rss["held"] - rss["before"] >= cache_bytes  # holding the pixels would have shown
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert payload["next_epoch"] == 1 and payload["num_samples"] == 8000
    assert payload["state"]["bank.features"].dtype == torch.float16


# --- the float16 memory bank ------------------------------------------------------------------------------


def test_float16_bank_update_and_logits_match_float32():
    full, half = MemoryBank(300, 16, 0.5, seed=4), MemoryBank(300, 16, 0.5, seed=4, dtype="float16")
    assert half.state_dict()["features"].dtype == torch.float16
    assert half.features.element_size() * half.features.numel() == 300 * 16 * 2  # half the float32 bytes
    torch.testing.assert_close(half.features.float(), full.features, atol=1e-3, rtol=0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        index, feats = torch.randperm(300, generator=gen)[:40], torch.randn(40, 16, generator=gen)
        full.update(index, feats)
        half.update(index, feats)
    # Each step rounds to float16 once: the rows stay within a few float16 ulps of the float32 bank's.
    torch.testing.assert_close(half.features.float(), full.features, atol=2e-3, rtol=0)
    assert not torch.equal(half.features.float(), full.features)  # it really is stored in float16
    # Logits over a float16 bank, a chunk at a time, equal one float32 product with the same rows.
    z = torch.randn(8, 16, generator=gen)
    torch.testing.assert_close(half.logits(z, 0.1, chunk=64), z @ half.features.float().t() / 0.1)
    torch.testing.assert_close(half.logits(z, 0.1), full.logits(z, 0.1), atol=0.05, rtol=0)  # 0.1: /tau
    # Per-cluster sums (ODC's centroids) and the kNN graph (PAD's) of a float16 bank, taken a chunk / block at a
    # time in float32, equal those of one float32 copy of it.
    labels = torch.arange(300) % 7
    sums, counts = half.class_sums(labels, 7, chunk=64)
    ref_sums, ref_counts = centroid_sums(half.features.float(), labels, 7)
    torch.testing.assert_close(sums, ref_sums)
    assert torch.equal(counts, ref_counts)
    sims, idx = knn_graph(half.features, 5, approximate=False)
    ref_sims, ref_idx = knn_graph(half.features.float(), 5, approximate=False)
    assert sims.dtype == torch.float32 and torch.equal(idx, ref_idx) and torch.equal(sims, ref_sims)
    with pytest.raises(ValueError, match="bank_dtype must be one of float32, float16"):
        MemoryBank(3, 2, dtype="bfloat16")


@pytest.mark.parametrize("method", ["odc", "pad", "and"])
def test_methods_train_with_a_float16_bank(tmp_path, method):
    """Methods that read the whole bank (ODC's centroids, PAD's graph, AND's entropy in round 1) work on a
    float16 one."""
    cfg, hp = run_cfg(tmp_path, method, epochs=1, rounds=2 if method == "and" else 1, bank_dtype="float16")
    row = train(cfg, hp)
    assert np.isfinite(row["loss"])
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["state"]
    bank = state["memory.features" if method == "odc" else "bank.features"]
    assert bank.dtype == torch.float16 and bank.shape[0] == 96
    torch.testing.assert_close(bank.float().norm(dim=1), torch.ones(96), atol=2e-3, rtol=0)
