"""Backbone files of any origin, for ``train --init`` and ``--checkpoint`` of eval, embed and cluster.

A file is one of: a deepclust training checkpoint, a ``deepclust export`` (safetensors with metadata, or a
torchvision-format ``.pth``), or a plain torchvision / timm state_dict (``.pth``, ``.pt``, ``.bin`` or
``.safetensors``) of a supported backbone: resnet18, resnet50 (either stem) or vgg16_bn, or, with
``--backbone timm:NAME``, of any timm model (timm's names, and the names DINOv2's and OpenAI / OpenCLIP CLIP
files use, converted as timm converts them; see ``timm_state``). Nothing is unpickled: torch files load with
``weights_only=True``, safetensors hold tensors only.

``read_backbone_file`` returns the trunk's tensors under torchvision's names (VGG: ``features.N``) and what
the file looks like (architecture, stem, Sobel input); ``load_trunk`` loads them strictly into a
``Backbone``, naming missing, unexpected and mis-shaped keys. The classifier of a torchvision or timm file
(``fc.*``, ``classifier.*``, timm's ``head.*`` / ``pre_logits.*``) is dropped: deepclust's 128-d embedding
head, the method's heads and memory banks start fresh, except that a deepclust checkpoint brings its head.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backbones import TIMM_PREFIX, Backbone, check_input_size, timm_default_size, timm_name
from .checkpoint import FORMAT, CheckpointError, backbone_from_checkpoint, check_compatible, load_checkpoint
from .config import ConfigError
from .export import EXPORT_FORMAT, torchvision_names, trunk_names

log = logging.getLogger(__name__)

CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "pre_logits.")  # torchvision's and timm's, not the trunk
WRAPPER_KEYS = ("state_dict", "model", "module")  # {"state_dict": {...}}: how many training scripts save
IMAGENET_SIZE, CIFAR_SIZE = 224, 32  # what a plain file's net was trained at, by its stem (the default input size)
STEM_FROM = 64  # resnet18 / resnet50 build the ImageNet stem from this image size on (backbones.resnet)
RESNET_DEPTHS = {(False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34, (True, (3, 4, 6, 3)): 50,
                 (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152}
SHOWN = 4  # keys named in an error: the first few say which architecture it was


@dataclass
class BackboneFile:
    """What a backbone file holds: ``state`` is the trunk alone, under torchvision's names."""

    path: Path
    kind: str  # "checkpoint" | "export" | "state_dict"
    state: dict[str, torch.Tensor]
    looks_like: str  # from the keys and shapes: "resnet18, ImageNet 7x7 stem", "vgg11", ...
    name: str | None  # the deepclust backbone whose trunk this is; None: none of them
    stem: str | None = None  # ResNets: "imagenet" (7x7 conv + max-pool) or "cifar" (3x3, stride 1, no max-pool)
    sobel: bool = False  # the first conv takes the 2 Sobel channels
    image_size: int | None = None  # the training size, where deepclust wrote the file
    width: int | None = None
    embed_dim: int | None = None
    method: str | None = None
    dropped: list[str] = field(default_factory=list)  # the file's classifier keys, not loaded
    head: dict[str, torch.Tensor] | None = None  # deepclust's embedding head (checkpoints only)
    payload: dict[str, Any] | None = None  # the whole checkpoint
    full_state: dict[str, torch.Tensor] | None = None  # every tensor, the classifier's too (for timm_state)

    @property
    def description(self) -> str:
        what = {"checkpoint": f"a deepclust checkpoint of {self.method}",
                "export": f"a deepclust export of {self.method}", "state_dict": "a plain state_dict"}[self.kind]
        size = f", trained at {self.image_size} px" if self.image_size else ""
        return f"{what}: {self.looks_like}{', Sobel input' if self.sobel else ''}{size}"


def is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header (a torch file is a zip)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def read_raw(path: Path) -> tuple[Any, dict[str, str]]:
    """The file's object (a dict of tensors, or a checkpoint) and its safetensors metadata ({} for torch files)."""
    if is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:
            raise CheckpointError(f"cannot read {path} as safetensors: {err}") from err
    try:
        try:  # mmap: a large checkpoint is read once, by load_checkpoint, which also checks its digest
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), {}
        except RuntimeError:  # the pre-zip torch.save format cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as err:  # corrupt, or a pickle of arbitrary objects (a whole nn.Module): never unpickled
        if "weights_only" in str(err).lower().replace(" ", "_"):
            raise CheckpointError(f"{path} holds pickled Python objects (a whole model?), which deepclust never "
                                  "unpickles: where you trust the file, load it and save model.state_dict() with "
                                  "torch.save, and pass that file") from err
        with open(path, "rb") as f:
            if f.read(2) == b"PK":  # a torch (zip) file that does not read: damaged; say so as a checkpoint would
                load_checkpoint(path)
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"cannot read {path}: neither a torch file of tensors nor safetensors, or damaged "
                              f"({type(err).__name__}: {first})") from err


