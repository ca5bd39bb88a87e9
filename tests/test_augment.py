"""Batched augmentation: each op against torchvision, crops, flips, reproducibility."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from deepclust import augment
from deepclust.augment import (
    MEAN,
    STD,
    Augment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gray,
    hsv_to_rgb,
    normalize,
    resized_crop,
    rgb_to_hsv,
    sample_crop_boxes,
)


@pytest.fixture
def batch() -> torch.Tensor:
    """Random float images in [0, 1], plus a few edge cases: grey, saturated, black, white pixels."""
    x = torch.rand(6, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    x[1] = x[1, :1]  # grey image (r = g = b)
    x[2, :, :3] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure red rows
    x[3, :, :, :2] = 0.0
    x[4, :, :, -2:] = 1.0
    return x


FACTORS = torch.tensor([0.0, 0.6, 1.0, 1.3, 1.4, 2.5])


@pytest.mark.parametrize("ours, theirs", [
    (adjust_brightness, TF.adjust_brightness),
    (adjust_contrast, TF.adjust_contrast),
    (adjust_saturation, TF.adjust_saturation),
])
def test_colour_op_matches_torchvision(batch, ours, theirs):
    out = ours(batch.clone(), FACTORS)
    assert out.shape == batch.shape
    for i, f in enumerate(FACTORS.tolist()):
        expected = theirs(batch[i], f)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_adjust_hue_matches_torchvision(batch):
    factors = torch.tensor([-0.5, -0.31, -0.05, 0.0, 0.22, 0.5])
    out = adjust_hue(batch.clone(), factors)
    for i, f in enumerate(factors.tolist()):
        torch.testing.assert_close(out[i], TF.adjust_hue(batch[i], f), atol=1e-4, rtol=0)


def test_colour_ops_each_image_gets_its_own_factor(batch):
    out = adjust_brightness(batch.clone(), torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(out[0], batch[0])
    assert (out[1] == 0).all()


def test_gray_matches_torchvision(batch):
    torch.testing.assert_close(gray(batch), TF.rgb_to_grayscale(batch), atol=1e-6, rtol=0)


def test_hsv_round_trip(batch):
    hsv = rgb_to_hsv(batch)
    assert hsv.shape == batch.shape
    assert (hsv >= 0).all() and (hsv <= 1).all()
    torch.testing.assert_close(hsv_to_rgb(hsv), batch, atol=1e-5, rtol=0)


def test_hsv_known_colours():
    rgb = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]]).view(4, 3, 1, 1)
    hsv = rgb_to_hsv(rgb).view(4, 3)
    expected = torch.tensor([[0.0, 1, 1], [1 / 3, 1, 1], [2 / 3, 1, 1], [0, 0, 0.5]])
    torch.testing.assert_close(hsv, expected, atol=1e-6, rtol=0)


def test_resized_crop_full_box_is_identity():
    x = torch.rand(3, 3, 8, 10, generator=torch.Generator().manual_seed(1))
    x = x[..., :8]  # square
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]]).expand(3, 4)
    torch.testing.assert_close(resized_crop(x, boxes, 8), x, atol=1e-6, rtol=0)
    no_flip = torch.zeros(3, dtype=torch.bool)
    torch.testing.assert_close(resized_crop(x, boxes, 8, no_flip), x, atol=1e-6, rtol=0)


def test_resized_crop_flip_mirrors():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]]).expand(2, 4)
    out = resized_crop(x, boxes, 8, torch.tensor([True, False]))
    torch.testing.assert_close(out[0], x[0].flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], x[1], atol=1e-6, rtol=0)


def test_resized_crop_sub_box_same_size_is_a_plain_crop():
    x = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(3))
    boxes = torch.tensor([[2.0, 3.0, 8.0, 8.0], [5.0, 0.0, 8.0, 8.0]])
    out = resized_crop(x, boxes, 8)
    torch.testing.assert_close(out[0], x[0, :, 2:10, 3:11], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], x[1, :, 5:13, 0:8], atol=1e-5, rtol=0)


def test_sample_crop_boxes_inside_image_and_in_scale_range():
    gen = torch.Generator().manual_seed(0)
    height, width, scale, ratio = 64, 48, (0.2, 1.0), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(2000, height, width, scale, ratio, gen, "cpu")
    top, left, h, w = boxes.unbind(1)
    assert boxes.shape == (2000, 4)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    assert torch.equal(boxes, boxes.round())
    fallback_h, fallback_w = 64, 48  # 48/64 = 0.75 is within the ratio range: the whole image
    fallback = (h == fallback_h) & (w == fallback_w) & (top == 0) & (left == 0)
    tried = ~fallback
    assert tried.sum() > 1500  # most draws succeed on a 64x48 image
    frac = (h * w / (height * width))[tried]
    # w and h are rounded: allow a rounding margin of a pixel in each side
    assert (frac >= scale[0] * (1 - 2 / 24)).all() and (frac <= scale[1] + 1e-6).all()
    aspect = (w / h)[tried]
    assert (aspect >= ratio[0] * 0.9).all() and (aspect <= ratio[1] / 0.9).all()
    # the boxes are spread: both small and large crops, varied positions
    assert frac.min() < 0.3 and frac.max() > 0.8
    assert top.unique().numel() > 10 and left.unique().numel() > 10


def test_sample_crop_boxes_fallback_is_central_crop_in_ratio():
    gen = torch.Generator().manual_seed(0)
    # scale > 1 can never fit: every image falls back to the central crop clipped to the ratio range
    boxes = sample_crop_boxes(5, 20, 100, (2.0, 3.0), (3 / 4, 4 / 3), gen, "cpu")
    expected = torch.tensor([[0.0, (100 - 27) // 2, 20, 27]]).expand(5, 4)
    assert torch.equal(boxes, expected)
    boxes = sample_crop_boxes(3, 30, 30, (2.0, 3.0), (3 / 4, 4 / 3), gen, "cpu")
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 30.0, 30.0]]).expand(3, 4))


def uint8_batch(n=5, size=16, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_augment_shape_dtype_and_reproducibility():
    images = uint8_batch(5, 20)
    aug = Augment(16)
    a = aug(images, torch.Generator().manual_seed(11))
    b = aug(images, torch.Generator().manual_seed(11))
    c = aug(images, torch.Generator().manual_seed(12))
    assert a.shape == (5, 3, 16, 16)
    assert a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # normalised output: undoing the normalisation lands in [0, 1]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    raw = a * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert images.dtype == torch.uint8  # input left alone


def test_augment_images_differ_within_batch():
    images = uint8_batch(1, 16).expand(8, -1, -1, -1).contiguous()
    out = Augment(16)(images, torch.Generator().manual_seed(0))
    assert not torch.allclose(out[0], out[1])  # per-image parameters, not one draw per batch


def test_augment_with_everything_off_is_normalisation():
    images = uint8_batch(4, 16)
    aug = Augment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=(0.0, 0.0, 0.0, 0.0), gray_p=0.0, flip_p=0.0)
    out = aug(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, normalize(images.float() / 255), atol=1e-5, rtol=0)
    flipped = Augment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=(0.0, 0.0, 0.0, 0.0), gray_p=0.0,
                      flip_p=1.0)(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped, normalize(images.float() / 255).flip(-1), atol=1e-5, rtol=0)


def test_augment_grayscale_always():
    images = uint8_batch(4, 16)
    out = Augment(16, gray_p=1.0)(images, torch.Generator().manual_seed(0))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    raw = out * std + mean
    torch.testing.assert_close(raw[:, 0], raw[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[:, 0], raw[:, 2], atol=1e-5, rtol=0)


def test_test_transform_normalises_and_resizes():
    images = uint8_batch(2, 16)
    out = augment.test_transform(images, 16)
    torch.testing.assert_close(out, normalize(images.float() / 255))
    assert augment.test_transform(images, 8).shape == (2, 3, 8, 8)
    assert images.dtype == torch.uint8


def test_the_augmentation_compiles_as_one_graph_and_equals_the_eager_one():
    """compile=true compiles ``apply_draw`` whole: no graph break (a break would leave its ~400 small kernels a
    view eager), the same pixels. aot_eager traces it as Inductor would without the minutes of C++ codegen."""
    from deepclust.augment import apply_draw

    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (24, 3, 20, 20), dtype=torch.uint8, generator=gen)
    draw = Augment(16).draw(24, 20, 20, gen, "cpu")
    traced = torch.compile(apply_draw, fullgraph=True, backend="aot_eager", dynamic=True)
    got = traced(images, *vars(draw).values(), 16)
    torch.testing.assert_close(got, Augment(16).apply(images, draw), atol=1e-5, rtol=0)  # the CPU's row path
    assert Augment(16, compiled=True).compiled and not Augment(16).compiled
