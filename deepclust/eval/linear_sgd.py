"""Linear probe as the papers train it: SGD on augmented images through the frozen backbone.

UIC's and ODC's linear evaluation (after Zhang et al. and Goyal et al.): the backbone, batch-norm
statistics included, stays frozen in eval mode; one linear layer (no batch norm in front of it) on the
pooled features is trained with SGD, momentum 0.9, on random crops and horizontal flips, the learning rate
divided by 10 at fixed points. The defaults are UIC's schedule (lr 0.1, no weight decay, /10 at epochs 10,
20 and 30 of 32, here as fractions of ``epochs``) with ODC's batch of 256; initial weights N(0, 0.01).
UIC crops 224 of 256 px, 77% of the area: crops here cover 77-100% of the image (any aspect ratio in
3/4-4/3, as RandomResizedCrop) and are resized back to the image size. The test images go through the test
transform (whole image, no augmentation), as the papers' centre crop.

The features are standardised with fixed per-dimension statistics of the un-augmented training images (a
fixed affine map, as in the fast probe; no batch statistics): the raw pooled features here are uncentred
with standard deviations of 0.1-0.3, and SGD at the papers' learning rate does not converge on them in the
few hundred steps a small dataset gives.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import Augment
from ..backbones import Backbone
from ..runtime import host_to_device, native_bf16
from .features import extract_features, inference_trunk, pooled_features

SGD_MILESTONES = (10 / 32, 20 / 32, 30 / 32)  # UIC: /10 at epochs 10, 20 and 30 of 32
CROP_SCALE = (0.77, 1.0)


def sgd_linear_probe(model: Backbone, train_images: torch.Tensor, train_labels: torch.Tensor,
                     test_images: torch.Tensor, test_labels: torch.Tensor, epochs: int = 32, lr: float = 0.1,
                     momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 256,
                     milestones: tuple[float, ...] = SGD_MILESTONES, crop_scale: tuple[float, float] = CROP_SCALE,
                     device: torch.device | str = "cpu", image_size: int | None = None, seed: int = 0) -> float:
    """Top-1 accuracy in percent on ``test_images`` of a linear layer trained with SGD on augmented crops of
    uint8 ``train_images`` through ``model``'s frozen trunk. ``model`` is left unchanged (its weights, batch-norm
    statistics and train/eval mode). Deterministic given ``seed`` on CPU."""
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"the SGD probe needs epochs >= 1, batch_size >= 1 and lr > 0; got epochs={epochs}, "
                         f"batch_size={batch_size}, lr={lr}")
    device = torch.device(device)
    size = image_size or train_images.shape[-1]
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    was_training = model.training
    model.eval()
    trunk = inference_trunk(model)  # eval-mode copy with folded conv-BN: nothing in it is trained
    gen = torch.Generator(device=device).manual_seed(seed)
    init_gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(model.feat_dim, num_classes)
    nn.init.normal_(layer.weight, std=0.01, generator=init_gen)
    nn.init.zeros_(layer.bias)
    layer = layer.to(device)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps = torch.optim.lr_scheduler.MultiStepLR(opt, sorted({round(f * epochs) for f in milestones}), 0.1)
    augment = Augment(size, scale=crop_scale, jitter_p=0.0, gray_p=0.0, mean=model.mean, std=model.std)  # crop, flip
    labels = train_labels.to(device)
    plain = extract_features(model, train_images, "pooled", device=device, image_size=size, normalize=False)
    mean, std = plain.mean(0), plain.std(0).clamp(min=1e-6)
    del plain
    amp = device.type == "cuda" and native_bf16(device)
    for _ in range(epochs):
        order = torch.randperm(train_images.shape[0], generator=gen, device=device)
        host_order = order.cpu()  # once an epoch: the host images are indexed on the host
        for start in range(0, order.numel(), batch_size):
            idx = order[start:start + batch_size]
            x = augment(host_to_device(train_images[host_order[start:start + batch_size]], device), gen)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                feats = pooled_features(model, trunk, x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(layer((feats.float() - mean) / std), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps.step()
    test = extract_features(model, test_images, "pooled", device=device, image_size=size, normalize=False)
    model.train(was_training)
    with torch.no_grad():
        pred = layer((test - mean) / std).argmax(1)
    return 100.0 * int((pred == test_labels.to(device)).sum()) / test_labels.numel()
