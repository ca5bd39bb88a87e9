"""The trained backbone alone, for the tools a user runs next: torchvision key names, safetensors by default.

ResNets and VGG keep torchvision's parameter names, so the exported state_dict loads with ``strict=True``
into ``torchvision.models.<name>()`` once its classifier is replaced by ``nn.Identity()`` (method heads,
memory banks and optimiser state are not exported); a ``timm:NAME`` backbone keeps timm's, and loads strictly
into ``timm.create_model(NAME, num_classes=0)`` (a ViT: with ``img_size`` its training size, whose grid its
position embeddings have). ``load_backbone`` rebuilds any exported backbone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .backbones import Sobel, build_trunk, normalization, timm_build_kwargs, timm_name
from .checkpoint import FORMAT, CheckpointError, backbone_from_checkpoint, load_checkpoint
from .config import ConfigError
from .transfer.frameworks import FRAMEWORK_FORMATS, write_framework_file

EXPORT_FORMAT = "deepclust-backbone/1"
FORMATS = ("safetensors", "torchvision", "timm", "detectron2", "mmdetection")
TORCHVISION_NAMES = {"resnet50": "resnet50", "resnet18": "resnet18", "resnet18_cifar": "resnet18",
                     "vgg16_bn": "vgg16_bn"}
FILE_KIND = {"safetensors": "safetensors", "torchvision": "torch pickle", "timm": "safetensors",  # what is written
             "detectron2": "numpy pickle", "mmdetection": "torch pickle"}
SUFFIX_FORMATS = {".safetensors": "safetensors", ".pth": "torchvision", ".pt": "torchvision", ".pkl": "detectron2"}


def small_stem(state: dict[str, torch.Tensor]) -> bool:
    """A ResNet trained on small images has a 3x3 stride-1 conv1 and no max-pool (the CIFAR stem)."""
    return "conv1.weight" in state and state["conv1.weight"].shape[-1] == 3


def how_to_load_timm(name: str, image_size: int, path: str) -> str:
    """Python lines that load a timm backbone's export into timm's model (``img_size`` where the model has one:
    a ViT's position embeddings are those of its training size)."""
    from .backbones import import_timm

    model = timm_name(name)
    kwargs = timm_build_kwargs(import_timm(name), model, 3, image_size)
    size = f", img_size={image_size}" if "img_size" in kwargs else ""
    return (f"import timm\nfrom safetensors.torch import load_file\n"
            f"model = timm.create_model({model!r}, num_classes=0{size})  # pooled features, no classifier\n"
            f"model.load_state_dict(load_file({path!r}), strict=True)")


def how_to_load(name: str, state: dict[str, torch.Tensor], sobel: bool, fmt: str, path: str,
                image_size: int = 224) -> str:
    """Python lines that load the exported file into torchvision's (or timm's) model of the same architecture."""
    if timm_name(name) is not None and not sobel:
        return how_to_load_timm(name, image_size, path)
    tv = TORCHVISION_NAMES.get(name)
    if tv is None or sobel:
        why = "Sobel input" if sobel else "no torchvision counterpart"
        return f"import deepclust\nmodel = deepclust.load_backbone({path!r})  # {name}, {why}"
    read = ("state = torch.load(path, weights_only=True)" if fmt == "torchvision"
            else "from safetensors.torch import load_file\nstate = load_file(path)")
    if fmt == "timm":
        build = f"import timm\nmodel = timm.create_model({tv!r}, num_classes=0)  # its ResNets use torchvision's names"
    else:
        build = f"model = torchvision.models.{tv}()"
        build += ("\nmodel.avgpool = nn.AdaptiveAvgPool2d(1)\nmodel.classifier = nn.Identity()" if tv == "vgg16_bn"
                  else "\nmodel.fc = nn.Identity()  # the backbone's pooled features, no classifier")
    if small_stem(state):
        build += ("\nmodel.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # trained on small images: CIFAR stem"
                  "\nmodel.maxpool = nn.Identity()")
    return (f"import torch, torch.nn as nn, torchvision\npath = {path!r}\n{read}\n{build}\n"
            "model.load_state_dict(state, strict=True)")


def torchvision_names(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """A trunk's state under torchvision's names: deepclust's VGG trunk is Sequential(features, pool, flatten),
    so its ``0.N`` is torchvision's ``features.N``; the ResNets' names are torchvision's already."""
    if name != "vgg16_bn":
        return state
    return {"features." + k[2:]: v for k, v in state.items() if k.startswith("0.")}


def trunk_names(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """``torchvision_names`` undone: a state under torchvision's names, as deepclust's trunk holds it."""
    if name != "vgg16_bn":
        return state
    return {"0." + k[len("features."):]: v for k, v in state.items()}


def export_format(out: str | Path, fmt: str | None = None) -> str:
    """``fmt``, or the one ``out``'s suffix names (.safetensors, .pt / .pth; else safetensors); a format whose
    file kind the suffix contradicts (a torchvision pickle named .safetensors, ...) is a ConfigError."""
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    suffix = Path(out).suffix.lower()
    implied = SUFFIX_FORMATS.get(suffix)
    if fmt is None:
        return implied or "safetensors"
    if implied is not None and FILE_KIND[fmt] != FILE_KIND[implied]:
        fix = ".safetensors" if FILE_KIND[fmt] == "safetensors" else ".pkl" if fmt == "detectron2" else ".pth"
        raise ConfigError(f"--format {fmt} writes a {FILE_KIND[fmt]} file, but {out} is named as a "
                          f"{FILE_KIND[implied]} one; name it *{fix}, or pass --format {implied}")
    return fmt


def export_backbone(checkpoint: str | Path, out: str | Path, fmt: str | None = None) -> str:
    """Write the checkpoint's backbone to ``out``; returns how to load it (Python lines). ``fmt``: see
    ``export_format`` (None: from the suffix)."""
    fmt = export_format(out, fmt)
    payload = load_checkpoint(checkpoint)
    spec = payload["backbone"]
    name = spec["name"]
    if fmt in FRAMEWORK_FORMATS:  # Detectron2's / mmdetection's ResNet names (transfer/frameworks.py)
        if spec["sobel"]:
            raise CheckpointError(f"backbone {name} with Sobel input has no {fmt} counterpart; use --format "
                                  "safetensors")
        trunk = backbone_from_checkpoint(payload).trunk
        return write_framework_file(trunk.state_dict(), name, Path(out), fmt, *normalization(trunk),
                                    {"backbone": name, "method": payload["method"], "image_size": spec["image_size"]})
    if timm_name(name) is not None:
        if spec["sobel"] and fmt != "safetensors":
            raise CheckpointError(f"backbone {name} with Sobel input has no timm counterpart; export with --format "
                                  "safetensors and load it with deepclust.load_backbone")
        if fmt == "torchvision":
            raise CheckpointError(f"backbone {name} has no torchvision counterpart; use --format timm (a safetensors "
                                  "file under timm's names, as --format safetensors writes)")
    elif fmt != "safetensors" and (name not in TORCHVISION_NAMES or spec["sobel"]):
        raise CheckpointError(f"backbone {name}{' with Sobel input' if spec['sobel'] else ''} has no {fmt} "
                              "counterpart; export with --format safetensors and load it with deepclust.load_backbone")
    if fmt == "timm" and name == "vgg16_bn":
        raise CheckpointError("timm's VGG adds pre-logits layers this export does not have; use --format torchvision")
    trunk = backbone_from_checkpoint(payload).trunk
    state = torchvision_names({k: v.contiguous() for k, v in trunk.state_dict().items()}, name)
    mean, std = normalization(trunk)
    meta = {"format": EXPORT_FORMAT, "backbone": name, "image_size": spec["image_size"], "sobel": spec["sobel"],
            "width": spec["width"], "method": payload["method"], "torchvision": TORCHVISION_NAMES.get(name),
            "timm": timm_name(name),
            "input": f"RGB in [0, 1], normalised with mean {list(mean)} and std {list(std)}, "
                     f"{spec['image_size']}x{spec['image_size']}"}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchvision":
        torch.save(state, out)  # a plain state_dict: torch.load(weights_only=True) reads it
    else:
        from safetensors.torch import save_file

        save_file(state, str(out), metadata={k: json.dumps(v) for k, v in meta.items()})
    return how_to_load(name, state, spec["sobel"], fmt, str(out), spec["image_size"])


def load_backbone(path: str | Path) -> nn.Module:
    """A ready backbone in eval mode from an exported ``.safetensors`` file or a deepclust checkpoint: it maps
    normalised images (B, 3, S, S) to pooled features (B, D). ``module.deepclust`` holds the file's metadata
    (``input``: the normalisation, a timm model's own)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no file {path}")
    if path.suffix != ".safetensors":
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(payload, dict) and payload.get("format") == FORMAT):
            raise CheckpointError(f"{path} is neither a deepclust checkpoint nor a .safetensors export; a "
                                  "torchvision-format export loads into torchvision's model (see deepclust export)")
        backbone = backbone_from_checkpoint(payload)
        module = nn.Sequential(backbone.sobel, backbone.trunk) if backbone.sobel is not None else backbone.trunk
        module.deepclust = {"backbone": backbone.name, **payload["backbone"], "method": payload["method"]}
        return module.eval()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a deepclust backbone export (no {EXPORT_FORMAT!r} metadata)")
    state = trunk_names(state, meta["backbone"])
    trunk, _ = build_trunk(meta["backbone"], 2 if meta["sobel"] else 3, meta["image_size"], meta["width"])
    trunk.load_state_dict(state, strict=True)
    module = nn.Sequential(Sobel(), trunk) if meta["sobel"] else trunk
    module.deepclust = meta
    return module.eval()
