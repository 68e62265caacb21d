"""nnharmony_benchmark [--quick] [-d COLLECTION] [--members IDS] [-c CONFIGURATION] [--methods ...]
[--budget 5x50|10min] [-device cpu|cuda]

Trains the selected paradigms on the same fold with the same budget, evaluates every member's validation cases
and writes a report folder (Markdown/CSV tables, bar chart, training curves, overlays, benchmark.json). See
``nnharmony.benchmark`` for what exactly is run. Flags as in nnU-Net (``-d`` collection, ``-c`` configuration,
``-f``, ``-device``, ``-np``); the previous release's ``-c``/``--collection`` (collection), ``-cfg``/
``--configuration``, ``-d ID ID ...`` (member datasets), ``--fold``, ``--device``, ``--num_gpus`` and
``--num-processes`` still work this release, with a one-line deprecation warning.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nnharmony.cli.common import (add_deprecated_alias, apply_old_collection_flags, exit_on_user_error, make_parser,
                                  parse_method_options)

ENV_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
QUICK_WORKDIR = "nnharmony_quick"
EXAMPLES = (
    "nnharmony_benchmark --quick",
    "nnharmony_benchmark -d Collection900_Synthetic --methods nnunet joint hermes --budget 100x250 -device cuda",
    "nnharmony_benchmark -d 900 -c 2d --budget 30min --seed 1",
    "nnharmony_benchmark --members 4 17 27 -d Collection004_Abdomen --budget 60min --methods joint uharmony hermes",
)


def build_parser() -> argparse.ArgumentParser:
    from nnharmony.benchmark import DEFAULT_METHODS, METHODS, QUICK
    from nnharmony.dataset_conversion.synthetic import MEMBER_PRESETS

    quick_members = ", ".join(f"{m.template.name} ({m.num_training} training cases)"
                              for m in MEMBER_PRESETS[QUICK.members])

    p = make_parser(
        "nnharmony_benchmark",
        "Compare the paradigms on one collection: every method trains on the same fold with the same "
        "budget, predicts the validation cases and is evaluated per member x label (Dice, NSD). Writes "
        "results.md, results.csv, timing.csv, dice_bar.png, training_curves.png, overlays/, benchmark.json "
        "and logs/ into the report folder and prints the Dice table.",
        EXAMPLES,
        epilog="methods: " + "; ".join(f"{m.name} = {m.trainer} ({m.description})" for m in METHODS.values()),
    )
    p.add_argument("--quick", action="store_true",
                   help=f"the newcomer's preset: built-in synthetic collection {QUICK.collection} ({quick_members}; "
                        f"field of view {'x'.join(map(str, QUICK.shape))} mm), every method on the {QUICK.configuration} "
                        f"configuration with budget {QUICK.budget} (each method trains for that much CPU time of this "
                        f"process, on any machine; planning, validation and prediction come on top), seed "
                        f"{QUICK.seed}, everything in this process. "
                        f"Uses $nnUNet_raw/_preprocessed/_results if set, else ./{QUICK_WORKDIR}/")
    p.add_argument("-d", dest="collection", nargs="+", default=None, metavar="COLLECTION",
                   help="the collection: name (Collection900_Synthetic) or id (900) of a planned collection, or the "
                        "name of a new one planned from --members (default: the built-in synthetic collection, "
                        "generated and planned if missing)")
    p.add_argument("--members", nargs="+", default=None, metavar="ID",
                   help="member dataset ids: plan a collection of them, named by -d NAME (default: named after the "
                        "ids)")
    p.add_argument("-c", dest="cfg", default=None, metavar="CONFIGURATION",
                   help="train every method on this configuration (e.g. 2d) instead of its own (default: 3d_fullres, "
                        "universeg 2d; with --quick 2d)")
    add_deprecated_alias(p, "--collection", "-d COLLECTION", "collection")
    add_deprecated_alias(p, "-cfg", "-c CONFIGURATION", "old_cfg")
    add_deprecated_alias(p, "--configuration", "-c CONFIGURATION", "old_cfg")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help=f"methods to compare, or 'all' (default: {' '.join(DEFAULT_METHODS)})")
    p.add_argument("--budget", default=None,
                   help="the same for every method: EPOCHSxITERATIONS (e.g. 5x50) or wall clock per method "
                        "MINUTESmin (e.g. 10min; MINUTESminxITERATIONS sets iterations per epoch too) or "
                        "EPOCHSxMINUTESmin (e.g. 8x1.5min: that many epochs in that time, the iterations per epoch "
                        "fitted to it) or EPOCHSxMINUTEScpumin (the same in CPU time of this process). "
                        f"Default: nnU-Net's 1000x250, with --quick {QUICK.budget}")
    p.add_argument("-f", dest="fold", default="0", help="fold (0-4, the members' nnU-Net folds) or 'all'")
    add_deprecated_alias(p, "--fold", "-f", "fold")
    p.add_argument("-device", dest="device", default=None, choices=["cpu", "cuda", "mps"],
                   help="device for training and prediction (default: cuda if available, else cpu)")
    add_deprecated_alias(p, "--device", "-device", "device", choices=["cpu", "cuda", "mps"])
    p.add_argument("-num_gpus", dest="num_gpus", type=int, default=1,
                   help="GPUs (DDP processes) per collection model; per-dataset models use one")
    add_deprecated_alias(p, "--num_gpus", "-num_gpus", "num_gpus", type=int)
    p.add_argument("-o", "--output", default=None,
                   help="report folder (default: $nnUNet_results/COLLECTION/benchmark_DATE_TIME)")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="resume an interrupted run into the same -o: methods it scored with the same settings "
                        "(REPORT/methods/METHOD.json) are reused, the others run (default: every method runs)")
    p.add_argument("--workdir", default=None,
                   help="use DIR/nnUNet_raw, DIR/nnUNet_preprocessed, DIR/nnUNet_results instead of the environment "
                        "(default: the environment's; with --quick where unset ./nnharmony_quick/)")
    p.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM",
                   help="tolerance of the normalized surface Dice in mm (default 1); 0 = no NSD")
    p.add_argument("--overlays", type=int, default=3, metavar="N", help="overlay figures to draw (default 3)")
    p.add_argument("-S", "--support-size", type=int, default=None,
                   help=f"universeg: support set size (default 8, with --quick {QUICK.support_size})")
    p.add_argument("-K", "--ensemble", type=int, default=1, help="universeg: support sets averaged (default 1)")
    p.add_argument("--trainer-options", nargs="*", default=[], metavar="METHOD=JSON",
                   help='trainer attributes for one method, e.g. hermes=\'{"optimizer_name": "adamw"}\' (default: '
                        'none; --quick adds its small-CPU settings under them)')
    p.add_argument("--synthetic-cases", type=int, default=None,
                   help="cases per member of a newly generated synthetic collection without --quick (default 8)")
    p.add_argument("-np", dest="num_processes", type=int, default=None,
                   help="processes for preprocessing and evaluation (default 2; with --quick 1: in this process)")
    add_deprecated_alias(p, "--num-processes", "-np", "num_processes", type=int)
    p.add_argument("--seed", type=int, default=None,
                   help="seed every method's run (initialization, augmentation, member sampling); with "
                        "nnUNet_n_proc_DA=0 a CPU run repeats exactly (default: unseeded, as nnU-Net; --quick: "
                        f"{QUICK.seed})")
    p.add_argument("--per-dataset-budget", choices=["total", "each"], default="total",
                   help="the per-dataset models' share of an EPOCHSxITERATIONS budget: 'total' = split among the "
                        "N member models (equal total compute with one collection model), 'each' = every member "
                        "model gets the whole budget (equal iterations per model, N times the compute); a minutes "
                        "budget is always split (default: total)")
    p.add_argument("--dataset-auto", action="store_true",
                   help="also predict every member's validation cases with --dataset auto (uharmony, hermes; needs "
                        "the checkpoints): how often the inferred member is right, and the Dice with it")
    ck = p.add_mutually_exclusive_group()
    ck.add_argument("--keep-checkpoints", dest="checkpoints", action="store_const", const=True, default=None,
                    help="write the models' checkpoints under REPORT/models (default, except with --quick)")
    ck.add_argument("--no-checkpoints", dest="checkpoints", action="store_const", const=False,
                    help="no checkpoints (predictions and reports only; default with --quick, saves disk and time)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="the traceback of an error instead of one line")
    return p


def _setup_folders(args) -> None:
    """--workdir, or for --quick without nnU-Net's variables ./nnharmony_quick/; check they are set."""
    workdir = args.workdir
    missing = [v for v in ENV_VARS if not os.environ.get(v)]
    if workdir is None and args.quick and missing:
        workdir = QUICK_WORKDIR
        print(f"{', '.join('$' + v for v in missing)} not set: using ./{QUICK_WORKDIR}/ "
              f"(nnUNet_raw, nnUNet_preprocessed, nnUNet_results) for data and results", flush=True)
    if workdir is not None:
        root = Path(workdir).resolve()
        for v in ENV_VARS:
            (root / v).mkdir(parents=True, exist_ok=True)
            os.environ[v] = str(root / v)
        return
    if not missing and args.quick:
        print(f"using nnU-Net's folders from the environment (nnUNet_raw={os.environ['nnUNet_raw']})", flush=True)
    if missing:
        raise ValueError(f"{', '.join('$' + v for v in missing)} not set: export nnU-Net's folders, or give "
                         f"--workdir DIR (or --quick, which defaults to ./{QUICK_WORKDIR}/)")


