"""Conversion into nnU-Net raw format (issue point 3) and its input checks (point 6), on data the tests create
and on the real data in ../shared/data."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnharmony.data.collection import CollectionError, build_collection_spec
from nnharmony.dataset_conversion.convert import (
    convert_msd,
    convert_plain_folder,
    import_nnunet_dataset,
    load_label_spec,
    split_by_site,
)
from nnharmony.dataset_conversion.validation import validate_raw_dataset

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"


# ---------------------------------------------------------------------------------------------- helpers
def _img(a, spacing=(0.8, 0.8, 2.5), origin=(10.0, -5.0, 3.0)) -> sitk.Image:
    im = sitk.GetImageFromArray(a, isVector=False)
    im.SetSpacing(spacing[: im.GetDimension()])
    im.SetOrigin(origin[: im.GetDimension()])
    return im


def _write(a, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(_img(a, **kw), str(path))
    return path


def _read(p: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(p)))


def _dj(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


def _label(shape=(4, 6, 7), values=(3, 7), dtype=np.uint8):
    lab = np.zeros(shape, dtype)
    lab[1:3, 1:3, 1:3] = values[0]
    if len(values) > 1:
        lab[1:3, 3:5, 3:6] = values[1]
    return lab


def plain_folder(root: Path, n=3, ext=".nrrd", channels=1, label_values=(3, 7), shape=(4, 6, 7)) -> tuple[Path, Path]:
    """images/caseK[_000C]EXT + labels/caseKEXT, labels with non-consecutive values."""
    rng = np.random.default_rng(0)
    for k in range(n):
        for c in range(channels):
            suffix = f"_{c:04d}" if channels > 1 else ""
            _write(rng.normal(100, 20, shape).astype(np.float32), root / "images" / f"case{k}{suffix}{ext}")
        _write(_label(shape, label_values), root / "labels" / f"case{k}{ext}")
    return root / "images", root / "labels"


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def raw(tmp_path, monkeypatch):
    root = tmp_path / "nnUNet_raw"
    root.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(root))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    return root


# ---------------------------------------------------------------------------------------------- label specs
def test_load_label_spec_formats(tmp_path):
    assert load_label_spec({"liver": 1, "kidney": [2, 3]}) == ({"background": [0], "liver": [1], "kidney": [2, 3]}, None)
    ts = tmp_path / "labels.json"
    ts.write_text(json.dumps({"modality": "CT", "labels": {"background": 0, "spleen": 1, "liver": 5}}))
    assert load_label_spec(ts) == ({"background": [0], "spleen": [1], "liver": [5]}, ["CT"])
    assert load_label_spec({"0": "background", "1": "Anterior", "2": "Posterior"})[0] == {
        "background": [0], "Anterior": [1], "Posterior": [2]}
    assert load_label_spec({"labels": {"a": 1}, "modalities": ["T1", "T2"]})[1] == ["T1", "T2"]
    with pytest.raises(CollectionError, match="source value 1 is declared for both 'a' and 'b'"):
        load_label_spec({"a": 1, "b": 1})
    with pytest.raises(CollectionError, match="invalid value 'x'"):
        load_label_spec({"a": "x"})
    with pytest.raises(CollectionError, match="file not found"):
        load_label_spec(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------- plain folder
def test_plain_folder_remaps_labels_and_records_mapping(raw, tmp_path):
    images, labels = plain_folder(tmp_path / "src")
    out = convert_plain_folder(images, labels, 40, "Plain", modalities=["CT"],
                               label_names={"organ": 3, "tumor": 7, "absent": 9})
    assert out == raw / "Dataset040_Plain"
    assert entries(raw) == ["Dataset040_Plain"]
    assert entries(out / "imagesTr") == [f"case{k}_0000.nii.gz" for k in range(3)]
    assert entries(out / "labelsTr") == [f"case{k}.nii.gz" for k in range(3)]
    dj = _dj(out)
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == {"background": 0, "organ": 1, "tumor": 2}  # 'absent' dropped (keep='present')
    assert dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    rec = dj["nnharmony_conversion"]
    assert rec["label_source_values"] == {"organ": [3], "tumor": [7]} and rec["dropped_labels"] == ["absent"]
    lab = sitk.ReadImage(str(out / "labelsTr" / "case0.nii.gz"))
    assert lab.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(lab), np.where(_label() == 3, 1, np.where(_label() == 7, 2, 0)))
    img = sitk.ReadImage(str(out / "imagesTr" / "case0_0000.nii.gz"))
    assert np.allclose(img.GetSpacing(), (0.8, 0.8, 2.5)) and np.allclose(lab.GetOrigin(), img.GetOrigin())
    validate_raw_dataset(40)


def test_plain_folder_keep_declared_and_merge_values(raw, tmp_path):
    images, labels = plain_folder(tmp_path / "src", n=2, ext=".mha")
    out = convert_plain_folder(images, labels, 41, "Declared", modalities=["MR"],
                               label_names={"absent": 1, "organ": [3, 7]}, keep="declared")
    assert _dj(out)["labels"] == {"background": 0, "absent": 1, "organ": 2}
    assert set(np.unique(_read(out / "labelsTr" / "case0.nii.gz"))) == {0, 2}


def test_plain_folder_multichannel_by_index_and_by_name(raw, tmp_path):
    images, labels = plain_folder(tmp_path / "a", n=2, channels=2, ext=".nii.gz")
    out = convert_plain_folder(images, labels, 42, "TwoCh", modalities=["T1", "T2"], label_names={"x": 3, "y": 7})
    assert _dj(out)["channel_names"] == {"0": "T1", "1": "T2"}
    assert entries(out / "imagesTr") == ["case0_0000.nii.gz", "case0_0001.nii.gz", "case1_0000.nii.gz",
                                         "case1_0001.nii.gz"]
    # channels named by modality, in one folder with the labels
    src = tmp_path / "b"
    rng = np.random.default_rng(1)
    for k in range(2):
        _write(rng.normal(size=(4, 6, 7)).astype(np.float32), src / f"p{k}_ADC.nii")
        _write(rng.normal(size=(4, 6, 7)).astype(np.float32), src / f"p{k}_T2w.nii")
        _write(_label(values=(1,)), src / f"p{k}_seg.nii")
    out = convert_plain_folder(src, src, 43, "Named", modalities=["T2w", "ADC"], label_names={"prostate": 1},
                               image_pattern=r"(?P<case>p\d)_(?P<channel>T2w|ADC)\.nii$",
                               label_pattern=r"(?P<case>p\d)_seg\.nii$")
    assert _dj(out)["channel_names"] == {"0": "T2w", "1": "ADC"}
    assert np.allclose(_read(out / "imagesTr" / "p1_0001.nii.gz"), _read(src / "p1_ADC.nii"))


def test_plain_file_lists_float_labels_and_case_ids(raw, tmp_path):
    img = _write(np.arange(4 * 6 * 7, dtype=np.int16).reshape(4, 6, 7), tmp_path / "scan.nii.gz")
    lab = _write(_label(values=(2, 5)).astype(np.float64), tmp_path / "scan_seg.nii.gz")
    out = convert_plain_folder([img], [lab], 44, "Lists", modalities=["T2"],
                               label_names={"cord": [2, 5]}, case_ids=["sub-01"])
    assert entries(out / "labelsTr") == ["sub-01.nii.gz"]
    assert _dj(out)["labels"] == {"background": 0, "cord": 1}
    l2 = sitk.ReadImage(str(out / "labelsTr" / "sub-01.nii.gz"))
    assert l2.GetPixelID() == sitk.sitkUInt8 and set(np.unique(sitk.GetArrayFromImage(l2))) == {0, 1}
    assert sitk.ReadImage(str(out / "imagesTr" / "sub-01_0000.nii.gz")).GetPixelID() == sitk.sitkInt16


def test_plain_folder_2d_png(raw, tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "lb").mkdir()
    for k in range(2):
        sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 9), 40 * k + 10, np.uint8)), str(tmp_path / "im" / f"s{k}.png"))
        sitk.WriteImage(sitk.GetImageFromArray((np.arange(72).reshape(8, 9) % 2).astype(np.uint8)),
                        str(tmp_path / "lb" / f"s{k}.png"))
    out = convert_plain_folder(tmp_path / "im", tmp_path / "lb", 45, "Flat", modalities=["photo"],
                               label_names={"odd": 1})
    assert json.loads((out / "dataset.json").read_text())["file_ending"] == ".png"  # PNG in, PNG out
    assert sitk.ReadImage(str(out / "imagesTr" / "s0_0000.png")).GetDimension() == 2
    assert sorted(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "s1.png"))))) == [0, 1]
    validate_raw_dataset(out)


# ---------------------------------------------------------------------------------------------- MSD
def make_msd_task(root: Path, name="Task05_Fake", n=2, modalities=("T2", "ADC"), test=1) -> Path:
    task = root / name
    rng = np.random.default_rng(2)
    training = []
    for k in range(n + test):
        vol = rng.normal(size=(len(modalities), 4, 6, 7)).astype(np.float32)
        if len(modalities) == 1:
            img = _img(vol[0])
        else:
            img = sitk.JoinSeries([_img(v) for v in vol])  # 4D, last axis = modality
        sub = "imagesTr" if k < n else "imagesTs"
        (task / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(task / sub / f"fake_{k:03d}.nii.gz"))
        if k < n:
            _write(_label(values=(1, 2)), task / "labelsTr" / f"fake_{k:03d}.nii.gz")
            training.append({"image": f"./imagesTr/fake_{k:03d}.nii.gz", "label": f"./labelsTr/fake_{k:03d}.nii.gz"})
    (task / "imagesTr" / "._fake_000.nii.gz").write_bytes(b"mac resource fork")  # as found in MSD tarballs
    (task / "dataset.json").write_text(json.dumps({
        "name": "Fake", "description": "fake task", "licence": "CC-BY-SA 4.0", "tensorImageSize": "4D",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": {"0": "background", "1": "peripheral", "2": "transition"},
        "numTraining": n, "numTest": test, "training": training,
        "test": [f"./imagesTs/fake_{k:03d}.nii.gz" for k in range(n, n + test)]}))
    return task


def test_convert_msd_splits_4d_and_translates_dataset_json(raw, tmp_path):
    task = make_msd_task(tmp_path)
    out = convert_msd(task)
    assert out == raw / "Dataset005_Fake"
    assert entries(out) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]
    assert entries(out / "imagesTr") == ["fake_000_0000.nii.gz", "fake_000_0001.nii.gz", "fake_001_0000.nii.gz",
                                         "fake_001_0001.nii.gz"]
    assert entries(out / "imagesTs") == ["fake_002_0000.nii.gz", "fake_002_0001.nii.gz"]
    dj = _dj(out)
    assert dj["channel_names"] == {"0": "T2", "1": "ADC"}
    assert dj["labels"] == {"background": 0, "peripheral": 1, "transition": 2}
    assert dj["numTraining"] == 2 and dj["licence" if "licence" in dj else "license"] == "CC-BY-SA 4.0"
    src = sitk.ReadImage(str(task / "imagesTr" / "fake_001.nii.gz"))
    ch1 = sitk.ReadImage(str(out / "imagesTr" / "fake_001_0001.nii.gz"))
    assert ch1.GetDimension() == 3 and np.allclose(ch1.GetSpacing(), src.GetSpacing()[:3])
    assert np.array_equal(sitk.GetArrayFromImage(ch1), sitk.GetArrayFromImage(src)[1])
    validate_raw_dataset(5)
    # explicit id and name
    out2 = convert_msd(task, 105, "FakeAgain", include_test=False)
    assert out2.name == "Dataset105_FakeAgain" and not (out2 / "imagesTs").exists()


def test_convert_msd_id_taken_refused_then_overwritten(raw, tmp_path):
    task = make_msd_task(tmp_path, modalities=("CT",), test=0)
    first = convert_msd(task)
    stamp = (first / "dataset.json").stat().st_mtime_ns
    with pytest.raises(CollectionError, match=r"dataset id 5 is already taken by Dataset005_Fake.*overwrite"):
        convert_msd(task)
    assert entries(raw) == ["Dataset005_Fake"] and (first / "dataset.json").stat().st_mtime_ns == stamp
    convert_msd(task, name="Other", overwrite=True)
    assert entries(raw) == ["Dataset005_Other"]


# ---------------------------------------------------------------------------------------------- nnU-Net import
def make_nnunet_folder(root: Path, labels=None, float_labels=True, n=3) -> Path:
    folder = root / "some_nnunet_copy"
    labels = labels or {"background": 0, "a": 1, "b": 2}
    vals = [v for k, v in labels.items() if k != "background"]
    for k in range(n):
        dtype = np.uint8 if k == 0 else np.float32  # mixed image dtypes, as in the real hippocampus copy
        _write((np.random.default_rng(k).random((4, 6, 7)) * 200).astype(dtype), folder / "imagesTr" / f"h_{k:03d}_0000.nii.gz")
        _write(_label(values=vals).astype(np.float32 if float_labels and k else np.uint8), folder / "labelsTr" / f"h_{k:03d}.nii.gz")
    _write(np.zeros((4, 6, 7), np.float32), folder / "imagesTs" / "h_900_0000.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": labels,
                                                     "numTraining": n, "file_ending": ".nii.gz", "name": "Hippo",
                                                     "reference": "somewhere"}))
    return folder


@pytest.mark.parametrize("link_mode", ["copy", "hardlink", "symlink"])
def test_import_nnunet_casts_labels_keeps_images(raw, tmp_path, link_mode):
    src = make_nnunet_folder(tmp_path)
    out = import_nnunet_dataset(src, 30, link_mode=link_mode, modalities=["T1"])
    assert out.name == "Dataset030_Hippo"
    dj = _dj(out)
    assert dj["labels"] == {"background": 0, "a": 1, "b": 2} and dj["reference"] == "somewhere"
    assert dj["channel_names"] == {"0": "T1"}
    assert dj["nnharmony_conversion"]["source_channel_names"] == ["MRI"]
    for k in range(3):
        lab = sitk.ReadImage(str(out / "labelsTr" / f"h_{k:03d}.nii.gz"))
        assert lab.GetPixelID() == sitk.sitkUInt8
        img = out / "imagesTr" / f"h_{k:03d}_0000.nii.gz"
        assert img.read_bytes() == (src / "imagesTr" / img.name).read_bytes()  # unchanged
    assert entries(out / "imagesTs") == ["h_900_0000.nii.gz"]
    if link_mode == "symlink":
        assert (out / "imagesTr" / "h_000_0000.nii.gz").is_symlink()
    if link_mode == "hardlink":
        assert (out / "imagesTr" / "h_000_0000.nii.gz").stat().st_nlink == 2
    validate_raw_dataset(30)


def test_import_nnunet_remaps_non_consecutive_and_keeps_regions(raw, tmp_path):
    src = make_nnunet_folder(tmp_path, labels={"background": 0, "a": 2, "b": 5})
    out = import_nnunet_dataset(src, 31, name="Gappy")
    assert _dj(out)["labels"] == {"background": 0, "a": 1, "b": 2}
    assert _dj(out)["nnharmony_conversion"]["label_source_values"] == {"a": [2], "b": [5]}
    assert set(np.unique(_read(out / "labelsTr" / "h_001.nii.gz"))) == {0, 1, 2}
    shutil.rmtree(tmp_path / "some_nnunet_copy")
    src = make_nnunet_folder(tmp_path, labels={"background": 0, "whole": [1, 2], "core": 2})
    dj = _dj(src)
    dj["regions_class_order"] = [1, 2]
    (src / "dataset.json").write_text(json.dumps(dj))
    out = import_nnunet_dataset(src, 32, name="Regions")
    assert _dj(out)["labels"] == {"background": 0, "whole": [1, 2], "core": 2}
    assert _dj(out)["regions_class_order"] == [1, 2]


def test_import_nnunet_by_id_from_raw(raw, tmp_path):
    images, labels = plain_folder(tmp_path / "src", n=2)
    convert_plain_folder(images, labels, 40, "Plain", modalities=["CT"], label_names={"organ": 3, "tumor": 7})
    out = import_nnunet_dataset(40, 46, name="PlainCopy")
    assert entries(raw) == ["Dataset040_Plain", "Dataset046_PlainCopy"]
    validate_raw_dataset(out)


# ---------------------------------------------------------------------------------------------- split by site
def _write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_split_by_site(raw, tmp_path):
    images, labels = plain_folder(tmp_path / "src", n=5)
    convert_plain_folder(images, labels, 40, "Multi", modalities=["CT"], label_names={"organ": 3, "tumor": 7})
    csv_file = _write_csv(tmp_path / "sites.csv", [["case_id", "institution"], ["case0", "Site B"], ["case1", "siteA"],
                                                   ["case2.nii.gz", "Site B"], ["case3", "siteA"], ["case4", "siteA"]])
    outs = split_by_site(40, csv_file, 60)
    assert [o.name for o in outs] == ["Dataset060_Multi_Site-B", "Dataset061_Multi_siteA"]
    assert entries(outs[0] / "labelsTr") == ["case0.nii.gz", "case2.nii.gz"]
    assert entries(outs[1] / "imagesTr") == ["case1_0000.nii.gz", "case3_0000.nii.gz", "case4_0000.nii.gz"]
    dj = _dj(outs[1])
    assert dj["numTraining"] == 3 and dj["labels"] == _dj(raw / "Dataset040_Multi")["labels"]
    assert dj["nnharmony_conversion"]["site"] == "siteA"
    for o in outs:
        validate_raw_dataset(o)
    # headerless CSV, copy mode, unassigned cases skipped
    csv2 = _write_csv(tmp_path / "s2.csv", [["case0", "x"], ["case1", "y"]])
    outs = split_by_site("Dataset040_Multi", csv2, 70, link_mode="copy", unassigned="skip", name_template="Part{site}")
    assert [o.name for o in outs] == ["Dataset070_Partx", "Dataset071_Party"]


@pytest.mark.parametrize(
    "rows, match",
    [
        ([["case", "site"], ["case0", "a"], ["nope", "b"]], r"case 'nope' is not a training case of Dataset040_Multi"),
        ([["case", "site"], ["case0", "a"]], r"2 case\(s\) of Dataset040_Multi have no site"),
        ([["case", "site"], ["case0", "a"], ["case0", "b"]], r"line 3: case 'case0' is assigned to 'a' and 'b'"),
    ],
    ids=["unknown-case", "unassigned", "conflict"],
)
def test_split_by_site_bad_csv_leaves_nothing(raw, tmp_path, rows, match):
    images, labels = plain_folder(tmp_path / "src", n=3)
    convert_plain_folder(images, labels, 40, "Multi", modalities=["CT"], label_names={"organ": 3, "tumor": 7})
    with pytest.raises(CollectionError, match=match):
        split_by_site(40, _write_csv(tmp_path / "s.csv", rows), 60)
    assert entries(raw) == ["Dataset040_Multi"]


def test_split_by_site_all_or_nothing_when_an_id_is_taken(raw, tmp_path):
    images, labels = plain_folder(tmp_path / "src", n=3)
    convert_plain_folder(images, labels, 40, "Multi", modalities=["CT"], label_names={"organ": 3, "tumor": 7})
    convert_plain_folder(images, labels, 61, "Taken", modalities=["CT"], label_names={"organ": 3, "tumor": 7})
    csv_file = _write_csv(tmp_path / "s.csv", [["case0", "a"], ["case1", "b"], ["case2", "b"]])
    with pytest.raises(CollectionError, match="dataset id 61 is already taken by Dataset061_Taken"):
        split_by_site(40, csv_file, 60)
    assert entries(raw) == ["Dataset040_Multi", "Dataset061_Taken"]  # site a (id 60) not written either


# ---------------------------------------------------------------------------------------------- bad inputs
def _nan_image(src: Path):
    a = _read(src / "images" / "case1.nrrd")
    a[0, 0, 0] = np.nan
    _write(a, src / "images" / "case1.nrrd")


def _inf_nifti(src: Path):
    # SimpleITK reads NaN/Inf in NIfTI as 0: the converter must still see them
    a = _read(src / "images" / "case1.nrrd")
    a[1, 1, 1] = np.inf
    (src / "images" / "case1.nrrd").unlink()
    _write(a, src / "images" / "case1.nii.gz")


def _undeclared(src: Path):
    _write(_label(values=(3, 8)), src / "labels" / "case2.nrrd")


def _float_label(src: Path):
    _write(_label(values=(3, 7)).astype(np.float32) + 0.25 * (_label(values=(3, 7)) > 0), src / "labels" / "case0.nrrd")


def _shape_mismatch(src: Path):
    _write(_label(shape=(4, 6, 8)), src / "labels" / "case1.nrrd")


def _spacing_mismatch(src: Path):
    _write(_label(), src / "labels" / "case1.nrrd", spacing=(0.8, 0.8, 3.0))


def _origin_mismatch(src: Path):
    _write(_label(), src / "labels" / "case1.nrrd", origin=(0.0, 0.0, 0.0))


def _mixed_dims(src: Path):
    _write(np.zeros((6, 7), np.float32), src / "images" / "case2.nrrd")
    _write(np.zeros((6, 7), np.uint8), src / "labels" / "case2.nrrd")


def _missing_label(src: Path):
    (src / "labels" / "case2.nrrd").unlink()


def _unreadable(src: Path):
    (src / "images" / "case0.nrrd").write_text("not an image")


BAD_INPUTS = {
    "nan-image": (_nan_image, r"images/case1.nrrd: image contains 1 NaN and 0 Inf voxel\(s\)"),
    "inf-nifti": (_inf_nifti, r"images/case1.nii.gz: image contains 0 NaN and 1 Inf voxel\(s\)"),
    "undeclared-label": (_undeclared, r"labels/case2.nrrd: label value\(s\) \[8\] not declared"),
    "non-integer-label": (_float_label, r"labels/case0.nrrd: label map has non-integer value\(s\) \[3.25, 7.25\]"),
    "shape-mismatch": (_shape_mismatch, r"labels/case1.nrrd: geometry mismatch with image .*case1.nrrd: shape"),
    "spacing-mismatch": (_spacing_mismatch, r"labels/case1.nrrd: geometry mismatch .*: spacing \(0.8, 0.8, 3\)"),
    "origin-mismatch": (_origin_mismatch, r"labels/case1.nrrd: geometry mismatch .*: origin \(0, 0, 0\)"),
    "mixed-dimensionality": (_mixed_dims, r"cases of different dimensionality: 2D \(e.g. 'case2'\), 3D"),
    "missing-label": (_missing_label, r"images/case2.nrrd: no label file for case 'case2'"),
    "unreadable": (_unreadable, r"images/case0.nrrd: cannot be read by SimpleITK"),
}


@pytest.mark.parametrize("defect", list(BAD_INPUTS))
def test_bad_plain_input_clear_error_nothing_written(raw, tmp_path, defect):
    images, labels = plain_folder(tmp_path / "src")
    make, pattern = BAD_INPUTS[defect]
    make(tmp_path / "src")
    with pytest.raises(CollectionError) as ei:
        convert_plain_folder(images, labels, 40, "Bad", modalities=["CT"], label_names={"organ": 3, "tumor": 7})
    msg = str(ei.value)
    assert "Dataset040_Bad" in msg, msg
    import re

    assert re.search(pattern, msg), msg
    assert entries(raw) == []  # no partial output folder, no staging left behind


def test_bad_arguments_nothing_written(raw, tmp_path):
    images, labels = plain_folder(tmp_path / "src", n=2)
    kw = dict(label_names={"organ": 3, "tumor": 7})
    with pytest.raises(CollectionError, match=r"channel 0 has no modality name"):
        convert_plain_folder(images, labels, 40, "Bad", modalities=[" "], **kw)
    with pytest.raises(CollectionError, match=r"case 'case0' has 1 channel\(s\) in 1 file\(s\), expected 2"):
        convert_plain_folder(images, labels, 40, "Bad", modalities=["T1", "T2"], **kw)
    with pytest.raises(CollectionError, match=r"give one modality name per channel"):
        convert_plain_folder(images, labels, 40, "Bad", **kw)
    with pytest.raises(CollectionError, match=r"dataset name 'Bad name!' is not usable"):
        convert_plain_folder(images, labels, 40, "Bad name!", modalities=["CT"], **kw)
    with pytest.raises(CollectionError, match=r"none of the declared labels occurs"):
        convert_plain_folder(images, labels, 40, "Bad", modalities=["CT"], label_names={"x": 1},
                             undeclared="background")
    with pytest.raises(CollectionError, match=r"unknown dataset id 77"):
        split_by_site(77, tmp_path / "none.csv", 80)
    with pytest.raises(CollectionError, match=r"unknown dataset id 78"):
        import_nnunet_dataset(78, 81)
    with pytest.raises(CollectionError, match=r"MSD task folder .* does not exist"):
        convert_msd(tmp_path / "Task09_Missing")
    assert entries(raw) == []


def test_bad_source_dataset_json_nothing_written(raw, tmp_path):
    src = make_nnunet_folder(tmp_path)
    dj = _dj(src)
    (src / "dataset.json").write_text("{broken")
    with pytest.raises(CollectionError, match=r"some_nnunet_copy: dataset.json: invalid JSON"):
        import_nnunet_dataset(src, 30)
    (src / "dataset.json").write_text(json.dumps({**dj, "channel_names": {"0": ""}}))
    with pytest.raises(CollectionError, match=r"channel 0 has no modality name"):
        import_nnunet_dataset(src, 30)
    (src / "dataset.json").write_text(json.dumps({k: v for k, v in dj.items() if k != "file_ending"}))
    with pytest.raises(CollectionError, match=r"required key 'file_ending' is missing"):
        import_nnunet_dataset(src, 30)
    (src / "dataset.json").unlink()
    with pytest.raises(CollectionError, match=r"missing dataset.json"):
        import_nnunet_dataset(src, 30)
    task = make_msd_task(tmp_path, test=0)
    (task / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "x"}}))
    with pytest.raises(CollectionError, match=r"Dataset005_Fake: .*required MSD key 'modality' is missing"):
        convert_msd(task)
    assert entries(raw) == []


def test_import_label_with_undeclared_value_nothing_written(raw, tmp_path):
    src = make_nnunet_folder(tmp_path)
    _write(_label(values=(1, 4)), src / "labelsTr" / "h_002.nii.gz")
    with pytest.raises(CollectionError, match=r"(?s)Dataset030_Hippo.*labelsTr/h_002.nii.gz: label value\(s\) \[4\] not declared"):
        import_nnunet_dataset(src, 30)
    assert entries(raw) == []


def test_failure_while_writing_removes_staging(raw, tmp_path, monkeypatch):
    images, labels = plain_folder(tmp_path / "src", n=2)
    import nnharmony.dataset_conversion.convert as cv

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cv, "_write_dataset_json", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_plain_folder(images, labels, 40, "Bad", modalities=["CT"], label_names={"organ": 3, "tumor": 7})
    assert entries(raw) == []


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_folder_msd_check_and_errors(raw, tmp_path, capsys):
    from nnharmony.cli.convert import main

    images, labels = plain_folder(tmp_path / "src", n=2)
    assert main(["folder", "-i", str(images), "-l", str(labels), "-d", "40", "-n", "Cli", "-m", "CT",
                 "--labels", "organ=3", "tumor=7"]) == 0
    assert str(raw / "Dataset040_Cli") in capsys.readouterr().out
    lj = tmp_path / "labels.json"
    lj.write_text(json.dumps({"modality": "CT", "labels": {"background": 0, "organ": 3, "tumor": 7}}))
    assert main(["folder", "-i", str(images / "case0.nrrd"), "-l", str(labels / "case0.nrrd"), "-d", "41",
                 "-n", "CliList", "--labels-json", str(lj), "--case-ids", "c0"]) == 0
    assert entries(raw / "Dataset041_CliList" / "labelsTr") == ["c0.nii.gz"]
    task = make_msd_task(tmp_path, test=0)
    assert main(["msd", "-i", str(task), "-d", "50"]) == 0
    assert main(["nnunet", "-i", "50", "-d", "51", "-n", "Copy", "--link", "hardlink"]) == 0
    assert main(["check", "-d", "40", "41"]) == 0
    assert "40: OK" in capsys.readouterr().out
    before = entries(raw)
    assert main(["folder", "-i", str(images), "-l", str(labels), "-d", "40", "-n", "Again", "-m", "CT",
                 "--labels", "organ=3"]) == 2
    err = capsys.readouterr().err
    assert "nnharmony_convert folder: error:" in err and "dataset id 40 is already taken" in err
    assert main(["check", "-d", "99"]) == 2
    assert "unknown dataset id" in capsys.readouterr().err
    assert entries(raw) == before
    with pytest.raises(SystemExit):
        main(["folder", "-i", "x", "-l", "y", "-d", "1", "-n", "X"])  # labels or labels-json required


def test_cli_help_has_examples(capsys):
    from nnharmony.cli.convert import main

    for sub in ("msd", "folder", "nnunet", "split-sites"):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        assert "example" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- real data
realdata = pytest.mark.realdata


def _need(sub: str) -> Path:
    p = SHARED_DATA / sub
    if not p.is_dir():
        pytest.skip(f"real data {p} not present (see ../shared/data/README.md)")
    return p


@pytest.fixture(scope="module")
def real_raw(tmp_path_factory):
    """All real datasets converted once into one raw folder (module scope: about 5 s)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    root = tmp_path_factory.mktemp("real_raw")
    out = {}
    hip = SHARED_DATA / "msd_hippocampus_mri"
    if hip.is_dir():
        out["hippocampus"] = import_nnunet_dataset(hip, 4, "Hippocampus", raw_root=root, modalities=["T1"],
                                                   link_mode="hardlink")
    spl = SHARED_DATA / "msd_spleen_ct_1case"
    if spl.is_dir():
        out["spleen"] = import_nnunet_dataset(spl, 9, "Spleen", raw_root=root)
    sct = SHARED_DATA / "sct_spinalcord_mri"
    if sct.is_dir():
        out["cord_t1"] = convert_plain_folder([sct / "t1" / "t1w.nii.gz"], [sct / "t1" / "t1w_seg-manual.nii.gz"],
                                              960, "SpinalCordT1", ["T1"], {"spinal_cord": 1}, case_ids=["sub01"],
                                              raw_root=root)
        out["cord_t2"] = convert_plain_folder([sct / "t2" / "t2.nii.gz"],
                                              [sct / "t2" / "t2_seg-manual_labeled.nii.gz"],  # float64, levels 2..5
                                              961, "SpinalCordT2", ["T2"], {"spinal_cord": [2, 3, 4, 5]},
                                              case_ids=["sub01"], raw_root=root)
        out["cord_t2s"] = convert_plain_folder([sct / "t2s" / "t2s.nii.gz"], [sct / "t2s" / "t2s_gmseg_manual.nii.gz"],
                                               962, "SpinalCordT2star", ["T2star"], {"grey_matter": 1},
                                               case_ids=["sub01"], raw_root=root)
    ts = SHARED_DATA / "totalseg_ct_mr"
    if ts.is_dir():
        for k, mod, did in (("ct", "CT", 950), ("mr", "MR", 951)):
            out[f"ts_{k}"] = convert_plain_folder(ts / k / "images", ts / k / "labels", did, f"TotalSeg{mod}",
                                                  label_names=ts / k / "labels.json", raw_root=root)
    return root, out


