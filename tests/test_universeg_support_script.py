"""``benchmarks/universeg_support_size.py``: an extra evaluation dataset's tasks and fold 0, and the summary over
several unseen datasets (no training here)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def script():
    path = REPO / "benchmarks" / "universeg_support_size.py"
    spec = importlib.util.spec_from_file_location("universeg_support_size", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("universeg_support_size", module)
    spec.loader.exec_module(module)
    return module


def test_extra_dataset_has_every_label_as_a_task_and_nnunet_fold_0(script, tmp_path):
    folder = tmp_path / "Dataset990_Extra"
    (folder / "labelsTr").mkdir(parents=True)
    cases = [f"case_{i:02d}" for i in range(10)]
    for c in cases:
        (folder / "labelsTr" / f"{c}.nii.gz").write_bytes(b"")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": 10, "file_ending": ".nii.gz"}))
    target = script.extra_target(folder)
    assert target.tasks == [("Anterior", (1,)), ("Posterior", (2,))]
    assert sorted(target.train_ids + target.val_ids) == cases
    assert len(target.val_ids) == 2 and not set(target.train_ids) & set(target.val_ids)
    assert target.member_id is None


def test_summary_averages_the_ratio_over_datasets_with_a_supervised_reference(script):
    class Args:
        support_sizes = [1, 16]

    def result(name, dice_1, dice_16, supervised):
        return {"member": name, "universeg": {(1, 1): (dice_1, {}), (16, 1): (dice_16, {})},
                "supervised": None if supervised is None else (supervised, {})}

    rows = script.summary_table(Args, [result("A", 0.2, 0.4, 0.8), result("B", 0.3, 0.6, 0.6),
                                       result("C", 0.1, 0.1, None)])
    last = rows[-1]
    assert last.startswith("| **mean over held-out members**")
    cells = [c.strip(" *") for c in last.strip("|").split("|")]
    assert cells[-2:] == ["0.38", "0.75"]  # (0.25 + 0.5) / 2 and (0.5 + 1.0) / 2; C has no reference
    assert any(r.startswith("| C |") and "–" in r for r in rows)
    assert math.isnan(script.ratio(0.5, None))
