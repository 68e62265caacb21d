"""Find trainer and planner classes by name, as nnU-Net's ``-tr`` / ``-pl`` do, but across packages.

Order: nnharmony's own package, then packages that register themselves under the entry-point group
``nnharmony.trainers`` / ``nnharmony.planners`` (value: a module or a class), then nnunetv2 (for trainers
also ``$nnUNet_extTrainer``). A user's trainer in their own installed package is found without copying
files into site-packages.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from importlib.metadata import entry_points
from types import ModuleType
from typing import Iterator

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

    import nnharmony.trainers

    own = _classes_in(nnharmony.trainers, nnUNetTrainer)
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

    import nnharmony.planners

    for source in (
        lambda: _classes_in(nnharmony.planners, ExperimentPlanner),
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
