"""Checks of the names and folders a command was given, run before torch and nnU-Net are imported.

Importing torch and nnU-Net takes from seconds to minutes on a busy CPU; a misspelt trainer, collection,
configuration or an unset ``$nnUNet_results`` must fail at once, in one line, with the close matches. This
module therefore uses the standard library only: trainer and planner names are read from the source files
(``class Name(``), never imported; the import-based lookup (:mod:`nnharmony.records.model_folder`) still checks
the class itself later.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterable

from nnharmony.paths import (COLLECTION_SPEC_FILE, PathNotSetError, collection_candidates, preprocessed_dir,
                             resolve_collection_name, results_dir)
from nnharmony.records.model_folder import model_folder, trained_model_folders

NNHARMONY_ROOT = Path(__file__).resolve().parents[1]
_CLASS_RE = re.compile(r"^class\s+(\w+)", re.MULTILINE)


def close_matches(name: str, candidates: Iterable[str]) -> str:
    """`` Close matches: a, b.`` for an error message, or nothing."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=5, cutoff=0.6)
    return f" Close matches: {', '.join(close)}." if close else ""


# ---------------------------------------------------------------------------------------------- folders
def require_folders(*variables: str, outputs: Iterable[str] = ()) -> None:
    """Each of nnU-Net's folder variables (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``) is set
    and names an existing folder; one in ``outputs`` (a folder the command writes) may be missing, as in nnU-Net,
    which creates it, but not be a file."""
    outputs = set(outputs)
    for var in (*variables, *sorted(outputs - set(variables))):
        value = os.environ.get(var)
        if not value:
            raise PathNotSetError(f"${var} is not set: export nnUNet_raw, nnUNet_preprocessed and nnUNet_results "
                                  f"(nnU-Net's folders, see nnU-Net's setting_up_paths.md)")
        if Path(value).is_dir() or (var in outputs and not Path(value).exists()):
            continue
        raise FileNotFoundError(f"${var}={value}: " + ("not a folder" if Path(value).exists() else
                                                        "folder does not exist"))


# ---------------------------------------------------------------------------------------------- collections
def _collections_in(root: Path, marker: str | None) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (marker is None or (p / marker).is_file()))


def planned_collection(name_or_id: str) -> str:
    """The name of a planned collection (``$nnUNet_preprocessed/NAME/collection.json``) given by name or id."""
    name = _resolve(name_or_id)
    if not (preprocessed_dir() / name / COLLECTION_SPEC_FILE).is_file():
        planned = _collections_in(preprocessed_dir(), COLLECTION_SPEC_FILE)
        raise FileNotFoundError(
            f"collection {name} was not planned: {preprocessed_dir() / name / COLLECTION_SPEC_FILE} is missing; run "
            f"nnharmony_plan_and_preprocess -d ... -n {name} first.{close_matches(name, planned)}"
            + (f" Planned: {', '.join(planned)}." if planned and not close_matches(name, planned) else ""))
    return name


def trained_collection(name_or_id: str) -> str:
    """The name of a collection with trained models (``$nnUNet_results/NAME``) given by name or id."""
    name = _resolve(name_or_id)
    if not (results_dir() / name).is_dir():
        trained = _collections_in(results_dir(), None)
        hint = close_matches(name, trained)
        raise FileNotFoundError(f"collection {name}: no trained model in $nnUNet_results ({results_dir() / name} "
                                f"does not exist).{hint}" + (f" Trained: {', '.join(trained)}." if trained and not
                                                            hint else ""))
    return name


def resolve_trained(name_or_id: str) -> str:
    """A collection's name from its name or id, looked up in ``$nnUNet_results`` too; its model folder is
    checked by :func:`check_trained_model`, whose message names the missing folder."""
    return _resolve(name_or_id)


def _resolve(name_or_id: str) -> str:
    text = str(name_or_id)
    if text.isdigit() and not collection_candidates(int(text), [preprocessed_dir()] + (
            [results_dir()] if os.environ.get("nnUNet_results") else [])):
        member = _member_dataset(int(text))
        if member:
            raise FileNotFoundError(f"{text} is the id of dataset {member[0]}, a member of {', '.join(member[1])}; "
                                    f"give the collection's name or id")
    return resolve_collection_name(text)


def _member_dataset(dataset_id: int) -> tuple[str, list[str]] | None:
    """(DatasetXXX_Name, collections it belongs to) for a member dataset id, read from the planned specs."""
    owners, dataset = [], None
    for name in _collections_in(preprocessed_dir(), COLLECTION_SPEC_FILE):
        try:
            spec = json.loads((preprocessed_dir() / name / COLLECTION_SPEC_FILE).read_text())
        except (OSError, ValueError):
            continue
        for m in spec.get("members", []):
            if m.get("dataset_id") == dataset_id:
                owners.append(name)
                dataset = m.get("dataset_name")
    return (dataset, owners) if owners else None


