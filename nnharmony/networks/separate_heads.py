"""Shared backbone with one segmentation head per member dataset (the oracle paradigm).

The heads are 1x1 convolutions over the backbone's decoder features; channels of a 1x1 convolution are
independent, so one convolution with ``sum_m T_m`` outputs *is* ``M`` separate heads. Each sample's own head
is scattered into the global task layout ``(B, T, *spatial)``; the other tasks stay at ``ABSENT_TASK_LOGIT``
(probability ~4e-44) and are ignored by the partial-label loss. The value is moderate on purpose: nnU-Net's
sliding window accumulates Gaussian-weighted logits in float16, where -1e4 x weight 10 overflows to -inf. The dataset must be known at inference.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


ABSENT_TASK_LOGIT = -100.0


class SeparateHeadsNet(nn.Module):
    def __init__(self, backbone: nn.Module, member_task_ids: Sequence[Sequence[int]], num_tasks: int):
        """backbone: a U-Net whose outputs have ``sum(len(t) for t in member_task_ids)`` channels."""
        super().__init__()
        self.backbone = backbone
        self.num_tasks = num_tasks
        self.member_task_ids = [list(t) for t in member_task_ids]
        offsets = [0]
        for t in self.member_task_ids:
            offsets.append(offsets[-1] + len(t))
        self.offsets = offsets
        self._member_index: torch.Tensor | None = None

    @property
    def decoder(self):  # nnU-Net toggles deep supervision through network.decoder
        return self.backbone.decoder

    def set_inference_condition(self, member_index: int | None = None, **_) -> None:
        self._member_index = None if member_index is None else torch.tensor([member_index])

    def _scatter(self, out: torch.Tensor, member_index: torch.Tensor) -> torch.Tensor:
        full = out.new_full((out.shape[0], self.num_tasks, *out.shape[2:]), ABSENT_TASK_LOGIT)
        for b in range(out.shape[0]):
            m = int(member_index[b] if member_index.numel() > 1 else member_index[0])
            full[b, self.member_task_ids[m]] = out[b, self.offsets[m]:self.offsets[m + 1]]
        return full

    def forward(self, x: torch.Tensor, *, member_index: torch.Tensor | None = None):
        """x (B,C,*sp); member_index (B,) long. Returns (B,T,*sp) logits or a list of them (deep supervision)."""
        if member_index is None:
            member_index = self._member_index
        if member_index is None:
            raise RuntimeError("SeparateHeadsNet needs the dataset of every sample (member_index); it cannot run "
                               "without knowing the dataset")
        out = self.backbone(x)
        if isinstance(out, (list, tuple)):
            return [self._scatter(o, member_index) for o in out]
        return self._scatter(out, member_index)
