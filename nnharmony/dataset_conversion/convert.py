"""Converters into nnU-Net raw format (``$nnUNet_raw/DatasetXXX_Name``).

Four sources:

- ``convert_msd``: a Medical Segmentation Decathlon task folder (``TaskXX_Name`` with ``imagesTr``,
  ``labelsTr``, ``imagesTs`` and an MSD ``dataset.json``); 4D multi-modal images are split into one file per
  channel.
- ``convert_plain_folder``: images and labels in any format SimpleITK reads, paired by case name (regex) or
  given as lists; modality names per channel and label names (name -> source value(s)) from arguments or a
  small JSON (for example TotalSegmentator's ``labels.json``).
- ``import_nnunet_dataset``: an existing nnU-Net raw folder copied (or linked) under a new id, with its label
  maps checked and cast to integers (real datasets store labels as float32 now and then).
- ``split_by_site``: one dataset split into one dataset per site/institution from a CSV ``case,site``; this is
  how cross-institution collections are built.

Common rules:

- **Validation before work.** All inputs are checked first (readable files, geometry of every channel against
  the label, integral label values, declared label values, dimensionality); errors name the target dataset, the
  source file and the problem, listing every offending file at once.
- **Nothing half-written.** Every dataset is built in a hidden staging folder next to the target
  (``$nnUNet_raw/.DatasetXXX_Name.*.partial``), validated with
  :func:`nnharmony.dataset_conversion.validation.validate_raw_dataset`, and only then renamed into place. On any
  error the staging folder is removed. An id already in use is refused unless ``overwrite=True``.
- **Consecutive labels.** nnU-Net needs label values 0..N. Source values are remapped to 1..N in the order of
  their source values, and the mapping is recorded in ``dataset.json`` under ``nnharmony_conversion``
  (``label_source_values``: output name -> source values). Several source values may be merged into one label
  (``{"spinal_cord": [2, 3, 4, 5]}``).
- **Which labels are kept** (``keep``): a label vocabulary such as TotalSegmentator's 117 CT classes declares
  far more structures than a dataset annotates. With ``keep="present"`` (default for ``convert_plain_folder``)
  only declared labels with at least one voxel in the dataset are kept; absent ones are listed in
  ``dropped_labels``. With ``keep="declared"`` (default for MSD and nnU-Net imports, whose label lists describe
  what was annotated) every declared label is kept. A label value found in a file but not declared is an error
  (or background with ``undeclared="background"``).
- Label maps are written as uint8 (uint16 above 255 labels) on the first channel's grid; images keep their pixel
  type (float64 becomes float32). Output files are ``.nii.gz``, or ``.png`` when a plain folder holds only PNG
  files (2D natural images stay in nnU-Net's PNG format, so predictions come back as PNG);
  ``import_nnunet_dataset`` keeps the source's file ending.
- **Grouped cases** (``case_groups``): slices or scans of one patient can be declared as a group (a case-name
  regex or a dict, written to dataset.json) so that cross-validation never splits a group
  (:mod:`nnharmony.data.splits`).

Why not nnunetv2's ``convert_MSD_dataset``: it writes straight into the ``nnUNet_raw`` read at import time,
copies 3D images unchecked, asserts instead of explaining, and leaves a partial folder behind on failure. The
file layout and dataset.json translation here follow it exactly (``CASE_XXXX.nii.gz`` per channel of a 4D
image, ``modality`` -> ``channel_names``, ``labels`` inverted to name -> value).
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from nnharmony.data.collection import CollectionError, fold_name
from nnharmony.dataset_conversion.image_integrity import image_file_problem
from nnharmony.dataset_conversion.validation import (
    PARALLEL_MIN_CASES,
    Geometry,
    _nifti_nonfinite,
    check_channel_names,
    check_image_array,
    components_problem,
    geometry_mismatch,
    list_cases,
    resolve_dataset_folder,
    validate_raw_dataset,
)

__all__ = [
    "DatasetStager",
    "convert_msd",
    "convert_plain_folder",
    "import_nnunet_dataset",
    "split_by_site",
    "load_label_spec",
    "dataset_folder_name",
]

IMAGE_EXTENSIONS = (
    ".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".hdr", ".gipl", ".gipl.gz", ".vtk",
    ".tif", ".tiff", ".png", ".bmp", ".jpg", ".jpeg",
)
_EXT_RE = "|".join(re.escape(e) for e in sorted(IMAGE_EXTENSIONS, key=len, reverse=True))
DEFAULT_IMAGE_PATTERN = rf"^(?P<case>.+?)(?:_(?P<channel>\d{{4}}))?(?P<ext>{_EXT_RE})$"
DEFAULT_LABEL_PATTERN = rf"^(?P<case>.+?)(?P<ext>{_EXT_RE})$"
OUT_FILE_ENDING = ".nii.gz"
LINK_MODES = ("copy", "hardlink", "symlink")


# ---------------------------------------------------------------------------------------------- naming
def _check_dataset_id(dataset_id: Any) -> int:
    if isinstance(dataset_id, (int, np.integer)) and not isinstance(dataset_id, bool):
        did = int(dataset_id)
    elif isinstance(dataset_id, str) and dataset_id.strip().isdigit():
        did = int(dataset_id)
    else:
        raise CollectionError(f"dataset id must be an integer, got {dataset_id!r}")
    if did < 1:
        raise CollectionError(f"dataset id must be >= 1, got {did}")
    return did


def sanitize_name(name: str) -> str:
    """Dataset name usable in ``DatasetXXX_Name`` (letters, digits, ``_``, ``-``)."""
    out = re.sub(r"[^A-Za-z0-9_\-]+", "", str(name).replace(" ", "_")).strip("_-")
    return out


def _check_name(name: str) -> str:
    if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise CollectionError(
            f"dataset name {name!r} is not usable in a DatasetXXX_Name folder (letters, digits, '_' and '-' only)"
        )
    return name


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{_check_dataset_id(dataset_id):03d}_{_check_name(name)}"


def sanitize_case_id(case: str) -> str:
    return re.sub(r"[^A-Za-z0-9._\-]+", "_", case).strip("_") or "case"


def _resolve_raw_root(raw_root: str | os.PathLike | None) -> Path:
    if raw_root is not None:
        return Path(raw_root)
    from nnharmony.paths import raw_dir

    try:
        return raw_dir()
    except RuntimeError as e:
        raise CollectionError(str(e)) from None


# ---------------------------------------------------------------------------------------------- staging
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_json(obj: Any, path: Path) -> None:
    """Plain JSON write, for files inside a staging folder (the folder rename is the atomic step)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


