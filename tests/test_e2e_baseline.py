"""Whole path on the built-in synthetic collection, on CPU: plan -> train a few iterations -> predict a folder
-> evaluate; checks files, geometry and label values, not only exit codes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnharmony.cli import evaluate as evaluate_cli
from nnharmony.cli import predict as predict_cli
from nnharmony.cli import train as train_cli

QUICK = ["-device", "cpu", "--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations-per-epoch", "1"]


def train(collection, trainer, *extra):
    train_cli.main([collection["name"], "3d_fullres", "0", "-tr", trainer, *QUICK, *extra])
    return Path(collection["nnUNet_results"]) / collection["name"] / f"{trainer}__nnHarmonyPlans__3d_fullres"


def validation_cases(collection, member_index: int) -> list[str]:
    from nnharmony.data.splits import collection_fold

    return collection_fold(collection["spec"], 0, "3d_fullres")[member_index][1]


def make_input_folder(collection, member_index: int, dest: Path) -> list[str]:
    """Copy a member's validation images (raw, nnU-Net naming) into ``dest``."""
    raw = collection["raw_folders"][member_index]
    cases = validation_cases(collection, member_index)
    dest.mkdir(parents=True, exist_ok=True)
    for c in cases:
        for f in (raw / "imagesTr").glob(f"{c}_*.nii.gz"):
            shutil.copy(f, dest / f.name)
    return cases


@pytest.fixture(scope="module")
def baseline_model(synthetic_collection):
    return train(synthetic_collection, "nnHarmonyTrainer")


def test_training_outputs(baseline_model, synthetic_collection):
    fold = baseline_model / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "progress.png").is_file()
    ckpt = torch.load(fold / "checkpoint_final.pth", weights_only=True)  # no pickled code needed
    assert ckpt["trainer_name"] == "nnHarmonyTrainer"
    assert ckpt["nnharmony"]["tasks"] == synthetic_collection["spec"].tasks
    for m in synthetic_collection["spec"].members:
        summary = json.loads((fold / "validation" / m.dataset_name / "summary.json").read_text())
        labels = {str(v) for t in m.tasks for v in ([t.values[0]] if len(t.values) == 1 else [tuple(t.values)])}
        assert "mean" in summary and len(summary["mean"]) == len(m.tasks), (m.dataset_name, summary["mean"].keys(), labels)


@pytest.mark.parametrize("member_index", [0, 1])
def test_predict_folder_and_evaluate(baseline_model, synthetic_collection, tmp_path, member_index):
    spec = synthetic_collection["spec"]
    m = spec.members[member_index]
    inp, out = tmp_path / "in", tmp_path / "out"
    cases = make_input_folder(synthetic_collection, member_index, inp)
    predict_cli.main(["-i", str(inp), "-o", str(out), "-d", synthetic_collection["name"], "-tr", "nnHarmonyTrainer",
                      "--member", str(m.dataset_id), "-device", "cpu", "--disable_tta"])
    allowed = {0} | {v for t in m.tasks for v in t.values}
    for c in cases:
        pred = sitk.ReadImage(str(out / f"{c}.nii.gz"))
        img = sitk.ReadImage(str(inp / f"{c}_0000.nii.gz"))
        assert pred.GetSize() == img.GetSize()
        assert np.allclose(pred.GetSpacing(), img.GetSpacing()) and np.allclose(pred.GetOrigin(), img.GetOrigin())
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= allowed
    evaluate_cli.main(["-ref", str(synthetic_collection["raw_folders"][member_index] / "labelsTr"), "-pred", str(out),
                       "-d", str(m.dataset_id), "-o", str(tmp_path / "eval")])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == len(cases)
    assert (tmp_path / "eval" / "results.md").is_file() and (tmp_path / "eval" / "results.csv").is_file()


def test_predict_only_some_tasks(baseline_model, synthetic_collection, tmp_path):
    spec = synthetic_collection["spec"]
    m = spec.members[0]
    keep = m.tasks[0]
    inp, out = tmp_path / "in", tmp_path / "out"
    cases = make_input_folder(synthetic_collection, 0, inp)
    predict_cli.main(["-i", str(inp), "-o", str(out), "-d", synthetic_collection["name"], "--member",
                      str(m.dataset_id), "-device", "cpu", "--disable_tta", "--tasks", keep.task])
    for c in cases:
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{c}.nii.gz")))).tolist())
        assert values <= {0, *keep.values}


def test_bad_inputs(baseline_model, synthetic_collection, tmp_path, capsys):
    name = synthetic_collection["name"]
    spec = synthetic_collection["spec"]
    with pytest.raises(SystemExit):
        train_cli.main([name, "3d_fullres", "0", "-tr", "nnHarmonyTrainr", *QUICK])
    assert "Close matches: nnHarmonyTrainer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(["Collection999_Missing", "3d_fullres", "0", *QUICK])
    assert "was not planned" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        predict_cli.main(["-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "-d", name, "--member",
                          str(spec.members[0].dataset_id), "-device", "cpu"])
    assert "no '*.nii.gz' images found" in capsys.readouterr().err
    # a two-channel member's images given as a one-channel member's
    two = next(i for i, m in enumerate(spec.members) if len(m.channels) == 2)
    one = next(i for i, m in enumerate(spec.members) if len(m.channels) == 1)
    make_input_folder(synthetic_collection, two, tmp_path / "two")
    with pytest.raises(SystemExit):
        predict_cli.main(["-i", str(tmp_path / "two"), "-o", str(tmp_path / "o"), "-d", name, "--member",
                          str(spec.members[one].dataset_id), "-device", "cpu"])
    assert "expects 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_cli.main(["-i", str(tmp_path / "two"), "-o", str(tmp_path / "o"), "-d", name, "--member", "auto",
                          "-device", "cpu"])
    assert "cannot infer the dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_cli.main(["-i", str(tmp_path / "two"), "-o", str(tmp_path / "o"), "-d", name, "-tr", "nnUNetTrainer",
                          "-device", "cpu"])
    assert "predict them with nnUNetv2_predict" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.nii.gz"))


def test_checkpoint_of_other_trainer_is_refused(baseline_model, synthetic_collection, tmp_path):
    from nnharmony.records.model_folder import load_checkpoint_file

    ckpt = baseline_model / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(ValueError, match="checkpoint of trainer 'nnHarmonyTrainer', not 'SeparateHeadsTrainer'"):
        load_checkpoint_file(ckpt, expected_trainer="SeparateHeadsTrainer")
    other = json.loads(json.dumps(synthetic_collection["spec"].to_dict()))
    other["name"] = "Collection901_Other"
    other["tasks"] = other["tasks"][::-1]
    from nnharmony.data.collection import CollectionSpec

    with pytest.raises(ValueError, match="checkpoint of collection 'Collection900_Synth'"):
        load_checkpoint_file(ckpt, expected_collection=CollectionSpec.from_dict(other))
    torch.save({"x": np.zeros(2)}, tmp_path / "pickled.pth")  # needs numpy's array global: refused by weights_only
    with pytest.raises(ValueError, match="not a loadable nnharmony checkpoint.*global numpy"):
        load_checkpoint_file(tmp_path / "pickled.pth")
    torch.save({"x": np.float64(1.0)}, tmp_path / "scalar.pth")  # numpy scalars (nnU-Net's logs) are allowed
    with pytest.raises(ValueError, match="not an nnharmony checkpoint"):
        load_checkpoint_file(tmp_path / "scalar.pth")
