"""nnharmony_benchmark: tables and figures from known inputs, and a tiny-budget run on the synthetic collection
that checks the report folder's structure (tables, CSV columns, valid PNGs, benchmark.json)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from nnharmony.evaluation import benchmark as B
from nnharmony.evaluation import report as R

METHODS = ["nnunet", "joint", "hermes"]


def _rows():
    rows = []
    for member, labels in [("Dataset901_A", ["liver", "spleen"]), ("Dataset902_B", ["liver"])]:
        for label in labels:
            for k, method in enumerate(METHODS):
                values = [0.5 + 0.1 * k, 0.7 + 0.1 * k]
                mean, std, n = R.summarize(values)
                rows.append({"member": member, "label": label, "method": method, "dice_mean": mean, "dice_std": std,
                             "nsd_mean": None, "nsd_std": None, "n": n})
    return rows


def _assert_png(path: Path, min_hw=(100, 100)):
    import matplotlib.image as mpimg

    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] >= min_hw[0] and img.shape[1] >= min_hw[1], (path, img.shape)
    assert float(img[..., :3].std()) > 0.01, f"{path} is blank"
    return img


# ------------------------------------------------------------------------------------------ known inputs
def test_summarize_ignores_nan_and_uses_sample_std():
    mean, std, n = R.summarize([0.5, 0.7, float("nan"), None])
    assert n == 2 and mean == pytest.approx(0.6) and std == pytest.approx(math.sqrt(0.02))
    assert R.summarize([0.4]) == (0.4, None, 1)
    assert R.summarize([]) == (None, None, 0)


def test_results_table_from_known_rows():
    table = R.results_table(_rows(), "dice", METHODS + ["universeg"], {"universeg": "skipped"})
    lines = table.strip().splitlines()
    assert lines[0] == "| member | label | n | nnunet | joint | hermes | universeg |"
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|"
    assert lines[2] == "| Dataset901_A | liver | 2 | 0.600 ± 0.141 | 0.700 ± 0.141 | 0.800 ± 0.141 | skipped |"
    assert lines[4].startswith("| Dataset902_B | liver | 2 |")
    assert lines[5] == "| **mean** | | | **0.600** | **0.700** | **0.800** | skipped |"
    assert len(lines) == 6


def test_timing_table_and_csv(tmp_path):
    timings = [{"method": "joint", "trainer": "nnHarmonyTrainer", "configuration": "3d_fullres", "status": "ok",
                "epochs": 2, "train_s": 75.4, "predict_s": None, "eval_s": 2.0, "cpu_s": 130, "peak_rss_mb": 2048.0,
                "peak_cuda_mb": None, "note": ""},
               {"method": "universeg", "trainer": "UniverSegTrainer", "configuration": "2d", "status": "skipped",
                "note": "not importable"}]
    table = R.timing_table(timings).splitlines()
    assert table[0].startswith("| method | trainer | config | status | epochs |")
    assert table[2] == "| joint | nnHarmonyTrainer | 3d_fullres | ok | 2 | 1 min 15 s | – | 2 s | 2 min 10 s | 2.00 GB | – |"
    assert "| universeg | UniverSegTrainer | 2d | skipped |" in table[3]
    R.write_timing_csv(timings, tmp_path / "timing.csv")
    R.write_results_csv(_rows(), tmp_path / "results.csv")
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == R.ROW_FIELDS and len(rows) == 9
    assert rows[0]["nsd_mean"] == "" and float(rows[0]["dice_mean"]) == pytest.approx(0.6)
    with open(tmp_path / "timing.csv") as f:
        assert list(csv.DictReader(f).fieldnames) == R.TIMING_FIELDS


def test_figures_from_known_inputs(tmp_path):
    assert R.plot_metric_bars(_rows(), tmp_path / "bars.png", "dice", METHODS)
    _assert_png(tmp_path / "bars.png", (200, 400))
    assert not R.plot_metric_bars([], tmp_path / "none.png")
    img = np.random.default_rng(0).normal(size=(16, 24, 24))
    ref = np.zeros(img.shape, dtype=np.uint8)
    ref[5:9, 4:12, 4:12] = 1
    ref[6:8, 14:20, 6:10] = 2
    z = R.plot_overlay(img, ref, {"joint": ref, "hermes": None}, tmp_path / "ov.png", {"liver": 1, "spleen": 2},
                       "Dataset901_A / case_0", spacing=(2.0, 1.0, 1.0), scores={"joint": 1.0})
    assert 5 <= z < 9  # the slice with the most reference foreground
    png = _assert_png(tmp_path / "ov.png", (150, 400))
    assert png.shape[1] > 2 * png.shape[0]  # four panels side by side


def test_budget_parsing():
    assert B.Budget.parse("5x50") == B.Budget(epochs=5, iterations=50)
    assert B.Budget.parse("5x50").val_iterations == 10
    assert B.Budget.parse("10min") == B.Budget(minutes=10.0)
    assert B.Budget.parse("1.5minx20") == B.Budget(minutes=1.5, iterations=20)
    for bad in ("5", "0x5", "x", "10 hours"):
        with pytest.raises(ValueError, match="--budget"):
            B.Budget.parse(bad)


def test_train_argv_applies_budget_to_every_paradigm():
    opts = B.BenchmarkOptions(methods=["joint"], budget="3x7", device="cpu")
    argv = B.train_argv(B.METHODS["joint"], "C", opts, B.Budget.parse("3x7"))
    assert argv == ["C", "3d_fullres", "0", "-tr", "nnHarmonyTrainer", "-device", "cpu", "--epochs", "3",
                    "--iterations-per-epoch", "7", "--val-iterations-per-epoch", "1"]
    argv = B.train_argv(B.METHODS["hermes"], "C", opts, B.Budget.parse("2min"))
    assert json.loads(argv[argv.index("--trainer-options") + 1]) == {"wall_clock_budget_minutes": 2.0}
    no_ckpt = B.BenchmarkOptions(keep_checkpoints=False)
    assert "--disable_checkpointing" in B.train_argv(B.METHODS["joint"], "C", no_ckpt, B.Budget.parse("1x1"))
    # the in-context method's prediction loads its checkpoint
    assert "--disable_checkpointing" not in B.train_argv(B.METHODS["universeg"], "C", no_ckpt, B.Budget.parse("1x1"))
    assert "-num_gpus" not in B.train_argv(B.METHODS["nnunet"], "C", B.BenchmarkOptions(num_gpus=2),
                                           B.Budget.parse("1x1"))


def test_log_parsing_and_metric_lookup():
    log = "x: Epoch 0\nx: Epoch 1\nfoo\nx: Epoch 0\nx: Epoch 1\nx: Epoch 0\n"
    assert B._epochs_from_log(log) == [2, 2, 1]
    metrics = {"1": {"Dice": 0.5}, "(2, 3)": {"Dice": 0.25, "NSD": 0.4}}
    assert B._label_metrics(metrics, "liver", 1)["Dice"] == 0.5
    assert B._label_metrics(metrics, "core", [2, 3])["NSD"] == 0.4
    assert B._label_metrics({1: {"Dice": 1.0}}, "liver", 1)["Dice"] == 1.0
    assert B._label_metrics(metrics, "x", 7) is None
    rows = B.aggregate([{"member": "A", "label": "l", "method": "m", "case": c, "dice": d, "nsd": None}
                        for c, d in [("a", 0.2), ("b", 0.4)]])
    assert rows == [{"member": "A", "label": "l", "method": "m", "dice_mean": pytest.approx(0.3),
                     "dice_std": pytest.approx(math.sqrt(0.02)), "nsd_mean": None, "nsd_std": None, "n": 2}]


def test_bad_options():
    with pytest.raises(ValueError, match="unknown"):
        B.BenchmarkOptions(methods=["nope"]).validate()
    from nnharmony.cli import benchmark as cli

    with pytest.raises(SystemExit):
        cli.main(["--budget", "fast", "--workdir", "/nonexistent_never_used"])


# ------------------------------------------------------------------------------------------ tiny run
def _importable(trainer: str) -> bool:
    try:
        from nnharmony.utils.find_class import find_trainer_class

        find_trainer_class(trainer)
        return True
    except Exception:  # noqa: BLE001
        return False


def test_tiny_benchmark_report(synthetic_collection, tmp_path, capsys, monkeypatch):
    from nnharmony.cli import benchmark as cli

    # a method whose trainer does not exist is reported as skipped, without numbers
    monkeypatch.setitem(B.METHODS, "bogus", B.Method("bogus", "NoSuchTrainerAnywhere", "3d_fullres", "collection", "x"))
    out = tmp_path / "report"
    rc = cli.main(["--collection", synthetic_collection["name"], "--methods", "joint", "bogus", "--budget", "1x2",
                   "--device", "cpu", "-o", str(out), "--overlays", "2", "--no-progress", "--no-checkpoints"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    methods = ["joint"]
    spec = synthetic_collection["spec"]
    n_labels = sum(len([k for k in m.labels if k != "background"]) for m in spec.members)

    # printed table = results.md's table, built from this run's numbers
    md = (out / "results.md").read_text()
    header = "| member | label | n | joint | bogus |"
    assert header in printed and header in md
    body = [ln for ln in md.split(header)[1].strip().splitlines()[1:] if ln.startswith("| ")]
    assert len(body) >= n_labels + 1 and body[n_labels].startswith("| **mean**")
    assert all(ln.endswith("| skipped |") for ln in body[:n_labels + 1])
    assert "bogus: skipped: trainer NoSuchTrainerAnywhere is not available" in printed
    bench = json.loads((out / "benchmark.json").read_text())
    assert {"settings", "started", "finished", "total_s", "collection", "methods", "timings", "rows", "per_case",
            "figures", "report_folder"} <= set(bench)
    assert bench["settings"]["budget"] == "1 epochs x 2 iterations"
    first = bench["rows"][0]
    assert f"{first['dice_mean']:.3f}" in body[0]
    joint, bogus = bench["timings"]
    assert joint["status"] == "ok" and joint["train_s"] > 0 and joint["peak_rss_mb"] > 100 and joint["epochs"] == 1
    assert bogus["status"] == "skipped" and bogus["train_s"] is None

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == R.ROW_FIELDS
    assert len(rows) == n_labels * len(methods)
    assert {r["method"] for r in rows} == set(methods)
    for r in rows:
        assert 0.0 <= float(r["dice_mean"]) <= 1.0 and int(r["n"]) >= 1
    with open(out / "timing.csv") as f:
        timing = list(csv.DictReader(f))
    assert [t["method"] for t in timing] == ["joint", "bogus"] and list(timing[0]) == R.TIMING_FIELDS
    # per-case values match the validation cases of the fold
    cases = {(r["member"], r["case"]) for r in bench["per_case"]}
    assert cases == {(m["name"], c) for m in bench["collection"]["members"] for c in m["validation_cases"]}

    _assert_png(out / "dice_bar.png", (200, 300))
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 2 and bench["figures"]["overlays"] == [f"overlays/{p.name}" for p in overlays]
    for p in overlays:
        _assert_png(p, (100, 100 * (2 + len(methods))))
    # models went to the report's own results folder, not over the user's
    model = out / "models" / synthetic_collection["name"] / "nnHarmonyTrainer__nnHarmonyPlans__3d_fullres"
    assert (model / "fold_0" / "validation").is_dir() and not list(model.rglob("*.pth"))  # --no-checkpoints
