"""Where things live: nnU-Net's environment variables, read at call time like nnU-Net's own paths."""
from __future__ import annotations

import os
from pathlib import Path


def _env_dir(var: str) -> Path:
    value = os.environ.get(var)
    if not value:
        raise RuntimeError(
            f"${var} is not set. nnharmony uses nnU-Net's folders: export nnUNet_raw, "
            f"nnUNet_preprocessed and nnUNet_results (see nnU-Net's setting_up_paths.md)."
        )
    return Path(value)


def raw_dir() -> Path:
    return _env_dir("nnUNet_raw")


def preprocessed_dir() -> Path:
    return _env_dir("nnUNet_preprocessed")


def results_dir() -> Path:
    return _env_dir("nnUNet_results")


def collection_dir(name: str) -> Path:
    """``$nnUNet_preprocessed/NAME``: holds collection.json and the joint plans."""
    return preprocessed_dir() / name


COLLECTION_SPEC_FILE = "collection.json"
JOINT_PLANS_NAME = "nnHarmonyPlans"


def collection_spec_path(name: str) -> Path:
    return collection_dir(name) / COLLECTION_SPEC_FILE


def joint_plans_path(name: str, plans_name: str = JOINT_PLANS_NAME) -> Path:
    return collection_dir(name) / f"{plans_name}.json"


def find_dataset_folder(dataset_id: int | str, root: Path | None = None) -> Path:
    """``DatasetXXX_Name`` folder of a dataset id in ``$nnUNet_raw`` (or ``root``), with a clear error."""
    root = raw_dir() if root is None else root
    if isinstance(dataset_id, str) and dataset_id.startswith("Dataset"):
        candidate = root / dataset_id
        if candidate.is_dir():
            return candidate
        raise FileNotFoundError(f"dataset {dataset_id}: no folder {candidate}")
    try:
        did = int(dataset_id)
    except (TypeError, ValueError):
        raise ValueError(f"dataset id {dataset_id!r} is neither a number nor a DatasetXXX_Name folder name") from None
    matches = sorted(p for p in root.glob(f"Dataset{did:03d}_*") if p.is_dir()) if root.is_dir() else []
    if not matches:
        raise FileNotFoundError(f"dataset {did}: no folder Dataset{did:03d}_* in {root}")
    if len(matches) > 1:
        raise ValueError(f"dataset {did}: several folders match in {root}: {[m.name for m in matches]}")
    return matches[0]
