"""``run_benchmark``: the collection, then every method in turn (train, validate or predict, evaluate), then the
report. Everything runs in this process through the Python APIs: one start-up, one planning, data loading in the
training process when ``nnUNet_n_proc_DA=0``; each method's output goes to ``logs/<method>.log``."""
from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from nnharmony.benchmark.auto_member import supports_auto
from nnharmony.benchmark.budget import Budget
from nnharmony.benchmark.collection import collection_name, ensure_collection, output_to
from nnharmony.benchmark.files import label_tasks, prediction_folders
from nnharmony.benchmark.methods import Method, trainer_available
from nnharmony.benchmark.options import BenchmarkOptions
from nnharmony.benchmark.progress import Progress, Step
from nnharmony.benchmark.resume import finished_method, result_file, save_method_result, settings_fingerprint
from nnharmony.records.joint_plan import JointPlan
from nnharmony.records.model_folder import model_folder
from nnharmony.utils.io import load_json, save_json_atomic
from nnharmony.utils.resources import cpu_seconds, own_peak_rss_mb, process_age_s, reset_peak_rss

def _peak_cuda_mb() -> float | None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**20
    return None


def _versions() -> dict:
    from importlib.metadata import version

    out = {}
    for mod in ("torch", "nnunetv2"):
        try:
            out[mod] = version(mod)
        except Exception:  # noqa: BLE001
            pass
    return out


def default_output_folder(collection: str) -> Path:
    from nnharmony.paths import results_dir

    return results_dir() / collection / f"benchmark_{datetime.now().strftime('%Y%m%d_%H%M%S')}"


# ---------------------------------------------------------------------------------------------- one method
def _timing(method: Method, configuration: str) -> dict[str, Any]:
    return {"method": method.name, "trainer": method.trainer, "configuration": configuration, "status": "ok",
            "epochs": None, "iterations": None, "setup_s": None, "train_s": None, "validation_s": None,
            "predict_s": None, "eval_s": None, "total_s": None, "cpu_s": None, "peak_rss_mb": None,
            "peak_cuda_mb": None, "note": ""}


def run_method(method: Method, ctx: dict[str, Any], progress: Progress, say: Callable[[str], None]
               ) -> tuple[dict, dict, list[dict]]:
    """Train, predict and evaluate one method: (timing, info for benchmark.json, per-case scores)."""
    from nnharmony.benchmark import incontext, training
    from nnharmony.benchmark.scoring import evaluate_method

    opts, spec, collection, budget, report_dir = (ctx[k] for k in ("opts", "spec", "collection", "budget",
                                                                   "report_dir"))
    configuration = opts.configuration_of(method)
    t = _timing(method, configuration)
    info: dict[str, Any] = {"paradigm": method.paradigm, "description": method.description}
    why = trainer_available(method)
    if why is not None:
        t["status"], t["note"] = "skipped", why
        say(f"warning: skipping {method.name}: {why}")
        progress.skip_method(method.name)
        return t, info, []
    log_file = report_dir / "logs" / f"{method.name}.log"
    info["log"] = str(log_file.relative_to(report_dir))
    info["command"] = training.command_line(training.training_options(method, collection, opts, budget,
                                                                      ctx["joint_plans"]))
    notes = []
    if method.paradigm == "per-dataset":
        notes.append(f"{len(spec.members)} models, one per member, each on its own nnU-Net plans")
        if budget.minutes is not None:
            notes.append(f"{budget} split evenly among them")
        elif opts.per_dataset_budget == "total":
            notes.append(f"the budget split among them: {budget.epochs} epochs x "
                         f"{max(1, round(budget.iterations / len(spec.members)))} iterations each (equal total compute)")
        else:
            notes.append("the whole budget for each member's model (equal iterations per model, "
                         f"{len(spec.members)}x the compute)")
    if method.paradigm == "in-context":
        notes.append(incontext.describe(opts, spec))
    t["note"] = "; ".join(notes)
    reset_peak_rss()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    per_case: list[dict] = []
    try:
        progress.start(method.name, "training")
        with output_to(log_file):
            run = training.train_method(method, collection, opts, budget, ctx["models_dir"], ctx["joint_plans"],
                                        on_trainer=_progress_hook(progress, method, len(spec.members)),
                                        defer_plot=budget.fitted)
        t.update(setup_s=run.setup_s, train_s=run.train_s, validation_s=run.validation_s or None,
                 epochs=run.epochs, iterations=sum(m["iterations"] for m in run.models))
        if run.trainer_class != method.trainer:
            t["trainer"] = f"{run.trainer_class} ({method.trainer} + wall-clock stop)"
        info["models"] = run.models
        run_trainer_class = run.trainer_class
        folders = prediction_folders(method, spec, ctx["models_dir"], report_dir, opts.fold, configuration,
                                     run.trainer_class, ctx["member_plans"], ctx["joint_plans"])
        info["predictions"] = {k: str(v) for k, v in folders.items()}
        if method.paradigm == "in-context":
            progress.start(method.name, "prediction")
            t1 = time.perf_counter()
            with output_to(log_file):
                for i, m in enumerate(spec.members):
                    train_ids, val_ids = ctx["folds"][i]
                    incontext.predict_member(run.trainer, m, train_ids, val_ids, folders[m.dataset_name],
                                             opts.support_size, opts.ensemble)
            t["predict_s"] = time.perf_counter() - t1
        del run
        gc.collect()
        progress.start(method.name, "evaluation")
        t2 = time.perf_counter()
        with output_to(log_file):
            per_case = evaluate_method(method, spec, folders, report_dir, opts.nsd_tolerance_mm, opts.num_processes)
        t["eval_s"] = time.perf_counter() - t2
        if opts.auto_member and opts.keep_checkpoints and supports_auto(method):
            progress.start(method.name, "dataset auto")
            t3 = time.perf_counter()
            with output_to(log_file):
                info["auto_member"] = _auto_member(method, ctx, configuration, run_trainer_class)
            t["note"] = (t["note"] + "; " if t["note"] else "") + \
                f"--dataset auto: predicted and scored in {time.perf_counter() - t3:.0f} s"
    except Exception as e:  # noqa: BLE001 - report the method as failed, keep the others
        import traceback

        with output_to(log_file):
            traceback.print_exc()
        t["status"] = "failed"
        t["note"] = (t["note"] + "; " if t["note"] else "") + f"{type(e).__name__}: {e} -- see {info['log']}"
        say(f"warning: {method.name} failed ({type(e).__name__}: {e}); see {log_file}")
        progress.skip_method(method.name)
        per_case = []
    finally:
        gc.collect()
        t.update(total_s=time.perf_counter() - t0, cpu_s=cpu_seconds() - cpu0, peak_rss_mb=own_peak_rss_mb(),
                 peak_cuda_mb=_peak_cuda_mb())
    return t, info, per_case


