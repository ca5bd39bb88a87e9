"""Pascal VOC's metrics, as its devkit computes them (no torchmetrics or pycocotools here):

* ``voc_ap``: the average precision of a precision-recall curve, either VOC2007's 11-point interpolation
  (the mean of the highest precision at recall >= 0, 0.1, ..., 1) or the area under the curve whose
  precision is made monotone (VOC2010 on, "area" below);
* ``ranking_ap``: a class's AP over scored images (the classification task; the devkit ignores images
  whose only objects of the class are difficult);
* ``detection_aps``: per-class AP of boxes at IoU > 0.5 (py-faster-rcnn's ``voc_eval``, which Detectron2's VOC
  evaluator follows: 1-based inclusive pixel boxes, so a box's width is xmax - xmin + 1; each ground-truth box
  matches one detection; detections that match a difficult box count neither way);
* ``mean_iou``: the segmentation task's mean over classes of intersection over union, void (255) left out.
"""

from __future__ import annotations

import numpy as np
import torch


def voc_ap(recall: np.ndarray, precision: np.ndarray, eleven_point: bool = False) -> float:
    """AP (0-1) of a PR curve given point by point in rank order (recall non-decreasing)."""
    recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    if eleven_point:
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the precision envelope: highest precision to the right
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def ranking_ap(scores: np.ndarray, targets: np.ndarray, eleven_point: bool = False) -> float:
    """AP of one class over images: ``targets`` 1 positive, -1 negative, 0 ignored (difficult only)."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    keep = targets != 0
    scores, positive = scores[keep], targets[keep] > 0
    if not positive.any():
        raise ValueError("AP needs at least one positive image")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(positive[order])
    fp = np.cumsum(~positive[order])
    return voc_ap(tp / positive.sum(), tp / np.maximum(tp + fp, np.finfo(np.float64).eps), eleven_point)


def box_iou_voc(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box with (M, 4) boxes in 1-based inclusive pixel coordinates (+1 on each side's length)."""
    ix = np.maximum(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + 1.0, 0.0)
    iy = np.maximum(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + 1.0, 0.0)
    inter = ix * iy
    area = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
    areas = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
    return inter / (area + areas - inter)


def detection_aps(detections: list[dict[str, np.ndarray]], truths: list[dict[str, np.ndarray]], num_classes: int,
                  iou_threshold: float = 0.5) -> dict[str, list[float | None]]:
    """Per-class AP (0-1) of detections over a set of images, as ``{"ap07": [...], "ap": [...]}`` (11-point and
    area), None for a class without a non-difficult ground-truth box.

    ``detections[i]``: ``boxes`` (K, 4), ``scores`` (K,), ``labels`` (K,) of image i; ``truths[i]``: ``boxes``
    (M, 4), ``labels`` (M,), ``difficult`` (M,) bool; class indices 0..num_classes-1, boxes 1-based inclusive.
    """
    out: dict[str, list[float | None]] = {"ap07": [], "ap": []}
    for c in range(num_classes):
        gt = [(t["boxes"][t["labels"] == c], t["difficult"][t["labels"] == c].astype(bool)) for t in truths]
        positives = sum(int((~d).sum()) for _, d in gt)
        found = [(float(s), i, b) for i, det in enumerate(detections)
                 for s, b in zip(det["scores"][det["labels"] == c], det["boxes"][det["labels"] == c], strict=True)]
        if positives == 0:
            out["ap07"].append(None)
            out["ap"].append(None)
            continue
        found.sort(key=lambda f: -f[0])  # stable: ties keep image order, as voc_eval's argsort
        taken = [np.zeros(len(boxes), dtype=bool) for boxes, _ in gt]
        tp, fp = np.zeros(len(found)), np.zeros(len(found))
        for rank, (_, image, box) in enumerate(found):
            boxes, difficult = gt[image]
            if len(boxes) == 0:
                fp[rank] = 1
                continue
            overlaps = box_iou_voc(np.asarray(box, dtype=np.float64), boxes.astype(np.float64))
            best = int(overlaps.argmax())
            if overlaps[best] > iou_threshold:
                if difficult[best]:
                    continue  # neither a hit nor a miss
                if not taken[image][best]:
                    tp[rank], taken[image][best] = 1, True
                else:
                    fp[rank] = 1  # a duplicate of a box already found
            else:
                fp[rank] = 1
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / positives
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        out["ap07"].append(voc_ap(recall, precision, eleven_point=True))
        out["ap"].append(voc_ap(recall, precision))
    return out


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, void: int = 255) -> torch.Tensor:
    """(C, C) int64 counts of (target, prediction) pixel pairs, void target pixels left out."""
    keep = target != void
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def mean_iou(confusion: torch.Tensor) -> tuple[float, list[float | None]]:
    """Mean IoU (0-1) over the classes present in the target or the prediction, and each class's IoU (None for a
    class in neither)."""
    confusion = confusion.double()
    inter = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - inter
    ious = [float(i / u) if u > 0 else None for i, u in zip(inter, union, strict=True)]
    seen = [v for v in ious if v is not None]
    return (float(np.mean(seen)) if seen else 0.0), ious
