"""A ResNet backbone in the files Detectron2 and mmdetection load, so their users can run the papers' detection
configs on it themselves.

Detectron2: the names its ``ResNet`` has (``stem.conv1``, ``res2.0.conv1``, ``conv1.norm`` for a conv's
BatchNorm, ``shortcut`` / ``shortcut.norm`` for the projection), renamed from torchvision's exactly as
Detectron2's ``tools/convert-torchvision-to-d2.py`` does, written as that script writes them: a plain pickle
of ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}`` (a ``.pkl``; the heuristics
map ``res2.0.conv1`` onto ``backbone.bottom_up.res2.0.conv1``). BatchNorm's ``num_batches_tracked`` is left
out: Detectron2's FrozenBatchNorm2d has none.

mmdetection: its ``ResNet`` (``style='pytorch'``) has torchvision's names; the file is ``torch.save`` of
``{"state_dict": state, "meta": ...}``, which ``init_cfg=dict(type='Pretrained', checkpoint=FILE)`` loads.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError

FRAMEWORK_FORMATS = ("detectron2", "mmdetection")
RESNET_NAMES = ("resnet18", "resnet50")


def detectron2_name(name: str) -> str:
    """torchvision's ResNet parameter name as Detectron2's (the convert-torchvision-to-d2 mapping)."""
    if "layer" not in name:
        name = "stem." + name
    for t in (1, 2, 3, 4):
        name = name.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        name = name.replace(f"bn{t}", f"conv{t}.norm")
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def detectron2_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A torchvision ResNet state (no classifier) under Detectron2's names, as float32 numpy arrays."""
    return {detectron2_name(k): v.detach().cpu().float().numpy() for k, v in state.items()
            if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}


def check_resnet(name: str, state: dict[str, torch.Tensor], fmt: str) -> None:
    """Refuse a backbone the framework's ResNet cannot hold: not a ResNet, or one with the CIFAR stem."""
    if name not in (*RESNET_NAMES, "resnet18_cifar"):
        raise CheckpointError(f"--format {fmt} writes a ResNet under {fmt}'s names; backbone {name} has none. Train "
                              "a resnet50 or resnet18 (image_size >= 64), or use --format safetensors")
    if state["conv1.weight"].shape[-1] != 7:
        raise CheckpointError(f"this {name} has the CIFAR stem (a 3x3 conv1, no max-pool: trained below 64 px), "
                              f"which {fmt}'s ResNet stem (7x7, stride 2) cannot take; train at image_size >= 64 with "
                              "--backbone resnet18 or resnet50 for a file it loads")


def write_framework_file(state: dict[str, torch.Tensor], name: str, out: Path, fmt: str,
                         mean: tuple[float, ...], std: tuple[float, ...], meta: dict[str, Any]) -> str:
    """Write ``state`` (torchvision's names) for ``fmt``; returns how to use the file (config lines)."""
    check_resnet(name, state, fmt)
    depth = 18 if "layer1.0.conv3.weight" not in state else 50
    out.parent.mkdir(parents=True, exist_ok=True)
    pixel_mean = [round(255 * m, 3) for m in mean]
    pixel_std = [round(255 * s, 3) for s in std]
    if fmt == "detectron2":
        with open(out, "wb") as f:  # Detectron2 reads a .pkl with pickle.load; plain numpy arrays only
            pickle.dump({"model": detectron2_state(state), "__author__": f"deepclust ({meta.get('method')})",
                         "matching_heuristics": True}, f)
        res2 = " MODEL.RESNETS.RES2_OUT_CHANNELS 64" if depth == 18 else ""
        return (f"# Detectron2 (torchvision's stride in the 3x3 conv, RGB input, this normalisation):\n"
                f"python tools/train_net.py --config-file configs/PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml \\\n"
                f"  MODEL.WEIGHTS {out} MODEL.RESNETS.DEPTH {depth}{res2} MODEL.RESNETS.STRIDE_IN_1X1 False \\\n"
                f"  INPUT.FORMAT RGB MODEL.PIXEL_MEAN \"{pixel_mean}\" MODEL.PIXEL_STD \"{pixel_std}\"")
    torch.save({"state_dict": {k: v.contiguous() for k, v in state.items() if not k.startswith("fc.")},
                "meta": {"deepclust": meta}}, out)
    return (f"# mmdetection config (ResNet-{depth}, style='pytorch' as torchvision's):\n"
            f"model = dict(backbone=dict(depth={depth}, style='pytorch', "
            f"init_cfg=dict(type='Pretrained', checkpoint='{out}')),\n"
            f"             data_preprocessor=dict(mean={pixel_mean}, std={pixel_std}, bgr_to_rgb=True))")


class NumpyUnpickler(pickle.Unpickler):
    """Reads back a Detectron2 file of plain numpy arrays and nothing else (no code runs)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array part; refusing to load it")
        return super().find_class(module, name)


def read_detectron2_file(path: str | Path) -> dict[str, Any]:
    """A Detectron2 weight file of numpy arrays (as ``write_framework_file`` writes), read without running code."""
    return NumpyUnpickler(io.BytesIO(Path(path).read_bytes())).load()
