"""U-Harmony against the universal baseline (nnHarmonyTrainer): step time and peak memory, and Dice per member
at a fixed training budget for U-Harmony (soft gate, dataset-free), its oracle ablation (gate = true domain)
and the baseline, plus the gate's domain accuracy. Prints Markdown tables; not a test.

1. Step time / peak memory: ``benchmarks/step_time.py --trainers nnHarmonyTrainer UHarmonyTrainer`` (nnU-Net's
   own ``train_step`` as reference, one batch reused, each trainer in its own process; on CUDA nnU-Net's
   ``torch.compile`` applies to every trainer alike). Target of the U-Harmony issue: <= 1.15x
   nnHarmonyTrainer's step time.
2. Fixed budget: every trainer trains fold 0 for the same epochs x iterations (``nnharmony_train``); the final
   validation writes ``fold_0/validation/<member>/summary.json``; the table is the mean foreground Dice per
   member and trainer. UHarmonyTrainer predicts with the soft gate (no dataset label), UHarmonyOracleTrainer
   with one_hot(true domain) in training and inference.
3. Gate: on every validation case of every member, the domain chosen by ``--dataset auto``
   (``UHarmonyTrainer.infer_member``) and the raw argmax of the gate under the case's own preprocessing.

    python benchmarks/uharmony_benchmark.py                                # synthetic collection, CPU
    python benchmarks/uharmony_benchmark.py -device cuda --epochs 10 --iterations 25
    python benchmarks/uharmony_benchmark.py -c Collection900_X -device cuda --epochs 50 --iterations 250

4. Ablations (``--ablation``, shared with ``hermes_benchmark.py``: in-process training on a narrower plans
   variant, pseudo Dice on the same validation patches): harmonization only (uniform gate in training and
   inference: one shared head), gated head only (no U-Harmony norms), both with R1 and with R2, both with a
   linear instead of the polynomial affine, both with the oracle head (gate = true domain). The same variants run
   on real data, with every validation case predicted, through ``benchmarks/real_data/ablations.py``.

    python benchmarks/uharmony_benchmark.py --ablation -d Collection900_Synth -c 2d --epochs 6 --iterations 6

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
DEFAULT_TRAINERS = ["nnHarmonyTrainer", "UHarmonyTrainer", "UHarmonyOracleTrainer"]
TARGET = 1.15


def run(cmd: list[str], what: str) -> str:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
        raise SystemExit(f"{what} failed (exit {out.returncode}): {' '.join(cmd)}")
    print(f"[{what}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    return out.stdout


def step_time_table(args) -> tuple[str, dict[str, float]]:
    trainers = ["nnHarmonyTrainer", *[t for t in args.step_trainers if t != "nnHarmonyTrainer"]]
    cmd = [sys.executable, str(HERE / "step_time.py"), "-d", args.collection, "-c", args.configuration,
           "-device", args.device, "--trainers", *trainers, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--loader-batches", str(args.loader_batches)]
    text = run(cmd, "step time")
    ratios = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in trainers and cells[0] != "nnHarmonyTrainer":
            try:
                ratios[cells[0]] = float(cells[3])
            except ValueError:
                pass
    return text.strip(), ratios


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


def gate_accuracy(model_folder: Path, device: str) -> dict[str, tuple[int, int, int]]:
    """member -> (dataset-free hits, raw-argmax hits, cases) on the member's validation cases."""
    import torch

    from nnharmony.data.splits import collection_fold
    from nnharmony.inference.predict_folder import list_cases
    from nnharmony.inference.predictor import CollectionPredictor
    from nnharmony.paths import raw_dir

    predictor = CollectionPredictor.from_model_folder(model_folder, device=torch.device(device))
    spec = predictor.spec
    joint = predictor.joint_plans["nnharmony"]
    folds = collection_fold(spec, 0, predictor.configuration, joint["member_plans_identifier"])
    out = {}
    for i, m in enumerate(spec.members):
        cases = list_cases(raw_dir() / m.dataset_name / "imagesTr", m.file_ending)
        hits = arg = n = 0
        for c in folds[i][1]:
            idx, info = predictor.trainer_class.infer_member(predictor, cases[c])
            hits += info["predicted_domain"] == m.domain
            arg += idx == i and info["gate_argmax_domain"] == m.domain
            n += 1
        out[m.dataset_name] = (hits, arg, n)
    return out


