"""Ablations of U-Harmony and Hermes on a real collection (R2 or R3): each variant of
``UHARMONY_ABLATIONS`` (``benchmarks/uharmony_benchmark.py``) or ``HERMES_ABLATIONS``
(``benchmarks/hermes_benchmark.py``) is one ``real_benchmark.py`` run of its method with the variant's
``--trainer-options``: the same fold, budget, CPU settings and seeds as the real-data benchmark, every member's
validation cases predicted and scored, and ``--dataset auto``. Not a test.

    python benchmarks/real_data/ablations.py r2 WORKDIR --method uharmony --seeds 0 1   # every variant, 2 seeds
    python benchmarks/real_data/ablations.py r2 WORKDIR --method hermes --seeds 0 --only "per-slot" "official"
    python benchmarks/real_data/ablations.py r2 WORKDIR --method uharmony --summarize   # the table

WORKDIR holds ``nnUNet_raw`` and ``nnUNet_preprocessed`` (imported and planned by ``real_benchmark.py`` when
missing; they may be links to a real-benchmark WORKDIR) and one folder per variant (``WORKDIR/<slug>/``, its
own ``nnUNet_results`` and ``reports/``, raw and preprocessed linked). A variant's run is a process of its own
(nnU-Net reads its folders at import) and is skipped when its ``benchmark.json`` exists, so two processes may
work on different ``--only`` selections or seeds at once. The row of the default variant is the method's row of
a plain ``real_benchmark.py`` run: link its ``reports/<r2|r3>/seed<N>`` folders into the default variant's
``reports/<r2|r3>/`` to reuse them.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from hermes_benchmark import HERMES_ABLATIONS  # noqa: E402
from real_benchmark import COLLECTIONS, auto_right, member_means, prepare, set_folders  # noqa: E402
from uharmony_benchmark import UHARMONY_ABLATIONS  # noqa: E402

#: benchmark method of each ablation trainer
TRAINER_METHODS = {"UHarmonyTrainer": "uharmony", "HermesTrainer": "hermes", "nnHarmonyTrainer": "joint"}
ABLATIONS = {"uharmony": UHARMONY_ABLATIONS, "hermes": HERMES_ABLATIONS}


def slug(variant: str) -> str:
    """Folder name of a variant: its name in lower case, runs of other characters as one '_'."""
    return re.sub(r"[^a-z0-9]+", "_", variant.lower()).strip("_")


def selected(method: str, only: list[str] | None) -> dict[str, tuple[str, dict]]:
    variants = ABLATIONS[method]
    return {k: v for k, v in variants.items() if not only or any(o in k for o in only)}


def run_variant(collection: str, workdir: Path, variant: str, trainer: str, options: dict, seeds: list[int],
                budget: str) -> None:
    """One ``real_benchmark.py`` process for the variant, in ``workdir/<slug>`` with raw and preprocessed linked."""
    folder = workdir / slug(variant)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        link = folder / name
        if not link.exists():
            link.symlink_to((workdir / name).resolve(), target_is_directory=True)
    method = TRAINER_METHODS[trainer]
    cmd = [sys.executable, str(HERE / "real_benchmark.py"), collection, str(folder), "--seeds", *map(str, seeds),
           "--budget", budget, "--methods", method]
    if options:
        cmd += ["--trainer-options", f"{method}={json.dumps(options)}"]
    print(f"{variant}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def variant_runs(workdir: Path, collection: str, variant: str) -> dict[str, dict]:
    """seed folder name -> benchmark.json of the variant's finished runs."""
    folder = workdir / slug(variant) / "reports" / collection
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("seed*/benchmark.json"))}


def mean_over_members(means: dict[tuple[str, str], float], method: str, members: list[str]) -> float | None:
    """Mean over ``members`` of ``member_means`` values of ``method``; None unless every member has one."""
    values = [means.get((m, method)) for m in members]
    return None if any(v is None for v in values) else statistics.fmean(values)


def summary_table(workdir: Path, collection: str, method: str) -> str:
    """One row per variant with finished runs: mean Dice over members per seed and over seeds, each member's mean
    over seeds, and ``--dataset auto``'s inferred-member accuracy and mean Dice per seed."""
    rows, members, header = [], None, None
    for variant, (trainer, _) in ABLATIONS[method].items():
        runs = variant_runs(workdir, collection, variant)
        if not runs:
            continue
        col = TRAINER_METHODS[trainer]
        first = next(iter(runs.values()))
        if members is None:
            members = [m["name"] for m in first["collection"]["members"]]
            s = first["settings"]
            header = (f"{first['collection']['name']}, fold 0, budget {s['budget']}, plans {s['plans']}: mean Dice "
                      "over each member's labels (validation cases, true member); auto = `--dataset auto`, the "
                      "member inferred from the image: cases right and mean Dice over members")
        means = {name: member_means(b) for name, b in runs.items()}
        per_seed = {name: mean_over_members(means[name], col, members) for name in runs}
        done = [v for v in per_seed.values() if v is not None]
        if not done:
            continue
        member_cells = []
        for m in members:
            vals = [means[name][m, col] for name in runs if (m, col) in means[name]]
            member_cells.append(f"{statistics.fmean(vals):.3f}" if vals else "–")
        autos = []
        for name, b in runs.items():
            if not b.get("auto_member", {}).get(col):
                continue
            right, total = auto_right(b["auto_member"][col])
            dice = mean_over_members(means[name], f"{col} (auto)", members)
            autos.append(f"{name[4:]}: {right}/{total}, {dice:.3f}" if dice is not None
                         else f"{name[4:]}: {right}/{total}")
        seeds = ", ".join(f"{k[4:]}: {v:.3f}" for k, v in per_seed.items() if v is not None)
        rows.append(f"| {variant} | {seeds} | **{statistics.fmean(done):.3f}** | " + " | ".join(member_cells)
                    + f" | {'; '.join(autos) or '–'} |")
    if not rows:
        return f"no finished ablation run of {method} in {workdir}"
    short = [re.sub(r"^Dataset\d+_", "", m) for m in members]
    return "\n".join([header, "", "| variant | per seed | mean | " + " | ".join(short) + " | auto (seed: right, Dice) |",
                      "|---|---|---:|" + "---:|" * len(short) + "---|", *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("collection", choices=sorted(COLLECTIONS), help="r2 (2D, seven members) or r3 (3D, three)")
    p.add_argument("workdir", type=Path, help="folder for nnUNet_raw/_preprocessed and one folder per variant")
    p.add_argument("--method", choices=sorted(ABLATIONS), required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--budget", default="6x100", help="EPOCHSxITERATIONS (default 6x100, the real benchmark's)")
    p.add_argument("--only", nargs="+", default=None, help="variants whose name contains one of these")
    p.add_argument("--summarize", action="store_true", help="only print the table of the finished runs")
    args = p.parse_args(argv)
    workdir = args.workdir.resolve()
    if not args.summarize:
        set_folders(workdir)
        prepare(COLLECTIONS[args.collection])
        for variant, (trainer, options) in selected(args.method, args.only).items():
            run_variant(args.collection, workdir, variant, trainer, options, args.seeds, args.budget)
    print(summary_table(workdir, args.collection, args.method))
    return 0


if __name__ == "__main__":
    sys.exit(main())
