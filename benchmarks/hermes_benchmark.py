"""Hermes against the universal baseline (nnHarmonyTrainer): step time and peak memory, and Dice per member at
a fixed training budget. Prints Markdown tables; not a test.

1. Step time / peak memory: ``benchmarks/step_time.py --trainers nnHarmonyTrainer HermesTrainer`` (nnU-Net's
   own ``train_step`` as reference, one batch reused, each trainer in its own process). Target of the Hermes
   issue: Hermes <= 1.25x nnHarmonyTrainer's step time.
2. Fixed budget: both trainers train fold 0 for the same epochs x iterations (``nnharmony_train``), then the
   final validation writes ``fold_0/validation/<member>/summary.json``; the table is the mean foreground Dice
   per member and method.

    python benchmarks/hermes_benchmark.py                                  # synthetic collection, CPU
    python benchmarks/hermes_benchmark.py --epochs 4 --iterations 10 --shape 32 32 32
    python benchmarks/hermes_benchmark.py -c Collection900_X -device cuda --epochs 50 --iterations 250

3. Ablations (``--ablation``): each variant of :data:`HERMES_ABLATIONS` trains fold 0 in this process for the
   same epochs x iterations on a narrower plans variant (``--plans-variant``: first-stage features, largest
   batch), and is scored by the pseudo Dice (nnU-Net's validation counts, summed) on the same ``--eval-batches``
   validation patches: no sliding-window validation, which costs minutes per case on a small CPU.

    python benchmarks/hermes_benchmark.py --ablation -d Collection900_Synth -c 2d --epochs 6 --iterations 6

Without ``-c`` the synthetic collection is made and planned in a temporary folder (``$nnUNet_*`` point there).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(cmd: list[str], what: str) -> str:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
        raise SystemExit(f"{what} failed (exit {out.returncode}): {' '.join(cmd)}")
    print(f"[{what}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    return out.stdout


def step_time_table(args) -> tuple[str, float | None]:
    cmd = [sys.executable, str(HERE / "step_time.py"), "-d", args.collection, "-c", args.configuration,
           "-device", args.device, "--trainers", *args.trainers, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--loader-batches", str(args.loader_batches)]
    text = run(cmd, "step time")
    ratio = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] == "HermesTrainer":
            try:
                ratio = float(cells[3])
            except ValueError:
                pass
    return text.strip(), ratio


def member_dice(fold_dir: Path) -> dict[str, float]:
    out = {}
    for summary in sorted((fold_dir / "validation").glob("*/summary.json")):
        s = json.loads(summary.read_text())
        dice = (s.get("foreground_mean") or {}).get("Dice")
        if dice is None:
            vals = [v.get("Dice") for v in s.get("mean", {}).values() if v.get("Dice") is not None]
            dice = sum(vals) / len(vals) if vals else float("nan")
        out[summary.parent.name] = float(dice)
    return out


def dice_table(args) -> str:
    from nnharmony.records.model_folder import model_folder

    results, times = {}, {}
    for trainer in args.trainers:
        cmd = [sys.executable, "-m", "nnharmony.cli.train", args.collection, args.configuration, "0", "-tr", trainer,
               "-device", args.device, "--epochs", str(args.epochs), "--iterations-per-epoch", str(args.iterations),
               "--val-iterations-per-epoch", str(args.val_iterations)]
        t0 = time.perf_counter()
        run(cmd, f"train {trainer}")
        times[trainer] = time.perf_counter() - t0
        results[trainer] = member_dice(model_folder(args.collection, trainer, "nnHarmonyPlans", args.configuration)
                                       / "fold_0")
    members = sorted({m for r in results.values() for m in r})
    lines = [f"fixed budget: {args.epochs} epochs x {args.iterations} iterations, fold 0, {args.configuration}, "
             f"device {args.device}; mean foreground Dice of the final validation", "",
             "| member | " + " | ".join(args.trainers) + " |", "|---|" + "---|" * len(args.trainers)]
    for m in members:
        lines.append(f"| {m} | " + " | ".join(f"{results[t].get(m, float('nan')):.4f}" for t in args.trainers) + " |")
    means = [sum(results[t].values()) / max(1, len(results[t])) for t in args.trainers]
    lines.append("| **mean** | " + " | ".join(f"**{v:.4f}**" for v in means) + " |")
    lines.append("| wall time, train + validation (s) | " + " | ".join(f"{times[t]:.0f}" for t in args.trainers) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- ablations
#: variant -> (trainer, --trainer-options)
HERMES_ABLATIONS: dict[str, tuple[str, dict]] = {
    "Hermes (shared input, nnunet recipe)": ("HermesTrainer", {}),
    "without task priors": ("HermesTrainer", {"hermes": {"task_priors": False}}),
    "without modality priors": ("HermesTrainer", {"hermes": {"modality_priors": False}}),
    "per-slot input": ("HermesTrainer", {"hermes": {"input_mode": "per_slot"}}),
    "official recipe": ("HermesTrainer", {"hermes": {"recipe": "official"}}),
    "universal baseline (nnHarmonyTrainer)": ("nnHarmonyTrainer", {}),
}


def pseudo_dice_run(args, trainer_name: str, options: dict, seed: int) -> dict:
    """Train fold 0 in this process (no checkpoints, no final validation), then sum nnU-Net's validation counts
    over ``args.eval_batches`` validation batches (the same patches for every variant: the validation loader
    is seeded and drawn equally often). Returns per-task Dice, their mean and the training seconds."""
    import numpy as np
    import torch

    from nnharmony.trainers.run import TrainingOptions, apply_options, build_trainer

    torch.manual_seed(seed)
    np.random.seed(seed)
    opts = TrainingOptions(args.collection, args.configuration, 0, trainer_name, plans=args.plans,
                           device=args.device, epochs=args.epochs, iterations_per_epoch=args.iterations,
                           val_iterations_per_epoch=1, disable_checkpointing=True,
                           trainer_options={**options, "sampling_seed": seed})
    trainer = build_trainer(opts, torch.device(args.device))
    apply_options(trainer, opts)
    t0 = time.perf_counter()
    trainer.run_training()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        trainer.on_validation_epoch_start()
        outs = [trainer.validation_step(next(trainer.dataloader_val)) for _ in range(args.eval_batches)]
        trainer.on_validation_epoch_end(outs)
    tp, fp, fn = (np.sum([o[k] for o in outs], 0) for k in ("tp_hard", "fp_hard", "fn_hard"))
    dice = [float(2 * a / (2 * a + b + c)) if (2 * a + b + c) > 0 else float("nan") for a, b, c in zip(tp, fp, fn)]
    return {"dice": dice, "mean": float(np.nanmean(dice)), "seconds": seconds, "tasks": list(trainer.spec.tasks)}


def ablation_table(args, variants: dict[str, tuple[str, dict]]) -> str:
    """Markdown: one row per variant, mean pseudo Dice per seed and over seeds, per-task Dice (seed mean)."""
    import numpy as np

    from nnharmony.benchmark.plans_variant import PlansVariant, write_variant
    from nnharmony.trainers.run import load_collection

    spec, _, _ = load_collection(args.collection, "nnHarmonyPlans")
    args.plans = write_variant(spec, "nnHarmonyPlans", [args.configuration],
                               PlansVariant("abl", args.plans_variant[0], args.plans_variant[1]))
    rows, tasks = [], list(spec.tasks)
    for name, (trainer, options) in variants.items():
        if args.only and not any(o in name for o in args.only):
            continue
        runs = [pseudo_dice_run(args, trainer, options, seed) for seed in args.seeds]
        per_task = np.nanmean([r["dice"] for r in runs], 0)
        rows.append(f"| {name} | " + " | ".join(f"{r['mean']:.3f}" for r in runs)
                    + f" | **{np.mean([r['mean'] for r in runs]):.3f}** | "
                    + " | ".join(f"{v:.3f}" for v in per_task)
                    + f" | {np.mean([r['seconds'] for r in runs]):.0f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    head = (f"{args.collection}, {args.configuration}, fold 0, plans variant {args.plans} (first-stage features "
            f"{args.plans_variant[0]}, batch <= {args.plans_variant[1]}), {args.epochs} epochs x {args.iterations} "
            f"iterations, device {args.device}; pseudo Dice over {args.eval_batches} validation batches\n\n")
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    return (head + f"| variant | {seeds} | mean | " + " | ".join(tasks) + " | train s |\n"
            + "|---|" + "---:|" * (len(args.seeds) + 1 + len(tasks) + 1) + "\n" + "\n".join(rows))


def add_ablation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ablation", action="store_true", help="run the ablation variants instead (see the docstring)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="ablation: seeds (sampling and init)")
    p.add_argument("--eval-batches", type=int, default=8, help="ablation: validation batches scored")
    p.add_argument("--plans-variant", type=int, nargs=2, default=[16, 8], metavar=("FEATURES", "BATCH"),
                   help="ablation: first-stage features and largest batch of the plans variant")
    p.add_argument("--only", nargs="+", default=None, help="ablation: variants whose name contains one of these")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--collection", default=None,
                   help="planned collection, name (default: a synthetic one in a temporary folder)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-device", "--device", default="cpu")
    p.add_argument("--trainers", nargs="+", default=["nnHarmonyTrainer", "HermesTrainer"])
    p.add_argument("--steps", type=int, default=5, help="timed steps (step-time part)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loader-batches", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3, help="training budget of the Dice part")
    p.add_argument("--iterations", type=int, default=10, help="iterations per epoch of the Dice part")
    p.add_argument("--val-iterations", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=3, default=[32, 32, 32], help="synthetic volume shape")
    p.add_argument("--skip-step-time", action="store_true")
    p.add_argument("--skip-dice", action="store_true")
    add_ablation_arguments(p)
    args = p.parse_args()
    if args.ablation:
        if not args.collection:
            raise SystemExit("--ablation needs -c (a planned collection)")
        print(ablation_table(args, HERMES_ABLATIONS))
        return
    if "nnHarmonyTrainer" not in args.trainers:
        args.trainers.insert(0, "nnHarmonyTrainer")
    sys.path.insert(0, str(HERE))
    from step_time import ensure_collection

    args.collection = ensure_collection(args)
    print(f"# Hermes benchmark: collection {args.collection}, {args.configuration}, device {args.device}\n")
    if not args.skip_step_time:
        table, ratio = step_time_table(args)
        print("## Step time and peak memory\n")
        print(table)
        if ratio is not None:
            print(f"\nHermesTrainer / nnHarmonyTrainer step time: {ratio:.2f}x (target <= 1.25x: "
                  f"{'met' if ratio <= 1.25 else 'NOT met'})")
        print()
    if not args.skip_dice:
        print("## Dice per member at a fixed budget\n")
        print(dice_table(args))


if __name__ == "__main__":
    main()
