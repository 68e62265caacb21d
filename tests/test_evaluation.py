"""nnharmony's evaluation: NSD on known geometry, nnU-Net's Dice through evaluate_folder, a two-member collection
end to end (both prediction layouts), the written files, the CLI and its error messages.

Everything runs in this process (``num_processes=1``) on tiny volumes; the multi-process path is in a
``slow`` test."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnharmony.evaluation.evaluate import (ROW_FIELDS, evaluate_collection, evaluate_folder, format_table,
                                           labels_to_regions, summary_rows, write_csv)
from nnharmony.evaluation.metrics import normalized_surface_dice

SHAPE = (8, 12, 12)  # z, y, x
SPACING = (1.0, 1.0, 2.0)  # SimpleITK order x, y, z


def cube(lo: int, hi: int, shift: int = 0, axis: int = 0, shape=(16, 16, 16)) -> np.ndarray:
    a = np.zeros(shape, dtype=bool)
    sl = [slice(lo, hi)] * len(shape)
    sl[axis] = slice(lo + shift, hi + shift)
    a[tuple(sl)] = True
    return a


def write(path: Path, arr: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


def seg(a: bool = True, b: bool = True) -> np.ndarray:
    s = np.zeros(SHAPE, dtype=np.uint8)
    if a:
        s[1:5, 2:8, 2:8] = 1
    if b:
        s[5:7, 3:6, 3:6] = 2
    return s


# ---------------------------------------------------------------------------------------------- NSD
def test_nsd_shifted_cubes():
    ref, pred = cube(4, 10), cube(4, 10, shift=1, axis=0)
    assert normalized_surface_dice(pred, ref, (1, 1, 1), 1.0) == pytest.approx(1.0)
    assert normalized_surface_dice(pred, ref, (1, 1, 1), 2.5) == pytest.approx(1.0)
    at0 = normalized_surface_dice(pred, ref, (1, 1, 1), 0.0)
    assert 0 < at0 < 1
    # the shift is along axis 0: 2 mm voxels there put it beyond a 1 mm tolerance ...
    assert normalized_surface_dice(pred, ref, (2, 1, 1), 1.0) < 1
    assert normalized_surface_dice(pred, ref, (2, 1, 1), 2.0) == pytest.approx(1.0)
    # ... while coarse spacing along the other axes does not matter for it
    assert normalized_surface_dice(pred, ref, (1, 3, 3), 1.0) == pytest.approx(1.0)
    # symmetric in its arguments, and perfect for identical masks at any tolerance
    assert normalized_surface_dice(ref, pred, (1, 1, 1), 0.0) == pytest.approx(at0)
    assert normalized_surface_dice(ref, ref, (0.5, 1, 3), 0.0) == 1.0


def test_nsd_empty_masks_and_2d():
    empty = np.zeros((6, 6, 6), bool)
    assert math.isnan(normalized_surface_dice(empty, empty, (1, 1, 1), 1.0))
    assert normalized_surface_dice(cube(1, 3, shape=(6, 6, 6)), empty, (1, 1, 1), 1.0) == 0.0
    assert normalized_surface_dice(empty, cube(1, 3, shape=(6, 6, 6)), (1, 1, 1), 1.0) == 0.0
    # 2D data in nnU-Net's 3D layout (1, y, x) with its dummy spacing 999: measured in 2D
    ref2d, pred2d = cube(3, 8, shape=(12, 12))[None], cube(3, 8, shift=1, axis=1, shape=(12, 12))[None]
    assert normalized_surface_dice(pred2d, ref2d, (999, 1, 1), 1.0) == pytest.approx(1.0)
    assert normalized_surface_dice(pred2d, ref2d, (999, 1, 1), 0.0) < 1
    with pytest.raises(ValueError, match="shape"):
        normalized_surface_dice(empty, np.zeros((5, 6, 6), bool), (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="tolerance"):
        normalized_surface_dice(empty, empty, (1, 1, 1), -1)


def test_labels_to_regions():
    assert labels_to_regions({"background": 0, "a": 1, "b": 2}) == ([("a", 1), ("b", 2)], None)
    assert labels_to_regions({"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}) == \
        ([("whole", (1, 2)), ("core", (2,))], 3)
    with pytest.raises(ValueError, match="no foreground"):
        labels_to_regions({"background": 0})
    with pytest.raises(ValueError, match="'a'"):
        labels_to_regions({"a": "x"})


# ---------------------------------------------------------------------------------------------- one folder
LABELS = {"background": 0, "a": 1, "b": 2}


@pytest.fixture
def folder_case(tmp_path):
    """c1 perfect; c2 misses label b; c3 has no b in reference nor prediction (Dice/NSD NaN)."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    write(ref / "c1.nii.gz", seg()), write(pred / "c1.nii.gz", seg())
    write(ref / "c2.nii.gz", seg()), write(pred / "c2.nii.gz", seg(b=False))
    write(ref / "c3.nii.gz", seg(b=False)), write(pred / "c3.nii.gz", seg(b=False))
    write(ref / "c4.nii.gz", seg())  # a reference without prediction is not evaluated
    return ref, pred


