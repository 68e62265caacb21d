"""Validation of nnU-Net raw datasets before any work is done on them.

Every check raises :class:`nnharmony.data.collection.CollectionError` (a ``ValueError``) whose message names
the dataset, the file (relative to the dataset folder) and the problem, e.g.::

    dataset Dataset902_SynthMRI (/data/nnUNet_raw/Dataset902_SynthMRI): 1 problem(s):
      - labelsTr/synth_003.nii.gz: label value(s) [7] not declared in dataset.json 'labels' (declared: 0, 1, 2, 3)

Checks (``validate_raw_dataset``):

- the dataset id resolves to exactly one ``DatasetXXX_Name`` folder;
- ``dataset.json`` exists, is valid JSON and has ``channel_names`` (or ``modality``), ``labels``,
  ``numTraining`` and ``file_ending``; every channel has a non-empty modality name; channel indices are
  0..C-1; labels have background 0, integer (or region) values that are consecutive, as nnU-Net requires;
- every case in ``labelsTr`` has exactly one image per channel in ``imagesTr`` (and vice versa) and the number of
  cases equals ``numTraining``;
- image channels and label share one geometry: shape exactly; spacing, origin and direction within a small
  tolerance (nnU-Net itself only warns about origin and direction; a mismatch there means misaligned labels);
- all cases of a dataset have the same dimensionality (2D or 3D);
- with ``check_images``: every file complete (:func:`~nnharmony.dataset_conversion.image_integrity.check_image_file_intact`:
  a truncated ``.nii.gz``/``.nii``/PNG/NRRD/MetaImage, which SimpleITK would read with zeros for the missing part,
  or a gzip/PNG CRC error is reported), no NaN/Inf in images, integral label values, and only declared label values.
- images of different sizes in one dataset are fine (typical of 2D PNG data: microscopy, X-ray, photographs);
  only a case's channels and label must share one grid.

Header checks read only the image headers (``sitk.ImageFileReader.ReadImageInformation``); voxel checks read
the arrays, in a spawn process pool for larger datasets (SimpleITK readers crash when used from several
threads at once: a segfault seen on CI).

- ``case_groups`` in dataset.json (cases that must stay on one side of every fold, see
  :mod:`nnharmony.data.splits`) gives a group to every case.

``validate_members_compatible`` checks that datasets meant for one collection can be planned together: 2D
datasets only have nnU-Net's ``2d`` configuration, so a collection mixing 2D and 3D members is planned with
``-c 2d`` only (reusing a collection name with different members is refused by the planner).
``dataset_notes`` says what is worth knowing but fine (a 2D dataset, 2D images of different sizes).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from nnharmony.data.collection import CollectionError
from nnharmony.data.splits import case_groups
from nnharmony.dataset_conversion.image_integrity import image_file_problem

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
MAX_LISTED_PROBLEMS = 20
PARALLEL_MIN_CASES = 64

# geometry tolerances (image channel vs label, channel vs channel)
SPACING_RTOL = 1e-3
DIRECTION_ATOL = 1e-3
ORIGIN_TOL_FRACTION_OF_SPACING = 1e-2
ORIGIN_ATOL = 1e-4


# ---------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """Header of one image file, in SimpleITK (x, y, z) order."""

    dimension: int
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int = 1

    @property
    def effective_dimension(self) -> int:
        """2 for 2D images and for 3D images with a single slice (nnU-Net's convention for 2D NIfTI data)."""
        if self.dimension == 3 and self.size[2] == 1:
            return 2
        return self.dimension

    @classmethod
    def of_image(cls, img: sitk.Image) -> "Geometry":
        return cls(
            img.GetDimension(),
            tuple(int(s) for s in img.GetSize()),
            tuple(float(s) for s in img.GetSpacing()),
            tuple(float(s) for s in img.GetOrigin()),
            tuple(float(s) for s in img.GetDirection()),
            int(img.GetNumberOfComponentsPerPixel()),
        )

    @classmethod
    def of_file(cls, path: str | os.PathLike) -> "Geometry":
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return cls(
            reader.GetDimension(),
            tuple(int(s) for s in reader.GetSize()),
            tuple(float(s) for s in reader.GetSpacing()),
            tuple(float(s) for s in reader.GetOrigin()),
            tuple(float(s) for s in reader.GetDirection()),
            int(reader.GetNumberOfComponents()),
        )


def geometry_mismatch(ref: Geometry, other: Geometry) -> str | None:
    """Why ``other`` is not on the same voxel grid as ``ref`` (None when it is)."""
    if ref.dimension != other.dimension:
        return f"dimension {other.dimension} != {ref.dimension}"
    if ref.size != other.size:
        return f"shape (x, y, z) {other.size} != {ref.size}"
    if not np.allclose(other.spacing, ref.spacing, rtol=SPACING_RTOL, atol=0):
        return f"spacing {_fmt(other.spacing)} != {_fmt(ref.spacing)}"
    tol = max(ORIGIN_ATOL, ORIGIN_TOL_FRACTION_OF_SPACING * min(ref.spacing))
    if not np.allclose(other.origin, ref.origin, rtol=0, atol=tol):
        return f"origin {_fmt(other.origin)} != {_fmt(ref.origin)}"
    if not np.allclose(other.direction, ref.direction, rtol=0, atol=DIRECTION_ATOL):
        return f"direction {_fmt(other.direction)} != {_fmt(ref.direction)}"
    return None


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


# ---------------------------------------------------------------------------------------------- dataset.json
def resolve_dataset_folder(dataset: int | str | os.PathLike, raw_root: Path | None = None) -> Path:
    """Folder of a dataset given as id (``4``, ``"4"``), name (``"Dataset004_Hippocampus"``) or path.

    An unknown id raises CollectionError naming the id and the folder searched."""
    from nnharmony.paths import find_dataset_folder

    looks_like_path = isinstance(dataset, str) and (
        os.sep in dataset
        or (not dataset.strip().isdigit() and not dataset.startswith("Dataset") and Path(dataset).is_dir())
    )
    if isinstance(dataset, os.PathLike) or looks_like_path:
        folder = Path(dataset)
        if not folder.is_dir():
            raise CollectionError(f"dataset folder {folder} does not exist")
        return folder
    try:
        return find_dataset_folder(dataset, raw_root)
    except (FileNotFoundError, ValueError) as e:
        raise CollectionError(f"unknown dataset id {dataset!r}: {e}") from None
    except RuntimeError as e:  # $nnUNet_raw not set
        raise CollectionError(f"cannot look up dataset {dataset!r}: {e}") from None


def load_dataset_json(folder: Path, display_name: str | None = None) -> dict[str, Any]:
    """Load and check a dataset.json (keys, channel names, labels); CollectionError naming the file otherwise."""
    name = display_name or folder.name
    djf = folder / "dataset.json"
    where = f"dataset {name}: dataset.json"
    if not djf.is_file():
        raise CollectionError(f"dataset {name}: missing dataset.json in {folder}")
    try:
        with open(djf) as f:
            dj = json.load(f)
    except json.JSONDecodeError as e:
        raise CollectionError(f"{where}: invalid JSON ({e})") from None
    if not isinstance(dj, dict):
        raise CollectionError(f"{where}: top level must be a JSON object, got {type(dj).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in dj and not (k == "channel_names" and "modality" in dj)]
    if missing:
        raise CollectionError(f"{where}: required key(s) {missing} missing (required: {list(REQUIRED_KEYS)})")
    channels = dj.get("channel_names", dj.get("modality"))
    check_channel_names(channels, where)
    declared_label_values(dj["labels"], where)
    if not isinstance(dj["file_ending"], str) or not dj["file_ending"].startswith("."):
        raise CollectionError(f"{where}: 'file_ending' must be a string like '.nii.gz', got {dj['file_ending']!r}")
    try:
        n = int(dj["numTraining"])
        if n < 0 or n != dj["numTraining"]:
            raise ValueError
    except (TypeError, ValueError):
        raise CollectionError(f"{where}: 'numTraining' must be a non-negative integer, got {dj['numTraining']!r}") from None
    return dj


def check_channel_names(channels: Any, where: str) -> list[str]:
    """Modality name of every channel, in channel order; CollectionError for a channel with no name."""
    if not isinstance(channels, dict) or not channels:
        raise CollectionError(f"{where}: 'channel_names' must be a non-empty object {{\"0\": \"CT\", ...}}, got {channels!r}")
    try:
        idx = sorted(int(k) for k in channels)
    except (TypeError, ValueError):
        raise CollectionError(f"{where}: channel indices must be integers, got {list(channels)}") from None
    if idx != list(range(len(idx))):
        raise CollectionError(f"{where}: channel indices must be 0..{len(idx) - 1}, got {idx}")
    names = []
    for i in idx:
        value = channels.get(str(i), channels.get(i))
        if not isinstance(value, str) or not value.strip():
            raise CollectionError(f"{where}: channel {i} has no modality name (got {value!r})")
        names.append(value.strip())
    return names


def declared_label_values(labels: Any, where: str) -> list[int]:
    """Sorted label values a label file may contain (background, labels, ignore label); checks nnU-Net's rules."""
    if not isinstance(labels, dict) or not labels:
        raise CollectionError(f"{where}: 'labels' must be a non-empty object {{\"background\": 0, ...}}, got {labels!r}")
    if labels.get("background") != 0:
        raise CollectionError(f"{where}: 'labels' must declare \"background\": 0 (got {labels.get('background')!r})")
    values: set[int] = set()
    for name, v in labels.items():
        vs = v if isinstance(v, (list, tuple)) else [v]
        for x in vs:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or int(x) != x or x < 0:
                raise CollectionError(f"{where}: label {name!r} has invalid value {v!r} (need non-negative integers)")
            values.add(int(x))
    values_sorted = sorted(values)
    if values_sorted != list(range(len(values_sorted))):
        raise CollectionError(
            f"{where}: label values must be consecutive 0..N as nnU-Net requires, got {values_sorted} "
            f"(nnharmony_convert remaps label values for you)"
        )
    if "ignore" in labels:
        ign = labels["ignore"]
        if isinstance(ign, (list, tuple)) or int(ign) != values_sorted[-1]:
            raise CollectionError(f"{where}: the 'ignore' label must have the highest value, got {ign!r}")
    return values_sorted


# ---------------------------------------------------------------------------------------------- files
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def list_cases(folder: Path, dj: Mapping[str, Any], display_name: str | None = None) -> dict[str, dict[str, Any]]:
    """``case -> {"images": [paths per channel], "label": path}``; CollectionError listing missing/stray files."""
    name = display_name or folder.name
    head = f"dataset {name}"
    num_channels = len(dj.get("channel_names", dj.get("modality")))
    fe = dj["file_ending"]
    if "dataset" in dj:  # nnU-Net's explicit file list
        cases = {}
        for k, v in dj["dataset"].items():
            imgs = [_abs(folder, p) for p in v["images"]]
            cases[k] = {"images": imgs, "label": _abs(folder, v["label"])}
            missing = [p for p in imgs + [cases[k]["label"]] if not p.is_file()]
            if missing:
                raise CollectionError(f"{head}: case {k!r} listed in dataset.json: missing file(s) {[str(m) for m in missing]}")
            if len(imgs) != num_channels:
                raise CollectionError(f"{head}: case {k!r} has {len(imgs)} image(s) for {num_channels} channel(s)")
        _check_num_training(cases, dj, head)
        return cases

    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise CollectionError(f"{head}: missing folder {d.name}/ in {folder}")
    problems: list[str] = []
    label_cases: dict[str, Path] = {}
    for p in sorted(labels_dir.iterdir()):
        if p.name.startswith("."):
            continue
        if not p.name.endswith(fe):
            problems.append(f"labelsTr/{p.name}: file does not end with file_ending {fe!r}")
            continue
        label_cases[p.name[: -len(fe)]] = p
    image_files: dict[str, dict[int, Path]] = {}
    for p in sorted(images_dir.iterdir()):
        if p.name.startswith("."):
            continue
        m = _CHANNEL_RE.match(p.name[: -len(fe)]) if p.name.endswith(fe) else None
        if m is None:
            problems.append(f"imagesTr/{p.name}: not named CASE_XXXX{fe} (XXXX = 4-digit channel index)")
            continue
        image_files.setdefault(m.group("case"), {})[int(m.group("ch"))] = p
    cases = {}
    for case in sorted(set(label_cases) | set(image_files)):
        if case not in label_cases:
            problems.append(f"imagesTr/{case}_*{fe}: image(s) without a label file labelsTr/{case}{fe}")
            continue
        chans = image_files.get(case, {})
        missing = [c for c in range(num_channels) if c not in chans]
        extra = sorted(c for c in chans if c >= num_channels)
        if missing:
            problems.append(
                f"imagesTr/{case}_{missing[0]:04d}{fe}: missing (dataset.json declares {num_channels} channel(s); "
                f"case {case!r} lacks channel(s) {missing})"
            )
            continue
        if extra:
            problems.append(
                f"imagesTr/{case}_{extra[0]:04d}{fe}: channel {extra[0]} is not declared in channel_names "
                f"({num_channels} channel(s))"
            )
            continue
        cases[case] = {"images": [chans[c] for c in range(num_channels)], "label": label_cases[case]}
    if problems:
        raise _problems_error(name, folder, problems)
    _check_num_training(cases, dj, head)
    return cases


def _abs(folder: Path, p: str) -> Path:
    p = os.path.expandvars(p)
    return Path(p) if os.path.isabs(p) else (folder / p).resolve()


def _check_num_training(cases: Mapping[str, Any], dj: Mapping[str, Any], head: str) -> None:
    if len(cases) != int(dj["numTraining"]):
        raise CollectionError(
            f"{head}: dataset.json numTraining = {dj['numTraining']} but {len(cases)} training case(s) were found"
        )
    if not cases:
        raise CollectionError(f"{head}: no training cases")


def _problems_error(name: str, folder: Path, problems: list[str]) -> CollectionError:
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return CollectionError(
        f"dataset {name} ({folder}): {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in shown) + more
    )


# ---------------------------------------------------------------------------------------------- per case
def check_label_array(arr: np.ndarray, declared: Iterable[int], path: str | os.PathLike | None = None) -> str | None:
    """Why a label array is unusable (NaN, non-integral or undeclared values), None when fine."""
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or (path is not None and str(path).endswith((".nii", ".nii.gz"))
                                            and any(_nifti_nonfinite(path))):
            return "label map contains NaN/Inf"
        values = np.unique(arr)
        frac = values[values != np.round(values)]
        if frac.size:
            return f"label map has non-integer value(s) {frac[:5].tolist()}"
        values = values.astype(np.int64)
    elif arr.dtype.kind in "iub":
        values = np.unique(arr).astype(np.int64)
    else:
        return f"label map has unsupported pixel type {arr.dtype}"
    bad = sorted(set(values.tolist()) - set(declared))
    if bad:
        shown = ", ".join(str(v) for v in sorted(declared))
        return f"label value(s) {bad[:10]} not declared in dataset.json 'labels' (declared: {shown})"
    return None


def components_problem(components: int, channel_name: str | None) -> str:
    """Why an image with several components per pixel (RGB/RGBA PNG, vector image) cannot be used.

    ``channel_name``: the modality declared for this file, or None for a label map. nnU-Net's datasets hold one
    grayscale channel per file (``CASE_0000``, ``CASE_0001``, ...), each named in ``channel_names``."""
    kind = {2: "grayscale+alpha", 3: "RGB", 4: "RGBA"}.get(components, "vector")
    if channel_name is None:
        return (f"{components} components per voxel ({kind} image); a label map must be a single-channel image of "
                f"integer label values")
    return (f"{components} components per voxel ({kind} image) where one grayscale channel ({channel_name!r}) is "
            f"declared; convert it to grayscale (e.g. PIL Image.convert('L')) or store each colour as its own "
            f"channel file (_0000, _0001, ...) named in channel_names")


def check_image_array(arr: np.ndarray, path: str | os.PathLike | None = None) -> str | None:
    """Why an image array is unusable (NaN/Inf, pixel type), None when fine.

    SimpleITK's NIfTI reader silently turns NaN and Inf into 0, so for float NIfTI files (``path``) the voxels
    are counted from the file itself (nibabel); otherwise the array is checked."""
    if arr.dtype.kind not in "fiub":
        return f"unsupported pixel type {arr.dtype}"
    if arr.dtype.kind != "f":
        return None
    n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    if path is not None and str(path).endswith((".nii", ".nii.gz")) and not (n_nan or n_inf):
        n_nan, n_inf = _nifti_nonfinite(path)
    if n_nan or n_inf:
        return f"image contains {n_nan} NaN and {n_inf} Inf voxel(s); replace them before conversion"
    return None


def _nifti_nonfinite(path: str | os.PathLike) -> tuple[int, int]:
    try:
        import nibabel as nib
    except ImportError:  # pragma: no cover - nibabel comes with nnunetv2
        return 0, 0
    try:
        img = nib.load(str(path))
        if not np.issubdtype(img.get_data_dtype(), np.floating):
            return 0, 0
        data = np.asanyarray(img.dataobj)
    except Exception:  # unreadable for nibabel: SimpleITK read it, keep its verdict
        return 0, 0
    return int(np.isnan(data).sum()), int(np.isinf(data).sum())


def _rel(folder: Path, p: Path) -> str:
    try:
        return str(p.relative_to(folder))
    except ValueError:
        return str(p)


def _check_case(folder: Path, case: str, files: Mapping[str, Any], declared: list[int], check_images: bool,
                channel_names: Sequence[str] = ()):
    """(list of problems, effective dimension or None)."""
    problems: list[str] = []
    geoms: list[Geometry] = []
    for i, img in enumerate(files["images"] + [files["label"]]):
        is_label = img == files["label"]
        if check_images:
            why = image_file_problem(img)
            if why:
                problems.append(f"{_rel(folder, img)}: {why}")
                return problems, None
        try:
            if check_images:
                im = sitk.ReadImage(str(img))
                g = Geometry.of_image(im)
                if g.components == 1:
                    arr = sitk.GetArrayViewFromImage(im)
                    why = check_label_array(arr, declared, img) if is_label else check_image_array(arr, img)
                    if why:
                        problems.append(f"{_rel(folder, img)}: {why}")
            else:
                g = Geometry.of_file(img)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
            problems.append(f"{_rel(folder, img)}: cannot be read by SimpleITK ({first})")
            return problems, None
        if g.components != 1:
            channel = None if is_label else (channel_names[i] if i < len(channel_names) else f"channel {i}")
            problems.append(f"{_rel(folder, img)}: {components_problem(g.components, channel)}")
        geoms.append(g)
    if len(geoms) == len(files["images"]) + 1:
        ref = geoms[0]
        for img, g in zip(files["images"][1:] + [files["label"]], geoms[1:]):
            why = geometry_mismatch(ref, g)
            if why:
                problems.append(
                    f"{_rel(folder, img)}: geometry mismatch with {_rel(folder, files['images'][0])}: {why}"
                )
        return problems, ref.effective_dimension
    return problems, None


def validate_raw_dataset(
    dataset: int | str | os.PathLike,
    check_images: bool = True,
    num_processes: int | None = None,
    raw_root: Path | None = None,
    display_name: str | None = None,
) -> None:
    """Check that a raw dataset is usable by nnU-Net and nnharmony; raise CollectionError otherwise.

    ``dataset``: id, ``DatasetXXX_Name`` (looked up in ``raw_root`` or ``$nnUNet_raw``) or folder path.
    ``check_images``: also read voxel data (NaN/Inf, label values); otherwise headers only.
    ``num_processes``: reader processes for voxel checks of large datasets (default: up to 4, limited by the CPU count).
    ``display_name``: name used in messages (converters validate a staging folder under the final name).
    """
    folder = resolve_dataset_folder(dataset, raw_root)
    name = display_name or folder.name
    dj = load_dataset_json(folder, name)
    declared = declared_label_values(dj["labels"], f"dataset {name}: dataset.json")
    cases = list_cases(folder, dj, name)
    if num_processes is None:
        num_processes = max(1, min(4, os.cpu_count() or 1))
    try:
        case_groups(dj, cases, f"dataset {name}: dataset.json")
    except ValueError as e:
        raise CollectionError(str(e)) from None
    channel_names = check_channel_names(dj.get("channel_names", dj.get("modality")), name)
    items = sorted(cases.items())
    args = [(folder, case, files, declared, check_images, channel_names) for case, files in items]
    # Header reads take about a millisecond each; a process pool only pays off when voxel data of many cases is read.
    if num_processes > 1 and check_images and len(items) > PARALLEL_MIN_CASES:
        with ProcessPoolExecutor(num_processes, mp_context=multiprocessing.get_context("spawn")) as ex:
            results = list(ex.map(_check_case, *zip(*args), chunksize=4))
    else:
        results = [_check_case(*a) for a in args]
    problems = [p for probs, _ in results for p in probs]
    dims = {}
    for (case, _), (_, d) in zip(items, results):
        if d is not None:
            dims.setdefault(d, case)
    if len(dims) > 1:
        problems.append(
            "cases of different dimensionality: "
            + ", ".join(f"{d}D (e.g. case {c!r})" for d, c in sorted(dims.items()))
        )
    if problems:
        raise _problems_error(name, folder, problems)


def dataset_dimensionality(dataset: int | str | os.PathLike, raw_root: Path | None = None) -> int:
    """2 or 3: effective dimensionality of the dataset's images (first training case's first channel)."""
    folder = resolve_dataset_folder(dataset, raw_root)
    dj = load_dataset_json(folder)
    cases = list_cases(folder, dj)
    first = cases[sorted(cases)[0]]["images"][0]
    return Geometry.of_file(first).effective_dimension


def dataset_notes(dataset: int | str | os.PathLike, raw_root: Path | None = None) -> list[str]:
    """One line per fact worth saying about a valid dataset that is not a problem (headers only): it is 2D
    (``-c 2d``), and its 2D images differ in size (allowed: nnU-Net plans the patch from the median size and
    pads smaller images; only a case's channels and label must share one grid)."""
    folder = resolve_dataset_folder(dataset, raw_root)
    dj = load_dataset_json(folder)
    geoms = [Geometry.of_file(files["images"][0]) for files in list_cases(folder, dj).values()]
    if not geoms or geoms[0].effective_dimension != 2:
        return []
    notes = [f"{folder.name}: 2D dataset ({len(geoms)} cases); plan it with -c 2d"]
    widths, heights = sorted({g.size[0] for g in geoms}), sorted({g.size[1] for g in geoms})
    if len(widths) > 1 or len(heights) > 1:
        n_sizes = len({g.size[:2] for g in geoms})
        notes.append(f"{folder.name}: 2D images of {n_sizes} different sizes (width {widths[0]}-{widths[-1]}, "
                     f"height {heights[0]}-{heights[-1]} px): allowed, only a case's channels and label share one size")
    return notes


def validate_members_compatible(datasets: Sequence[int | str | os.PathLike], raw_root: Path | None = None,
                                configurations: Sequence[str] | None = None) -> None:
    """Members of one collection must be plannable together in every requested configuration.

    2D datasets (PNG, single-slice images) only have nnU-Net's ``2d`` configuration. A collection mixing 2D and
    3D members is therefore planned with ``-c 2d`` only (3D members train slice by slice, as in nnU-Net's ``2d``
    configuration); ``configurations=None`` (no configuration known yet) requires one dimensionality."""
    dims: dict[int, list[str]] = {}
    for d in datasets:
        folder = resolve_dataset_folder(d, raw_root)
        dims.setdefault(dataset_dimensionality(folder), []).append(folder.name)
    not_2d = sorted(set(configurations or ()) - {"2d"})
    if 2 in dims and (not_2d or (configurations is None and len(dims) > 1)):
        parts = "; ".join(f"{k}D: {', '.join(v)}" for k, v in sorted(dims.items()))
        if 3 in dims:
            raise CollectionError(
                f"members of different dimensionality ({parts}) can only be planned together with -c 2d "
                f"(3D members then train slice by slice); for {'/'.join(not_2d) or '3D configurations'}, make a "
                f"collection of the 3D members only"
            )
        raise CollectionError(f"2D datasets ({', '.join(dims[2])}) have no '{not_2d[0]}' configuration; plan them "
                              f"with -c 2d")


def validate_collection_inputs(
    datasets: Sequence[int | str | os.PathLike],
    raw_root: Path | None = None,
    check_images: bool = True,
    num_processes: int | None = None,
    configurations: Sequence[str] | None = None,
) -> list[Path]:
    """Validate every member and their compatibility (in ``configurations``, see
    :func:`validate_members_compatible`) before any planning; returns the member folders."""
    folders = [resolve_dataset_folder(d, raw_root) for d in datasets]
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise CollectionError(f"a dataset is listed twice among the members: {names}")
    for f in folders:
        validate_raw_dataset(f, check_images=check_images, num_processes=num_processes)
    validate_members_compatible(folders, configurations=configurations)
    return folders
