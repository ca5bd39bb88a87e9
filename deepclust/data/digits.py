"""scikit-learn's bundled 8x8 digits, upsampled to 32x32 (no file needed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .images import DataError, ImageData


def load_digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    images = torch.from_numpy(digits.images).float().mul(255 / 16).unsqueeze(1)
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    # A fixed interleaved split: every 5th image is a test image (1438 train, 359 test).
    is_test = torch.arange(len(labels)) % 5 == 4
    if split not in ("train", "test"):
        raise DataError(f"digits has splits train and test, not {split!r}")
    keep = is_test if split == "test" else ~is_test
    return ImageData(images[keep], labels[keep], f"digits:{split}", [str(i) for i in range(10)])
