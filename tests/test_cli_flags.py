"""nnU-Net's flags mean what they mean in nnU-Net (issue 21): parsing, old spellings, fast failures before
torch/nnU-Net are imported, and prediction resume, parts and worker processes on the synthetic collection."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnharmony.cli import predict as predict_cli
from nnharmony.cli import train as train_cli

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- parsing
def test_predict_flags_parse_as_in_nnunet():
    args = predict_cli.build_parser().parse_args(
        ["-i", "in", "-o", "out", "-d", "900", "-c", "2d", "-f", "0", "1", "-chk", "checkpoint_best.pth",
         "-step_size", "0.7", "--disable_tta", "--save_probabilities", "--continue_prediction", "-npp", "0",
         "-nps", "1", "-num_parts", "3", "-part_id", "2", "--verbose", "-device", "cpu", "--member", "902"])
    assert (args.collection, args.cfg, args.f, args.chk, args.step_size) == ("900", "2d", ["0", "1"],
                                                                             "checkpoint_best.pth", 0.7)
    assert args.disable_tta and args.save_probabilities and args.continue_prediction and args.verbose
    assert (args.npp, args.nps, args.num_parts, args.part_id, args.device, args.member) == (0, 1, 3, 2, "cpu", "902")


@pytest.mark.parametrize("argv", [["-part", "0"], ["-dev", "cpu"], ["--continue"], ["--save_prob"]])
def test_no_abbreviations(argv, capsys):
    """-part_id was read as '-p art_id' and '-d 902' as '-device 902': long options are never abbreviated."""
    with pytest.raises(SystemExit):
        predict_cli.build_parser().parse_args(["-i", "in", "-o", "out", "-d", "900", *argv])


def test_old_spellings_keep_working_with_a_warning(capsys):
    args = predict_cli.build_parser().parse_args(
        ["-i", "in", "-o", "out", "--collection", "C", "-cfg", "2d", "--dataset", "902"])
    assert (args.collection, args.old_cfg, args.member) == ("C", "2d", "902")
    err = capsys.readouterr().err
    for old, new in (("--collection", "-d COLLECTION"), ("-cfg", "-c CONFIGURATION"), ("--dataset", "--member")):
        assert f"warning: {old} is deprecated" in err and f"use {new}" in err


@pytest.mark.parametrize("module", ["convert", "make_synthetic"])
def test_epilog_examples_parse_as_printed(module):
    """Commands whose epilog mixes examples with text: every line that starts with the command (continuation
    lines joined) parses, now that long options are never abbreviated."""
    import importlib
    import shlex

    parser = importlib.import_module(f"nnharmony.cli.{module}").build_parser()
    lines = [ln.strip() for ln in parser.epilog.replace("\\\n", " ").splitlines()]
    examples = [ln for ln in lines if ln.split(" ", 1)[0] == parser.prog]
    assert len(examples) >= 3
    for line in examples:
        parser.parse_args(shlex.split(line, comments=True)[1:])


@pytest.mark.parametrize("module, argv", [("convert", ["msd", "-i", "x", "--dataset", "4"]),
                                          ("convert", ["check", "-d", "4", "--headers"]),
                                          ("make_synthetic", ["--first", "950"]),
                                          ("benchmark", ["--qu"]), ("benchmark", ["--method", "joint"])])
def test_no_abbreviations_in_other_commands(module, argv, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"nnharmony.cli.{module}").build_parser().parse_args(argv)


def test_benchmark_flags_as_in_nnunet_and_old_spellings(tmp_path, monkeypatch, capsys):
    """nnharmony_benchmark: -d collection (name or id), -c configuration, --members for new collections; the
    previous release's -c/--collection, -cfg/--configuration, -d ID ID ..., --fold, --device and --num-processes
    keep working with a one-line warning each."""
    from nnharmony.cli import benchmark as bench_cli

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    (tmp_path / "nnUNet_preprocessed" / "Collection900_Synth").mkdir()
    (tmp_path / "nnUNet_preprocessed" / "Collection900_Synth" / "collection.json").write_text("{}")
    (tmp_path / "nnUNet_raw" / "Dataset004_A").mkdir()

    def resolved(*argv):
        capsys.readouterr()
        args = bench_cli.build_parser().parse_args(list(argv))
        bench_cli.resolve_collection_flags(args)
        warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: ")]
        return (args.collection, args.members, args.cfg, args.fold, args.device, args.num_processes), warnings

    assert resolved("-d", "900", "-c", "2d", "-f", "1", "-device", "cpu", "-np", "1") == (
        ("Collection900_Synth", None, "2d", "1", "cpu", 1), [])
    assert resolved("-c", "2d") == ((None, None, "2d", "0", None, None), [])  # the built-in collection, on 2d
    assert resolved("--members", "4", "17", "-d", "Collection004_Abd") == (
        ("Collection004_Abd", ["4", "17"], None, "0", None, None), [])
    got, warnings = resolved("-c", "Collection900_Synth", "-cfg", "2d")
    assert got[:3] == ("Collection900_Synth", None, "2d") and len(warnings) == 2
    assert "use -d Collection900_Synth -c CONFIGURATION" in warnings[1]
    got, warnings = resolved("-d", "4", "17", "27", "-c", "Collection004_Abd")
    assert got[:3] == ("Collection004_Abd", ["4", "17", "27"], None) and len(warnings) == 2
    assert "use --members 4 17 27" in warnings[0]
    assert resolved("-d", "4")[0][:2] == (None, ["4"])  # the id of a raw dataset, no collection 004
    got, warnings = resolved("--collection", "Collection900_Synth", "--configuration", "2d", "--fold", "1",
                             "--device", "cpu", "--num-processes", "1")
    assert got == ("Collection900_Synth", None, "2d", "1", "cpu", 1) and len(warnings) == 5
    assert resolved("--configuration", "2d")[0][:3] == (None, None, "2d")
    with pytest.raises(ValueError, match="give the new collection's name"):
        resolved("--members", "4", "-d", "5")


def test_train_fold_and_val_best():
    args = train_cli.build_parser().parse_args(["900", "3d_fullres", "all", "--val_best"])
    assert args.fold == "all" and args.val_best
    assert train_cli.build_parser().parse_args(["900", "2d", "3"]).fold == 3
    with pytest.raises(SystemExit):
        train_cli.build_parser().parse_args(["900", "2d", "three"])


def _commands() -> dict[str, str]:
    """Every nnharmony_* entry point of pyproject.toml: command -> module."""
    import re

    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return {name: target.split(":")[0] for name, target in re.findall(r'^(\w+)\s*=\s*"([\w.:]+)"', section, re.M)}


def _parsers(parser):
    """A parser and its subcommands' parsers."""
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_flag_of_every_command_has_help_with_its_default(command):
    """No abbreviated long options, and every flag has help text naming its default in -h (the formatter adds
    it where the text does not; None, off switches and empty lists have none to show)."""
    import argparse
    import importlib

    from nnharmony.cli.common import shows_a_default

    assert len(_commands()) == 9
    parser = importlib.import_module(_commands()[command]).build_parser()
    assert parser.prog == command
    for p in _parsers(parser):
        assert p.allow_abbrev is False, p.prog
        formatter = p._get_formatter()
        for action in p._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction,
                                                                       argparse._SubParsersAction)):
                continue
            assert action.help, (p.prog, action.option_strings or action.dest)
            if action.option_strings and shows_a_default(action):
                text = formatter._expand_help(action)
                assert "default" in text, (p.prog, action.option_strings, text)


