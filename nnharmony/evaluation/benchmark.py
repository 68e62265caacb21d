"""``nnharmony_benchmark``: train the paradigms on the same folds with the same budget, evaluate, report.

What it does, in order:

1. **Collection.** An existing planned collection (``collection``), one planned here from member ids
   (``dataset_ids``), or the built-in synthetic collection (generated and planned if missing). The
   configurations the selected methods need (``3d_fullres``; ``2d`` for UniverSeg) are planned if missing.
2. **Training, one subprocess per method** (``python -m nnharmony.evaluation.benchmark --worker JOB``, which
   calls ``nnharmony_train``'s ``main`` with the arguments shown in the report), so each method's wall time
   and peak memory are its own. Every method trains on fold ``fold`` of the collection (the union of each
   member's nnU-Net fold, see :mod:`nnharmony.data.splits`) with the same budget:

   * ``EPOCHSxITERATIONS`` (e.g. ``5x50``): that many epochs of that many training iterations (validation
     iterations per epoch: a fifth, at least 1, as nnU-Net's 250/50);
   * ``Nmin`` (e.g. ``10min``) or ``NminxITERATIONS``: wall clock per method (trainer option
     ``wall_clock_budget_minutes``: training stops after the epoch in which the time ran out).

   The per-dataset paradigm (``nnunet``) trains one plain nnU-Net per member: with ``EPOCHSxITERATIONS``
   every member's model gets that schedule (as in the literature, where each dataset gets its own full
   nnU-Net run: this method therefore costs about N times more compute, and the timing table shows it);
   with minutes, the budget is split evenly among the members' models so that the method's total time
   matches the others'.

   Models are written under ``REPORT/models`` (the children's ``$nnUNet_results``), never over models the
   user trained in ``$nnUNet_results``.
3. **Prediction.** nnU-Net-style trainers already predict every validation case in their final validation
   (member's own plans and label values). ``universeg`` (in-context) is trained once on the whole collection
   -- holding each member out in turn would cost one training per member -- and then segments each member's
   validation cases label by label from a support set of ``support_size`` (image, label) pairs drawn from that
   member's *training* cases of the fold, averaging ``ensemble`` random support sets. It therefore measures
   in-context segmentation of tasks seen in training, not generalization to unseen tasks.
4. **Evaluation** with :func:`nnharmony.evaluation.evaluate.evaluate_folder` against the member's nnU-Net
   ``gt_segmentations`` (original geometry): Dice and NSD (``nsd_tolerance_mm``) per case, aggregated into one
   row per member x label x method with the mean and the sample standard deviation over the validation cases.
5. **Report** (:mod:`nnharmony.evaluation.report`): ``results.md``, ``results.csv``, ``timing.csv``,
   ``dice_bar.png``, ``overlays/<member>_<case>.png``, ``benchmark.json`` (everything, including per-case
   values and the commands), ``logs/<method>.log``. All files are written atomically.

A method whose trainer cannot be imported is reported as ``skipped`` with the reason, a method whose run
fails as ``failed`` with the log's last line; neither gets numbers.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from nnharmony.utils.io import load_json, save_json_atomic


# ---------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    name: str
    trainer: str
    configuration: str
    paradigm: str  # "per-dataset" | "collection" | "in-context"
    description: str


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("nnunet", "nnUNetTrainer", "3d_fullres", "per-dataset",
           "one plain nnU-Net per member, on the member's own plans"),
    Method("joint", "nnHarmonyTrainer", "3d_fullres", "collection",
           "one nnU-Net on the whole collection, one sigmoid per task, partial-label loss"),
    Method("separate_heads", "SeparateHeadsTrainer", "3d_fullres", "collection",
           "shared backbone, one head per member (oracle: the dataset is given at inference)"),
    Method("uharmony", "UHarmonyTrainer", "3d_fullres", "collection",
           "U-Harmony: harmonization normalization with domain-specific restoration"),
    Method("hermes", "HermesTrainer", "3d_fullres", "collection",
           "Hermes: task and modality prior tokens fused with the backbone"),
    Method("universeg", "UniverSegTrainer", "2d", "in-context",
           "UniverSeg: 2D in-context segmentation from a support set of the member's training cases"),
]}
DEFAULT_METHODS = ("nnunet", "joint", "uharmony", "hermes", "universeg")

SYNTHETIC_COLLECTION = "Collection900_Synthetic"
SYNTHETIC_FIRST_ID = 901
#: the quick preset: small synthetic volumes and a tiny budget, so that the whole run (data, planning, five
#: methods, report) takes well under 15 minutes on a 2-core CPU
QUICK = {"num_cases": 8, "shape": (32, 32, 32), "budget": "2x12", "support_size": 4,
         # UniverSeg at the synthetic slices' size (~32 px) with small episode batches instead of 128 px x 8
         "trainer_options": {"universeg": {"image_size": 32, "support_size": 4, "episode_batch_size": 4}}}


# ---------------------------------------------------------------------------------------------- budget
@dataclass(frozen=True)
class Budget:
    """``epochs`` x ``iterations`` per epoch, or ``minutes`` of wall clock (then ``epochs`` is None)."""

    epochs: int | None = None
    iterations: int | None = None
    minutes: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Budget":
        t = str(text).strip().lower().replace(" ", "")
        m = re.fullmatch(r"(\d+)x(\d+)", t)
        if m:
            e, i = int(m.group(1)), int(m.group(2))
            if e < 1 or i < 1:
                raise ValueError(f"--budget {text!r}: epochs and iterations must be at least 1")
            return cls(epochs=e, iterations=i)
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(?:min|m)(?:x(\d+))?", t)
        if m:
            minutes = float(m.group(1))
            if minutes <= 0:
                raise ValueError(f"--budget {text!r}: the number of minutes must be positive")
            return cls(minutes=minutes, iterations=int(m.group(2)) if m.group(2) else None)
        raise ValueError(f"--budget {text!r}: expected EPOCHSxITERATIONS (e.g. 5x50), MINUTESmin (e.g. 10min) or "
                         f"MINUTESminxITERATIONS (e.g. 10minx50)")

    @property
    def val_iterations(self) -> int | None:
        return None if self.iterations is None else max(1, self.iterations // 5)

    def __str__(self) -> str:
        if self.minutes is not None:
            m = f"{self.minutes:g} min per method"
            return m + (f", {self.iterations} iterations/epoch" if self.iterations else "")
        return f"{self.epochs} epochs x {self.iterations} iterations"


# ---------------------------------------------------------------------------------------------- options
@dataclass
class BenchmarkOptions:
    methods: Sequence[str] = DEFAULT_METHODS
    budget: str = QUICK["budget"]
    collection: str | None = None
    dataset_ids: Sequence[int | str] | None = None
    fold: int | str = 0
    device: str = "cpu"
    num_gpus: int = 1
    output_folder: str | None = None
    nsd_tolerance_mm: float | None = 1.0
    num_overlays: int = 3
    support_size: int = 8
    ensemble: int = 1
    trainer_options: dict = field(default_factory=dict)  # method -> {attribute: value}
    synthetic_cases: int = QUICK["num_cases"]
    synthetic_shape: tuple = QUICK["shape"]
    num_processes: int = 2
    #: keep the trained models' checkpoints (the in-context method always keeps them: its prediction loads them)
    keep_checkpoints: bool = True
    quiet: bool = False  # no progress bar

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
        if not self.methods:
            raise ValueError("--methods: give at least one method")
        Budget.parse(self.budget)
        if self.num_gpus < 1:
            raise ValueError("--num_gpus must be at least 1")
        if self.fold != "all":
            try:
                self.fold = int(self.fold)
            except (TypeError, ValueError):
                raise ValueError(f"--fold must be an integer or 'all', not {self.fold!r}") from None
        for m in self.trainer_options:
            if m not in METHODS:
                raise ValueError(f"--trainer-options: unknown method {m!r}")


# ---------------------------------------------------------------------------------------------- collection
def _members_planned(spec, configurations: Sequence[str]) -> bool:
    from nnharmony.paths import joint_plans_path

    f = joint_plans_path(spec.name)
    if not f.is_file():
        return False
    joint = load_json(f)
    return all(c in joint.get("configurations", {}) for c in configurations)


def collection_name(opts: BenchmarkOptions) -> str:
    if opts.collection is not None:
        return opts.collection
    if opts.dataset_ids:
        return "Collection_" + "_".join(str(i) for i in opts.dataset_ids)
    return SYNTHETIC_COLLECTION


@contextmanager
def output_to(log_file: Path | None):
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


def ensure_collection(opts: BenchmarkOptions, configurations: Sequence[str], log: Callable[[str], None] = print,
                      log_file: Path | None = None) -> str:
    """Name of a collection planned for ``configurations``; plans (and for the synthetic one generates) it, with
    nnU-Net's output going to ``log_file`` (if given)."""
    from nnharmony.paths import collection_spec_path

    name = collection_name(opts)
    ids = list(opts.dataset_ids or [])
    spec_file = collection_spec_path(name)
    if opts.collection is None and not ids:
        if spec_file.is_file():
            from nnharmony.data.collection import CollectionSpec

            ids = [m.dataset_id for m in CollectionSpec.load(spec_file).members]
        else:
            ids = make_synthetic(opts, log, log_file)
    if spec_file.is_file():
        from nnharmony.data.collection import CollectionSpec

        spec = CollectionSpec.load(spec_file)
        if ids and sorted(int(str(i)[7:10]) if str(i).startswith("Dataset") else int(i) for i in ids) != sorted(
                m.dataset_id for m in spec.members):
            raise ValueError(f"collection {name} exists with members {[m.dataset_id for m in spec.members]}, not {ids}")
        if _members_planned(spec, configurations):
            return name
        ids = [m.dataset_id for m in spec.members]
    elif not ids:
        raise ValueError(f"collection {name} is not planned ({spec_file} is missing): give its member datasets with "
                         f"-d, or plan it with nnharmony_plan_and_preprocess -d ... -n {name}")
    from nnharmony.planners.plan_and_preprocess import plan_and_preprocess_collection

    log(f"planning collection {name} ({', '.join(configurations)}) from datasets {ids}"
        + (f" (nnU-Net's output: {log_file})" if log_file else ""))
    with output_to(log_file):
        plan_and_preprocess_collection(ids, name, list(configurations),
                                       num_processes={c: opts.num_processes for c in configurations})
    return name


