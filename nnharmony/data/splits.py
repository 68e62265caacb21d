"""Cross-validation folds of a collection: fold ``k`` of a collection is the union of every member's own
nnU-Net fold ``k``.

Each member keeps nnU-Net's ``$nnUNet_preprocessed/DatasetXXX_Name/splits_final.json``: it is used as is when
present (so a custom split made for nnU-Net applies unchanged) and otherwise created exactly as
``nnUNetTrainer.do_split`` creates it (5-fold ``KFold``, shuffle, seed 12345, over the sorted case identifiers).
A model trained on collection fold ``k`` therefore never saw any member's fold-``k`` validation cases, and its
validation results are comparable with a single-dataset nnU-Net model of the same fold.

**Grouped cases.** Cases that are not independent (several 2D slices of one patient, several scans of one
subject) must never sit on both sides of a fold, or validation cases have near-twins in training. A dataset
declares its groups in its ``dataset.json`` under ``"case_groups"``:

* a regular expression matched at the start of every case id; the group is its named group ``group``, else its
  first group, else the whole match: ``"case_groups": "^btcv_(\\\\d+)_"`` puts ``btcv_7_081`` in group ``7``;
* or an object ``{"case id": "group", ...}`` covering every training case.

``nnharmony_convert ... --group-pattern REGEX`` writes the first form. The folds are then nnU-Net's split over
the sorted *group* names (same KFold, shuffle, seed), each group expanding to its cases; with one case per group
this is exactly nnU-Net's split. An existing ``splits_final.json`` that puts one group on both sides of a fold is
refused. ``nnharmony_plan_and_preprocess`` writes the split file of every member with groups
(:func:`ensure_member_splits`), so plain ``nnUNetv2_train`` on such a member uses the grouped folds too.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from nnharmony.data.collection import CollectionSpec
from nnharmony.paths import preprocessed_dir, raw_dir
from nnharmony.utils.io import load_json, save_json_atomic

SPLITS_FILE = "splits_final.json"
CASE_GROUPS_KEY = "case_groups"
NUM_FOLDS = 5
SPLIT_SEED = 12345


# ---------------------------------------------------------------------------------------------- case groups
def _group_of(match: re.Match | None) -> str:
    """The group named by a case-name match ('' when it names none)."""
    if match is None:
        return ""
    key = "group" if "group" in match.re.groupindex else (1 if match.re.groups else 0)
    return match.group(key) or ""


def case_groups(dataset_json: Mapping[str, Any], case_ids: Iterable[str], source: str = "dataset.json"
                ) -> dict[str, str] | None:
    """``case -> group`` from a dataset.json's ``case_groups`` (module docstring); None when it has none.

    ValueError naming ``source`` for an invalid pattern or a case that gets no group."""
    spec = dataset_json.get(CASE_GROUPS_KEY)
    if spec is None:
        return None
    ids = list(case_ids)
    if isinstance(spec, str):
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{source}: '{CASE_GROUPS_KEY}' {spec!r} is not a valid regular expression ({e})") from None
        groups = {c: g for c in ids if (g := _group_of(rx.match(c)))}
    elif isinstance(spec, Mapping):
        groups = {c: str(spec[c]) for c in ids if c in spec and str(spec[c])}
    else:
        raise ValueError(f"{source}: '{CASE_GROUPS_KEY}' must be a regular expression or an object case -> group, "
                         f"got {type(spec).__name__}")
    missing = [c for c in ids if c not in groups]
    if missing:
        raise ValueError(f"{source}: '{CASE_GROUPS_KEY}' gives no group to {len(missing)} case(s), e.g. "
                         f"{missing[:3]}")
    return groups


def _expand(units: Iterable[str], members: Mapping[str, list[str]]) -> list[str]:
    return sorted(c for u in units for c in members[u])


def _units(case_ids: Sequence[str], groups: Mapping[str, str] | None) -> tuple[list[str], dict[str, list[str]]]:
    """Split units (groups, or the cases themselves) in sorted order, and the cases of each unit."""
    members: dict[str, list[str]] = {}
    for c in sorted(case_ids):
        members.setdefault(groups[c] if groups is not None else c, []).append(c)
    return sorted(members), members


def crossval_split(case_ids: Sequence[str], groups: Mapping[str, str] | None = None,
                   n_splits: int = NUM_FOLDS, seed: int = SPLIT_SEED) -> list[dict]:
    """nnU-Net's ``generate_crossval_split`` over the sorted groups (or cases), expanded to sorted case ids."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    units, members = _units([str(c) for c in case_ids], groups)
    if len(units) < n_splits:
        what = "groups of cases" if groups is not None else "training cases"
        raise ValueError(f"nnU-Net's {n_splits}-fold cross-validation needs at least {n_splits} {what}, found "
                         f"{len(units)}; write a splits_final.json by hand or train fold 'all'")
    return [{"train": _expand(s["train"], members), "val": _expand(s["val"], members)}
            for s in generate_crossval_split(units, seed=seed, n_splits=n_splits)]


