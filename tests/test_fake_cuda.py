"""The CUDA path, checked on a machine without a GPU: every method's training step and the device-side
evaluation run on fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes and devices, no data).

Under the mode a CPU tensor meeting a CUDA one raises FakeTensorDeviceMismatchError (e.g. a probe built on the
CPU), and any read of a value on the host raises DataDependentOutputException (``float``, ``bool``, ``.item()``)
or DynamicOutputShapeException (``nonzero``, boolean-mask indexing): on a GPU each of those is a sync that makes
the host wait for the device. ``HostTensorCheck`` adds what the mode lets through: a CPU index (or any CPU tensor
with elements) used in an op on a CUDA tensor, an upload on every step. So a step that passes here makes no
host-device sync and mixes no devices. Backward and the optimiser step cannot run without a GPU (autograd asks
for a CUDA context), nor a CUDA generator: those run in the device-fixture tests on a GPU (benchmarks/gpu_check).
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import context
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from deepclust.augment import Augment
from deepclust.backbones import Backbone
from deepclust.data import ImageData
from deepclust.epoch import EpochCursor, batch_bounds, epoch_batches, run_steps
from deepclust.eval import evaluate_backbone, extract_features
from deepclust.eval.layers import layer_features
from deepclust.methods import METHODS
from deepclust.safety import LossGuard

N, SIZE, BATCH = 64, 16, 32
CUDA = torch.device("cuda", 0)
aten = torch.ops.aten
TRANSFERS = {aten._to_copy.default, aten.copy_.default, aten.lift_fresh.default, aten.lift_fresh_copy.default}
# Each method with small cluster counts; (round, epoch) of the epoch whose step is checked.
CASES = {
    "supervised": ({}, (0, 0)), "npid": ({}, (0, 0)), "is": ({}, (0, 0)), "is-multicrop": ({"small_crops": 2}, (0, 0)),
    "and": ({}, (1, 0)),  # round 1: anchors and their neighbours in the loss
    "pcp": ({"min_clusters": 4, "vote_epochs": 1, "small_crops": 1}, (0, 0)),  # the IS warm-up: two views, a small
    "pcp-purified": ({"min_clusters": 4, "vote_epochs": 1, "warmup": False}, (0, 1)),
    "pad": ({}, (0, 0)), "pad-cosine": ({"hpe": "cosine"}, (0, 0)), "pad-nodiffusion": ({"diffusion": False}, (0, 0)),
    "deepcluster": ({"k": 4}, (0, 0)),
    "odc": ({"k": 4, "min_cluster": 2}, (0, 0)), "odc-clean": ({"k": 4, "min_cluster": 2, "memory_update": "clean"},
                                                              (0, 0)),
    "uic": ({"k": 4}, (0, 0)),
    # the queue full from the first step (16 rows of 32-row batches), two small crops, the projection MLP
    "swav": ({"prototypes": 6, "queue_length": 16, "queue_start": 0.0, "small_crops": 2, "projector_hidden": 16},
             (0, 1)),
    "deepclusterv2": ({"k": 4, "heads": 2, "small_crops": 2}, (0, 0)),
    "sela": ({"k": 4, "heads": 2}, (0, 0)),
}


class HostTensorCheck(TorchDispatchMode):
    """What torch.cuda's sync check (``set_sync_debug_mode("error")``) would stop on a GPU, and what FakeTensorMode
    lets through, checked op by op (the mode itself raises at a read of a device value or shape on the host): a
    copy from the host to the device that is not ``non_blocking`` (from pageable memory: the host waits), and a
    host tensor with or without elements (an index, a mask, a table, or the 0-dim tensor a Python scalar written
    through tensor indices becomes) used in an op on a CUDA tensor, which copies it with a blocking copy."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_cuda = any(t.device.type == "cuda" for t in tensors)
        if func in TRANSFERS:
            if func is aten._to_copy.default and tensors and tensors[0].device.type == "cpu" and \
                    kwargs.get("device") is not None and kwargs["device"].type == "cuda" and \
                    not kwargs.get("non_blocking", False):
                raise AssertionError(f"{func}: a blocking copy of a host tensor of shape {tuple(tensors[0].shape)} "
                                     "to the device (pageable memory: the host waits)")
            if func is aten.copy_.default and len(tensors) > 1 and tensors[0].device.type == "cuda" and \
                    tensors[1].device.type == "cpu" and not (args[2:] or [kwargs.get("non_blocking", False)])[0]:
                raise AssertionError(f"{func}: a blocking copy of a host tensor of shape {tuple(tensors[1].shape)} "
                                     "into device memory")
        elif on_cuda:
            host = [tuple(t.shape) for t in tensors if t.device.type == "cpu"]
            if host:
                raise AssertionError(f"{func}: a host tensor of shape {host[0]} meets a CUDA tensor (a blocking "
                                     "copy; a Python scalar through tensor indices makes a 0-dim one)")
        return func(*args, **kwargs)


