"""Runs the README's walk-through as written, in a fresh folder, and prints the wall time of each numbered step.
Not a test.

    python benchmarks/walkthrough_time.py                   # the walk-through exactly as the README has it
    python benchmarks/walkthrough_time.py --epochs 2        # step 3 shortened; its time per iteration is printed
    python benchmarks/walkthrough_time.py --keep /tmp/wt    # keep the folder (default: a temporary one)

The first ```bash block under "## Walk-through" is split at its ``# N.`` comments; each step runs in ``bash -e``
from the folder, after the lines before step 1 (the exports), so every step sees the same nnU-Net folders. With
``--epochs N`` step 3's ``--epochs`` is replaced by N: the training's time per iteration (from the step's time
minus its final validation, as the training log reports them) then gives the time of the full step. The load
average before and after each step is printed: on a shared machine it explains slow steps.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def walkthrough_block(readme: str) -> str:
    section = readme[readme.index("## Walk-through"):]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    if not match:
        raise ValueError("README: no ```bash block under '## Walk-through'")
    return match.group(1)


def split_steps(block: str) -> tuple[str, list[tuple[str, str]]]:
    """(set-up lines before step 1, [(step title, its lines)]). Steps start at lines ``# N. title``."""
    setup, steps, current = [], [], None
    for line in block.splitlines():
        m = re.match(r"# (\d+)\. (.*)", line)
        if m:
            current = [f"{m.group(1)}. {m.group(2)}", []]
            steps.append(current)
        elif current is None:
            setup.append(line)
        else:
            current[1].append(line)
    return "\n".join(setup), [(title, "\n".join(lines)) for title, lines in steps]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--epochs", type=int, default=None, help="replace step 3's --epochs (default: as written)")
    p.add_argument("--keep", type=Path, default=None, help="run in this (new) folder and keep it")
    args = p.parse_args(argv)
    setup, steps = split_steps(walkthrough_block(README.read_text()))
    folder = args.keep or Path(tempfile.mkdtemp(prefix="walkthrough_"))
    folder.mkdir(parents=True, exist_ok=args.keep is None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_") or k == "nnUNet_n_proc_DA"}
    rows = []
    for title, body in steps:
        if args.epochs is not None and "nnharmony_train " in body:
            body = re.sub(r"--epochs \d+", f"--epochs {args.epochs}", body)
        before = load_average()
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-e", "-c", setup + "\n" + body], cwd=folder, env=env, capture_output=True,
                              text=True)
        wall = time.perf_counter() - t0
        rows.append((title.split("(")[0].strip(), wall, before, load_average()))
        print(f"{title}\n  {wall:.1f} s (load {before} -> {rows[-1][3]})", flush=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
            return proc.returncode
        if "nnharmony_train " in body:
            print("  " + "\n  ".join(line for line in proc.stdout.splitlines()
                                     if re.search(r"epoch time|validation", line, re.I))[-3000:])
    print("\n| step | wall time | load before -> after |\n|---|---:|---|")
    for title, wall, before, after in rows:
        print(f"| {title} | {wall / 60:.1f} min ({wall:.0f} s) | {before} -> {after} |")
    print(f"\nfolder: {folder}" + ("" if args.keep else " (temporary)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