@dataclass
class _Stage:
    dataset_id: int
    target: Path
    staging: Path
    conflicts: list[Path]


class DatasetStager:
    """Builds one or several datasets in hidden staging folders and renames them into place together.

    ::

        with DatasetStager(raw_root, overwrite=False) as st:
            folder = st.add(905, "Spleen")     # staging folder to write into
            ...                                  # write imagesTr/, labelsTr/, dataset.json
            st.commit()                          # validate + rename; without commit everything is removed

    ``add`` refuses an id that is already used by a dataset in ``raw_root`` unless ``overwrite``; with
    ``overwrite`` the old folder(s) with that id are replaced at commit.
    """

    def __init__(self, raw_root: str | os.PathLike | None = None, overwrite: bool = False):
        self.raw_root = _resolve_raw_root(raw_root)
        self.overwrite = overwrite
        self.stages: list[_Stage] = []
        self.committed = False

    def existing(self, dataset_id: int) -> list[Path]:
        if not self.raw_root.is_dir():
            return []
        return sorted(p for p in self.raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())

    def add(self, dataset_id: int, name: str) -> Path:
        did = _check_dataset_id(dataset_id)
        target = self.raw_root / dataset_folder_name(did, name)
        if any(s.dataset_id == did for s in self.stages):
            raise CollectionError(f"dataset id {did} is used twice in one conversion")
        conflicts = self.existing(did)
        if conflicts and not self.overwrite:
            raise CollectionError(
                f"dataset id {did} is already taken by {', '.join(c.name for c in conflicts)} in {self.raw_root}; "
                f"choose another id or pass overwrite=True (--overwrite) to replace it"
            )
        self.raw_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=self.raw_root))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; a dataset folder gets the usual mode
        self.stages.append(_Stage(did, target, staging, conflicts))
        return staging

    def validate(self, check_images: bool = False, num_processes: int | None = None) -> None:
        for s in self.stages:
            validate_raw_dataset(s.staging, check_images=check_images, num_processes=num_processes,
                                 display_name=s.target.name)

    def commit(self, validate: bool = True, check_images: bool = False) -> list[Path]:
        """Validate every staged dataset, then move them into place (all or none)."""
        if validate:
            self.validate(check_images=check_images)
        trash = Path(tempfile.mkdtemp(prefix=".nnharmony_replaced.", dir=self.raw_root))
        moved: list[tuple[Path, Path]] = []  # (from, to) to undo
        try:
            for s in self.stages:
                for c in s.conflicts:
                    dest = trash / c.name
                    os.rename(c, dest)
                    moved.append((dest, c))
                if s.target.exists():
                    raise CollectionError(f"{s.target} appeared while converting; not replacing it")
                os.rename(s.staging, s.target)
                moved.append((s.target, s.staging))
        except BaseException:
            for src, dst in reversed(moved):
                try:
                    os.rename(src, dst)
                except OSError:
                    pass
            shutil.rmtree(trash, ignore_errors=True)
            raise
        shutil.rmtree(trash, ignore_errors=True)
        self.committed = True
        return [s.target for s in self.stages]

    def abort(self) -> None:
        for s in self.stages:
            if s.staging.exists():
                shutil.rmtree(s.staging, ignore_errors=True)

    def __enter__(self) -> "DatasetStager":
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.abort()


# ---------------------------------------------------------------------------------------------- label specs
def load_label_spec(spec: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, list[int]], list[str] | None]:
    """Label names -> source values, and modality names if the JSON gives them.

    Accepted (dict or JSON file): ``{"liver": 1, "kidney": [2, 3]}``; ``{"labels": {...}, "modality": "CT"}``
    (TotalSegmentator's labels.json); ``{"labels": {...}, "modalities": ["T1", "T2"]}``;
    ``{"channel_names": {"0": "T1"}, "labels": {...}}``; MSD style ``{"0": "background", "1": "liver"}``.
    A ``background`` entry other than 0 maps those source values to background."""
    source = str(spec) if not isinstance(spec, Mapping) else "label spec"
    if not isinstance(spec, Mapping):
        try:
            with open(spec) as f:
                spec = json.load(f)
        except FileNotFoundError:
            raise CollectionError(f"label JSON {source}: file not found") from None
        except json.JSONDecodeError as e:
            raise CollectionError(f"label JSON {source}: invalid JSON ({e})") from None
    if not isinstance(spec, Mapping):
        raise CollectionError(f"{source}: expected a JSON object")
    modalities = None
    if "labels" in spec and isinstance(spec["labels"], Mapping):
        for key in ("modalities", "modality", "channel_names"):
            if key in spec:
                m = spec[key]
                if isinstance(m, str):
                    modalities = [m]
                elif isinstance(m, Mapping):
                    modalities = check_channel_names(dict(m), source)
                else:
                    modalities = [str(x) for x in m]
                break
        spec = spec["labels"]
    labels: dict[str, list[int]] = {}
    items = list(spec.items())
    if items and all(re.fullmatch(r"\d+", str(k)) and isinstance(v, str) for k, v in items):
        items = [(v, int(k)) for k, v in items]  # MSD: value -> name
    for name, value in items:
        vs = value if isinstance(value, (list, tuple)) else [value]
        try:
            ints = [int(v) for v in vs]
            if any(int(v) != v for v in vs) or any(v < 0 for v in ints) or not ints:
                raise ValueError
        except (TypeError, ValueError):
            raise CollectionError(f"{source}: label {name!r} has invalid value {value!r} (need integers >= 0)") from None
        name = str(name).strip()
        if not name:
            raise CollectionError(f"{source}: a label has an empty name (value {value!r})")
        if name in labels:
            raise CollectionError(f"{source}: label {name!r} is declared twice")
        labels[name] = ints
    if "background" not in labels:
        labels = {"background": [0], **labels}
    seen: dict[int, str] = {}
    for name, vs in labels.items():
        for v in vs:
            if v in seen:
                raise CollectionError(f"{source}: source value {v} is declared for both {seen[v]!r} and {name!r}")
            seen[v] = name
    if 0 not in seen:
        raise CollectionError(f"{source}: no label has value 0 (background)")
    if len(labels) < 2:
        raise CollectionError(f"{source}: no foreground label declared")
    return labels, modalities


