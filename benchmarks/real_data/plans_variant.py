"""Write a copy of nnU-Net / nnharmony plans with a smaller batch size, as nnU-Net's documentation suggests for
custom plans: same preprocessed data (the data_identifier is kept), new plans identifier ``<plans>_bs<N>``.

The real-data experiments use it to fit a 2-core CPU: the hippocampus plan asks for batch 7 (the memory target does
not bind for such small images, so ``-gpu_memory_target`` cannot lower it), which costs about 7.5 s per iteration;
batch 2 costs about 1.4 s.

Usage: python plans_variant.py BATCH_SIZE CONFIGURATION DatasetXXX_Name|CollectionXXX_Name ...
(``nnUNet_preprocessed`` must be set). A collection's variant points at its members' variants when they exist.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def write_variant(folder: Path, source: str, batch_size: int, configuration: str) -> str:
    plans = json.loads((folder / f"{source}.json").read_text())
    name = f"{source}_bs{batch_size}"
    plans["plans_name"] = name
    plans["configurations"][configuration]["batch_size"] = batch_size
    members = plans.get("nnharmony", {})
    if members:
        member_variant = f"{members['member_plans_identifier']}_bs{batch_size}"
        per_dataset = [Path(os.environ["nnUNet_preprocessed"]) / m["dataset_name"] / f"{member_variant}.json"
                       for m in json.loads((folder / "collection.json").read_text())["members"]]
        if per_dataset and all(p.is_file() for p in per_dataset):
            members["member_plans_identifier"] = member_variant
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps(plans, indent=1))
    tmp.replace(folder / f"{name}.json")
    return name


def main() -> None:
    batch_size, configuration, *names = sys.argv[1:]
    root = Path(os.environ["nnUNet_preprocessed"])
    for n in names:
        source = "nnHarmonyPlans" if n.startswith("Collection") else "nnUNetPlans"
        print(write_variant(root / n, source, int(batch_size), configuration))


if __name__ == "__main__":
    main()
