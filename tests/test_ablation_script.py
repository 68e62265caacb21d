"""``benchmarks/real_data/ablations.py``: every variant's options are valid method options, and the table is
computed from the runs' ``benchmark.json`` files (no training here)."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def ablations():
    path = REPO / "benchmarks" / "real_data" / "ablations.py"
    spec = importlib.util.spec_from_file_location("ablations", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ablations", module)
    spec.loader.exec_module(module)
    return module


def test_every_variant_names_valid_options_and_a_distinct_folder(ablations):
    from nnharmony.trainers.hermes_trainer import HermesConfig
    from nnharmony.trainers.uharmony_trainer import UHarmonyConfig

    configs = {"uharmony": UHarmonyConfig, "hermes": HermesConfig}
    for method, variants in ablations.ABLATIONS.items():
        slugs = {ablations.slug(v) for v in variants}
        assert len(slugs) == len(variants)
        for trainer, options in variants.values():
            assert trainer in ablations.TRAINER_METHODS
            if method in options:
                configs[method].from_value(options[method])  # raises on an unknown field or value


def _bench(member_dice: dict[str, float], method: str, auto: tuple[int, int] | None = None) -> dict:
    rows = [{"member": m, "method": method, "dice_mean": d} for m, d in member_dice.items()]
    bench = {"collection": {"name": "Collection930_R2", "members": [{"name": m} for m in member_dice]},
             "settings": {"budget": "6 epochs x 100 iterations", "plans": "P"}, "rows": rows, "auto_rows": []}
    if auto:
        bench["auto_member"] = {method: {"DatasetA": {"correct": auto[0], "cases": auto[1]}}}
        bench["auto_rows"] = [{"member": m, "method": f"{method} (auto)", "dice_mean": d / 2}
                              for m, d in member_dice.items()]
    return bench


def test_summary_table_is_computed_from_the_runs(ablations, tmp_path):
    variants = list(ablations.ABLATIONS["uharmony"])
    runs = {(variants[0], 0): _bench({"Dataset1_A": 0.8, "Dataset2_B": 0.4}, "uharmony", auto=(5, 6)),
            (variants[0], 1): _bench({"Dataset1_A": 0.6, "Dataset2_B": 0.2}, "uharmony"),
            (variants[2], 0): _bench({"Dataset1_A": 0.5, "Dataset2_B": 0.1}, "uharmony")}
    for (variant, seed), bench in runs.items():
        folder = tmp_path / ablations.slug(variant) / "reports" / "r2" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "benchmark.json").write_text(json.dumps(bench))
    table = ablations.summary_table(tmp_path, "r2", "uharmony")
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "| 0: 0.600, 1: 0.400 | **0.500** | 0.700 | 0.300 | 0: 5/6, 0.300 |" in lines[variants[0]]
    assert "| 0: 0.300 | **0.300** | 0.500 | 0.100 | – |" in lines[variants[2]]
    assert variants[1] not in lines  # no run, no row
    assert "| variant | per seed | mean | A | B |" in table