def _member(real_raw, key):
    root, out = real_raw
    if key not in out:
        pytest.skip(f"real dataset for {key} not present in {SHARED_DATA}")
    return out[key]


@realdata
def test_real_hippocampus_import(real_raw):
    out = _member(real_raw, "hippocampus")
    dj = _dj(out)
    assert dj["numTraining"] == 200 and dj["channel_names"] == {"0": "T1"}
    assert dj["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    float_labels = [p for p in sorted((_need("msd_hippocampus_mri") / "labelsTr").iterdir())
                    if sitk.ReadImage(str(p)).GetPixelID() == sitk.sitkFloat32]
    assert float_labels, "the real copy has float32 label maps"
    for p in float_labels:
        new = sitk.ReadImage(str(out / "labelsTr" / p.name))
        assert new.GetPixelID() == sitk.sitkUInt8
        assert np.array_equal(sitk.GetArrayFromImage(new), _read(p).astype(np.uint8))
    validate_raw_dataset(out, check_images=False)


@realdata
def test_real_spleen_msd_and_import(real_raw, tmp_path):
    out = _member(real_raw, "spleen")
    assert _dj(out)["channel_names"] == {"0": "CT"} and _dj(out)["labels"] == {"background": 0, "spleen": 1}
    img = sitk.ReadImage(str(out / "imagesTr" / "spleen_2_0000.nii.gz"))
    assert np.allclose(img.GetSpacing(), (0.795, 0.795, 5.0), atol=1e-3)
    # the same real case laid out as an MSD task folder, converted with the MSD converter
    src = _need("msd_spleen_ct_1case")
    task = tmp_path / "Task09_Spleen"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    (task / "imagesTs").mkdir()
    shutil.copy(src / "imagesTr" / "spleen_2_0000.nii.gz", task / "imagesTr" / "spleen_2.nii.gz")
    shutil.copy(src / "labelsTr" / "spleen_2.nii.gz", task / "labelsTr" / "spleen_2.nii.gz")
    (task / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"}, "numTraining": 1,
        "training": [{"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"}], "test": []}))
    raw = tmp_path / "raw"
    msd = convert_msd(task, raw_root=raw)
    assert msd.name == "Dataset009_Spleen"
    assert np.array_equal(_read(msd / "imagesTr" / "spleen_2_0000.nii.gz"), _read(src / "imagesTr" / "spleen_2_0000.nii.gz"))
    assert np.array_equal(_read(msd / "labelsTr" / "spleen_2.nii.gz"), _read(src / "labelsTr" / "spleen_2.nii.gz"))
    validate_raw_dataset(msd)


