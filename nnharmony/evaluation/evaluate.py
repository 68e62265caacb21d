"""Evaluation of predicted segmentations against reference segmentations: one folder (one dataset) or a
collection's predictions (several members), with nnU-Net's metrics plus the normalized surface Dice.

One folder -- :func:`evaluate_folder`
    runs nnU-Net's ``compute_metrics_on_folder`` on the label values / regions of a dataset.json ``labels`` dict
    (Dice, IoU, TP, FP, FN, TN, n_pred, n_ref per label; regions as tuples; the ``ignore`` label excluded) and,
    with ``nsd_tolerance_mm``, adds the NSD (:func:`nnharmony.evaluation.metrics.normalized_surface_dice`) of
    every case and label. It writes ``summary.json`` in nnU-Net's format (``load_summary_json`` reads it)::

        {"foreground_mean": {"Dice": .., "IoU": .., ..., "NSD": ..},
         "mean": {"1": {"Dice": .., ..., "NSD": ..}, "(1, 2)": {...}},
         "metric_per_case": [{"metrics": {"1": {"Dice": .., ..., "NSD": ..}}, "prediction_file": ..,
                              "reference_file": ..}],
         "nsd": {"tolerance_mm": 1.0, "mean": {"1": ..}, "foreground_mean": ..},   # only with a tolerance
         "labels": {"liver": "1", "tumour_and_liver": "(1, 2)"},                  # name -> key used above
         "references_without_prediction": ["case_007.nii.gz", ..],               # not evaluated
         "member": "Dataset901_A", "file_ending": ".nii.gz",
         "reference_folder": .., "prediction_folder": ..}

    Every prediction file (``*file_ending`` directly in the folder) needs a reference file of the same name
    with the same geometry (size, spacing, origin, direction); reference cases without a prediction are not
    evaluated (nnU-Net's ``chill``) and are listed in ``references_without_prediction``.

A collection -- :func:`evaluate_collection`
    The prediction folder is organised either

    * one sub-folder per member, named after the member (``PRED/Dataset901_A/case.nii.gz``; a sub-folder counts
      when it holds prediction files), or
    * flat (``PRED/case.nii.gz``): a case belongs to the member named for it in ``member`` (case id or file name
      -> dataset id or name), else to the one member whose reference folder holds a file of the same name (a
      name found in several members' references is an error that asks for ``member``).

    Mixing both is an error. A member's reference folder comes from ``reference_folders`` (dataset id or name
    -> folder), else ``reference_root/DatasetXXX_Name/labelsTr`` (a raw nnU-Net dataset; ``reference_root``
    defaults to ``$nnUNet_raw``), else ``reference_root/DatasetXXX_Name`` (a folder of ground truth).
    Every member with predictions gets ``OUT/DatasetXXX_Name/summary.json`` (:func:`evaluate_folder`); the
    collection gets ``OUT/summary.json``::

        {"format": "nnharmony.evaluation/1", "collection": .., "method": .., "layout": "subfolders" | "flat",
         "nsd_tolerance_mm": .., "rows": [<row>, ...], "members": {"Dataset901_A": <member summary.json>},
         "members_without_predictions": [..]}

    plus ``OUT/results.md`` (:func:`format_table`) and ``OUT/results.csv`` (:func:`write_csv`).

Rows and tables (reused by the benchmark)
    A *row* is one member x label (x method): ``{"member", "label", "method", "dice_mean", "dice_std",
    "nsd_mean", "nsd_std", "n"}``. ``n`` is the number of cases evaluated; means and standard deviations are
    over the cases where the metric is defined (NaN -- label absent from both reference and prediction -- is
    left out, as nnU-Net's own means do); the standard deviation is the sample one (ddof=1) and ``None`` with
    fewer than two such cases; a metric that was not computed (or never defined) is ``None``.
    :func:`summary_rows` turns a summary into rows, :func:`format_table` rows into Markdown and
    :func:`write_csv` rows into CSV (columns :data:`ROW_FIELDS`).

Every file is written atomically.
"""
from __future__ import annotations

import csv
import math
import multiprocessing
import os
import shutil
import tempfile
import threading
import warnings
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from nnharmony.utils.io import atomic_write, save_json_atomic

ROW_FIELDS = ["member", "label", "method", "dice_mean", "dice_std", "nsd_mean", "nsd_std", "n"]
SUMMARY_FORMAT = "nnharmony.evaluation/1"
_MAX_LISTED = 10


