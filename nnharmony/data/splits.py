"""Cross-validation folds of a collection: fold ``k`` of a collection is the union of every member's own
nnU-Net fold ``k``.

Each member keeps nnU-Net's ``$nnUNet_preprocessed/DatasetXXX_Name/splits_final.json``: it is used as is when
present (so a custom split made for nnU-Net applies unchanged) and otherwise created exactly as
``nnUNetTrainer.do_split`` creates it (5-fold ``KFold``, shuffle, seed 12345, over the sorted case identifiers).
A model trained on collection fold ``k`` therefore never saw any member's fold-``k`` validation cases, and its
validation results are comparable with a single-dataset nnU-Net model of the same fold.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from nnharmony.data.collection import CollectionSpec
from nnharmony.paths import preprocessed_dir, raw_dir
from nnharmony.utils.io import load_json, save_json_atomic

SPLITS_FILE = "splits_final.json"


def member_splits(preprocessed_member_folder: str | os.PathLike, case_ids: Sequence[str] | None) -> list[dict]:
    """The member's nnU-Net splits (``[{"train": [...], "val": [...]}, ...]``).

    Loads ``<preprocessed_member_folder>/splits_final.json``; if it does not exist, creates it from ``case_ids``
    like nnU-Net (``generate_crossval_split(sorted(case_ids), seed=12345, n_splits=5)``) and writes it atomically
    (several DDP ranks may race to create it; they all write the same content).
    """
    path = Path(preprocessed_member_folder) / SPLITS_FILE
    if path.is_file():
        splits = load_json(path)
        if not isinstance(splits, list) or not all(isinstance(s, dict) and "train" in s and "val" in s
                                                    for s in splits):
            raise ValueError(f"{path}: expected a list of {{'train': [...], 'val': [...]}} entries")
        return splits
    if case_ids is None:
        raise FileNotFoundError(f"{path} does not exist and no case identifiers were given to create it")
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    keys = [str(k) for k in np.sort(list(case_ids))]
    if len(keys) < 5:
        raise ValueError(
            f"{path.parent.name}: nnU-Net's 5-fold cross-validation needs at least 5 training cases, found "
            f"{len(keys)}; write a splits_final.json by hand or train fold 'all'"
        )
    splits = generate_crossval_split(keys, seed=12345, n_splits=5)
    splits = [{"train": [str(k) for k in s["train"]], "val": [str(k) for k in s["val"]]} for s in splits]
    save_json_atomic(splits, path)
    return splits


def member_case_ids(dataset_name: str, configuration: str | None = None, plans_identifier: str = "nnUNetPlans",
                    data_identifier: str | None = None) -> list[str]:
    """Sorted training case identifiers of a member.

    With a configuration (or an explicit ``data_identifier``): the cases in its preprocessed data folder, as
    nnU-Net's trainer lists them. Otherwise: ``gt_segmentations/`` of the preprocessed folder (nnU-Net copies
    every training label there), falling back to the raw dataset's ``labelsTr``.
    """
    base = preprocessed_dir() / dataset_name
    if data_identifier is None and configuration is not None:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans_file = base / f"{plans_identifier}.json"
        if not plans_file.is_file():
            raise FileNotFoundError(f"{dataset_name}: no plans file {plans_file}; run nnU-Net's planning first")
        data_identifier = PlansManager(str(plans_file)).get_configuration(configuration).data_identifier
    if data_identifier is not None:
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        folder = base / data_identifier
        if not folder.is_dir():
            raise FileNotFoundError(f"{dataset_name}: no preprocessed data folder {folder}; run preprocessing first")
        return sorted(infer_dataset_class(str(folder)).get_identifiers(str(folder)))
    dj_file = base / "dataset.json"
    if not dj_file.is_file():
        dj_file = raw_dir() / dataset_name / "dataset.json"
    file_ending = load_json(dj_file)["file_ending"]
    for folder in (base / "gt_segmentations", raw_dir() / dataset_name / "labelsTr"):
        if folder.is_dir():
            ids = sorted(f[: -len(file_ending)] for f in os.listdir(folder) if f.endswith(file_ending))
            if ids:
                return ids
    raise FileNotFoundError(f"{dataset_name}: cannot list its training cases (no preprocessed data, "
                            f"gt_segmentations or labelsTr)")


def collection_fold(spec: CollectionSpec, fold: int | str, configuration: str | None = None,
                    plans_identifier: str = "nnUNetPlans",
                    data_identifiers: dict[int, str] | None = None) -> dict[int, tuple[list[str], list[str]]]:
    """``{member_index: (train_ids, val_ids)}`` of collection fold ``fold``.

    ``fold`` = ``"all"``: every case is both training and validation case (nnU-Net's ``fold all``). A fold
    beyond the member's split file gets nnU-Net's seeded random 80:20 split (``RandomState(12345 + fold)``).
    ``configuration``/``plans_identifier``/``data_identifiers`` (member index -> data identifier) only say where
    to list a member's cases when they are needed (fold ``all`` or a missing split file); see
    :func:`member_case_ids`.
    """
    data_identifiers = data_identifiers or {}
    out: dict[int, tuple[list[str], list[str]]] = {}
    for i, m in enumerate(spec.members):
        def ids() -> list[str]:
            return member_case_ids(m.dataset_name, configuration, plans_identifier, data_identifiers.get(i))

        if fold == "all":
            case_ids = ids()
            out[i] = (list(case_ids), list(case_ids))
            continue
        try:
            k = int(fold)
        except (TypeError, ValueError):
            raise ValueError(f"fold must be an integer or 'all', got {fold!r}") from None
        folder = preprocessed_dir() / m.dataset_name
        splits = member_splits(folder, None if (folder / SPLITS_FILE).is_file() else ids())
        if k < len(splits):
            tr, val = list(splits[k]["train"]), list(splits[k]["val"])
        else:
            # nnUNetTrainer.do_split: a fold that the split file does not have gets a seeded random 80:20 split
            rnd = np.random.RandomState(seed=12345 + k)
            keys = np.sort(ids())
            idx_tr = rnd.choice(len(keys), int(len(keys) * 0.8), replace=False)
            tr = [str(keys[j]) for j in idx_tr]
            val = [str(keys[j]) for j in range(len(keys)) if j not in idx_tr]
        out[i] = (tr, val)
    return out
