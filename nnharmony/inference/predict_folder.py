"""Predict a folder of cases in nnU-Net's naming (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ...)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from nnharmony.data.collection import CollectionSpec
from nnharmony.paths import results_dir
from nnharmony.utils.io import save_json_atomic


def model_folder(collection: str, trainer: str, plans: str, configuration: str) -> Path:
    return results_dir() / collection / f"{trainer}__{plans}__{configuration}"


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


def default_configuration(collection: str, trainer: str, plans: str) -> str:
    """The configuration to predict with when ``-cfg`` is not given: the only one trained, else 3d_fullres."""
    prefix = f"{trainer}__{plans}__"
    root = results_dir() / collection
    trained = sorted(p.name[len(prefix):] for p in root.glob(prefix + "*") if p.is_dir()) if root.is_dir() else []
    return trained[0] if len(trained) == 1 else "3d_fullres"


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


def predict_folder(predictor, input_folder: str | Path, output_folder: str | Path, dataset: str | int | None = None,
                   save_probabilities: bool = False, tasks: Sequence[str] | None = None,
                   overwrite: bool = True) -> dict[str, dict]:
    """Predict every case of ``input_folder`` into ``output_folder``; returns per-case info (member used).

    Each prediction appears in one rename once complete (:meth:`CollectionPredictor.export`), so with
    ``overwrite=False`` an interrupted run resumes without accepting a half-written file."""
    check_output_folder(output_folder, {"input": input_folder})
    spec = predictor.spec
    trainer_class = predictor.trainer_class
    member_index = resolve_member(spec, dataset, getattr(trainer_class, "supports_auto_dataset", False),
                                  trainer_class.__name__)
    if member_index is not None:
        cases = list_cases(input_folder, spec.members[member_index].file_ending)
    else:
        cases = list_cases_any_ending(input_folder, sorted({m.file_ending for m in spec.members}))
    task_ids = None
    if tasks:
        unknown = [t for t in tasks if t not in spec.tasks]
        if unknown:
            raise ValueError(f"--tasks: {unknown} are not tasks of collection {spec.name} ({spec.tasks})")
        task_ids = [spec.tasks.index(t) for t in tasks]
    if member_index is not None:
        n = len(spec.members[member_index].channels)
        bad = {c: len(f) for c, f in cases.items() if len(f) != n}
        if bad:
            c, k = next(iter(bad.items()))
            raise ValueError(f"{input_folder}: case {c} has {k} channel file(s) but dataset "
                             f"{spec.members[member_index].dataset_name} expects {n} ({spec.members[member_index].channels})")
    out = Path(output_folder)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, dict] = {}
    out_endings = ({spec.members[member_index].file_ending} if member_index is not None
                   else {m.file_ending for m in spec.members})
    for case, files in tqdm(cases.items(), desc="predicting", unit="case"):
        if not overwrite and any((out / (case + e)).is_file() for e in out_endings):
            continue
        if member_index is None:
            idx, extra = trainer_class.infer_member(predictor, files)
        else:
            idx, extra = member_index, {}
        predictor.predict_case(files, idx, str(out / case), save_probabilities, task_ids)
        info[case] = {"dataset": spec.members[idx].dataset_name, "domain": spec.members[idx].domain, **extra}
    if member_index is None:
        save_json_atomic(info, out / "predicted_datasets.json")
    save_json_atomic({"collection": spec.name, "trainer": trainer_class.__name__,
                      "dataset": dataset if dataset is not None else spec.members[0].dataset_name,
                      "tasks": list(tasks) if tasks else None}, out / "predict_args.json")
    return info
