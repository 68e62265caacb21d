"""The joint plan: one network topology, patch size and batch size for all members of a collection.

Every member keeps its own nnU-Net plans (target spacing, normalization, preprocessed data). Only what a
single network must share is reconciled, with this rule (per configuration):

1. reference spacing = per-axis median of the members' target spacings (axes as nnU-Net stores them,
   i.e. after each member's ``transpose_forward``);
2. reference shape = per-axis maximum of the members' median image sizes in voxels (a patch never needs
   to be larger than the largest member's typical image);
3. the planner class that planned the members (nnU-Net's ``ExperimentPlanner`` or the one given with
   ``-pl``) runs its own ``get_plans_for_configuration`` on that virtual dataset, with the collection's
   input channels (one per modality of the vocabulary) and outputs (one per global task), and with the
   summed voxel count of all members. This is nnU-Net's own search: the patch shrinks until the network's
   estimated memory fits the planner's GPU memory target, the batch size follows from the estimate and is
   capped so that one batch covers at most 5% of the collection's voxels.

A member whose images are smaller than the shared patch is padded by nnU-Net's data loader, exactly as
nnU-Net pads small images; a member with anisotropic spacing sees the reference topology's pooling
(recorded in ``reconciliation`` so the compromise is visible).
"""
from __future__ import annotations

import contextlib
import os
from copy import deepcopy
from typing import Any, Sequence, Type

import numpy as np

from nnharmony.data.collection import CollectionError, CollectionSpec
from nnharmony.paths import JOINT_PLANS_NAME, preprocessed_dir
from nnharmony.records.joint_plan import JointPlan
from nnharmony.utils.io import load_json

SUPPORTED_CONFIGURATIONS = ("3d_fullres", "2d")


def joint_plans_identifier(member_plans_identifier: str) -> str:
    """``nnUNetPlans`` -> ``nnHarmonyPlans``; ``nnUNetResEncUNetMPlans`` -> ``nnHarmonyResEncUNetMPlans``."""
    if member_plans_identifier.startswith("nnUNet"):
        return "nnHarmony" + member_plans_identifier[len("nnUNet"):]
    return "nnHarmony_" + member_plans_identifier


@contextlib.contextmanager
def planner_threads():
    """nnU-Net's planner calls ``torch.set_num_threads(get_allowed_n_proc_DA())``, which fails when
    ``nnUNet_n_proc_DA=0`` (single-threaded augmentation); plan with at least one thread."""
    old = os.environ.get("nnUNet_n_proc_DA")
    if old is not None and old.strip() == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        yield
    finally:
        if old is not None:
            os.environ["nnUNet_n_proc_DA"] = old


def load_member_plans(spec: CollectionSpec, plans_identifier: str) -> dict[int, dict]:
    out = {}
    for m in spec.members:
        f = preprocessed_dir() / m.dataset_name / f"{plans_identifier}.json"
        if not f.is_file():
            raise CollectionError(
                f"dataset {m.dataset_name}: no plans {f}; run nnharmony_plan_and_preprocess for the collection first"
            )
        out[m.dataset_id] = load_json(f)
    return out


def _per_modality(spec: CollectionSpec, member_plans: dict[int, dict], configuration: str, key: str, default):
    """Value of a per-channel configuration entry for each modality slot, taken from the members with it."""
    values = [default] * spec.num_modalities
    for m in spec.members:
        cfg = member_plans[m.dataset_id]["configurations"][configuration]
        for ch, slot in enumerate(spec.channel_slots(m.dataset_id)):
            values[slot] = cfg[key][ch]
    return values