@pytest.mark.parametrize("module", ["predict", "train", "adapt", "analyze_priors", "evaluate", "benchmark"])
def test_help_examples_parse_as_printed(module):
    import importlib
    import shlex

    from nnharmony.cli.common import parse_trainer_options

    parser = importlib.import_module(f"nnharmony.cli.{module}").build_parser()
    examples = parser.epilog.split("\n\n")[0].splitlines()[1:]  # the examples block, before any further text
    assert examples
    for line in examples:
        argv = shlex.split(line, comments=True)
        assert argv[0] == parser.prog, line
        args = parser.parse_args(argv[1:])
        parse_trainer_options(getattr(args, "trainer_options", None))


# ---------------------------------------------------------------------------------------------- fail fast
@pytest.fixture
def fake_planned(tmp_path):
    """nnU-Net folders with one planned collection (spec and joint plans only: enough for the name checks)."""
    env = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for v in env.values():
        v.mkdir()
    coll = env["nnUNet_preprocessed"] / "Collection950_Fake"
    coll.mkdir()
    (coll / "collection.json").write_text(json.dumps({"name": "Collection950_Fake", "members": [
        {"dataset_id": 951, "dataset_name": "Dataset951_A"}]}))
    (coll / "nnHarmonyPlans.json").write_text(json.dumps({"configurations": {"3d_fullres": {}, "2d": {}}}))
    return {k: str(v) for k, v in env.items()}