def _auto_member(method: Method, ctx: dict[str, Any], configuration: str, trainer_class: str) -> dict[str, Any]:
    """``--dataset auto`` on every member's validation cases: inferred member per case, and the per-case scores of
    the predictions made with it (``method (auto)``)."""
    from nnharmony.benchmark.auto_member import AUTO_SUFFIX, predict_auto
    from nnharmony.benchmark.scoring import evaluate_method

    opts, spec, report_dir = ctx["opts"], ctx["spec"], ctx["report_dir"]
    model = model_folder(spec.name, trainer_class, ctx["joint_plans"], configuration, ctx["models_dir"])
    folder = report_dir / "predictions_auto" / method.name
    inferred = predict_auto(method, spec, model, opts.fold, [list(ctx["folds"][i][1]) for i in range(len(spec.members))], folder,
                            opts.device, opts.validation_mirroring)
    scored = dataclasses.replace(method, name=method.name + AUTO_SUFFIX)
    folders = {m.dataset_name: folder / m.dataset_name for m in spec.members}
    per_case = evaluate_method(scored, spec, folders, report_dir, opts.nsd_tolerance_mm, opts.num_processes,
                               skip_missing=True)
    return {"members": inferred, "per_case": per_case}


def _progress_hook(progress: Progress, method: Method, members: int) -> Callable[[Any], None]:
    """Shows the running trainer's epoch (and which member's model), or that its final validation runs."""
    models = members if method.paradigm == "per-dataset" else 1
    seen = [0]

    def hook(trainer) -> None:
        if trainer is None:
            progress.detail = (progress.detail + ", " if models > 1 else "") + "validating"
            return
        seen[0] += 1
        progress.trainer = trainer
        progress.detail = f"model {seen[0]}/{models}" if models > 1 else ""

    return hook


# ---------------------------------------------------------------------------------------------- the run
def _plan_steps(methods: list[Method], budget: Budget) -> list[Step]:
    train_s = None if budget.minutes is None else 60 * budget.minutes
    steps = [Step("", "data + planning")]
    for m in methods:
        steps.append(Step(m.name, "training", train_s))
        steps.append(Step(m.name, "prediction" if m.paradigm == "in-context" else "validation"))
        steps.append(Step(m.name, "evaluation"))
    return steps + [Step("", "report")]


