"""Real data from ``../shared/data`` (issue 15), imported as a user would: ``nnharmony_convert`` -> validation ->
``nnharmony_plan_and_preprocess`` -> a few training iterations -> ``nnharmony_predict`` -> ``nnharmony_evaluate``.

Marked ``realdata`` and skipped with a reason where ``../shared/data`` is absent. The default run imports a few
cases only: a 2D PNG dataset (WBC microscopy, images of different sizes) end to end, the 3D hippocampus end to
end, the plain cardiac folder (label values 200/500/600), BTCV's grouped (per-patient) split and the 2D/3D mixing
rule. ``-m slow`` adds every shared folder: full import + validation, and planning on a few cases.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, shared_data

pytestmark = pytest.mark.realdata
QUICK_TRAIN = ["-device", "cpu", "--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations-per-epoch", "1"]


def _import_all():
    """``benchmarks/real_data/import_all.py``: the one list of shared datasets and their import commands."""
    spec = importlib.util.spec_from_file_location("import_all", REPO / "benchmarks" / "real_data" / "import_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("import_all", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


IMPORTS = _import_all()


def dataset(dataset_id: int):
    return next(d for d in IMPORTS.DATASETS if d.dataset_id == dataset_id)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Fresh $nnUNet_raw/_preprocessed/_results for this module (restored afterwards)."""
    shared_data()
    root = tmp_path_factory.mktemp("realdata")
    new = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    old = {k: os.environ.get(k) for k in new}
    for k, v in new.items():
        v.mkdir()
        os.environ[k] = str(v)
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    yield {k: Path(v) for k, v in new.items()} | {"root": root}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def cli(main, argv: list[str]) -> None:
    """Run a command-line entry point in this process; fail with its message on a non-zero exit."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc in (0, None), f"{main.__module__} {' '.join(argv)}: exit {rc}"


def import_cases(env, dataset_id: int, max_cases: int) -> Path:
    IMPORTS.import_dataset(dataset(dataset_id), shared_data(), env["nnUNet_raw"], max_cases)
    return next(env["nnUNet_raw"].glob(f"Dataset{dataset_id:03d}_*"))


def val_cases(name: str, configuration: str) -> list[str]:
    from nnharmony.data.collection import CollectionSpec
    from nnharmony.data.splits import collection_fold
    from nnharmony.paths import collection_spec_path

    spec = CollectionSpec.load(collection_spec_path(name))
    return collection_fold(spec, 0, configuration)[0][1]


def plan_train_predict_evaluate(raw: Path, collection: str, configuration: str, tmp: Path) -> dict:
    """The user's path on one imported dataset; returns the evaluation summary."""
    from nnharmony.cli import evaluate as evaluate_cli
    from nnharmony.cli import plan_and_preprocess as plan_cli
    from nnharmony.cli import predict as predict_cli
    from nnharmony.cli import train as train_cli

    did = raw.name[len("Dataset"):].split("_")[0]
    dj = json.loads((raw / "dataset.json").read_text())
    fe = dj["file_ending"]
    cli(plan_cli.main, ["-d", did, "-n", collection, "-c", configuration, "-np", "1"])
    cli(train_cli.main, [collection, configuration, "0", "-tr", "nnHarmonyTrainer", *QUICK_TRAIN])
    inp = tmp / "in"
    inp.mkdir()
    case = val_cases(collection, configuration)[0]
    for f in (raw / "imagesTr").glob(f"{case}_*{fe}"):
        os.symlink(f, inp / f.name)
    cli(predict_cli.main, ["-i", str(inp), "-o", str(tmp / "pred"), "-c", collection, "-tr", "nnHarmonyTrainer",
                           "-cfg", configuration, "-f", "0", "--dataset", did, "-device", "cpu", "--disable_tta"])
    pred, ref = tmp / "pred" / f"{case}{fe}", raw / "labelsTr" / f"{case}{fe}"
    p, r = sitk.ReadImage(str(pred)), sitk.ReadImage(str(ref))
    assert p.GetSize() == r.GetSize(), "prediction not on the input's grid"
    assert set(np.unique(sitk.GetArrayFromImage(p)).tolist()) <= set(dj["labels"].values())
    cli(evaluate_cli.main, ["-ref", str(raw / "labelsTr"), "-pred", str(tmp / "pred"), "-d", did,
                            "--nsd-tolerance", "1", "-o", str(tmp / "eval"), "-np", "1"])
    assert (tmp / "eval" / "results.csv").is_file()
    return json.loads((tmp / "eval" / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------- cheap checks
def test_plain_cardiac_folder_maps_200_500_600_to_consecutive_labels(env):
    from nnharmony.dataset_conversion.validation import validate_raw_dataset

    raw = import_cases(env, 921, 3)
    dj = json.loads((raw / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "LV myocardium": 1, "LV blood pool": 2, "RV": 3}  # names kept
    assert dj["channel_names"] == {"0": "bSSFP"}
    assert dj["nnharmony_conversion"]["label_source_values"] == {
        "LV myocardium": [200], "LV blood pool": [500], "RV": [600]}
    for lab in (raw / "labelsTr").glob("*.nii.gz"):
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))).tolist()) <= {0, 1, 2, 3}
    validate_raw_dataset(raw)