# ---------------------------------------------------------------------------------------------- labels
def _as_value(name: str, value: Any, source: str) -> int | tuple[int, ...]:
    try:
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError
            return tuple(int(v) for v in value)
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: label {name!r} has value {value!r}; expected an integer or a list of "
                         f"integers (a region)") from None


def labels_to_regions(labels: Mapping[str, Any], source: str = "labels") -> tuple[list[tuple[str, Any]], int | None]:
    """``([(name, label value or region tuple), ...], ignore_label)`` of the foreground of a dataset.json
    ``labels`` dict, as nnU-Net's evaluation wants them: plain label values for a label dataset, tuples for a
    region dataset (a region dataset's single-valued entries become 1-tuples, as nnU-Net's LabelManager does)."""
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(f"{source}: expected a non-empty dict of label name -> value, got {labels!r}")
    ignore = None
    out: list[tuple[str, Any]] = []
    for name, value in labels.items():
        v = _as_value(name, value, source)
        if name == "ignore":
            if isinstance(v, tuple):
                raise ValueError(f"{source}: the ignore label must be a single integer, got {value!r}")
            ignore = v
            continue
        if name == "background" or v == 0 or v == (0,):
            continue
        out.append((str(name), v))
    if not out:
        raise ValueError(f"{source}: no foreground label in {dict(labels)}")
    if any(isinstance(v, tuple) for _, v in out):
        out = [(n, v if isinstance(v, tuple) else (v,)) for n, v in out]
    return out, ignore


def _key(label_or_region: Any) -> str:
    """nnU-Net's JSON key of a label value or region (``"1"``, ``"(1, 2)"``)."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key

    return label_or_region_to_key(label_or_region)


# ---------------------------------------------------------------------------------------------- checks
def _files(folder: Path, file_ending: str) -> list[str]:
    return sorted(f.name for f in folder.iterdir() if f.is_file() and f.name.endswith(file_ending)) \
        if folder.is_dir() else []


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _header(path: Path) -> dict | None:
    """Geometry from the image header (SimpleITK), or None when SimpleITK cannot read the file."""
    import SimpleITK as sitk

    try:
        r = sitk.ImageFileReader()
        r.SetFileName(str(path))
        r.ReadImageInformation()
    except RuntimeError:
        return None
    return {"size": tuple(r.GetSize()), "spacing": tuple(r.GetSpacing()), "origin": tuple(r.GetOrigin()),
            "direction": tuple(r.GetDirection())}


def check_geometry(reference_file: str | os.PathLike, prediction_file: str | os.PathLike, image_reader_writer=None) -> None:
    """ValueError naming the prediction file when its size, spacing, origin or direction differs from the
    reference's (header only with SimpleITK; formats it cannot read are read with ``image_reader_writer``
    and compared by shape and spacing)."""
    ref, pred = Path(reference_file), Path(prediction_file)
    gr, gp = _header(ref), _header(pred)
    if gr is None or gp is None:
        if image_reader_writer is None:
            return
        sr, pr = image_reader_writer.read_seg(str(ref))
        sp, pp = image_reader_writer.read_seg(str(pred))
        gr = {"size": tuple(sr.shape), "spacing": tuple(pr.get("spacing", ()))}
        gp = {"size": tuple(sp.shape), "spacing": tuple(pp.get("spacing", ()))}
    tolerances = {"size": None, "spacing": (1e-4, 1e-6), "origin": (1e-5, 1e-3), "direction": (0, 1e-4)}
    for what, tol in tolerances.items():
        if what not in gr:
            continue
        a, b = gp[what], gr[what]
        same = a == b if tol is None else (len(a) == len(b) and np.allclose(a, b, rtol=tol[0], atol=tol[1]))
        if not same:
            raise ValueError(f"geometry mismatch: prediction {pred} has {what} {_fmt_tuple(a)} but its reference "
                             f"{ref} has {_fmt_tuple(b)}")


def _fmt_tuple(t: Sequence) -> str:
    return "(" + ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in t) + ")"


def _check_inputs(reference_folder: Path, prediction_folder: Path, file_ending: str) -> list[str]:
    if not prediction_folder.is_dir():
        raise FileNotFoundError(f"prediction folder {prediction_folder} does not exist")
    if not reference_folder.is_dir():
        raise FileNotFoundError(f"reference folder {reference_folder} does not exist")
    preds = _files(prediction_folder, file_ending)
    if not preds:
        raise ValueError(f"prediction folder {prediction_folder} holds no prediction files (*{file_ending})")
    missing = [f for f in preds if not (reference_folder / f).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} prediction file(s) in {prediction_folder} have no reference in "
                         f"{reference_folder}: {_listing(missing)}")
    return preds


# ---------------------------------------------------------------------------------------------- one folder
class _SerialPool:
    """Stands in for ``multiprocessing.Pool``: ``starmap`` in this process."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def starmap(self, fn, iterable):
        return [fn(*args) for args in iterable]