def make_synthetic(opts: BenchmarkOptions, log: Callable[[str], None] = print,
                   log_file: Path | None = None) -> list[int]:
    """Generate the built-in synthetic collection's raw datasets (unless they are there); their ids."""
    from nnharmony.paths import raw_dir

    try:
        from nnharmony.dataset_conversion.synthetic import make_synthetic_collection
    except ImportError as e:
        raise ValueError(f"the built-in synthetic collection is not available ({e}); give --collection or -d") from None
    raw = raw_dir()
    raw.mkdir(parents=True, exist_ok=True)
    # an existing member generated with the same parameters is reused; another dataset with the same id is refused
    log(f"synthetic collection in {raw}: {opts.synthetic_cases} cases per member, field of view "
        f"{'x'.join(str(s) for s in opts.synthetic_shape)} mm")
    from nnharmony.data.collection import CollectionError

    try:
        with output_to(log_file):
            folders = make_synthetic_collection(raw, first_id=SYNTHETIC_FIRST_ID, num_cases=opts.synthetic_cases,
                                                shape=tuple(opts.synthetic_shape), seed=0)
    except CollectionError as e:
        raise ValueError(
            f"{e}. The benchmark's synthetic collection needs its own datasets {SYNTHETIC_FIRST_ID}-"
            f"{SYNTHETIC_FIRST_ID + 2} ({opts.synthetic_cases} cases, field of view "
            f"{'x'.join(str(s) for s in opts.synthetic_shape)} mm): give other nnU-Net folders with --workdir DIR, "
            f"or benchmark your collection with --collection NAME") from None
    return [int(Path(f).name[7:10]) for f in folders]


