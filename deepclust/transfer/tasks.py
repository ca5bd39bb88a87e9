"""The three transfer tasks: what a training batch is, its loss, and the test metric.

Every batch is a function of (seed, iteration) alone: the images of iteration i are positions i*B..(i+1)*B-1 of
the epoch's seeded permutation, and their flips come from the same seed, so a resumed run draws what the
uninterrupted one drew, and ``batch`` may run in DataLoader workers (``num_workers``: decoding JPEGs). Under
torchrun each rank takes its contiguous part of the global batch.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..augment import test_transform
from ..backbones import Backbone
from ..config import ConfigError
from ..data import DataError, load_data, parse_spec
from ..data.voc import VOC_CLASSES, VOC_SOURCES, VOID, VOCRecord, read_mask, read_voc
from ..eval.voc_metrics import confusion_matrix, detection_aps, mean_iou, ranking_ap
from .config import TransferConfig
from .models import detection_model, multilabel_model, segmentation_model

log = logging.getLogger(__name__)


def batch_positions(n: int, batch_size: int, seed: int, iteration: int) -> tuple[torch.Tensor, torch.Generator]:
    """This rank's positions (of ``n``) for ``iteration``, and a generator for its random flips."""
    first = iteration * batch_size
    picks = []
    while len(picks) < batch_size:
        epoch, offset = divmod(first + len(picks), n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        picks += order[offset:offset + batch_size - len(picks)].tolist()
    rows = torch.tensor(picks)[distributed.local_part(batch_size)]
    return rows, torch.Generator().manual_seed(seed * 1_000_003 + iteration + 1)


def read_image(path: Any) -> torch.Tensor:
    """(3, H, W) float in [0, 1] of an image file."""
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def voc_records(spec: str, role: str, task: str) -> list[VOCRecord]:
    kind, root, split = parse_spec(spec, role)
    if kind not in VOC_SOURCES:
        raise ConfigError(f"transfer {task} reads VOC boxes and masks: give --data voc2007:ROOT or voc2012:ROOT (a "
                          f"local VOCdevkit), not {spec!r}")
    return read_voc(kind, root, split, task)


def test_spec(cfg: TransferConfig) -> str:
    from ..data import default_test_spec

    spec = cfg.test_data or default_test_spec(cfg.data)
    if spec is None:
        raise ConfigError(f"{cfg.data} has no obvious test split; give --test-data (e.g. voc2007:ROOT:test)")
    return spec


class DetectionTask:
    """Faster R-CNN: boxes from the XML (difficult ones trained on, as Detectron2's VOC loader), VOC07 11-point and
    area AP at IoU 0.5 on the test split (difficult boxes ignored)."""

    metric = "ap50"

    def __init__(self, cfg: TransferConfig, backbone: Backbone):
        self.cfg = cfg
        self.train = [r for spec in (cfg.data, *cfg.extra_data) for r in voc_records(spec, "train", "detection")]
        self.train = subset_of(self.train, cfg.subset, cfg.seed)
        self.test = voc_records(test_spec(cfg), "test", "detection")[:cfg.test_subset]
        self.model = detection_model(backbone, cfg)

    @staticmethod
    def target(record: VOCRecord, flip: bool, width: int) -> dict[str, torch.Tensor]:
        # VOC's 1-based inclusive pixels to continuous 0-based corners (Detectron2 subtracts 1 from xmin, ymin)
        boxes = torch.tensor([[o.box[0] - 1, o.box[1] - 1, o.box[2], o.box[3]] for o in record.objects],
                             dtype=torch.float32).reshape(-1, 4)
        if flip:
            boxes = torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), 1)
        labels = torch.tensor([o.label + 1 for o in record.objects], dtype=torch.int64)
        return {"boxes": boxes, "labels": labels}

    def batch(self, iteration: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """This rank's images of ``iteration`` (decoded, flipped) and their targets, on the CPU."""
        rows, gen = batch_positions(len(self.train), self.cfg.batch_size, self.cfg.seed, iteration)
        images, targets = [], []
        for row in rows.tolist():
            record = self.train[row]
            image = read_image(record.image)
            flip = bool(torch.rand((), generator=gen) < 0.5)
            targets.append(self.target(record, flip, image.shape[-1]))
            images.append(image.flip(-1) if flip else image)
        return images, targets

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        images, targets = batch
        return model([x.to(device) for x in images], [{k: v.to(device) for k, v in t.items()} for t in targets])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, Any]:
        model.eval()
        model.transform.min_size = (self.cfg.test_min_size,)
        detections, truths = [], []
        for start in range(0, len(self.test), 4):
            records = self.test[start:start + 4]
            outputs = model([read_image(r.image).to(device) for r in records])
            for record, found in zip(records, outputs, strict=True):
                boxes = found["boxes"].cpu().double().numpy()
                boxes[:, :2] += 1  # back to VOC's 1-based pixels
                detections.append({"boxes": boxes, "scores": found["scores"].cpu().numpy(),
                                   "labels": found["labels"].cpu().numpy() - 1})
                truths.append({"boxes": np.array([o.box for o in record.objects], dtype=np.float64).reshape(-1, 4),
                               "labels": np.array([o.label for o in record.objects], dtype=np.int64),
                               "difficult": np.array([o.difficult for o in record.objects], dtype=bool)})
        model.transform.min_size = tuple(self.cfg.min_size)
        aps = detection_aps(detections, truths, len(VOC_CLASSES))
        scored = [c for c, v in enumerate(aps["ap"]) if v is not None]
        return {"ap50_voc07": 100 * float(np.mean([aps["ap07"][c] for c in scored])),
                "ap50": 100 * float(np.mean([aps["ap"][c] for c in scored])),
                "ap50_per_class": {VOC_CLASSES[c]: round(100 * aps["ap"][c], 2) for c in scored},
                "test_images": len(self.test)}