def to_fake_cuda(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Replace every parameter, buffer and tensor attribute of ``module`` by a fake CUDA tensor of the same shape
    and dtype (a real module cannot be moved under the mode: it is built and given its state on the CPU first)."""

    def fake(t: torch.Tensor) -> torch.Tensor:
        return FakeTensor(mode, t.detach().to("meta"), CUDA)

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = fake(b)
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and not name.startswith("_"):
                setattr(sub, name, fake(value))
    return module


def tiny_images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % 4
    images = torch.randint(0, 60, (N, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8)
    images[torch.arange(N), labels % 3] += 120  # a class colour, so the clusters are not all one
    return images, labels


def method_at_its_epoch(case: str) -> torch.nn.Module:
    """The method after ``before_epoch`` of the case's epoch, made for real on the CPU (targets, groups, labels)."""
    name = case.split("-")[0]
    keys, (round_, epoch) = CASES[case]
    torch.manual_seed(0)
    images, labels = tiny_images()
    cls = METHODS[name]
    method = cls(Backbone("convnet", SIZE, width=8), N, cls.Config(**keys), labels=labels if cls.uses_labels else None)
    method.to(memory_format=torch.channels_last)
    for e in range(epoch + 1):  # earlier epochs' targets first (PCP's vote history, ...)
        method.before_epoch(context(method, images, labels, epoch=e, round_=round_, epochs=4))
    method.view_rows(1, torch.arange(BATCH), np.arange(BATCH))  # PAD: its once-an-epoch tables, on the host
    return method


def readouts_allowed(fn) -> None:
    """Run ``fn``; a read of a value on the host (the protocol's result, or a solver's loop control) ends it,
    as it may, and so does a backward (the linear probe's), which needs a real GPU; a device mismatch or a host
    tensor meeting a CUDA one fails the test."""
    try:
        fn()
    except (DataDependentOutputException, DynamicOutputShapeException):
        pass
    except RuntimeError as err:
        if "hasPrimaryContext" not in str(err):  # autograd asking for a CUDA context: the forward got through
            raise


@pytest.mark.parametrize("case", list(CASES))
def test_the_step_loop_on_cuda_makes_no_host_sync_and_mixes_no_devices(case):
    """Two steps of the trainer's own loop (``epoch_batches`` then ``run_steps``: the order's upload, each step's
    views, forward, loss check, ``after_step``), as ``train.run_epoch`` runs them with the images on the GPU."""
    method = method_at_its_epoch(case)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    to_fake_cuda(method, mode)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))  # the epoch's order, on the host
    bounds = batch_bounds(2 * BATCH, BATCH)
    with mode, HostTensorCheck():
        images = torch.zeros(N, 3, SIZE, SIZE, dtype=torch.uint8, device=CUDA)  # the training images, on the GPU
        cfg = types.SimpleNamespace(num_workers=0, channels_last=True)
        run = types.SimpleNamespace(cfg=cfg, images=images, model=method, method=method, device=CUDA, optimizer=None)
        cursor = EpochCursor(order, 0, torch.Generator(), None, torch.zeros((), device=CUDA))
        guard = LossGuard("stop", Path("unused"), lambda step: f"step {step}")
        batches = epoch_batches(run, cursor, bounds, [slice(0, BATCH)] * len(bounds), seed=0)
        done = []
        run_steps(run, cursor, batches, bounds, Augment(SIZE), guard, None, lambda d, stop: done.append(d),
                  learn=False)  # no backward: it needs a real GPU (the device tests run it there)
        assert done == [1, 2] and cursor.steps == 2
        assert cursor.loss_sum.device == CUDA and cursor.loss_sum.dim() == 0


@pytest.mark.parametrize("feature", ["embedding", "pooled"])
def test_the_feature_pass_and_every_device_side_protocol_stay_on_cuda(feature):
    torch.manual_seed(0)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = to_fake_cuda(Backbone("convnet", SIZE, width=8).to(memory_format=torch.channels_last), mode)
    with mode, HostTensorCheck():
        images = torch.zeros(N, 3, SIZE, SIZE, dtype=torch.uint8, device=CUDA)
        labels = torch.zeros(N, dtype=torch.long, device=CUDA)
        feats = extract_features(model, images, feature, device=CUDA)
        assert feats.device == CUDA and feats.shape == (N, 8 * 8 if feature == "pooled" else 128)
        stages = layer_features(model, images, device=CUDA)
        assert all(f.device == CUDA for f in stages.values())
        names = ["a", "b", "c", "d"]  # the class count, known on the host as a folder's class names give it
        train, test = ImageData(images, labels, "train", names), ImageData(images, labels, "test", names)
        for protocol in ("knn", "linear", "cluster"):
            readouts_allowed(lambda p=protocol: evaluate_backbone(model, train, test, feature, (p,), CUDA))


def test_the_check_catches_what_it_is_for():
    """The same mode on the bugs it exists to find: a probe on the CPU, a host read, a CPU index, a nonzero."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    layer = nn.Linear(4, 2)  # built on the CPU, as eval/linear.py once did
    with mode, HostTensorCheck():
        x = torch.zeros(8, 4, device=CUDA)
        with pytest.raises((AssertionError, RuntimeError), match="host tensor|cpu|device"):  # either check
            layer(x)
        with pytest.raises(DataDependentOutputException):
            float(x.sum())
        with pytest.raises(DynamicOutputShapeException):
            torch.nonzero(x[:, 0])
        with pytest.raises(AssertionError, match="host tensor"):
            x[torch.from_numpy(np.arange(3))]  # a CPU index into device memory: an upload each time
