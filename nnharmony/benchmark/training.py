"""Training one method in this process through the trainers' Python API, timed step by step.

Every method runs on the collection's fold with the same :class:`~nnharmony.benchmark.budget.Budget`; its models
go under ``REPORT/models`` (``$nnUNet_results`` while it trains), never over models the user trained. The
per-dataset paradigm trains one plain nnU-Net per member on the member's own plans (with a minutes budget, the
minutes are split evenly among the members' models so that the method's total time matches the others').
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from nnharmony.benchmark.budget import Budget, EpochsInMinutes
from nnharmony.benchmark.methods import Method
from nnharmony.benchmark.options import BenchmarkOptions
from nnharmony.records.joint_plan import JointPlan

CURVE_KEYS = {"train_loss": "train_losses", "val_loss": "val_losses", "pseudo_dice": "mean_fg_dice"}


@dataclass
class MethodRun:
    """What training a method produced. ``models``: one entry per trained model (the per-dataset paradigm has one
    per member) with its epochs, iterations and curves; ``trainer``: the last trainer (the in-context method
    predicts with its network)."""

    setup_s: float = 0.0
    train_s: float = 0.0
    validation_s: float = 0.0
    models: list[dict[str, Any]] = field(default_factory=list)
    trainer: Any = None
    trainer_class: str = ""

    @property
    def epochs(self) -> str:
        e = sorted({m["epochs"] for m in self.models})
        return "/".join(str(x) for x in e)


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration (nnU-Net reads ``nnUNet_results`` when a trainer is built)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def training_options(method: Method, collection: str, opts: BenchmarkOptions, budget: Budget,
                     plans: str = "nnHarmonyPlans"):
    """``TrainingOptions`` of one method under the budget (what ``nnharmony_train`` would be given)."""
    from nnharmony.trainers.run import TrainingOptions

    tr_opts = dict(opts.trainer_options.get(method.name, {}))
    if opts.seed is not None and method.paradigm != "per-dataset":  # nnharmony's member/episode sampler
        tr_opts.setdefault("sampling_seed", int(opts.seed))
    if budget.minutes is not None and not budget.fitted and method.paradigm != "per-dataset":
        tr_opts.setdefault("wall_clock_budget_minutes", budget.minutes)
    return TrainingOptions(
        collection=collection, configuration=opts.configuration_of(method), fold=opts.fold, trainer=method.trainer,
        plans=plans, device=opts.device, num_gpus=opts.num_gpus if method.paradigm != "per-dataset" else 1,
        epochs=budget.epochs, iterations_per_epoch=budget.iterations, val_iterations_per_epoch=budget.val_iterations,
        disable_checkpointing=not opts.keep_checkpoints, trainer_options=tr_opts)


def per_dataset_share(t, budget: Budget, num_models: int, share: str):
    """The options of each of the per-dataset paradigm's ``num_models`` models: with ``share`` "total" an
    EPOCHSxITERATIONS budget is split (same epochs, ``iterations / num_models`` per epoch, at least 1), so that the
    models together cost what one collection model costs; "each" gives every model the whole budget."""
    import dataclasses

    if share == "each" or budget.iterations is None or budget.minutes is not None:
        return t
    return dataclasses.replace(t, iterations_per_epoch=max(1, round(budget.iterations / num_models)))


def _seed(opts: BenchmarkOptions) -> None:
    if opts.seed is not None:
        from nnharmony.utils.seeding import seed_everything

        seed_everything(opts.seed)


def command_line(t) -> str:
    """The ``nnharmony_train`` command that trains the same (for the report)."""
    import json

    argv = [t.collection, t.configuration, str(t.fold), "-tr", t.trainer, "-device", t.device]
    if t.plans != "nnHarmonyPlans":
        argv += ["-p", t.plans]
    if t.num_gpus > 1:
        argv += ["-num_gpus", str(t.num_gpus)]
    if t.epochs is not None:
        argv += ["--epochs", str(t.epochs)]
    if t.iterations_per_epoch is not None:
        argv += ["--iterations-per-epoch", str(t.iterations_per_epoch)]
    if t.val_iterations_per_epoch is not None:
        argv += ["--val-iterations-per-epoch", str(t.val_iterations_per_epoch)]
    if t.disable_checkpointing:
        argv += ["--disable_checkpointing"]
    if t.trainer_options:
        argv += ["--trainer-options", f"'{json.dumps(t.trainer_options)}'"]
    return "nnharmony_train " + " ".join(argv)


class _InProcessMultiprocessing:
    """Stands in for the ``multiprocessing`` module of an nnU-Net module: every pool runs in this process."""

    def get_context(self, method: str | None = None) -> "_InProcessMultiprocessing":
        return self

    def Pool(self, *args: Any, **kwargs: Any):  # noqa: N802 (multiprocessing's name)
        from nnharmony.planners.workers import InProcessPool

        return InProcessPool()


@contextmanager
def nnunet_pools_in_process(enabled: bool = True) -> Iterator[None]:
    """nnU-Net's final validation exports and evaluates through spawn pools whose workers first import torch
    (seconds each, per model); with ``enabled`` (``-np 1``) that work runs in this process instead. Should nnU-Net
    stop creating its pools through these modules' ``multiprocessing``, the swap has no effect."""
    if not enabled:
        yield
        return
    from nnunetv2.evaluation import evaluate_predictions
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    modules = [trainer_module, evaluate_predictions]
    originals = [m.multiprocessing for m in modules]
    for m in modules:
        m.multiprocessing = _InProcessMultiprocessing()
    try:
        yield
    finally:
        for m, original in zip(modules, originals):
            m.multiprocessing = original