class _SerialMultiprocessing:
    class _Context:
        Pool = _SerialPool

    @staticmethod
    def get_context(method=None):
        return _SerialMultiprocessing._Context()


_SERIAL_LOCK = threading.Lock()


@contextmanager
def _nnunet_in_process():
    """nnU-Net's ``compute_metrics_on_folder`` always starts a spawn pool, which costs seconds (each worker
    imports torch); for ``num_processes <= 1`` its pool is swapped for an in-process one, so that nnU-Net's
    own code -- metrics, means, format -- still does the work. (Should nnU-Net stop creating its pool through
    its module's ``multiprocessing``, the swap has no effect and the pool simply runs.)"""
    from nnunetv2.evaluation import evaluate_predictions as ep

    with _SERIAL_LOCK:
        original = ep.multiprocessing
        ep.multiprocessing = _SerialMultiprocessing
        try:
            yield
        finally:
            ep.multiprocessing = original


def _nanmean(values: Iterable[float]) -> float:
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=float)
    if v.size == 0 or np.all(np.isnan(v)):
        return float("nan")
    return float(np.nanmean(v))


def _add_nsd(result: dict, regions: list, rw, tolerance_mm: float, ignore_label: int | None,
             num_processes: int) -> None:
    from nnharmony.evaluation.metrics import case_nsd

    cases = result["metric_per_case"]
    args = [(c["reference_file"], c["prediction_file"], rw, regions, tolerance_mm, ignore_label) for c in cases]
    if num_processes > 1 and len(args) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(args))) as pool:
            nsds = pool.starmap(case_nsd, args)
    else:
        nsds = [case_nsd(*a) for a in args]
    for c, nsd in zip(cases, nsds):
        for r in regions:
            c["metrics"][r]["NSD"] = nsd[r]
    for r in regions:
        result["mean"][r]["NSD"] = _nanmean(c["metrics"][r]["NSD"] for c in cases)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fg = float(np.mean([result["mean"][r]["NSD"] for r in regions]))  # like nnU-Net's foreground_mean
    result["foreground_mean"]["NSD"] = fg
    result["nsd"] = {"tolerance_mm": float(tolerance_mm), "foreground_mean": fg,
                     "mean": {_key(r): result["mean"][r]["NSD"] for r in regions}}


def summary_to_json(summary: Mapping) -> dict:
    """A summary with nnU-Net's in-memory keys (label values / region tuples) as it is written to JSON."""
    out = deepcopy(dict(summary))
    out["mean"] = {_key(k): v for k, v in summary.get("mean", {}).items()}
    out["metric_per_case"] = [dict(c, metrics={_key(k): v for k, v in c["metrics"].items()})
                              for c in summary.get("metric_per_case", [])]
    return out


def write_summary_json(summary: Mapping, path: str | os.PathLike) -> None:
    """nnU-Net's ``save_summary_json`` (tuple keys converted, keys sorted), written atomically."""
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json

    atomic_write(path, lambda tmp: save_summary_json(dict(summary), tmp))


