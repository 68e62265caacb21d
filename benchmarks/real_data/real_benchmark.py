"""The real-data benchmark on R2 (seven 2D PNG datasets, five imaging modalities) or R3 (three 3D MRI datasets):
every paradigm on fold 0 with one budget, per seed, then a table over the seeds. Not a test.

    python benchmarks/real_data/real_benchmark.py r2 WORKDIR                  # import, plan, seeds 0 and 1
    python benchmarks/real_data/real_benchmark.py r2 WORKDIR --seeds 0 --budget 6x100 --equal-iterations
    python benchmarks/real_data/real_benchmark.py r3 WORKDIR --seeds 0 --budget 4x50   # reduced CPU budget
    python benchmarks/real_data/real_benchmark.py r2 WORKDIR --summarize      # the table of the runs in WORKDIR

WORKDIR holds nnUNet_raw/_preprocessed/_results and ``reports/``; the shared datasets are imported
(``import_all.py --only r2|r3``) and planned (``R2_2d.collection.json`` with ``2d``, ``R3_3d.collection.json``
with ``3d_fullres``) when missing. Each seed is one ``run_benchmark`` (the Python API of ``nnharmony_benchmark``)
into ``reports/<r2|r3>/seed<N>/``, skipped when its ``benchmark.json`` exists, and within a run the methods already
scored are reused (``--continue`` of ``nnharmony_benchmark``), so an interrupted series resumes; two
seeds may run at once in two processes (``--seeds 0`` and ``--seeds 1``, one thread each) once planning is done.
Methods: per-dataset nnU-Net, naive joint, separate-heads oracle, U-Harmony, Hermes; U-Harmony and Hermes also
predict with ``--dataset auto``.

Compute: the budget is EPOCHSxITERATIONS for every collection model; the per-dataset models share it (equal total
compute, ``per_dataset_budget="total"``). ``--equal-iterations`` adds one run in which every per-dataset model gets
the whole budget (N times the compute), the comparison at equal iterations per model.

CPU settings, each for the CPU's sake and the same for every method: a plans variant ``cpu`` (first stage 16
features instead of 32; R2: batch at most 8, patch at most 128x128; R3: batch 2, patch at most 64 voxels per
axis; stages below 4 voxels dropped), AdamW at lr 1e-3 (nnU-Net's own ``nnUNetTrainerAdam1en3`` for the
per-dataset models: SGD with momentum 0.99 needs more iterations than a CPU budget gives), validation without
test-time mirroring, one PyTorch thread per process (``--threads``).

R3 here is ``R3_3d_labelled.collection.json``: R3's three manually labelled members (CHAOS T2-SPIR, cardiac bSSFP,
all 200 hippocampus cases). The single TotalSegmentator MR case can only be a training-only member (no validation
case, see collections.md), while this benchmark scores every paradigm on every member's validation cases and
trains a per-dataset model for each; so it is left out here (``R3_3d.collection.json`` keeps it for training).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class RealCollection:
    """One real collection of the benchmark: its spec, configuration, dataset ids and CPU plans variant."""

    name: str
    spec: str
    configuration: str
    import_group: str
    dataset_ids: tuple[int, ...]
    max_batch_size: int
    max_patch_size: int

    def plans_variant(self):
        from nnharmony.benchmark.plans_variant import PlansVariant

        return PlansVariant("cpu", base_features=16, max_batch_size=self.max_batch_size,
                            max_patch_size=self.max_patch_size)


COLLECTIONS = {
    "r2": RealCollection("Collection930_R2", "R2_2d.collection.json", "2d", "r2", (931, 932, 933, 934, 935, 936, 937),
                         max_batch_size=8, max_patch_size=128),
    "r3": RealCollection("Collection919_R3Labelled", "R3_3d_labelled.collection.json", "3d_fullres", "r3",
                         (921, 922, 923), max_batch_size=2, max_patch_size=64),
}
METHODS = ["nnunet", "joint", "separate_heads", "uharmony", "hermes"]
COLLECTION_METHODS = ["joint", "separate_heads", "uharmony", "hermes"]


def set_folders(workdir: Path) -> None:
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (workdir / v).mkdir(parents=True, exist_ok=True)
        os.environ[v] = str(workdir / v)
    os.environ.setdefault("nnUNet_n_proc_DA", "0")  # augmentation in the training process: seeded runs repeat


def prepare(c: RealCollection) -> None:
    """Import and plan the collection unless done (the commands a user types, see collections.md)."""
    raw, pre = Path(os.environ["nnUNet_raw"]), Path(os.environ["nnUNet_preprocessed"])
    if not all(any(raw.glob(f"Dataset{i}_*/dataset.json")) for i in c.dataset_ids):
        subprocess.run([sys.executable, str(HERE / "import_all.py"), "--only", c.import_group], check=True)
    if not (pre / c.name / "nnHarmonyPlans.json").is_file():
        subprocess.run(["nnharmony_plan_and_preprocess", "-n", c.name, "--spec", str(HERE / c.spec),
                        "-c", c.configuration, "-np", "1"], check=True)


def options(args, seed: int, methods: list[str], share: str, output: Path):
    from nnharmony.benchmark import BenchmarkOptions

    c = COLLECTIONS[args.collection]
    return BenchmarkOptions(
        methods=methods, budget=args.budget, collection=c.name, fold=0, device="cpu", output_folder=str(output),
        configuration=c.configuration, plans_variant=c.plans_variant(),
        trainers={"nnunet": "nnUNetTrainerAdam1en3"},
        trainer_options={m: {"optimizer_name": "adamw", **args.extra_options.get(m, {})} for m in COLLECTION_METHODS},
        seed=seed, per_dataset_budget=share, auto_member=True, keep_checkpoints=True, validation_mirroring=False,
        num_processes=1, cpu_threads=args.threads, num_overlays=7, quiet=True, resume=True)


def run(args, name: str, seed: int, methods: list[str], share: str) -> None:
    from nnharmony.benchmark import printed_summary, run_benchmark

    out = args.workdir / "reports" / args.collection / name
    if (out / "benchmark.json").is_file():
        print(f"{name}: done before ({out}/benchmark.json)", flush=True)
        return
    t0 = time.perf_counter()
    print(f"{name}: {', '.join(methods)}, budget {args.budget}, seed {seed}, per-dataset share {share} -> {out}",
          flush=True)
    bench = run_benchmark(options(args, seed, methods, share, out))
    print(printed_summary(bench), flush=True)
    print(f"{name}: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


def member_means(bench: dict) -> dict[tuple[str, str], float]:
    """(member, method) -> mean Dice over the member's labels (each label's mean over the validation cases)."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in bench["rows"] + bench.get("auto_rows", []):
        if r.get("dice_mean") is not None:
            acc.setdefault((r["member"], r["method"]), []).append(float(r["dice_mean"]))
    return {k: statistics.fmean(v) for k, v in acc.items()}