@realdata
def test_real_spinal_cord_three_contrasts(real_raw):
    t1, t2, t2s = (_member(real_raw, k) for k in ("cord_t1", "cord_t2", "cord_t2s"))
    assert [_dj(f)["channel_names"]["0"] for f in (t1, t2, t2s)] == ["T1", "T2", "T2star"]
    lab = sitk.ReadImage(str(t2 / "labelsTr" / "sub01.nii.gz"))  # from a float64 map with values 2..5
    assert lab.GetPixelID() == sitk.sitkUInt8
    src = _read(_need("sct_spinalcord_mri") / "t2" / "t2_seg-manual_labeled.nii.gz")
    assert np.array_equal(sitk.GetArrayFromImage(lab), (src > 0).astype(np.uint8))
    assert _dj(t2)["nnharmony_conversion"]["label_source_values"] == {"spinal_cord": [2, 3, 4, 5]}
    img = sitk.ReadImage(str(t2s / "imagesTr" / "sub01_0000.nii.gz"))
    assert np.allclose(img.GetSpacing(), (0.5, 0.5, 7.5))  # 15:1 anisotropy kept
    for f in (t1, t2, t2s):
        validate_raw_dataset(f)


@realdata
def test_real_conversions_accepted_by_nnunet_verify(real_raw, monkeypatch):
    from test_raw_validation import verify_in_process

    for key in ("cord_t2", "cord_t2s", "ts_ct", "ts_mr", "spleen"):
        verify_in_process(monkeypatch, _member(real_raw, key))


