"""Catalogue of bad raw-data inputs (issue 22 items 2, 7 and case names; issue 15's real-data cases).

Every row is one user action on a tiny dataset built in ``tmp_path``: a command line (``nnharmony_convert``,
``nnharmony_plan_and_preprocess``) or an API call (prediction inputs, UniverSeg support sets). A bad row must
end with one line that names the file and the problem (the CLIs print ``error: ...`` and exit with status 2),
and the listing of every file under ``tmp_path`` taken before the call must equal the one taken after it:
nothing half-written, nothing written outside the target. Rows marked ``ok`` are inputs that must be accepted.

``new`` rows fail on the code before this file was added (truncated/corrupt files, support geometry, case
names); the others document what already worked, so that the catalogue covers raw data completely.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_data
from test_raw_validation import _img

SHAPE = (4, 6, 7)  # numpy (z, y, x)


# ---------------------------------------------------------------------------------------------- builders
def _label(shape=SHAPE, dtype=np.uint8, value=1) -> np.ndarray:
    lab = np.zeros(shape, dtype)
    lab[(slice(1, 3),) * len(shape)] = value
    return lab


def raw_dataset(root: Path, name="Dataset001_Tiny", n=2, channels=("CT",), labels=None, ending=".nii.gz") -> Path:
    """A valid nnU-Net raw dataset with ``n`` cases ``case_000``..."""
    folder = root / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    shape = (40, 50) if ending == ".png" else SHAPE
    for i in range(n):
        for c in range(len(channels)):
            a = rng.integers(0, 255, shape).astype(np.uint8) if ending == ".png" else \
                rng.normal(size=shape).astype(np.float32)
            sitk.WriteImage(_img(a), str(folder / "imagesTr" / f"case_{i:03d}_{c:04d}{ending}"))
        sitk.WriteImage(_img(_label(shape)), str(folder / "labelsTr" / f"case_{i:03d}{ending}"))
    dj = {"channel_names": {str(i): c for i, c in enumerate(channels)},
          "labels": labels or {"background": 0, "organ": 1}, "numTraining": n, "file_ending": ending}
    (folder / "dataset.json").write_text(json.dumps(dj))
    return folder


def plain_folder(src: Path, n=2, shape=SHAPE, ending=".nii.gz", label_values=(1,)) -> tuple[Path, Path]:
    """``src/images/case_00i_0000<ending>`` + ``src/labels/case_00i<ending>``."""
    img_dir, lab_dir = src / "images", src / "labels"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        a = rng.integers(0, 255, size=shape).astype(np.uint8 if ending == ".png" else np.float32)
        sitk.WriteImage(_img(a), str(img_dir / f"case_{i:03d}_0000{ending}"))
        sitk.WriteImage(_img(_label(shape, value=label_values[i % len(label_values)])),
                        str(lab_dir / f"case_{i:03d}{ending}"))
    return img_dir, lab_dir


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite(path: Path, fn) -> None:
    sitk.WriteImage(fn(sitk.ReadImage(str(path))), str(path))


def big_image(path: Path, shape=(24, 40, 40)) -> None:
    """A larger image (several deflate blocks), so that cutting it leaves a readable header."""
    sitk.WriteImage(_img(np.random.default_rng(2).normal(size=shape).astype(np.float32)), str(path),
                    useCompression=True)


def wbc_plain_folder(src: Path, n=3) -> tuple[Path, Path, Path]:
    """Real 2D PNG data (WBC microscopy, site 1) laid out as a plain folder + labels.json (issue 15): the first
    case, then the first ones whose size differs from it (the images are 88-120 px wide and high)."""
    data = shared_data("wbc_source1_microscopy")
    img_dir, lab_dir = src / "images", src / "labels"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir()
    files = sorted((data / "labelsTr").glob("*.png"))
    first = sitk.ImageFileReader()
    first.SetFileName(str(files[0]))
    first.ReadImageInformation()

    def size(p):
        r = sitk.ImageFileReader()
        r.SetFileName(str(p))
        r.ReadImageInformation()
        return r.GetSize()

    picked = [files[0]] + [p for p in files[1:] if size(p) != first.GetSize()][: n - 1]
    for p in picked:
        shutil.copy(p, lab_dir / p.name)
        shutil.copy(data / "imagesTr" / f"{p.stem}_0000.png", img_dir / f"{p.stem}_0000.png")
    labels_json = src / "labels.json"
    labels_json.write_text(json.dumps({"labels": {"cytoplasm": 1, "nucleus": 2}, "modality": "microscopy"}))
    return img_dir, lab_dir, labels_json


# ---------------------------------------------------------------------------------------------- actions
def convert(argv: list[str]) -> tuple[int, str]:
    from nnharmony.cli.convert import main

    return main(argv), ""


def plan(argv: list[str]) -> tuple[int, str]:
    from nnharmony.cli.plan_and_preprocess import main

    try:
        main(argv)
    except SystemExit as e:
        return int(e.code), ""
    return 0, ""


def api(fn: Callable[[], object]) -> tuple[int, str]:
    """An API call as the CLIs run it: ValueError/FileNotFoundError become ``error: ...`` and status 2."""
    try:
        fn()
    except (ValueError, FileNotFoundError) as e:
        return 2, f"error: {e}"
    return 0, ""


@dataclass
class Row:
    """``setup(tmp_path)`` builds the inputs and returns the action; ``expect``: substrings of one error line
    (file name first, then the problem); ``None`` = accepted. ``ok_check(tmp_path)`` inspects an accepted run."""

    id: str
    setup: Callable[[Path], Callable[[], tuple[int, str]]]
    expect: tuple[str, ...] | None
    new: bool = False
    ok_check: Callable[[Path], None] | None = None


def _check(folder: Path, *extra: str):
    return lambda: convert(["check", "-d", str(folder), *extra])


def _folder(img_dir: Path, lab_dir: Path, raw: Path, *extra: str):
    return lambda: convert(["folder", "-i", str(img_dir), "-l", str(lab_dir), "-d", "950", "-n", "Plain",
                            "-o", str(raw), *extra])


# ---- rows: integrity of files (issue 22 item 2) --------------------------------------------------------------
def s_truncated_label_check(t):
    f = raw_dataset(t / "raw")
    big_image(f / "labelsTr" / "case_001.nii.gz")  # geometry mismatch does not matter: refused before
    truncate(f / "labelsTr" / "case_001.nii.gz")
    return _check(f)


def s_truncated_image_plan(t):
    f = raw_dataset(t / "raw")
    img = f / "imagesTr" / "case_000_0000.nii.gz"
    big_image(img, shape=(4, 600, 700))
    rewrite(f / "labelsTr" / "case_000.nii.gz", lambda im: _img(_label((4, 600, 700))))
    truncate(img)
    return lambda: plan(["-d", "1", "-n", "Collection950_Bad", "-c", "3d_fullres"])


def s_corrupt_crc_check(t):
    f = raw_dataset(t / "raw")
    flip_byte(f / "imagesTr" / "case_001_0000.nii.gz")
    return _check(f)


def s_truncated_plain_nii(t):
    f = raw_dataset(t / "raw", ending=".nii")
    big_image(f / "imagesTr" / "case_000_0000.nii", shape=SHAPE)
    truncate(f / "imagesTr" / "case_000_0000.nii", 0.8)
    return _check(f)


def s_corrupt_png_check(t):
    f = raw_dataset(t / "raw", ending=".png")
    flip_byte(f / "imagesTr" / "case_001_0000.png")
    return _check(f)


def s_truncated_nrrd_convert(t):
    img_dir, lab_dir = plain_folder(t / "src", ending=".nrrd")
    big = img_dir / "case_001_0000.nrrd"
    big_image(big, (4, 60, 70))
    rewrite(lab_dir / "case_001.nrrd", lambda im: _img(_label((4, 60, 70))))
    truncate(big)
    return _folder(img_dir, lab_dir, t / "raw", "-m", "CT", "--labels", "organ=1")


def s_truncated_mha_convert(t):
    img_dir, lab_dir = plain_folder(t / "src", ending=".mha")
    big = img_dir / "case_000_0000.mha"
    big_image(big, (4, 60, 70))
    rewrite(lab_dir / "case_000.mha", lambda im: _img(_label((4, 60, 70))))
    truncate(big)
    return _folder(img_dir, lab_dir, t / "raw", "-m", "CT", "--labels", "organ=1")


def s_truncated_label_convert(t):
    img_dir, lab_dir = plain_folder(t / "src")
    big_image(img_dir / "case_000_0000.nii.gz", (8, 60, 70))
    sitk.WriteImage(_img(_label((8, 60, 70))), str(lab_dir / "case_000.nii.gz"))
    truncate(lab_dir / "case_000.nii.gz", 0.3)
    return _folder(img_dir, lab_dir, t / "raw", "-m", "CT", "--labels", "organ=1")


def s_truncated_predict_input(t):
    from nnharmony.inference.predict_folder import list_cases

    inp = t / "in"
    inp.mkdir()
    big_image(inp / "p1_0000.nii.gz")
    truncate(inp / "p1_0000.nii.gz")
    return lambda: api(lambda: list_cases(inp, ".nii.gz"))


def s_truncated_predict_input_auto(t):
    from nnharmony.inference.predict_folder import list_cases_any_ending

    inp = t / "in"
    inp.mkdir()
    big_image(inp / "p1_0000.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.uint8)), str(inp / "p2_0000.png"))
    truncate(inp / "p1_0000.nii.gz")  # a member's ending with a broken file must not be skipped silently
    return lambda: api(lambda: list_cases_any_ending(inp, [".nii.gz", ".png"]))


def _support(t: Path) -> Path:
    sup = t / "support"
    sup.mkdir()
    for c in ("s1", "s2"):
        sitk.WriteImage(_img(np.random.default_rng(4).normal(size=SHAPE).astype(np.float32)),
                        str(sup / f"{c}_0000.nii.gz"))
        sitk.WriteImage(_img(_label()), str(sup / f"{c}.nii.gz"))
    return sup


def _read_support(sup: Path):
    from nnharmony.inference.support import find_support_pairs, read_support_set

    return lambda: api(lambda: read_support_set(find_support_pairs(sup), dim=3))


def s_truncated_support_label(t):
    sup = _support(t)
    big_image(sup / "s2.nii.gz")
    truncate(sup / "s2.nii.gz")
    return _read_support(sup)


def s_truncated_universeg_input(t):
    from nnharmony.inference.support import list_input_cases

    inp = t / "in"
    inp.mkdir()
    big_image(inp / "q_0000.nii.gz")
    truncate(inp / "q_0000.nii.gz")

    return lambda: api(lambda: list_input_cases(inp))  # listed before the model is loaded


# ---- rows: UniverSeg support geometry (issue 22 item 7) ------------------------------------------------------
def _support_label_change(**kw):
    def setup(t):
        sup = _support(t)
        rewrite(sup / "s2.nii.gz", lambda im: _img(sitk.GetArrayFromImage(im), **kw))
        return _read_support(sup)

    return setup


# ---- rows: case names (issue 22, not yet tried) --------------------------------------------------------------
def s_case_id_dotdot(t):
    img_dir, lab_dir = plain_folder(t / "src", n=1)
    return lambda: convert(["folder", "-i", str(img_dir / "case_000_0000.nii.gz"), "-l",
                            str(lab_dir / "case_000.nii.gz"), "-d", "950", "-n", "Plain", "-o", str(t / "raw"),
                            "-m", "CT", "--labels", "organ=1", "--case-ids", "../../escaped"])


def s_case_id_separator(t):
    img_dir, lab_dir = plain_folder(t / "src", n=1)
    return lambda: convert(["folder", "-i", str(img_dir / "case_000_0000.nii.gz"), "-l",
                            str(lab_dir / "case_000.nii.gz"), "-d", "950", "-n", "Plain", "-o", str(t / "raw"),
                            "-m", "CT", "--labels", "organ=1", "--case-ids", "sub/x"])


def s_case_file_dotdot(t):
    img_dir, lab_dir = plain_folder(t / "src", n=2)
    (img_dir / "case_001_0000.nii.gz").rename(img_dir / "a..b_0000.nii.gz")
    (lab_dir / "case_001.nii.gz").rename(lab_dir / "a..b.nii.gz")
    return _folder(img_dir, lab_dir, t / "raw", "-m", "CT", "--labels", "organ=1")


# ---- rows: dataset.json, files, geometry, values (already working) -------------------------------------------
def _dj_change(**changes):
    def setup(t):
        f = raw_dataset(t / "raw")
        dj = json.loads((f / "dataset.json").read_text())
        for k, v in changes.items():
            if v is None:
                dj.pop(k)
            else:
                dj[k] = v
        (f / "dataset.json").write_text(json.dumps(dj))
        return _check(f)

    return setup


def s_invalid_json(t):
    f = raw_dataset(t / "raw")
    (f / "dataset.json").write_text("{not json")
    return _check(f)


def s_label_geometry(**kw):
    def setup(t):
        f = raw_dataset(t / "raw")
        rewrite(f / "labelsTr" / "case_001.nii.gz", lambda im: _img(sitk.GetArrayFromImage(im), **kw))
        return _check(f)

    return setup


def s_undeclared_label(t):
    f = raw_dataset(t / "raw")
    sitk.WriteImage(_img(_label(value=7)), str(f / "labelsTr" / "case_001.nii.gz"))
    return _check(f)


def s_uint16_undeclared(t):
    f = raw_dataset(t / "raw")
    sitk.WriteImage(_img(_label(dtype=np.uint16, value=600)), str(f / "labelsTr" / "case_001.nii.gz"))
    return _check(f)


def s_uint16_plain_ok(t):
    img_dir, lab_dir = plain_folder(t / "src")
    for i, v in enumerate((200, 600)):
        sitk.WriteImage(_img(_label(dtype=np.uint16, value=v)), str(lab_dir / f"case_{i:03d}.nii.gz"))
    return _folder(img_dir, lab_dir, t / "raw", "-m", "MR", "--labels", "myo=200", "rv=600")


def _uint16_ok(t):
    dj = json.loads((t / "raw" / "Dataset950_Plain" / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "myo": 1, "rv": 2}


def s_nonfinite(value):
    def setup(t):
        f = raw_dataset(t / "raw")
        a = np.ones(SHAPE, np.float32)
        a[0, 0, 0] = value
        sitk.WriteImage(_img(a), str(f / "imagesTr" / "case_000_0000.nii.gz"))
        return _check(f)

    return setup


def s_mixed_dims(t):
    f = raw_dataset(t / "raw")
    sitk.WriteImage(_img(np.zeros((6, 7), np.float32)), str(f / "imagesTr" / "case_001_0000.nii.gz"))
    sitk.WriteImage(_img(_label((6, 7))), str(f / "labelsTr" / "case_001.nii.gz"))
    return _check(f)


def s_missing_channel(t):
    f = raw_dataset(t / "raw", channels=("T1", "T2"))
    (f / "imagesTr" / "case_001_0001.nii.gz").unlink()
    return _check(f)


def s_missing_case(t):
    f = raw_dataset(t / "raw")
    for p in (f / "imagesTr").glob("case_001_*"):
        p.unlink()
    return _check(f)


def s_image_without_label(t):
    f = raw_dataset(t / "raw")
    (f / "labelsTr" / "case_001.nii.gz").unlink()
    return _check(f)


def s_num_training(t):
    f = raw_dataset(t / "raw")
    (f / "labelsTr" / "case_001.nii.gz").unlink()
    for p in (f / "imagesTr").glob("case_001_*"):
        p.unlink()
    return _check(f)


def s_plain_geometry(t):
    img_dir, lab_dir = plain_folder(t / "src")
    rewrite(lab_dir / "case_001.nii.gz", lambda im: _img(sitk.GetArrayFromImage(im), spacing=(1.0, 1.0, 3.0)))
    return _folder(img_dir, lab_dir, t / "raw", "-m", "CT", "--labels", "organ=1")


def s_plain_undeclared(t):
    img_dir, lab_dir = plain_folder(t / "src", label_values=(1, 3))
    return _folder(img_dir, lab_dir, t / "raw", "-m", "CT", "--labels", "organ=1")


# ---- rows: issue 15, colour label maps, case groups, 2D + 3D members ------------------------------------------
def s_real_rgb_label_png(t):
    img_dir, lab_dir, lj = wbc_plain_folder(t / "src")
    p = sorted(lab_dir.glob("*.png"))[0]
    g = sitk.ReadImage(str(p))
    sitk.WriteImage(sitk.Compose(g, g, g), str(p))
    return _folder(img_dir, lab_dir, t / "raw", "--labels-json", str(lj))


def s_real_group_pattern_misses(t):
    """BTCV slices of three patients imported with a group pattern that only matches patient 0."""
    data = shared_data("btcv_ct_slices")
    src = t / "src"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    cases = ["btcv_0_061", "btcv_1_064", "btcv_2_090"]
    for c in cases:
        shutil.copy(data / "imagesTr" / f"{c}_0000.png", src / "imagesTr" / f"{c}_0000.png")
        shutil.copy(data / "labelsTr" / f"{c}.png", src / "labelsTr" / f"{c}.png")
    dj = json.loads((data / "dataset.json").read_text())
    (src / "dataset.json").write_text(json.dumps({**dj, "numTraining": len(cases)}))
    return lambda: convert(["nnunet", "-i", str(src), "-d", "951", "-n", "BTCV", "-o", str(t / "raw"),
                            "--group-pattern", r"^btcv_(0)_"])


def s_mixed_2d_3d_plan(t):
    raw_dataset(t / "raw", "Dataset001_Png", ending=".png")
    raw_dataset(t / "raw", "Dataset002_Vol")
    return lambda: plan(["-d", "1", "2", "-n", "Collection950_Mixed", "-c", "3d_fullres"])


# ---- rows: issue 15, real 2D PNG data (WBC microscopy) ------------------------------------------------------
def s_real_rgb_png(t):
    img_dir, lab_dir, lj = wbc_plain_folder(t / "src")
    p = sorted(img_dir.glob("*.png"))[1]
    g = sitk.ReadImage(str(p))
    sitk.WriteImage(sitk.Compose(g, g, g), str(p))
    return _folder(img_dir, lab_dir, t / "raw", "--labels-json", str(lj))


def s_real_rgb_png_check(t):
    data = shared_data("wbc_source1_microscopy")
    f = t / "raw" / "Dataset001_Tiny"
    (f / "imagesTr").mkdir(parents=True)
    (f / "labelsTr").mkdir()
    for p in sorted((data / "labelsTr").glob("*.png"))[:3]:
        shutil.copy(p, f / "labelsTr" / p.name)
        shutil.copy(data / "imagesTr" / f"{p.stem}_0000.png", f / "imagesTr" / f"{p.stem}_0000.png")
    dj = json.loads((data / "dataset.json").read_text())
    dj["numTraining"] = 3
    (f / "dataset.json").write_text(json.dumps(dj))
    p = sorted((f / "imagesTr").glob("*.png"))[2]
    g = sitk.ReadImage(str(p))
    sitk.WriteImage(sitk.Compose(g, g, g), str(p))
    return _check(f)


def s_real_label_out_of_set(t):
    img_dir, lab_dir, lj = wbc_plain_folder(t / "src")
    p = sorted(lab_dir.glob("*.png"))[0]
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
    a[0, 0] = 128  # the source's unconverted gray value
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
    return _folder(img_dir, lab_dir, t / "raw", "--labels-json", str(lj))


def s_real_labels_json_missing(t):
    img_dir, lab_dir, lj = wbc_plain_folder(t / "src")
    lj.write_text(json.dumps({"labels": {"cytoplasm": 1}, "modality": "microscopy"}))
    return _folder(img_dir, lab_dir, t / "raw", "--labels-json", str(lj))


def s_real_sizes_differ_ok(t):
    img_dir, lab_dir, lj = wbc_plain_folder(t / "src", n=6)
    sizes = {sitk.ReadImage(str(p)).GetSize() for p in img_dir.glob("*.png")}
    assert len(sizes) > 1, "the first WBC cases should differ in size"
    return _folder(img_dir, lab_dir, t / "raw", "--labels-json", str(lj))


def _sizes_ok(t):
    from nnharmony.dataset_conversion.validation import validate_raw_dataset

    folder = t / "raw" / "Dataset950_Plain"
    validate_raw_dataset(folder)
    sizes = {sitk.ReadImage(str(p)).GetSize() for p in (folder / "imagesTr").glob("*")}
    assert len(sizes) > 1


REAL = "realdata"
CATALOGUE = [
    # integrity of image files (issue 22 item 2): SimpleITK reads the missing part as zeros
    Row("truncated .nii.gz label, convert check", s_truncated_label_check,
        ("labelsTr/case_001.nii.gz: truncated gzip stream",), new=True),
    Row("truncated .nii.gz image, plan_and_preprocess", s_truncated_image_plan,
        ("imagesTr/case_000_0000.nii.gz: truncated gzip stream",), new=True),
    Row("gzip CRC error, convert check", s_corrupt_crc_check,
        ("imagesTr/case_001_0000.nii.gz: corrupt gzip data",), new=True),
    Row("truncated plain .nii, convert check", s_truncated_plain_nii,
        ("imagesTr/case_000_0000.nii: truncated NIfTI",), new=True),
    Row("PNG CRC error, convert check", s_corrupt_png_check,
        ("imagesTr/case_001_0000.png: corrupt PNG: CRC error",), new=True),
    Row("truncated .nii.gz label, convert folder", s_truncated_label_convert,
        ("labels/case_000.nii.gz: truncated gzip stream",), new=True),
    Row("truncated gzip .nrrd, convert folder", s_truncated_nrrd_convert,
        ("images/case_001_0000.nrrd: truncated gzip stream",), new=True),
    Row("truncated compressed .mha, convert folder", s_truncated_mha_convert,
        ("images/case_000_0000.mha: truncated MetaImage compressed data",), new=True),
    Row("truncated prediction input", s_truncated_predict_input, ("in/p1_0000.nii.gz: truncated gzip stream",),
        new=True),
    Row("truncated prediction input, --dataset auto", s_truncated_predict_input_auto,
        ("in/p1_0000.nii.gz: truncated gzip stream",), new=True),
    Row("truncated UniverSeg support label", s_truncated_support_label,
        ("support/s2.nii.gz: truncated gzip stream",), new=True),
    Row("truncated UniverSeg input", s_truncated_universeg_input, ("input image", "in/q_0000.nii.gz: truncated gzip stream"),
        new=True),
    # UniverSeg support label geometry (issue 22 item 7)
    Row("support label origin differs", _support_label_change(origin=(5.0, 0.0, 0.0)),
        ("support/s2.nii.gz: geometry mismatch with its image", "s2_0000.nii.gz", "origin"), new=True),
    Row("support label direction differs",
        _support_label_change(direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)),
        ("support/s2.nii.gz: geometry mismatch with its image", "s2_0000.nii.gz", "direction"), new=True),
    Row("support label spacing differs", _support_label_change(spacing=(1.0, 1.0, 3.0)),
        ("support/s2.nii.gz: geometry mismatch with its image", "s2_0000.nii.gz", "spacing"), new=True),
    # case names (issue 22, not tried before)
    Row("case id with '..', convert folder", s_case_id_dotdot,
        ("case name '../../escaped'", "case_000_0000.nii.gz", "contains a path separator"), new=True),
    Row("case id with '/', convert folder", s_case_id_separator,
        ("case name 'sub/x'", "case_000_0000.nii.gz", "contains a path separator"), new=True),
    Row("file name with '..', convert folder", s_case_file_dotdot,
        ("images/a..b_0000.nii.gz: case name 'a..b' contains '..'",), new=True),
    # dataset.json and files (worked before)
    Row("dataset.json invalid JSON", s_invalid_json, ("dataset.json: invalid JSON",)),
    Row("dataset.json without labels", _dj_change(labels=None), ("dataset.json: required key(s) ['labels']",)),
    Row("dataset.json channel without name", _dj_change(channel_names={"0": ""}),
        ("dataset.json: channel 0 has no modality name",)),
    Row("dataset.json labels not consecutive", _dj_change(labels={"background": 0, "organ": 2}),
        ("dataset.json: label values must be consecutive",)),
    Row("numTraining wrong", _dj_change(numTraining=3), ("numTraining = 3 but 2 training case(s)",)),
    Row("missing channel file", s_missing_channel, ("imagesTr/case_001_0001.nii.gz: missing",)),
    Row("label without image", s_missing_case, ("imagesTr/case_001_0000.nii.gz: missing", "lacks channel(s) [0]")),
    Row("image without label", s_image_without_label,
        ("imagesTr/case_001_*.nii.gz: image(s) without a label file labelsTr/case_001.nii.gz",)),
    Row("image and label removed (count)", s_num_training, ("numTraining = 2 but 1 training case(s)",)),
    # geometry and values (worked before)
    Row("label origin differs", s_label_geometry(origin=(3.0, 0.0, 0.0)),
        ("labelsTr/case_001.nii.gz: geometry mismatch with imagesTr/case_001_0000.nii.gz: origin",)),
    Row("label direction differs", s_label_geometry(direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)),
        ("labelsTr/case_001.nii.gz: geometry mismatch with imagesTr/case_001_0000.nii.gz: direction",)),
    Row("label spacing differs", s_label_geometry(spacing=(1.0, 1.0, 3.0)),
        ("labelsTr/case_001.nii.gz: geometry mismatch with imagesTr/case_001_0000.nii.gz: spacing",)),
    Row("undeclared label value", s_undeclared_label,
        ("labelsTr/case_001.nii.gz: label value(s) [7] not declared",)),
    Row("uint16 label with undeclared value", s_uint16_undeclared,
        ("labelsTr/case_001.nii.gz: label value(s) [600] not declared",)),
    Row("uint16 labels 200/600 remapped, convert folder", s_uint16_plain_ok, None, ok_check=_uint16_ok),
    Row("NaN in image", s_nonfinite(np.nan), ("imagesTr/case_000_0000.nii.gz: image contains 1 NaN",)),
    Row("Inf in image", s_nonfinite(np.inf), ("imagesTr/case_000_0000.nii.gz: image contains 0 NaN and 1 Inf",)),
    Row("2D and 3D cases mixed", s_mixed_dims, ("cases of different dimensionality", "2D", "3D")),
    Row("plain folder label spacing differs", s_plain_geometry,
        ("labels/case_001.nii.gz: geometry mismatch with image", "spacing")),
    Row("plain folder label value not declared", s_plain_undeclared,
        ("labels/case_001.nii.gz: label value(s) [3] not declared",)),
    # issue 15 on real data (2D PNG)
    Row("real: RGB PNG where one channel is declared, convert folder", s_real_rgb_png,
        ("_0000.png: 3 components per voxel", "/images/wbc1_")),
    Row("real: RGB PNG where one channel is declared, convert check", s_real_rgb_png_check,
        ("imagesTr/wbc1_003_0000.png: 3 components per voxel",)),
    Row("real: label PNG value outside the label set", s_real_label_out_of_set,
        ("labels/wbc1_001.png: label value(s) [128] not declared",)),
    Row("real: labels.json misses a value in the label files", s_real_labels_json_missing,
        ("labels/wbc1_001.png: label value(s) [2] not declared",)),
    Row("real: 2D images of different sizes are accepted", s_real_sizes_differ_ok, None, ok_check=_sizes_ok),
    Row("real: RGB label PNG, convert folder", s_real_rgb_label_png,
        ("labels/wbc1_001.png: 3 components per voxel (RGB image); a label map must be a single-channel",), new=True),
    Row("real: case group pattern that misses cases, convert nnunet", s_real_group_pattern_misses,
        ("dataset.json: 'case_groups' gives no group to 2 case(s)", "btcv_1_064"), new=True),
    Row("2D and 3D members planned with 3d_fullres", s_mixed_2d_3d_plan,
        ("can only be planned together with -c 2d", "2D: Dataset001_Png", "3D: Dataset002_Vol"), new=True),
]


_PROGRESS = re.compile(r"\d+/\d+ \[[^\]]*(it/s|s/it)\]")  # a tqdm progress bar line (validation of several members)


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    "row", [pytest.param(r, id=r.id, marks=[pytest.mark.realdata] if r.id.startswith("real") else [])
            for r in CATALOGUE])
def test_bad_raw_input_catalogue(row: Row, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    monkeypatch.delenv("NNHARMONY_DEBUG", raising=False)
    (tmp_path / "raw").mkdir(exist_ok=True)
    action = row.setup(tmp_path)
    capsys.readouterr()
    before = _listing(tmp_path)
    rc, api_err = action()
    captured = capsys.readouterr()
    err = api_err or captured.err
    if row.expect is None:
        assert rc == 0, err
        row.ok_check(tmp_path)
        return
    assert rc == 2, f"accepted (exit {rc}); stdout: {captured.out[-500:]}"
    lines = [ln for ln in err.splitlines() if row.expect[0] in ln]
    assert lines, f"no line with {row.expect[0]!r} in:\n{err}"
    assert all(e in lines[0] for e in row.expect), f"expected {row.expect} in one line:\n{lines[0]}"
    assert "error" in [ln for ln in err.splitlines() if ln.strip() and not _PROGRESS.search(ln)][0]
    assert _listing(tmp_path) == before, "files were written or removed although the input was refused"
