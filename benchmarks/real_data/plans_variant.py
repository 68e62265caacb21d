"""Write a copy of nnU-Net / nnharmony plans with a smaller batch size, as nnU-Net's documentation suggests for
custom plans: same preprocessed data (the data_identifier is kept), new plans identifier ``<plans>_bs<N>``.

The real-data experiments use it to fit a 2-core CPU: the hippocampus plan asks for batch 7 (the memory target does
not bind for such small images, so ``-gpu_memory_target`` cannot lower it), which costs about 7.5 s per iteration;
batch 2 costs about 1.4 s.

Usage: python plans_variant.py BATCH_SIZE CONFIGURATION DatasetXXX_Name|CollectionXXX_Name ...
(``nnUNet_preprocessed`` must be set). A collection's variant points at its members' variants when they exist.
"""
from __future__ import annotations

import sys
from pathlib import Path

from nnharmony.data.collection import CollectionSpec
from nnharmony.paths import COLLECTION_SPEC_FILE, JOINT_PLANS_NAME, preprocessed_dir
from nnharmony.utils.io import load_json, save_json_atomic


def write_variant(folder: Path, source: str, batch_size: int, configuration: str) -> str:
    plans = load_json(folder / f"{source}.json")
    name = f"{source}_bs{batch_size}"
    plans["plans_name"] = name
    plans["configurations"][configuration]["batch_size"] = batch_size
    joint = plans.get("nnharmony")
    if joint:
        member_variant = f"{joint['member_plans_identifier']}_bs{batch_size}"
        members = CollectionSpec.load(folder / COLLECTION_SPEC_FILE).members
        if all((folder.parent / m.dataset_name / f"{member_variant}.json").is_file() for m in members):
            joint["member_plans_identifier"] = member_variant
    save_json_atomic(plans, folder / f"{name}.json", indent=1)
    return name


def main() -> None:
    batch_size, configuration, *names = sys.argv[1:]
    for n in names:
        source = JOINT_PLANS_NAME if n.startswith("Collection") else "nnUNetPlans"
        print(write_variant(preprocessed_dir() / n, source, int(batch_size), configuration))


if __name__ == "__main__":
    main()