@realdata
def test_real_totalsegmentator_ct_mr(real_raw):
    ct, mr = _member(real_raw, "ts_ct"), _member(real_raw, "ts_mr")
    vocab = json.loads((_need("totalseg_ct_mr") / "ct" / "labels.json").read_text())["labels"]
    for f, n_present in ((ct, 41), (mr, 23)):
        dj = _dj(f)
        labels = dj["labels"]
        assert len(labels) == n_present + 1  # keep='present': only structures with voxels
        assert list(labels.values()) == list(range(n_present + 1))  # consecutive
        present = set(np.unique(_read(next((f / "labelsTr").iterdir()))).tolist())
        assert present == set(range(n_present + 1))
        rec = dj["nnharmony_conversion"]
        assert set(rec["label_source_values"]) == set(labels) - {"background"}
        assert len(rec["dropped_labels"]) > 0
    assert _dj(ct)["channel_names"] == {"0": "CT"} and _dj(mr)["channel_names"] == {"0": "MR"}
    # the mapping is right: liver voxels of the source are liver voxels of the output
    src = _read(_need("totalseg_ct_mr") / "ct" / "labels" / "abdomen_ct_001.nii.gz")
    out = _read(ct / "labelsTr" / "abdomen_ct_001.nii.gz")
    assert np.array_equal(out == _dj(ct)["labels"]["liver"], src == vocab["liver"])
    assert _dj(ct)["nnharmony_conversion"]["label_source_values"]["liver"] == [vocab["liver"]]