def _run_main(module: str, argv: list[str], env: dict) -> subprocess.CompletedProcess:
    """``module.main(argv)`` in a fresh interpreter; prints which heavy modules were imported when it exited."""
    code = (f"import sys\nfrom nnharmony.cli import {module} as m\ntry:\n    m.main({argv!r})\nfinally:\n"
            f"    print('IMPORTED', 'nnunetv2' in sys.modules, 'torch' in sys.modules)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_") and k != "NNHARMONY_DEBUG"}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          cwd=REPO, timeout=120)


@pytest.mark.parametrize("module,argv,message", [
    ("train", ["950", "3d_fullres", "0", "-tr", "nnHarmonyTrainr"], "Close matches: nnHarmonyTrainer"),
    ("train", ["Collection950_Fak", "3d_fullres", "0"], "Close matches: Collection950_Fake"),
    ("train", ["951", "3d_fullres", "0"], "951 is the id of dataset Dataset951_A, a member of Collection950_Fake"),
    ("train", ["950", "3d_fulres", "0"], "Close matches: 3d_fullres"),
    ("train", ["950", "3d_fullres", "0", "-p", "nnHarmonyPlan"], "Close matches: nnHarmonyPlans"),
    ("predict", ["-i", "x", "-o", "y", "-d", "950", "-tr", "UHarmonyTrainr"], "Close matches: UHarmonyTrainer"),
    ("predict", ["-i", "x", "-o", "y", "-d", "950"], "collection Collection950_Fake has no folder in $nnUNet_results"),
    ("predict", ["-i", "x", "-o", "y", "-d", "950", "-tr", "nnUNetTrainer"], "predict them with nnUNetv2_predict"),
    ("train", ["Collection999_Missing", "3d_fullres", "0"], "collection Collection999_Missing was not planned"),
    ("predict", ["-i", "x", "-o", "y", "-c", "Collection949_Old"],  # the old spelling, a missing collection
     "Collection949_Old/nnHarmonyTrainer__nnHarmonyPlans__3d_fullres: no trained model"),
    ("plan_and_preprocess", ["-d", "951", "-n", "Collection950_Fake", "-pl", "ExperimentPlaner"],
     "Close matches: ExperimentPlanner"),
])
def test_wrong_names_fail_before_nnunet_is_imported(fake_planned, module, argv, message):
    r = _run_main(module, argv, fake_planned)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()  # one error line, after deprecation warnings if any
    assert lines[-1].startswith("error: ") and all(x.startswith("warning: ") for x in lines[:-1]), r.stderr
    assert "IMPORTED False False" in r.stdout


