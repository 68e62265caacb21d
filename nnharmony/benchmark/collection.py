"""The collection a benchmark runs on: an existing planned one, one planned here from member ids, or the built-in
synthetic collection (generated and planned if missing)."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from nnharmony.benchmark.options import BenchmarkOptions
from nnharmony.utils.io import load_json, save_json_atomic


def collection_name(opts: BenchmarkOptions) -> str:
    if opts.collection is not None:
        return opts.collection
    if opts.dataset_ids:
        return "Collection_" + "_".join(str(i) for i in opts.dataset_ids)
    return opts.synthetic_collection


@contextmanager
def output_to(log_file: Path | None) -> Iterator[None]:
    """Send everything written to file descriptors 1 and 2 (nnU-Net's prints, its worker processes' output and
    progress bars) to ``log_file`` for the duration; nothing is redirected when it is None."""
    if log_file is None:
        yield
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log_file, "a") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _planned(name: str, configurations: Sequence[str]) -> bool:
    from nnharmony.paths import joint_plans_path

    f = joint_plans_path(name)
    return f.is_file() and all(c in load_json(f).get("configurations", {}) for c in configurations)


def _member_ids(ids) -> list[int]:
    return sorted(int(str(i)[7:10]) if str(i).startswith("Dataset") else int(i) for i in ids)


def ensure_collection(opts: BenchmarkOptions, configurations: Sequence[str], log: Callable[[str], None] = print,
                      log_file: Path | None = None) -> str:
    """Name of a collection planned for ``configurations``; plans (and for the synthetic one generates) it, with
    nnU-Net's output going to ``log_file`` (if given)."""
    from nnharmony.data.collection import CollectionSpec
    from nnharmony.paths import collection_spec_path

    name = collection_name(opts)
    ids = list(opts.dataset_ids or [])
    spec_file = collection_spec_path(name)
    synthetic = opts.collection is None and not ids
    if synthetic:
        ids = make_synthetic(opts, log, log_file)
    if spec_file.is_file():
        spec = CollectionSpec.load(spec_file)
        if ids and _member_ids(ids) != sorted(m.dataset_id for m in spec.members):
            raise ValueError(f"collection {name} exists with members {[m.dataset_id for m in spec.members]}, not {ids}")
        if _planned(name, configurations):
            write_synthetic_splits(spec)
            return name
        ids = [m.dataset_id for m in spec.members]
    elif not ids:
        raise ValueError(f"collection {name} is not planned ({spec_file} is missing): give its member datasets with "
                         f"--members, or plan it with nnharmony_plan_and_preprocess -d ... -n {name}")
    from nnharmony.planners.plan_and_preprocess import plan_and_preprocess_collection

    log(f"planning collection {name} ({', '.join(configurations)}) from datasets {ids}"
        + (f" (nnU-Net's output: {log_file})" if log_file else ""))
    with output_to(log_file):
        spec, _ = plan_and_preprocess_collection(ids, name, list(configurations),
                                                 num_processes={c: opts.num_processes for c in configurations})
    write_synthetic_splits(spec)
    return name


def make_synthetic(opts: BenchmarkOptions, log: Callable[[str], None] = print,
                   log_file: Path | None = None) -> list[int]:
    """Generate the built-in synthetic collection's raw datasets (unless they are there); their ids."""
    from nnharmony.data.collection import CollectionError
    from nnharmony.dataset_conversion import synthetic
    from nnharmony.paths import raw_dir

    raw = raw_dir()
    raw.mkdir(parents=True, exist_ok=True)
    members = synthetic.MEMBER_PRESETS[opts.synthetic_members] if opts.synthetic_members else None
    shape = "x".join(str(s) for s in opts.synthetic_shape)
    if members:
        sizes = ", ".join(f"{m.template.name}: {m.num_training} training + {m.num_validation} validation cases"
                          for m in members)
        what = f"preset '{opts.synthetic_members}' ({sizes})"
    else:
        what = f"{opts.synthetic_cases} cases per member"
    log(f"synthetic collection in {raw}: {what}, field of view {shape} mm")
    first = opts.synthetic_first_id
    try:
        with output_to(log_file):
            folders = synthetic.make_synthetic_collection(raw, first_id=first, num_cases=opts.synthetic_cases,
                                                          shape=tuple(opts.synthetic_shape), seed=0, members=members)
    except CollectionError as e:
        n = len(members) if members else 3
        raise ValueError(
            f"{e}. The benchmark's synthetic collection needs its own datasets {first}-{first + n - 1} ({what}, "
            f"field of view {shape} mm): give other nnU-Net folders with --workdir DIR, or benchmark your collection "
            f"with -d COLLECTION") from None
    return [int(Path(f).name[7:10]) for f in folders]


def write_synthetic_splits(spec) -> None:
    """Every synthetic preset member's own fold-0 split as nnU-Net's ``splits_final.json`` (read by every
    trainer); other members keep theirs."""
    from nnharmony.data.splits import SPLITS_FILE
    from nnharmony.dataset_conversion.synthetic import synthetic_splits
    from nnharmony.paths import preprocessed_dir, raw_dir

    for m in spec.members:
        splits = synthetic_splits(raw_dir() / m.dataset_name)
        target = preprocessed_dir() / m.dataset_name / SPLITS_FILE
        if splits is not None and (not target.is_file() or load_json(target) != splits):
            save_json_atomic(splits, target)
