"""A member's preprocessed data: checked against its raw cases, and repaired case by case.

nnU-Net writes preprocessed cases and ``gt_segmentations`` in place and records nothing when it is done, so
an interrupted run leaves missing or truncated files that a rerun cannot tell from finished ones (training then
fails at its final validation, or reads a broken case). Here:

* a configuration's data folder counts as complete only with its **completion record**
  ``$nnUNet_preprocessed/DatasetX/nnharmony_complete_<data_identifier>.json``, written atomically after every
  case was written; it holds the size of every file and a digest of the plans entries that shape the data. It
  lies beside the data folder (nnU-Net infers the folder's format from the file endings in it);
* with a record, a case is complete when its files have the recorded sizes (a stat, no read); a changed
  preprocessing digest redoes the whole configuration;
* without one (an interrupted run, or data preprocessed before the record existed) every case is read in full
  (``.pkl``, ``.b2nd``/``.npz``) and the readable ones are kept;
* only missing or broken cases are preprocessed again, with nnU-Net's own ``run_case_save``; cases whose raw
  data is gone are removed; the record is removed before the first write and rewritten at the end;
* ``gt_segmentations`` files are copies of the raw labels: one that is missing, of another size or older than
  its raw label is copied again, atomically.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm import tqdm

from nnharmony.paths import preprocessed_dir, raw_dir
from nnharmony.planners.workers import process_pool
from nnharmony.utils.io import atomic_write, load_json, save_json_atomic

RECORD_FORMAT = "nnharmony.preprocessed/1"
# files of one case, per nnU-Net storage format (the first entry names the format)
CASE_SUFFIXES = {"b2nd": (".b2nd", "_seg.b2nd", ".pkl"), "npz": (".npz", ".pkl")}
# configuration entries that change the preprocessed arrays (batch and patch size, the network, do not)
_SHAPING_KEYS = ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes", "use_mask_for_norm",
                 "resampling_fn_data", "resampling_fn_seg", "resampling_fn_data_kwargs", "resampling_fn_seg_kwargs",
                 "resampling_fn_probabilities", "resampling_fn_probabilities_kwargs")
_MAX_LISTED = 5


def record_path(dataset_name: str, data_identifier: str) -> Path:
    return preprocessed_dir() / dataset_name / f"nnharmony_complete_{data_identifier}.json"


def preprocessing_digest(plans: Mapping[str, Any], configuration: Mapping[str, Any],
                         dataset_json: Mapping[str, Any]) -> str:
    """Digest of everything that shapes a configuration's preprocessed arrays."""
    shaping = {
        "configuration": {k: configuration.get(k) for k in _SHAPING_KEYS},
        "plans": {k: plans.get(k) for k in ("transpose_forward", "foreground_intensity_properties_per_channel",
                                            "image_reader_writer")},
        "dataset": {k: dataset_json.get(k) for k in ("labels", "channel_names", "regions_class_order")},
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:20]


def storage_format(folder: Path) -> str:
    """``npz`` for folders nnU-Net wrote as compressed numpy, else ``b2nd`` (nnU-Net 2.6+)."""
    return "npz" if folder.is_dir() and any(p.suffix == ".npz" for p in folder.iterdir()) else "b2nd"


def case_files(folder: Path, case: str, fmt: str) -> list[Path]:
    return [folder / f"{case}{s}" for s in CASE_SUFFIXES[fmt]]


def present_cases(folder: Path, fmt: str) -> set[str]:
    """Identifiers with at least one file in ``folder``."""
    out = set()
    for p in folder.iterdir() if folder.is_dir() else ():
        for s in sorted(CASE_SUFFIXES[fmt] + (".npy", "_seg.npy"), key=len, reverse=True):
            if p.name.endswith(s):
                out.add(p.name[: -len(s)])
                break
    return out


