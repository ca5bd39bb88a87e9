"""Linear probe: a linear classifier on frozen features, trained full-batch with L-BFGS."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 weight_decay: float = 1e-4, steps: int = 200, seed: int = 0, num_classes: int | None = None) -> float:
    """Top-1 accuracy in percent of a multinomial logistic regression on standardised features.

    Features are the frozen pooled features (no augmentation); standardisation uses train statistics. The
    classifier is built on the features' device.
    """
    torch.manual_seed(seed)
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp(min=1e-6)
    xtr, xte = (train - mean) / std, (test - mean) / std
    if num_classes is None:  # read off the labels (on a GPU: a sync, once)
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    layer = torch.nn.Linear(xtr.shape[1], num_classes, device=xtr.device)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(xtr), train_labels) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = layer(xte).argmax(1)
    return 100.0 * int((pred == test_labels).sum()) / test_labels.numel()
