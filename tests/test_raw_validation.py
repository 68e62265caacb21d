"""Validation of raw datasets (issue point 6): every bad input gives a clear error naming dataset, file, problem."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnharmony.data.collection import CollectionError
from nnharmony.dataset_conversion.validation import (
    validate_collection_inputs,
    validate_members_compatible,
    validate_raw_dataset,
)


# ---------------------------------------------------------------------------------------------- helpers
def _img(a: np.ndarray, spacing=(1.0, 1.0, 2.0), origin=None, direction=None) -> sitk.Image:
    im = sitk.GetImageFromArray(a)
    im.SetSpacing(spacing[: a.ndim])
    if origin is not None:
        im.SetOrigin(origin)
    if direction is not None:
        im.SetDirection(direction)
    return im


def make_dataset(root: Path, did: int = 1, name: str = "Tiny", n_cases: int = 2, channels=("CT",),
                 shape=(5, 6, 7), labels=None) -> Path:
    """A tiny valid nnU-Net raw dataset."""
    labels = labels or {"background": 0, "organ": 1, "tumor": 2}
    folder = root / f"Dataset{did:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(did)
    for i in range(n_cases):
        case = f"case_{i:03d}"
        for c in range(len(channels)):
            sitk.WriteImage(_img(rng.normal(size=shape).astype(np.float32)),
                            str(folder / "imagesTr" / f"{case}_{c:04d}.nii.gz"))
        lab = np.zeros(shape, np.uint8)
        lab[..., 1:3, 1:4, 1:4] = 1
        lab[..., min(2, shape[0] - 1), 2, 2] = 2
        sitk.WriteImage(_img(lab), str(folder / "labelsTr" / f"{case}.nii.gz"))
    dj = {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": labels,
          "numTraining": n_cases, "file_ending": ".nii.gz", "name": name}
    (folder / "dataset.json").write_text(json.dumps(dj))
    return folder


def _edit_json(folder: Path, **changes) -> None:
    dj = json.loads((folder / "dataset.json").read_text())
    for k, v in changes.items():
        if v is None:
            dj.pop(k, None)
        else:
            dj[k] = v
    (folder / "dataset.json").write_text(json.dumps(dj))


def _rewrite(path: Path, fn) -> None:
    im = sitk.ReadImage(str(path))
    out = fn(im)
    sitk.WriteImage(out, str(path))


@pytest.fixture
def raw(tmp_path, monkeypatch):
    root = tmp_path / "nnUNet_raw"
    root.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(root))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    return root


# ---------------------------------------------------------------------------------------------- valid input
def test_valid_dataset_passes_by_id_name_and_folder(raw):
    folder = make_dataset(raw, 1)
    validate_raw_dataset(1)
    validate_raw_dataset("Dataset001_Tiny")
    validate_raw_dataset(folder)
    validate_raw_dataset(folder, check_images=False)
    validate_raw_dataset(folder, num_processes=2)


def test_multichannel_and_ignore_and_regions_are_accepted(raw):
    make_dataset(raw, 2, channels=("T1", "T2"))
    validate_raw_dataset(2)
    make_dataset(raw, 3, labels={"background": 0, "whole": [1, 2], "core": 2}, name="Regions")
    _edit_json(raw / "Dataset003_Regions", regions_class_order=[1, 2])
    validate_raw_dataset(3)
    make_dataset(raw, 4, labels={"background": 0, "organ": 1, "tumor": 2, "ignore": 3}, name="Ign")
    validate_raw_dataset(4)


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_dataset_id(raw):
    make_dataset(raw, 1)
    with pytest.raises(CollectionError, match=r"unknown dataset id 999.*Dataset999_\*"):
        validate_raw_dataset(999)
    with pytest.raises(CollectionError, match="unknown dataset id"):
        validate_raw_dataset("Dataset007_Nope")


def test_missing_dataset_json(raw):
    folder = make_dataset(raw, 1)
    (folder / "dataset.json").unlink()
    with pytest.raises(CollectionError, match=r"Dataset001_Tiny: missing dataset.json"):
        validate_raw_dataset(1)


def test_invalid_dataset_json(raw):
    folder = make_dataset(raw, 1)
    (folder / "dataset.json").write_text("{not json")
    with pytest.raises(CollectionError, match=r"Dataset001_Tiny: dataset.json: invalid JSON"):
        validate_raw_dataset(1)


@pytest.mark.parametrize("key", ["labels", "numTraining", "file_ending", "channel_names"])
def test_dataset_json_missing_required_key(raw, key):
    folder = make_dataset(raw, 1)
    _edit_json(folder, **{key: None})
    with pytest.raises(CollectionError, match=rf"Dataset001_Tiny: dataset.json: required key\(s\) \['{key}'\] missing"):
        validate_raw_dataset(1)


@pytest.mark.parametrize("channels", [{"0": ""}, {"0": "CT", "1": "  "}, {"0": None}])
def test_channel_without_modality_name(raw, channels):
    folder = make_dataset(raw, 1, channels=("CT", "PET") if len(channels) == 2 else ("CT",))
    _edit_json(folder, channel_names=channels)
    bad = [k for k, v in channels.items() if not (v or "").strip()][0]
    with pytest.raises(CollectionError, match=rf"Dataset001_Tiny: dataset.json: channel {bad} has no modality name"):
        validate_raw_dataset(1)


def test_bad_labels_declaration(raw):
    folder = make_dataset(raw, 1)
    _edit_json(folder, labels={"background": 0, "organ": 1, "tumor": 3})
    with pytest.raises(CollectionError, match=r"label values must be consecutive.*\[0, 1, 3\]"):
        validate_raw_dataset(1)
    _edit_json(folder, labels={"organ": 1, "tumor": 2})
    with pytest.raises(CollectionError, match=r"must declare \"background\": 0"):
        validate_raw_dataset(1)
    _edit_json(folder, labels={"background": 0, "organ": 1.5})
    with pytest.raises(CollectionError, match=r"label 'organ' has invalid value 1.5"):
        validate_raw_dataset(1)


def test_num_training_mismatch(raw):
    folder = make_dataset(raw, 1)
    _edit_json(folder, numTraining=5)
    with pytest.raises(CollectionError, match=r"Dataset001_Tiny: dataset.json numTraining = 5 but 2"):
        validate_raw_dataset(1)


def test_missing_and_stray_files(raw):
    folder = make_dataset(raw, 1, channels=("T1", "T2"))
    (folder / "imagesTr" / "case_001_0001.nii.gz").unlink()
    (folder / "labelsTr" / "case_000.nii.gz").rename(folder / "labelsTr" / "other.nii.gz")
    (folder / "imagesTr" / "notes.txt").write_text("x")
    with pytest.raises(CollectionError) as ei:
        validate_raw_dataset(1)
    msg = str(ei.value)
    assert "Dataset001_Tiny" in msg
    assert "imagesTr/case_001_0001.nii.gz: missing" in msg
    assert "imagesTr/case_000_*.nii.gz: image(s) without a label file labelsTr/case_000.nii.gz" in msg
    assert "imagesTr/notes.txt: not named CASE_XXXX.nii.gz" in msg
    assert "imagesTr/other_0000.nii.gz: missing" in msg  # label without images


def test_undeclared_channel_file(raw):
    folder = make_dataset(raw, 1)
    (folder / "imagesTr" / "case_000_0000.nii.gz").rename(folder / "imagesTr" / "case_000_0000.nii.gz")
    import shutil

    shutil.copy(folder / "imagesTr" / "case_000_0000.nii.gz", folder / "imagesTr" / "case_000_0001.nii.gz")
    with pytest.raises(CollectionError, match=r"imagesTr/case_000_0001.nii.gz: channel 1 is not declared"):
        validate_raw_dataset(1)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda im: _img(np.zeros((5, 6, 8), np.uint8), im.GetSpacing()), r"shape \(x, y, z\) \(8, 6, 5\) != \(7, 6, 5\)"),
        (lambda im: _img(sitk.GetArrayFromImage(im), (1.0, 1.0, 3.0)), r"spacing \(1, 1, 3\) != \(1, 1, 2\)"),
        (lambda im: _img(sitk.GetArrayFromImage(im), im.GetSpacing(), origin=(0.0, 0.0, 5.0)), r"origin \(0, 0, 5\)"),
        (lambda im: _img(sitk.GetArrayFromImage(im), im.GetSpacing(), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1.0)),
         r"direction \(-1, 0, 0"),
    ],
    ids=["shape", "spacing", "origin", "direction"],
)
def test_image_label_geometry_mismatch(raw, change, expected):
    folder = make_dataset(raw, 1)
    _rewrite(folder / "labelsTr" / "case_001.nii.gz", change)
    with pytest.raises(CollectionError) as ei:
        validate_raw_dataset(1, check_images=False)
    msg = str(ei.value)
    assert "Dataset001_Tiny" in msg and "1 problem(s)" in msg
    assert "labelsTr/case_001.nii.gz: geometry mismatch with imagesTr/case_001_0000.nii.gz" in msg
    assert __import__("re").search(expected, msg), msg


def test_channel_geometry_mismatch(raw):
    folder = make_dataset(raw, 1, channels=("T1", "T2"))
    _rewrite(folder / "imagesTr" / "case_000_0001.nii.gz",
             lambda im: _img(sitk.GetArrayFromImage(im), (1.0, 1.0, 2.5)))
    with pytest.raises(CollectionError, match=r"imagesTr/case_000_0001.nii.gz: geometry mismatch .* spacing"):
        validate_raw_dataset(1)


def test_tiny_geometry_differences_are_tolerated(raw):
    folder = make_dataset(raw, 1)
    _rewrite(folder / "labelsTr" / "case_000.nii.gz",
             lambda im: _img(sitk.GetArrayFromImage(im), (1.0000001, 1.0, 2.0), origin=(1e-5, 0.0, 0.0)))
    validate_raw_dataset(1)


def test_label_values_not_declared(raw):
    folder = make_dataset(raw, 1)
    _rewrite(folder / "labelsTr" / "case_001.nii.gz",
             lambda im: _img(np.where(sitk.GetArrayFromImage(im) == 2, 7, sitk.GetArrayFromImage(im)).astype(np.uint8)))
    with pytest.raises(CollectionError) as ei:
        validate_raw_dataset(1)
    msg = str(ei.value)
    assert "Dataset001_Tiny" in msg
    assert "labelsTr/case_001.nii.gz: label value(s) [7] not declared in dataset.json 'labels' (declared: 0, 1, 2)" in msg
    validate_raw_dataset(1, check_images=False)  # headers alone cannot see it


def test_non_integer_label_values(raw):
    folder = make_dataset(raw, 1)
    _rewrite(folder / "labelsTr" / "case_000.nii.gz",
             lambda im: _img(sitk.GetArrayFromImage(im).astype(np.float32) * 0.5))
    with pytest.raises(CollectionError, match=r"labelsTr/case_000.nii.gz: label map has non-integer value\(s\) \[0.5\]"):
        validate_raw_dataset(1)


def test_float_labels_with_integral_values_pass(raw):
    folder = make_dataset(raw, 1)
    _rewrite(folder / "labelsTr" / "case_000.nii.gz", lambda im: _img(sitk.GetArrayFromImage(im).astype(np.float32)))
    validate_raw_dataset(1)


@pytest.mark.parametrize("bad, word", [(np.nan, "1 NaN and 0 Inf"), (np.inf, "0 NaN and 1 Inf")])
def test_nan_inf_in_images(raw, bad, word):
    folder = make_dataset(raw, 1)

    def poison(im):
        a = sitk.GetArrayFromImage(im)
        a[0, 0, 0] = bad
        return _img(a)

    _rewrite(folder / "imagesTr" / "case_001_0000.nii.gz", poison)
    with pytest.raises(CollectionError) as ei:
        validate_raw_dataset(1)
    assert f"imagesTr/case_001_0000.nii.gz: image contains {word} voxel(s)" in str(ei.value)
    assert "Dataset001_Tiny" in str(ei.value)


def test_unreadable_file(raw):
    folder = make_dataset(raw, 1)
    (folder / "imagesTr" / "case_000_0000.nii.gz").write_bytes(b"garbage")
    with pytest.raises(CollectionError, match=r"imagesTr/case_000_0000.nii.gz: cannot be read by SimpleITK"):
        validate_raw_dataset(1)


def test_mixed_dimensionality_within_dataset(raw):
    folder = make_dataset(raw, 1, shape=(4, 6, 7))
    for p in (folder / "imagesTr" / "case_001_0000.nii.gz", folder / "labelsTr" / "case_001.nii.gz"):
        _rewrite(p, lambda im: _img(sitk.GetArrayFromImage(im)[0], (1.0, 1.0)))
    with pytest.raises(CollectionError, match=r"cases of different dimensionality: 2D \(e.g. case 'case_001'\), 3D"):
        validate_raw_dataset(1)


def test_members_of_different_dimensionality(raw):
    make_dataset(raw, 1, name="Vol", shape=(4, 6, 7))
    flat = make_dataset(raw, 2, name="Flat", shape=(1, 6, 7))  # 3D NIfTI with one slice = nnU-Net 2D data
    validate_raw_dataset(2)
    validate_members_compatible([1])
    with pytest.raises(CollectionError) as ei:
        validate_members_compatible([1, 2])
    msg = str(ei.value)
    assert "members of different dimensionality" in msg
    assert "2D: Dataset002_Flat" in msg and "3D: Dataset001_Vol" in msg
    with pytest.raises(CollectionError, match="different dimensionality"):
        validate_collection_inputs([1, flat])


def test_members_of_different_dimensionality_in_2d(raw):
    """2D and 3D members plan together in the 2d configuration only; 2D members have no 3D configuration."""
    make_dataset(raw, 1, name="Vol", shape=(4, 6, 7))
    make_dataset(raw, 2, name="Flat", shape=(1, 6, 7))
    validate_members_compatible([1, 2], configurations=["2d"])
    validate_collection_inputs([1, 2], configurations=["2d"])
    with pytest.raises(CollectionError, match=r"only be planned together with -c 2d .*for 3d_fullres, make a "
                                              r"collection of the 3D members only"):
        validate_members_compatible([1, 2], configurations=["2d", "3d_fullres"])
    with pytest.raises(CollectionError, match=r"2D datasets \(Dataset002_Flat\) have no '3d_lowres' configuration"):
        validate_members_compatible([2], configurations=["3d_lowres"])
    validate_members_compatible([1], configurations=["3d_fullres", "2d"])


def test_case_groups_checked(raw):
    folder = make_dataset(raw, 1, n_cases=3)
    _edit_json(folder, case_groups=r"^case_(?P<group>00[01])")
    with pytest.raises(CollectionError, match=r"'case_groups' gives no group to 1 case\(s\), e.g. \['case_002'\]"):
        validate_raw_dataset(1)
    _edit_json(folder, case_groups="^case_(")
    with pytest.raises(CollectionError, match="'case_groups' '\\^case_\\(' is not a valid regular expression"):
        validate_raw_dataset(1)
    _edit_json(folder, case_groups={"case_000": "p1", "case_001": "p1", "case_002": "p2"})
    validate_raw_dataset(1)


def test_notes_on_2d_datasets(raw):
    from nnharmony.dataset_conversion.validation import dataset_notes

    assert dataset_notes(make_dataset(raw, 1)) == []
    folder = make_dataset(raw, 2, name="Flat", shape=(1, 6, 7))
    _rewrite(folder / "imagesTr" / "case_001_0000.nii.gz", lambda im: _img(np.zeros((1, 8, 7), np.float32)))
    _rewrite(folder / "labelsTr" / "case_001.nii.gz", lambda im: _img(np.zeros((1, 8, 7), np.uint8)))
    validate_raw_dataset(2)  # sizes may differ between cases
    notes = dataset_notes(2)
    assert notes[0] == "Dataset002_Flat: 2D dataset (2 cases); plan it with -c 2d"
    assert "2D images of 2 different sizes (width 7-7, height 6-8 px): allowed" in notes[1]


def test_validate_collection_inputs(raw):
    make_dataset(raw, 1)
    make_dataset(raw, 2, name="Two", channels=("T1", "T2"))
    folders = validate_collection_inputs([1, "Dataset002_Two"])
    assert [f.name for f in folders] == ["Dataset001_Tiny", "Dataset002_Two"]
    with pytest.raises(CollectionError, match="listed twice"):
        validate_collection_inputs([1, "Dataset001_Tiny"])
    with pytest.raises(CollectionError, match="unknown dataset id 3"):
        validate_collection_inputs([1, 3])


def test_collection_name_taken_with_different_members(raw, tmp_path):
    from nnharmony.data.collection import build_collection_spec
    from nnharmony.planners.plan_and_preprocess import plan_and_preprocess_collection

    for did, name in ((1, "Tiny"), (2, "B"), (3, "C")):
        make_dataset(raw, did, name=name)
    spec_dir = tmp_path / "pre" / "Collection900_X"
    build_collection_spec("Collection900_X", [1, 2]).save(spec_dir / "collection.json")
    before = sorted(p.name for p in spec_dir.iterdir())
    with pytest.raises(CollectionError) as ei:
        plan_and_preprocess_collection([1, 3], "Collection900_X", ["3d_fullres"])
    msg = str(ei.value)
    assert "collection Collection900_X already exists" in msg and "[1, 2], not [1, 3]" in msg and "--clean" in msg
    assert sorted(p.name for p in spec_dir.iterdir()) == before  # refused before anything was written
    assert not (tmp_path / "pre" / "Dataset001_Tiny").exists()  # and before any member was planned


# ---------------------------------------------------------------------------------------------- nnU-Net agrees
class _SerialPool:
    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def starmap(self, fn, it):
        return [fn(*args) for args in it]


class _SerialMP:
    @staticmethod
    def get_context(_):
        return type("Ctx", (), {"Pool": _SerialPool})


def verify_in_process(monkeypatch, folder: Path) -> None:
    """nnU-Net's verify_dataset_integrity, run in this process (its spawn pool costs seconds per call)."""
    import nnunetv2.experiment_planning.verify_dataset_integrity as vdi

    monkeypatch.setattr(vdi, "multiprocessing", _SerialMP)
    vdi.verify_dataset_integrity(str(folder), 1)


def test_nnunet_verify_agrees_on_valid_dataset(raw, monkeypatch):
    folder = make_dataset(raw, 1, channels=("T1", "T2"))
    validate_raw_dataset(folder)
    verify_in_process(monkeypatch, folder)
