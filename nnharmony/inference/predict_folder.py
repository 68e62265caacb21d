"""Predict a folder of cases in nnU-Net's naming (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ...)."""
from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

from tqdm import tqdm

from nnharmony.data.collection import CollectionSpec
from nnharmony.utils.io import load_json, save_json_atomic


def _same_folder(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one folder: equal once resolved (symlinks followed), or the same inode (bind mounts)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.is_dir() and b.is_dir() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_folder(output_folder: str | Path, input_folders: dict[str, str | Path | None] | None = None) -> Path:
    """Before any prediction: the input folders exist, the output folder is none of them, and it can be written.

    ``input_folders`` maps a name for messages (``"-i"``) to a folder (None: not given). The output folder
    itself is not created here (a later error leaves nothing behind): its nearest existing ancestor must be a
    folder in which a file can be created and removed. Output inside an input folder (or the reverse) is
    allowed: folders are listed without their subfolders, so neither sees the other's files."""
    out = Path(output_folder)
    for flag, folder in (input_folders or {}).items():
        if folder is None:
            continue
        folder = Path(folder)
        if not folder.is_dir():
            what = "input" if flag in ("-i", "input") else flag.lstrip("-")
            raise FileNotFoundError(f"{folder}: {what} folder not found")
        if _same_folder(out, folder):
            raise ValueError(f"output folder {out} is the input folder ({flag} {folder}): predictions CASE<ending> "
                             f"would be written among the inputs and taken for input files by the next run; "
                             f"give another output folder")
    existing = out
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is not a folder" if existing == out else f"cannot be created: {existing} is not a folder"
        raise ValueError(f"output folder {out} {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nnharmony_write_test_", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        where = "" if existing == out else f" (cannot create it in {existing})"
        raise ValueError(f"output folder {out} is not writable{where}: {e.strerror or e}") from None
    return out


def list_cases(input_folder: str | Path, file_ending: str, check_files: bool = True) -> dict[str, list[str]]:
    """case id -> channel files, sorted by channel index; a clear error for an empty or malformed folder and
    (``check_files``) for a truncated or corrupt image file."""
    folder = Path(input_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: input folder not found")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(file_ending) and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{folder}: no '*{file_ending}' images found (expected nnU-Net naming CASE_0000{file_ending})")
    cases: dict[str, list[str]] = {}
    for f in files:
        stem = f.name[: -len(file_ending)]
        if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            raise ValueError(f"{f}: name does not follow nnU-Net's CASE_XXXX{file_ending} channel naming")
        cases.setdefault(stem[:-5], []).append(str(f))
    for case, chans in cases.items():
        idx = [int(Path(c).name[: -len(file_ending)][-4:]) for c in chans]
        if idx != list(range(len(chans))):
            raise ValueError(f"{folder}: case {case} has channels {idx}; expected 0..{len(chans) - 1} without gaps")
    from nnharmony.dataset_conversion.image_integrity import check_image_file_intact

    for f in files if check_files else ():  # truncated/corrupt inputs would be read with zeros for the missing part
        check_image_file_intact(f)
    return cases


def list_cases_any_ending(input_folder: str | Path, file_endings: Sequence[str]) -> dict[str, list[str]]:
    """Cases of every member's file ending (``--dataset auto`` over members stored in different formats)."""
    cases: dict[str, list[str]] = {}
    errors = []
    for ending in file_endings:
        try:
            found = list_cases(input_folder, ending, check_files=False)
        except ValueError as e:
            errors.append(e)
            continue
        clash = sorted(set(found) & set(cases))
        if clash:
            raise ValueError(f"{input_folder}: case(s) {clash[:5]} exist with more than one file ending")
        cases.update(found)
    if not cases:
        raise errors[0] if len(errors) == 1 else ValueError(
            f"{input_folder}: no images found for any of the file endings {list(file_endings)}: {errors}")
    from nnharmony.dataset_conversion.image_integrity import check_image_file_intact

    for files in cases.values():
        for f in files:
            check_image_file_intact(f)
    return cases


def resolve_member(spec: CollectionSpec, dataset: str | int | None, supports_auto: bool, trainer: str) -> int | None:
    """Member index for ``--dataset`` (None means 'auto')."""
    if dataset is None:
        if len(spec.members) == 1:
            return 0
        raise ValueError(
            f"collection {spec.name} has {len(spec.members)} members: give --dataset "
            f"({', '.join(str(m.dataset_id) for m in spec.members)})"
            + (" or --dataset auto" if supports_auto else "")
        )
    if str(dataset) == "auto":
        if not supports_auto:
            raise ValueError(
                f"{trainer} cannot infer the dataset of an image: give --dataset "
                f"({', '.join(str(m.dataset_id) for m in spec.members)}); --dataset auto needs a trainer that "
                f"predicts the domain (UHarmonyTrainer, HermesTrainer)"
            )
        return None
    key = int(dataset) if str(dataset).isdigit() else dataset
    return spec.member_index(key)


def select_part(cases: dict[str, list[str]], num_parts: int, part_id: int) -> dict[str, list[str]]:
    """The cases of part ``part_id`` of ``num_parts`` (``-num_parts``/``-part_id``): every ``num_parts``-th case of
    the sorted list starting at ``part_id``, as nnUNetv2_predict splits its input."""
    names = sorted(cases)[part_id::num_parts]
    return {c: cases[c] for c in names}


def is_predicted(output_folder: Path, case: str, endings: set[str], save_probabilities: bool) -> bool:
    """A complete prediction of ``case`` exists (``--continue_prediction``): the segmentation is renamed into place
    last, so it exists only once it and its probabilities are complete."""
    if save_probabilities and not (output_folder / f"{case}.npz").is_file():
        return False
    return any((output_folder / (case + e)).is_file() for e in endings)


#: fewer cases than this are predicted in one process: a worker's start (importing torch and nnU-Net) costs
#: seconds on a CPU, more than it saves on a few cases
MIN_CASES_FOR_WORKERS = 4


def worker_count(requested: int, num_cases: int) -> int:
    """Worker processes for ``num_cases`` cases (``-npp``/``-nps``): none for a few cases, never more than the
    cases after the first."""
    return 0 if num_cases < MIN_CASES_FOR_WORKERS else max(0, min(requested, num_cases - 1))


def _spawn_pool(num_processes: int) -> ProcessPoolExecutor | None:
    """Worker processes (spawned, as nnU-Net's, so that no forked torch state is shared); None for 0."""
    return ProcessPoolExecutor(num_processes, mp_context=multiprocessing.get_context("spawn")) if num_processes else None


def _preprocessed(predictor, items: list[tuple[str, list[str], int | None]],
                  num_processes: int) -> Iterator[tuple[str, list[str], int, dict, "torch.Tensor", dict]]:
    """(case, files, member, member inference details, data, properties) in input order; with
    ``num_processes`` > 0, worker processes preprocess up to two cases per worker ahead of the network
    (nnU-Net's ``-npp``). Cases of unknown member (``--member auto``) are preprocessed here, after the member
    inference."""
    import torch

    from nnharmony.inference.predictor import preprocess_case

    if not num_processes or any(idx is None for _, _, idx in items):
        for case, files, idx in items:
            idx, extra = predictor.trainer_class.infer_member(predictor, files) if idx is None else (idx, {})
            data, props = predictor.preprocess(files, predictor.member_context(idx))
            yield case, files, idx, extra, data, props
        return
    pool = _spawn_pool(num_processes)

    def submit(item: tuple[str, list[str], int]) -> tuple:
        _, files, idx = item
        return (*item, pool.submit(preprocess_case, files, predictor.member_context(idx),
                                   predictor.spec.num_modalities))

    try:
        queue = iter(items)
        pending = deque(submit(item) for _, item in zip(range(2 * num_processes), queue))
        while pending:
            case, files, idx, future = pending.popleft()
            nxt = next(queue, None)
            if nxt is not None:
                pending.append(submit(nxt))
            data, props = future.result()
            yield case, files, idx, {}, torch.from_numpy(data), props
    finally:
        pool.shutdown(cancel_futures=True)


def _export_in_worker(*args) -> None:
    """:func:`export_case` in an ``-nps`` worker; a full disk comes back as its one-line message
    (``DiskFullError`` cannot be rebuilt from its pickled arguments)."""
    from nnharmony.inference.predictor import export_case
    from nnharmony.utils.io import DiskFullError

    try:
        export_case(*args)
    except DiskFullError as e:
        raise ValueError(str(e)) from None


class _Exporter:
    """Resampling and writing of predictions, in this process or in ``num_processes`` workers (nnU-Net's
    ``-nps``); at most two exports per worker wait, so memory stays bounded when the network is faster."""

    def __init__(self, predictor, num_processes: int):
        self.predictor = predictor
        self.limit = 2 * num_processes
        self.pool = _spawn_pool(num_processes)
        self.pending: deque = deque()

    def submit(self, logits, props: dict, idx: int, output_file_truncated: str, save_probabilities: bool,
               task_ids: list[int] | None) -> None:
        ctx = self.predictor.member_context(idx)
        if self.pool is None:
            self.predictor.export(logits, props, ctx, output_file_truncated, save_probabilities, task_ids)
            return
        while len(self.pending) >= self.limit:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(_export_in_worker, logits.cpu(), props, ctx, output_file_truncated,
                                             save_probabilities, task_ids))

    def close(self) -> None:
        """Wait for every export (an export's error is raised here) and stop the workers."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)


def _task_ids(spec: CollectionSpec, tasks: Sequence[str] | None) -> list[int] | None:
    if not tasks:
        return None
    unknown = [t for t in tasks if t not in spec.tasks]
    if unknown:
        raise ValueError(f"--tasks: {unknown} are not tasks of collection {spec.name} ({spec.tasks})")
    return [spec.tasks.index(t) for t in tasks]


def predict_folder(predictor, input_folder: str | Path, output_folder: str | Path, dataset: str | int | None = None,
                   save_probabilities: bool = False, tasks: Sequence[str] | None = None,
                   overwrite: bool = True, num_parts: int = 1, part_id: int = 0,
                   num_processes_preprocessing: int = 0, num_processes_export: int = 0,
                   progress_bar: bool = True, record: dict | None = None) -> dict[str, dict]:
    """Predict every case of ``input_folder`` (or of part ``part_id`` of ``num_parts``) into ``output_folder``;
    returns per-case info (member used) of the cases predicted by this call.

    Each prediction appears in one rename once complete (:func:`nnharmony.inference.predictor.export_case`), so
    with ``overwrite=False`` (``--continue_prediction``) an interrupted run resumes without accepting a
    half-written file. ``record`` goes into ``predict_args.json`` with the model files used."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"-part_id must be in 0..{num_parts - 1} for -num_parts {num_parts}, got {part_id}")
    check_output_folder(output_folder, {"input": input_folder})
    spec = predictor.spec
    trainer_class = predictor.trainer_class
    member_index = resolve_member(spec, dataset, getattr(trainer_class, "supports_auto_dataset", False),
                                  trainer_class.__name__)
    if member_index is not None:
        cases = list_cases(input_folder, spec.members[member_index].file_ending)
    else:
        cases = list_cases_any_ending(input_folder, sorted({m.file_ending for m in spec.members}))
    task_ids = _task_ids(spec, tasks)
    if member_index is not None:
        n = len(spec.members[member_index].channels)
        bad = {c: len(f) for c, f in cases.items() if len(f) != n}
        if bad:
            c, k = next(iter(bad.items()))
            raise ValueError(f"{input_folder}: case {c} has {k} channel file(s) but dataset "
                             f"{spec.members[member_index].dataset_name} expects {n} ({spec.members[member_index].channels})")
    out = Path(output_folder)
    out.mkdir(parents=True, exist_ok=True)
    out_endings = ({spec.members[member_index].file_ending} if member_index is not None
                   else {m.file_ending for m in spec.members})
    part = select_part(cases, num_parts, part_id)
    todo = [(c, f, member_index) for c, f in part.items()
            if overwrite or not is_predicted(out, c, out_endings, save_probabilities)]
    where = f" (part {part_id} of {num_parts}: {len(part)} of {len(cases)} cases)" if num_parts > 1 else ""
    done = f", {len(part) - len(todo)} already predicted (--continue_prediction)" if not overwrite else ""
    print(f"{len(todo)} case(s) to predict{where}{done}")
    info: dict[str, dict] = {}
    exporter = _Exporter(predictor, worker_count(num_processes_export, len(todo)))
    try:
        bar = tqdm(total=len(todo), desc="predicting", unit="case", disable=not progress_bar)
        for case, files, idx, extra, data, props in _preprocessed(
                predictor, todo, worker_count(num_processes_preprocessing, len(todo))):
            logits = predictor.predict_logits(data, idx)
            exporter.submit(logits, props, idx, str(out / case), save_probabilities, task_ids)
            info[case] = {"dataset": spec.members[idx].dataset_name, "domain": spec.members[idx].domain, **extra}
            bar.update()
        bar.close()
    finally:
        exporter.close()
    if member_index is None:
        previous = load_json(out / "predicted_datasets.json") if (out / "predicted_datasets.json").is_file() else {}
        save_json_atomic({**previous, **info}, out / "predicted_datasets.json")
    save_json_atomic({**(record or {}), "collection": spec.name, "trainer": trainer_class.__name__,
                      "configuration": predictor.configuration,
                      "dataset": dataset if dataset is not None else spec.members[0].dataset_name,
                      "tasks": list(tasks) if tasks else None, "model_files": list(predictor.checkpoint_files),
                      "num_parts": num_parts, "part_id": part_id},
                     out / ("predict_args.json" if num_parts == 1 else f"predict_args_part{part_id}.json"))
    return info