def reconcile_configuration(
    spec: CollectionSpec,
    member_plans: dict[int, dict],
    configuration: str,
    planner: Any,
) -> tuple[dict, dict]:
    """Shared configuration dict (nnU-Net format) + the record of the rule's inputs."""
    cfgs = {}
    for m in spec.members:
        plans = member_plans[m.dataset_id]
        if configuration not in plans["configurations"]:
            raise CollectionError(
                f"dataset {m.dataset_name}: its plans have no '{configuration}' configuration "
                f"(available: {sorted(plans['configurations'])})"
            )
        cfgs[m.dataset_id] = plans["configurations"][configuration]
    spacings = np.array([cfgs[i]["spacing"] for i in cfgs], dtype=float)
    shapes = np.array([cfgs[i]["median_image_size_in_voxels"] for i in cfgs], dtype=float)
    if len({len(s) for s in spacings}) != 1:
        raise CollectionError(f"collection {spec.name}: members of different dimensionality in '{configuration}'")
    ref_spacing = np.median(spacings, axis=0)
    ref_shape = np.max(shapes, axis=0)
    n_voxels = 0.0  # whole images, as nnU-Net counts them for every configuration (2d included)
    for m in spec.members:
        plans = member_plans[m.dataset_id]
        full = plans["configurations"].get("3d_fullres", {}).get("median_image_size_in_voxels",
                                                                 plans["original_median_shape_after_transp"])
        n_voxels += float(np.prod(full, dtype=np.float64)) * m.num_training
    planned = planner.get_plans_for_configuration(
        ref_spacing, ref_shape, f"{JOINT_PLANS_NAME}_{configuration}", n_voxels, {}
    )
    planned["batch_dice"] = True  # nnU-Net's choice for 2d and 3d_fullres
    planned["normalization_schemes"] = _per_modality(spec, member_plans, configuration, "normalization_schemes", "ZScoreNormalization")
    planned["use_mask_for_norm"] = _per_modality(spec, member_plans, configuration, "use_mask_for_norm", False)
    record = {
        "rule": "nnU-Net planner on (median member spacing, max member median shape, collection channels/tasks)",
        "reference_spacing": [float(x) for x in ref_spacing],
        "reference_shape": [float(x) for x in ref_shape],
        "approximate_n_voxels": n_voxels,
        "member_patch_sizes": {str(i): list(cfgs[i]["patch_size"]) for i in cfgs},
        "member_batch_sizes": {str(i): int(cfgs[i]["batch_size"]) for i in cfgs},
        "member_spacings": {str(i): list(cfgs[i]["spacing"]) for i in cfgs},
        "shared_patch_size": list(planned["patch_size"]),
        "shared_batch_size": int(planned["batch_size"]),
    }
    return planned, record


def build_joint_plans(
    spec: CollectionSpec,
    configurations: Sequence[str],
    planner_class: Type,
    plans_identifier: str = "nnUNetPlans",
    gpu_memory_target_in_gb: float | None = None,
) -> dict:
    """Joint plans dict for ``spec`` from its members' nnU-Net plans (see the module docstring for the rule)."""
    member_plans = load_member_plans(spec, plans_identifier)
    first = spec.members[0]
    kwargs = {"plans_name": plans_identifier}
    if gpu_memory_target_in_gb is not None:
        kwargs["gpu_memory_target_in_gb"] = gpu_memory_target_in_gb
    planner = planner_class(first.dataset_id, **kwargs)
    # the planner sizes the network from dataset_json: give it the collection's channels and tasks
    planner.dataset_json = spec.dataset_json()
    base = member_plans[first.dataset_id]
    joint: dict[str, Any] = {
        "dataset_name": spec.name,
        "plans_name": joint_plans_identifier(plans_identifier),
        "original_median_spacing_after_transp": base["original_median_spacing_after_transp"],
        "original_median_shape_after_transp": base["original_median_shape_after_transp"],
        "image_reader_writer": base["image_reader_writer"],
        "transpose_forward": base["transpose_forward"],
        "transpose_backward": base["transpose_backward"],
        "configurations": {},
        "experiment_planner_used": planner_class.__name__,
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
    }
    record = JointPlan.create(joint, spec.name, plans_identifier)
    for configuration in configurations:
        if configuration not in SUPPORTED_CONFIGURATIONS:
            raise CollectionError(
                f"configuration {configuration!r} is not supported for joint training "
                f"(supported: {', '.join(SUPPORTED_CONFIGURATIONS)})"
            )
        with planner_threads():
            planned, reconciliation = reconcile_configuration(spec, member_plans, configuration, planner)
        joint["configurations"][configuration] = planned
        record.set_reconciliation(configuration, reconciliation)
    for m in spec.members:
        p = member_plans[m.dataset_id]
        record.set_member_entry(m.dataset_id, {
            "plans_identifier": plans_identifier,
            "transpose_forward": p["transpose_forward"],
            "configurations": {
                c: {
                    k: deepcopy(p["configurations"][c][k])
                    for k in ("data_identifier", "spacing", "patch_size", "batch_size", "normalization_schemes",
                              "use_mask_for_norm", "median_image_size_in_voxels")
                }
                for c in configurations
            },
        })
    return joint
