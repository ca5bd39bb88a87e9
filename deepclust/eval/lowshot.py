"""Low-shot linear SVMs on frozen features (ODC's VOC07 low-shot protocol, after Goyal et al. 2019).

For each shot value n and each of ``draws`` random draws, n training images per class are sampled; one
linear SVM per class (those n as positives, the other classes' sampled images as negatives) is trained
on L2-normalised features with scikit-learn's LinearSVC, with Goyal et al.'s settings (squared hinge,
positive class weight 2, cost C); each SVM scores every test image and the score is the mean over classes
of the average precision (mAP, in percent), as ODC's Table 3 and Fig. 3 report. ODC's single low-shot
number is the mean over all shot values and draws (``lowshot_map``). On single-label data the test
negatives of a class are all other test images, so random features give an mAP near 100 / classes.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from sklearn.svm import LinearSVC

# Goyal et al. and ODC use 1, 2, 4, 8, 16, 32, 64 and 96 positives per class on VOC07; small subsets rarely
# hold 96 images of every class, so the default stops at 16 (--lowshot-shots adds the others).
LOWSHOT_SHOTS = (1, 2, 4, 8, 16)
LOWSHOT_DRAWS = 5  # "five independent samples" (ODC, Fig. 3)


def fillable_shots(labels: torch.Tensor, shots: tuple[int, ...]) -> tuple[int, ...]:
    """The shot values that every class of ``labels`` has enough images for."""
    smallest = int(labels.cpu().bincount()[labels.cpu().unique()].min())
    return tuple(n for n in shots if n <= smallest)


def class_svm_map(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                  classes: np.ndarray, cost: float, seed: int) -> float:
    """mAP (%) over ``classes`` of one-vs-rest linear SVMs trained on ``train`` and scored on ``test``."""
    aps = []
    for c in classes:
        svm = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, loss="squared_hinge", dual=True, tol=1e-4,
                        max_iter=2000, random_state=seed)
        svm.fit(train, np.where(train_labels == c, 1, -1))
        aps.append(average_precision_score(test_labels == c, svm.decision_function(test)))
    return 100.0 * float(np.mean(aps))


def lowshot_svm(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                shots: tuple[int, ...] = LOWSHOT_SHOTS, draws: int = LOWSHOT_DRAWS, cost: float = 1.0,
                seed: int = 0) -> dict[str, float]:
    """``lowshot_map_{n}shot`` (mean mAP over the draws, %) and its ``_std`` for each n in ``shots``, and
    ``lowshot_map``, the mean over every shot value and draw (ODC's Table 3 number).

    Draw d takes a fixed random order of each class's training images (from ``seed`` and d) and keeps the
    first n, so the n = 2 sample of a draw contains its n = 1 sample. A shot value above the smallest
    class's image count is an error. Deterministic given ``seed``.
    """
    if not shots or min(shots) < 1 or draws < 1 or cost <= 0:
        raise ValueError(f"low-shot SVMs need shots >= 1, draws >= 1 and cost > 0; got shots={list(shots)}, "
                         f"draws={draws}, cost={cost}")
    xtr = F.normalize(train.double().cpu(), dim=1).numpy()
    xte = F.normalize(test.double().cpu(), dim=1).numpy()
    ytr, yte = train_labels.cpu().numpy(), test_labels.cpu().numpy()
    classes = np.unique(ytr)
    members = [np.flatnonzero(ytr == c) for c in classes]
    smallest = min(m.size for m in members)
    if max(shots) > smallest:
        raise ValueError(f"{max(shots)} positives per class need {max(shots)} training images of every class; "
                         f"the smallest class has {smallest}; lower the shot values")
    if len(classes) < 2:
        raise ValueError("low-shot SVMs need at least 2 classes in the training data")
    tested = np.intersect1d(classes, np.unique(yte))  # AP needs a positive test image
    out: dict[str, float] = {}
    every = []
    for n in shots:
        scores = []
        for d in range(draws):
            rng = np.random.default_rng([seed, d])
            picks = np.concatenate([rng.permutation(m)[:n] for m in members])
            scores.append(class_svm_map(xtr[picks], ytr[picks], xte, yte, tested, cost, seed))
        out[f"lowshot_map_{n}shot"] = statistics.fmean(scores)
        out[f"lowshot_map_{n}shot_std"] = statistics.stdev(scores) if draws > 1 else 0.0
        every += scores
    out["lowshot_map"] = statistics.fmean(every)
    return out