def parse_label_args(items: Sequence[str]) -> dict[str, list[int]]:
    """``["liver=1", "kidney=2,3"]`` -> ``{"liver": [1], "kidney": [2, 3]}`` (CLI helper)."""
    out: dict[str, list[int]] = {}
    for it in items:
        if "=" not in it:
            raise CollectionError(f"label {it!r}: expected NAME=VALUE or NAME=V1,V2")
        name, _, vals = it.rpartition("=")
        try:
            out[name.strip()] = [int(v) for v in vals.split(",") if v.strip()]
        except ValueError:
            raise CollectionError(f"label {it!r}: values must be integers") from None
    return out


@dataclass
class _LabelPlan:
    names: list[str]  # output labels, value = index + 1
    source_values: dict[str, list[int]]
    lut: dict[int, int]
    dropped: list[str] = field(default_factory=list)

    def labels_json(self) -> dict[str, int]:
        return {"background": 0, **{n: i + 1 for i, n in enumerate(self.names)}}


def _plan_labels(spec: Mapping[str, Sequence[int]], present: set[int], keep: str) -> _LabelPlan:
    if keep not in ("present", "declared"):
        raise CollectionError(f"keep must be 'present' or 'declared', got {keep!r}")
    fg = [(n, list(v)) for n, v in spec.items() if n != "background"]
    fg.sort(key=lambda nv: min(nv[1]))
    names, dropped, lut = [], [], {v: 0 for v in spec.get("background", [0])}
    source_values = {}
    for n, vs in fg:
        if keep == "present" and not (set(vs) & present):
            dropped.append(n)
            continue
        names.append(n)
        source_values[n] = sorted(vs)
        for v in vs:
            lut[v] = len(names)
    for n in dropped:  # dropped labels have no voxels: mapping them to 0 is a no-op, kept for completeness
        for v in spec[n]:
            lut[v] = 0
    if not names:
        raise CollectionError(
            f"none of the declared labels occurs in the label files (declared: {[n for n, _ in fg]}, "
            f"values found: {sorted(present)})"
        )
    return _LabelPlan(names, source_values, lut, dropped)


def _apply_lut(arr: np.ndarray, lut: Mapping[int, int], undeclared_to_background: bool) -> np.ndarray:
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0):
        raise ValueError("negative label values")
    vmax = int(arr.max()) if arr.size else 0
    table = np.zeros(max(vmax, max(lut)) + 1, dtype=np.int64)
    for k, v in lut.items():
        table[k] = v
    out = table[arr]
    if not undeclared_to_background:
        known = np.zeros(table.shape, dtype=bool)
        known[list(lut)] = True
        if not known[arr].all():  # checked in pass 1 already; a file changed while converting
            raise CollectionError(f"label values {sorted(set(np.unique(arr[~known[arr]]).tolist()))} not declared")
    maxv = int(max(lut.values()) if lut else 0)
    return out.astype(np.uint8 if maxv <= 255 else np.uint16)


# ---------------------------------------------------------------------------------------------- generic engine
@dataclass
class _SourceCase:
    case: str
    images: list[Path]  # one file per channel, or one 4D file holding all channels
    label: Path | None  # None for test images


def _channel_geometry(path: Path, channel_name: str | None) -> tuple[Geometry, int]:
    """Geometry of one channel and the number of channels in the file (>1 for 4D images).
    ``channel_name``: the modality declared for the file, None for a label map (for the message)."""
    g = Geometry.of_file(path)
    if g.components != 1:
        raise CollectionError(f"{path}: {components_problem(g.components, channel_name)}")
    if g.dimension == 4:
        d = np.array(g.direction).reshape(4, 4)[:3, :3].ravel()
        return Geometry(3, g.size[:3], g.spacing[:3], g.origin[:3], tuple(d)), g.size[3]
    return g, 1


def _read_label(path: Path) -> tuple[np.ndarray | None, str | None]:
    try:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as e:
        return None, f"cannot be read by SimpleITK ({_short(e)})"
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or (str(path).endswith((".nii", ".nii.gz")) and any(_nifti_nonfinite(path))):
            return None, "label map contains NaN/Inf"
        r = np.round(arr)
        bad = np.unique(arr[arr != r])
        if bad.size:
            return None, f"label map has non-integer value(s) {bad[:5].tolist()}; cannot cast it to integer labels"
        arr = r.astype(np.int64)
    elif arr.dtype.kind not in "iub":
        return None, f"label map has unsupported pixel type {arr.dtype}"
    if arr.size and arr.min() < 0:
        return None, f"label map has negative value(s) {np.unique(arr[arr < 0])[:5].tolist()}"
    return arr, None


def _short(e: Exception) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def _pmap(fn: Callable, items: Sequence, num_processes: int | None) -> list:
    """Map ``fn`` over cases; a spawn process pool for larger datasets (SimpleITK readers are not safe to use
    from several threads at once)."""
    n = num_processes if num_processes is not None else max(1, min(4, os.cpu_count() or 1))
    if n > 1 and len(items) > PARALLEL_MIN_CASES:
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as ex:
            return list(ex.map(fn, items, chunksize=2))
    return [fn(i) for i in items]