class SegmentationTask:
    """FCN / DeepLabV3 on square ``image_size`` images (masks resized by nearest neighbour, void 255 ignored);
    mean IoU over the 21 classes on the test split, predicted at the square size and scored at each image's own."""

    metric = "miou"

    def __init__(self, cfg: TransferConfig, backbone: Backbone):
        self.cfg, self.mean, self.std = cfg, backbone.mean, backbone.std
        self.train = [r for spec in (cfg.data, *cfg.extra_data) for r in voc_records(spec, "train", "segmentation")]
        self.train = subset_of(self.train, cfg.subset, cfg.seed)
        self.test = voc_records(test_spec(cfg), "test", "segmentation")[:cfg.test_subset]
        self.model = segmentation_model(backbone, cfg)

    def inputs(self, record: VOCRecord) -> torch.Tensor:
        image = F.interpolate(read_image(record.image)[None], size=(self.cfg.image_size,) * 2, mode="bilinear",
                              align_corners=False)[0]
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return (image - mean) / std

    def mask(self, record: VOCRecord, size: int | None = None) -> torch.Tensor:
        mask = torch.from_numpy(read_mask(record.mask)).long()
        if size is None:
            return mask
        return F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's normalised images of ``iteration`` and their masks (flipped together), on the CPU."""
        rows, gen = batch_positions(len(self.train), self.cfg.batch_size, self.cfg.seed, iteration)
        images, masks = [], []
        for row in rows.tolist():
            record = self.train[row]
            image, mask = self.inputs(record), self.mask(record, self.cfg.image_size)
            if bool(torch.rand((), generator=gen) < 0.5):
                image, mask = image.flip(-1), mask.flip(-1)
            images.append(image)
            masks.append(mask)
        return torch.stack(images), torch.stack(masks)

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        images, masks = batch
        logits = model(images.to(device))
        return {"loss_seg": F.cross_entropy(logits, masks.to(device), ignore_index=VOID)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, Any]:
        model.eval()
        classes = len(VOC_CLASSES) + 1
        confusion = torch.zeros(classes, classes, dtype=torch.int64)
        for record in self.test:
            mask = self.mask(record)
            logits = model(self.inputs(record)[None].to(device))
            logits = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
            confusion += confusion_matrix(logits.argmax(1)[0].cpu(), mask, classes, VOID)
        miou, ious = mean_iou(confusion)
        names = ("background", *VOC_CLASSES)
        return {"miou": 100 * miou, "iou_per_class": {names[c]: round(100 * v, 2) for c, v in enumerate(ious)
                                                      if v is not None},
                "pixel_accuracy": 100 * float(confusion.diag().sum() / confusion.sum().clamp(min=1)),
                "test_images": len(self.test)}


