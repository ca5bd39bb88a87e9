"""Batched augmentation on uint8 image tensors, the same code on CPU and GPU.

METHODS.md's pipeline: RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.4) with p 0.8 in
a random order per image, RandomGrayscale(0.2), horizontal flip. Each op follows torchvision's
definition (checked against ``torchvision.transforms.v2.functional`` in the tests) but draws its
parameters per image and runs on the whole batch at once, so one explicit ``torch.Generator`` makes
every epoch reproducible and the data never needs per-sample Python work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as torchvision: (B,3,H,W) float in [0,1] -> (B,1,H,W)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # What each channel takes in each of the six hue sectors, picked by gather: no lookup table to upload.
    sector = i.unsqueeze(1)
    channels = ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))
    return torch.cat([torch.stack(c, 1).gather(1, sector) for c in channels], 1)


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return blend(x, mean, f.view(-1, 1, 1, 1))


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return blend(x, gray(x), f.view(-1, 1, 1, 1))


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + f.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def sample_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                      gen: torch.Generator, device) -> torch.Tensor:
    """RandomResizedCrop's boxes (top, left, h, w) per image: 10 tries, then the central crop."""
    area = height * width
    tries = 10
    target = area * uniform(n * tries, *scale, gen, device).view(n, tries)
    log_r = uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), gen, device).view(n, tries)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
    rows = torch.arange(n, device=device)
    w = w[rows, first.clamp(min=0)]
    h = h[rows, first.clamp(min=0)]
    # Fallback, as torchvision: whole image clipped to the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    fail = first < 0
    w = torch.where(fail, torch.full_like(w, fw), w)
    h = torch.where(fail, torch.full_like(h, fh), h)
    u = torch.rand(n, 2, generator=gen, device=device)
    top = torch.floor(u[:, 0] * (height - h + 1))
    left = torch.floor(u[:, 1] * (width - w + 1))
    top = torch.where(fail, torch.full_like(top, 0.0) + ((height - h) // 2), top)
    left = torch.where(fail, torch.full_like(left, 0.0) + ((width - w) // 2), left)
    return torch.stack((top, left, h, w), 1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop boxes (top, left, h, w) of a (B,C,H,W) float batch and resize each to size x size (bilinear)."""
    b, _, height, width = x.shape
    top, left, h, w = boxes.unbind(1)
    # affine_grid maps output [-1, 1] to input coordinates; with align_corners=False pixel edges are +-1.
    sx = w / width
    sy = h / height
    cx = (2 * left + w) / width - 1
    cy = (2 * top + h) / height - 1
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = sy, cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class AugmentDraw:
    """One batch's random augmentation parameters, a row per image (``rows`` keeps a slice of them)."""

    boxes: torch.Tensor  # (n, 4) crop boxes (top, left, h, w)
    flip: torch.Tensor  # (n,) bool
    factors: torch.Tensor  # (n, 4) brightness, contrast, saturation, hue
    jitter: torch.Tensor  # (n,) bool: colour jitter applied
    order: torch.Tensor  # (n, 4) the jitter ops' order per image
    to_gray: torch.Tensor  # (n,) bool

    def rows(self, part: slice) -> AugmentDraw:
        return AugmentDraw(*(t[part] for t in (self.boxes, self.flip, self.factors, self.jitter, self.order,
                                               self.to_gray)))


@dataclass
class Augment:
    """Training augmentation of METHODS.md, batched. Call with uint8 (B,3,H,W); returns normalised float.

    ``draw`` then ``apply`` is the same as a call: a distributed run draws the whole global batch's
    parameters on every rank and applies its own rows, so each image is augmented as in one process.
    """

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    flip_p: float = 0.5
    compiled: bool = False  # ``apply`` through torch.compile (compile=true): ~470 small kernels a view become a few
    mean: tuple[float, ...] = MEAN  # the backbone's normalisation (``Backbone.mean`` / ``std``: a timm model's own)
    std: tuple[float, ...] = STD


    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.draw(images.shape[0], images.shape[-2], images.shape[-1], gen, images.device))

    def draw(self, n: int, height: int, width: int, gen: torch.Generator, device) -> AugmentDraw:
        """The random parameters of ``n`` images of height x width, in the generator order of a call."""
        boxes = sample_crop_boxes(n, height, width, self.scale, self.ratio, gen, device)
        flip = torch.rand(n, generator=gen, device=device) < self.flip_p
        b, c, s, h = self.jitter
        factors = torch.stack((
            uniform(n, max(0, 1 - b), 1 + b, gen, device),
            uniform(n, max(0, 1 - c), 1 + c, gen, device),
            uniform(n, max(0, 1 - s), 1 + s, gen, device),
            uniform(n, -h, h, gen, device),
        ), 1)
        jitter = torch.rand(n, generator=gen, device=device) < self.jitter_p
        order = torch.rand(n, 4, generator=gen, device=device).argsort(1)  # a random op order per image
        to_gray = torch.rand(n, generator=gen, device=device) < self.gray_p
        return AugmentDraw(boxes, flip, factors, jitter, order, to_gray)

    def apply(self, images: torch.Tensor, p: AugmentDraw) -> torch.Tensor:
        if len(images) == 0:  # e.g. a view only some rows need, on a rank that has none of them
            return images.new_zeros((0, images.shape[1], self.size, self.size), dtype=torch.float32)
        if self.compiled:
            return compiled_apply()(images, p.boxes, p.flip, p.factors, p.jitter, p.order, p.to_gray, self.size,
                                    mean=self.mean, std=self.std)
        return apply_draw(images, p.boxes, p.flip, p.factors, p.jitter, p.order, p.to_gray, self.size,
                          masked=images.device.type != "cpu", mean=self.mean, std=self.std)


SMALL_CROP_FRACTION = 18 / 32  # solo-learn's CIFAR multi-crop: 18 px small crops of 32 px images (SwAV: 96 of 224)


def small_crop(augment: Augment, size: int | None = None, scale: Sequence[float] = (0.05, 0.14)) -> Augment:
    """Multi-crop's small view (SwAV): a crop of a smaller part of the image (``scale``, SwAV's 0.05-0.14) at a
    smaller size (None: 18/32 of the image size, at least 8), with the same flip, jitter and grey. A method's
    views beyond its large ones use it; the trainer draws and applies each view in one batched call as usual."""
    if size is None:
        size = max(8, round(augment.size * SMALL_CROP_FRACTION))
    return replace(augment, size=size, scale=(float(scale[0]), float(scale[1])))


def apply_draw(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, factors: torch.Tensor,
               jitter: torch.Tensor, order: torch.Tensor, to_gray: torch.Tensor, size: int,
               masked: bool = True, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    """One draw's crop, flip, jitter, grey and normalisation of uint8 images (tensors only: it compiles whole).
    ``masked``: the jitter that reads nothing on the host (a GPU's, and the compiled one's on any device)."""
    p = AugmentDraw(boxes, flip, factors, jitter, order, to_gray)
    x = resized_crop(images.float().div(255), boxes, size, flip)
    x = color_jitter_masked(x, p) if masked else color_jitter_rows(x, p)
    x = torch.where(to_gray.view(-1, 1, 1, 1), gray(x).expand_as(x), x)
    return normalize(x, mean, std)


_COMPILED_APPLY = None


def compiled_apply():
    """``apply_draw`` compiled once a process (dynamic row counts: a last batch and PAD's second view vary)."""
    global _COMPILED_APPLY
    if _COMPILED_APPLY is None:
        _COMPILED_APPLY = torch.compile(apply_draw, dynamic=None)
    return _COMPILED_APPLY


def color_jitter_rows(x: torch.Tensor, p: AugmentDraw) -> torch.Tensor:
    """Each image's four jitter ops in its own order, each op run on just the rows that take it at each step.
    ``nonzero`` reads the row counts on the host: free on the CPU, a device sync on a GPU (16 a view)."""
    for step in range(4):
        for op in range(4):
            rows = torch.nonzero(p.jitter & (p.order[:, step] == op)).flatten()
            if rows.numel():
                x[rows] = COLOR_OPS[op](x[rows], p.factors[rows, op])
    return x


def color_jitter_masked(x: torch.Tensor, p: AugmentDraw) -> torch.Tensor:
    """``color_jitter_rows`` without reading anything on the host: at each step the whole batch goes through one
    blend and one hue shift, and each row keeps what its op at that step gives (no device sync; about 280 small
    kernels a view, where 16 separate masked ops made 505).

    Brightness, contrast and saturation are all ``blend(x, other, f)`` with other = 0, the mean grey level and
    the grey image: one blend with a per-row ``other`` and factor does the three, and a row whose op at this
    step is the hue shift (or that takes no jitter) blends with factor 1, which leaves it exactly as it was."""
    for step in range(4):
        op = torch.where(p.jitter, p.order[:, step], -1)  # -1: no jitter for this row
        factor = p.factors.gather(1, op.clamp(min=0).unsqueeze(1)).squeeze(1)
        factor = torch.where((op >= 0) & (op < 3), factor, torch.ones_like(factor)).view(-1, 1, 1, 1)
        g = gray(x)
        other = torch.where((op == 1).view(-1, 1, 1, 1), g.mean(dim=(1, 2, 3), keepdim=True), g)
        other = torch.where((op == 0).view(-1, 1, 1, 1), torch.zeros_like(other), other)
        x = blend(x, other, factor)
        x = torch.where((op == 3).view(-1, 1, 1, 1), adjust_hue(x, p.factors[:, 3]), x)
    return x


def channel_constant(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """(1, C, 1, 1) of ``values`` on ``like``'s device, filled there: ``torch.tensor(values, device=cuda)``
    would copy from pageable host memory, a device sync on every call."""
    out = like.new_empty((1, len(values), 1, 1))
    for c, value in enumerate(values):
        out[:, c].fill_(value)
    return out


def normalize(x: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    return (x - channel_constant(mean, x)) / channel_constant(std, x)


def test_transform(images: torch.Tensor, size: int, mean: tuple[float, ...] = MEAN,
                   std: tuple[float, ...] = STD) -> torch.Tensor:
    """No augmentation: uint8 (B,3,S,S) -> normalised float (``mean`` / ``std``: the backbone's), resized when S
    differs from ``size``."""
    x = images.float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x, mean, std)