def test_plain_png_folder_stays_png(env, tmp_path):
    """WBC masks as their source stored them (0/128/255) in a plain folder: PNG in, PNG out, values 0/1/2."""
    from nnharmony.cli import convert as convert_cli

    data = shared_data("wbc_source1_microscopy")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for lab in sorted((data / "labelsTr").glob("*.png"))[:3]:
        os.symlink(data / "imagesTr" / f"{lab.stem}_0000.png", images / f"{lab.stem}.png")
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))
        sitk.WriteImage(sitk.GetImageFromArray(np.array([0, 128, 255], np.uint8)[a]), str(labels / lab.name))
    (tmp_path / "labels.json").write_text(json.dumps({"cytoplasm": 128, "nucleus": 255}))
    cli(convert_cli.main, ["folder", "-i", str(images), "-l", str(labels), "-d", "962", "-n", "WBCPlain",
                           "-m", "microscopy", "--labels-json", str(tmp_path / "labels.json")])
    raw = env["nnUNet_raw"] / "Dataset962_WBCPlain"
    dj = json.loads((raw / "dataset.json").read_text())
    assert dj["file_ending"] == ".png" and dj["labels"] == {"background": 0, "cytoplasm": 1, "nucleus": 2}
    assert sorted(f.name for f in (raw / "imagesTr").iterdir()) == [f"{f.stem}_0000.png" for f in sorted(
        labels.iterdir())]
    for lab in (raw / "labelsTr").iterdir():
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))).tolist()) <= {0, 1, 2}


def test_btcv_slices_are_split_by_patient(env):
    from nnharmony.data.splits import ensure_member_splits

    raw = import_cases(env, 931, 24)  # 24 slices spread over the 30 patients, several of them from one patient
    dj = json.loads((raw / "dataset.json").read_text())
    patient = {c: re.match(r"btcv_(\d+)_", c).group(1) for c in
               (f.name[: -len(".png")] for f in (raw / "labelsTr").glob("*.png"))}
    assert len(set(patient.values())) < len(patient), "the subset should hold several slices of one patient"
    assert dj["case_groups"]
    splits = ensure_member_splits(raw.name)
    assert sorted(c for s in splits for c in s["val"]) == sorted(patient)  # every slice validated once
    for s in splits:
        assert not {patient[c] for c in s["train"]} & {patient[c] for c in s["val"]}, "a patient on both sides"
    assert (env["nnUNet_preprocessed"] / raw.name / "splits_final.json").is_file()


def test_mixing_2d_and_3d_members_needs_the_2d_configuration(env):
    from nnharmony.data.collection import CollectionError
    from nnharmony.dataset_conversion.validation import validate_members_compatible

    png, vol = import_cases(env, 935, 2), import_cases(env, 929, 1)  # DRIVE (2D PNG), spinal cord T2* (3D)
    validate_members_compatible([png, vol], configurations=["2d"])
    with pytest.raises(CollectionError, match=r"can only be planned together with -c 2d.*3d_fullres") as e:
        validate_members_compatible([png, vol], configurations=["2d", "3d_fullres"])
    assert "2D: Dataset935_DRIVE" in str(e.value) and "3D: Dataset929_SpinalCordT2star" in str(e.value)
    with pytest.raises(CollectionError, match="have no '3d_fullres' configuration; plan them with -c 2d"):
        validate_members_compatible([png], configurations=["3d_fullres"])


# ---------------------------------------------------------------------------------------------- end to end
def test_png_dataset_end_to_end(env, tmp_path):
    """WBC microscopy (site 1, 88-120 px images of different sizes): PNG in, 2d configuration, PNG out."""
    raw = import_cases(env, 932, 5)
    summary = plan_train_predict_evaluate(raw, "Collection960_RealPNG", "2d", tmp_path)
    assert set(summary["labels"]) == {"cytoplasm", "nucleus"}
    assert all(c["prediction_file"].endswith(".png") for c in summary["metric_per_case"])


def test_3d_dataset_end_to_end(env, tmp_path):
    """Hippocampus (T1 MRI, float32 and uint8 images in one dataset): 3d_fullres."""
    raw = import_cases(env, 923, 5)
    summary = plan_train_predict_evaluate(raw, "Collection961_RealHippo", "3d_fullres", tmp_path)
    assert set(summary["labels"]) == {"Anterior", "Posterior"}
    assert "NSD" in summary["foreground_mean"]


# ---------------------------------------------------------------------------------------------- every folder
@pytest.mark.slow
@pytest.mark.parametrize("ds", IMPORTS.DATASETS, ids=lambda d: f"{d.dataset_id}_{d.folder.replace('/', '_')}")
def test_every_shared_folder_imports_validates_and_plans(ds, tmp_path, monkeypatch):
    """Full import and validation of the folder, then planning on a few of its cases (-c 2d for PNG data)."""
    from nnharmony.cli import plan_and_preprocess as plan_cli
    from nnharmony.dataset_conversion.validation import dataset_dimensionality, validate_raw_dataset

    root = shared_data()
    shared_data(ds.folder)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "small"):
        (tmp_path / k).mkdir()
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "nnUNet_raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    IMPORTS.import_dataset(ds, root, tmp_path / "nnUNet_raw")
    raw = next((tmp_path / "nnUNet_raw").glob(f"Dataset{ds.dataset_id:03d}_*"))
    validate_raw_dataset(raw, check_images=True)
    configuration = "2d" if dataset_dimensionality(raw) == 2 else "3d_fullres"
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "small"))
    IMPORTS.import_dataset(ds, root, tmp_path / "small", max_cases=5)
    cli(plan_cli.main, ["-d", str(ds.dataset_id), "-n", f"Collection{ds.dataset_id}_Plan", "-c", configuration,
                        "-np", "1"])
    assert (tmp_path / "nnUNet_preprocessed" / f"Collection{ds.dataset_id}_Plan" / "nnHarmonyPlans.json").is_file()
