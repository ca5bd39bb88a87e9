"""What a training run will hold in GPU memory, checked against what the GPU has free before anything is copied
there: the method's state (parameters, gradients, momentum, memory banks and labels), the activations of a
step, its B x N memory-bank logits, the epoch's target features, and the training images."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .backbones import Backbone
from .config import ConfigError
from .methods.base import Method
from .runtime import available_memory

log = logging.getLogger(__name__)

GiB = 2**30
CUDA_OVERHEAD = GiB  # CUDA context, cuDNN and cuBLAS workspaces, allocator slack


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (None on a CPU, or with no GPU to ask)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(device)[0]


def activation_bytes(backbone: Backbone, image_size: int, amp: bool) -> int:
    """Bytes autograd keeps for one image's training forward, counted on the meta device (no memory, no time):
    every tensor saved for backward, halved under bf16 autocast."""
    meta = Backbone(backbone.name, image_size, backbone.embed_dim, backbone.sobel is not None,
                    width=_width(backbone)).to("meta").train()
    saved: dict[int, tuple[torch.Tensor, int]] = {}  # a tensor two ops save (conv output, BN input) counts once

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.setdefault(id(t), (t, t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        meta(torch.empty(2, 3, image_size, image_size, device="meta"))
    return int(sum(size for _, size in saved.values()) / 2 * (0.5 if amp else 1.0))


def _width(backbone: Backbone) -> int:
    """The ConvNet's width, read off its first convolution (other backbones ignore it: a timm model may have
    no convolution at all)."""
    if backbone.name != "convnet":
        return 32
    first = next(m for m in backbone.trunk.modules() if isinstance(m, torch.nn.Conv2d))
    return first.out_channels


@dataclass
class MemoryPlan:
    """Bytes a run will hold on the GPU, by part; ``images`` may instead stay in host memory."""

    parts: dict[str, int]
    images: int

    @property
    def without_images(self) -> int:
        return sum(self.parts.values()) + CUDA_OVERHEAD

    def describe(self) -> str:
        return ", ".join(f"{name} {b / GiB:.2f}" for name, b in {**self.parts, "images": self.images}.items())


def plan_training_memory(method: Method, num_samples: int, image_size: int, batch_size: int, amp: bool) -> MemoryPlan:
    """An estimate of what training ``method`` holds on the GPU: its state exactly (parameters x 3 for their
    gradients and SGD momentum, every buffer), a step's activations (measured on the meta device) for each view,
    four B x N float32 matrices a step for a memory-bank method (logits, softmax, gradient, mask), and three
    copies of the epoch's target features (the feature pass, k-means' working copy, PCA or the graph)."""
    params = sum(p.numel() * p.element_size() for p in method.parameters())
    buffers = sum(b.numel() * b.element_size() for b in method.buffers())
    backbone = method.backbone
    parts = {"state": 3 * params + buffers,
             "activations": method.views * batch_size * activation_bytes(backbone, image_size, amp)}
    if hasattr(method, "bank") or hasattr(method, "memory"):
        parts["bank logits"] = 4 * batch_size * num_samples * 4
    width = backbone.feat_dim if method.eval_feature == "pooled" else backbone.embed_dim
    parts["epoch targets"] = 3 * num_samples * width * 4
    return MemoryPlan(parts, num_samples * 3 * image_size * image_size)


def check_device_memory(plan: MemoryPlan, device: torch.device, free: int | None = None) -> bool:
    """Raise ConfigError, naming the parts and the fixes, when the run cannot fit on ``device``; return whether
    the training images fit beside it (else they stay in host memory, pinned, and each batch is copied)."""
    free = free_device_memory(device) if free is None else free
    if free is None:
        return True
    if plan.without_images > free:
        raise ConfigError(
            f"this run needs about {plan.without_images / GiB:.1f} GiB on {device} ({plan.describe()} GiB, plus "
            f"{CUDA_OVERHEAD / GiB:.0f} GiB for CUDA itself) but {free / GiB:.1f} GiB are free; lower batch_size, "
            "use bank_dtype=float16 (a memory bank in half the memory), a smaller image_size, or subset=N")
    if plan.without_images + plan.images > free:
        log.warning("the training images (%.1f GiB) do not fit beside the run's %.1f GiB on %s (%.1f GiB free): "
                    "they stay in host memory and each batch is copied; for data larger than host memory, "
                    "`deepclust prepare` a cache and set num_workers=4", plan.images / GiB,
                    plan.without_images / GiB, device, free / GiB)
        return False
    return True


HOST_OVERHEAD = GiB // 2  # the allocator's slack, the libraries' working memory, a DataLoader's batches


def check_host_memory(plan: MemoryPlan, views: int, batch_size: int, image_size: int, images_resident: bool,
                      free: int | None = None) -> None:
    """For a run on the CPU, where the OOM killer ends a run that outgrows memory without a word or a
    checkpoint: raise ConfigError, naming the parts and the fixes, when the plan (the GPU's, whose activations
    measured 0.5-1.0x a CPU step's peak) plus the augmented float32 views does not fit in
    ``runtime.available_memory()`` (cgroup limits included). The training images are already decoded when this
    runs, so the memory available has them taken off; they are named, not added."""
    held = f"; the images ({plan.images / GiB:.2f} GiB) are already in memory" if images_resident else ""
    refuse_host({**plan.parts, **view_bytes(views, batch_size, image_size)}, batch_size, image_size, held, free)


def check_host_step(backbone: str, image_size: int, batch_size: int, views: int, amp: bool, width: int,
                    sobel: bool, free: int | None = None) -> None:
    """``check_host_memory``'s test of a step alone, before any image is decoded: a step's activations and views
    depend on the size asked for, not on the data, so a run at image_size=900 is refused in a second, not after
    decoding every file at 900 px."""
    with torch.device("meta"):  # no weights allocated or initialised
        net = Backbone(backbone, image_size, 1, sobel, width)
    parts = {"activations": views * batch_size * activation_bytes(net, image_size, amp),
             **view_bytes(views, batch_size, image_size)}
    refuse_host(parts, batch_size, image_size, "", free)


def view_bytes(views: int, batch_size: int, image_size: int) -> dict[str, int]:
    """A step's augmented float32 views, made and then normalised: two copies."""
    return {"augmented views": 2 * views * batch_size * 3 * image_size**2 * 4}


def refuse_host(parts: dict[str, int], batch_size: int, image_size: int, held: str, free: int | None) -> None:
    free = available_memory() if free is None else free
    need = sum(parts.values()) + HOST_OVERHEAD
    if free is None or need <= free:
        return
    described = ", ".join(f"{name} {b / GiB:.2f}" for name, b in parts.items())
    raise ConfigError(
        f"this run needs about {need / GiB:.1f} GiB of memory on the CPU ({described} GiB, plus "
        f"{HOST_OVERHEAD / GiB:.1f} GiB of working memory){held}, but {free / GiB:.1f} GiB are available; it would "
        f"be killed for lack of memory. Lower image_size (now {image_size}: a step's activations grow with its "
        f"square) or batch_size (now {batch_size}); for images that do not fit, decode them once into a cache "
        f"read from disk: `deepclust prepare SOURCE --out CACHE --size S`, then --data CACHE")