def _check_source_case(c: _SourceCase, num_channels: int, modalities: Sequence[str]):
    """Pass 1 for one case: (problems, effective dimension, label values present)."""
    probs: list[str] = []
    geoms = []
    broken = [f"{f}: {why}" for f in [*c.images, c.label] if f is not None and (why := image_file_problem(f))]
    if broken:  # truncated/corrupt: SimpleITK would read zeros for the missing part
        return broken, None, None
    for i, f in enumerate(c.images):
        try:
            g, n = _channel_geometry(f, modalities[i] if i < len(modalities) and len(c.images) > 1
                                     else ", ".join(modalities))
        except CollectionError as e:
            return [str(e)], None, None
        except RuntimeError as e:
            return [f"{f}: cannot be read by SimpleITK ({_short(e)})"], None, None
        geoms.append((f, g, n))
    n_total = sum(n for _, _, n in geoms)
    if n_total != num_channels or (len(geoms) > 1 and any(n != 1 for _, _, n in geoms)):
        probs.append(
            f"{c.images[0]}: case {c.case!r} has {n_total} channel(s) in {len(geoms)} file(s), expected "
            f"{num_channels} (modalities {list(modalities)})"
        )
        return probs, None, None
    ref = geoms[0][1]
    for f, g, _ in geoms[1:]:
        why = geometry_mismatch(ref, g)
        if why:
            probs.append(f"{f}: geometry mismatch with {c.images[0]}: {why}")
    values = None
    if c.label is not None:
        try:
            lg, ln = _channel_geometry(c.label, None)
        except CollectionError as e:
            return probs + [str(e)], None, None
        except RuntimeError as e:
            return probs + [f"{c.label}: cannot be read by SimpleITK ({_short(e)})"], None, None
        why = geometry_mismatch(ref, lg) if ln == 1 else f"label map is 4D ({ln} volumes)"
        if why:
            probs.append(f"{c.label}: geometry mismatch with image {c.images[0]}: {why}")
        else:
            arr, why = _read_label(c.label)
            if why:
                probs.append(f"{c.label}: {why}")
            else:
                values = set(np.unique(arr).tolist())
    return probs, ref.effective_dimension, values


def _write_source_case(item: tuple[_SourceCase, str], staging: Path, plan: _LabelPlan | None, undeclared: str,
                       verbatim_images: str | None, file_ending: str) -> list[str]:
    """Pass 2 for one case: write its channels and label map into ``staging``; returns problems."""
    c, sub = item
    probs = []
    out_dir = staging / sub
    first_img = None
    ch = 0
    for f in c.images:
        try:
            img = sitk.ReadImage(str(f))
        except RuntimeError as e:
            return [f"{f}: cannot be read by SimpleITK ({_short(e)})"]
        why = check_image_array(sitk.GetArrayViewFromImage(img), f)
        if why:
            probs.append(f"{f}: {why}")
            continue
        vols = [img[:, :, :, t] for t in range(img.GetSize()[3])] if img.GetDimension() == 4 else [img]
        for v in vols:
            if first_img is None:
                first_img = v
            out = out_dir / f"{c.case}_{ch:04d}{file_ending}"
            if verbatim_images is not None and len(vols) == 1:
                _link_or_copy(f, out, verbatim_images)
            else:
                if v.GetPixelID() == sitk.sitkFloat64:
                    v = sitk.Cast(v, sitk.sitkFloat32)
                sitk.WriteImage(v, str(out), useCompression=True)
            ch += 1
    if probs or c.label is None:
        return probs
    arr, why = _read_label(c.label)
    if why:
        return [f"{c.label}: {why}"]
    if plan is not None:
        arr = _apply_lut(arr, plan.lut, undeclared == "background")
    else:
        arr = arr.astype(np.uint8 if arr.max() <= 255 else np.uint16)
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(first_img)
    sitk.WriteImage(lab, str(staging / "labelsTr" / f"{c.case}{file_ending}"), useCompression=True)
    return []


def _raise_problems(target: str, problems: list[str]) -> None:
    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CollectionError(
            f"cannot convert to {target}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in shown) + more
        )


def _link_or_copy(src: Path, dst: Path, mode: str) -> None:
    if mode == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # other file system: fall back to a copy
    elif mode == "symlink":
        os.symlink(Path(src).resolve(), dst)
        return
    shutil.copyfile(src, dst)


