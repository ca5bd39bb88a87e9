"""PAD, progressive affinity diffusion (Huang et al. 2020): NPID whose class of a sample is its strongly
connected subgraph in the memory bank's kNN graph, found afresh every epoch, plus hard-positive enhancement."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..cluster import knn_graph, member_table, scs_stats, strongly_connected_subgraphs
from ..distributed import world_size
from ..losses import cosine_loss, gathered_group_loss, kl_loss
from ..runtime import allow_sync, fixed_algorithms, host_to_device
from .base import Batch, EpochContext
from .npid import NPID

HPE_CHOICES = ("kl", "cosine", "false")


class PAD(NPID):
    """Each epoch: the directed kNN graph of the memory bank (cosine, k = 5, self excluded), then the SCS
    search (``deepclust.cluster.scs``: nearest-first depth-first diffusion, cyclic constraint, size cap s =
    10) from the start vertices in a random order drawn from the epoch's generator. Loss per sample i:
    L_scs = group loss over the SCS of i (instance loss when isolated) + lambda (0.8) x L_hpe.

    Choices the paper leaves open (no public code exists; METHODS.md fixes the rest):
    - L_hpe = KL(p_i || p_hp) over the N-way bank softmax, where p_hp is a fixed target: for a sample in an
      SCS, hp is the member with the lowest affinity to the current embedding of i, and p_hp the softmax of
      hp's memory row; for an isolated sample, p_hp is the softmax of its second augmented view, forwarded
      without gradient (the same network, in training mode: the forward of the isolated samples' second
      views also moves the BN running statistics). ``hpe=cosine`` (the paper's FCS): 1 - cos(embedding of
      i, the same hp feature).
    - ``diffusion=false`` (the paper's Table 3): G_i = i and its k nearest bank neighbours (the paper used
      k = 10 there: set k=10); the hard positive is the least similar of them.
    - ``cyclic=false``: every vertex the search reaches joins, up to s. ``max_size=none``: no cap.
    - Precision (logged when labels are known) is the mean over grouped samples of the fraction of their
      fellow members that share their class.
    The graph and the groups are registered buffers (checkpointed), recomputed before every epoch.
    """

    name = "pad"
    views = 2  # the second view is the hard positive of isolated samples (only theirs is augmented)

    @dataclass
    class Config(NPID.Config):
        k: int = 5  # kNN graph out-degree
        max_size: int | None = 10  # SCS scale cap s (none: no cap)
        diffusion: bool = True  # false: plain kNN neighbourhoods
        cyclic: bool = True  # false: no cyclic constraint
        hpe: str = "kl"  # kl | cosine | false
        hpe_weight: float = 0.8  # lambda

    def __init__(self, backbone, num_samples: int, config: Config | None = None, labels=None):
        super().__init__(backbone, num_samples, config, labels)
        if self.config.hpe not in HPE_CHOICES:
            raise ValueError(f"hpe must be one of {', '.join(HPE_CHOICES)}, not {self.config.hpe!r}")
        if not 1 <= self.config.k < num_samples:
            raise ValueError(f"k = {self.config.k} neighbours needs between 2 and N = {num_samples} samples")
        self.register_buffer("neighbours", torch.full((num_samples, self.config.k), -1, dtype=torch.long))
        self.register_buffer("scs", torch.full((num_samples,), -1, dtype=torch.long))
        self.stats: dict[str, float] = {}
        self.members: torch.Tensor | None = None  # member_table(scs), made at the epoch's first step
        self.isolated: np.ndarray | None = None  # on the host: whether each sample has no fellow member (ditto)

    def before_epoch(self, ctx: EpochContext) -> None:
        super().before_epoch(ctx)
        self.members = self.isolated = None  # from the SCSs as they stand at the first step (torchrun: rank 0's)
        t0 = time.perf_counter()
        self.neighbours.copy_(knn_graph(self.bank.features, self.config.k)[1])
        t1 = time.perf_counter()
        if self.config.diffusion:
            order = torch.randperm(self.num_samples, generator=ctx.generator)
            self.scs.copy_(strongly_connected_subgraphs(self.neighbours, self.config.max_size, self.config.cyclic,
                                                        order))
        self.stats = {"graph_time": t1 - t0, "scs_time": time.perf_counter() - t1}
        if self.config.diffusion:
            self.stats.update(scs_stats(self.scs, ctx.true_labels))
        elif ctx.true_labels is not None:
            truth = ctx.true_labels.to(self.neighbours.device)
            self.stats["neighbour_precision"] = float((truth[self.neighbours] == truth[:, None]).float().mean())
        return None

    def fellows(self, index: torch.Tensor) -> torch.Tensor:
        """(B, m) the other members of each sample's group, -1 padded: its SCS (none when isolated), or its k
        nearest bank neighbours without diffusion."""
        if not self.config.diffusion:
            return self.neighbours[index]
        if self.members is None:
            with allow_sync():  # once an epoch: the table's width is the largest SCS's size
                self.members = member_table(self.scs)
        group = self.scs[index]
        fellows = self.members[group.clamp(min=0)]
        return fellows.masked_fill((group < 0)[:, None] | (fellows == index[:, None]), -1)

    def view_rows(self, view: int, index: torch.Tensor, host_index: np.ndarray | None = None) -> torch.Tensor | None:
        if view == 0:
            return None
        if self.config.hpe == "false":
            return index[:0]
        if host_index is None:  # a direct call: ask the device
            return torch.nonzero((self.fellows(index) < 0).all(1)).flatten()
        if self.isolated is None:
            with allow_sync():  # once an epoch
                everyone = torch.arange(self.num_samples, device=index.device)
                self.isolated = (self.fellows(everyone) < 0).all(1).cpu().numpy()
        rows = np.flatnonzero(self.isolated[host_index])  # the isolated samples, chosen on the host
        return host_to_device(torch.from_numpy(rows), index.device)

    def loss(self, batch: Batch):
        z = self.backbone(batch.views[0])
        logits = self.bank.logits(z, self.config.tau)
        fellows = self.fellows(batch.index)
        loss = gathered_group_loss(logits, torch.cat([batch.index[:, None], fellows], 1))  # G_i: i and its fellows
        if self.config.hpe != "false":
            loss = loss + self.config.hpe_weight * self.hard_positive_loss(z, logits, fellows, batch)
        return loss, {"embedding": z}

    def hard_positive_loss(self, z: torch.Tensor, logits: torch.Tensor, fellows: torch.Tensor,
                           batch: Batch) -> torch.Tensor:
        found = fellows >= 0
        similarity = logits.detach().gather(1, fellows.clamp(min=0)).masked_fill(~found, float("inf"))
        hard = fellows.gather(1, similarity.argmin(1, keepdim=True)).squeeze(1)  # least similar fellow member
        target = self.bank.rows(hard.clamp(min=0))
        rows = batch.view_rows[1] if len(batch.view_rows) > 1 else None  # the rows of batch.views[1], in order
        isolated = torch.nonzero(~found.any(1)).flatten() if rows is None else rows
        # Only their second view is augmented and forwarded: the cost shrinks as the SCS share grows. Under
        # torchrun every rank joins the forward (its BatchNorm is a collective), even with no isolated sample.
        if isolated.numel() or world_size() > 1:
            with torch.no_grad(), fixed_algorithms():  # a new row count most steps: no autotuning for each
                target[isolated] = self.backbone(batch.views[1]).to(target.dtype)
        if self.config.hpe == "cosine":
            return cosine_loss(z, target)
        return kl_loss(logits, self.bank.logits(target, self.config.tau))

    def after_epoch(self, ctx: EpochContext) -> dict[str, float]:
        return self.stats