def auto_right(per_member: dict[str, dict]) -> tuple[int, int]:
    """(cases whose member ``--dataset auto`` inferred right, cases) over a method's ``auto_member`` entries."""
    return sum(v["correct"] for v in per_member.values()), sum(v["cases"] for v in per_member.values())


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    m = statistics.fmean(values)
    return f"{m:.3f}" if len(values) == 1 else f"{m:.3f} ({min(values):.3f}-{max(values):.3f})"


def per_seed_means(per_member: dict[str, list[float]], members: list[str]) -> list[float]:
    """The mean over members, once per seed (only seeds in which every member has a value)."""
    n = min(len(per_member[m]) for m in members)
    return [statistics.fmean(per_member[m][i] for m in members) for i in range(n)]


def verdict_lines(per: dict, members: list[str], joint_methods: list[str]) -> list[str]:
    """Each joint method against the per-dataset models at equal total compute, computed from the table: the
    difference of the mean over members per seed, and per member the mean difference over seeds."""
    if "nnunet" not in per:
        return []
    base = per_seed_means(per["nnunet"], members)
    lines = ["Joint methods minus per-dataset nnU-Net at equal total compute (Dice points; per seed for the mean "
             "over members, mean over seeds per member):", ""]
    for method in joint_methods:
        mine = per_seed_means(per[method], members)
        n = min(len(mine), len(base))
        if not n:
            continue
        mean_d = ", ".join(f"{100 * (mine[i] - base[i]):+.1f}" for i in range(n))
        by_member = []
        for m in members:
            k = min(len(per[method][m]), len(per["nnunet"][m]))
            if k:
                by_member.append(f"{m} {100 * statistics.fmean(per[method][m][i] - per['nnunet'][m][i] for i in range(k)):+.1f}")
        lines.append(f"- {method}: mean over members {mean_d}; " + ", ".join(by_member))
    return lines


