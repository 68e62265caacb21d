"""Where things live: nnU-Net's environment variables, read at call time like nnU-Net's own paths."""
from __future__ import annotations

import os
from pathlib import Path


class PathNotSetError(RuntimeError, ValueError):
    """An nnU-Net folder variable is not set. A RuntimeError as nnU-Net's own, and a ValueError so that the
    commands print it as one line."""


def _env_dir(var: str) -> Path:
    value = os.environ.get(var)
    if not value:
        raise PathNotSetError(
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


#: collections are named like nnU-Net's datasets, ``CollectionXXX_Name``, so that ``XXX`` can be typed instead
COLLECTION_PREFIX = "Collection"


def collection_candidates(identifier: int | str, roots: list[Path]) -> list[str]:
    """Folder names ``CollectionXXX_*`` of collection id ``identifier`` in ``roots`` (as nnU-Net's
    ``find_candidate_datasets`` for ``DatasetXXX_*``)."""
    pattern = f"{COLLECTION_PREFIX}{int(identifier):03d}_*"
    return sorted({p.name for root in roots if root.is_dir() for p in root.glob(pattern) if p.is_dir()})


def resolve_collection_name(name_or_id: int | str) -> str:
    """A collection's name from its name or its id (``900`` or ``"900"`` -> ``Collection900_Synth``), looked up
    in ``$nnUNet_preprocessed`` and, where set, ``$nnUNet_results``; a name is returned unchanged."""
    text = str(name_or_id)
    if not text.isdigit():
        return text
    roots = [preprocessed_dir()] + ([results_dir()] if os.environ.get("nnUNet_results") else [])
    found = collection_candidates(int(text), roots)
    if len(found) == 1:
        return found[0]
    where = " or ".join(f"${r}" for r in ("nnUNet_preprocessed", "nnUNet_results")[:len(roots)])
    if not found:
        raise FileNotFoundError(f"collection id {text}: no folder {COLLECTION_PREFIX}{int(text):03d}_* in {where}")
    raise ValueError(f"collection id {text}: several folders match in {where}: {found}; give the name")