def case_problem(folder: Path, case: str, fmt: str, sizes: Mapping[str, int] | None) -> str | None:
    """What is wrong with one case's files (``FILE: problem``), or None. ``sizes``: the completion record's
    sizes of the case's files (a stat suffices); None reads every file in full."""
    for f in case_files(folder, case, fmt):
        rel = f"{folder.parent.name}/{folder.name}/{f.name}"
        if not f.is_file():
            return f"{rel}: missing"
        if sizes is not None:
            size = f.stat().st_size
            if sizes.get(f.name) != size:
                return f"{rel}: {size} bytes, {sizes.get(f.name)} when it was written (truncated or replaced)"
            continue
        error = _unreadable(f)
        if error is not None:
            return f"{rel}: unreadable ({error})"
    return None


def _unreadable(path: Path) -> str | None:
    """Read ``path`` in full; the error in one line, or None."""
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as fh:
                pickle.load(fh)  # nnU-Net's own case properties, as its data loader reads them
        elif path.suffix == ".b2nd":
            import blosc2

            blosc2.open(urlpath=str(path), mode="r")[...]
        elif path.suffix == ".npz":
            import numpy as np

            with np.load(path) as z:
                for k in z.files:
                    z[k]
    except Exception as e:  # noqa: BLE001 - any failure to decode means the case must be redone
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


@dataclass
class PreprocessedState:
    """Check of one configuration's data folder against the raw cases."""

    redo_all: str | None = None  # why the whole folder is redone
    problems: dict[str, str] = field(default_factory=dict)  # case -> "FILE: problem"
    stale: list[str] = field(default_factory=list)  # cases without raw data
    record_missing: bool = False

    @property
    def complete(self) -> bool:
        return self.redo_all is None and not self.problems and not self.stale and not self.record_missing

    def summary(self, where: str, n_cases: int) -> str:
        if self.redo_all is not None:
            return f"{where}: {self.redo_all}; preprocessing all {n_cases} cases"
        parts = []
        if self.problems:
            listed = "; ".join(list(self.problems.values())[:_MAX_LISTED])
            more = f" and {len(self.problems) - _MAX_LISTED} more" if len(self.problems) > _MAX_LISTED else ""
            parts.append(f"{len(self.problems)} of {n_cases} cases incomplete ({listed}{more}); preprocessing them again")
        if self.stale:
            parts.append(f"removing {len(self.stale)} case(s) without raw data {self.stale[:_MAX_LISTED]}")
        return f"{where}: " + "; ".join(parts or ["all cases complete; writing the completion record"])


def check_preprocessed(folder: Path, record_file: Path, digest: str, raw_cases: Sequence[str]) -> PreprocessedState:
    """Compare ``folder`` (one configuration's data) with the raw cases and the completion record."""
    if not folder.is_dir():
        return PreprocessedState(redo_all=f"{folder.name}/ missing")
    record = _load_record(record_file)
    if record is not None and record.get("digest") != digest:
        return PreprocessedState(redo_all=f"{folder.name}/ was preprocessed with other plans")
    fmt = storage_format(folder)
    recorded = (record or {}).get("files", {})
    state = PreprocessedState(record_missing=record is None)
    for case in raw_cases:
        problem = case_problem(folder, case, fmt, recorded.get(case) if record is not None else None)
        if record is not None and case not in recorded:
            problem = problem or f"{folder.parent.name}/{folder.name}/{case}: not in {record_file.name}"
        if problem is not None:
            state.problems[case] = problem
    state.stale = sorted(present_cases(folder, fmt) - set(raw_cases))
    return state


def _load_record(record_file: Path) -> dict | None:
    try:
        record = load_json(record_file)
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def write_record(folder: Path, record_file: Path, digest: str, raw_cases: Sequence[str]) -> None:
    fmt = storage_format(folder)
    files = {c: {f.name: f.stat().st_size for f in case_files(folder, c, fmt)} for c in raw_cases}
    save_json_atomic({"format": RECORD_FORMAT, "digest": digest, "files": files}, record_file)


