"""``--dataset auto``: the shared part of inferring a case's member from a network's own prediction.

Trainers that can tell where an image comes from (U-Harmony's domain gate, Hermes' modality head) score
every member the case could belong to; the rule of which member wins lives here so both apply it alike."""
from __future__ import annotations

import json
from typing import Callable, Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def member_hypotheses(predictor, image_files: Sequence[str], case_probabilities: Callable[..., np.ndarray],
                      condition: Callable[[int], Hashable] | None = None) -> dict[int, np.ndarray]:
    """member index -> ``case_probabilities(predictor, data)`` of the case preprocessed as that member's case
    (its plans: spacing, normalization; its channel slots), for every member with as many channels as the case
    has files and the same file ending. ``condition(i)``: what else the probabilities depend on under member
    ``i``'s hypothesis (e.g. Hermes' task list), passed as a third argument. Identical hypotheses are computed
    once."""
    spec = predictor.spec
    files = [str(f) for f in image_files]
    candidates = [i for i, m in enumerate(spec.members)
                  if len(m.channels) == len(files) and files[0].endswith(m.file_ending)]
    if not candidates:
        counts = sorted({len(m.channels) for m in spec.members})
        raise ValueError(f"case {files[0]}: {len(files)} channel file(s); no member of {spec.name} has that many "
                         f"channels (members have {counts}); give --dataset")
    cache: dict[str, np.ndarray] = {}
    probs: dict[int, np.ndarray] = {}
    for i in candidates:
        ctx = predictor.member_context(i)
        extra = None if condition is None else condition(i)
        key = json.dumps([ctx.slots, ctx.configuration_manager.configuration,
                          ctx.plans_manager.plans.get("foreground_intensity_properties_per_channel"),
                          ctx.plans_manager.transpose_forward, extra], sort_keys=True, default=str)
        if key not in cache:
            data, _ = predictor.preprocess(files, ctx)
            cache[key] = (case_probabilities(predictor, data) if condition is None
                          else case_probabilities(predictor, data, extra))
        probs[i] = cache[key]
    return probs


def choose_member(spec, scores: dict[int, float], group: Callable[[int], Hashable]) -> int:
    """The best-scoring candidate's group (domain, modality) wins; members of one group cannot be told apart,
    so among them the one with the most training cases is chosen (the first in collection order on ties)."""
    best = max(scores, key=scores.get)  # first on ties
    tied = [i for i in scores if group(i) == group(best)]
    return max(tied, key=lambda i: (spec.members[i].num_training, -i))


def central_patch(data: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(C, *shape) -> (C, *patch_size): the central crop, zero-padded symmetrically where the image is smaller
    than the patch (nnU-Net's sliding window pads with zeros too). A 3D case seen by a 2D model (one more spatial
    axis than the patch) gives its central slice along the first axis, the axis nnU-Net's 2D models slice."""
    data = torch.as_tensor(data)
    if data.ndim - 1 == len(patch_size) + 1:
        data = data[:, data.shape[1] // 2]
    if data.ndim - 1 != len(patch_size):
        raise ValueError(f"data {tuple(data.shape)} does not match patch {list(patch_size)}")
    slices, pads = [slice(None)], []
    for s, p in zip(data.shape[1:], patch_size):
        start = max(0, (s - p) // 2)
        slices.append(slice(start, start + min(s, p)))
        missing = max(0, p - s)
        pads.append((missing // 2, missing - missing // 2))
    crop = data[tuple(slices)]
    flat = [v for pair in reversed(pads) for v in pair]
    return F.pad(crop, flat) if any(flat) else crop.clone()
