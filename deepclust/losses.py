"""Loss functions as pure functions of tensors, shared by every method."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -log sum_{j in G_i} p(j | x_i), p = softmax over all N logits.

    ``logits`` (B, N); ``positives`` (B, N) bool, row i marks G_i. NPID is G_i = {i}; AND, PCP and
    PAD pass larger groups. Vectorised: two masked log-sum-exps, no loop over the batch.
    """
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)
    return (log_all - log_pos).mean()


def gathered_group_loss(logits: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """``group_loss`` with G_i given as ids: ``members`` (B, m) lists each member of G_i once, -1 padded. For
    small groups (PAD's SCSs) it reads m logits a row instead of masking all N."""
    log_all = torch.logsumexp(logits, dim=1)
    picked = logits.gather(1, members.clamp(min=0)).masked_fill(members < 0, float("-inf"))
    return (log_all - torch.logsumexp(picked, dim=1)).mean()


def instance_positives(index: torch.Tensor, num_samples: int) -> torch.Tensor:
    """G_i = {i}: a one-hot (B, N) mask."""
    mask = torch.zeros(index.numel(), num_samples, dtype=torch.bool, device=index.device)
    # scatter_ takes the scalar as it is; ``mask[rows, index] = True`` would copy a host 0-dim tensor, a sync
    return mask.scatter_(1, index.unsqueeze(1), True)


def neighbour_positives(index: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """G_i = {i} plus the row ``neighbours[i]`` (N, S) of sample ids, padded with -1: a (B, N) mask."""
    mask = instance_positives(index, neighbours.shape[0])
    nbr = neighbours[index]  # (B, S)
    # A padding entry marks i itself, already set: no boolean indexing, whose size the host would have to read.
    return mask.scatter_(1, torch.where(nbr >= 0, nbr, index.unsqueeze(1)), True)


def label_positives(index: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """G_i = every sample with the same group id as i, from ``groups`` (N,): a (B, N) mask."""
    return groups[index].unsqueeze(1) == groups.unsqueeze(0)


def kl_loss(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p || q) = sum_j p_j log(p_j / q_j), p = softmax(logits), q = softmax(target_logits)."""
    logp = F.log_softmax(logits.float(), dim=1)
    logq = F.log_softmax(target_logits.float(), dim=1)
    return (logp.exp() * (logp - logq)).sum(1).mean()


def cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 - cos(a_i, b_i)."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=1)).mean()


def invariant_spreading_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.1, all1: torch.Tensor | None = None,
                              all2: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """IS loss on two views (B, d) each, L2-normalised (METHODS.md).

    For row i of the 2B stack, e_ij = exp(f_i . sg(f_j) / tau); D_i = sum_{j != i} e_ij; P_i = e_ip / D_i
    with p the other view of the same image; loss = -mean_i(log P_i + sum_{j neg} log(1 - e_ij / D_i)).
    A batch split across processes passes the whole batch's views as ``all1``, ``all2`` (the candidates j;
    no gradient flows into them anyway) and where its own rows start in them, ``offset``.
    """
    with torch.autocast(z1.device.type, enabled=False):  # in bf16, 1 - 1e-6 rounds to 1 and log1p(-1) = -inf
        return _invariant_spreading_loss(z1.float(), z2.float(), tau, all1, all2, offset)


def _invariant_spreading_loss(z1, z2, tau, all1, all2, offset) -> torch.Tensor:
    z = torch.cat((z1, z2))
    b = z1.shape[0]
    candidates = torch.cat((z1 if all1 is None else all1, z2 if all2 is None else all2)).float().detach()
    whole = candidates.shape[0] // 2
    logits = z @ candidates.t() / tau
    rows = torch.arange(2 * b, device=z.device)
    own = torch.arange(b, device=z.device) + offset
    self_col, partner = torch.cat((own, own + whole)), torch.cat((own + whole, own))
    self_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, self_col.unsqueeze(1), True)  # no host scalar
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_d = torch.logsumexp(logits, dim=1, keepdim=True)
    log_p = logits - log_d  # log(e_ij / D_i)
    log_pos = log_p[rows, partner]
    neg_mask = (~self_mask).scatter_(1, partner.unsqueeze(1), False)
    log_not = torch.log1p(-log_p.exp().clamp(max=1 - 1e-6)).masked_fill(~neg_mask, 0.0)  # no -inf * 0
    return -(log_pos + log_not.sum(1)).mean()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Row entropies of softmax(logits); -inf logits (excluded entries) contribute 0."""
    logp = F.log_softmax(logits.float(), dim=1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(1)


def swapped_prediction_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """SwAV's loss: each code ``codes[i]`` (the Sinkhorn assignment of crop i, no gradient) is predicted from
    every other crop's scores: the mean over i and over crops v != i of -sum_k q_ik log softmax(s_v / T)_k.
    ``scores`` (one (B, K) per crop, the large crops first), ``codes`` (one per assigned crop, in crop order)."""
    logp = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    total = scores[0].new_zeros((), dtype=torch.float32)
    for i, q in enumerate(codes):
        others = [lp for v, lp in enumerate(logp) if v != i]
        total = total + sum(-(q * lp).sum(1).mean() for lp in others) / len(others)
    return total / len(codes)


def multi_head_cross_entropy(logits: list[torch.Tensor], targets: list[torch.Tensor], crops: int = 1) -> torch.Tensor:
    """The mean over heads of cross-entropy of head h's ``logits[h]`` ((crops * B, K), crops stacked in order)
    against its labels ``targets[h]`` (B,), the same label for each crop of a sample (DeepClusterV2, SeLa)."""
    pairs = zip(logits, targets, strict=True)
    return sum(F.cross_entropy(lg.float(), t.repeat(crops)) for lg, t in pairs) / len(logits)
