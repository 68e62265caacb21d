"""Times ``nnharmony_benchmark --quick`` N times, each on fresh folders, and prints a Markdown table: median and
spread (min-max) of the wall time and of each method's mean Dice (the table's **mean** line). Not a test.

    python benchmarks/quick_repeat.py            # 5 runs in a temporary folder
    python benchmarks/quick_repeat.py -n 3 --keep /tmp/quick_runs
    python benchmarks/quick_repeat.py --summarize /tmp/quick_runs     # the table of runs kept there

Each run is a new process (``python -m nnharmony.cli.benchmark --quick --workdir RUN``) with nothing planned or
trained before it, timed from outside (``time.perf_counter`` around the process, so start-up counts). The load
average before and after each run is printed too: on a shared machine it explains slow runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def one_run(folder: Path) -> dict:
    """Run the quick preset in ``folder``; wall time, the methods' mean Dice and the run's own time split."""
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    before = load_average()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nnharmony.cli.benchmark", "--quick", "--workdir", str(folder),
                           "-o", str(folder / "report"), "--no-progress"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "returncode": proc.returncode, "load_before": before, "load_after": load_average()}
    bench_file = folder / "report" / "benchmark.json"
    if proc.returncode != 0 or not bench_file.is_file():
        out["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return out
    bench = json.loads(bench_file.read_text())
    out["dice"] = method_means(bench)
    out["timings"] = {t["method"]: t.get("total_s") for t in bench["timings"]}
    out["shared"] = bench.get("shared_timings", {})
    (folder / "quick_repeat_run.json").write_text(json.dumps(out, indent=1))
    return out


def kept_runs(root: Path) -> list[dict]:
    """Runs kept under ``root`` (``run_*/quick_repeat_run.json``; a run without it: its report's own total)."""
    runs = []
    for folder in sorted(root.glob("run_*")):
        f, bench_file = folder / "quick_repeat_run.json", folder / "report" / "benchmark.json"
        if f.is_file():
            runs.append(json.loads(f.read_text()))
        elif bench_file.is_file():
            bench = json.loads(bench_file.read_text())
            runs.append({"wall_s": bench["total_s"], "dice": method_means(bench), "load_before": "?"})
    return runs


def method_means(bench: dict) -> dict[str, float]:
    """Each method's unweighted mean over its member x label rows (the **mean** line of the table)."""
    by: dict[str, list[float]] = {}
    for r in bench["rows"]:
        if r.get("dice_mean") is not None:
            by.setdefault(r["method"], []).append(float(r["dice_mean"]))
    return {m: statistics.fmean(v) for m, v in by.items()}


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "–"
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--runs", type=int, default=5)
    p.add_argument("--keep", type=Path, default=None, help="keep the runs' folders here (default: a temp folder, removed)")
    p.add_argument("--summarize", type=Path, default=None, metavar="DIR", help="no new run: the table of the runs kept in DIR")
    args = p.parse_args(argv)
    if args.summarize is not None:
        runs = kept_runs(args.summarize)
        print_table(runs, f"--summarize {args.summarize}")
        return 0
    root = args.keep or Path(tempfile.mkdtemp(prefix="nnharmony_quick_repeat_"))
    runs = []
    for i in range(args.runs):
        folder = root / f"run_{i}"
        shutil.rmtree(folder, ignore_errors=True)
        r = one_run(folder)
        runs.append(r)
        dice = ", ".join(f"{m} {d:.3f}" for m, d in r.get("dice", {}).items()) or f"failed: {r.get('error')}"
        print(f"run {i + 1}/{args.runs}: {r['wall_s'] / 60:.2f} min (load {r['load_before']} -> {r['load_after']}); "
              f"{dice}", file=sys.stderr, flush=True)
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    print_table(runs, f"-n {args.runs}")
    return 0 if all("dice" in r for r in runs) else 1


def print_table(runs: list[dict], command: str) -> None:
    ok = [r for r in runs if "dice" in r]
    methods = list(dict.fromkeys(m for r in ok for m in r["dice"]))
    print(f"`python benchmarks/quick_repeat.py {command}`: {len(ok)}/{len(runs)} runs finished; "
          f"median (min-max) over the runs\n")
    print("| | " + " | ".join(["wall time (min)"] + [f"{m} mean Dice" for m in methods]) + " |")
    print("|---|" + "---:|" * (1 + len(methods)))
    cells = [spread([r["wall_s"] / 60 for r in runs], ".2f")]
    cells += [spread([r["dice"][m] for r in ok if m in r["dice"]], ".3f") for m in methods]
    print("| --quick | " + " | ".join(cells) + " |")
    print("\nload average (1, 5, 15 min) before each run: " + "; ".join(r.get("load_before", "?") for r in runs))


if __name__ == "__main__":
    sys.exit(main())