class MultiLabelTask:
    """A linear head over the backbone, binary cross-entropy per class (difficult-only labels left out); mAP
    (VOC's area AP, difficult ignored) on the test split. Any labelled data works (one class an image)."""

    metric = "map"

    def __init__(self, cfg: TransferConfig, backbone: Backbone):
        from ..commands.voc_svm import multi_labels

        self.cfg, self.mean, self.std = cfg, backbone.mean, backbone.std
        parts = [load_data(spec, "train", cfg.image_size, subset=cfg.subset, subset_seed=cfg.seed)
                 for spec in (cfg.data, *cfg.extra_data)]
        test = load_data(test_spec(cfg), "test", cfg.image_size)
        self.classes = test.classes if test.classes else None
        classes = max([d.num_classes or 0 for d in (*parts, test)]) or None
        self.train_images = torch.cat([d.images[:] for d in parts])
        self.train_targets = torch.cat([multi_labels(d, classes) for d in parts])
        limit = cfg.test_subset or len(test)
        self.test_images, self.test_targets = test.images[:limit], multi_labels(test, classes)[:limit]
        self.model = multilabel_model(backbone, cfg, self.train_targets.shape[1])

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's uint8 images of ``iteration``, their flips and multi-labels, on the CPU."""
        rows, gen = batch_positions(len(self.train_images), self.cfg.batch_size, self.cfg.seed, iteration)
        return self.train_images[rows], torch.rand(len(rows), generator=gen) < 0.5, self.train_targets[rows]

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        images, flips, targets = (t.to(device) for t in batch)
        x = test_transform(images, self.cfg.image_size, self.mean, self.std)  # the backbone's normalisation
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
        weight = (targets != 0).float()  # difficult-only: neither positive nor negative
        logits = model(x)
        return {"loss_bce": F.binary_cross_entropy_with_logits(logits, (targets > 0).float(), weight=weight)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, Any]:
        model.eval()
        scores = torch.cat([model(test_transform(self.test_images[i:i + 64].to(device), self.cfg.image_size,
                                                 self.mean, self.std)).float().cpu()
                            for i in range(0, len(self.test_images), 64)]).numpy()
        targets = self.test_targets.numpy()
        aps = {c: 100 * ranking_ap(scores[:, c], targets[:, c]) for c in range(targets.shape[1])
               if (targets[:, c] == 1).any()}
        names = self.classes or [str(c) for c in range(targets.shape[1])]
        return {"map": float(np.mean(list(aps.values()))), "ap_per_class": {names[c]: round(v, 2)
                                                                            for c, v in aps.items()},
                "test_images": len(targets)}


def subset_of(records: list[VOCRecord], subset: int | None, seed: int) -> list[VOCRecord]:
    if subset is None or subset >= len(records):
        return records
    pick = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:subset].sort().values
    return [records[i] for i in pick.tolist()]


TASK_TYPES = {"detection": DetectionTask, "segmentation": SegmentationTask, "multilabel": MultiLabelTask}


def build_task(cfg: TransferConfig, backbone: Backbone) -> DetectionTask | SegmentationTask | MultiLabelTask:
    task = TASK_TYPES[cfg.task](cfg, backbone)
    if cfg.task != "multilabel" and not task.test:
        raise DataError(f"the test split of {cfg.data} is empty")
    log.info("transfer %s (%s): %d training images, %d test images", cfg.task, cfg.model,
             len(getattr(task, "train", getattr(task, "train_images", []))),
             len(getattr(task, "test", getattr(task, "test_images", []))))
    return task