def evaluate_folder(reference_folder: str | os.PathLike, prediction_folder: str | os.PathLike,
                    labels: Mapping[str, Any], file_ending: str = ".nii.gz", nsd_tolerance_mm: float | None = None,
                    num_processes: int = 2, output_folder: str | os.PathLike | None = None,
                    member_name: str | None = None) -> dict:
    """Evaluate every prediction in ``prediction_folder`` against the same-named file in ``reference_folder``.

    ``labels``: a dataset.json ``labels`` dict (name -> value, or list of values for a region).
    ``nsd_tolerance_mm``: also compute the NSD at this tolerance (None: Dice etc. only).
    ``num_processes``: worker processes (nnU-Net's spawn pool); 1 computes everything in this process.
    ``output_folder``: where ``summary.json`` goes (default: ``prediction_folder``).
    Returns the summary as nnU-Net returns it (label values / region tuples as keys of ``mean`` and of each
    case's ``metrics``), with the extra entries listed in the module docstring."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    ref_dir, pred_dir = Path(reference_folder), Path(prediction_folder)
    named, ignore_label = labels_to_regions(labels, f"labels of {member_name or ref_dir}")
    regions = [v for _, v in named]
    if nsd_tolerance_mm is not None and (not math.isfinite(float(nsd_tolerance_mm)) or nsd_tolerance_mm < 0):
        raise ValueError(f"NSD tolerance must be a number >= 0 mm, got {nsd_tolerance_mm!r}")
    preds = _check_inputs(ref_dir, pred_dir, file_ending)
    rw = determine_reader_writer_from_file_ending(file_ending, str(ref_dir / preds[0]),
                                                  allow_nonmatching_filename=True, verbose=False)()
    for f in preds:
        check_geometry(ref_dir / f, pred_dir / f, rw)

    num_processes = max(1, int(num_processes))
    if num_processes == 1:
        with _nnunet_in_process():
            result = compute_metrics_on_folder(str(ref_dir), str(pred_dir), None, rw, file_ending, regions,
                                               ignore_label, 1)
    else:
        result = compute_metrics_on_folder(str(ref_dir), str(pred_dir), None, rw, file_ending, regions,
                                           ignore_label, min(num_processes, len(preds)))
    if nsd_tolerance_mm is not None:
        _add_nsd(result, regions, rw, float(nsd_tolerance_mm), ignore_label, num_processes)
    result["labels"] = {n: _key(v) for n, v in named}
    # reference cases nobody predicted are not in the means: say which, so n is never silently smaller
    result["references_without_prediction"] = sorted(set(_files(ref_dir, file_ending)) - set(preds))
    result["member"] = member_name
    result["file_ending"] = file_ending
    result["reference_folder"] = str(ref_dir)
    result["prediction_folder"] = str(pred_dir)
    out_dir = Path(output_folder) if output_folder is not None else pred_dir
    write_summary_json(result, out_dir / "summary.json")
    return result


# ---------------------------------------------------------------------------------------------- rows/tables
def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None]:
    """(mean, sample std) over the finite values; std None with fewer than two, both None with none."""
    v = np.array([float(x) for x in values if _finite(x)], dtype=float)
    if v.size == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def summary_rows(summary: Mapping, labels: Mapping[str, Any] | None = None, member: str | None = None,
                 method: str | None = None) -> list[dict]:
    """One row per foreground label of a folder summary (in memory or loaded from JSON, either key style).

    ``labels`` (name -> value/region) defaults to the summary's own ``labels`` entry; ``member`` to its
    ``member`` entry."""
    if labels is not None:
        keys = [(n, _key(v)) for n, v in labels_to_regions(labels)[0]]
    else:
        keys = list(summary.get("labels", {}).items())
        if not keys:
            keys = [(str(k), str(k)) for k in summary.get("mean", {})]
    member = member if member is not None else summary.get("member")
    cases = [{str(k): v for k, v in c["metrics"].items()} for c in summary.get("metric_per_case", [])]
    rows = []
    for name, key in keys:
        per_case = [c.get(key, {}) for c in cases]
        dm, ds = mean_std(m.get("Dice") for m in per_case)
        nm, ns = mean_std(m.get("NSD") for m in per_case)
        rows.append({"member": member, "label": name, "method": method, "dice_mean": dm, "dice_std": ds,
                     "nsd_mean": nm, "nsd_std": ns, "n": len(cases)})
    return rows


def _cell(mean: Any, std: Any, digits: int) -> str:
    if not _finite(mean):
        return "–"
    return f"{float(mean):.{digits}f} ± {float(std):.{digits}f}" if _finite(std) else f"{float(mean):.{digits}f}"


def _text(x: Any) -> str:
    return "–" if x is None or x == "" else str(x).replace("|", "\\|")


def format_table(rows: Sequence[Mapping], digits: int = 3, nsd: bool | None = None) -> str:
    """Markdown table, one line per row: ``| member | label | [method |] n | Dice | [NSD |]`` with cells
    ``mean ± std`` (``–`` where undefined). The method column appears when a row names a method; the NSD
    column when ``nsd`` is True, or (``nsd=None``) when a row has an NSD value."""
    with_method = any(r.get("method") not in (None, "") for r in rows)
    with_nsd = nsd if nsd is not None else any(_finite(r.get("nsd_mean")) for r in rows)
    head = ["member", "label"] + (["method"] if with_method else []) + ["n", "Dice"] + (["NSD"] if with_nsd else [])
    align = ["---", "---"] + (["---"] if with_method else []) + ["---:", "---:"] + (["---:"] if with_nsd else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        cells = [_text(r.get("member")), _text(r.get("label"))]
        if with_method:
            cells.append(_text(r.get("method")))
        cells += [_text(r.get("n")), _cell(r.get("dice_mean"), r.get("dice_std"), digits)]
        if with_nsd:
            cells.append(_cell(r.get("nsd_mean"), r.get("nsd_std"), digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping], path: str | os.PathLike, fields: Sequence[str] = ROW_FIELDS) -> None:
    """CSV with a header line ``fields`` (default :data:`ROW_FIELDS`), one line per row; None/NaN -> empty."""

    def _value(x: Any) -> Any:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return ""
        return x

    def _w(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: _value(r.get(k)) for k in fields})

    atomic_write(path, _w)


def write_tables(rows: Sequence[Mapping], output_folder: str | os.PathLike, title: str | None = None,
                 nsd_tolerance_mm: float | None = None) -> str:
    """``results.md`` (title, NSD tolerance note, :func:`format_table`) and ``results.csv``; returns the table."""
    out = Path(output_folder)
    table = format_table(rows, nsd=nsd_tolerance_mm is not None or None)
    text = (f"# {title}\n\n" if title else "")
    if nsd_tolerance_mm is not None:
        text += f"NSD: normalized surface Dice at a tolerance of {nsd_tolerance_mm:g} mm.\n\n"
    text += "Dice / NSD: mean ± sample standard deviation over the n cases (undefined cases left out).\n\n" + table

    def _w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(out / "results.md", _w)
    write_csv(rows, out / "results.csv")
    return table


# ---------------------------------------------------------------------------------------------- collection
def _reference_folder(member, reference_root: Path | None, reference_folders: Mapping | None) -> Path | None:
    for k in (member.dataset_id, str(member.dataset_id), member.dataset_name):
        if reference_folders and k in reference_folders:
            return Path(reference_folders[k])
    if reference_root is None:
        from nnharmony.paths import raw_dir

        try:
            reference_root = raw_dir()
        except RuntimeError as e:
            raise ValueError(f"no reference for member {member.dataset_name}: give reference folders or a "
                             f"reference root ({e})") from None
    for cand in (reference_root / member.dataset_name / "labelsTr", reference_root / member.dataset_name):
        if cand.is_dir():
            return cand
    return None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def evaluate_collection(spec, prediction_folder: str | os.PathLike, reference_root: str | os.PathLike | None = None,
                        reference_folders: Mapping[Any, str | os.PathLike] | None = None,
                        member: Mapping[str, Any] | None = None, nsd_tolerance_mm: float | None = None,
                        num_processes: int = 2, output_folder: str | os.PathLike | None = None,
                        method: str | None = None) -> dict:
    """Evaluate the predictions of several collection members (layouts and reference look-up: see the module
    docstring). ``spec``: a :class:`~nnharmony.data.collection.CollectionSpec` or the path of a collection.json.
    ``member``: flat layout only, case id or file name -> member dataset id or name.
    Writes ``OUT/summary.json``, ``OUT/results.md``, ``OUT/results.csv`` and ``OUT/<member>/summary.json``
    (``OUT`` defaults to ``prediction_folder``) and returns the collection summary (as in ``OUT/summary.json``)."""
    from nnharmony.data.collection import CollectionSpec

    if not isinstance(spec, CollectionSpec):
        spec = CollectionSpec.load(spec)
    pred_dir = Path(prediction_folder)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_dir} does not exist")
    out_dir = Path(output_folder) if output_folder is not None else pred_dir
    root = Path(reference_root) if reference_root is not None else None

    sub = {m.dataset_name: pred_dir / m.dataset_name for m in spec.members
           if _files(pred_dir / m.dataset_name, m.file_ending)}
    endings = sorted({m.file_ending for m in spec.members})
    flat_files = sorted({f for e in endings for f in _files(pred_dir, e)})
    if sub and flat_files:
        raise ValueError(f"prediction folder {pred_dir} holds both member sub-folders ({', '.join(sub)}) and "
                         f"prediction files ({_listing(flat_files)}); use one layout")
    if not sub and not flat_files:
        raise ValueError(f"prediction folder {pred_dir} holds no prediction files: neither member sub-folders "
                         f"({', '.join(m.dataset_name for m in spec.members)}) with *{'/*'.join(endings)} files "
                         f"nor such files directly")

    refs = {m.dataset_name: _reference_folder(m, root, reference_folders) for m in spec.members}
    summaries: dict[str, dict] = {}
    rows: list[dict] = []

    def _run(m, ref: Path, folder: Path) -> dict:
        return evaluate_folder(ref, folder, m.labels, file_ending=m.file_ending, nsd_tolerance_mm=nsd_tolerance_mm,
                               num_processes=num_processes, output_folder=out_dir / m.dataset_name,
                               member_name=m.dataset_name)

    if sub:
        layout = "subfolders"
        for m in spec.members:
            if m.dataset_name not in sub:
                continue
            ref = refs[m.dataset_name]
            if ref is None:
                raise ValueError(f"member {m.dataset_name} has predictions in {sub[m.dataset_name]} but no reference "
                                 f"folder (looked for {m.dataset_name}/labelsTr and {m.dataset_name} in "
                                 f"{root if root is not None else '$nnUNet_raw'})")
            summaries[m.dataset_name] = _run(m, ref, sub[m.dataset_name])
    else:
        layout = "flat"
        assigned: dict[str, list[str]] = {m.dataset_name: [] for m in spec.members}
        explicit = {str(k): v for k, v in (member or {}).items()}
        orphans, ambiguous = [], []
        for f in flat_files:
            owners = [m for m in spec.members if f.endswith(m.file_ending)]
            case = None
            for m in owners:
                cid = f[: -len(m.file_ending)]
                if cid in explicit or f in explicit:
                    case = explicit.get(cid, explicit.get(f))
                    break
            if case is not None:
                target = spec.member(case)
                if not f.endswith(target.file_ending):
                    raise ValueError(f"prediction {f} is mapped to member {target.dataset_name}, whose files end "
                                     f"with {target.file_ending}")
                assigned[target.dataset_name].append(f)
                continue
            found = [m for m in owners if refs[m.dataset_name] is not None and (refs[m.dataset_name] / f).is_file()]
            if not found:
                orphans.append(f)
            elif len(found) > 1:
                ambiguous.append(f"{f} ({', '.join(m.dataset_name for m in found)})")
            else:
                assigned[found[0].dataset_name].append(f)
        if orphans:
            looked = ", ".join(str(refs[m.dataset_name]) for m in spec.members if refs[m.dataset_name] is not None)
            raise ValueError(f"{len(orphans)} prediction file(s) in {pred_dir} have no reference in any member's "
                             f"reference folder ({looked or 'none found'}): {_listing(orphans)}")
        if ambiguous:
            raise ValueError(f"prediction file(s) in {pred_dir} found in several members' references; name their "
                             f"member explicitly (member mapping / --case-members): {_listing(ambiguous)}")
        for m in spec.members:
            files = assigned[m.dataset_name]
            if not files:
                continue
            ref = refs[m.dataset_name]
            if ref is None:
                raise ValueError(f"member {m.dataset_name} has predictions ({_listing(files)}) but no reference "
                                 f"folder (looked for {m.dataset_name}/labelsTr and {m.dataset_name} in "
                                 f"{root if root is not None else '$nnUNet_raw'})")
            with tempfile.TemporaryDirectory(prefix="nnharmony_eval_") as tmp:
                tmp_dir = Path(tmp)
                for f in files:
                    _link_or_copy(pred_dir / f, tmp_dir / f)
                s = _run(m, ref, tmp_dir)
                # point the summary at the real prediction files, not at the temporary links
                for c in s["metric_per_case"]:
                    c["prediction_file"] = str(pred_dir / Path(c["prediction_file"]).name)
                s["prediction_folder"] = str(pred_dir)
                write_summary_json(s, out_dir / m.dataset_name / "summary.json")
            summaries[m.dataset_name] = s

    for name, s in summaries.items():
        rows += summary_rows(s, spec.member(name).labels, member=name, method=method)
    result = {
        "format": SUMMARY_FORMAT,
        "collection": spec.name,
        "method": method,
        "layout": layout,
        "nsd_tolerance_mm": None if nsd_tolerance_mm is None else float(nsd_tolerance_mm),
        "rows": rows,
        "members": {name: summary_to_json(s) for name, s in summaries.items()},
        "members_without_predictions": [m.dataset_name for m in spec.members if m.dataset_name not in summaries],
    }
    save_json_atomic(result, out_dir / "summary.json")
    write_tables(rows, out_dir, title=f"Evaluation of {spec.name}" + (f" ({method})" if method else ""),
                 nsd_tolerance_mm=nsd_tolerance_mm)
    return result
