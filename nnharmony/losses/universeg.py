"""UniverSeg's episode loss: soft Dice + BCE on one binary query mask per episode."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftDiceBCELoss(nn.Module):
    """``dice_weight * (1 - mean_b softDice_b) + bce_weight * BCE`` on logits ``(B, 1, *sp)`` vs targets in
    {0, 1}. Soft Dice per episode ``(2 sum(p y) + 1) / (sum p + sum y + 1)`` (an empty query label with an
    empty prediction scores 1)."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight <= 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got dice {dice_weight}, bce {bce_weight}")
        self.dice_weight, self.bce_weight, self.smooth = float(dice_weight), float(bce_weight), float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        loss = logits.new_zeros(())
        if self.dice_weight:
            p = torch.sigmoid(logits).flatten(1)
            t = target.flatten(1)
            dc = (2 * (p * t).sum(1) + self.smooth) / (p.sum(1) + t.sum(1) + self.smooth)
            loss = loss + self.dice_weight * (1 - dc.mean())
        if self.bce_weight:
            loss = loss + self.bce_weight * F.binary_cross_entropy_with_logits(logits, target)
        return loss
