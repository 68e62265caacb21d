"""Hermes on the collection's layouts: :class:`HermesCollectionUNet` (input one channel per modality slot, output
at inference one channel per global task) and the shared-input helpers."""
from __future__ import annotations

from typing import Sequence

import torch

from nnharmony.networks.hermes import HermesUNet

__all__ = ["HermesCollectionUNet", "occupied_slots", "shared_input_layout", "slot_table"]


class HermesCollectionUNet(HermesUNet):
    """:class:`HermesUNet` on the collection's layouts: its input is the loader's and predictor's one channel per
    modality slot, its output at inference one channel per global task.

    Input: with ``input_width`` set (shared input, :attr:`HermesConfig.input_mode <nnharmony.trainers.hermes_trainer.HermesConfig.input_mode>` 'shared') each sample's
    occupied slots are gathered into channels ``0 .. input_width - 1`` before the stem
    (:func:`shared_input_layout`); the slots come from ``input_slots`` (B, input_width) (training: the trainer's
    member table), the condition, or :meth:`set_inference_condition`. ``input_width=None``: the per-slot layout
    goes to the stem unchanged.

    Output: when the condition comes from :meth:`set_inference_condition` (nnU-Net's predictor calls
    ``network(x)``), one channel per global task: the requested tasks' logits scattered into place, 0 elsewhere
    (nnU-Net sizes its sliding-window buffers for the global task count; nnharmony's exporter keeps only the
    member's tasks). With explicit ``task_ids`` (training, ``infer_member``) the output is the per-sample task
    layout of :class:`HermesUNet`. Same parameters and state-dict keys as :class:`HermesUNet`.

    The fused feature maps are made contiguous (a forward hook on every fusion level): the fusion returns a
    channels-last view of its token layout, which sends every later CPU convolution down PyTorch's slow
    ``slow_conv3d`` path (measured: ~2x slower convolutions after the first fusion level)."""

    def __init__(self, *args, input_width: int | None = None, modality_priors: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_width = input_width
        self.modality_priors = modality_priors
        self._inference_input_slots: torch.Tensor | None = None
        for fusion in list(self.encoder_fusion.values()) + list(self.decoder_fusion.values()):
            fusion.register_forward_hook(_contiguous_features)

    def set_inference_condition(self, task_ids, modality_id, input_slots: Sequence[int] | None = None) -> None:
        """As :meth:`HermesUNet.set_inference_condition`, plus the member's channel slots (its
        ``spec.channel_slots``; needed with the shared input, ignored with the per-slot one)."""
        super().set_inference_condition(task_ids, modality_id)
        if task_ids is None or input_slots is None or self.input_width is None:
            self._inference_input_slots = None
            return
        self._inference_input_slots = slot_table([list(input_slots)], self.input_width)

    def forward(self, x, *, task_ids=None, modality_id=None, input_slots=None, cond=None):
        bound = task_ids is None and (cond is None or cond.get("task_ids") is None)
        if self.input_width is not None:
            x = shared_input_layout(x, self._input_slots(x, input_slots, cond))
        seg = super().forward(x, task_ids=task_ids, modality_id=modality_id, cond=cond)
        if not bound:
            return seg
        ids = self._inference_task_ids.to(x.device)
        if ids.shape[0] != x.shape[0]:
            ids = ids.expand(x.shape[0], -1)
        if isinstance(seg, (list, tuple)):
            return [self._to_global(s, ids) for s in seg]
        return self._to_global(seg, ids)

    def _resolve_condition(self, x, task_ids, modality_id, cond, validate: bool = True):
        task_ids, modality_id = super()._resolve_condition(x, task_ids, modality_id, cond, validate)
        if not self.modality_priors:  # ablation: the unknown-modality tokens for everyone
            modality_id = torch.full_like(modality_id, -1)
        return task_ids, modality_id

    def _input_slots(self, x: torch.Tensor, input_slots, cond) -> torch.Tensor:
        if input_slots is None and cond is not None:
            input_slots = cond.get("input_slots")
        if input_slots is None:
            input_slots = self._inference_input_slots
        if input_slots is None:
            raise RuntimeError("shared-input Hermes needs the sample's channel slots: pass input_slots or "
                               "set_inference_condition(..., input_slots=spec.channel_slots(member))")
        input_slots = torch.as_tensor(input_slots, dtype=torch.long)
        return input_slots.expand(x.shape[0], -1) if input_slots.shape[0] == 1 else input_slots

    def _to_global(self, seg: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        out = seg.new_zeros((B, self.num_tasks + 1, *seg.shape[2:]))  # last channel collects padding
        idx = torch.where(ids < 0, torch.full_like(ids, self.num_tasks), ids)
        out.scatter_(1, idx.reshape(B, T, *([1] * (seg.dim() - 2))).expand_as(seg), seg)
        return out[:, : self.num_tasks]


def slot_table(slots_per_row: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """(rows, width) long: each row's channel slots in increasing order (the shared input's channel order,
    independent of the member's file order), padded with -1."""
    table = torch.full((len(slots_per_row), width), -1, dtype=torch.long)
    for r, slots in enumerate(slots_per_row):
        slots = sorted(int(s) for s in slots)
        if len(slots) > width:
            raise ValueError(f"{len(slots)} input channels, but the shared input has {width}")
        table[r, : len(slots)] = torch.tensor(slots, dtype=torch.long)
    return table


def shared_input_layout(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Per-slot layout (B, M, *sp) -> shared layout (B, K, *sp): channel k of sample b is slot ``slots[b, k]``
    of x, zeros where the slot is -1. No value of ``slots`` is read on the host (traces under torch.compile)."""
    B, K = slots.shape
    slots = slots.to(x.device, non_blocking=True)
    view = (B, K) + (1,) * (x.dim() - 2)
    out = torch.gather(x, 1, slots.clamp(min=0).view(view).expand(B, K, *x.shape[2:]))
    return out * (slots >= 0).view(view).to(out.dtype)


def occupied_slots(data: torch.Tensor) -> list[int]:
    """Slots of a preprocessed case (M, *shape) that hold an image (not all zeros): the member's slots when the
    member is not known (``--dataset auto`` hypotheses)."""
    return torch.nonzero(torch.as_tensor(data).flatten(1).abs().amax(1) > 0).flatten().tolist()


def _contiguous_features(module, inputs, output):
    x, priors = output
    return x.contiguous(), priors