def test_evaluate_folder_dice_nsd_and_summary(folder_case, tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json

    ref, pred = folder_case
    out = tmp_path / "out"
    s = evaluate_folder(ref, pred, LABELS, nsd_tolerance_mm=1.0, num_processes=1, output_folder=out,
                        member_name="Dataset001_X")
    per_case = {Path(c["prediction_file"]).name: c["metrics"] for c in s["metric_per_case"]}
    assert sorted(per_case) == ["c1.nii.gz", "c2.nii.gz", "c3.nii.gz"]
    assert per_case["c1.nii.gz"][1]["Dice"] == 1 and per_case["c1.nii.gz"][2]["Dice"] == 1
    assert per_case["c1.nii.gz"][2]["NSD"] == 1
    assert per_case["c2.nii.gz"][2]["Dice"] == 0 and per_case["c2.nii.gz"][2]["NSD"] == 0
    assert math.isnan(per_case["c3.nii.gz"][2]["Dice"]) and math.isnan(per_case["c3.nii.gz"][2]["NSD"])
    assert s["mean"][2]["Dice"] == pytest.approx(0.5) and s["mean"][2]["NSD"] == pytest.approx(0.5)
    assert s["nsd"] == {"tolerance_mm": 1.0, "foreground_mean": pytest.approx(0.75),
                        "mean": {"1": pytest.approx(1.0), "2": pytest.approx(0.5)}}

    assert not (pred / "summary.json").exists()
    saved = json.loads((out / "summary.json").read_text())
    assert {"foreground_mean", "mean", "metric_per_case", "nsd", "labels", "member"} <= set(saved)
    assert saved["labels"] == {"a": "1", "b": "2"} and saved["member"] == "Dataset001_X"
    assert load_summary_json(str(out / "summary.json"))["mean"][2]["Dice"] == pytest.approx(0.5)

    rows = summary_rows(saved)  # from the JSON form: labels/member from the summary itself
    assert rows == summary_rows(s, LABELS, member="Dataset001_X")
    b = rows[1]
    assert (b["member"], b["label"], b["n"]) == ("Dataset001_X", "b", 3)
    assert b["dice_mean"] == pytest.approx(0.5) and b["dice_std"] == pytest.approx(math.sqrt(0.5))
    assert rows[0]["dice_mean"] == 1.0 and rows[0]["nsd_mean"] == 1.0


def test_evaluate_folder_regions_without_nsd(folder_case):
    ref, pred = folder_case
    labels = {"background": 0, "whole": [1, 2], "b": [2]}
    s = evaluate_folder(ref, pred, labels, num_processes=1)
    assert set(s["mean"]) == {(1, 2), (2,)} and "nsd" not in s
    assert s["mean"][(1, 2)]["Dice"] < 1 and s["mean"][(2,)]["Dice"] == pytest.approx(0.5)
    assert (pred / "summary.json").is_file()  # default output folder: the predictions'
    rows = summary_rows(s, labels, member="X")
    assert [r["label"] for r in rows] == ["whole", "b"] and rows[0]["nsd_mean"] is None


def test_evaluate_folder_errors(folder_case, tmp_path):
    ref, pred = folder_case
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no prediction files"):
        evaluate_folder(ref, empty, LABELS, num_processes=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_folder(ref, tmp_path / "nope", LABELS, num_processes=1)
    write(pred / "stray.nii.gz", seg())
    with pytest.raises(ValueError, match=r"1 prediction file\(s\).*stray\.nii\.gz"):
        evaluate_folder(ref, pred, LABELS, num_processes=1)
    (pred / "stray.nii.gz").unlink()
    write(pred / "c2.nii.gz", seg(), spacing=(1.0, 1.0, 3.0))
    with pytest.raises(ValueError, match=r"geometry mismatch: prediction .*c2\.nii\.gz has spacing"):
        evaluate_folder(ref, pred, LABELS, num_processes=1)
    write(pred / "c2.nii.gz", seg(), origin=(0.0, 5.0, 0.0))
    with pytest.raises(ValueError, match=r"c2\.nii\.gz has origin"):
        evaluate_folder(ref, pred, LABELS, num_processes=1)
    write(pred / "c2.nii.gz", seg()[:, :10])
    with pytest.raises(ValueError, match=r"c2\.nii\.gz has size"):
        evaluate_folder(ref, pred, LABELS, num_processes=1)


# ---------------------------------------------------------------------------------------------- tables
def test_format_table_and_csv(tmp_path):
    rows = [{"member": "D1", "label": "a", "dice_mean": 0.9, "dice_std": 0.05, "nsd_mean": None, "nsd_std": None,
             "n": 4},
            {"member": "D1", "label": "b|c", "dice_mean": None, "dice_std": None, "n": 4}]
    t = format_table(rows)
    assert t.splitlines()[0] == "| member | label | n | Dice |"
    assert "| D1 | a | 4 | 0.900 ± 0.050 |" in t and "| D1 | b\\|c | 4 | – |" in t
    t2 = format_table([dict(rows[0], method="m1", nsd_mean=0.8)])
    assert t2.splitlines()[0] == "| member | label | method | n | Dice | NSD |" and "| 0.800 |" in t2
    write_csv(rows, tmp_path / "r.csv")
    with open(tmp_path / "r.csv") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ROW_FIELDS and got[0]["dice_mean"] == "0.9" and got[1]["dice_mean"] == ""


# ---------------------------------------------------------------------------------------------- collection
@pytest.fixture
def two_members(tmp_path):
    """Dataset801_A (liver) and Dataset802_B (spleen, tumour) in a raw root, their spec and predictions."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    from nnharmony.data.collection import build_collection_spec

    raw = tmp_path / "raw"
    members = {"Dataset801_A": ({"background": 0, "liver": 1}, ["A_001", "A_002"]),
               "Dataset802_B": ({"background": 0, "spleen": 1, "tumour": 2}, ["B_001", "B_002"])}
    pred = tmp_path / "pred"
    for name, (labels, cases) in members.items():
        (raw / name).mkdir(parents=True)
        generate_dataset_json(str(raw / name), {0: "CT"}, labels, len(cases), ".nii.gz", dataset_name=name)
        for i, c in enumerate(cases):
            ref = seg(b=len(labels) == 3)
            write(raw / name / "labelsTr" / f"{c}.nii.gz", ref)
            write(raw / name / "imagesTr" / f"{c}_0000.nii.gz", ref)
            write(pred / name / f"{c}.nii.gz", ref if i == 0 else seg(b=False))
    spec = build_collection_spec("Collection800_T", [801, 802], raw_root=raw)
    return spec, raw, pred


def _check_outputs(out: Path, result: dict) -> None:
    saved = json.loads((out / "summary.json").read_text())
    assert {"format", "collection", "layout", "nsd_tolerance_mm", "rows", "members",
            "members_without_predictions"} <= set(saved)
    assert list(saved["members"]) == ["Dataset801_A", "Dataset802_B"]
    for name in saved["members"]:
        assert (out / name / "summary.json").is_file()
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    md = (out / "results.md").read_text()
    assert "| member | label | method | n | Dice | NSD |" in md and "1 mm" in md
    with open(out / "results.csv") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ROW_FIELDS and len(got) == 3


def test_evaluate_collection_subfolders_and_flat(two_members, tmp_path):
    spec, raw, pred = two_members
    out = tmp_path / "eval"
    res = evaluate_collection(spec, pred, reference_root=raw, nsd_tolerance_mm=1.0, num_processes=1,
                              output_folder=out, method="mine")
    assert res["layout"] == "subfolders" and res["members_without_predictions"] == []
    rows = {(r["member"], r["label"]): r for r in res["rows"]}
    assert set(rows) == {("Dataset801_A", "liver"), ("Dataset802_B", "spleen"), ("Dataset802_B", "tumour")}
    assert rows[("Dataset801_A", "liver")]["dice_mean"] == 1.0 and rows[("Dataset801_A", "liver")]["n"] == 2
    t = rows[("Dataset802_B", "tumour")]
    assert t["dice_mean"] == pytest.approx(0.5) and t["nsd_mean"] == pytest.approx(0.5) and t["method"] == "mine"
    _check_outputs(out, res)

    # the same predictions, flat: each case goes to the member whose labelsTr holds it
    flat = tmp_path / "flat"
    for f in pred.glob("*/*.nii.gz"):
        write(flat / f.name, sitk.GetArrayFromImage(sitk.ReadImage(str(f))))
    res_flat = evaluate_collection(spec, flat, reference_root=raw, nsd_tolerance_mm=1.0, num_processes=1,
                                   method="mine")
    assert res_flat["layout"] == "flat" and res_flat["rows"] == res["rows"]
    _check_outputs(flat, res_flat)
    files = [c["prediction_file"] for c in res_flat["members"]["Dataset801_A"]["metric_per_case"]]
    assert files == [str(flat / "A_001.nii.gz"), str(flat / "A_002.nii.gz")]
    # a second run is not confused by the per-member summary folders it wrote
    assert evaluate_collection(spec, flat, reference_root=raw, num_processes=1)["layout"] == "flat"


def test_evaluate_collection_assignment_errors(two_members, tmp_path):
    spec, raw, pred = two_members
    # a case name present in both members' references needs an explicit member
    write(raw / "Dataset802_B" / "labelsTr" / "A_001.nii.gz", seg())
    flat = tmp_path / "flat"
    write(flat / "A_001.nii.gz", seg(b=False))
    with pytest.raises(ValueError, match=r"several members.*A_001\.nii\.gz \(Dataset801_A, Dataset802_B\)"):
        evaluate_collection(spec, flat, reference_root=raw, num_processes=1)
    res = evaluate_collection(spec, flat, reference_root=raw, member={"A_001": 802}, num_processes=1)
    assert list(res["members"]) == ["Dataset802_B"] and res["members_without_predictions"] == ["Dataset801_A"]
    write(flat / "nobody.nii.gz", seg())
    with pytest.raises(ValueError, match=r"no reference in any member.*nobody\.nii\.gz"):
        evaluate_collection(spec, flat, reference_root=raw, member={"A_001": 802}, num_processes=1)
    write(pred / "loose.nii.gz", seg())
    with pytest.raises(ValueError, match="both member sub-folders"):
        evaluate_collection(spec, pred, reference_root=raw, num_processes=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no prediction files"):
        evaluate_collection(spec, tmp_path / "empty", reference_root=raw, num_processes=1)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def cli_env(two_members, tmp_path, monkeypatch):
    spec, raw, pred = two_members
    pre = tmp_path / "preprocessed"
    spec.save(pre / spec.name / "collection.json")
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    return spec, raw, pred


def test_cli_collection_dataset_and_labels(cli_env, tmp_path, capsys):
    from nnharmony.cli.evaluate import main

    spec, raw, pred = cli_env
    out = tmp_path / "cli_c"
    main(["-pred", str(pred), "-c", spec.name, "--nsd-tolerance", "1", "-o", str(out), "-np", "1"])
    printed = capsys.readouterr().out
    assert "| member | label | n | Dice | NSD |" in printed and "| Dataset802_B | tumour | 2 |" in printed
    assert json.loads((out / "summary.json").read_text())["collection"] == spec.name

    # -d: labels and REF (labelsTr) from $nnUNet_raw
    out_d = tmp_path / "cli_d"
    main(["-pred", str(pred / "Dataset802_B"), "-d", "802", "-o", str(out_d), "-np", "1"])
    printed = capsys.readouterr().out
    assert "| member | label | n | Dice |" in printed and "| Dataset802_B | tumour | 2 | 0.500 ± 0.707 |" in printed
    assert {"summary.json", "results.md", "results.csv"} <= {p.name for p in out_d.iterdir()}

    # -l with a dataset.json, REF given, output in PRED
    main(["-ref", str(raw / "Dataset801_A" / "labelsTr"), "-pred", str(pred / "Dataset801_A"),
          "-l", str(raw / "Dataset801_A" / "dataset.json"), "-np", "1", "--method", "m"])
    assert "| Dataset801_A | liver | m | 2 | 1.000 ± 0.000 |" in capsys.readouterr().out
    assert (pred / "Dataset801_A" / "results.csv").is_file()


def test_cli_errors(cli_env, tmp_path, capsys):
    from nnharmony.cli.evaluate import main

    spec, raw, pred = cli_env

    def fails(argv, *expected):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        for x in expected:
            assert x in err, err
        return err

    (tmp_path / "empty").mkdir()
    fails(["-pred", str(tmp_path / "empty"), "-d", "801", "-np", "1"], "no prediction files", "empty")
    write(pred / "Dataset801_A" / "X_999.nii.gz", seg())
    fails(["-pred", str(pred / "Dataset801_A"), "-d", "801", "-np", "1"], "have no reference", "X_999.nii.gz")
    (pred / "Dataset801_A" / "X_999.nii.gz").unlink()
    write(pred / "Dataset801_A" / "A_002.nii.gz", seg(), spacing=(2.0, 1.0, 2.0))
    fails(["-pred", str(pred), "-c", spec.name, "-np", "1"], "geometry mismatch", "A_002.nii.gz")
    fails(["-pred", str(pred), "-l", str(raw / "Dataset801_A" / "dataset.json")], "-ref is required")
    fails(["-pred", str(pred), "-c", "Collection999_None"], "no spec")
    fails(["-pred", str(pred), "-d", "899"], "dataset 899")


@pytest.mark.slow
def test_evaluate_folder_worker_processes_match_in_process(folder_case, tmp_path):
    ref, pred = folder_case
    a = evaluate_folder(ref, pred, LABELS, nsd_tolerance_mm=1.0, num_processes=1, output_folder=tmp_path / "a")
    b = evaluate_folder(ref, pred, LABELS, nsd_tolerance_mm=1.0, num_processes=2, output_folder=tmp_path / "b")
    assert summary_rows(a, LABELS) == summary_rows(b, LABELS)
