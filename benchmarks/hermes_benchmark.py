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
    cmd = [sys.executable, str(HERE / "step_time.py"), "-c", args.collection, "-cfg", args.configuration,
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
    from nnharmony.inference.predict_folder import model_folder

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--collection", default=None, help="planned collection (default: synthetic, temp folder)")
    p.add_argument("-cfg", "--configuration", default="3d_fullres")
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
    args = p.parse_args()
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
