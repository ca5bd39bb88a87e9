"""Optimisers: SGD as METHODS.md's protocol uses it, and LARS for the recipes that ask for it (SwAV, DeepClusterV2
on CIFAR in solo-learn)."""

from __future__ import annotations

from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step of each weight tensor is scaled by its trust ratio
    eta |w| / (|g| + weight_decay |w|) (You et al. 2017), the weight decay inside the scaled step. As solo-learn's
    recipes run it: 1-d parameters (biases, normalisation) take plain SGD steps without weight decay
    (``exclude_bias_and_norm``), and ``clip`` caps the ratio at 1 / lr (the step is never above plain SGD's).
    The ratio stays on the device (a zero norm gives 1): no value is read on the host."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02,
                 clip: bool = True, exclude_bias_and_norm: bool = True):
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "clip": clip,
                    "exclude_bias_and_norm": exclude_bias_and_norm}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                step = p.grad
                if p.ndim > 1 or not group["exclude_bias_and_norm"]:
                    w_norm, g_norm = p.norm(), p.grad.norm()
                    ratio = group["eta"] * w_norm / (g_norm + wd * w_norm + 1e-9)
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    if group["clip"]:
                        ratio = ratio.clamp(max=1 / lr)
                    step = (step + wd * p) * ratio
                if group["momentum"]:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = step.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(step)
                    step = state["momentum_buffer"]
                p.add_(step, alpha=-lr)
        return loss


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """``sgd`` (the shared protocol) or ``lars``."""
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
