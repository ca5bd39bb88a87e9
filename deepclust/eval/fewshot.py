"""Few-shot classification on frozen features (UIC's metric-based protocol, after Prototypical Networks).

Each episode draws N classes, K support and Q query images per class; a query goes to the class whose
prototype (the mean of its L2-normalised support features, normalised again) is most similar by cosine.
The score is the mean episode accuracy with its 95% confidence interval (1.96 standard errors).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fewshot_accuracy(features: torch.Tensor, labels: torch.Tensor, ways: int = 5, shots: int = 1,
                     queries: int = 15, episodes: int = 600, seed: int = 0) -> dict[str, float]:
    """Mean N-way K-shot accuracy in percent over ``episodes`` episodes and its 95% interval half-width.

    Only classes with at least ``shots + queries`` images take part; fewer than ``ways`` such classes is an
    error. Deterministic given ``seed``.
    """
    if ways < 2 or shots < 1 or queries < 1 or episodes < 1:
        raise ValueError(f"few-shot needs ways >= 2, shots >= 1, queries >= 1 and episodes >= 1; got ways={ways}, "
                         f"shots={shots}, queries={queries}, episodes={episodes}")
    feats = F.normalize(features.float().cpu(), dim=1)
    labels = labels.cpu()
    members = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    members = [m for m in members if m.numel() >= shots + queries]
    if len(members) < ways:
        raise ValueError(f"{ways}-way {shots}-shot episodes with {queries} queries need {ways} classes of at least "
                         f"{shots + queries} images; the data has {len(members)}; lower ways, shots or queries")
    gen = torch.Generator().manual_seed(seed)
    acc = torch.empty(episodes, dtype=torch.float64)
    for e in range(episodes):
        chosen = torch.randperm(len(members), generator=gen)[:ways].tolist()
        picks = torch.stack([members[c][torch.randperm(members[c].numel(), generator=gen)[:shots + queries]]
                             for c in chosen])  # (ways, shots + queries) indices
        prototypes = F.normalize(feats[picks[:, :shots]].mean(1), dim=1)  # (ways, d)
        query = feats[picks[:, shots:].reshape(-1)]  # row-major: ways blocks of `queries` rows
        truth = torch.arange(ways).repeat_interleave(queries)
        acc[e] = (query @ prototypes.t()).argmax(1).eq(truth).double().mean()
    std = float(acc.std()) if episodes > 1 else 0.0
    return {"mean": 100.0 * float(acc.mean()), "ci95": 100.0 * 1.96 * std / math.sqrt(episodes)}
