"""A folder of one's own photos: the default size from the data and the network, EXIF orientation, decoding on
several workers (the same bytes), every odd file handled or refused by kind, and the CPU memory plan."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from benchmarks.decode import old_square  # the pre-issue-29 decode, the reference
from deepclust.backbones import Backbone
from deepclust.checkpoint import load_checkpoint
from deepclust.cli import main
from deepclust.commands.prepare import prepare_cache
from deepclust.config import ConfigError
from deepclust.data import DataError, decode_file, default_image_size, load_data
from deepclust.device_memory import check_host_memory, plan_training_memory
from deepclust.methods import METHODS
from deepclust.runtime import available_memory


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth picture (JPEG keeps it close) whose four quadrants differ: any flip or turn shows."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 80, 3)
    img = np.zeros((h, w, 3), np.float64)
    img[..., 0] = base[0] + 150 * (x < w / 2)
    img[..., 1] = base[1] + 150 * (y < h / 2)
    img[..., 2] = base[2] + 100 * x / w + 50 * y / h
    return img.clip(0, 255).astype(np.uint8)


def jpeg_bytes(array: np.ndarray, orientation: int | None = None, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(array).save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def photo_folder(root: Path, small: int = 40) -> Path:
    """The issue's folder: one large photo sorted first, small photos, a grayscale and an RGBA PNG, a truncated
    JPEG, a text file named as a JPEG and a notes.txt."""
    root.mkdir(parents=True)
    (root / "big.jpg").write_bytes(jpeg_bytes(photo(900, 1200, 0)))
    for i in range(small):
        (root / f"photo_{i:04d}.jpg").write_bytes(jpeg_bytes(photo(32, 32, i + 1)))
    Image.fromarray(photo(40, 48, 99)[..., 0], "L").save(root / "gray.png")
    Image.fromarray(np.dstack([photo(36, 36, 98), np.full((36, 36), 200, np.uint8)]), "RGBA").save(root / "rgba.png")
    whole = jpeg_bytes(photo(64, 64, 97))
    (root / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    (root / "fake.jpg").write_text("this is a text file, named as a JPEG")
    (root / "notes.txt").write_text("holiday 2025")
    return root


def test_a_photo_folder_trains_at_the_median_size_capped_by_the_network(tmp_path, caplog):
    folder = photo_folder(tmp_path / "photos")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        rc = main(["train", "--method", "is", "--data", str(folder), "--backbone", "convnet", "--epochs", "1",
                   "--out", str(out), "--device", "cpu", "bad_images=skip", "batch_size=16", "width=8",
                   "progress=false"])
    assert rc == 0
    assert load_checkpoint(out / "checkpoint.pt")["backbone"]["image_size"] == 32  # not big.jpg's 900
    text = caplog.text
    assert "image size 32: the median shorter side of 43 images" in text and "(range 32-900 px)" in text
    assert "set image_size=N" in text
    assert text.count("vary widely in size") == 1
    assert "skipped 1 unreadable (e.g. truncated.jpg), 1 not an image (e.g. fake.jpg)" in text
    assert "left out 1 file(s)" in text and "notes.txt" in text
    assert "loaded " + str(folder) + ": 43 images of 32x32" in text


def test_900_px_on_this_machine_is_refused_before_decoding_naming_the_fixes(tmp_path, capsys, caplog):
    folder = photo_folder(tmp_path / "photos", small=8)
    free = available_memory()
    need = 128 * 510 * 2**20  # the default batch of 128 at about 510 MiB of activations an image
    if free is None or free > need:
        pytest.skip("this machine has the memory for a 900 px step")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        rc = main(["train", "--method", "is", "--data", str(folder), "--backbone", "convnet", "--epochs", "1",
                   "--out", str(out), "--device", "cpu", "bad_images=skip", "image_size=900", "progress=false"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "loaded" not in caplog.text and "skipped" not in caplog.text  # refused before any file was decoded
    assert "GiB of memory on the CPU" in err and "activations" in err and "are available" in err
    assert "Lower image_size (now 900" in err and "batch_size (now 128)" in err and "deepclust prepare" in err
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()


def test_the_host_plan_names_each_part_and_passes_what_fits():
    backbone = Backbone("convnet", 64, 128, False, 8)
    method = METHODS["npid"](backbone, 1000, METHODS["npid"].Config())
    plan = plan_training_memory(method, 1000, 64, 32, False)
    need = sum(plan.parts.values()) + 2 * 32 * 3 * 64 * 64 * 4
    check_host_memory(plan, 1, 32, 64, True, free=need + 2**30)  # fits: nothing said
    with pytest.raises(ConfigError) as err:
        check_host_memory(plan, 1, 32, 64, True, free=need // 2)
    message = str(err.value)
    for part in ("state", "activations", "bank logits", "epoch targets", "augmented views", "already in memory",
                 "image_size (now 64", "batch_size (now 32)", "deepclust prepare"):
        assert part in message


def test_default_size_is_the_median_capped_at_the_networks_input(tmp_path, caplog):
    for i, side in enumerate([100, 120, 300, 300, 2000]):
        Image.fromarray(photo(side, side + 10, i)).save(tmp_path / f"{i}.png")
    files = sorted(tmp_path.iterdir())
    with caplog.at_level(logging.INFO):
        assert default_image_size(files, None, "here") == 300
        assert default_image_size(files, "resnet18", "here") == 224
        assert default_image_size(files, "resnet18_cifar", "here") == 32
    assert "capped at resnet18's natural input of 224 px" in caplog.text
    assert default_image_size(files[:2], "resnet50", "here") == 100  # below the cap: the data's own


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    # 48 x 64 decoded whole (no DCT scaling at 32 px): equal to exif_transpose + the same resize, byte for byte
    path = tmp_path / "small.jpg"
    path.write_bytes(jpeg_bytes(photo(48, 64, 1), orientation))
    with Image.open(path) as img:
        expected = old_square(ImageOps.exif_transpose(img), 32)
    got, notes = decode_file(path, 32)
    assert np.array_equal(got, expected)
    assert ("EXIF-rotated" in notes) == (orientation != 1)
    # a phone-sized photo decoded at 1/8 scale: close to the full decode, and far from every other orientation
    big = tmp_path / "big.jpg"
    big.write_bytes(jpeg_bytes(photo(480, 640, 2), orientation))
    got, _ = decode_file(big, 32)
    with Image.open(big) as img:
        full = np.asarray(img.convert("RGB"))
    candidates = {o: old_square(ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg_bytes(full, o)))), 32)
                  for o in range(1, 9)}
    errors = {o: np.abs(got.astype(int) - c.astype(int)).mean() for o, c in candidates.items()}
    assert min(errors, key=errors.get) == orientation
    assert errors[orientation] < 3


def test_every_reading_path_applies_the_orientation(tmp_path):
    folder = tmp_path / "phone"
    folder.mkdir()
    for orientation in (1, 6, 8):  # upright, and a portrait photo held either way
        (folder / f"o{orientation}.jpg").write_bytes(jpeg_bytes(photo(48, 64, 1), orientation))
    loaded = load_data(str(folder), image_size=32)
    prepare_cache(str(folder), tmp_path / "cache", 32)
    cached = load_data(str(tmp_path / "cache"))
    assert torch.equal(cached.images[:], loaded.images)
    for i, orientation in enumerate((1, 6, 8)):
        with Image.open(folder / f"o{orientation}.jpg") as img:
            expected = old_square(ImageOps.exif_transpose(img), 32)
        assert np.array_equal(loaded.images[i].permute(1, 2, 0).numpy(), expected)


def mixed_folder(root: Path, n: int = 70) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        h, w = 24 + (i * 7) % 90, 24 + (i * 13) % 150
        if i % 3:
            (root / f"{i:03d}.jpg").write_bytes(jpeg_bytes(photo(h, w, i), orientation=1 + i % 8))
        else:
            Image.fromarray(photo(h, w, i)).save(root / f"{i:03d}.png")
    (root / "050_bad.jpg").write_bytes(b"\xff\xd8\xff not really")
    return root


def test_one_or_two_workers_decode_the_same_bytes(tmp_path):
    folder = mixed_folder(tmp_path / "mixed")
    one = load_data(str(folder), image_size=40, bad_images="skip", workers=1)
    two = load_data(str(folder), image_size=40, bad_images="skip", workers=2)
    assert torch.equal(one.images, two.images) and one.paths == two.paths and one.skipped == two.skipped
    assert len(one) == 70 and one.skipped[0].endswith("050_bad.jpg")
    for workers in (1, 2):
        prepare_cache(str(folder), tmp_path / f"cache{workers}", 40, bad_images="skip", chunk=16, workers=workers)
    assert (tmp_path / "cache1" / "images.u8").read_bytes() == (tmp_path / "cache2" / "images.u8").read_bytes()
    assert torch.equal(load_data(str(tmp_path / "cache2")).images[:], one.images)


def test_pixels_equal_the_old_path_where_no_dct_scaling_applies(tmp_path):
    # files at most twice the target are decoded whole: every byte as before (orientation 1, 8-bit RGB/L/RGBA)
    folder = tmp_path / "plain"
    folder.mkdir()
    arrays = {"a.jpg": photo(40, 60, 1), "b.png": photo(64, 50, 2), "c.png": photo(30, 30, 3)[..., 1]}
    for name, array in arrays.items():
        Image.fromarray(array).save(folder / name)
    data = load_data(str(folder), image_size=32)
    for i, name in enumerate(sorted(arrays)):
        with Image.open(folder / name) as img:
            assert np.array_equal(data.images[i].permute(1, 2, 0).numpy(), old_square(img, 32))


def odd_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    Image.fromarray(photo(40, 40, 0)).save(root / "a_plain.png")
    Image.fromarray(np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).save(root / "b_deep.png")
    Image.fromarray(photo(40, 40, 1)).convert("CMYK").save(root / "c_cmyk.jpg", quality=95)
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((200, 0, 0), (0, 200, 0))]
    frames[0].save(root / "d_anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(photo(12, 16, 2)).save(root / "e_tiny.png")
    (root / "f_text.jpg").write_text("not a picture")
    whole = jpeg_bytes(photo(40, 40, 3))
    (root / "g_cut.jpg").write_bytes(whole[:len(whole) // 2])
    return root


def test_odd_files_are_handled_or_refused_by_kind(tmp_path):
    folder = odd_folder(tmp_path / "odd")
    data = load_data(str(folder), image_size=32, bad_images="skip")
    assert data.paths == ["a_plain.png", "b_deep.png", "c_cmyk.jpg", "d_anim.gif", "e_tiny.png"]
    assert data.decoding == {"16/32-bit (rescaled to 8 bits)": 1, "CMYK (converted to RGB)": 1,
                             "animated (first frame)": 1, "smaller than the image size (upscaled)": 1,
                             "not an image": 1, "unreadable": 1}
    assert [Path(p).name for p in data.skipped] == ["f_text.jpg", "g_cut.jpg"]
    gif = data.images[3].float().mean(dim=(1, 2))
    assert gif[0] > 150 and gif[1] < 50  # the first (red) frame
    deep = data.images[1, 0].float()
    assert deep.max() > 200 and deep.min() < 30  # rescaled, not clipped to white
    with pytest.raises(DataError, match=r"f_text\.jpg: it is not an image file PIL can read"):
        load_data(str(folder), image_size=32)
    (folder / "f_text.jpg").unlink()
    with pytest.raises(DataError, match=r"cannot read image .*g_cut\.jpg, truncated or corrupt: .* bad_images=skip"):
        load_data(str(folder), image_size=32)
    header = prepare_cache(str(folder), tmp_path / "cache", 32, bad_images="skip")
    assert header["skipped"] == 1 and header["decoding"]["unreadable"] == 1
    assert header["decoding"]["CMYK (converted to RGB)"] == 1