@realdata
def test_real_collection_spec_modalities_and_merged_tasks(real_raw):
    root, out = real_raw
    for k in ("hippocampus", "spleen", "cord_t1", "cord_t2", "cord_t2s", "ts_ct", "ts_mr"):
        _member(real_raw, k)
    ids = [4, 9, 960, 961, 962, 950, 951]
    spec = build_collection_spec("Collection800_Real", ids, raw_root=root)
    assert spec.modalities == ["T1", "CT", "T2", "T2star", "MR"]
    # CT and the MRI contrasts are distinct modalities; hippocampus and cord T1 share the T1 slot
    assert spec.channel_slots(950) == spec.channel_slots(9) == [1]
    assert spec.channel_slots(4) == spec.channel_slots(960) == [0]
    assert len({spec.primary_modality(i) for i in (950, 951, 960, 961, 962)}) == 5
    # structures shared by name become one global task
    for name in ("liver", "spleen", "kidney_left", "aorta"):
        assert spec.tasks.count(name) == 1
        ct_task = [spec.tasks[t] for t in spec.task_ids(950)]
        mr_task = [spec.tasks[t] for t in spec.task_ids(951)]
        assert name in ct_task and name in mr_task
    assert "spinal_cord" in [spec.tasks[t] for t in spec.task_ids(960)]
    assert [spec.tasks[t] for t in spec.task_ids(960)] == [spec.tasks[t] for t in spec.task_ids(961)]
    # spleen: the MSD CT case, TotalSegmentator CT and MR feed one task
    spleen = spec.tasks.index("spleen")
    assert all(spleen in spec.task_ids(i) for i in (9, 950, 951))
    # different source values for the same structure are fine: each member keeps its own values
    liver_ct = next(t for t in spec.member(950).tasks if t.label == "liver").values
    liver_mr = next(t for t in spec.member(951).tasks if t.label == "liver").values
    assert liver_ct and liver_mr


