"""nnharmony_benchmark: tables, figures, budget, conclusion and progress from known inputs, and a tiny version of
the quick preset (every method, in this process) that checks the report folder's contents -- not its timing."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from nnharmony.benchmark import budget as BU
from nnharmony.benchmark import conclusion as C
from nnharmony.benchmark import scoring as S
from nnharmony.benchmark.progress import Progress, Step
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
    timings = [{"method": "joint", "trainer": "nnHarmonyTrainer", "configuration": "2d", "status": "ok",
                "epochs": "8", "iterations": 120, "setup_s": 3.0, "train_s": 75.4, "validation_s": 6.0,
                "predict_s": None, "eval_s": 2.0, "total_s": 86.4, "cpu_s": 130, "peak_rss_mb": 2048.0,
                "peak_cuda_mb": None, "note": ""},
               {"method": "universeg", "trainer": "UniverSegTrainer", "configuration": "2d", "status": "skipped",
                "note": "not importable"}]
    table = R.timing_table(timings, {"startup_s": 4.0, "planning_s": 30.0, "report_s": 5.0}).splitlines()
    assert table[0] == "shared by all methods: start-up 4 s, data + planning 30 s, report and figures 5 s"
    assert table[2].startswith("| method | trainer | config | status | epochs | iterations | set-up | training |")
    assert table[4] == ("| joint | nnHarmonyTrainer | 2d | ok | 8 | 120 | 3 s | 1 min 15 s | 6 s | – | 2 s "
                        "| 1 min 26 s | 2 min 10 s | 2.00 GB | – |")
    assert "| universeg | UniverSegTrainer | 2d | skipped |" in table[5]
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
    curves = {"joint": [{"model": "joint", "curves": {"train_loss": [1.0, 0.5], "val_loss": [0.9, 0.6],
                                                      "pseudo_dice": [0.2, 0.7]}}],
              "nnunet": [{"model": f"nnunet D{i}", "curves": {"train_loss": [1.0, 0.4], "val_loss": [],
                                                             "pseudo_dice": [0.1, 0.8]}} for i in range(2)],
              "failed": []}
    assert R.plot_training_curves(curves, tmp_path / "curves.png")
    _assert_png(tmp_path / "curves.png", (200, 600))
    assert not R.plot_training_curves({"x": []}, tmp_path / "none.png")


def test_budget_parsing():
    assert BU.Budget.parse("5x50") == BU.Budget(epochs=5, iterations=50)
    assert BU.Budget.parse("5x50").val_iterations == 10
    assert BU.Budget.parse("10min") == BU.Budget(minutes=10.0)
    assert BU.Budget.parse("1.5minx20") == BU.Budget(minutes=1.5, iterations=20)
    fitted = BU.Budget.parse("8x1.5min")
    assert fitted == BU.Budget(epochs=8, minutes=1.5) and fitted.fitted and not BU.Budget.parse("10min").fitted
    assert str(fitted) == "8 epochs in 1.5 min per method" and fitted.val_iterations == BU.FITTED_VAL_ITERATIONS
    cpu = BU.Budget.parse("8x1.5cpumin")
    assert cpu == BU.Budget(epochs=8, minutes=1.5, clock="cpu") and cpu.fitted
    assert str(cpu) == "8 epochs in 1.5 CPU min per method"
    for bad in ("5", "0x5", "x", "10 hours", "0x1min", "8x1cpu"):
        with pytest.raises(ValueError, match="--budget"):
            BU.Budget.parse(bad)


class _FakeTrainer:
    """The hooks nnU-Net's loop calls, with a clock the test moves."""

    def __init__(self, epochs: int):
        self.num_epochs, self.current_epoch, self.num_iterations_per_epoch = epochs, 0, 50

    def on_train_epoch_start(self):
        pass

    def on_train_epoch_end(self, outputs):
        pass

    def on_epoch_end(self):
        self.current_epoch += 1