def preprocess_configuration(dataset_name: str, plans_identifier: str, configuration: str, num_processes: int,
                             verbose: bool = False, redo: bool = False) -> None:
    """Bring one configuration of a planned member to complete preprocessed data, redoing only what is needed
    (everything with ``redo``)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    base = preprocessed_dir() / dataset_name
    plans = load_json(base / f"{plans_identifier}.json")
    plans_manager = PlansManager(plans)
    if configuration not in plans_manager.available_configurations:
        return  # nnU-Net's preprocessing skips it too; the joint planner names the missing configuration
    cm = plans_manager.get_configuration(configuration)
    dataset_json = load_json(base / "dataset.json")
    dataset = get_filenames_of_train_images_and_targets(str(raw_dir() / dataset_name), dataset_json)
    folder = base / cm.data_identifier
    record_file = record_path(dataset_name, cm.data_identifier)
    digest = preprocessing_digest(plans, cm.configuration, dataset_json)
    state = PreprocessedState(redo_all="--clean") if redo else check_preprocessed(folder, record_file, digest,
                                                                                  sorted(dataset))
    if state.complete:
        return
    print(state.summary(f"{dataset_name} {configuration}", len(dataset)))
    record_file.unlink(missing_ok=True)  # from here on the folder is being written
    if state.redo_all is not None:
        shutil.rmtree(folder, ignore_errors=True)
        todo = sorted(dataset)
    else:
        todo = sorted(state.problems)
    folder.mkdir(parents=True, exist_ok=True)
    fmt = storage_format(folder)
    for case in [*todo, *state.stale]:
        for f in case_files(folder, case, fmt) + [folder / f"{case}.npy", folder / f"{case}_seg.npy"]:
            f.unlink(missing_ok=True)
    preprocessor = cm.preprocessor_class(verbose=verbose)
    jobs = [(str(folder / k), dataset[k]["images"], dataset[k]["label"], plans_manager, cm, dataset_json)
            for k in todo]
    _run_cases(preprocessor.run_case_save, jobs, num_processes, f"{dataset_name} {configuration}")
    write_record(folder, record_file, digest, sorted(dataset))


def _run_cases(fn: Any, jobs: list[tuple], num_processes: int, desc: str) -> None:
    """``fn(*job)`` for every job: in this process for one worker, else in a pool that stops with it."""
    if num_processes <= 1 or len(jobs) <= 1:
        for job in tqdm(jobs, desc=desc, unit="case", disable=len(jobs) < 2):
            fn(*job)
        return
    with process_pool(min(num_processes, len(jobs))) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        try:
            for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="case"):
                fut.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failed case stops the run; queued ones are not started
            raise


def sync_gt_segmentations(dataset_name: str) -> list[str]:
    """Copy every raw label that is missing, of another size or newer in ``gt_segmentations``; the names."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_json = load_json(raw_dir() / dataset_name / "dataset.json")
    dataset = get_filenames_of_train_images_and_targets(str(raw_dir() / dataset_name), dataset_json)
    gt = preprocessed_dir() / dataset_name / "gt_segmentations"
    gt.mkdir(parents=True, exist_ok=True)
    copied = []
    for case in sorted(dataset):
        src = Path(dataset[case]["label"])
        dst = gt / f"{case}{dataset_json['file_ending']}"
        if _is_copy(src, dst):
            continue
        atomic_write(dst, lambda tmp, s=src: shutil.copyfile(s, tmp))
        copied.append(dst.name)
    if copied:
        print(f"{dataset_name}: gt_segmentations: copied {len(copied)} label(s) missing or incomplete there "
              f"({', '.join(copied[:_MAX_LISTED])}{' ...' if len(copied) > _MAX_LISTED else ''})")
    return copied


def _is_copy(src: Path, dst: Path) -> bool:
    if not dst.is_file():
        return False
    s, d = src.stat(), dst.stat()
    return s.st_size == d.st_size and s.st_mtime <= d.st_mtime
