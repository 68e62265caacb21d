"""Hermes loss (METHODS.md B.6): masked BCE + adaptive (Tversky-style) Dice per task + 0.01 x modality CE.

Shapes: ``logits`` and ``target`` ``(B, T, *sp)`` (target float multi-hot, in the network's per-sample task
layout, see :func:`nnharmony.networks.hermes.gather_tasks`), ``task_mask`` bool ``(B, T)`` = the (sample, task)
pairs that are supervised (annotated and not padding). Only those pairs are ever read: they are selected
*before* any arithmetic, so padded / unannotated channels cannot influence the loss or its gradient, not even
through NaN/inf values. Both terms are computed in float32.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AVERAGES", "masked_bce", "adaptive_dice", "HermesLoss"]


def _check(logits: torch.Tensor, target: torch.Tensor, task_mask: torch.Tensor):
    """(mask (B, T) bool, float logits with unsupervised channels set to 0, float target). Zeroing with
    ``torch.where`` keeps values of unsupervised pairs (even NaN) out of the result and the gradient, without
    the device sync of boolean indexing."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    if task_mask.shape != logits.shape[:2]:
        raise ValueError(f"task_mask {tuple(task_mask.shape)} must be (B, T) = {tuple(logits.shape[:2])}")
    mask = task_mask.to(device=logits.device, dtype=torch.bool)
    voxel_mask = mask.reshape(*mask.shape, *([1] * (logits.dim() - 2)))
    lg = torch.where(voxel_mask, logits.float(), torch.zeros((), device=logits.device))
    return mask, lg, target.float()


#: how (sample, task) pair values are averaged: "pairs" (official: every supervised pair counts once, so a
#: sample with 13 tasks weighs 13x a sample with one) or "samples" (each sample's mean over its tasks, then the
#: mean over samples: every sample counts once, whatever its member's number of tasks)
AVERAGES = ("pairs", "samples")


def _mean_over_pairs(per_pair: torch.Tensor, mask: torch.Tensor, average: str = "pairs") -> torch.Tensor:
    """Mean of (B, T) values over the supervised pairs (``average``, see :data:`AVERAGES`); 0 when none."""
    picked = torch.where(mask, per_pair, torch.zeros((), dtype=per_pair.dtype, device=per_pair.device))
    if average == "pairs":
        return picked.sum() / mask.sum().clamp_min(1)
    if average != "samples":
        raise ValueError(f"average must be one of {AVERAGES}, not {average!r}")
    tasks = mask.sum(1)
    per_sample = picked.sum(1) / tasks.clamp_min(1)
    return per_sample.sum() / (tasks > 0).sum().clamp_min(1)


def _zero(logits: torch.Tensor) -> torch.Tensor:
    """A zero connected to the graph that does not read any value of ``logits`` (no NaN propagation)."""
    return logits.flatten()[:0].float().sum()


def masked_bce(logits: torch.Tensor, target: torch.Tensor, task_mask: torch.Tensor,
               average: str = "pairs") -> torch.Tensor:
    """Mean over supervised (sample, task) pairs of the voxel-mean BCE-with-logits; 0 when none."""
    mask, lg, tg = _check(logits, target, task_mask)
    per_pair = F.binary_cross_entropy_with_logits(lg, tg, reduction="none").flatten(2).mean(2)
    return _mean_over_pairs(per_pair, mask, average)


def adaptive_dice(logits: torch.Tensor, target: torch.Tensor, task_mask: torch.Tensor,
                  smooth: float = 1e-6, alpha_range=(0.2, 0.8), average: str = "pairs") -> torch.Tensor:
    """Tversky-style soft Dice loss with adaptive weights, per supervised (sample, task) pair::

        p = sigmoid(logits); TP = sum p*y; FP = sum p*(1-y); FN = sum (1-p)*y
        alpha = clamp(FP / (FP + FN + smooth), 0.2, 0.8); beta = 1 - alpha
        loss = 1 - TP / (TP + alpha*FP + beta*FN + smooth)

    averaged over the supervised pairs only (0 when none; ``average``, see :data:`AVERAGES`). As in the
    official code, alpha is not detached.
    """
    mask, lg, tg = _check(logits, target, task_mask)
    p = torch.sigmoid(lg).flatten(2)
    tg = tg.flatten(2)
    tp = (p * tg).sum(2)
    fp = (p * (1 - tg)).sum(2)
    fn = ((1 - p) * tg).sum(2)
    alpha = (fp / (fp + fn + smooth)).clamp(*alpha_range)
    dice = tp / (tp + alpha * fp + (1 - alpha) * fn + smooth)
    return _mean_over_pairs(1 - dice, mask, average)


