"""``nnharmony_plan_and_preprocess``: nnU-Net's fingerprint, planning and preprocessing for every member,
then the collection spec and the joint plan.

Members are validated before any work; finished steps are skipped unless ``clean``, and a step an interrupted
run left unfinished is redone (unreadable fingerprint or plans, incomplete preprocessed data or
``gt_segmentations``: :mod:`nnharmony.planners.preprocessed`); worker processes stop with this process
(:mod:`nnharmony.planners.workers`). Re-planning keeps an existing spec but applies the spec options given
(:mod:`nnharmony.planners.spec_options`). The spec and the joint plan are written atomically, so an
interrupted run leaves the previous files intact.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm import tqdm

from nnharmony.data.collection import CollectionError, CollectionSpec, build_collection_spec
from nnharmony.data.splits import ensure_member_splits
from nnharmony.paths import (COLLECTION_SPEC_FILE, collection_dir, find_dataset_folder, preprocessed_dir,
                             raw_dir)
from nnharmony.planners.joint_planner import build_joint_plans, joint_plans_identifier, planner_threads
from nnharmony.planners.preprocessed import preprocess_configuration, sync_gt_segmentations
from nnharmony.planners.spec_options import apply_spec_options, build_options
from nnharmony.planners.workers import nnunet_processes_bounded
from nnharmony.records.joint_plan import JointPlan
from nnharmony.records.model_folder import find_planner_class
from nnharmony.utils.io import load_json, save_json_atomic

DEFAULT_NUM_PROCESSES = {"2d": 4, "3d_fullres": 2}


@dataclass(frozen=True)
class WorkerCounts:
    """Processes each step may use: the counts the user gave, else nnharmony's defaults.

    ``fingerprint`` also bounds the raw-data validation's reader processes; without ``-npfp`` it is the
    largest preprocessing count of the configurations being planned (``-np 1`` means one process throughout)."""

    fingerprint: int
    preprocessing: dict[str, int]

    @classmethod
    def resolve(cls, configurations: Sequence[str], num_processes: Mapping[str, int] | None = None,
                fingerprint: int | None = None) -> "WorkerCounts":
        given = dict(num_processes or {})
        per_config = {c: int(given.get(c, DEFAULT_NUM_PROCESSES.get(c, 2))) for c in configurations}
        counts = [*per_config.values(), *([fingerprint] if fingerprint is not None else [])]
        if any(n < 1 for n in counts):
            raise ValueError(f"-np/-npfp: worker counts must be at least 1, got {counts}")
        fp = int(fingerprint) if fingerprint is not None else max(per_config.values(), default=1)
        return cls(fp, per_config)


def _json_readable(path: Path) -> bool:
    try:
        load_json(path)
    except (FileNotFoundError, ValueError):
        return False
    return True


def _must_redo(path: Path, what: str) -> bool:
    """Whether ``path`` (written by nnU-Net in place) must be written again: missing, or left unreadable by an
    interrupted run (said in one line, and removed: nnU-Net's planner would merge the new plans into it)."""
    if _json_readable(path):
        return False
    if path.exists():
        print(f"{path}: unreadable (an interrupted run?); {what} again")
        path.unlink()
    return True


def prepare_members(
    dataset_ids: Sequence[int],
    configurations: Sequence[str],
    planner_name: str = "ExperimentPlanner",
    gpu_memory_target_in_gb: float | None = None,
    num_processes: Mapping[str, int] | None = None,
    clean: bool = False,
    verbose: bool = False,
    num_processes_fingerprint: int | None = None,
) -> str:
    """Validate, fingerprint, plan and preprocess every member with nnU-Net; returns the plans identifier.

    Finished steps are reused unless ``clean``; an interrupted step is detected and redone (fingerprint and
    plans that do not parse, incomplete preprocessed data or ``gt_segmentations``: see
    :mod:`nnharmony.planners.preprocessed`). Worker processes stop with this process."""
    from nnharmony.dataset_conversion.validation import validate_members_compatible, validate_raw_dataset

    workers = WorkerCounts.resolve(configurations, num_processes, num_processes_fingerprint)
    folders = [find_dataset_folder(d) for d in dataset_ids]
    for folder in tqdm(folders, desc="validating members", disable=len(folders) < 2):
        validate_raw_dataset(folder, num_processes=workers.fingerprint)
    validate_members_compatible(folders, configurations=configurations)  # 2D + 3D members: -c 2d only

    planner_class = find_planner_class(planner_name)
    plans_identifier = None
    with nnunet_processes_bounded():
        for folder in tqdm(folders, desc="nnU-Net fingerprint/plan/preprocess", unit="dataset"):
            plans_identifier = _prepare_member(folder, configurations, planner_class, gpu_memory_target_in_gb,
                                               workers, clean, verbose)
    assert plans_identifier is not None
    return plans_identifier


def _prepare_member(folder: Path, configurations: Sequence[str], planner_class: type,
                    gpu_memory_target_in_gb: float | None, workers: WorkerCounts, clean: bool, verbose: bool) -> str:
    """Fingerprint, plans and preprocessed data of one member, each redone only when missing or incomplete."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset)

    did = int(folder.name[len("Dataset"):].split("_")[0])
    pre = preprocessed_dir() / folder.name
    if clean or _must_redo(pre / "dataset_fingerprint.json", "extracting the fingerprint"):
        extract_fingerprint_dataset(did, num_processes=workers.fingerprint, clean=True, verbose=verbose)
    kwargs = {} if gpu_memory_target_in_gb is None else {"gpu_memory_target_in_gb": gpu_memory_target_in_gb}
    plans_identifier = planner_class(did, **kwargs).plans_identifier
    # an explicit memory target re-plans: nnU-Net's planner writes it into the same plans file
    if (clean or gpu_memory_target_in_gb is not None or _must_redo(pre / f"{plans_identifier}.json", "planning")
            or _must_redo(pre / "dataset.json", "planning")):  # the planner copies dataset.json there
        with planner_threads():
            plan_experiment_dataset(did, planner_class, gpu_memory_target_in_gb)
    for c in configurations:
        preprocess_configuration(folder.name, plans_identifier, c, workers.preprocessing[c], verbose, redo=clean)
    sync_gt_segmentations(folder.name)
    ensure_member_splits(folder.name)  # grouped cases (case_groups): folds written before any trainer
    return plans_identifier


def plan_and_preprocess_collection(
    dataset_ids: Sequence[int],
    name: str,
    configurations: Sequence[str] = ("3d_fullres",),
    planner_name: str = "ExperimentPlanner",
    gpu_memory_target_in_gb: float | None = None,
    num_processes: Mapping[str, int] | None = None,
    clean: bool = False,
    spec_file: str | Path | None = None,
    spec_options: Mapping[str, Any] | None = None,
    verbose: bool = False,
    extends: str | None = None,
    num_processes_fingerprint: int | None = None,
) -> tuple[CollectionSpec, dict]:
    """The whole command. ``spec_file``: a hand-written spec to use instead of a generated one.
    ``spec_options``: the keyword arguments of ``build_collection_spec`` the user gave (domains, merge_by_name,
    aliases, a partial sampling dict); on re-planning they are applied to the kept spec
    (:mod:`nnharmony.planners.spec_options`). ``num_processes``/``num_processes_fingerprint``: see
    :class:`WorkerCounts`.
    ``extends``: an existing collection whose trained models will be adapted to this one: its modality, task
    and domain ids are kept and its joint network configuration (topology, patch, batch) is reused."""
    if not dataset_ids and spec_file is None:
        raise CollectionError("give the member datasets (-d) or a collection spec (--spec)")
    target = collection_dir(name)
    user_spec = CollectionSpec.load(spec_file) if spec_file is not None else None
    if user_spec is not None:
        if user_spec.name != name:
            user_spec.name = name
        if dataset_ids and sorted(dataset_ids) != sorted(m.dataset_id for m in user_spec.members):
            raise CollectionError(f"{spec_file}: its members {[m.dataset_id for m in user_spec.members]} differ from -d {list(dataset_ids)}")
        dataset_ids = [m.dataset_id for m in user_spec.members]
    # resolve ids and fail early on unknown ones
    ids = [int(find_dataset_folder(d).name[len("Dataset"):].split("_")[0]) for d in dataset_ids]
    if len(set(ids)) != len(ids):
        raise CollectionError(f"a dataset is listed twice: {list(dataset_ids)}")
    existing_spec_file = target / COLLECTION_SPEC_FILE
    existing = None
    if existing_spec_file.is_file():
        existing = CollectionSpec.load(existing_spec_file)
        if sorted(m.dataset_id for m in existing.members) != sorted(ids):
            if not clean:
                raise CollectionError(
                    f"collection {name} already exists at {target} with members "
                    f"{[m.dataset_id for m in existing.members]}, not {ids}; choose another name or pass --clean "
                    f"to replace it"
                )
            existing = None
    elif target.exists() and any(target.iterdir()) and not clean:
        raise CollectionError(f"{target} exists and is not an nnharmony collection; choose another name or pass --clean")

    plans_identifier = prepare_members(ids, configurations, planner_name, gpu_memory_target_in_gb, num_processes,
                                       clean, verbose, num_processes_fingerprint)
    joint_file = target / f"{joint_plans_identifier(plans_identifier)}.json"
    previous_joint = load_json(joint_file) if existing is not None and not clean and _json_readable(joint_file) else None
    if extends is None and previous_joint is not None:
        extends = JointPlan(previous_joint).extends  # an extended collection stays extended
    base = base_joint = None
    if extends is not None:
        from nnharmony.data.collection import check_extends
        from nnharmony.paths import joint_plans_path

        base = CollectionSpec.load(collection_dir(extends) / COLLECTION_SPEC_FILE)
        base_joint = load_json(joint_plans_path(extends, joint_plans_identifier(plans_identifier)))
    options = build_options(spec_options)
    spec = user_spec if user_spec is not None else existing if not clean else None
    changes: list[str] = []
    if spec is None:
        spec = build_collection_spec(name, ids, raw_root=raw_dir(), base=base, **options)
    elif options:  # options given on the command line win over the kept spec, for the fields they control
        # what a fresh plan would map channels and labels to (sampling is checked on the kept spec, with its weights)
        fresh = build_collection_spec(name, ids, raw_root=raw_dir(), base=base,
                                      **{k: v for k, v in options.items() if k != "sampling"})
        changes = apply_spec_options(spec, options, fresh, str(spec_file or existing_spec_file))
    spec.validate(str(spec_file or existing_spec_file))
    print("\n".join(changes), end="\n" if changes else "")
    if base is not None:
        check_extends(spec, base)
    # configurations planned before stay in the joint plan (re-planned from the members' current plans)
    joint_configurations = list(dict.fromkeys([*configurations, *(previous_joint or {}).get("configurations", {})]))
    with nnunet_processes_bounded():
        joint = build_joint_plans(spec, joint_configurations, find_planner_class(planner_name), plans_identifier,
                                  gpu_memory_target_in_gb)
    if base_joint is not None:
        # a model of the base collection must fit: same topology, patch and batch as the base's joint plan
        for c in joint_configurations:
            if c not in base_joint["configurations"]:
                raise CollectionError(f"collection {extends} has no '{c}' configuration to extend")
            joint["configurations"][c] = base_joint["configurations"][c]
        JointPlan(joint).extends = extends
    if clean and target.exists() and existing is None:
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    save_json_atomic(spec.dataset_json(), target / "dataset.json")
    spec.save(existing_spec_file)
    save_json_atomic(joint, joint_file)
    return spec, joint