def _convert_cases(
    target: str,
    staging: Path,
    cases: Sequence[_SourceCase],
    modalities: Sequence[str],
    label_spec: Mapping[str, Sequence[int]] | None,
    keep: str,
    undeclared: str = "error",
    test_cases: Sequence[_SourceCase] = (),
    verbatim_images: str | None = None,
    file_ending: str = OUT_FILE_ENDING,
    num_processes: int | None = None,
) -> tuple[_LabelPlan | None, set[int]]:
    """Check every source case (pass 1), then write imagesTr/labelsTr/imagesTs into ``staging`` (pass 2).

    ``label_spec=None`` keeps label values as they are (region datasets), checking them against nothing here
    (the caller validates against dataset.json). ``verbatim_images`` = link mode to copy image files unchanged
    (source already in nnU-Net layout) instead of re-writing them."""
    if undeclared not in ("error", "background"):
        raise CollectionError(f"undeclared must be 'error' or 'background', got {undeclared!r}")
    num_channels = len(modalities)
    if num_channels == 0:
        raise CollectionError(f"{target}: no modality names given (one per channel)")
    for i, m in enumerate(modalities):
        if not str(m).strip():
            raise CollectionError(f"{target}: channel {i} has no modality name")
    folded = [fold_name(m) for m in modalities]
    if len(set(folded)) != len(folded):
        raise CollectionError(f"{target}: two channels have the same modality name {list(modalities)}")
    names = [c.case for c in list(cases) + list(test_cases)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CollectionError(f"{target}: case id(s) {dup[:10]} occur more than once")
    if not cases:
        raise CollectionError(f"{target}: no training cases found")

    # ---- pass 1: headers, geometry, label values (nothing written yet)
    results = _pmap(partial(_check_source_case, num_channels=num_channels, modalities=list(modalities)),
                    list(cases) + list(test_cases), num_processes)
    problems = [p for probs, _, _ in results for p in probs]
    dims: dict[int, str] = {}
    for c, (_, d, _) in zip(list(cases) + list(test_cases), results):
        if d is not None:
            dims.setdefault(d, c.case)
    if len(dims) > 1:
        problems.append(
            "cases of different dimensionality: " + ", ".join(f"{d}D (e.g. {c!r})" for d, c in sorted(dims.items()))
        )
    _raise_problems(target, problems)

    present: set[int] = set()
    per_case_values = {c.case: r[2] for c, r in zip(cases, results)}
    for v in per_case_values.values():
        present |= v
    plan = None
    if label_spec is not None:
        plan = _plan_labels(label_spec, present, keep)
        declared_src = {v for vs in label_spec.values() for v in vs}
        if undeclared == "error":
            for c in cases:
                bad = sorted(per_case_values[c.case] - declared_src)
                if bad:
                    problems.append(
                        f"{c.label}: label value(s) {bad[:10]} not declared "
                        f"(declared: {', '.join(f'{n}={v}' for n, v in label_spec.items())[:300]})"
                    )
            _raise_problems(target, problems)

    # ---- pass 2: write
    (staging / "imagesTr").mkdir()
    (staging / "labelsTr").mkdir()
    if test_cases:
        (staging / "imagesTs").mkdir()

    items = [(c, "imagesTr") for c in cases] + [(c, "imagesTs") for c in test_cases]
    write = partial(_write_source_case, staging=staging, plan=plan, undeclared=undeclared,
                    verbatim_images=verbatim_images, file_ending=file_ending)
    problems = [p for probs in _pmap(write, items, num_processes) for p in probs]
    _raise_problems(target, problems)
    return plan, present


def _write_dataset_json(staging: Path, modalities: Sequence[str], labels: Mapping[str, Any], num_training: int,
                        file_ending: str, name: str, record: Mapping[str, Any], **extra: Any) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    extra = {k: v for k, v in extra.items() if v is not None}
    generate_dataset_json(
        str(staging),
        channel_names={i: m for i, m in enumerate(modalities)},
        labels=dict(labels),
        num_training_cases=num_training,
        file_ending=file_ending,
        dataset_name=name,
        license=extra.pop("license", "see the source dataset"),
        converted_by="nnharmony_convert",
        nnharmony_conversion=dict(record),
        **extra,
    )


# ---------------------------------------------------------------------------------------------- MSD
def convert_msd(
    task_folder: str | os.PathLike,
    dataset_id: int | None = None,
    name: str | None = None,
    raw_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    include_test: bool = True,
    num_processes: int | None = None,
) -> Path:
    """Convert an MSD task folder (``TaskXX_Name``) to ``DatasetXXX_Name``; returns the new folder.

    ``dataset_id`` defaults to the task number, ``name`` to the task name."""
    task_folder = Path(task_folder)
    if not task_folder.is_dir():
        raise CollectionError(f"MSD task folder {task_folder} does not exist")
    m = re.fullmatch(r"Task(\d+)_(.+)", task_folder.name)
    if dataset_id is None:
        if not m:
            raise CollectionError(f"{task_folder}: folder is not named TaskXX_Name; give the dataset id explicitly")
        dataset_id = int(m.group(1))
    if name is None:
        name = sanitize_name(m.group(2) if m else task_folder.name)
    target = dataset_folder_name(dataset_id, name)
    djf = task_folder / "dataset.json"
    if not djf.is_file():
        raise CollectionError(f"cannot convert to {target}: {djf} is missing (an MSD task folder has a dataset.json)")
    try:
        msd = json.loads(djf.read_text())
    except json.JSONDecodeError as e:
        raise CollectionError(f"cannot convert to {target}: {djf}: invalid JSON ({e})") from None
    for key in ("modality", "labels"):
        if key not in msd:
            raise CollectionError(f"cannot convert to {target}: {djf}: required MSD key '{key}' is missing")
    modalities = check_channel_names(msd["modality"], f"{djf}")
    label_spec, _ = load_label_spec(msd["labels"])
    for sub in ("imagesTr", "labelsTr"):
        if not (task_folder / sub).is_dir():
            raise CollectionError(f"cannot convert to {target}: {task_folder / sub} is missing")

    def usable(p: Path) -> bool:
        return not p.name.startswith((".", "_")) and p.name.endswith((".nii.gz", ".nii"))

    cases = []
    if "training" in msd:
        for e in msd["training"]:
            img = (task_folder / e["image"]).resolve()
            lab = (task_folder / e["label"]).resolve()
            missing = [str(p) for p in (img, lab) if not p.is_file()]
            if missing:
                raise CollectionError(f"cannot convert to {target}: {djf} lists missing file(s) {missing}")
            cases.append(_SourceCase(sanitize_case_id(_strip_ext(img.name)), [img], lab))
    else:
        for img in sorted(p for p in (task_folder / "imagesTr").iterdir() if usable(p)):
            lab = task_folder / "labelsTr" / img.name
            if not lab.is_file():
                raise CollectionError(f"cannot convert to {target}: {img} has no label file {lab}")
            cases.append(_SourceCase(sanitize_case_id(_strip_ext(img.name)), [img], lab))
    test_cases = []
    if include_test and (task_folder / "imagesTs").is_dir():
        for img in sorted(p for p in (task_folder / "imagesTs").iterdir() if usable(p)):
            test_cases.append(_SourceCase(sanitize_case_id(_strip_ext(img.name)), [img], None))
    with DatasetStager(raw_root, overwrite) as st:
        staging = st.add(dataset_id, name)
        plan, _ = _convert_cases(target, staging, cases, modalities, label_spec, keep="declared",
                                 test_cases=test_cases, num_processes=num_processes)
        record = {"tool": "nnharmony_convert msd", "source": str(task_folder.resolve()),
                  "label_source_values": plan.source_values, "dropped_labels": plan.dropped}
        _write_dataset_json(staging, modalities, plan.labels_json(), len(cases), OUT_FILE_ENDING, name, record,
                            description=msd.get("description"), reference=msd.get("reference"),
                            license=msd.get("licence", msd.get("license")), release=msd.get("release"))
        return st.commit()[0]


def _strip_ext(filename: str) -> str:
    for e in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if filename.lower().endswith(e):
            return filename[: -len(e)]
    return filename


# ---------------------------------------------------------------------------------------------- plain folder
def _files_in(folder: Path, pattern: str, what: str) -> list[tuple[Path, re.Match]]:
    rx = re.compile(pattern)
    if "case" not in rx.groupindex:
        raise CollectionError(f"{what} pattern {pattern!r} needs a named group (?P<case>...)")
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        m = rx.match(p.name)
        if m:
            out.append((p, m))
    return out


def convert_plain_folder(
    images: str | os.PathLike | Sequence[str | os.PathLike | Sequence[str | os.PathLike]],
    labels: str | os.PathLike | Sequence[str | os.PathLike],
    dataset_id: int,
    name: str,
    modalities: Sequence[str] | None = None,
    label_names: Mapping[str, Any] | str | os.PathLike | None = None,
    keep: str = "present",
    undeclared: str = "error",
    image_pattern: str = DEFAULT_IMAGE_PATTERN,
    label_pattern: str = DEFAULT_LABEL_PATTERN,
    case_ids: Sequence[str] | None = None,
    raw_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    num_processes: int | None = None,
    description: str | None = None,
    license: str | None = None,
    case_groups: str | Mapping[str, str] | None = None,
) -> Path:
    """Convert images + label maps in any SimpleITK format into ``DatasetXXX_Name``.

    ``images``: a folder (files matched by ``image_pattern``: named group ``case``, optional ``channel`` holding
    a 4-digit index or a modality name), or a list of files (one case each; multi-channel: a list of lists, one
    file per channel in ``modalities`` order). A single 4D file per case is split into channels.
    ``labels``: a folder (matched by ``label_pattern``, paired with images by ``case``) or a list of files in the
    order of ``images``.
    ``modalities``: modality name per channel (default: from the label JSON's ``modality``).
    ``label_names``: name -> source value(s), or a JSON file (see ``load_label_spec``).
    ``keep``: ``present`` (labels with voxels only) or ``declared``; ``case_ids``: names for list inputs
    (default: the image file names without extension and channel suffix).
    ``case_groups``: cases that must share a side of every fold (slices of one patient), written to dataset.json
    as ``case_groups``: a regex over the output case ids or a dict case -> group (:mod:`nnharmony.data.splits`)."""
    if label_names is None:
        raise CollectionError(f"Dataset{dataset_id}_{name}: label names are required (name=value pairs or a JSON)")
    label_spec, json_modalities = load_label_spec(label_names)
    modalities = list(modalities) if modalities else (json_modalities or [])
    target = dataset_folder_name(dataset_id, name)
    if not modalities:
        raise CollectionError(f"cannot convert to {target}: give one modality name per channel (e.g. -m CT)")
    cases = _pair_plain(target, images, labels, modalities, image_pattern, label_pattern, case_ids)
    file_ending = output_file_ending(cases)
    src = images if isinstance(images, (str, os.PathLike)) else "file list"
    with DatasetStager(raw_root, overwrite) as st:
        staging = st.add(dataset_id, name)
        plan, present = _convert_cases(target, staging, cases, modalities, label_spec, keep=keep,
                                       undeclared=undeclared, num_processes=num_processes, file_ending=file_ending)
        record = {"tool": "nnharmony_convert folder", "source": str(src), "keep": keep,
                  "label_source_values": plan.source_values, "dropped_labels": plan.dropped,
                  "case_sources": {c.case: {"images": [str(p) for p in c.images], "label": str(c.label)}
                                   for c in cases} if len(cases) <= 50 else None}
        _write_dataset_json(staging, modalities, plan.labels_json(), len(cases), file_ending, name, record,
                            description=description, license=license, case_groups=case_groups)
        return st.commit()[0]


def output_file_ending(cases: Sequence[_SourceCase]) -> str:
    """``.png`` when every source image and label is a PNG (2D natural images: nnU-Net reads them with its
    natural-image reader, and predictions come back as PNG), else ``.nii.gz``."""
    files = [f for c in cases for f in [*c.images, c.label] if f is not None]
    return ".png" if files and all(str(f).lower().endswith(".png") for f in files) else OUT_FILE_ENDING


def _case_name_problem(case: str) -> str | None:
    """Why ``case`` cannot name output files (path separators, ``..``, a leading dot, control characters)."""
    if not case or not case.strip():
        return "is empty"
    if "/" in case or "\\" in case or os.sep in case or (os.altsep and os.altsep in case):
        return "contains a path separator"
    if ".." in case:
        return "contains '..'"
    if case.startswith("."):
        return "starts with '.' (hidden file names are skipped by nnU-Net)"
    if any(ord(ch) < 32 for ch in case):
        return "contains control characters"
    return None


def _pair_plain(target, images, labels, modalities, image_pattern, label_pattern, case_ids) -> list[_SourceCase]:
    """Source cases of a plain folder or file lists. A case name is refused (never rewritten into a different
    path) when it holds a path separator, ``..`` or a leading dot, so nothing can be written outside the target
    folder; other characters outside ``[A-Za-z0-9._-]`` become ``_``."""
    num_channels = len(modalities)
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        if not (isinstance(labels, (str, os.PathLike)) and Path(labels).is_dir()):
            raise CollectionError(f"cannot convert to {target}: images is a folder, so labels must be a folder too")
        img_dir, lab_dir = Path(images), Path(labels)
        by_case: dict[str, dict[int, Path]] = {}
        problems = []
        for p, m in _files_in(img_dir, image_pattern, "image"):
            ch_txt = m.groupdict().get("channel")
            if ch_txt is None:
                ch = 0
            elif ch_txt.isdigit():
                ch = int(ch_txt)
            else:
                folded = [fold_name(x) for x in modalities]
                if fold_name(ch_txt) not in folded:
                    problems.append(f"{p}: channel {ch_txt!r} is not one of the modalities {list(modalities)}")
                    continue
                ch = folded.index(fold_name(ch_txt))
            by_case.setdefault(m.group("case"), {})
            if ch in by_case[m.group("case")]:
                problems.append(f"{p}: second file for case {m.group('case')!r} channel {ch}")
                continue
            by_case[m.group("case")][ch] = p
        label_files = {m.group("case"): p for p, m in _files_in(lab_dir, label_pattern, "label")}
        if img_dir.resolve() == lab_dir.resolve():
            # one folder for both: a file matched as label is not an image (give distinct patterns)
            label_set = set(label_files.values())
            for c in list(by_case):
                by_case[c] = {ch: p for ch, p in by_case[c].items() if p not in label_set}
                if not by_case[c]:
                    del by_case[c]
        cases = []
        for case in sorted(by_case):
            chans = by_case[case]
            why = _case_name_problem(case)
            if why:
                problems.append(f"{next(iter(chans.values()))}: case name {case!r} {why}")
                continue
            if case not in label_files:
                problems.append(f"{next(iter(chans.values()))}: no label file for case {case!r} in {lab_dir}")
                continue
            if sorted(chans) == [0] and num_channels > 1:
                files = [chans[0]]  # maybe one 4D file
            elif sorted(chans) != list(range(num_channels)):
                problems.append(
                    f"{img_dir}: case {case!r} has channel file(s) {sorted(chans)}, expected 0..{num_channels - 1} "
                    f"for modalities {list(modalities)}"
                )
                continue
            else:
                files = [chans[i] for i in range(num_channels)]
            cases.append(_SourceCase(sanitize_case_id(case), files, label_files[case]))
        for case, p in sorted(label_files.items()):
            if case not in by_case:
                problems.append(f"{p}: label file without image for case {case!r} in {img_dir}")
        _raise_problems(target, problems)
        if not cases:
            raise CollectionError(
                f"cannot convert to {target}: no image files in {img_dir} match the pattern {image_pattern!r}"
            )
        return cases

    # lists
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if isinstance(labels, (str, os.PathLike)):
        labels = [labels]
    images, labels = list(images), list(labels)
    if len(images) != len(labels):
        raise CollectionError(f"cannot convert to {target}: {len(images)} image entries but {len(labels)} label files")
    if case_ids is not None and len(case_ids) != len(images):
        raise CollectionError(f"cannot convert to {target}: {len(case_ids)} case ids for {len(images)} cases")
    cases = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        files = [Path(img)] if isinstance(img, (str, os.PathLike)) else [Path(f) for f in img]
        for f in files + [Path(lab)]:
            if not f.is_file():
                raise CollectionError(f"cannot convert to {target}: {f} does not exist")
        if case_ids is not None:
            case = str(case_ids[i])
        else:
            case = _strip_ext(files[0].name)
            case = re.sub(r"_\d{4}$", "", case)
        why = _case_name_problem(case)
        if why:
            raise CollectionError(f"cannot convert to {target}: case name {case!r} (for {files[0]}) {why}; "
                                  f"give a plain name such as 'case_001' (--case-ids)")
        cases.append(_SourceCase(sanitize_case_id(case), files, Path(lab)))
    return cases


# ---------------------------------------------------------------------------------------------- nnU-Net import
def import_nnunet_dataset(
    source: str | os.PathLike | int,
    dataset_id: int,
    name: str | None = None,
    raw_root: str | os.PathLike | None = None,
    link_mode: str = "copy",
    overwrite: bool = False,
    include_test: bool = True,
    num_processes: int | None = None,
    modalities: Sequence[str] | None = None,
    case_groups: str | Mapping[str, str] | None = None,
) -> Path:
    """Copy (or link) an nnU-Net raw dataset under a new id, checking it and casting labels to integers.

    ``case_groups`` (regex or dict, see :mod:`nnharmony.data.splits`) is written to dataset.json, replacing the
    source's own ``case_groups`` if it has one.

    ``modalities`` renames the channels (e.g. ``["T1"]`` for a dataset whose channel is called "MRI"), so that
    the same contrast gets the same modality slot in collections; the old names are recorded.

    ``source``: folder, or id/name of a dataset in ``$nnUNet_raw``. Images are copied unchanged (``link_mode``
    ``hardlink``/``symlink`` to save space; hardlink falls back to a copy across file systems) after a
    NaN/Inf check. Label maps are re-written as uint8/uint16 after checking that they hold only integral,
    declared values. Non-consecutive label values of a non-region dataset are remapped to 1..N (recorded)."""
    if link_mode not in LINK_MODES:
        raise CollectionError(f"link_mode must be one of {LINK_MODES}, got {link_mode!r}")
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        src = Path(source)
    else:
        src = resolve_dataset_folder(source, Path(raw_root) if raw_root is not None else None)
    djf = src / "dataset.json"
    if not djf.is_file():
        raise CollectionError(f"dataset {src.name}: missing dataset.json in {src}")
    try:
        dj = json.loads(djf.read_text())
    except json.JSONDecodeError as e:
        raise CollectionError(f"dataset {src.name}: dataset.json: invalid JSON ({e})") from None
    if not isinstance(dj, dict):
        raise CollectionError(f"dataset {src.name}: dataset.json: top level must be a JSON object")
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in dj and not (key == "channel_names" and "modality" in dj):
            raise CollectionError(f"dataset {src.name}: dataset.json: required key '{key}' is missing")
    source_modalities = check_channel_names(dj.get("channel_names", dj.get("modality")),
                                            f"dataset {src.name}: dataset.json")
    if modalities is not None:
        modalities = [str(m) for m in modalities]
        if len(modalities) != len(source_modalities):
            raise CollectionError(
                f"dataset {src.name}: {len(modalities)} modality name(s) given for {len(source_modalities)} "
                f"channel(s) {source_modalities}"
            )
    else:
        modalities = source_modalities
    if name is None:
        m = re.fullmatch(r"Dataset\d+_(.+)", src.name)
        name = sanitize_name(m.group(1) if m else dj.get("name") or src.name)
    target = dataset_folder_name(dataset_id, name)
    fe = dj["file_ending"]
    has_regions = any(isinstance(v, (list, tuple)) for k, v in dj["labels"].items() if k != "background")
    if has_regions or "ignore" in dj["labels"]:
        label_spec = None  # values are referenced by regions / ignore: keep them
        from nnharmony.dataset_conversion.validation import declared_label_values

        declared_label_values(dj["labels"], f"dataset {src.name}: dataset.json")
    else:
        label_spec, _ = load_label_spec(dj["labels"])
    listed = list_cases(src, {**dj, "channel_names": {str(i): m for i, m in enumerate(modalities)}}, src.name)
    cases = [_SourceCase(c, list(v["images"]), v["label"]) for c, v in sorted(listed.items())]
    test_cases = []
    if include_test and (src / "imagesTs").is_dir():
        rx = re.compile(rf"^(?P<case>.+)_(?P<ch>\d{{4}}){re.escape(fe)}$")
        groups: dict[str, list[Path]] = {}
        for p in sorted((src / "imagesTs").iterdir()):
            m = rx.match(p.name)
            if m and not p.name.startswith("."):
                groups.setdefault(m.group("case"), []).append(p)
        test_cases = [_SourceCase(c, fs, None) for c, fs in sorted(groups.items())]
    with DatasetStager(raw_root, overwrite) as st:
        staging = st.add(dataset_id, name)
        plan, _ = _convert_cases(target, staging, cases, modalities, label_spec, keep="declared",
                                 test_cases=test_cases, verbatim_images=link_mode, file_ending=fe,
                                 num_processes=num_processes)
        out = {k: v for k, v in dj.items() if k not in ("dataset",)}
        out["channel_names"] = {str(i): m for i, m in enumerate(modalities)}
        out.pop("modality", None)
        out["numTraining"] = len(cases)
        out["name"] = name
        if case_groups is not None:
            out["case_groups"] = case_groups
        if plan is not None:
            out["labels"] = plan.labels_json()
        out["nnharmony_conversion"] = {
            "tool": "nnharmony_convert nnunet", "source": str(src.resolve()), "link_mode": link_mode,
            "source_channel_names": source_modalities,
            "label_source_values": plan.source_values if plan else None,
        }
        _write_json(out, staging / "dataset.json")
        return st.commit()[0]


# ---------------------------------------------------------------------------------------------- split by site
_CASE_HEADERS = ("case", "case_id", "caseid", "identifier", "id", "subject", "image")
_SITE_HEADERS = ("site", "institution", "center", "centre", "hospital", "domain", "scanner")


def read_site_csv(csv_file: str | os.PathLike, case_column: str | None = None,
                  site_column: str | None = None) -> dict[str, str]:
    """``case -> site`` from a CSV: two columns (header optional), or named columns."""
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise CollectionError(f"site CSV {csv_file}: file not found")
    with open(csv_file, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(x.strip() for x in r)]
    if not rows:
        raise CollectionError(f"site CSV {csv_file}: empty")
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    if case_column or site_column:
        cc, sc = (case_column or "case").lower(), (site_column or "site").lower()
        for col in (cc, sc):
            if col not in lower:
                raise CollectionError(f"site CSV {csv_file}: no column {col!r} in header {header}")
        ci, si, body, first_line = lower.index(cc), lower.index(sc), rows[1:], 2
    elif any(h in _CASE_HEADERS for h in lower) and any(h in _SITE_HEADERS for h in lower):
        ci = next(i for i, h in enumerate(lower) if h in _CASE_HEADERS)
        si = next(i for i, h in enumerate(lower) if h in _SITE_HEADERS)
        body, first_line = rows[1:], 2
    else:
        ci, si, body, first_line = 0, 1, rows, 1
    out: dict[str, str] = {}
    for n, r in enumerate(body, start=first_line):
        if len(r) <= max(ci, si):
            raise CollectionError(f"site CSV {csv_file}, line {n}: expected a case and a site, got {r}")
        case, site = r[ci].strip(), r[si].strip()
        if not case or not site:
            raise CollectionError(f"site CSV {csv_file}, line {n}: empty case or site in {r}")
        if case in out and out[case] != site:
            raise CollectionError(f"site CSV {csv_file}, line {n}: case {case!r} is assigned to {out[case]!r} and {site!r}")
        out[case] = site
    return out


def split_by_site(
    dataset: int | str | os.PathLike,
    csv_file: str | os.PathLike,
    first_new_id: int,
    raw_root: str | os.PathLike | None = None,
    name_template: str = "{name}_{site}",
    case_column: str | None = None,
    site_column: str | None = None,
    unassigned: str = "error",
    link_mode: str = "hardlink",
    overwrite: bool = False,
    check_images: bool = True,
    num_processes: int | None = None,
) -> list[Path]:
    """Split one raw dataset into one dataset per site (ids ``first_new_id``, ``first_new_id + 1``, ... in
    sorted site order), linking (``hardlink``/``symlink``) or copying its files. All sites are written and
    renamed together, or none.

    ``unassigned``: what to do with dataset cases missing from the CSV (``error`` or ``skip``). Case names in
    the CSV may carry the file ending (``case_001.nii.gz``)."""
    if link_mode not in LINK_MODES:
        raise CollectionError(f"link_mode must be one of {LINK_MODES}, got {link_mode!r}")
    if unassigned not in ("error", "skip"):
        raise CollectionError(f"unassigned must be 'error' or 'skip', got {unassigned!r}")
    root = _resolve_raw_root(raw_root)
    src = resolve_dataset_folder(dataset, root)
    validate_raw_dataset(src, check_images=check_images, num_processes=num_processes)
    dj = json.loads((src / "dataset.json").read_text())
    cases = list_cases(src, dj)
    fe = dj["file_ending"]
    assignment = read_site_csv(csv_file, case_column, site_column)
    norm = {}
    for case, site in assignment.items():
        c = case[: -len(fe)] if case.endswith(fe) else case
        if c not in cases:
            raise CollectionError(f"site CSV {csv_file}: case {case!r} is not a training case of {src.name}")
        norm[c] = site
    missing = sorted(set(cases) - set(norm))
    if missing and unassigned == "error":
        raise CollectionError(
            f"site CSV {csv_file}: {len(missing)} case(s) of {src.name} have no site, e.g. {missing[:5]} "
            f"(use unassigned='skip' / --skip-unassigned to leave them out)"
        )
    sites = sorted(set(norm.values()))
    m = re.fullmatch(r"Dataset\d+_(.+)", src.name)
    base = m.group(1) if m else src.name
    names = {}
    for s in sites:
        site_name = sanitize_name(re.sub(r"[^A-Za-z0-9\-]+", "", s.replace(" ", "-")))
        if not site_name:
            raise CollectionError(f"site CSV {csv_file}: site {s!r} gives an empty dataset name")
        names[s] = _check_name(name_template.format(name=base, site=site_name))
    if len(set(names.values())) != len(names):
        raise CollectionError(f"site CSV {csv_file}: sites {sites} give clashing dataset names {list(names.values())}")
    out_paths = []
    with DatasetStager(root, overwrite) as st:
        for k, s in enumerate(sites):
            staging = st.add(first_new_id + k, names[s])
            (staging / "imagesTr").mkdir()
            (staging / "labelsTr").mkdir()
            members = sorted(c for c, x in norm.items() if x == s)
            for c in members:
                for ch, img in enumerate(cases[c]["images"]):
                    _link_or_copy(img, staging / "imagesTr" / f"{c}_{ch:04d}{fe}", link_mode)
                _link_or_copy(cases[c]["label"], staging / "labelsTr" / f"{c}{fe}", link_mode)
            sub = {k2: v for k2, v in dj.items() if k2 != "dataset"}
            sub["numTraining"] = len(members)
            sub["name"] = names[s]
            sub["nnharmony_conversion"] = {"tool": "nnharmony_convert split-sites", "source": src.name,
                                           "site": s, "csv": str(Path(csv_file).resolve()), "link_mode": link_mode}
            _write_json(sub, staging / "dataset.json")
        out_paths = st.commit()
    return out_paths