def _trainer_options(args, quick: bool) -> dict:
    from nnharmony.benchmark import QUICK

    out = parse_method_options(args.trainer_options)
    if quick:  # the preset's small-CPU settings, under what the user gave
        for method, defaults in QUICK.trainer_options.items():
            out[method] = {**defaults, **out.get(method, {})}
    return out


def _raw_dataset_exists(dataset_id: str) -> bool:
    from nnharmony.paths import raw_dir

    root = raw_dir()
    return root.is_dir() and any(root.glob(f"Dataset{int(dataset_id):03d}_*"))


def resolve_collection_flags(args: argparse.Namespace) -> None:
    """``-d`` the collection (name or id) and ``-c`` the configuration, as in nnharmony_predict; the previous
    release's spellings keep working with a warning: ``-d ID ID ...`` (member datasets, now ``--members``) and
    ``-c``/``--collection`` (the collection, now ``-d``), ``-cfg``/``--configuration`` (now ``-c``)."""
    from nnharmony.cli import preflight
    from nnharmony.paths import resolve_collection_name

    values = [args.collection] if isinstance(args.collection, str) else args.collection
    if values is not None and args.members is None and (len(values) > 1 or (
            values[0].isdigit() and not _collection_id_exists(values[0]) and _raw_dataset_exists(values[0]))):
        print(f"warning: -d {' '.join(values)} as member datasets is deprecated and will be removed in the next "
              f"release; -d is the collection, as in nnharmony_predict: use --members {' '.join(values)} "
              f"[-d COLLECTION_NAME]", file=sys.stderr)
        args.members, values = values, None
    if values is not None and len(values) > 1:
        raise ValueError(f"-d takes one collection (name or id), got {values}; member datasets go to --members")
    args.collection = values[0] if values else None
    if getattr(args, "old_cfg", None) is not None and args.cfg is None:  # -cfg alone: only the configuration
        args.cfg = args.old_cfg
        del args.old_cfg
    apply_old_collection_flags(args, preflight.planned_collection, required=False)
    if args.collection is None:
        return
    try:
        args.collection = resolve_collection_name(args.collection)
    except FileNotFoundError:
        if args.members:
            raise ValueError(f"-d {args.collection}: give the new collection's name (CollectionXXX_Name) to plan "
                             f"it from --members") from None
        raise