def test_process_pool_path_matches_sequential(raw, tmp_path, monkeypatch):
    """Large datasets are read in a spawn process pool (SimpleITK readers crash when shared by threads)."""
    import nnharmony.dataset_conversion.convert as convert_mod
    import nnharmony.dataset_conversion.validation as validation_mod

    images, labels = plain_folder(tmp_path / "src", n=6)
    monkeypatch.setattr(convert_mod, "PARALLEL_MIN_CASES", 2)
    monkeypatch.setattr(validation_mod, "PARALLEL_MIN_CASES", 2)
    out = convert_plain_folder(images, labels, 41, "Pool", modalities=["CT"], label_names={"organ": 3, "tumor": 7},
                               num_processes=2)
    assert entries(out / "labelsTr") == [f"case{k}.nii.gz" for k in range(6)]
    validate_raw_dataset(41, check_images=True, num_processes=2)
    _undeclared(tmp_path / "src")
    with pytest.raises(CollectionError, match=r"labels/case2.nrrd: label value\(s\) \[8\] not declared"):
        convert_plain_folder(images, labels, 42, "PoolBad", modalities=["CT"],
                             label_names={"organ": 3, "tumor": 7}, num_processes=2)


# ---------------------------------------------------------------------------------------------- grouped splits
def test_case_groups_forms():
    from nnharmony.data.splits import case_groups

    ids = ["btcv_1_010", "btcv_1_014", "btcv_12_030"]
    assert case_groups({"case_groups": r"^btcv_(?P<group>\d+)_"}, ids) == {
        "btcv_1_010": "1", "btcv_1_014": "1", "btcv_12_030": "12"}
    assert case_groups({"case_groups": r"^btcv_(\d+)_"}, ids)["btcv_12_030"] == "12"  # first group
    assert case_groups({"case_groups": r"^btcv_\d+"}, ids)["btcv_1_014"] == "btcv_1"  # whole match
    assert case_groups({"case_groups": {c: "p" for c in ids}}, ids) == {c: "p" for c in ids}
    assert case_groups({}, ids) is None
    with pytest.raises(ValueError, match=r"D/dataset.json: 'case_groups' gives no group to 1 case\(s\)"):
        case_groups({"case_groups": r"^btcv_(1)_"}, ids, "D/dataset.json")