def _sorted_rows(rows: list[dict], spec, methods: list[Method]) -> list[dict]:
    members = [m.dataset_name for m in spec.members]

    def key(r):
        labels = [n for n, _ in label_tasks(spec.member(r["member"]))]
        return (members.index(r["member"]), labels.index(r["label"]) if r["label"] in labels else 99,
                [m.name for m in methods].index(r["method"]))

    return sorted(rows, key=key)


def _sorted_auto_rows(auto_rows: list[dict], rows: list[dict]) -> list[dict]:
    """The ``--dataset auto`` rows next to the same method's rows with the true member, in the table's order."""
    from nnharmony.benchmark.auto_member import AUTO_SUFFIX

    methods = {r["method"][: -len(AUTO_SUFFIX)] for r in auto_rows}
    return [r for r in rows if r["method"] in methods] + auto_rows


def run_benchmark(opts: BenchmarkOptions, log: Callable[[str], None] | None = None) -> dict:
    """Run everything; returns the contents of ``benchmark.json`` (``report_folder`` says where it is)."""
    t_start = time.perf_counter()
    age_at_start = process_age_s() or 0.0
    import torch  # imported here so that its import counts as start-up, not as the first method's
    import nnunetv2  # noqa: F401

    from nnharmony.benchmark.conclusion import conclusion_lines
    from nnharmony.benchmark.figures import make_figures
    from nnharmony.benchmark.scoring import aggregate
    from nnharmony.data.collection import CollectionSpec
    from nnharmony.data.splits import collection_fold
    from nnharmony.benchmark.plans_variant import write_variant
    from nnharmony.paths import JOINT_PLANS_NAME, collection_spec_path, joint_plans_path

    opts.validate()
    if opts.cpu_threads and opts.device == "cpu":
        torch.set_num_threads(opts.cpu_threads)
    budget = Budget.parse(opts.budget)
    methods = [opts.method(m) for m in dict.fromkeys(opts.methods)]
    started = datetime.now().isoformat(timespec="seconds")
    startup_s = age_at_start + (time.perf_counter() - t_start)
    progress = Progress(_plan_steps(methods, budget), disable=opts.quiet)
    say = log or progress.write
    try:
        progress.start("", "data + planning")
        t0 = time.perf_counter()
        configurations = list(dict.fromkeys(opts.configuration_of(m) for m in methods))
        report_dir = Path(opts.output_folder) if opts.output_folder else default_output_folder(collection_name(opts))
        report_dir.mkdir(parents=True, exist_ok=True)
        say(f"report folder: {report_dir}")
        collection = ensure_collection(opts, configurations, say, report_dir / "logs" / "planning.log")
        spec = CollectionSpec.load(collection_spec_path(collection))
        joint_plans = JOINT_PLANS_NAME
        if opts.plans_variant is not None:
            joint_plans = write_variant(spec, JOINT_PLANS_NAME, configurations, opts.plans_variant)
        joint = load_json(joint_plans_path(collection, joint_plans))
        member_plans = JointPlan(joint).member_plans_identifier
        folds = collection_fold(spec, opts.fold, configurations[0], member_plans)
        planning_s = time.perf_counter() - t0
        models_dir = report_dir / "models"
        models_dir.mkdir(exist_ok=True)
        # nnU-Net's export/evaluation pools (default 8 processes): one per two cores, so small machines do not
        # spend the run starting processes
        os.environ.setdefault("nnUNet_def_n_proc", str(max(1, min(8, (os.cpu_count() or 2) // 2))))
        ctx = {"opts": opts, "spec": spec, "collection": collection, "budget": budget, "report_dir": report_dir,
               "models_dir": models_dir, "member_plans": member_plans, "joint_plans": joint_plans, "folds": folds}
        per_case: list[dict] = []
        timings, method_info = [], {}
        fingerprint = settings_fingerprint(opts)
        for method in methods:
            done = finished_method(report_dir, method.name, fingerprint) if opts.resume else None
            if done is not None:
                say(f"{method.name}: scored before with the same settings, reused ({result_file(report_dir, method.name)})")
                progress.skip_method(method.name)
                t, info, pc = done
            else:
                t, info, pc = run_method(method, ctx, progress, say)
                if t["status"] == "ok":
                    save_method_result(report_dir, method.name, fingerprint, t, info, pc)
            timings.append(t)
            method_info[method.name] = info
            per_case += pc
        progress.start("", "report")
        t_report = time.perf_counter()
        members = [{"name": m.dataset_name, "domain": m.domain, "channels": m.channels, "labels": dict(m.labels),
                    "training_cases": len(folds[i][0]), "validation_cases": list(folds[i][1])}
                   for i, m in enumerate(spec.members)]
        ok = [t["method"] for t in timings if t["status"] == "ok"]
        bench: dict[str, Any] = {
            "settings": {"collection": collection, "fold": opts.fold, "budget": str(budget),
                         "budget_spec": opts.budget, "methods": [m.name for m in methods], "device": opts.device,
                         "configuration": opts.configuration, "plans": joint_plans, "num_gpus": opts.num_gpus,
                         "nsd_tolerance_mm": opts.nsd_tolerance_mm, "support_size": opts.support_size,
                         "ensemble": opts.ensemble, "trainer_options": opts.trainer_options,
                         "seed": opts.seed, "per_dataset_budget": opts.per_dataset_budget,
                         "cpu_count": os.cpu_count(), "python": sys.version.split()[0], **_versions()},
            "started": started,
            "collection": {"name": collection, "members": members},
            "methods": method_info,
            "timings": timings,
            "shared_timings": {"startup_s": startup_s, "planning_s": planning_s},
            "rows": _sorted_rows(aggregate(per_case), spec, methods),
            "per_case": per_case,
            "conclusion": conclusion_lines(per_case, members, ok, {m.name: m.paradigm for m in methods}),
            "figures": {},
            "report_folder": str(report_dir),
        }
        auto = {name: info.pop("auto_member") for name, info in method_info.items() if "auto_member" in info}
        if auto:
            bench["auto_member"] = {name: a["members"] for name, a in auto.items()}
            bench["auto_rows"] = _sorted_auto_rows(aggregate([r for a in auto.values() for r in a["per_case"]]),
                                                   bench["rows"])
            bench["auto_per_case"] = [r for a in auto.values() for r in a["per_case"]]
        bench["figures"] = make_figures(bench, spec, report_dir, opts.num_overlays)
        bench["shared_timings"]["report_s"] = time.perf_counter() - t_report
        bench["finished"] = datetime.now().isoformat(timespec="seconds")
        bench["total_s"] = age_at_start + (time.perf_counter() - t_start)
        write_report(bench, report_dir)
    finally:
        progress.close()
    return bench


def write_report(bench: dict, report_dir: Path) -> None:
    from nnharmony.evaluation import report as R

    R.write_results_csv(bench["rows"], report_dir / "results.csv")
    R.write_timing_csv(bench["timings"], report_dir / "timing.csv")
    R.write_text(R.markdown_report(bench), report_dir / "results.md")
    save_json_atomic(bench, report_dir / "benchmark.json")


def printed_summary(bench: dict) -> str:
    """What the command prints at the end: the Dice table, the conclusion, the time split and where the report and
    its figures are."""
    from nnharmony.evaluation import report as R

    methods = [t["method"] for t in bench["timings"]]
    status = {t["method"]: t["status"] for t in bench["timings"] if t["status"] != "ok"}
    s = bench["settings"]
    lines = [f"\nDice on {s['collection']}, fold {s['fold']}, budget {s['budget']}, device {s['device']} "
             f"(mean ± std over validation cases):\n", R.results_table(bench["rows"], "dice", methods, status)]
    if bench.get("conclusion"):
        lines += ["What the numbers say (computed from them):", *bench["conclusion"], ""]
    if bench.get("auto_member"):
        lines += ["Dataset-free prediction (--dataset auto):", *R.auto_member_lines(bench), ""]
    lines.append(R.timing_table(bench["timings"], bench.get("shared_timings")))
    skipped = [f"  {t['method']}: {t['status']}: {t['note']}" for t in bench["timings"] if t["status"] != "ok"]
    if skipped:
        lines += ["not run / failed:"] + skipped + [""]
    folder = bench["report_folder"]
    figs = bench.get("figures", {})
    lines.append(f"total {R.fmt_seconds(bench.get('total_s'))}; report: {folder}/results.md")
    listed = [f for f in [figs.get("bars"), figs.get("curves"), *figs.get("overlays", [])] if f]
    if listed:
        lines.append("figures: " + ", ".join(f"{folder}/{f}" for f in listed))
    lines.append(f"logs: {folder}/logs/")
    return "\n".join(lines)