def planned_configurations(collection: str, plans: str) -> list[str]:
    """Configurations of the joint plans ``$nnUNet_preprocessed/COLLECTION/PLANS.json``."""
    plans_file = preprocessed_dir() / collection / f"{plans}.json"
    if not plans_file.is_file():
        others = sorted(p.stem for p in (preprocessed_dir() / collection).glob("*Plans*.json"))
        raise FileNotFoundError(f"{plans_file}: no such joint plans (-p {plans}).{close_matches(plans, others)}"
                                + (f" Available: {', '.join(others)}." if others else ""))
    try:
        return sorted(json.loads(plans_file.read_text())["configurations"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{plans_file}: not a plans file with 'configurations' ({e})") from None


def check_configuration(configuration: str, available: list[str], what: str) -> None:
    if configuration not in available:
        raise ValueError(f"configuration {configuration!r} is not in {what} (available: {', '.join(available)})."
                         f"{close_matches(configuration, available)}")


# ---------------------------------------------------------------------------------------------- class names
def _module_path(module: str) -> Path | None:
    """File or folder of ``module``, found without importing it or its parents."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not spec.submodule_search_locations:
        return Path(spec.origin) if spec.origin and not rest else None
    base = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest)
    if base.is_dir():
        return base
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def _class_names(path: Path | None) -> set[str]:
    if path is None or not path.exists():
        return set()
    files = [path] if path.is_file() else path.rglob("*.py")
    names: set[str] = set()
    for f in files:
        try:
            names.update(_CLASS_RE.findall(f.read_text(errors="replace")))
        except OSError:
            continue
    return names


def _registered_class_names(group: str) -> set[str]:
    names: set[str] = set()
    for ep in entry_points(group=group):
        module, _, attr = ep.value.partition(":")
        names |= {attr.strip()} if attr else _class_names(_module_path(module.strip()))
    return names


def trainer_names() -> set[str]:
    """Class names where nnharmony_train looks trainers up: nnharmony, packages registered under
    ``nnharmony.trainers``, nnunetv2's trainer folder and ``$nnUNet_extTrainer``."""
    names = _class_names(NNHARMONY_ROOT / "trainers") | _registered_class_names("nnharmony.trainers")
    names |= _class_names(_module_path("nnunetv2.training.nnUNetTrainer"))
    for folder in filter(None, os.environ.get("nnUNet_extTrainer", "").split(os.pathsep)):
        names |= _class_names(Path(folder))
    return names


def is_plain_nnunet_trainer(name: str) -> bool:
    """A trainer of nnunetv2 (or ``$nnUNet_extTrainer``) and not of nnharmony or a registered package: the
    per-dataset paradigm, whose models are plain nnU-Net models."""
    ours = _class_names(NNHARMONY_ROOT / "trainers") | _registered_class_names("nnharmony.trainers")
    return name not in ours and name in trainer_names()


def planner_names() -> set[str]:
    """Class names where ``-pl`` is looked up: nnharmony's planners, registered packages, nnunetv2's."""
    return (_class_names(NNHARMONY_ROOT / "planners") | _registered_class_names("nnharmony.planners")
            | _class_names(_module_path("nnunetv2.experiment_planning")))


def check_trainer(name: str) -> None:
    known = trainer_names()
    if name not in known:
        raise ValueError(f"trainer {name!r} not found in nnharmony.trainers, packages registered under the "
                         f"entry-point group 'nnharmony.trainers', nnunetv2 or $nnUNet_extTrainer."
                         f"{close_matches(name, (n for n in known if 'Trainer' in n))}")


def check_planner(name: str) -> None:
    known = planner_names()
    if name not in known:
        raise ValueError(f"experiment planner {name!r} not found in nnharmony.planners, registered packages or "
                         f"nnunetv2.{close_matches(name, (n for n in known if 'Planner' in n))}")


# ---------------------------------------------------------------------------------------------- trained models
def check_trained_model(collection: str, trainer: str, plans: str, configuration: str,
                        folds: list[str] | None, checkpoint: str) -> Path:
    """The model folder of ``-tr -p -c`` exists and holds ``fold_F/CHECKPOINT`` for every fold given."""
    folder = model_folder(collection, trainer, plans, configuration)
    if not (results_dir() / collection).is_dir():
        known = _collections_in(results_dir(), None)
        raise FileNotFoundError(f"{folder}: no trained model: collection {collection} has no folder in "
                                f"$nnUNet_results.{close_matches(collection, known)}"
                                + (f" Trained: {', '.join(known)}." if known else ""))
    if not folder.is_dir():
        trained = trained_model_folders(collection)
        raise FileNotFoundError(
            f"{folder}: no trained model for -tr {trainer} -p {plans} -c {configuration}; trained in {collection}: "
            f"{', '.join(trained) or 'none'} (run nnharmony_train {collection} {configuration} FOLD -tr {trainer})")
    for f in folds or []:
        if not (folder / f"fold_{f}" / checkpoint).is_file():
            have = sorted(p.parent.name for p in folder.glob(f"fold_*/{checkpoint}"))
            raise FileNotFoundError(f"{folder / f'fold_{f}' / checkpoint}: no such checkpoint (-f {f} -chk "
                                    f"{checkpoint}); folds with {checkpoint}: {', '.join(have) or 'none'}")
    return folder
