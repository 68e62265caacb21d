"""Scores of the benchmark: per-case Dice/NSD of a prediction folder against the member's reference, and rows
member x label x method (mean and sample standard deviation over the validation cases)."""
from __future__ import annotations

import math
import os
from pathlib import Path


def metric_value(d: dict, name: str):
    """``d[name]`` (case-insensitive) as a float; None when missing or undefined (nnU-Net's NaN: the label is in
    neither reference nor prediction), so that benchmark.json stays strict JSON."""
    for k, v in d.items():
        if str(k).lower() == name.lower():
            try:
                v = float(v)
            except (TypeError, ValueError):
                return None
            return v if math.isfinite(v) else None
    return None


def label_metrics(metrics: dict, name: str, value) -> dict | None:
    """The metrics of one label in an nnU-Net-style ``metric_per_case[i]['metrics']`` dict, whose keys may be
    the label value, a region tuple, their string forms, or the label name."""
    cands = [name]
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(vals) == 1:
        cands += [vals[0], str(vals[0]), (vals[0],), str((vals[0],))]
    cands += [tuple(vals), str(tuple(vals)), str(list(vals))]
    for c in cands:
        try:
            if c in metrics:
                return metrics[c]
        except TypeError:
            continue
    return None


def case_id(entry: dict, file_ending: str) -> str:
    f = entry.get("prediction_file") or entry.get("reference_file") or entry.get("case") or ""
    n = os.path.basename(str(f))
    return n[: -len(file_ending)] if n.endswith(file_ending) else n


def evaluate_prediction_folder(ref_folder: Path, pred_folder: Path, labels: dict, file_ending: str,
                               nsd_tolerance_mm: float | None, output_folder: Path, member_name: str,
                               num_processes: int = 2) -> list[dict]:
    """Per case: ``{"case", "label", "dice", "nsd"}`` for every label of ``labels`` (name -> value/region)."""
    from nnharmony.evaluation.evaluate import evaluate_folder

    n_pred = len([f for f in os.listdir(pred_folder) if f.endswith(file_ending)]) if pred_folder.is_dir() else 0
    if n_pred <= 16:
        num_processes = 1  # a few cases: starting a spawn pool costs more than it saves
    summary = evaluate_folder(str(ref_folder), str(pred_folder), labels, file_ending=file_ending,
                              nsd_tolerance_mm=nsd_tolerance_mm, num_processes=num_processes,
                              output_folder=str(output_folder), member_name=member_name)
    out = []
    for entry in summary.get("metric_per_case", []):
        case = case_id(entry, file_ending)
        for name, value in labels.items():
            if name in ("background", "ignore"):
                continue
            lm = label_metrics(entry.get("metrics", {}), name, value)
            if lm is None:
                continue
            out.append({"case": case, "label": name, "dice": metric_value(lm, "Dice"), "nsd": metric_value(lm, "NSD")})
    return out


def evaluate_method(method, spec, folders: dict[str, Path], report_dir: Path, nsd_tolerance_mm: float | None,
                    num_processes: int = 1, skip_missing: bool = False) -> list[dict]:
    """Per-case scores of one method on every member (``{"member", "method", "case", "label", "dice", "nsd"}``);
    the in-context method's folders hold one sub-folder per label. Raises when nothing was predicted.
    ``skip_missing``: a member whose prediction folder does not exist (no validation cases) is left out."""
    from nnharmony.benchmark.files import label_tasks, safe_name
    from nnharmony.paths import preprocessed_dir

    per_case = []
    for m in spec.members:
        if skip_missing and not folders[m.dataset_name].is_dir():
            continue
        ref = preprocessed_dir() / m.dataset_name / "gt_segmentations"
        ev_dir = report_dir / "evaluation" / method.name / m.dataset_name
        if method.paradigm == "in-context":
            results = []
            for name, value in label_tasks(m):
                results += evaluate_prediction_folder(
                    ref, folders[m.dataset_name] / safe_name(name), {"background": 0, name: value}, m.file_ending,
                    nsd_tolerance_mm, ev_dir / safe_name(name), m.dataset_name, num_processes)
        else:
            results = evaluate_prediction_folder(ref, folders[m.dataset_name], m.labels, m.file_ending,
                                                 nsd_tolerance_mm, ev_dir, m.dataset_name, num_processes)
        per_case += [{"member": m.dataset_name, "method": method.name, **r} for r in results]
    if not per_case:
        raise RuntimeError("no prediction was found to evaluate")
    return per_case


def aggregate(per_case: list[dict]) -> list[dict]:
    """Rows member x label x method with mean and sample std over cases (see ``report.ROW_FIELDS``)."""
    from nnharmony.evaluation.report import summarize

    groups: dict[tuple, list[dict]] = {}
    for r in per_case:
        groups.setdefault((r["member"], r["label"], r["method"]), []).append(r)
    rows = []
    for (member, label, method), rs in groups.items():
        dm, ds, n = summarize(r["dice"] for r in rs)
        nm, ns, _ = summarize(r["nsd"] for r in rs)
        rows.append({"member": member, "label": label, "method": method, "dice_mean": dm, "dice_std": ds,
                     "nsd_mean": nm, "nsd_std": ns, "n": len(rs)})
    return rows


