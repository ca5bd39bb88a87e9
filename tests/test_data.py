"""Data sources: npz, image folders, digits; errors name the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepclust.data import DataError, ImageData, default_test_spec, load_data, parse_spec


def save_image(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode=mode).save(path)
    return path


def solid(h: int, w: int, colour) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, dtype=np.uint8), (h, w, len(colour))).copy()


# --- npz -----------------------------------------------------------------------------------------


def test_npz_grayscale_becomes_rgb(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 12, 12), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "gray.npz", images=images, labels=labels)
    data = load_data(str(tmp_path / "gray.npz"))
    assert data.images.shape == (6, 3, 12, 12)
    assert data.images.dtype == torch.uint8
    for c in range(3):
        assert torch.equal(data.images[:, c], torch.from_numpy(images))
    assert data.labels.tolist() == labels.tolist()
    assert data.labels.dtype == torch.long
    assert data.num_classes == 3
    assert len(data) == 6 and data.image_size == 12


def test_npz_rgba_drops_alpha(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(4, 10, 10, 4), dtype=np.uint8)
    np.savez(tmp_path / "rgba.npz", images=images)
    data = load_data(str(tmp_path / "rgba.npz"))
    assert data.images.shape == (4, 3, 10, 10)
    assert data.images.dtype == torch.uint8
    assert torch.equal(data.images, torch.from_numpy(images[..., :3]).permute(0, 3, 1, 2))
    assert data.labels is None
    assert data.num_classes is None


def test_npz_nchw_rgb_accepted(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(3, 3, 9, 9), dtype=np.uint8)
    np.savez(tmp_path / "nchw.npz", images=images)
    data = load_data(str(tmp_path / "nchw.npz"))
    assert torch.equal(data.images, torch.from_numpy(images))


def test_npz_non_square_is_centre_cropped(tmp_path):
    images = np.zeros((2, 8, 12, 3), dtype=np.uint8)
    images[:, :, :2] = 255  # left two columns white: cropped away (crop keeps columns 2..9)
    images[:, :, 2:10] = 100
    images[:, :, 10:] = 200
    np.savez(tmp_path / "wide.npz", images=images)
    data = load_data(str(tmp_path / "wide.npz"))
    assert data.images.shape == (2, 3, 8, 8)
    assert (data.images == 100).all()


def test_npz_resized_to_image_size(tmp_path):
    images = np.full((2, 8, 8), 77, dtype=np.uint8)
    np.savez(tmp_path / "small.npz", images=images)
    data = load_data(str(tmp_path / "small.npz"), image_size=16)
    assert data.images.shape == (2, 3, 16, 16)
    assert (data.images == 77).all()


def test_npz_all_negative_labels_mean_unlabelled(tmp_path):
    np.savez(tmp_path / "unl.npz", images=np.zeros((3, 4, 4), np.uint8), labels=-np.ones(3, np.int64))
    assert load_data(str(tmp_path / "unl.npz")).labels is None


def test_npz_without_images_key(tmp_path):
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="no 'images'") as err:
        load_data(str(tmp_path / "bad.npz"))
    assert "pixels" in str(err.value)


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="no file"):
        load_data(str(tmp_path / "nothing.npz"))


@pytest.mark.parametrize("arrays,message", [
    ({"images": np.zeros((2, 4, 4), np.float32)}, "uint8"),
    ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.arange(2)}, "2 labels for 3 images"),
    ({"images": np.zeros((0, 4, 4), np.uint8)}, "no images"),
])
def test_npz_bad_contents(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_data(str(tmp_path / "bad.npz"))


# --- image folders -------------------------------------------------------------------------------


def test_image_folder_mixed_formats_sizes_and_modes(tmp_path):
    root = tmp_path / "train"
    # class "a": 12 x 20 (h x w), trained at its shorter side 12 (the median of 12, 24, 18, 16 would be 16).
    wide = np.zeros((12, 20, 3), np.uint8)
    wide[:, :4] = (255, 0, 0)
    wide[:, 4:16] = (0, 200, 0)  # the central 12 columns survive the centre crop
    wide[:, 16:] = (0, 0, 255)
    save_image(root / "a" / "0_wide.png", wide)
    save_image(root / "a" / "1_gray.png", np.full((24, 24), 77, np.uint8), mode="L")
    # class "b": RGBA (alpha dropped) and JPEG at another size.
    rgba = solid(30, 18, (10, 20, 30, 128))
    save_image(root / "b" / "0_rgba.png", rgba, mode="RGBA")
    save_image(root / "b" / "1_solid.jpg", solid(16, 40, (200, 100, 50)))
    assert load_data(str(root)).image_size == 16  # the lower median of the shorter sides
    data = load_data(str(root), image_size=12)
    assert data.images.shape == (4, 3, 12, 12)
    assert data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.classes == ["a", "b"]
    assert data.num_classes == 2
    assert torch.equal(data.images[0], torch.tensor([0, 200, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 12, 12))
    assert (data.images[1] == 77).all()
    assert torch.equal(data.images[2], torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1).expand(3, 12, 12))
    jpeg = data.images[3].int()
    expected = torch.tensor([200, 100, 50]).view(3, 1, 1)
    assert (jpeg - expected).abs().max() <= 6  # lossy, but a solid colour stays close


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    # 16-bit PNGs (mode I;16) hold 0..65535; 8-bit RGB must keep the picture (v / 257), not clip at 255
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    data = load_data(str(tmp_path))
    got = data.images[0, 0].numpy().astype(int)
    assert np.abs(got - np.round(ramp / 257)).max() <= 1


def test_image_folder_image_size_overrides_first_image(tmp_path):
    save_image(tmp_path / "c0" / "x.png", solid(10, 10, (1, 2, 3)))
    save_image(tmp_path / "c1" / "y.png", solid(40, 20, (4, 5, 6)))
    data = load_data(str(tmp_path), image_size=8)
    assert data.images.shape == (2, 3, 8, 8)
    assert data.images[1, :, 0, 0].tolist() == [4, 5, 6]


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"img{i}.png", solid(8, 8, (i, i, i)))
    data = load_data(str(tmp_path))
    assert data.labels is None
    assert data.classes is None
    assert data.images.shape == (3, 3, 8, 8)
    assert data.images[:, 0, 0, 0].tolist() == [0, 1, 2]  # sorted file order


def test_nested_class_subfolders_are_searched(tmp_path):
    save_image(tmp_path / "cat" / "deep" / "er" / "x.png", solid(8, 8, (9, 9, 9)))
    save_image(tmp_path / "dog" / "y.png", solid(8, 8, (5, 5, 5)))
    data = load_data(str(tmp_path))
    assert data.labels.tolist() == [0, 1]
    assert data.classes == ["cat", "dog"]


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no folder") as err:
        load_data(str(tmp_path / "does_not_exist"))
    assert "does_not_exist" in str(err.value)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images") as err:
        load_data(str(tmp_path / "empty"))
    assert "empty" in str(err.value)


def test_folder_with_empty_class_subfolders(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images in them") as err:
        load_data(str(tmp_path))
    assert "cats" in str(err.value) and "dogs" in str(err.value)


def test_file_that_is_not_a_folder_or_npz(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        load_data(str(tmp_path / "file.txt"))


def corrupt_folder(root: Path) -> Path:
    save_image(root / "a" / "0.png", solid(8, 8, (1, 1, 1)))
    (root / "a" / "1_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    save_image(root / "b" / "0.png", solid(8, 8, (2, 2, 2)))
    return root


def test_corrupt_image_fails_by_default(tmp_path):
    root = corrupt_folder(tmp_path)
    with pytest.raises(DataError, match="cannot read image") as err:
        load_data(str(root))
    assert "1_broken.png" in str(err.value)
    assert "skip" in str(err.value)


def test_corrupt_image_skipped_and_counted(tmp_path):
    root = corrupt_folder(tmp_path)
    data = load_data(str(root), bad_images="skip")
    assert len(data) == 2
    assert len(data.skipped) == 1 and data.skipped[0].endswith("1_broken.png")
    assert data.labels.tolist() == [0, 1]  # labels follow the kept images
    assert data.images[:, 0, 0, 0].tolist() == [1, 2]


def test_all_images_corrupt_with_skip(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 1 images"):
        load_data(str(tmp_path), bad_images="skip")


def test_bad_images_value_rejected():
    with pytest.raises(DataError, match="bad_images"):
        load_data("digits", bad_images="ignore")


def test_folder_subset_is_fixed(tmp_path):
    for i in range(12):
        save_image(tmp_path / f"c{i % 3}" / f"{i:02d}.png", solid(6, 6, (i, 0, 0)))
    a = load_data(str(tmp_path), subset=5, subset_seed=3)
    b = load_data(str(tmp_path), subset=5, subset_seed=3)
    full = load_data(str(tmp_path))
    assert len(a) == 5
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # every picked image is a distinct image of the full set with its own label
    ids = a.images[:, 0, 0, 0].tolist()
    assert len(set(ids)) == 5
    for value, label in zip(ids, a.labels.tolist(), strict=True):
        j = full.images[:, 0, 0, 0].tolist().index(value)
        assert full.labels[j] == label
    c = load_data(str(tmp_path), subset=5, subset_seed=4)
    assert not torch.equal(a.images, c.images)


# --- digits and specs ----------------------------------------------------------------------------


def test_digits_splits():
    train = load_data("digits")
    test = load_data("digits:test")
    assert len(train) == 1438 and len(test) == 359
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert train.num_classes == 10 and test.num_classes == 10
    assert set(train.labels.tolist()) == set(range(10))
    assert train.name == "digits:train" and test.name == "digits:test"
    # the split is an interleaved partition of sklearn's 1797 digits: no image in both
    from sklearn.datasets import load_digits

    assert len(train) + len(test) == len(load_digits().target)
    assert load_data("digits", split="test").images.shape == test.images.shape


def test_digits_bad_split():
    with pytest.raises(DataError, match="train and test"):
        load_data("digits:extra")


def test_subset_is_fixed_and_labelled():
    full = load_data("digits")
    a = load_data("digits", subset=50, subset_seed=7)
    b = load_data("digits", subset=50, subset_seed=7)
    c = load_data("digits", subset=50, subset_seed=8)
    assert len(a) == 50
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    # the subset's rows are rows of the full set, with their labels
    flat = full.images.flatten(1)
    for img, label in zip(a.images.flatten(1), a.labels, strict=True):
        match = (flat == img).all(1).nonzero().flatten()
        assert match.numel() >= 1
        assert label in full.labels[match]
    assert len(load_data("digits", subset=5000)) == 1438  # larger than the data: everything


def test_image_data_subset():
    data = ImageData(torch.arange(4).view(4, 1, 1, 1).expand(4, 3, 2, 2).to(torch.uint8),
                     torch.tensor([3, 2, 1, 0]), "x")
    sub = data.subset(torch.tensor([1, 3]))
    assert sub.images[:, 0, 0, 0].tolist() == [1, 3]
    assert sub.labels.tolist() == [2, 0]


def test_default_test_spec(tmp_path):
    assert default_test_spec("digits") == "digits:test"
    assert default_test_spec("digits:train") == "digits:test"
    assert default_test_spec("cifar10:/data/c10") == "cifar10:/data/c10:test"
    assert default_test_spec("cifar10:/data/c10:train") == "cifar10:/data/c10:test"
    assert default_test_spec("cifar10:/data/c10:test") is None
    assert default_test_spec(str(tmp_path / "x.npz")) is None
    (tmp_path / "train").mkdir()
    assert default_test_spec(str(tmp_path / "train")) is None
    (tmp_path / "val").mkdir()
    assert default_test_spec(str(tmp_path / "train")) == str(tmp_path / "val")
    (tmp_path / "test").mkdir()
    assert default_test_spec(str(tmp_path / "train")) == str(tmp_path / "test")


def test_parse_spec():
    assert parse_spec("digits", "train") == ("digits", None, "train")
    assert parse_spec("digits:test", "train") == ("digits", None, "test")
    assert parse_spec("stl10:/d/stl:unlabeled", "train") == ("stl10", "/d/stl", "unlabeled")
    assert parse_spec("mnist:/d/m", "test") == ("mnist", "/d/m", "test")
    assert parse_spec("/a/b.npz", "train") == ("npz", "/a/b.npz", "train")
    assert parse_spec("/a/images", "train") == ("folder", "/a/images", "train")
    with pytest.raises(DataError, match="give the folder"):
        parse_spec("cifar10", "train")


def test_torchvision_source_missing_root(tmp_path):
    with pytest.raises(DataError, match="never downloads"):
        load_data(f"cifar10:{tmp_path / 'absent'}")
    with pytest.raises(DataError, match="never downloads"):
        load_data(f"cifar10:{tmp_path}")  # folder exists, files do not