# ---------------------------------------------------------------------------------------------- jobs
def _fold_dir(fold) -> str:
    return f"fold_{fold}"


def train_argv(method: Method, collection: str, opts: BenchmarkOptions, budget: Budget) -> list[str]:
    """``nnharmony_train`` arguments of one method under the budget."""
    argv = [collection, method.configuration, str(opts.fold), "-tr", method.trainer, "-device", opts.device]
    if opts.num_gpus > 1 and method.paradigm != "per-dataset":
        argv += ["-num_gpus", str(opts.num_gpus)]
    if budget.epochs is not None:
        argv += ["--epochs", str(budget.epochs)]
    if budget.iterations is not None:
        argv += ["--iterations-per-epoch", str(budget.iterations),
                 "--val-iterations-per-epoch", str(budget.val_iterations)]
    if not opts.keep_checkpoints and method.paradigm != "in-context":
        argv += ["--disable_checkpointing"]
    tr_opts = dict(opts.trainer_options.get(method.name, {}))
    if budget.minutes is not None and method.paradigm != "per-dataset":
        tr_opts.setdefault("wall_clock_budget_minutes", budget.minutes)
    if tr_opts:
        argv += ["--trainer-options", json.dumps(tr_opts)]
    return argv


def prediction_folders(method: Method, spec, models_dir: Path, report_dir: Path, fold, trainer_used: str | None = None,
                       member_plans: str = "nnUNetPlans") -> dict[str, Path]:
    """member name -> folder of its validation predictions (label maps in the member's values).
    For ``universeg``: the parent folder of one sub-folder per label."""
    if method.paradigm == "per-dataset":
        tr = trainer_used or method.trainer
        return {m.dataset_name: models_dir / m.dataset_name / f"{tr}__{member_plans}__{method.configuration}"
                / _fold_dir(fold) / "validation" for m in spec.members}
    if method.paradigm == "in-context":
        return {m.dataset_name: report_dir / "predictions" / method.name / m.dataset_name for m in spec.members}
    base = models_dir / spec.name / f"{method.trainer}__nnHarmonyPlans__{method.configuration}" / _fold_dir(fold)
    return {m.dataset_name: base / "validation" / m.dataset_name for m in spec.members}


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.symlink(os.path.abspath(src), dst)
    except OSError:
        shutil.copy(src, dst)


def _raw_images(member, case: str) -> list[Path]:
    from nnharmony.paths import raw_dir

    folder = raw_dir() / member.dataset_name / "imagesTr"
    return [folder / f"{case}_{c:04d}{member.file_ending}" for c in range(len(member.channels))]


def _raw_label(member, case: str) -> Path:
    from nnharmony.paths import preprocessed_dir, raw_dir

    gt = preprocessed_dir() / member.dataset_name / "gt_segmentations" / f"{case}{member.file_ending}"
    return gt if gt.is_file() else raw_dir() / member.dataset_name / "labelsTr" / f"{case}{member.file_ending}"


def label_tasks(member) -> list[tuple[str, Any]]:
    """(label name, value or region list) of every labelled structure of a member, in dataset.json order."""
    out = []
    for name, v in member.labels.items():
        if name == "background" or name == "ignore":
            continue
        out.append((name, v))
    return out


def universeg_jobs(method: Method, spec, collection: str, opts: BenchmarkOptions, report_dir: Path,
                   folds: dict) -> list[dict]:
    """Prediction jobs of the in-context method: per member, an input folder of its validation images, a support
    folder of its training cases (nnU-Net raw layout: ``imagesTr/``, ``labelsTr/``, ``dataset.json``) and one
    ``nnharmony_predict`` call per label writing ``predictions/universeg/<member>/<label>/``. UniverSeg takes one
    channel: a multi-channel member is given its first channel (``_0000``)."""
    from nnharmony.paths import raw_dir

    jobs = []
    for i, m in enumerate(spec.members):
        train_ids, val_ids = folds[i]
        base = report_dir / "predictions" / method.name / m.dataset_name
        inp, sup = base / "_input", base / "_support"
        for c in val_ids:
            f = _raw_images(m, c)[0]
            _link_or_copy(f, inp / f.name)
        for c in train_ids:
            f = _raw_images(m, c)[0]
            _link_or_copy(f, sup / "imagesTr" / f.name)
            _link_or_copy(_raw_label(m, c), sup / "labelsTr" / f"{c}{m.file_ending}")
        dj = raw_dir() / m.dataset_name / "dataset.json"
        if dj.is_file():
            d = load_json(dj)
            d["channel_names"] = {"0": m.channels[0]}
            d["numTraining"] = len(train_ids)
            save_json_atomic(d, sup / "dataset.json")
        for name, value in label_tasks(m):
            label = str(value) if isinstance(value, int) else name
            argv = ["-i", str(inp), "-o", str(base / _safe(name)), "-c", collection, "-tr", method.trainer,
                    "-cfg", method.configuration, "-f", str(opts.fold), "--dataset", str(m.dataset_id),
                    "--support", str(sup), "--label", label, "-K", str(opts.ensemble), "-S", str(opts.support_size),
                    "-device", opts.device]
            jobs.append({"member": m.dataset_name, "label": name, "argv": argv})
    return jobs


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ---------------------------------------------------------------------------------------------- worker
_MARK = "[nnharmony_benchmark]"