def dice_tables(args) -> str:
    from nnharmony.records.model_folder import model_folder

    results, times, gates = {}, {}, {}
    for trainer in args.trainers:
        cmd = [sys.executable, "-m", "nnharmony.cli.train", args.collection, args.configuration, "0", "-tr", trainer,
               "-device", args.device, "--epochs", str(args.epochs), "--iterations-per-epoch", str(args.iterations),
               "--val-iterations-per-epoch", str(args.val_iterations)]
        if args.trainer_options:
            cmd += ["--trainer-options", args.trainer_options]
        t0 = time.perf_counter()
        run(cmd, f"train {trainer}")
        times[trainer] = time.perf_counter() - t0
        folder = model_folder(args.collection, trainer, "nnHarmonyPlans", args.configuration)
        results[trainer] = member_dice(folder / "fold_0")
        if trainer.startswith("UHarmony"):
            gates[trainer] = gate_accuracy(folder, args.device)
    members = sorted({m for r in results.values() for m in r})
    lines = [f"fixed budget: {args.epochs} epochs x {args.iterations} iterations, fold 0, {args.configuration}, "
             f"device {args.device}; mean foreground Dice of the final validation"
             + (f"; trainer options {args.trainer_options}" if args.trainer_options else ""), "",
             "| member | " + " | ".join(args.trainers) + " |", "|---|" + "---|" * len(args.trainers)]
    for m in members:
        lines.append(f"| {m} | " + " | ".join(f"{results[t].get(m, float('nan')):.4f}" for t in args.trainers) + " |")
    means = [sum(results[t].values()) / max(1, len(results[t])) for t in args.trainers]
    lines.append("| **mean** | " + " | ".join(f"**{v:.4f}**" for v in means) + " |")
    lines.append("| wall time, train + validation (s) | " + " | ".join(f"{times[t]:.0f}" for t in args.trainers) + " |")
    if gates:
        lines += ["", "gate on the validation cases: domain chosen by `--dataset auto` (dataset-free) / raw argmax "
                      "of the gate under the case's own preprocessing", "",
                  "| member | " + " | ".join(gates) + " |", "|---|" + "---|" * len(gates)]
        for m in members:
            cells = []
            for t in gates:
                h, a, n = gates[t].get(m, (0, 0, 0))
                cells.append(f"{h}/{n} / {a}/{n}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: variant -> (trainer, --trainer-options)
UHARMONY_ABLATIONS: dict[str, tuple[str, dict]] = {
    "both, R1 (default)": ("UHarmonyTrainer", {}),
    "both, R2 (per-domain restoration)": ("UHarmonyTrainer", {"uharmony": {"restoration": "domain"}}),
    "harmonization only (uniform gate = one head)": (
        "UHarmonyTrainer", {"uharmony": {"train_gate_mode": "uniform", "inference_gate_mode": "uniform",
                                         "gate_loss_weight": 0.0}}),
    "gated head only (InstanceNorm)": ("UHarmonyTrainer", {"uharmony": {"stages": "none"}}),
    "both, linear affine (poly_order 1)": ("UHarmonyTrainer", {"uharmony": {"poly_order": 1}}),
    "both, oracle head (gate = true domain)": (
        "UHarmonyTrainer", {"uharmony": {"train_gate_mode": "oracle", "inference_gate_mode": "oracle"}}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--collection", default=None,
                   help="planned collection, name (default: a synthetic one in a temporary folder)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-device", "--device", default="cpu")
    p.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS, help="trainers of the Dice part")
    p.add_argument("--step-trainers", nargs="+", default=["UHarmonyTrainer"], help="trainers of the step-time part "
                   "(nnHarmonyTrainer is always timed)")
    p.add_argument("--trainer-options", default=None, help="JSON passed to every trainer of the Dice part")
    p.add_argument("--steps", type=int, default=5, help="timed steps (step-time part)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loader-batches", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3, help="training budget of the Dice part")
    p.add_argument("--iterations", type=int, default=10, help="iterations per epoch of the Dice part")
    p.add_argument("--val-iterations", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=3, default=[32, 32, 32], help="synthetic volume shape")
    p.add_argument("--skip-step-time", action="store_true")
    p.add_argument("--skip-dice", action="store_true")
    sys.path.insert(0, str(HERE))
    from hermes_benchmark import ablation_table, add_ablation_arguments

    add_ablation_arguments(p)
    args = p.parse_args()
    if args.ablation:
        if not args.collection:
            raise SystemExit("--ablation needs -c (a planned collection)")
        print(ablation_table(args, UHARMONY_ABLATIONS))
        return
    if "nnHarmonyTrainer" not in args.trainers:
        args.trainers.insert(0, "nnHarmonyTrainer")
    sys.path.insert(0, str(HERE))
    from step_time import ensure_collection

    args.collection = ensure_collection(args)
    print(f"# U-Harmony benchmark: collection {args.collection}, {args.configuration}, device {args.device}\n")
    if not args.skip_step_time:
        table, ratios = step_time_table(args)
        print("## Step time and peak memory\n")
        print(table)
        for t, r in ratios.items():
            print(f"\n{t} / nnHarmonyTrainer step time: {r:.2f}x (target <= {TARGET}x: "
                  f"{'met' if r <= TARGET else 'NOT met'})")
        print()
    if not args.skip_dice:
        print("## Dice per member at a fixed budget\n")
        print(dice_tables(args))


if __name__ == "__main__":
    main()