def test_crossval_split_by_group_is_nnunets_split_over_groups():
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from nnharmony.data.splits import crossval_split, random_split

    ids = [f"case_{i:03d}" for i in range(12)]
    nnunet = generate_crossval_split(ids, seed=12345, n_splits=5)
    assert crossval_split(ids) == [{"train": list(s["train"]), "val": list(s["val"])} for s in nnunet]
    assert crossval_split(ids, {c: c for c in ids}) == crossval_split(ids)  # one case per group: nnU-Net's split
    groups = {c: f"p{i // 2}" for i, c in enumerate(ids)}  # 6 patients, 2 cases each
    splits = crossval_split(ids, groups)
    assert sorted(c for s in splits for c in s["val"]) == ids
    for s in splits:
        assert not {groups[c] for c in s["train"]} & {groups[c] for c in s["val"]}
    tr, val = random_split(ids, 7, groups)
    assert sorted(tr + val) == ids and not {groups[c] for c in tr} & {groups[c] for c in val}
    with pytest.raises(ValueError, match="needs at least 5 groups of cases, found 2"):
        crossval_split(ids, {c: str(i % 2) for i, c in enumerate(ids)})


def test_grouped_member_splits_written_and_checked(tmp_path, monkeypatch):
    from nnharmony.data.splits import ensure_member_splits, member_splits

    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    raw = tmp_path / "raw" / "Dataset005_Slices"
    (raw / "labelsTr").mkdir(parents=True)
    ids = [f"pat{p}_s{s}" for p in range(6) for s in range(3)]
    for c in ids:
        (raw / "labelsTr" / f"{c}.png").write_bytes(b"")
    dj = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "numTraining": len(ids),
          "file_ending": ".png", "case_groups": r"^(?P<group>pat\d+)_"}
    (raw / "dataset.json").write_text(json.dumps(dj))
    splits = ensure_member_splits("Dataset005_Slices")
    path = tmp_path / "pre" / "Dataset005_Slices" / "splits_final.json"
    assert json.loads(path.read_text()) == splits
    for s in splits:
        assert not {c.split("_")[0] for c in s["train"]} & {c.split("_")[0] for c in s["val"]}
    bad = [{"train": ids[1:], "val": ids[:1]}]  # pat0_s0 in val, pat0_s1 in train
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"splits_final.json: fold 0 has cases of group\(s\) \['pat0'\] in both"):
        member_splits(path.parent, None)
    (raw / "dataset.json").write_text(json.dumps({k: v for k, v in dj.items() if k != "case_groups"}))
    assert ensure_member_splits("Dataset005_Slices") is None  # no groups: nnU-Net creates its split as usual
