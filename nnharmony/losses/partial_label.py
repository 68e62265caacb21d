"""Partial-label loss of the universal baseline (MultiTalent-style).

Every global task has its own sigmoid output. A sample is supervised only on the tasks its dataset annotates
(``task_mask``): an unannotated task contributes nothing, whatever its target or prediction, because a
structure that a dataset does not label may still be present in its images.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(*mask.shape, *([1] * (like.ndim - 2))).to(like.dtype)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, task_mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE over voxels of annotated (sample, task) pairs. logits/target (B,T,*sp), task_mask (B,T) bool."""
    if not task_mask.any():
        return logits.sum() * 0.0
    per_voxel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    per_pair = per_voxel.flatten(2).mean(2)  # (B,T)
    m = task_mask.to(per_pair.dtype)
    return (per_pair * m).sum() / m.sum()


def masked_soft_dice(
    logits: torch.Tensor, target: torch.Tensor, task_mask: torch.Tensor, batch_dice: bool = True, smooth: float = 1e-5
) -> torch.Tensor:
    """1 - soft Dice over annotated tasks. With ``batch_dice`` (nnU-Net's default for 3d_fullres) the
    counts of a task are pooled over the batch samples that annotate it; otherwise per (sample, task)."""
    if not task_mask.any():
        return logits.sum() * 0.0
    probs = torch.sigmoid(logits.float())
    tgt = target.float()
    m = _expand(task_mask, probs)
    probs, tgt = probs * m, tgt * m
    axes = tuple(range(2, probs.ndim))
    tp = (probs * tgt).sum(axes)
    fp = (probs * (1 - tgt)).sum(axes)
    fn = ((1 - probs) * tgt).sum(axes)
    if batch_dice:
        tp, fp, fn = tp.sum(0), fp.sum(0), fn.sum(0)
        valid = task_mask.any(0)
    else:
        valid = task_mask
    dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth).clamp_min(1e-8)
    return 1 - dice[valid].mean()


class PartialLabelLoss(nn.Module):
    """BCE + soft Dice on annotated tasks only, with nnU-Net's deep-supervision weighting."""

    def __init__(self, ds_weights: Sequence[float] | None = None, batch_dice: bool = True,
                 weight_bce: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        self.ds_weights = list(ds_weights) if ds_weights is not None else None
        self.batch_dice = batch_dice
        self.weight_bce = weight_bce
        self.weight_dice = weight_dice

    def single_scale(self, logits: torch.Tensor, target: torch.Tensor, task_mask: torch.Tensor) -> torch.Tensor:
        return self.weight_bce * masked_bce(logits, target, task_mask) + self.weight_dice * masked_soft_dice(
            logits, target, task_mask, self.batch_dice
        )

    def forward(self, output, target, task_mask: torch.Tensor) -> torch.Tensor:
        if isinstance(output, (list, tuple)):
            weights = self.ds_weights or [1.0] + [0.0] * (len(output) - 1)
            total = output[0].new_zeros((), dtype=torch.float32)
            for w, o, t in zip(weights, output, target):
                if w != 0:
                    total = total + w * self.single_scale(o, t, task_mask)
            return total
        return self.single_scale(output, target, task_mask)


def nnunet_deep_supervision_weights(num_scales: int, is_ddp: bool = False) -> list[float]:
    """nnU-Net's weights 1, 1/2, 1/4, ... with the lowest resolution switched off, normalised to sum 1; one scale
    (a network without deep supervision outputs) gets weight 1, not 0/0."""
    import numpy as np

    if num_scales <= 1:
        return [1.0]

    w = np.array([1 / (2**i) for i in range(num_scales)])
    w[-1] = 1e-6 if is_ddp else 0.0  # DDP needs every output in the graph
    return list(w / w.sum())