def test_epochs_in_minutes_fits_iterations_to_the_time_left(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(BU.time, "perf_counter", lambda: clock[0])
    tr = _FakeTrainer(epochs=4)
    fit = BU.EpochsInMinutes(tr, seconds=100.0, first_iterations=5)
    assert tr.num_iterations_per_epoch == 5
    for _ in range(4):  # every step takes 0.5 s, every epoch 1 s more (validation, logging)
        tr.on_train_epoch_start()
        clock[0] += 0.5 * tr.num_iterations_per_epoch
        tr.on_train_epoch_end([])
        clock[0] += 1.0
        tr.on_epoch_end()
    # epoch 1: 3.5 s; then (100 - 3.5) / 3 = 32.2 s per epoch, 1 s of it overhead: 62 iterations; the last epoch
    # takes up what the rounding left
    assert fit.iterations == [5, 62, 62, 63]
    assert clock[0] == pytest.approx(100.0)


def test_epochs_in_cpu_minutes_count_this_process_cpu_time(monkeypatch):
    """With the CPU clock, wall time that other processes take does not count: the same iterations as on an idle
    machine."""
    wall, cpu = [0.0], [0.0]
    monkeypatch.setattr(BU.time, "perf_counter", lambda: wall[0])
    monkeypatch.setattr(BU.time, "process_time", lambda: cpu[0])
    tr = _FakeTrainer(epochs=4)
    fit = BU.EpochsInMinutes(tr, seconds=100.0, first_iterations=5, clock="cpu")
    for _ in range(4):  # each step: 0.5 s of this process's CPU, 1.5 s of wall time on a busy machine
        tr.on_train_epoch_start()
        cpu[0] += 0.5 * tr.num_iterations_per_epoch
        wall[0] += 1.5 * tr.num_iterations_per_epoch
        tr.on_train_epoch_end([])
        cpu[0] += 1.0
        wall[0] += 3.0
        tr.on_epoch_end()
    assert fit.iterations == [5, 62, 62, 63]
    assert cpu[0] == pytest.approx(100.0) and wall[0] == pytest.approx(300.0)


def test_log_parsing_and_metric_lookup():
    metrics = {"1": {"Dice": 0.5}, "(2, 3)": {"Dice": 0.25, "NSD": 0.4}}
    assert S.label_metrics(metrics, "liver", 1)["Dice"] == 0.5
    assert S.label_metrics(metrics, "core", [2, 3])["NSD"] == 0.4
    assert S.label_metrics({1: {"Dice": 1.0}}, "liver", 1)["Dice"] == 1.0
    assert S.label_metrics(metrics, "x", 7) is None
    rows = S.aggregate([{"member": "A", "label": "l", "method": "m", "case": c, "dice": d, "nsd": None}
                        for c, d in [("a", 0.2), ("b", 0.4)]])
    assert rows == [{"member": "A", "label": "l", "method": "m", "dice_mean": pytest.approx(0.3),
                     "dice_std": pytest.approx(math.sqrt(0.02)), "nsd_mean": None, "nsd_std": None, "n": 2}]


def _per_case(member, method, dices, labels=("liver",)):
    return [{"member": member, "method": method, "case": f"c{i}", "label": lab, "dice": d}
            for i, d in enumerate(dices) for lab in labels]


def test_conclusion_is_computed_from_the_numbers():
    per_case = (_per_case("Big", "nnunet", [0.90, 0.92, 0.94]) + _per_case("Big", "joint", [0.89, 0.93, 0.93])
                + _per_case("Few", "nnunet", [0.50, 0.55, 0.60]) + _per_case("Few", "joint", [0.80, 0.85, 0.90]))
    members = [{"name": "Big", "training_cases": 8}, {"name": "Few", "training_cases": 3}]
    lines = C.conclusion_lines(per_case, members, ["nnunet", "joint"],
                               {"nnunet": "per-dataset", "joint": "collection"})
    assert lines[0].startswith("- **Big** (8 training cases): best nnunet (0.920), +0.003 over joint (0.917), "
                               "not larger than the spread")
    assert "higher on 2 of 3 cases" in lines[0] and "last joint (0.917)" in lines[0]
    assert lines[1].startswith("- **Few** (3 training cases): best joint (0.850), +0.300 over nnunet (0.550), "
                               "larger than the spread over validation cases (std up to 0.050); higher on 3 of 3")
    assert lines[2].startswith("  - few training cases: training on the whole collection helped here: joint")
    assert lines[3] == "- **Over all members** (mean of the member means): joint 0.883, nnunet 0.735."
    # the same numbers the other way round: the loser is named and the few-shot line says it did not help
    swapped = [{**r, "method": {"nnunet": "joint", "joint": "nnunet"}[r["method"]]} for r in per_case]
    lines = C.conclusion_lines(swapped, members, ["nnunet", "joint"],
                               {"nnunet": "per-dataset", "joint": "collection"})
    assert "did not help here: the per-dataset nnunet (0.850)" in lines[2]


def test_progress_line_estimates_time_left():
    p = Progress([Step("", "data + planning"), Step("joint", "training", 60.0), Step("joint", "evaluation"),
                  Step("hermes", "training", 60.0), Step("hermes", "evaluation")], disable=True, default_s=10.0)
    p.start("", "data + planning")
    line = p.line()
    assert line.startswith("[benchmark] data + planning | elapsed 0:00 | about 2:") and line.endswith(" left")
    p.start("joint", "training")
    assert "joint (1/2): training" in p.line()
    p.skip_method("hermes")
    assert p.line().endswith("about 1:10 left") or p.line().endswith("about 1:09 left")
    p.close()


def test_bad_options():
    from nnharmony.benchmark import BenchmarkOptions
    from nnharmony.cli import benchmark as cli

    with pytest.raises(ValueError, match="unknown"):
        BenchmarkOptions(methods=["nope"]).validate()
    with pytest.raises(SystemExit):
        cli.main(["--budget", "fast", "--workdir", "/nonexistent_never_used"])
    with pytest.raises(SystemExit):  # --continue needs the folder of the run it continues
        cli.main(["--quick", "--continue", "--workdir", "/nonexistent_never_used"])


# ------------------------------------------------------------------------------------------ tiny run
def test_tiny_quick_report(synthetic_collection, tmp_path, capsys, monkeypatch):
    """The quick preset's settings (2d, plans variant, one thread, in-process pools) with every default method on the
    session's planned collection and a tiny budget."""
    from nnharmony.benchmark import DEFAULT_METHODS, METHODS, Method
    from nnharmony.cli import benchmark as cli

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    # a method whose trainer does not exist is reported as skipped, without numbers
    monkeypatch.setitem(METHODS, "bogus", Method("bogus", "NoSuchTrainerAnywhere", "2d", "collection", "x"))
    out = tmp_path / "report"
    methods = list(DEFAULT_METHODS)
    rc = cli.main(["--quick", "-d", synthetic_collection["name"], "--methods", *methods, "bogus",
                   "--budget", "2x0.05min", "-device", "cpu", "-o", str(out), "--overlays", "3", "--no-progress",
                   "-S", "2", "--trainer-options",
                   'universeg={"image_size": 32, "episode_batch_size": 2, "encoder_blocks": [8, 8, 8]}'])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    spec = synthetic_collection["spec"]
    n_labels = sum(len([k for k in m.labels if k != "background"]) for m in spec.members)

    # printed table = results.md's table, built from this run's numbers; every method has a number in every row
    md = (out / "results.md").read_text()
    header = "| member | label | n | " + " | ".join(methods) + " | bogus |"
    assert header in printed and header in md
    body = [ln for ln in md.split(header)[1].strip().splitlines()[1:] if ln.startswith("| ")]
    assert len(body) >= n_labels + 1 and body[n_labels].startswith("| **mean**")
    for ln in body[:n_labels + 1]:
        cells = [c.strip().strip("*") for c in ln.strip("|").split("|")][3:]
        assert cells[-1] == "skipped"
        assert all(0.0 <= float(c.split(" ± ")[0].split(" (")[0]) <= 1.0 for c in cells[:-1]), ln
    assert "bogus: skipped: trainer NoSuchTrainerAnywhere is not available" in printed
    assert "What the numbers say" in printed and "- **Over all members**" in printed
    assert f"report: {out}/results.md" in printed and f"{out}/dice_bar.png" in printed and f"logs: {out}/logs/" in printed

    bench = json.loads((out / "benchmark.json").read_text())
    assert {"settings", "started", "finished", "total_s", "collection", "methods", "timings", "shared_timings",
            "rows", "per_case", "conclusion", "figures", "report_folder"} <= set(bench)
    assert bench["settings"]["budget"] == "2 epochs in 0.05 min per method" and bench["settings"]["seed"] == 0
    timings = {t["method"]: t for t in bench["timings"]}
    assert list(timings) == methods + ["bogus"]
    for m in methods:
        t = timings[m]
        assert t["status"] == "ok", t
        assert t["train_s"] > 0 and t["eval_s"] > 0 and t["total_s"] >= t["train_s"] and t["peak_rss_mb"] > 100
        assert (t["predict_s"] if m == "universeg" else t["validation_s"]) > 0
        assert (out / "logs" / f"{m}.log").is_file()
        models = bench["methods"][m]["models"]
        assert len(models) == (len(spec.members) if m == "nnunet" else 1)
        assert all(mod["epochs"] == 2 and len(mod["curves"]["train_loss"]) == 2 for mod in models)
    assert timings["bogus"]["status"] == "skipped" and timings["bogus"]["train_s"] is None
    assert bench["shared_timings"]["planning_s"] >= 0 and bench["shared_timings"]["startup_s"] > 0

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == R.ROW_FIELDS and len(rows) == n_labels * len(methods)
    assert {r["method"] for r in rows} == set(methods)
    for r in rows:
        assert 0.0 <= float(r["dice_mean"]) <= 1.0 and int(r["n"]) >= 1
    with open(out / "timing.csv") as f:
        assert [t["method"] for t in csv.DictReader(f)] == methods + ["bogus"]
    cases = {(r["member"], r["case"]) for r in bench["per_case"]}
    assert cases == {(m["name"], c) for m in bench["collection"]["members"] for c in m["validation_cases"]}

    figs = bench["figures"]
    _assert_png(out / figs["bars"], (200, 300))
    _assert_png(out / figs["curves"], (200, 600))
    assert len(figs["overlays"]) == 3 and {Path(o).name.split("_")[0] for o in figs["overlays"]} == {"Dataset901",
                                                                                                   "Dataset902",
                                                                                                   "Dataset903"}
    for o in figs["overlays"]:
        _assert_png(out / o, (100, 100 * (2 + len(methods))))
    # models went to the report's own results folder, without checkpoints
    model = out / "models" / synthetic_collection["name"] / "nnHarmonyTrainer__nnHarmonyPlans_quick__2d"
    assert (model / "fold_0" / "validation").is_dir() and not list(model.rglob("*.pth"))


def test_tiny_dataset_auto_report(synthetic_collection, tmp_path, capsys, monkeypatch):
    """--dataset-auto: U-Harmony predicts every member's validation cases without being told the member (a 2d model
    on volumes: this failed before with 'data ... does not match patch'); the report counts the right guesses
    and scores the predictions made with them."""
    from nnharmony.cli import benchmark as cli

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    out = tmp_path / "report"
    # the previous release's spellings (--collection, --device) still work, with a warning
    rc = cli.main(["--quick", "--collection", synthetic_collection["name"], "--methods", "uharmony",
                   "--budget", "1x2", "--device", "cpu", "-o", str(out), "--overlays", "0", "--no-progress",
                   "--dataset-auto"])
    printed, err = capsys.readouterr()
    assert rc == 0, printed
    assert "warning: --collection is deprecated" in err and "use -d COLLECTION" in err
    assert "warning: --device is deprecated" in err and "use -device" in err
    bench = json.loads((out / "benchmark.json").read_text())
    members = {m["name"]: len(m["validation_cases"]) for m in bench["collection"]["members"]}
    auto = bench["auto_member"]["uharmony"]
    assert {k: v["cases"] for k, v in auto.items()} == members
    for name, v in auto.items():
        assert 0 <= v["correct"] <= v["cases"] and set(v["inferred"].values()) <= set(members)
        assert (out / "predictions_auto" / "uharmony" / name / "predicted_datasets.json").is_file()
    assert {r["method"] for r in bench["auto_rows"]} == {"uharmony", "uharmony (auto)"}
    assert "inferred member right on" in printed and "uharmony (auto)" in (out / "results.md").read_text()

    # --continue into the same folder reuses the scored method (nothing is trained) and rebuilds the same report;
    # with another setting the method runs again
    from nnharmony.benchmark import runner

    calls = []

    def no_training(method, *args):
        calls.append(method.name)
        raise RuntimeError("trained again")

    monkeypatch.setattr(runner, "run_method", no_training)
    same = ["--quick", "-d", synthetic_collection["name"], "--methods", "uharmony", "-device", "cpu", "-o", str(out),
            "--overlays", "0", "--no-progress", "--dataset-auto", "--continue"]
    assert cli.main(same + ["--budget", "1x2"]) == 0 and not calls
    assert "uharmony: scored before with the same settings, reused" in capsys.readouterr().out
    again = json.loads((out / "benchmark.json").read_text())
    assert again["rows"] == bench["rows"] and again["auto_member"] == bench["auto_member"]
    assert again["timings"] == bench["timings"]
    with pytest.raises(SystemExit):
        cli.main(same + ["--budget", "1x3"])
    assert calls == ["uharmony"] and "trained again" in capsys.readouterr().err


def test_per_dataset_models_share_an_iterations_budget():
    from nnharmony.benchmark.training import per_dataset_share
    from nnharmony.trainers.run import TrainingOptions

    t = TrainingOptions(collection="C", configuration="2d", fold=0, epochs=6, iterations_per_epoch=100)
    assert per_dataset_share(t, BU.Budget.parse("6x100"), 7, "total").iterations_per_epoch == 14  # equal compute
    assert per_dataset_share(t, BU.Budget.parse("6x100"), 7, "each").iterations_per_epoch == 100
    assert per_dataset_share(t, BU.Budget.parse("6x2"), 7, "total").iterations_per_epoch == 1  # at least one
    assert per_dataset_share(t, BU.Budget.parse("8x1.5min"), 7, "total") is t  # minutes: split by time


def test_plans_variant_caps_the_patch_and_drops_stages_below_4_voxels():
    from nnharmony.benchmark.plans_variant import PlansVariant

    arch = {"n_stages": 7, "features_per_stage": [32, 64, 128, 256, 512, 512, 512],
            "kernel_sizes": [[3, 3]] * 7, "strides": [[1, 1]] + [[2, 2]] * 6, "n_conv_per_stage": [2] * 7,
            "n_conv_per_stage_decoder": [2] * 6, "conv_op": "torch.nn.modules.conv.Conv2d"}
    plans = {"plans_name": "P", "configurations": {"2d": {"patch_size": [192, 256], "batch_size": 46,
                                                           "architecture": {"arch_kwargs": arch}}}}
    out = PlansVariant("cpu", base_features=16, max_batch_size=8, max_patch_size=128).apply(plans, ["2d"])
    cfg = out["configurations"]["2d"]
    kw = cfg["architecture"]["arch_kwargs"]
    assert out["plans_name"] == "P_cpu" and cfg["batch_size"] == 8 and cfg["patch_size"] == [128, 128]
    assert kw["n_stages"] == 6 and kw["features_per_stage"] == [16, 32, 64, 128, 256, 512]  # 128 / 2^5 = 4
    assert len(kw["strides"]) == len(kw["kernel_sizes"]) == len(kw["n_conv_per_stage"]) == 6
    assert len(kw["n_conv_per_stage_decoder"]) == 5
    assert plans["configurations"]["2d"]["patch_size"] == [192, 256] and arch["n_stages"] == 7  # input unchanged
    small = PlansVariant("q", 16, 8).apply(plans, ["2d"])["configurations"]["2d"]
    assert small["patch_size"] == [192, 256] and small["architecture"]["arch_kwargs"]["n_stages"] == 7