@pytest.mark.parametrize("unset", ["nnUNet_results", "nnUNet_preprocessed"])
def test_unset_folder_variable_is_one_line(fake_planned, unset):
    env = {k: v for k, v in fake_planned.items() if k != unset}
    r = _run_main("train", ["950", "3d_fullres", "0"], env)
    assert r.returncode == 2 and f"${unset} is not set" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "IMPORTED False False" in r.stdout


def test_verbose_shows_the_traceback(fake_planned):
    r = _run_main("train", ["950", "3d_fullres", "0", "-tr", "nnHarmonyTrainr", "--verbose"], fake_planned)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_collection_id_resolves(fake_planned, monkeypatch):
    from nnharmony.cli import preflight

    for k, v in fake_planned.items():
        monkeypatch.setenv(k, v)
    assert preflight.planned_collection("950") == "Collection950_Fake"
    assert preflight.planned_collection("Collection950_Fake") == "Collection950_Fake"
    with pytest.raises(FileNotFoundError, match="no folder Collection949_"):
        preflight.planned_collection("949")


def test_trainer_names_read_from_source_match_the_lookup():
    """The source scan of the fast check knows every trainer the import-based lookup finds in nnharmony."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    import nnharmony.trainers
    from nnharmony.cli.preflight import trainer_names
    from nnharmony.records.model_folder import _classes_in

    assert set(_classes_in(nnharmony.trainers, nnUNetTrainer)) <= trainer_names()


# ---------------------------------------------------------------------------------------------- prediction
@pytest.fixture(scope="module")
def quick_model(synthetic_collection):
    name = synthetic_collection["name"]
    train_cli.main(["900", "3d_fullres", "0", "-tr", "nnHarmonyTrainer", "-device", "cpu", "--epochs", "1",
                    "--iterations-per-epoch", "1", "--val-iterations-per-epoch", "1"])
    return Path(synthetic_collection["nnUNet_results"]) / name / "nnHarmonyTrainer__nnHarmonyPlans__3d_fullres"


def _input_folder(collection, dest: Path, n: int = 3) -> list[str]:
    import shutil

    raw = collection["raw_folders"][0]
    cases = sorted({f.name[:-len("_0000.nii.gz")] for f in (raw / "imagesTr").glob("*_0000.nii.gz")})[:n]
    dest.mkdir(parents=True, exist_ok=True)
    for c in cases:
        shutil.copy(raw / "imagesTr" / f"{c}_0000.nii.gz", dest / f"{c}_0000.nii.gz")
    return cases


def _predict(collection, inp: Path, out: Path, *extra: str) -> None:
    member = str(collection["spec"].members[0].dataset_id)
    predict_cli.main(["-i", str(inp), "-o", str(out), "-d", "900", "-c", "3d_fullres", "-f", "0", "--member", member,
                      "-device", "cpu", "--disable_tta", "--disable_progress_bar", *extra])


def test_continue_prediction_resumes(quick_model, synthetic_collection, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    cases = _input_folder(synthetic_collection, inp)
    _predict(synthetic_collection, inp, out, "-npp", "0", "-nps", "0")
    files = {c: out / f"{c}.nii.gz" for c in cases}
    assert all(f.is_file() for f in files.values())
    files[cases[1]].unlink()  # an interrupted run: one case missing
    before = {c: f.stat().st_mtime_ns for c, f in files.items() if f.exists()}
    capsys.readouterr()
    _predict(synthetic_collection, inp, out, "-npp", "0", "-nps", "0", "--continue_prediction")
    assert "1 case(s) to predict, 2 already predicted (--continue_prediction)" in capsys.readouterr().out
    assert files[cases[1]].is_file()
    assert {c: files[c].stat().st_mtime_ns for c in before} == before  # the others were not rewritten
    record = json.loads((out / "predict_args.json").read_text())
    assert record["arguments"]["continue_prediction"] is True and record["arguments"]["collection"] == \
        synthetic_collection["name"]
    assert record["model_files"] == [str((quick_model / "fold_0" / "checkpoint_final.pth").resolve())]


def test_parts_split_the_folder(quick_model, synthetic_collection, tmp_path):
    inp = tmp_path / "in"
    cases = _input_folder(synthetic_collection, inp)
    for part in (0, 1):
        _predict(synthetic_collection, inp, tmp_path / f"part{part}", "-npp", "0", "-nps", "0", "-num_parts", "2",
                 "-part_id", str(part))
    got = [sorted(p.name[:-len(".nii.gz")] for p in (tmp_path / f"part{k}").glob("*.nii.gz")) for k in (0, 1)]
    assert got == [cases[0::2], cases[1::2]]
    with pytest.raises(SystemExit):
        _predict(synthetic_collection, inp, tmp_path / "bad", "-num_parts", "2", "-part_id", "2")


def test_worker_processes_give_the_same_prediction(quick_model, synthetic_collection, tmp_path):
    """-npp/-nps > 0 (spawned workers preprocess and export) writes what the single process writes."""
    import numpy as np
    import SimpleITK as sitk

    from nnharmony.inference.predict_folder import MIN_CASES_FOR_WORKERS

    inp = tmp_path / "in"
    cases = _input_folder(synthetic_collection, inp, n=MIN_CASES_FOR_WORKERS)
    assert len(cases) == MIN_CASES_FOR_WORKERS
    _predict(synthetic_collection, inp, tmp_path / "seq", "-npp", "0", "-nps", "0")
    _predict(synthetic_collection, inp, tmp_path / "par", "-npp", "1", "-nps", "1")
    for c in cases:
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / f"{c}.nii.gz"))) for d in ("seq", "par"))
        assert np.array_equal(a, b), c


def test_old_collection_flag_still_predicts(quick_model, synthetic_collection, tmp_path, capsys):
    inp = tmp_path / "in"
    cases = _input_folder(synthetic_collection, inp, n=1)
    member = str(synthetic_collection["spec"].members[0].dataset_id)
    predict_cli.main(["-i", str(inp), "-o", str(tmp_path / "o"), "-c", synthetic_collection["name"], "-cfg",
                      "3d_fullres", "--dataset", member, "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0"])
    assert (tmp_path / "o" / f"{cases[0]}.nii.gz").is_file()
    assert "-c is the configuration, as in nnU-Net: use -d" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- training log
def test_training_log_names_members_and_tasks(quick_model, synthetic_collection):
    """The epoch log has per-task and per-member pseudo Dice with names and plain floats, the members' splits
    and sampling weights, time left; progress_members.png has one curve per member."""
    fold = quick_model / "fold_0"
    log = "\n".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    spec = synthetic_collection["spec"]
    assert "np.float" not in log
    assert "members (fold 0): training / validation cases, probability of being sampled" in log
    for m in spec.members:
        assert f"  {m.dataset_name}: " in log and " cases, p = " in log
    assert "Pseudo dice " + spec.tasks[0] + " " in log
    assert "left)" in log and "final validation: " in log
    history = json.loads((fold / "progress_members.json").read_text())
    assert len(history) == 1 and set(history[0]) <= {m.dataset_name for m in spec.members}
    assert (fold / "progress_members.png").is_file()


def test_member_progress_plot_with_a_task_without_values(tmp_path):
    """A panel whose members all have NaN (nothing predicted nor annotated yet) says so instead of an empty
    legend (matplotlib warned 'No artists with labels found')."""
    import warnings

    from nnharmony.data.collection import CollectionSpec
    from nnharmony.trainers import progress

    spec = CollectionSpec.from_dict({"name": "Collection999_Toy", "modalities": ["CT"], "tasks": ["liver", "spleen"],
                                     "members": [{"dataset_id": 991, "dataset_name": "Dataset991_A", "channels": ["CT"],
                                                  "num_training": 5, "labels": {"background": 0, "liver": 1, "spleen": 2},
                                                  "tasks": [{"label": "liver", "values": [1], "task": "liver"},
                                                            {"label": "spleen", "values": [2], "task": "spleen"}]}]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        progress.plot_member_progress(spec, [{"Dataset991_A": {"liver": float("nan"), "spleen": 0.5}}], tmp_path)
    assert (tmp_path / progress.MEMBER_PROGRESS_PLOT).is_file()


# ---------------------------------------------------------------------------------------------- evaluation
def _raw_dataset(root: Path, name: str, labels: dict, cases: int) -> Path:
    import numpy as np
    import SimpleITK as sitk

    folder = root / name
    (folder / "labelsTr").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz",
                                                     "channel_names": {"0": "CT"}, "numTraining": cases}))
    for i in range(cases):
        arr = np.zeros((4, 8, 8), np.uint8)
        arr[1:3, 2:6, 2:6] = 1
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / "labelsTr" / f"c{i}.nii.gz"))
    return folder


def test_evaluation_warns_about_unpredicted_and_refuses_other_labels(tmp_path, monkeypatch, capsys):
    import shutil

    from nnharmony.cli import evaluate as evaluate_cli

    raw = tmp_path / "raw"
    _raw_dataset(raw, "Dataset961_A", {"background": 0, "liver": 1, "spleen": 2}, 4)
    b = _raw_dataset(raw, "Dataset962_B", {"background": 0, "kidney": 1}, 4)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(b / "labelsTr" / "c0.nii.gz", pred / "c0.nii.gz")
    with pytest.raises(SystemExit):  # 962's kidney would be scored as 961's liver
        evaluate_cli.main(["-ref", str(b / "labelsTr"), "-pred", str(pred), "-d", "961", "-np", "1"])
    assert "references of Dataset962_B" in capsys.readouterr().err and not (pred / "summary.json").exists()
    evaluate_cli.main(["-pred", str(pred), "-d", "962", "-np", "1"])
    err = capsys.readouterr().err
    assert "warning: Dataset962_B: 3 of 4 reference case(s) have no prediction" in err and "(n = 1)" in err
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["references_without_prediction"] == ["c1.nii.gz", "c2.nii.gz", "c3.nii.gz"]


# ---------------------------------------------------------------------------------------------- plain nnU-Net
def test_nnunetv2_train_with_a_collection_trainer_says_what_works(tmp_path):
    """``nnUNetv2_train 901 3d_fullres 0 -tr nnHarmonyTrainer`` (a member's own plans) fails with a sentence
    naming nnharmony_train, not with KeyError 'regions_class_order'."""
    from nnharmony.trainers.nnharmony_trainer import nnHarmonyTrainer

    plans = {"dataset_name": "Dataset901_SynthCT", "plans_name": "nnUNetPlans", "configurations": {}}
    with pytest.raises(ValueError, match="nnHarmonyTrainer trains a collection: the plans 'nnUNetPlans' of "
                                         "'Dataset901_SynthCT' are not a collection's joint plans. Train it with "
                                         "nnharmony_train"):
        nnHarmonyTrainer(plans, "3d_fullres", 0, {"labels": {"background": 0, "a": 1}}, torch_device())


def torch_device():
    import torch

    return torch.device("cpu")


def test_val_best_validates_the_best_checkpoint(quick_model, synthetic_collection, monkeypatch):
    """--val --val_best: the final validation runs again, on checkpoint_best.pth (loaded by the safe loader)."""
    from nnharmony.trainers import run

    loaded = []
    original = run._load_checkpoint
    monkeypatch.setattr(run, "_load_checkpoint", lambda t, f: (loaded.append(Path(f).name), original(t, f))[1])
    fold = quick_model / "fold_0"
    member = synthetic_collection["spec"].members[0].dataset_name
    before = (fold / "validation" / member / "summary.json").stat().st_mtime_ns
    train_cli.main(["900", "3d_fullres", "0", "-device", "cpu", "--val", "--val_best"])
    assert loaded == ["checkpoint_final.pth", "checkpoint_best.pth"]
    assert (fold / "validation" / member / "summary.json").stat().st_mtime_ns > before
