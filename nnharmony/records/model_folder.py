"""The model folder: where a trained model lives, what its checkpoints hold, and which trainer class it names.

* **Path convention** (nnU-Net's): ``$nnUNet_results/COLLECTION/{trainer}__{plans}__{configuration}/fold_K/``,
  with the joint plans (``plans.json``) and the collection's ``dataset.json`` next to the folds.
* **Checkpoint format**: written atomically, only tensors and plain Python values (numpy scalars of nnU-Net's
  logger are converted), so ``torch.load(..., weights_only=True)`` reads it
  (:func:`~nnharmony.utils.safe_load.read_weights_file`). The key ``"nnharmony"`` records the collection it was
  trained on (:func:`collection_fingerprint`) and the method's extra state (EMA, method config), so a checkpoint
  of another collection or trainer is refused with a clear message instead of a shape error;
  :func:`checkpoint_record` is the one reader of that key.
* **Trainer lookup** (``-tr`` / ``-pl``), as nnU-Net's, but across packages. Order: nnharmony's own package,
  then packages that register themselves under the entry-point group ``nnharmony.trainers`` /
  ``nnharmony.planners`` (value: a module or a class), then nnunetv2 (for trainers also ``$nnUNet_extTrainer``).
  A user's trainer in their own installed package is found without copying files into site-packages. Like
  nnU-Net's lookup, the search imports the packages by name when it runs, so this ground-floor module does not
  import the trainers above it.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator

from nnharmony.paths import results_dir

if TYPE_CHECKING:
    import torch

#: the checkpoint's key for nnharmony's own record (collection fingerprint + the method's extra state)
RECORD_KEY = "nnharmony"
OWN_TRAINERS = "nnharmony.trainers"
OWN_PLANNERS = "nnharmony.planners"


# ---------------------------------------------------------------------------------------------- path convention
def model_folder_name(trainer: str, plans: str, configuration: str) -> str:
    return f"{trainer}__{plans}__{configuration}"


def model_folder(collection: str, trainer: str, plans: str, configuration: str,
                 root: str | os.PathLike | None = None) -> Path:
    """``ROOT/COLLECTION/{trainer}__{plans}__{configuration}``; ROOT defaults to ``$nnUNet_results``."""
    return Path(root if root is not None else results_dir()) / collection / model_folder_name(trainer, plans,
                                                                                             configuration)


def trained_model_folders(collection: str, root: str | os.PathLike | None = None) -> list[str]:
    """Names of the model folders of ``collection`` (``*__*__*``), sorted."""
    base = Path(root if root is not None else results_dir()) / collection
    return sorted(p.name for p in base.glob("*__*__*") if p.is_dir()) if base.is_dir() else []


def trained_configurations(collection: str, trainer: str, plans: str) -> list[str]:
    """The configurations trained with ``trainer`` and ``plans`` in ``collection``, sorted."""
    prefix = model_folder_name(trainer, plans, "")
    return [n[len(prefix):] for n in trained_model_folders(collection) if n.startswith(prefix)]


def default_configuration(collection: str, trainer: str, plans: str) -> str:
    """The configuration to predict with when ``-c`` is not given: the only one trained, else 3d_fullres."""
    trained = trained_configurations(collection, trainer, plans)
    return trained[0] if len(trained) == 1 else "3d_fullres"


# ---------------------------------------------------------------------------------------------- checkpoint format
def checkpoint_record(checkpoint: Any) -> dict | None:
    """The checkpoint's nnharmony record (collection fingerprint, the method's extra state), None if absent."""
    return checkpoint.get(RECORD_KEY) if isinstance(checkpoint, dict) else None


def to_plain(obj: Any) -> Any:
    """numpy scalars/arrays -> Python floats/lists, recursively; torch.device -> str."""
    import numpy as np
    import torch

    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.device):
        return str(obj)
    return obj


def collection_fingerprint(spec) -> dict:
    return {"collection": spec.name, "tasks": list(spec.tasks), "modalities": list(spec.modalities),
            "domains": list(spec.domains), "members": [m.dataset_name for m in spec.members]}


def save_trainer_checkpoint(trainer, filename: str) -> None:
    net = trainer.unwrapped_network()
    checkpoint = {
        "network_weights": net.state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": to_plain(trainer.logger.get_checkpoint()),
        "_best_ema": to_plain(trainer._best_ema),
        "current_epoch": trainer.current_epoch + 1,
        "init_args": to_plain(trainer.my_init_kwargs),
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": to_plain(trainer.inference_allowed_mirroring_axes),
        RECORD_KEY: collection_fingerprint(trainer.spec),
    }
    extra = getattr(trainer, "extra_checkpoint_state", None)
    if callable(extra):
        checkpoint[RECORD_KEY].update(to_plain(extra()))
    from nnharmony.utils.io import save_torch_atomic

    save_torch_atomic(checkpoint, filename)


def load_checkpoint_file(path: str | os.PathLike, expected_trainer: str | None = None, expected_collection=None,
                         map_location: "str | torch.device" = "cpu") -> dict:
    """Read safely (:func:`~nnharmony.utils.safe_load.read_weights_file`); refuse a checkpoint of another trainer
    or collection."""
    from nnharmony.utils.safe_load import read_weights_file

    checkpoint = read_weights_file(path, "nnharmony checkpoint", map_location=map_location)
    info = checkpoint_record(checkpoint)
    if info is None:
        raise ValueError(f"{path}: not an nnharmony checkpoint (no collection record)")
    if expected_trainer is not None and checkpoint.get("trainer_name") != expected_trainer:
        raise ValueError(
            f"{path}: checkpoint of trainer {checkpoint.get('trainer_name')!r}, not {expected_trainer!r}"
        )
    if expected_collection is not None:
        want = collection_fingerprint(expected_collection)
        for key in ("collection", "tasks", "modalities"):
            if info.get(key) != want[key]:
                raise ValueError(
                    f"{path}: checkpoint of collection {info.get('collection')!r} with {key} {info.get(key)}, "
                    f"but this is collection {want['collection']!r} with {key} {want[key]}"
                )
    return checkpoint


# ---------------------------------------------------------------------------------------------- trainer lookup
TRAINER_GROUP = "nnharmony.trainers"
PLANNER_GROUP = "nnharmony.planners"


def _iter_modules(package: ModuleType) -> Iterator[ModuleType]:
    yield package
    if not hasattr(package, "__path__"):
        return
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        yield importlib.import_module(info.name)


def _classes_in(module_or_class, base: type) -> dict[str, type]:
    if inspect.isclass(module_or_class):
        return {module_or_class.__name__: module_or_class} if issubclass(module_or_class, base) else {}
    found = {}
    for mod in _iter_modules(module_or_class):
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, base) and name not in found:
                found[name] = obj
    return found


def _entry_point_classes(group: str, base: type) -> dict[str, type]:
    found: dict[str, type] = {}
    for ep in entry_points(group=group):
        if ep.value.split(":")[0].split(".")[0] == "nnharmony":
            continue  # nnharmony's own registration: searched first anyway
        for name, cls in _classes_in(ep.load(), base).items():
            found.setdefault(name, cls)
    return found


def find_trainer_class(name: str) -> type:
    """The trainer class called ``name``; a clear error listing close matches if there is none."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    own = _classes_in(importlib.import_module(OWN_TRAINERS), nnUNetTrainer)
    if name in own:
        return own[name]
    registered = _entry_point_classes(TRAINER_GROUP, nnUNetTrainer)
    if name in registered:
        return registered[name]
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError):
        pass
    known = set(own) | set(registered)
    try:
        import nnunetv2.training.nnUNetTrainer as nt

        known |= set(_classes_in(nt, nnUNetTrainer))
    except Exception:  # a broken third-party variant must not hide the real error
        pass
    close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ValueError(
        f"trainer {name!r} not found in nnharmony.trainers, in packages registered under the entry-point group "
        f"'{TRAINER_GROUP}', or in nnunetv2 (and $nnUNet_extTrainer).{hint}"
    )


def find_planner_class(name: str) -> type:
    """The experiment planner called ``name`` (nnharmony.planners, registered packages, nnunetv2)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    for source in (
        lambda: _classes_in(importlib.import_module(OWN_PLANNERS), ExperimentPlanner),
        lambda: _entry_point_classes(PLANNER_GROUP, ExperimentPlanner),
    ):
        classes = source()
        if name in classes:
            return classes[name]
    import nnunetv2.experiment_planning.experiment_planners as ep

    classes = _classes_in(ep, ExperimentPlanner)
    if name in classes:
        return classes[name]
    close = difflib.get_close_matches(name, sorted(classes), n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ValueError(f"experiment planner {name!r} not found in nnharmony.planners, registered packages or nnunetv2.{hint}")
