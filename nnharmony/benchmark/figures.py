"""The report's figures from a finished run: Dice bars, one overlay per member, the training curves."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Sequence

from nnharmony.benchmark.files import label_tasks, raw_images, raw_label, safe_name


def make_figures(bench: dict, spec, report_dir: Path, num_overlays: int) -> dict[str, Any]:
    """``dice_bar.png``, ``training_curves.png`` and up to ``num_overlays`` overlays (the first validation case of
    each member, then the second, ...); paths relative to ``report_dir``."""
    from nnharmony.evaluation import report as R

    methods = [t["method"] for t in bench["timings"] if t["status"] == "ok"]
    figs: dict[str, Any] = {"bars": None, "curves": None, "overlays": []}
    s = bench["settings"]
    if R.plot_metric_bars(bench["rows"], report_dir / "dice_bar.png", "dice", methods,
                          title=f"Dice on {s['collection']}, fold {s['fold']}, budget {s['budget']}"):
        figs["bars"] = "dice_bar.png"
    curves = {m: bench["methods"][m].get("models", []) for m in methods}
    if R.plot_training_curves(curves, report_dir / "training_curves.png"):
        figs["curves"] = "training_curves.png"
    for member_name, case in _overlay_picks(bench["collection"]["members"], num_overlays if methods else 0):
        try:
            figs["overlays"].append(overlay_case(bench, spec.member(member_name), case, methods, report_dir,
                                                 list(spec.tasks)))
        except Exception as e:  # noqa: BLE001 - a figure must not sink the report
            print(f"warning: overlay of {member_name}/{case} failed: {e}", file=sys.stderr)
    return figs


def _overlay_picks(members: Sequence[dict], n: int) -> list[tuple[str, str]]:
    picks, depth = [], 0
    while len(picks) < n and any(depth < len(m["validation_cases"]) for m in members):
        for m in members:
            if depth < len(m["validation_cases"]) and len(picks) < n:
                picks.append((m["name"], m["validation_cases"][depth]))
        depth += 1
    return picks


def _read(path: Path):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), tuple(reversed(img.GetSpacing()))


def _drawn_values(member) -> dict[str, int]:
    """Label name -> value drawn: plain labels as they are; a region with the value nnU-Net paints for it."""
    order = list(member.regions_class_order or [])
    draw = {}
    for i, (name, v) in enumerate(label_tasks(member)):
        region = isinstance(v, (list, tuple))
        draw[name] = int(order[i]) if region and i < len(order) else int(v[0] if region else v)
    return draw


def _prediction(bench: dict, member, case: str, method: str, draw: dict[str, int], shape):
    import numpy as np

    folder = Path(bench["methods"][method].get("predictions", {}).get(member.dataset_name, ""))
    if bench["methods"][method]["paradigm"] != "in-context":
        f = folder / f"{case}{member.file_ending}"
        return _read(f)[0] if f.is_file() else None
    arr = None
    for name in draw:
        f = folder / safe_name(name) / f"{case}{member.file_ending}"
        if f.is_file():
            arr = np.zeros(shape, dtype=np.uint8) if arr is None else arr
            arr[_read(f)[0] > 0] = draw[name]
    return arr


def overlay_case(bench: dict, member, case: str, methods: Sequence[str], report_dir: Path,
                 spec_tasks: Sequence[str] = ()) -> str:
    import numpy as np

    from nnharmony.evaluation import report as R

    image, spacing = _read(raw_images(member, case)[0])
    reference, _ = _read(raw_label(member, case))
    draw = _drawn_values(member)
    preds = {m: _prediction(bench, member, case, m, draw, reference.shape) for m in methods}
    scores: dict[str, float | None] = {}
    for m in methods:
        d = [r["dice"] for r in bench["per_case"] if r["method"] == m and r["member"] == member.dataset_name
             and r["case"] == case and r["dice"] is not None and math.isfinite(r["dice"])]
        scores[m] = float(np.mean(d)) if d else None
    if image.ndim == 2:
        image, reference = image[None], reference[None]
        preds = {k: (v[None] if v is not None else None) for k, v in preds.items()}
    rel = f"overlays/{safe_name(member.dataset_name)}_{safe_name(case)}.png"
    colors = {t.label: spec_tasks.index(t.task) for t in member.tasks if t.task in spec_tasks}
    R.plot_overlay(image, reference, preds, report_dir / rel, labels=draw,
                   title=f"{member.dataset_name} / {case} ({member.channels[0]})", spacing=spacing, scores=scores,
                   color_index=colors)
    return rel