def random_split(case_ids: Sequence[str], fold: int, groups: Mapping[str, str] | None = None) -> tuple[list, list]:
    """``nnUNetTrainer.do_split`` for a fold beyond the split file: a seeded random 80:20 split (of groups)."""
    units, members = _units([str(c) for c in case_ids], groups)
    rnd = np.random.RandomState(seed=SPLIT_SEED + fold)
    idx_tr = set(rnd.choice(len(units), int(len(units) * 0.8), replace=False).tolist())
    return (_expand([u for j, u in enumerate(units) if j in idx_tr], members),
            _expand([u for j, u in enumerate(units) if j not in idx_tr], members))


def check_splits_respect_groups(splits: Sequence[Mapping], groups: Mapping[str, str], source: str) -> None:
    """ValueError naming ``source`` when a fold has one group in both its training and validation cases."""
    for k, s in enumerate(splits):
        train_groups = {groups.get(str(c)) for c in s["train"]} - {None}
        shared = sorted({groups[str(c)] for c in s["val"] if groups.get(str(c)) in train_groups})
        if shared:
            raise ValueError(f"{source}: fold {k} has cases of group(s) {shared[:5]} in both train and val, against "
                             f"the dataset's '{CASE_GROUPS_KEY}'; delete the file to get a grouped split, or fix it")


def member_dataset_json(preprocessed_member_folder: str | os.PathLike) -> dict:
    """The member's dataset.json: nnU-Net's copy in the preprocessed folder, else the raw dataset's; {} if none."""
    folder = Path(preprocessed_member_folder)
    for f in (folder / "dataset.json", raw_dir() / folder.name / "dataset.json"):
        if f.is_file():
            return load_json(f)
    return {}


# ---------------------------------------------------------------------------------------------- member splits
def member_splits(preprocessed_member_folder: str | os.PathLike, case_ids: Sequence[str] | None) -> list[dict]:
    """The member's nnU-Net splits (``[{"train": [...], "val": [...]}, ...]``).

    Loads ``<preprocessed_member_folder>/splits_final.json``; if it does not exist, creates it from ``case_ids``
    like nnU-Net (:func:`crossval_split`, grouped when the dataset declares ``case_groups``) and writes it
    atomically (several DDP ranks may race to create it; they all write the same content).
    """
    path = Path(preprocessed_member_folder) / SPLITS_FILE
    dj = member_dataset_json(preprocessed_member_folder)
    if path.is_file():
        splits = load_json(path)
        if not isinstance(splits, list) or not all(isinstance(s, dict) and "train" in s and "val" in s
                                                    for s in splits):
            raise ValueError(f"{path}: expected a list of {{'train': [...], 'val': [...]}} entries")
        if dj.get(CASE_GROUPS_KEY) is not None:
            ids = {str(c) for s in splits for c in list(s["train"]) + list(s["val"])}
            check_splits_respect_groups(splits, case_groups(dj, sorted(ids), f"{path.parent.name}: dataset.json"),
                                        str(path))
        return splits
    if case_ids is None:
        raise FileNotFoundError(f"{path} does not exist and no case identifiers were given to create it")
    groups = case_groups(dj, case_ids, f"{path.parent.name}: dataset.json")
    try:
        splits = crossval_split(case_ids, groups)
    except ValueError as e:
        raise ValueError(f"{path.parent.name}: {e}") from None
    save_json_atomic(splits, path)
    return splits


def ensure_member_splits(dataset_name: str) -> list[dict] | None:
    """Write the grouped ``splits_final.json`` of a member that declares ``case_groups`` now (after
    preprocessing), before any trainer -- nnharmony's or plain nnU-Net's ``do_split``, which knows no groups --
    creates an ungrouped one. An existing file is checked and kept. Returns the splits, or None when the member
    has no groups or fewer groups than folds (only fold ``all`` can be trained then, as in nnU-Net)."""
    folder = preprocessed_dir() / dataset_name
    if member_dataset_json(folder).get(CASE_GROUPS_KEY) is None:
        return None
    if (folder / SPLITS_FILE).is_file():
        return member_splits(folder, None)
    ids = member_case_ids(dataset_name)
    groups = case_groups(member_dataset_json(folder), ids, f"{dataset_name}: dataset.json")
    if len(set(groups.values())) < NUM_FOLDS:
        return None
    return member_splits(folder, ids)


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
            case_ids = ids()
            tr, val = random_split(case_ids, k, case_groups(member_dataset_json(folder), case_ids, m.dataset_name))
        out[i] = (tr, val)
    return out