def plain_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The dict of tensors in ``obj``: itself, or under one of WRAPPER_KEYS; a DataParallel ``module.`` prefix
    is taken off."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise CheckpointError(f"{path} holds no state_dict of tensors (top-level keys: "
                                  f"{', '.join(map(str, list(obj)[:8]))}); save model.state_dict() of the network")
        obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict of tensors ({type(obj).__name__})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def identify(state: dict[str, torch.Tensor]) -> tuple[str, str | None, str | None, bool]:
    """(what the keys look like, the deepclust backbone name or None, the ResNet stem or None, Sobel input)."""
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        conv1 = state["conv1.weight"]
        stem = {7: "imagenet", 3: "cifar"}.get(conv1.shape[-1])
        bottleneck = "layer1.0.conv3.weight" in state
        blocks = tuple(1 + max((int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")), default=-1)
                       for i in range(1, 5))
        depth = RESNET_DEPTHS.get((bottleneck, blocks))
        # wide ResNets and ResNeXts share resnet50's keys; their first block is wider than 64 channels
        standard = state["layer1.0.conv1.weight"].shape[0] == 64
        arch = f"resnet{depth}" if depth and standard else f"a ResNet variant ({'x'.join(map(str, blocks))} blocks)"
        stem_words = {"imagenet": "ImageNet 7x7 stem", "cifar": "CIFAR 3x3 stem"}.get(
            stem or "", f"a {conv1.shape[-1]}x{conv1.shape[-1]} stem")
        name = None
        if standard and depth == 18:
            name = "resnet18" if stem == "imagenet" else "resnet18_cifar" if stem == "cifar" else None
        elif standard and depth == 50 and stem:
            name = "resnet50"
        return f"{arch}, {stem_words}", name, stem, conv1.shape[1] == 2
    convs = [k for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4]
    if convs:
        bn = any(k.startswith("features.") and k.endswith(".running_mean") for k in state)
        arch = f"vgg{len(convs) + 3}{'_bn' if bn else ''}"  # 13 convs + 3 classifier layers: VGG-16
        first = state.get("features.0.weight")
        return arch, "vgg16_bn" if arch == "vgg16_bn" else None, None, first is not None and first.shape[1] == 2
    return f"an unknown architecture (keys {', '.join(list(state)[:SHOWN])}, ...)", None, None, False


def meta_value(text: str) -> Any:
    """A safetensors metadata value: deepclust's are JSON, other writers' plain strings (timm: "pt")."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_backbone_file(path: str | Path) -> BackboneFile:
    """The trunk's tensors of any backbone file, with what it looks like (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no file {path}")
    obj, raw_meta = read_raw(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        payload = load_checkpoint(path)  # read in full, its digest checked
        spec = payload["backbone"]
        state = {k[len("backbone.trunk."):]: v for k, v in payload["state"].items() if k.startswith("backbone.trunk.")}
        head = {k[len("backbone.head."):]: v for k, v in payload["state"].items() if k.startswith("backbone.head.")}
        state = torchvision_names(state, spec["name"])
        looks, _, stem, _ = identify(state)
        looks = looks if spec["name"].startswith(("resnet", "vgg")) else spec["name"]  # ConvNet, AlexNet: Sequential
        return BackboneFile(path, "checkpoint", state, looks,
                            spec["name"], stem, spec["sobel"], spec["image_size"], spec["width"], spec["embed_dim"],
                            payload["method"], head=head, payload=payload, full_state=state)
    meta = {k: meta_value(v) for k, v in raw_meta.items()}
    state = full_state = plain_state(obj, path)
    dropped = [k for k in state if k.startswith(CLASSIFIER_PREFIXES)]
    state = {k: v for k, v in state.items() if k not in dropped}
    if meta.get("format") == EXPORT_FORMAT:
        name = meta["backbone"]
        looks, _, stem, _ = identify(state)
        looks = looks if name.startswith(("resnet", "vgg")) else name
        return BackboneFile(path, "export", state, looks, name, stem, bool(meta.get("sobel")), meta.get("image_size"),
                            meta.get("width"), method=meta.get("method"), dropped=dropped, full_state=full_state)
    looks, name, stem, sobel = identify(state)
    return BackboneFile(path, "state_dict", state, looks, name, stem, sobel, dropped=dropped, full_state=full_state)


def listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def stem_error(file: BackboneFile, backbone: Backbone, image_size: int, size_flag: str) -> CheckpointError:
    """A ResNet file (resnet18 or resnet50) whose stem the backbone built at ``image_size`` lacks, with the fix."""
    depth = "resnet50" if file.name == "resnet50" else "resnet18"
    if file.stem == "imagenet":
        fix = (f"use --backbone {depth} at an image size of {STEM_FROM} or more ({size_flag.format(IMAGENET_SIZE)}; "
               f"images are resized): resnet18 and resnet50 build the ImageNet stem from {STEM_FROM} px, "
               "resnet18_cifar never")
        have = "an ImageNet 7x7 stem (+ max-pool)"
    else:
        fix = (f"use --backbone resnet18_cifar, or resnet18 below {STEM_FROM} px ({size_flag.format(CIFAR_SIZE)})"
               if depth == "resnet18" else f"use --backbone resnet50 below {STEM_FROM} px "
               f"({size_flag.format(CIFAR_SIZE)})")
        have = "the CIFAR 3x3 stem (no max-pool)"
    built = "the ImageNet 7x7" if backbone.trunk.conv1.kernel_size == (7, 7) else "the CIFAR 3x3"
    return CheckpointError(f"{file.path} has {have}, but backbone {backbone.name} at {image_size} px has {built} "
                           f"stem: {fix}")


def classifier_prefixes(trunk: torch.nn.Module) -> tuple[str, ...]:
    """The key prefixes of a timm model's classifier (its config's ``classifier``: ``head``, ConvNeXt's
    ``head.fc``, ResNet's ``fc``; DeiT's two heads), which its ``num_classes=0`` trunk does not have."""
    names = (getattr(trunk, "pretrained_cfg", None) or {}).get("classifier") or ()
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))


def timm_state(trunk: torch.nn.Module, state: dict[str, torch.Tensor], path: Path
               ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` under the timm model's own names, and the classifier keys left out. timm's converter for the
    model's family (``checkpoint_filter_fn``: DINOv2's and OpenAI / OpenCLIP CLIP's names, position embeddings
    resampled to the grid of this image size) runs first; a file it cannot read is compared as it is. Patches of
    another size are refused (timm would resample the patch embedding: another network)."""
    mine = trunk.state_dict()
    kernel = state.get("patch_embed.proj.weight")
    if kernel is not None and "patch_embed.proj.weight" in mine and kernel.dim() == 4 and \
            kernel.shape[-2:] != mine["patch_embed.proj.weight"].shape[-2:]:
        raise CheckpointError(f"{path} cuts images into {kernel.shape[-1]}x{kernel.shape[-2]} patches, the backbone "
                              f"into {mine['patch_embed.proj.weight'].shape[-1]}x"
                              f"{mine['patch_embed.proj.weight'].shape[-2]}: pass the timm:NAME of the file's model "
                              f"(e.g. a _patch{kernel.shape[-1]} one)")
    converter = getattr(sys.modules.get(type(trunk).__module__), "checkpoint_filter_fn", None)
    if converter is not None:
        try:
            state = converter(dict(state), trunk)
        except Exception as err:  # a file of another family: its keys are named below
            log.debug("timm's converter did not take %s: %s", path, err)
    prefixes = classifier_prefixes(trunk)
    dropped = [k for k in state if k not in mine and k.startswith(prefixes)]
    return {k: v for k, v in state.items() if k not in dropped}, dropped


def load_timm_trunk(backbone: Backbone, file: BackboneFile) -> str:
    """``load_trunk`` for a ``timm:NAME`` backbone: the file's tensors (``timm_state``) into the timm model,
    strictly, naming missing, unexpected and mis-shaped keys."""
    state, dropped = timm_state(backbone.trunk, file.full_state if file.full_state is not None else file.state,
                                file.path)
    want = backbone.trunk.state_dict()
    counters = {k: v for k, v in want.items() if k.endswith("num_batches_tracked") and k not in state}
    missing = [k for k in want if k not in state and k not in counters]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} (the backbone's: {tuple(want[k].shape)})" for k in want
              if k in state and state[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        parts = ([f"missing keys {listed(missing)}"] if missing else []) + \
            ([f"unexpected keys {listed(unexpected)}"] if unexpected else []) + \
            ([f"other shapes {listed(shapes)}"] if shapes else [])
        raise CheckpointError(f"{file.path} does not fit backbone {backbone.name}: {'; '.join(parts)}. Pass the "
                              f"{TIMM_PREFIX}NAME of the model the file was saved from (it looks like "
                              f"{file.looks_like})")
    backbone.trunk.load_state_dict({**state, **counters}, strict=True)
    what = file.description if file.kind != "state_dict" else f"a plain state_dict of {backbone.name}"
    loaded = f"{len(state)} tensors of {what}"
    if dropped:
        loaded += f"; not loaded: its classifier ({listed(dropped)})"
    return loaded


def load_trunk(backbone: Backbone, file: BackboneFile, image_size: int, size_flag: str = "image_size={}") -> str:
    """Load ``file``'s trunk into ``backbone``'s, strictly: every parameter and running statistic of the
    trunk, none extra, each of its shape (a missing BatchNorm step counter, which timm files may lack, starts
    at 0). Returns what was loaded, for the log. ``size_flag``: how the caller's user sets the image size."""
    if timm_name(backbone.name) is not None:
        return load_timm_trunk(backbone, file)
    if backbone.name.startswith("resnet") and file.name and file.name.startswith("resnet") and file.stem:
        built = "imagenet" if backbone.trunk.conv1.kernel_size == (7, 7) else "cifar"
        if built != file.stem and "conv1.weight" in file.state:
            raise stem_error(file, backbone, image_size, size_flag)
    if file.sobel != (backbone.sobel is not None):
        raise CheckpointError(f"{file.path}'s first conv takes {'the 2 Sobel channels' if file.sobel else 'RGB'}, "
                              f"the backbone {'Sobel' if backbone.sobel is not None else 'RGB'} input: "
                              f"set sobel={str(file.sobel).lower()}")
    want = torchvision_names(backbone.trunk.state_dict(), backbone.name)
    counters = {k: v for k, v in want.items() if k.endswith("num_batches_tracked") and k not in file.state}
    missing = [k for k in want if k not in file.state and k not in counters]
    unexpected = [k for k in file.state if k not in want]
    shapes = [f"{k} {tuple(file.state[k].shape)} (the backbone's: {tuple(want[k].shape)})" for k in want
              if k in file.state and file.state[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        parts = ([f"missing keys {listed(missing)}"] if missing else []) + \
            ([f"unexpected keys {listed(unexpected)}"] if unexpected else []) + \
            ([f"other shapes {listed(shapes)}"] if shapes else [])
        fix = f"; pass --backbone {file.name}" if file.name and file.name != backbone.name else ""
        raise CheckpointError(f"{file.path} does not fit backbone {backbone.name}: {'; '.join(parts)}. It looks "
                              f"like {file.looks_like}{fix}")
    backbone.trunk.load_state_dict(trunk_names({**file.state, **counters}, backbone.name), strict=True)
    loaded = f"{len(file.state)} trunk tensors of {file.description}"
    if file.dropped:
        loaded += f"; not loaded: its classifier ({listed(file.dropped)})"
    return loaded


def init_backbone(backbone: Backbone, path: str | Path, spec: dict[str, Any], image_size: int) -> None:
    """``train --init``: start ``backbone`` (built for this run, ``spec`` as train.backbone_spec) from any
    backbone file. A deepclust checkpoint must match ``spec`` and brings its embedding head; other files bring
    the trunk alone."""
    file = read_backbone_file(path)
    if file.payload is not None:
        check_compatible(file.payload, backbone=spec, path=path)
    elif file.name == "convnet" == spec["name"] and file.width != spec["width"]:  # else a list of shapes
        raise CheckpointError(f"{path} holds a convnet of width {file.width}, not {spec['width']}: set "
                              f"width={file.width}")
    loaded = load_trunk(backbone, file, image_size)
    if file.head is not None:
        backbone.head.load_state_dict(file.head)
        fresh = "the method's heads and memory banks start fresh"
    else:
        fresh = f"the {backbone.embed_dim}-d embedding head, the method's heads and memory banks start fresh"
    log.info("backbone initialised from %s: %s%s; %s", path, loaded,
             " and its embedding head" if file.head is not None else "", fresh)


@dataclass
class OpenedBackbone:
    """A backbone ready for eval, embed or cluster, and what to feed it."""

    model: Backbone
    image_size: int  # the images are resized to this
    eval_feature: str  # the features evaluated by default
    file: BackboneFile

    @property
    def payload(self) -> dict[str, Any] | None:
        return self.file.payload

    @property
    def method(self) -> str | None:
        return self.file.method


def open_backbone(path: str | Path, name: str | None = None, image_size: int | None = None,
                  feature: str | None = None) -> OpenedBackbone:
    """The backbone of a checkpoint or any backbone file, in eval mode on the CPU. The network is the file's own
    (a ResNet keeps the stem it was trained with); ``image_size`` only sets the input size (default: the size
    deepclust trained it at, else 224 for an ImageNet stem or VGG, 32 for the CIFAR stem). ``name``: the
    backbone, where the file's keys do not say it. A plain file has no trained embedding head: its features are
    the pooled ones, and ``feature="embedding"`` is refused."""
    file = read_backbone_file(path)
    if image_size is not None and image_size < 8:
        raise ConfigError(f"--image-size must be at least 8, got {image_size}")
    if file.payload is not None:
        spec = file.payload["backbone"]
        if name is not None and name != spec["name"]:
            raise CheckpointError(f"{path} is a deepclust checkpoint of backbone {spec['name']}, not {name}; "
                                  "leave out --backbone")
        model = backbone_from_checkpoint(file.payload).eval()
        if image_size is not None:  # a ViT takes other sizes its patches tile
            check_input_size(spec["name"], image_size, spec["sobel"])
        return OpenedBackbone(model, image_size or spec["image_size"], feature or file.payload["eval_feature"], file)
    if feature == "embedding":
        raise ConfigError(f"{path} is {file.description}: it has no trained embedding head (only deepclust "
                          "checkpoints do); use --feature pooled")
    name = name or file.name
    if name is not None and timm_name(name) is not None:  # built at the size asked for (ViTs: the position
        built = image_size or file.image_size or timm_default_size(name)  # embeddings resampled to its grid)
        model = Backbone(name, built, sobel=file.sobel)
        log.info("%s: %s; the embedding head is not used (pooled features)", path, load_trunk(model, file, built))
        return OpenedBackbone(model.to(memory_format=torch.channels_last).eval(), built, "pooled", file)
    if name is None:
        raise CheckpointError(f"{path} is {file.description}, which is none of the backbones deepclust reads "
                              "from a plain file (resnet18, resnet18_cifar, resnet50, vgg16_bn; any one from deepclust "
                              "export): pass --backbone NAME if it is one of them, or --backbone timm:NAME for the "
                              "timm model it was saved from")
    # the size the network is built at decides a ResNet's stem: the file's own
    built = file.image_size or (CIFAR_SIZE if file.stem == "cifar" else IMAGENET_SIZE)
    model = Backbone(name, built, sobel=file.sobel, width=file.width or 32)
    log.info("%s: %s; the embedding head is not used (pooled features)", path,
             load_trunk(model, file, built, "--image-size {}"))
    model = model.to(memory_format=torch.channels_last).eval()
    return OpenedBackbone(model, image_size or built, "pooled", file)


BACKBONE_FILE_HELP = ("a deepclust checkpoint, a file of deepclust export, a torchvision / timm state_dict of "
                      "resnet18, resnet50 or vgg16_bn, or (with --backbone timm:NAME) of any timm model, DINOv2 and "
                      "CLIP files included (.pth, .pt, .bin, .safetensors)")


DEVICE_HELP = "where the backbone runs: cpu (default), cuda or cuda:N"


def add_reading_flags(parser: argparse.ArgumentParser) -> None:
    """--feature, --device and --bad-images: how a command reads images through a backbone (eval, embed, cluster)."""
    parser.add_argument("--feature", choices=("embedding", "pooled"),
                        help="embedding: the trained embedding head's unit vectors; pooled: the trunk's pooled "
                        "features (default: the method's evaluation feature; a plain backbone file: pooled)")
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--bad-images", choices=("fail", "skip"), default="fail",
                        help="an unreadable image: fail (default) stops and names it; skip leaves it out and logs it")


def add_backbone_file_flags(parser: argparse.ArgumentParser) -> None:
    """--backbone and --image-size, for a --checkpoint that is a plain backbone file."""
    parser.add_argument("--backbone", help="a plain backbone file's deepclust backbone, where its keys do not say it "
                        "(resnet18, resnet18_cifar, resnet50, vgg16_bn), or timm:NAME for a timm model's file "
                        "(e.g. timm:vit_small_patch14_dinov2.lvd142m; needs pip install 'deepclust[timm]')")
    parser.add_argument("--image-size", type=int, help="resize the images to this size (default: the size deepclust "
                        "trained at; a plain file: 224, 32 for a CIFAR-stem ResNet, a timm model's own input size)")