_RU_MAXRSS_PER_MB = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def own_peak_rss_mb() -> float:
    """Peak resident memory of this process since it started (Linux ``VmHWM``). ``ru_maxrss`` of
    ``RUSAGE_SELF`` is only the fallback (no ``/proc``): after (v)fork + exec it starts from the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _RU_MAXRSS_PER_MB


def _peak_memory() -> dict:
    """Peak RAM: the largest of this process and of its finished children (augmentation workers, export
    pools, DDP ranks); peak GPU memory: PyTorch's maximum allocated memory in this process."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / _RU_MAXRSS_PER_MB
    own = own_peak_rss_mb()
    out = {"peak_rss_mb": max(own, children), "peak_cuda_mb": None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mb"] = max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**20
    return out


def _call_cli(main: Callable, argv: list[str]) -> None:
    """A CLI main that exits on a user error becomes an exception (its message is already on stderr)."""
    try:
        main(argv)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(f"exit status {e.code}") from None


def _budgeted_nnunet_trainer():
    """``nnUNetTrainer`` with the wall-clock stop of nnharmony's trainers (per-dataset paradigm, minutes budget)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerWallClock(nnUNetTrainer):
        # nnU-Net records its __init__ arguments by name: keep its signature
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.wall_clock_budget_minutes: float | None = None

        def run_training(self):
            self.on_train_start()
            start = time.time()
            while self.current_epoch < self.num_epochs:
                self.on_epoch_start()
                self.on_train_epoch_start()
                outs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
                self.on_train_epoch_end(outs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    vals = [self.validation_step(next(self.dataloader_val))
                            for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(vals)
                self.on_epoch_end()
                b = self.wall_clock_budget_minutes
                if b is not None and time.time() - start > 60 * b:
                    self.print_to_log_file(f"wall-clock budget of {b:.2f} min reached after {self.current_epoch} epochs")
                    break
            self.on_train_end()

    return nnUNetTrainerWallClock


def run_worker(job_file: str) -> int:
    """Child process of one method: train (and for in-context methods predict); write the result JSON."""
    job = load_json(job_file)
    result: dict[str, Any] = {"ok": False, "train_s": None, "predict_s": None, "cpu_s": None, "error": None}
    t0 = time.perf_counter()
    try:
        print(f"{_MARK} training: nnharmony_train {' '.join(job['train_argv'])}", flush=True)
        if job.get("per_dataset_minutes"):
            from nnharmony.trainers.run import TrainingOptions, run_per_dataset

            a = job["per_dataset_minutes"]
            opts = TrainingOptions(collection=a["collection"], configuration=a["configuration"], fold=a["fold"],
                                   trainer="nnUNetTrainer", device=a["device"],
                                   iterations_per_epoch=a.get("iterations"),
                                   disable_checkpointing=a.get("disable_checkpointing", False),
                                   val_iterations_per_epoch=a.get("val_iterations"),
                                   trainer_options={"wall_clock_budget_minutes": a["minutes"], **a.get("trainer_options", {})})
            run_per_dataset(opts, _budgeted_nnunet_trainer())
        else:
            from nnharmony.cli import train as train_cli

            _call_cli(train_cli.main, job["train_argv"])
        result["train_s"] = time.perf_counter() - t0
        if job.get("predict"):
            from nnharmony.cli import predict as predict_cli

            t1 = time.perf_counter()
            for p in job["predict"]:
                print(f"{_MARK} predicting {p['member']} / {p['label']}: nnharmony_predict {' '.join(p['argv'])}",
                      flush=True)
                _call_cli(predict_cli.main, p["argv"])
            result["predict_s"] = time.perf_counter() - t1
        result["ok"] = True
    except BaseException as e:  # the parent reports it; no numbers for this method
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        result.update(_peak_memory())
        import resource

        result["cpu_s"] = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                              for a in ("ru_utime", "ru_stime"))
        save_json_atomic(result, job["result_file"])
        sys.stdout.flush()
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------------------------------------- evaluation
def _metric(d: dict, name: str):
    """``d[name]`` (case-insensitive) as a float; None when missing or undefined (nnU-Net's NaN: the label is in
    neither reference nor prediction), so that benchmark.json stays strict JSON."""
    for k, v in d.items():
        if str(k).lower() == name.lower():
            try:
                v = float(v)
            except (TypeError, ValueError):
                return None
            return v if math.isfinite(v) else None
    return None


def _label_metrics(metrics: dict, name: str, value) -> dict | None:
    """The metrics of one label in an nnU-Net-style ``metric_per_case[i]['metrics']`` dict, whose keys may be
    the label value, a region tuple, their string forms, or the label name."""
    cands = [name]
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(vals) == 1:
        cands += [vals[0], str(vals[0]), (vals[0],), str((vals[0],))]
    cands += [tuple(vals), str(tuple(vals)), str(list(vals))]
    for c in cands:
        try:
            if c in metrics:
                return metrics[c]
        except TypeError:
            continue
    return None


def _case_id(entry: dict, file_ending: str) -> str:
    f = entry.get("prediction_file") or entry.get("reference_file") or entry.get("case") or ""
    n = os.path.basename(str(f))
    return n[: -len(file_ending)] if n.endswith(file_ending) else n


def evaluate_prediction_folder(ref_folder: Path, pred_folder: Path, labels: dict, file_ending: str,
                               nsd_tolerance_mm: float | None, output_folder: Path, member_name: str,
                               num_processes: int = 2) -> list[dict]:
    """Per case: ``{"case", "label", "dice", "nsd"}`` for every label of ``labels`` (name -> value/region)."""
    try:
        from nnharmony.evaluation.evaluate import evaluate_folder
    except ImportError:
        evaluate_folder = None
    n_pred = len([f for f in os.listdir(pred_folder) if f.endswith(file_ending)]) if pred_folder.is_dir() else 0
    if n_pred <= 4:
        num_processes = 1  # a few cases: starting a spawn pool costs more than it saves
    if evaluate_folder is not None:
        summary = evaluate_folder(str(ref_folder), str(pred_folder), labels, file_ending=file_ending,
                                  nsd_tolerance_mm=nsd_tolerance_mm, num_processes=num_processes,
                                  output_folder=str(output_folder), member_name=member_name)
    else:  # nnU-Net's own metrics (Dice only) until nnharmony's evaluation module is installed
        summary = _nnunet_evaluate(ref_folder, pred_folder, labels, file_ending, output_folder, num_processes)
    out = []
    for entry in summary.get("metric_per_case", []):
        case = _case_id(entry, file_ending)
        for name, value in labels.items():
            if name in ("background", "ignore"):
                continue
            lm = _label_metrics(entry.get("metrics", {}), name, value)
            if lm is None:
                continue
            out.append({"case": case, "label": name, "dice": _metric(lm, "Dice"), "nsd": _metric(lm, "NSD")})
    return out


def _nnunet_evaluate(ref_folder, pred_folder, labels, file_ending, output_folder, num_processes) -> dict:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    regions = [tuple(v) if isinstance(v, (list, tuple)) else v for k, v in labels.items()
               if k not in ("background", "ignore")]
    output_folder.mkdir(parents=True, exist_ok=True)
    return compute_metrics_on_folder(str(ref_folder), str(pred_folder), str(output_folder / "summary.json"),
                                     SimpleITKIO(), file_ending, regions, None, num_processes, chill=True)


def aggregate(per_case: list[dict]) -> list[dict]:
    """Rows member x label x method with mean and sample std over cases (see ``report.ROW_FIELDS``)."""
    from nnharmony.evaluation.report import summarize

    groups: dict[tuple, list[dict]] = {}
    for r in per_case:
        groups.setdefault((r["member"], r["label"], r["method"]), []).append(r)
    rows = []
    for (member, label, method), rs in groups.items():
        dm, ds, n = summarize(r["dice"] for r in rs)
        nm, ns, _ = summarize(r["nsd"] for r in rs)
        rows.append({"member": member, "label": label, "method": method, "dice_mean": dm, "dice_std": ds,
                     "nsd_mean": nm, "nsd_std": ns, "n": len(rs)})
    return rows


# ---------------------------------------------------------------------------------------------- parent
def _epochs_from_log(text: str) -> list[int]:
    """Epochs run per trained model, from nnU-Net's ``Epoch N`` log lines (a new model restarts at 0)."""
    runs: list[int] = []
    for m in re.finditer(r"Epoch (\d+)\s*$", text, flags=re.M):
        e = int(m.group(1))
        if e == 0 or not runs:
            runs.append(0)
        runs[-1] = e + 1
    return runs


def _trainer_available(method: Method) -> str | None:
    """None if the method can run, else why not."""
    try:
        from nnharmony.utils.find_class import find_trainer_class

        cls = find_trainer_class(method.trainer)
    except Exception as e:  # noqa: BLE001 - any import problem means "skip", with the reason
        return f"trainer {method.trainer} is not available ({str(e).splitlines()[0][:200]})"
    if method.paradigm == "in-context" and not hasattr(cls, "predict_from_support"):
        return f"{method.trainer} has no predict_from_support (in-context prediction)"
    return None


class _Progress:
    """tqdm bar over the benchmark's steps, on a copy of stderr (still visible while fd 2 goes to a log)."""

    def __init__(self, total: int, disable: bool):
        from tqdm import tqdm

        try:
            self.file = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
        except (AttributeError, OSError, ValueError):  # no real stderr (captured): write where it points
            self.file = None
        self.bar = tqdm(total=total, desc="benchmark", unit="step", disable=disable, dynamic_ncols=True,
                        file=self.file or sys.stderr)

    def stage(self, text: str) -> None:
        self.bar.set_description_str(text)

    def postfix(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=True)

    def step(self) -> None:
        self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar.disable:
            print(text, file=self.file or sys.stdout, flush=True)
        else:
            self.bar.write(text, file=self.file or sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


def _run_child(job: dict, job_file: Path, log_file: Path, env: dict, progress: _Progress, method: str) -> dict:
    save_json_atomic(job, job_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nnharmony.evaluation.benchmark", "--worker", str(job_file)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            last = ""
            while proc.poll() is None:
                time.sleep(1.0)
                try:
                    text = log_file.read_text(errors="replace")
                except OSError:
                    continue
                runs = _epochs_from_log(text)
                info = ""
                if _MARK + " predicting" in text:
                    info = text[text.rfind(_MARK + " predicting") + len(_MARK) + 1:].split(":")[0]
                elif runs:
                    info = f"model {len(runs)}, epoch {runs[-1]}" if len(runs) > 1 else f"epoch {runs[-1]}"
                if info != last:
                    progress.postfix(info)
                    last = info
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    res = load_json(job["result_file"]) if Path(job["result_file"]).is_file() else {"ok": False}
    if proc.returncode != 0 and res.get("ok"):
        res["ok"] = False
    if not res.get("ok") and not res.get("error"):
        res["error"] = f"worker exited with status {proc.returncode}"
    return res


def _last_error_line(log_file: Path) -> str:
    try:
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def default_output_folder(collection: str) -> Path:
    from nnharmony.paths import results_dir

    return results_dir() / collection / f"benchmark_{datetime.now().strftime('%Y%m%d_%H%M%S')}"


def run_benchmark(opts: BenchmarkOptions, log: Callable[[str], None] | None = None) -> dict:
    """Run everything; returns the contents of ``benchmark.json`` (``report_folder`` says where it is)."""
    from nnharmony.data.collection import CollectionSpec
    from nnharmony.data.splits import collection_fold
    from nnharmony.paths import collection_spec_path, joint_plans_path, preprocessed_dir

    opts.validate()
    budget = Budget.parse(opts.budget)
    methods = [METHODS[m] for m in dict.fromkeys(opts.methods)]
    t_start = time.perf_counter()
    started = datetime.now().isoformat(timespec="seconds")
    # steps: collection, one run + one evaluation per method, report
    progress = _Progress(2 + 2 * len(methods), disable=opts.quiet)
    say = log or progress.write
    try:
        progress.stage("collection")
        unavailable = {m.name: _trainer_available(m) for m in methods}
        unavailable = {k: v for k, v in unavailable.items() if v is not None}
        configurations = list(dict.fromkeys(m.configuration for m in methods if m.name not in unavailable)) or [
            methods[0].configuration]
        report_dir = Path(opts.output_folder) if opts.output_folder else default_output_folder(collection_name(opts))
        report_dir.mkdir(parents=True, exist_ok=True)
        say(f"report folder: {report_dir}")
        collection = ensure_collection(opts, configurations, say, report_dir / "logs" / "planning.log")
        spec = CollectionSpec.load(collection_spec_path(collection))
        joint = load_json(joint_plans_path(collection))
        member_plans = joint["nnharmony"].get("member_plans_identifier", "nnUNetPlans")
        progress.step()
        models_dir = report_dir / "models"
        models_dir.mkdir(exist_ok=True)
        env = dict(os.environ)
        env["nnUNet_results"] = str(models_dir)
        # nnU-Net's export/evaluation pools (default 8 processes): one per two cores, so small machines do not
        # spend the run starting processes
        env.setdefault("nnUNet_def_n_proc", str(max(1, min(8, (os.cpu_count() or 2) // 2))))
        env["PYTHONUNBUFFERED"] = "1"

        folds = {c: collection_fold(spec, opts.fold, c, member_plans) for c in configurations}
        val_cases = {m.dataset_name: folds[configurations[0]][i][1] for i, m in enumerate(spec.members)}

        per_case: list[dict] = []
        timings: list[dict] = []
        method_info: dict[str, dict] = {}
        for method in methods:
            t = {"method": method.name, "trainer": method.trainer, "configuration": method.configuration,
                 "status": "ok", "epochs": None, "train_s": None, "predict_s": None, "eval_s": None, "cpu_s": None,
                 "peak_rss_mb": None, "peak_cuda_mb": None, "note": ""}
            info: dict[str, Any] = {"paradigm": method.paradigm, "description": method.description}
            timings.append(t)
            method_info[method.name] = info
            progress.stage(f"{method.name}: training")
            progress.postfix("")
            why = unavailable.get(method.name)
            if why is not None:
                t["status"], t["note"] = "skipped", why
                say(f"warning: skipping {method.name}: {why}")
                progress.step()
                progress.step()
                continue
            argv = train_argv(method, collection, opts, budget)
            job: dict[str, Any] = {"method": method.name, "train_argv": argv,
                                   "result_file": str(report_dir / "logs" / f"{method.name}.result.json")}
            trainer_used = method.trainer
            notes = []
            if method.paradigm == "per-dataset":
                notes.append(f"{len(spec.members)} models, one per member, each on its own nnU-Net plans")
                if opts.num_gpus > 1:
                    notes.append("trained on one GPU per model (nnU-Net's per-dataset training)")
                if budget.minutes is not None:
                    per = budget.minutes / len(spec.members)
                    notes.append(f"wall-clock budget split: {per:.2f} min per member model")
                    job["per_dataset_minutes"] = {
                        "collection": collection, "configuration": method.configuration, "fold": opts.fold,
                        "device": opts.device, "minutes": per, "iterations": budget.iterations,
                        "val_iterations": budget.val_iterations, "disable_checkpointing": not opts.keep_checkpoints,
                        "trainer_options": opts.trainer_options.get(method.name, {})}
                    trainer_used = "nnUNetTrainerWallClock"
                    t["trainer"] = f"{trainer_used} (nnUNetTrainer + wall-clock stop)"
                else:
                    notes.append("the budget applies to each member's model")
            if method.paradigm == "in-context":
                job["predict"] = universeg_jobs(method, spec, collection, opts, report_dir, folds[method.configuration])
                notes.append(f"trained once on the whole collection (no member held out); each label of each member "
                             f"segmented from support sets of {opts.support_size} training cases of that member "
                             f"(K={opts.ensemble}), so tasks were seen in training"
                             + ("; multi-channel members: first channel only" if any(
                                 len(m.channels) > 1 for m in spec.members) else ""))
            info["command"] = "nnharmony_train " + " ".join(argv)
            info["predict_commands"] = ["nnharmony_predict " + " ".join(p["argv"]) for p in job.get("predict", [])]
            log_file = report_dir / "logs" / f"{method.name}.log"
            info["log"] = str(log_file.relative_to(report_dir))
            res = _run_child(job, report_dir / "logs" / f"{method.name}.job.json", log_file, env, progress,
                             method.name)
            runs = _epochs_from_log(log_file.read_text(errors="replace")) if log_file.is_file() else []
            t.update(train_s=res.get("train_s"), predict_s=res.get("predict_s"), cpu_s=res.get("cpu_s"),
                     peak_rss_mb=res.get("peak_rss_mb"), peak_cuda_mb=res.get("peak_cuda_mb"))
            t["epochs"] = (runs[0] if len(set(runs)) == 1 and len(runs) == 1 else
                           ("/".join(str(r) for r in runs) if runs else None))
            t["note"] = "; ".join(notes)
            progress.step()
            if not res.get("ok"):
                t["status"] = "failed"
                t["note"] = (t["note"] + "; " if t["note"] else "") + \
                    f"{res.get('error')} -- see {info['log']}: {_last_error_line(log_file)}"
                say(f"warning: {method.name} failed ({res.get('error')}); see {log_file}")
                progress.step()
                continue

            progress.stage(f"{method.name}: evaluating")
            progress.postfix("")
            t1 = time.perf_counter()
            folders = prediction_folders(method, spec, models_dir, report_dir, opts.fold, trainer_used, member_plans)
            info["predictions"] = {k: str(v) for k, v in folders.items()}
            try:
                n_before = len(per_case)
                for m in spec.members:
                    ref = preprocessed_dir() / m.dataset_name / "gt_segmentations"
                    ev_dir = report_dir / "evaluation" / method.name / m.dataset_name
                    if method.paradigm == "in-context":
                        results = []
                        for name, value in label_tasks(m):
                            results += evaluate_prediction_folder(
                                ref, folders[m.dataset_name] / _safe(name), {"background": 0, name: value},
                                m.file_ending, opts.nsd_tolerance_mm, ev_dir / _safe(name), m.dataset_name,
                                opts.num_processes)
                    else:
                        results = evaluate_prediction_folder(ref, folders[m.dataset_name], m.labels, m.file_ending,
                                                             opts.nsd_tolerance_mm, ev_dir, m.dataset_name,
                                                             opts.num_processes)
                    per_case += [{"member": m.dataset_name, "method": method.name, **r} for r in results]
                if len(per_case) == n_before:
                    raise RuntimeError("no prediction was found to evaluate")
            except Exception as e:  # noqa: BLE001 - report the method as failed, keep the others
                t["status"] = "failed"
                t["note"] = (t["note"] + "; " if t["note"] else "") + f"evaluation failed: {type(e).__name__}: {e}"
                say(f"warning: evaluating {method.name} failed: {e}")
                per_case = [r for r in per_case if r["method"] != method.name]
            t["eval_s"] = time.perf_counter() - t1
            progress.step()

        progress.stage("report")
        progress.postfix("")
        rows = sorted(aggregate(per_case), key=lambda r: (
            [m.dataset_name for m in spec.members].index(r["member"]),
            [n for n, _ in label_tasks(spec.member(r["member"]))].index(r["label"])
            if r["label"] in dict(label_tasks(spec.member(r["member"]))) else 99,
            [m.name for m in methods].index(r["method"])))
        bench: dict[str, Any] = {
            "settings": {"collection": collection, "fold": opts.fold, "budget": str(budget),
                         "budget_spec": opts.budget, "methods": [m.name for m in methods], "device": opts.device,
                         "num_gpus": opts.num_gpus, "nsd_tolerance_mm": opts.nsd_tolerance_mm,
                         "support_size": opts.support_size, "ensemble": opts.ensemble,
                         "trainer_options": opts.trainer_options, "cpu_count": os.cpu_count(),
                         "python": sys.version.split()[0], **_versions()},
            "started": started,
            "collection": {"name": collection, "members": [
                {"name": m.dataset_name, "domain": m.domain, "channels": m.channels,
                 "labels": {k: v for k, v in m.labels.items()}, "validation_cases": val_cases[m.dataset_name]}
                for m in spec.members]},
            "methods": method_info,
            "timings": timings,
            "rows": rows,
            "per_case": per_case,
            "figures": {},
            "report_folder": str(report_dir),
        }
        figures = make_figures(bench, spec, report_dir, opts.num_overlays)
        bench["figures"] = figures
        bench["finished"] = datetime.now().isoformat(timespec="seconds")
        bench["total_s"] = time.perf_counter() - t_start
        write_report(bench, report_dir)
        progress.step()
    finally:
        progress.close()
    return bench


def _versions() -> dict:
    out = {}
    for mod in ("torch", "nnunetv2"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:  # noqa: BLE001
            pass
    return out


def write_report(bench: dict, report_dir: Path) -> None:
    from nnharmony.evaluation import report as R

    R.write_results_csv(bench["rows"], report_dir / "results.csv")
    R.write_timing_csv(bench["timings"], report_dir / "timing.csv")
    R.write_text(R.markdown_report(bench), report_dir / "results.md")
    save_json_atomic(bench, report_dir / "benchmark.json")


def make_figures(bench: dict, spec, report_dir: Path, num_overlays: int) -> dict:
    """``dice_bar.png`` and up to ``num_overlays`` overlays (spread over the members); relative paths."""
    from nnharmony.evaluation import report as R

    methods = [t["method"] for t in bench["timings"] if t["status"] == "ok"]
    figs: dict[str, Any] = {"bars": None, "overlays": []}
    s = bench["settings"]
    if R.plot_metric_bars(bench["rows"], report_dir / "dice_bar.png", "dice", methods,
                          title=f"Dice on {s['collection']}, fold {s['fold']}, budget {s['budget']}"):
        figs["bars"] = "dice_bar.png"
    if not methods or num_overlays <= 0:
        return figs
    # round-robin over members: first validation case of each member, then the second, ...
    picks = []
    members = bench["collection"]["members"]
    depth = 0
    while len(picks) < num_overlays and any(depth < len(m["validation_cases"]) for m in members):
        for m in members:
            if depth < len(m["validation_cases"]) and len(picks) < num_overlays:
                picks.append((m["name"], m["validation_cases"][depth]))
        depth += 1
    for member_name, case in picks:
        try:
            f = overlay_case(bench, spec.member(member_name), case, methods, report_dir, list(spec.tasks))
        except Exception as e:  # noqa: BLE001 - a figure must not sink the report
            print(f"warning: overlay of {member_name}/{case} failed: {e}", file=sys.stderr)
            continue
        figs["overlays"].append(f)
    return figs


def _read(path: Path):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), tuple(reversed(img.GetSpacing()))


def overlay_case(bench: dict, member, case: str, methods: Sequence[str], report_dir: Path,
                 spec_tasks: Sequence[str] = ()) -> str:
    from nnharmony.evaluation import report as R

    import numpy as np

    image, spacing = _read(_raw_images(member, case)[0])
    reference, _ = _read(_raw_label(member, case))
    tasks = label_tasks(member)
    # drawn values: plain labels as they are; a region is drawn with the value nnU-Net paints for it
    order = list(member.regions_class_order or [])
    draw = {}
    for i, (name, v) in enumerate(tasks):
        draw[name] = int(order[i]) if isinstance(v, (list, tuple)) and i < len(order) else (
            int(v[0]) if isinstance(v, (list, tuple)) else int(v))
    preds: dict[str, Any] = {}
    scores: dict[str, float | None] = {}
    for method in methods:
        folder = Path(bench["methods"][method].get("predictions", {}).get(member.dataset_name, ""))
        arr = None
        if bench["methods"][method]["paradigm"] == "in-context":
            for name, _ in tasks:
                f = folder / _safe(name) / f"{case}{member.file_ending}"
                if f.is_file():
                    a, _ = _read(f)
                    arr = np.zeros_like(reference) if arr is None else arr
                    arr[a > 0] = draw[name]
        else:
            f = folder / f"{case}{member.file_ending}"
            if f.is_file():
                arr, _ = _read(f)
        preds[method] = arr
        d = [r["dice"] for r in bench["per_case"] if r["method"] == method and r["member"] == member.dataset_name
             and r["case"] == case and r["dice"] is not None and math.isfinite(r["dice"])]
        scores[method] = float(np.mean(d)) if d else None
    if image.ndim == 2:
        image, reference = image[None], reference[None]
        preds = {k: (v[None] if v is not None else None) for k, v in preds.items()}
    rel = f"overlays/{_safe(member.dataset_name)}_{_safe(case)}.png"
    # one colour per global task, the same in every member's figure
    colors = {}
    for t in member.tasks:
        if t.task in spec_tasks:
            colors[t.label] = spec_tasks.index(t.task)
    R.plot_overlay(image, reference, preds, report_dir / rel, labels=draw,
                   title=f"{member.dataset_name} / {case} ({member.channels[0]})", spacing=spacing, scores=scores,
                   color_index=colors)
    return rel


def printed_summary(bench: dict) -> str:
    """What the command prints at the end: the Dice table, timing and where the report is."""
    from nnharmony.evaluation import report as R

    methods = [t["method"] for t in bench["timings"]]
    status = {t["method"]: t["status"] for t in bench["timings"] if t["status"] != "ok"}
    s = bench["settings"]
    lines = [f"\nDice on {s['collection']}, fold {s['fold']}, budget {s['budget']}, device {s['device']} "
             f"(mean ± std over validation cases):\n", R.results_table(bench["rows"], "dice", methods, status),
             R.timing_table(bench["timings"])]
    skipped = [f"  {t['method']}: {t['status']}: {t['note']}" for t in bench["timings"] if t["status"] != "ok"]
    if skipped:
        lines += ["not run / failed:"] + skipped + [""]
    lines.append(f"total {R.fmt_seconds(bench.get('total_s'))}; report: {bench['report_folder']}/results.md")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(run_worker(sys.argv[2]))
    print("internal worker of nnharmony_benchmark; run nnharmony_benchmark instead", file=sys.stderr)
    sys.exit(2)
