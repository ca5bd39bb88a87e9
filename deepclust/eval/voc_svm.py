"""ODC's VOC07 classification protocol (Goyal et al. 2019's benchmark, as ODC's author ran it): one linear SVM
per class on frozen, L2-normalised features of the trainval images, its cost chosen per class by 3-fold
cross-validated average precision over ``VOC_SVM_COSTS``, then refit on all of trainval and scored on test by
VOC's area AP; the result is the mean over the classes (mAP, %).

Labels as the benchmark's: an image whose only objects of a class are difficult is a negative when training and
is left out when testing (the devkit's convention). Settings as its ``LinearSVC``: squared hinge, L2 penalty,
positive class weight 2, tol 1e-4, at most 2,000 iterations, the dual problem.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.svm import LinearSVC

from .voc_metrics import ranking_ap

# the cost list of the benchmark's VOC07 script (fair_self_supervision_benchmark, scripts/train_svm.sh)
VOC_SVM_COSTS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
CV_FOLDS = 3


def one_hot_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Single-label data as multi-labels (1 the image's class, -1 the others), so the protocol runs on any
    labelled data."""
    return F.one_hot(labels.long().cpu(), num_classes).to(torch.int8) * 2 - 1


def svm(cost: float, seed: int) -> LinearSVC:
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, penalty="l2", loss="squared_hinge", dual=True, tol=1e-4,
                     max_iter=2000, random_state=seed)


def voc_svm(train: torch.Tensor, train_targets: torch.Tensor, test: torch.Tensor, test_targets: torch.Tensor,
            costs: tuple[float, ...] = VOC_SVM_COSTS, seed: int = 0,
            class_names: list[str] | None = None) -> dict[str, object]:
    """``voc_svm_map`` (%) over the classes with a positive test image, each class's AP under ``voc_svm_ap``
    and its chosen cost under ``voc_svm_cost``. Targets (N, C): 1 positive, 0 difficult only, -1 negative.
    Deterministic given ``seed`` (the folds are stratified, unshuffled, as cross_val_score's default)."""
    if not costs or min(costs) <= 0:
        raise ValueError(f"the SVM costs must be above 0, got {list(costs)}")
    xtr = F.normalize(train.double().cpu(), dim=1).numpy()
    xte = F.normalize(test.double().cpu(), dim=1).numpy()
    ytr, yte = train_targets.cpu().numpy(), test_targets.cpu().numpy()
    names = class_names or [str(c) for c in range(ytr.shape[1])]
    aps, chosen = {}, {}
    for c, name in enumerate(names):
        labels = np.where(ytr[:, c] == 1, 1, -1)  # difficult-only images are negatives when training
        positives = int((labels == 1).sum())
        if (yte[:, c] == 1).sum() == 0:
            continue  # no AP without a positive test image
        if positives == 0 or positives == len(labels):
            raise ValueError(f"class {name} has {positives} positive training images of {len(labels)}: an SVM "
                             "needs positives and negatives")
        folds = min(CV_FOLDS, positives, len(labels) - positives)
        if folds >= 2:
            cv = StratifiedKFold(folds)
            scores = [cross_val_score(svm(cost, seed), xtr, labels, cv=cv, scoring="average_precision").mean()
                      for cost in costs]
            cost = costs[int(np.argmax(scores))]  # the first of equal scores: the smallest cost
        else:  # one positive: nothing to cross-validate on
            cost = 1.0
        model = svm(cost, seed).fit(xtr, labels)
        aps[name] = 100.0 * ranking_ap(model.decision_function(xte), yte[:, c])
        chosen[name] = cost
    if not aps:
        raise ValueError("no class has a positive test image")
    return {"voc_svm_map": float(np.mean(list(aps.values()))), "voc_svm_ap": aps, "voc_svm_cost": chosen}