class HermesLoss(nn.Module):
    """``bce_weight * BCE + dice_weight * Dice`` (summed over deep-supervision scales with ``ds_weights``)
    ``+ mod_weight * CE(modality_logits, modality_id, ignore_index=-1)``. ``average``: how the BCE and Dice
    of the supervised (sample, task) pairs are averaged (:data:`AVERAGES`; official: "pairs").

    ``forward(seg, target, task_mask, modality_logits=None, modality_id=None)``: ``seg``/``target`` a tensor
    ``(B, T, *sp)`` or lists over DS scales (highest resolution first, same length). ``ds_weights=None`` uses
    nnU-Net's ``1/2**i`` normalised to sum 1 (the lowest scale is *not* zeroed, so every prototype projection
    gets a gradient, which DDP needs). The detached terms of the last call (tensors, no device sync) are in
    ``self.last_terms``.
    """

    def __init__(self, mod_weight: float = 0.01, bce_weight: float = 1.0, dice_weight: float = 1.0,
                 ds_weights: Optional[Sequence[float]] = None, smooth: float = 1e-6, average: str = "pairs"):
        super().__init__()
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, not {average!r}")
        self.average = average
        self.mod_weight, self.bce_weight, self.dice_weight = float(mod_weight), float(bce_weight), float(dice_weight)
        self.ds_weights = None if ds_weights is None else [float(w) for w in ds_weights]
        self.smooth = smooth
        self.last_terms: Dict[str, torch.Tensor] = {}

    def _weights(self, n: int) -> List[float]:
        if self.ds_weights is not None:
            if len(self.ds_weights) < n:
                raise ValueError(f"{n} DS outputs but only {len(self.ds_weights)} ds_weights")
            return self.ds_weights[:n]
        w = [1 / 2 ** i for i in range(n)]
        return [x / sum(w) for x in w]

    def forward(self, seg: Union[torch.Tensor, Sequence[torch.Tensor]],
                target: Union[torch.Tensor, Sequence[torch.Tensor]], task_mask: torch.Tensor,
                modality_logits: Optional[torch.Tensor] = None,
                modality_id: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(seg, torch.Tensor):
            seg, target = [seg], [target if isinstance(target, torch.Tensor) else target[0]]
        if isinstance(target, torch.Tensor) or len(target) != len(seg):
            raise ValueError("with deep supervision, seg and target must be lists of the same length")
        bce = dice = None
        for w, lg, tg in zip(self._weights(len(seg)), seg, target):
            if w == 0:
                continue
            b = masked_bce(lg, tg, task_mask, self.average)
            d = adaptive_dice(lg, tg, task_mask, self.smooth, average=self.average)
            bce = w * b if bce is None else bce + w * b
            dice = w * d if dice is None else dice + w * d
        if bce is None:
            bce = dice = _zero(seg[0])
        total = self.bce_weight * bce + self.dice_weight * dice
        mod = None
        if modality_logits is not None and modality_id is not None and self.mod_weight:
            mid = modality_id.to(device=modality_logits.device, dtype=torch.long)
            # mean over samples with a known modality, 0 when none (plain ignore_index gives 0/0 = NaN then)
            ce = F.cross_entropy(modality_logits.float(), mid, ignore_index=-1, reduction="none")
            mod = ce.sum() / (mid >= 0).sum().clamp_min(1)
            total = total + self.mod_weight * mod
        self.last_terms = {"bce": bce.detach(), "dice": dice.detach(),
                           **({"mod": mod.detach()} if mod is not None else {})}
        return total