def _curves(trainer) -> dict[str, list[float]]:
    out = {}
    for name, key in CURVE_KEYS.items():
        try:
            out[name] = [float(v) for v in trainer.logger.get_value(key, step=None)]
        except Exception:  # noqa: BLE001 - a trainer without that log entry has no curve
            out[name] = []
    return out


def _train_one(trainer, t, budget: Budget, seconds: float | None, defer_plot: bool, run: MethodRun, label: str,
               validate: bool, on_trainer: Callable[[Any], None], in_process: bool, mirroring: bool = True) -> None:
    """Options, training and (unless ``validate`` is False) the final validation of one built trainer."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    from nnharmony.trainers.mirroring import apply_to_nnunet_trainer
    from nnharmony.trainers.run import apply_options

    apply_options(trainer, t)
    if not hasattr(trainer, "mirroring"):  # plain nnU-Net (per-dataset models): nnharmony's mirroring policy too
        apply_to_nnunet_trainer(trainer)
    if seconds is not None and hasattr(trainer, "wall_clock_budget_minutes") and not budget.fitted:
        trainer.wall_clock_budget_minutes = seconds / 60
    fitter = EpochsInMinutes(trainer, seconds, clock=budget.clock) if budget.fitted else None
    plot = trainer.logger.plot_progress_png
    if defer_plot:  # nnU-Net redraws progress.png every epoch (seconds on a CPU); draw it once at the end
        trainer.logger.plot_progress_png = lambda folder: None
    maybe_load_checkpoint(trainer, False, False, None)
    on_trainer(trainer)
    start, started = trainer.on_train_start, []

    def on_train_start():  # network, optimizer and data loaders: set-up, not training
        s = time.perf_counter()
        start()
        started.append(time.perf_counter() - s)

    trainer.on_train_start = on_train_start
    t0 = time.perf_counter()
    trainer.run_training()
    t1 = time.perf_counter()
    run.setup_s += sum(started)
    run.train_s += t1 - t0 - sum(started)
    if defer_plot:
        trainer.logger.plot_progress_png = plot
        plot(trainer.output_folder)
    if validate:
        on_trainer(None)  # training is over: the final validation follows
        if not mirroring:  # nnU-Net's predictors mirror along these axes; None: one forward pass per tile
            trainer.inference_allowed_mirroring_axes = None
        with nnunet_pools_in_process(in_process):
            trainer.perform_actual_validation(False)
        run.validation_s += time.perf_counter() - t1
    iterations = sum(fitter.iterations) if fitter else trainer.num_iterations_per_epoch * trainer.current_epoch
    run.models.append({"model": label, "epochs": int(trainer.current_epoch), "iterations": int(iterations),
                       "curves": _curves(trainer)})


def train_method(method: Method, collection: str, opts: BenchmarkOptions, budget: Budget, models_dir: Path,
                 plans: str = "nnHarmonyPlans", on_trainer: Callable[[Any], None] = lambda trainer: None,
                 defer_plot: bool = False) -> MethodRun:
    """Train ``method`` (every member's model for the per-dataset paradigm) and run the final validation of the
    supervised methods (their predictions of the validation cases); ``on_trainer`` sees each trainer before it
    trains and None when its validation starts (progress display)."""
    import torch

    from nnharmony.trainers.run import build_trainer, load_collection, run_training, training_device
    from nnharmony.trainers.wall_clock import wall_clock_nnunet_trainer
    from nnharmony.paths import preprocessed_dir
    from nnharmony.utils.io import load_json

    t = training_options(method, collection, opts, budget, plans)
    run = MethodRun(trainer_class=method.trainer)
    seconds = None if budget.minutes is None else 60 * budget.minutes
    validate = method.paradigm != "in-context"  # in-context prediction is the benchmark's own (see incontext.py)
    with environment(nnUNet_results=str(models_dir)):
        if t.num_gpus > 1:  # DDP: one process per GPU, started by run_training; no split of its time
            t0 = time.perf_counter()
            run_training(t)
            run.train_s = time.perf_counter() - t0
            return run
        t0 = time.perf_counter()
        device = training_device(t)
        if device.type == "cpu" and opts.cpu_threads:
            torch.set_num_threads(opts.cpu_threads)
        if method.paradigm != "per-dataset":
            _seed(opts)
            trainer = build_trainer(t, device)
            run.setup_s = time.perf_counter() - t0
            _train_one(trainer, t, budget, seconds, defer_plot, run, method.name, validate, on_trainer,
                       opts.num_processes <= 1, opts.validation_mirroring)
            run.trainer = trainer
            return run
        spec, joint, _ = load_collection(collection, t.plans)
        ident = JointPlan(joint).member_plans_identifier
        cls = wall_clock_nnunet_trainer() if seconds is not None and not budget.fitted else None
        if cls is None:
            from nnharmony.records.model_folder import find_trainer_class

            cls = find_trainer_class(method.trainer)
        run.trainer_class = cls.__name__
        per_member = None if seconds is None else seconds / len(spec.members)
        t = per_dataset_share(t, budget, len(spec.members), opts.per_dataset_budget)
        for m in spec.members:
            _seed(opts)
            t0 = time.perf_counter()
            member_plans = load_json(preprocessed_dir() / m.dataset_name / f"{ident}.json")
            member_plans["continue_training"] = False
            dj = load_json(preprocessed_dir() / m.dataset_name / "dataset.json")
            trainer = cls(member_plans, t.configuration, t.fold if t.fold == "all" else int(t.fold), dj, device)
            run.setup_s += time.perf_counter() - t0
            _train_one(trainer, t, budget, per_member, defer_plot, run, f"{method.name} {m.dataset_name}", validate,
                       on_trainer, opts.num_processes <= 1, opts.validation_mirroring)
            run.trainer = trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return run
