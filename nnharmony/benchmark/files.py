"""Where a benchmark's inputs and outputs are: raw images and references of a member's cases, its labelled
structures, and each method's prediction folders."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nnharmony.benchmark.methods import Method
from nnharmony.records.model_folder import model_folder


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def raw_images(member, case: str) -> list[Path]:
    from nnharmony.paths import raw_dir

    folder = raw_dir() / member.dataset_name / "imagesTr"
    return [folder / f"{case}_{c:04d}{member.file_ending}" for c in range(len(member.channels))]


def raw_label(member, case: str) -> Path:
    """nnU-Net's copy of the reference (``gt_segmentations``), else the raw label."""
    from nnharmony.paths import preprocessed_dir, raw_dir

    gt = preprocessed_dir() / member.dataset_name / "gt_segmentations" / f"{case}{member.file_ending}"
    return gt if gt.is_file() else raw_dir() / member.dataset_name / "labelsTr" / f"{case}{member.file_ending}"


def label_tasks(member) -> list[tuple[str, Any]]:
    """(label name, value or region list) of every labelled structure of a member, in dataset.json order."""
    return [(name, v) for name, v in member.labels.items() if name not in ("background", "ignore")]


def prediction_folders(method: Method, spec, models_dir: Path, report_dir: Path, fold, configuration: str,
                       trainer_class: str, member_plans: str, joint_plans: str) -> dict[str, Path]:
    """member name -> folder of its validation predictions (label maps in the member's values). For the in-context
    method: the parent folder of one sub-folder per label."""
    fold_dir = f"fold_{fold}"
    if method.paradigm == "per-dataset":
        return {m.dataset_name: model_folder(m.dataset_name, trainer_class, member_plans, configuration, models_dir)
                / fold_dir / "validation" for m in spec.members}
    if method.paradigm == "in-context":
        return {m.dataset_name: report_dir / "predictions" / method.name / m.dataset_name for m in spec.members}
    base = model_folder(spec.name, method.trainer, joint_plans, configuration, models_dir) / fold_dir
    return {m.dataset_name: base / "validation" / m.dataset_name for m in spec.members}