def unfinished_table(run_dir: Path) -> str:
    """For a run without ``benchmark.json`` (stopped or still running): the mean Dice per member of every method
    scored so far, read from its evaluation summaries (``foreground_mean``)."""
    methods = sorted(p.name for p in (run_dir / "evaluation").glob("*") if p.is_dir())
    if not methods:
        return ""
    members = sorted({m.name for meth in methods for m in (run_dir / "evaluation" / meth).glob("Dataset*")})
    dice = {}
    for meth in methods:
        for m in members:
            f = run_dir / "evaluation" / meth / m / "summary.json"
            if f.is_file():
                dice[meth, m] = json.loads(f.read_text())["foreground_mean"]["Dice"]
    lines = [f"{run_dir.name} (unfinished: methods scored so far, mean Dice over each member's labels)", "",
             "| member | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for m in members:
        lines.append(f"| {m} | " + " | ".join(f"{dice[x, m]:.3f}" if (x, m) in dice else "–" for x in methods) + " |")
    return "\n".join(lines)


def summarize(workdir: Path, collection: str) -> str:
    folder = workdir / "reports" / collection
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/benchmark.json"))}
    unfinished = [unfinished_table(d) for d in sorted(folder.glob("*")) if d.is_dir() and d.name not in runs]
    seeds = {k: v for k, v in runs.items() if k.startswith("seed")}
    if not seeds:
        return "\n\n".join([t for t in unfinished if t] or [f"no finished run in {folder}"])
    equal_it = runs.get("equal_iterations")
    first = next(iter(seeds.values()))
    members = [m["name"] for m in first["collection"]["members"]]
    methods = list(dict.fromkeys(t["method"] for b in seeds.values() for t in b["timings"]))
    autos = list(dict.fromkeys(r["method"] for b in seeds.values() for r in b.get("auto_rows", [])
                               if r["method"].endswith("(auto)")))
    cols = methods + (["nnunet, equal iterations"] if equal_it else []) + autos
    per = {c: {m: [] for m in members} for c in cols}
    for b in seeds.values():
        means = member_means(b)
        for (member, method), v in means.items():
            if method in per:
                per[method][member].append(v)
    if equal_it:
        for (member, method), v in member_means(equal_it).items():
            per["nnunet, equal iterations"][member].append(v)
    s = first["settings"]
    lines = [f"{first['collection']['name']}, fold 0, budget {s['budget']} per collection model (per-dataset models: "
             f"{s.get('per_dataset_budget')}), plans {s['plans']}, seeds {', '.join(k[4:] for k in seeds)}: mean Dice "
             f"over each member's labels; with two or more seeds the mean (min-max) over them", "",
             "| member | train / val | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for i, member in enumerate(members):
        info = first["collection"]["members"][i]
        lines.append(f"| {member} | {info['training_cases']} / {len(info['validation_cases'])} | "
                     + " | ".join(fmt(per[c][member]) for c in cols) + " |")
    overall = {c: per_seed_means(per[c], members) for c in cols}
    lines.append("| **mean over members** | | " + " | ".join(f"**{fmt(overall[c])}**" for c in cols) + " |")
    lines += ["", *verdict_lines(per, members, [c for c in methods if c != "nnunet"])]
    lines += ["", "| run | method | iterations | training | validation | total | CPU time | peak RAM |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, b in runs.items():
        for t in b["timings"]:
            lines.append(f"| {name} | {t['method']} | {t['iterations']} | {t['train_s'] or 0:.0f} s | "
                         f"{t['validation_s'] or 0:.0f} s | {t['total_s'] or 0:.0f} s | {t['cpu_s'] or 0:.0f} s | "
                         f"{(t['peak_rss_mb'] or 0) / 1024:.2f} GB |")
        lines.append(f"| {name} | **all** | | | | **{b['total_s'] / 60:.1f} min** | | |")
    for name, b in seeds.items():
        for method, members_ in b.get("auto_member", {}).items():
            right, total = auto_right(members_)
            lines.append(f"\n{name}, {method} --dataset auto: inferred member right on {right}/{total} validation "
                         "cases (" + "; ".join(f"{k} {v['correct']}/{v['cases']}" for k, v in members_.items()) + ")")
    return "\n".join(lines + [""] + [t for t in unfinished if t])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("collection", choices=sorted(COLLECTIONS), help="r2 (2D, seven members) or r3 (3D, three)")
    p.add_argument("workdir", type=Path, help="folder for nnUNet_raw/_preprocessed/_results and reports/")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1],
                   help="one run per seed (default 0 1; none: only --equal-iterations, with seed 0)")
    p.add_argument("--budget", default="6x100", help="EPOCHSxITERATIONS per collection model (default 6x100)")
    p.add_argument("--equal-iterations", action="store_true",
                   help="also train the per-dataset models with the whole budget each (seed of the first run)")
    p.add_argument("--threads", type=int, default=1, help="PyTorch threads (default 1)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                   help="only these paradigms (default: all five); e.g. one method re-run after a change, into a "
                        "WORKDIR of its own")
    p.add_argument("--trainer-options", nargs="*", default=[], metavar="METHOD=JSON",
                   help="extra trainer attributes per method, as nnharmony_benchmark's (e.g. "
                        "'uharmony={\"uharmony\": {\"gate_lr_scale\": 1.0}}'), over the CPU settings")
    p.add_argument("--summarize", action="store_true", help="only print the table of the finished runs")
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()
    from nnharmony.cli.common import parse_method_options

    try:
        args.extra_options = parse_method_options(args.trainer_options)
    except ValueError as e:
        p.error(str(e))
    for method in args.extra_options:
        if method not in COLLECTION_METHODS:
            p.error(f"--trainer-options {method}: METHOD must be one of {', '.join(COLLECTION_METHODS)}")
    if not args.summarize:
        set_folders(args.workdir)
        prepare(COLLECTIONS[args.collection])
        for seed in args.seeds:
            run(args, f"seed{seed}", seed, args.methods, "total")
        if args.equal_iterations:
            run(args, "equal_iterations", args.seeds[0] if args.seeds else 0, ["nnunet"], "each")
    print(summarize(args.workdir, args.collection))
    return 0


if __name__ == "__main__":
    sys.exit(main())
