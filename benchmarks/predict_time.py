"""Prediction time per case: ``nnharmony_predict`` with joint models against ``nnUNetv2_predict`` with a plain
nnU-Net model of the same member, on the same cases and device. Prints a Markdown table; not a test.

Every command is timed end to end as a user runs it (process start, preprocessing, sliding window with
mirroring, export), so the per-case time includes a share of the start-up; use ``--cases`` to dilute it.
``nnUNetv2_predict`` runs twice: with its defaults (3 preprocessing and 3 export worker processes) and with
``-npp 1 -nps 1``; ``nnharmony_predict`` runs with the same defaults as ``nnUNetv2_predict`` (``-npp``/``-nps``).
Models are trained for a token budget: weights do not change what inference costs.

    python benchmarks/predict_time.py                                    # synthetic collection, temp folder, CPU
    python benchmarks/predict_time.py -device cuda --shape 128 128 128 --cases 10
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from step_time import ensure_collection  # noqa: E402

BUDGET_TRAINER = "nnUNetTrainer_Budget"  # benchmarks/real_data/nnUNetTrainer_Budget.py


def run(cmd: list[str], env: dict | None = None) -> float:
    """Wall-clock seconds of one command; its output is shown only when it fails."""
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env or os.environ.copy())
    seconds = time.perf_counter() - start
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds


def input_folder(dataset_folder: Path, num_cases: int, dest: Path) -> int:
    """Links the first ``num_cases`` training cases (all channels) into ``dest``; returns how many."""
    from nnharmony.utils.io import load_json

    ending = load_json(dataset_folder / "dataset.json")["file_ending"]
    images = sorted((dataset_folder / "imagesTr").glob(f"*_0000{ending}"))[:num_cases]
    dest.mkdir(parents=True)
    for first in images:
        case = first.name[: -len(f"_0000{ending}")]
        for f in (dataset_folder / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"):
            (dest / f.name).symlink_to(f)
    return len(images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--collection", default=None,
                   help="planned collection, name (default: a synthetic one in a temporary folder)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-device", "--device", default="cpu")
    p.add_argument("--trainers", nargs="+", default=["nnHarmonyTrainer", "UHarmonyTrainer", "HermesTrainer"])
    p.add_argument("--dataset", type=int, default=None, help="member whose cases are predicted (default: first)")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=[48, 48, 48], help="synthetic volume shape")
    args = p.parse_args()

    from nnharmony.data.collection import CollectionSpec
    from nnharmony.paths import collection_spec_path, raw_dir

    collection = ensure_collection(args)
    spec = CollectionSpec.load(collection_spec_path(collection))
    member = next(m for m in spec.members if args.dataset in (None, m.dataset_id))
    work = Path(tempfile.mkdtemp(prefix="nnharmony_predict_time_"))
    n = input_folder(raw_dir() / member.dataset_name, args.cases, work / "input")
    dev = ["-device", args.device]

    print(f"[{time.strftime('%T')}] training token models", file=sys.stderr)
    env = dict(os.environ, BUDGET_EPOCHS="1", BUDGET_ITERATIONS="2", BUDGET_VAL_ITERATIONS="1",
               nnUNet_extTrainer=str(HERE / "real_data"))
    run(["nnUNetv2_train", str(member.dataset_id), args.configuration, "0", "-tr", BUDGET_TRAINER] + dev, env)
    for trainer in args.trainers:
        run(["nnharmony_train", collection, args.configuration, "0", "-tr", trainer, "--epochs", "1",
             "--iterations-per-epoch", "2", "--val-iterations-per-epoch", "1"] + dev)

    commands = {
        "nnUNetv2_predict (defaults)": (["nnUNetv2_predict", "-d", str(member.dataset_id)], env),
        "nnUNetv2_predict -npp 1 -nps 1": (["nnUNetv2_predict", "-d", str(member.dataset_id), "-npp", "1",
                                            "-nps", "1"], env),
    }
    for cmd, _ in commands.values():
        cmd += ["-c", args.configuration, "-f", "0", "-tr", BUDGET_TRAINER] + dev
    for trainer in args.trainers:
        commands[f"nnharmony_predict -tr {trainer}"] = (
            ["nnharmony_predict", "-d", collection, "-c", args.configuration, "-f", "0", "-tr", trainer,
             "--member", str(member.dataset_id)] + dev, None)

    rows = []
    for i, (name, (cmd, cmd_env)) in enumerate(commands.items()):
        print(f"[{time.strftime('%T')}] {name}", file=sys.stderr)
        rows.append((name, run(cmd + ["-i", str(work / "input"), "-o", str(work / f"out{i}")], cmd_env)))

    reference = rows[1][1]
    print(f"\n{member.dataset_name}, {n} cases, {args.configuration}, device {args.device}\n")
    print("| command | wall s | s per case | vs nnUNetv2_predict -npp 1 -nps 1 |\n|---|---:|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / n:.2f} | {seconds / reference:.2f}x |")


if __name__ == "__main__":
    main()
