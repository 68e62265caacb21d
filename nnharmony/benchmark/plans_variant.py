"""A plans variant for small machines: the same preprocessed data with a narrower network and a smaller batch.

nnU-Net documents editing plans for such needs; a variant is a copy under a new plans identifier
(``<plans>_<suffix>``) that keeps the ``data_identifier``, so no case is preprocessed again. The quick preset
writes one for every member (the per-dataset models) and for the joint plans (whose ``member_plans_identifier``
then points at the members' variants), so every method trains the same narrower topology. Why: a CPU step of
nnU-Net's 2d network (32 to 256 features, batch 16) costs seconds; at half the widths and batch 8 a
few hundred steps fit into a minute, and these synthetic images need no more capacity (with a quarter, 8 features,
and nnU-Net's SGD the networks had found no foreground after 120-250 steps).

``max_patch_size`` also caps the patch (the real 2D collection's 256x256 patches cost four times a 128x128 one on a
CPU); sliding-window inference covers the whole image either way. The network loses the stages whose feature maps
would fall below 4 voxels, the rule nnU-Net's planner pools by, and the patch is rounded down to a multiple of the
remaining strides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from nnharmony.records.joint_plan import JointPlan
from nnharmony.utils.io import load_json, save_json_atomic


@dataclass(frozen=True)
class PlansVariant:
    suffix: str
    base_features: int  # features of the first stage (nnU-Net: 32), doubled per stage up to nnU-Net's cap
    max_batch_size: int
    max_patch_size: int | None = None  # cap per axis, in voxels (None: the planned patch)

    def name(self, plans: str) -> str:
        return f"{plans}_{self.suffix}"

    def apply(self, plans: dict, configurations: Sequence[str]) -> dict:
        out = dict(plans, plans_name=self.name(plans["plans_name"]))
        out["configurations"] = dict(plans["configurations"])
        for c in configurations:
            out["configurations"][c] = self._narrow(out["configurations"][c])
        return out

    def _narrow(self, configuration: dict) -> dict:
        cfg = dict(configuration)
        arch = dict(cfg["architecture"])
        kwargs = dict(arch["arch_kwargs"])
        cap = max(kwargs["features_per_stage"])
        kwargs["features_per_stage"] = [min(self.base_features * 2 ** i, cap)
                                        for i in range(len(kwargs["features_per_stage"]))]
        arch["arch_kwargs"] = kwargs
        cfg["architecture"] = arch
        cfg["batch_size"] = min(int(cfg["batch_size"]), self.max_batch_size)
        if self.max_patch_size is not None:
            cfg["patch_size"], arch["arch_kwargs"] = capped_patch(cfg["patch_size"], kwargs, self.max_patch_size)
        return cfg


#: smallest feature map nnU-Net's planner pools down to (voxels per axis)
MIN_FEATURE_MAP = 4
_PER_STAGE = ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage")


def capped_patch(patch: list[int], arch_kwargs: dict, cap: int) -> tuple[list[int], dict]:
    """``patch`` capped at ``cap`` per axis, with the network's trailing stages dropped while their feature maps
    would be smaller than :data:`MIN_FEATURE_MAP`; returns (patch, arch_kwargs)."""
    import numpy as np

    wanted = [min(int(p), int(cap)) for p in patch]
    strides = np.asarray(arch_kwargs["strides"], dtype=int)
    keep = len(strides)
    while keep > 1 and any(w // int(np.prod(strides[:keep, a])) < MIN_FEATURE_MAP for a, w in enumerate(wanted)):
        keep -= 1
    step = [int(np.prod(strides[:keep, a])) for a in range(len(wanted))]
    new_patch = [max(s, w // s * s) for w, s in zip(wanted, step)]
    kwargs = dict(arch_kwargs, n_stages=keep)
    for k in _PER_STAGE:
        kwargs[k] = list(arch_kwargs[k])[:keep]
    kwargs["n_conv_per_stage_decoder"] = list(arch_kwargs["n_conv_per_stage_decoder"])[:keep - 1]
    return new_patch, kwargs


def write_variant(spec, joint_plans: str, configurations: Sequence[str], variant: PlansVariant) -> str:
    """Writes the members' and the joint plans' variants (atomically, also when they exist: cheap and always
    current); returns the joint variant's identifier."""
    from nnharmony.paths import collection_dir, joint_plans_path, preprocessed_dir

    joint = load_json(joint_plans_path(spec.name, joint_plans))
    record = JointPlan(joint)
    member_ident = record.member_plans_identifier
    for m in spec.members:
        folder = preprocessed_dir() / m.dataset_name
        plans = load_json(folder / f"{member_ident}.json")
        save_json_atomic(variant.apply(plans, configurations), folder / f"{variant.name(member_ident)}.json")
    out = JointPlan(variant.apply(joint, configurations)).with_member_plans_identifier(variant.name(member_ident))
    name = variant.name(joint["plans_name"])
    save_json_atomic(out, collection_dir(spec.name) / f"{name}.json")
    return name