def _collection_id_exists(text: str) -> bool:
    from nnharmony.paths import collection_candidates, preprocessed_dir, results_dir

    roots = [preprocessed_dir()] + ([results_dir()] if os.environ.get("nnUNet_results") else [])
    return bool(collection_candidates(int(text), roots))


def _device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available; use --device cpu")
    return requested


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume and not args.output:
        raise ValueError("--continue resumes the run in the report folder given with -o; without -o every run "
                         "gets a new folder")
    from nnharmony.benchmark import (DEFAULT_METHODS, METHODS, QUICK, BenchmarkOptions, Budget, printed_summary,
                                     run_benchmark)

    methods = list(DEFAULT_METHODS) if not args.methods else (
        list(METHODS) if args.methods == ["all"] else args.methods)
    budget = args.budget or (QUICK.budget if args.quick else "1000x250")
    Budget.parse(budget)  # fail before any work
    trainer_options = _trainer_options(args, args.quick)
    device = _device(args.device)
    _setup_folders(args)
    resolve_collection_flags(args)
    common = dict(
        methods=methods, budget=budget, collection=args.collection,
        dataset_ids=[int(d) if str(d).isdigit() else d for d in args.members] if args.members else None,
        fold=args.fold, device=device, num_gpus=args.num_gpus, output_folder=args.output,
        nsd_tolerance_mm=args.nsd_tolerance if args.nsd_tolerance and args.nsd_tolerance > 0 else None,
        num_overlays=args.overlays, ensemble=args.ensemble, trainer_options=trainer_options,
        quiet=args.no_progress, per_dataset_budget=args.per_dataset_budget, auto_member=args.dataset_auto,
        resume=args.resume)
    if args.seed is not None:
        common["seed"] = args.seed
    for key, value in (("num_processes", args.num_processes), ("configuration", args.cfg)):
        if value is not None:
            common[key] = value
    if args.support_size:
        common["support_size"] = args.support_size
    if args.checkpoints is not None:
        common["keep_checkpoints"] = args.checkpoints
    if args.dataset_auto:
        if args.checkpoints is False:
            raise ValueError("--dataset-auto predicts with the saved checkpoints: drop --no-checkpoints")
        common["keep_checkpoints"] = True
    if args.quick:
        # augmentation in the training process: on a small CPU, worker processes only compete with the network
        os.environ.setdefault("nnUNet_n_proc_DA", "0")
        opts = BenchmarkOptions.from_preset(QUICK, **common)
    else:
        opts = BenchmarkOptions(**common, synthetic_cases=args.synthetic_cases or 8)
    try:
        bench = run_benchmark(opts)
    except KeyboardInterrupt:
        print("\ninterrupted: the training of the running method was stopped; logs are in the report folder",
              file=sys.stderr)
        return 130
    print(printed_summary(bench), flush=True)
    failed = [t["method"] for t in bench["timings"] if t["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
