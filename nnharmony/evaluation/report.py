"""Tables and figures of ``nnharmony_benchmark``: Markdown/CSV tables, a grouped bar chart and image overlays.

Everything here works on plain Python data so that it can be tested (and reused) without training anything:

* a *row* is one member x label x method: ``{"member", "label", "method", "dice_mean", "dice_std", "nsd_mean",
  "nsd_std", "n"}`` (``n``: validation cases evaluated; ``*_std``: sample standard deviation over those cases,
  ``None`` with fewer than two cases; a metric that was not computed is ``None``);
* a *timing* is one method: ``TIMING_FIELDS`` -- status, epochs and iterations run, the time split (set-up:
  building trainers, networks and data loaders; training; the final validation, i.e. prediction of the validation
  cases; in-context prediction; evaluation), the method's total, its CPU time (user + system) and peak memory;
* *shared timings* are the run's own: ``startup_s`` (interpreter, imports), ``planning_s`` (data and planning),
  ``report_s`` (tables and figures).

Figures use matplotlib's Agg backend (no display needed) and are written atomically.
"""
from __future__ import annotations

import csv
import math
import os
import textwrap
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from nnharmony.utils.io import atomic_write

ROW_FIELDS = ["member", "label", "method", "dice_mean", "dice_std", "nsd_mean", "nsd_std", "n"]
TIMING_FIELDS = ["method", "trainer", "configuration", "status", "epochs", "iterations", "setup_s", "train_s",
                 "validation_s", "predict_s", "eval_s", "total_s", "cpu_s", "peak_rss_mb", "peak_cuda_mb", "note"]
METRIC_NAMES = {"dice": "Dice", "nsd": "NSD"}


# ---------------------------------------------------------------------------------------------- numbers
def summarize(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std, n) of the finite values; nnU-Net writes NaN for a case where Dice is undefined
    (empty reference and empty prediction) and such cases are left out, as nnU-Net's own means do."""
    v = np.array([x for x in values if x is not None and math.isfinite(float(x))], dtype=float)
    if v.size == 0:
        return None, None, 0
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None), int(v.size)


def _is_num(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def fmt_mean_std(mean: float | None, std: float | None, digits: int = 3) -> str:
    if not _is_num(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if _is_num(std) else f"{mean:.{digits}f}"


def fmt_seconds(s: float | None) -> str:
    if not _is_num(s):
        return "–"
    s = float(s)
    if s < 60:
        return f"{s:.0f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def fmt_mb(mb: float | None) -> str:
    if not _is_num(mb):
        return "–"
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _ordered(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for i in items:
        seen.setdefault(i, None)
    return list(seen)


# ---------------------------------------------------------------------------------------------- tables
def results_table(rows: Sequence[Mapping], metric: str = "dice", methods: Sequence[str] | None = None,
                  status: Mapping[str, str] | None = None, digits: int = 3) -> str:
    """Markdown table, one line per member x label and one column per method, cells ``mean ± std`` over the
    validation cases; the last line is each method's unweighted mean over the member x label lines.

    ``status``: method -> word shown in its cells when it has no numbers (``skipped``, ``failed``)."""
    status = dict(status or {})
    methods = list(methods) if methods is not None else _ordered(r["method"] for r in rows)
    keys = _ordered((r["member"], r["label"]) for r in rows)
    by = {(r["member"], r["label"], r["method"]): r for r in rows}
    lines = ["| member | label | n | " + " | ".join(methods) + " |",
             "|---|---|---:|" + "---:|" * len(methods)]
    per_method: dict[str, list[float]] = {m: [] for m in methods}
    for member, label in keys:
        ns = _ordered(str(by[(member, label, m)].get("n")) for m in methods if (member, label, m) in by)
        cells = []
        for m in methods:
            r = by.get((member, label, m))
            if r is None or not _is_num(r.get(f"{metric}_mean")):
                cells.append(status.get(m, "–"))
                continue
            cells.append(fmt_mean_std(r[f"{metric}_mean"], r.get(f"{metric}_std"), digits))
            per_method[m].append(float(r[f"{metric}_mean"]))
        lines.append(f"| {member} | {label} | {'/'.join(ns) if ns else '–'} | " + " | ".join(cells) + " |")
    if keys:
        means = []
        for m in methods:
            v = per_method[m]
            complete = len(v) == len(keys)
            means.append(f"**{np.mean(v):.{digits}f}**" + ("" if complete else f" ({len(v)}/{len(keys)})")
                         if v else status.get(m, "–"))
        lines.append("| **mean** | | | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def timing_table(timings: Sequence[Mapping], shared: Mapping[str, float | None] | None = None) -> str:
    """Markdown table: one line per method with status, epochs and iterations run, the time split, CPU time and
    peak memory; ``shared`` (start-up, planning, report) goes on a line above it."""
    lines = []
    if shared:
        parts = [f"{name} {fmt_seconds(shared.get(key))}" for key, name in
                 (("startup_s", "start-up"), ("planning_s", "data + planning"), ("report_s", "report and figures"))
                 if key in shared]
        lines += ["shared by all methods: " + ", ".join(parts), ""]
    lines += ["| method | trainer | config | status | epochs | iterations | set-up | training | validation "
              "| prediction | evaluation | total | CPU time | peak RAM | peak GPU memory |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in timings:
        times = " | ".join(fmt_seconds(t.get(k)) for k in ("setup_s", "train_s", "validation_s", "predict_s",
                                                           "eval_s", "total_s", "cpu_s"))
        lines.append(
            f"| {t['method']} | {t.get('trainer') or '–'} | {t.get('configuration') or '–'} | {t.get('status', '–')} "
            f"| {t['epochs'] if t.get('epochs') not in (None, '') else '–'} "
            f"| {t['iterations'] if _is_num(t.get('iterations')) else '–'} | {times} "
            f"| {fmt_mb(t.get('peak_rss_mb'))} | {fmt_mb(t.get('peak_cuda_mb'))} |")
    return "\n".join(lines) + "\n"


def _write_csv(records: Sequence[Mapping], fields: Sequence[str], path: str | os.PathLike) -> None:
    def _w(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
            w.writeheader()
            for r in records:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})

    atomic_write(path, _w)


def write_results_csv(rows: Sequence[Mapping], path: str | os.PathLike) -> None:
    """Long format, one line per member x label x method (columns ``ROW_FIELDS``; empty cell = not computed)."""
    _write_csv(rows, ROW_FIELDS, path)


def write_timing_csv(timings: Sequence[Mapping], path: str | os.PathLike) -> None:
    _write_csv(timings, TIMING_FIELDS, path)


def write_text(text: str, path: str | os.PathLike) -> None:
    def _w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, _w)


# ---------------------------------------------------------------------------------------------- figures
def _pyplot():
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def default_style(fn):
    """Draw with matplotlib's default style: nnU-Net's progress plot calls ``seaborn.set(font_scale=2.5)``, which
    changes the style of every later figure of the process."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        plt = _pyplot()
        with plt.style.context("default"):
            return fn(*args, **kwargs)

    return wrapper


def _display_window(img: np.ndarray) -> tuple[float, float]:
    """Grey-value window of a slice: 1st-99th percentile of the pixels brighter than its darkest quarter (the body,
    not the air around it), so that CT soft tissue is not squeezed between air and bone."""
    if not img.size:
        return 0.0, 1.0
    body = img[img > np.percentile(img, 25)]
    lo, hi = np.percentile(body if body.size > 10 else img, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def _save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    plt = _pyplot()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)


def method_colors(methods: Sequence[str]) -> dict[str, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


@default_style
def plot_metric_bars(rows: Sequence[Mapping], path: str | os.PathLike, metric: str = "dice",
                     methods: Sequence[str] | None = None, title: str | None = None) -> bool:
    """Grouped bars: one group per member / label, one bar per method (mean over validation cases, error bar =
    standard deviation over cases). Tick labels are the labels; each member's name is written once under its groups
    (members are separated by dashed lines), so long dataset names never overlap. Returns False (and writes
    nothing) when there is no number to plot."""
    methods = list(methods) if methods is not None else _ordered(r["method"] for r in rows)
    by = {(r["member"], r["label"], r["method"]): r for r in rows}
    keys = _ordered((r["member"], r["label"]) for r in rows)
    plotted = [m for m in methods if any(_is_num(by.get((*k, m), {}).get(f"{metric}_mean")) for k in keys)]
    if not keys or not plotted:
        return False
    plt = _pyplot()
    colors = method_colors(methods)
    n_groups, n_bars = len(keys), len(plotted)
    width = 0.8 / n_bars
    members = _ordered(mem for mem, _ in keys)
    # long label names on two lines, member names broken after the dataset id ("Dataset935_" / "DRIVE"); the
    # groups wide enough for the bars, every label line and every member's longest line (bold 9 pt: ~0.09 in
    # per character)
    tick_text = [textwrap.fill(lab, 14, break_long_words=False) for _, lab in keys]
    member_text = {m: m.replace("_", "_\n", 1) for m in members}

    def widest(text: str) -> int:
        return max(len(line) for line in text.splitlines())

    group_w = max(0.22 * n_bars + 0.45, 0.08 * max(widest(t) for t in tick_text) + 0.15,
                  max(0.09 * widest(member_text[m]) / sum(k[0] == m for k in keys) for m in members))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 + n_groups * group_w), 5.2))
    x = np.arange(n_groups)
    for j, m in enumerate(plotted):
        means, stds = [], []
        for k in keys:
            r = by.get((*k, m), {})
            means.append(float(r[f"{metric}_mean"]) if _is_num(r.get(f"{metric}_mean")) else np.nan)
            stds.append(float(r[f"{metric}_std"]) if _is_num(r.get(f"{metric}_std")) else 0.0)
        pos = x - 0.4 + width * (j + 0.5)
        ax.bar(pos, np.nan_to_num(means), width, yerr=stds, capsize=2, color=colors[m], label=m,
               edgecolor="black", linewidth=0.4, error_kw={"elinewidth": 0.8})
        for p_, v in zip(pos, means):
            if np.isnan(v):
                ax.text(p_, 0.01, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(x)
    ax.set_xticklabels(tick_text, fontsize=9)
    below = -14 - 11 * max(t.count("\n") + 1 for t in tick_text)  # under the (one- or two-line) tick labels
    for i, mem in enumerate(members):
        idx = [j for j, k in enumerate(keys) if k[0] == mem]
        ax.annotate(member_text[mem], xy=((np.mean(idx) + 0.5) / n_groups, 0), xycoords="axes fraction",
                    xytext=(0, below),
                    textcoords="offset points", ha="center", va="top", fontsize=9, fontweight="bold")
        if i:
            ax.axvline(idx[0] - 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(-0.5, n_groups - 0.5)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)} (mean ± std over validation cases)")
    ax.set_title(title or f"{METRIC_NAMES.get(metric, metric)} per member and label")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(title="method", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save_figure(fig, path)
    return True


@default_style
def plot_training_curves(curves: Mapping[str, Sequence[Mapping]], path: str | os.PathLike) -> bool:
    """All methods' training curves in one figure: training loss, validation loss and pseudo Dice (nnU-Net's
    per-epoch estimate on validation patches) per epoch. ``curves``: method -> its models, each ``{"model",
    "curves": {"train_loss", "val_loss", "pseudo_dice"}}`` (the per-dataset paradigm has one model per member,
    drawn in its method's colour with different line styles). Losses of different methods are different functions
    (and scales): compare their shapes, not their values. False when there is nothing to draw."""
    methods = [m for m, models in curves.items() if any(mod.get("curves", {}).get("train_loss") for mod in models)]
    if not methods:
        return False
    plt = _pyplot()
    colors = method_colors(list(curves))
    styles = ["-", "--", ":", "-."]
    panels = [("train_loss", "training loss"), ("val_loss", "validation loss"), ("pseudo_dice", "pseudo Dice")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, name) in zip(axes, panels):
        for m in methods:
            models = curves[m]
            for i, mod in enumerate(models):
                y = mod.get("curves", {}).get(key) or []
                if not y:
                    continue
                label = m if len(models) == 1 else f"{m}: {str(mod.get('model', i)).split(' ', 1)[-1]}"
                ax.plot(np.arange(1, len(y) + 1), y, styles[i % len(styles)], color=colors[m], marker="o",
                        markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if key == "pseudo_dice":
            ax.set_ylim(0, 1)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="method / model")
    fig.tight_layout()
    _save_figure(fig, path)
    return True


LABEL_COLORS = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#ffff33", "#a65628", "#f781bf",
                "#00ced1", "#7fff00"]


def _label_rgba(seg: np.ndarray, values: Sequence[int], colors: Sequence[str], alpha: float = 0.55) -> np.ndarray:
    from matplotlib.colors import to_rgba

    rgba = np.zeros((*seg.shape, 4), dtype=float)
    for v, c in zip(values, colors):
        rgba[seg == v] = to_rgba(c, alpha)
    return rgba


def best_slice(reference: np.ndarray, axis: int = 0) -> int:
    """Index along ``axis`` showing the most labels, then the most foreground, in ``reference`` (the middle one
    if it is empty)."""
    other = tuple(a for a in range(reference.ndim) if a != axis)
    counts = (reference > 0).sum(axis=other)
    if counts.max() == 0:
        return reference.shape[axis] // 2
    values = [v for v in np.unique(reference) if v != 0]
    present = sum(((reference == v).sum(axis=other) > 0).astype(np.int64) for v in values)
    return int(np.argmax(present * (int(counts.max()) + 1) + counts))


@default_style
def plot_overlay(image: np.ndarray, reference: np.ndarray, predictions: Mapping[str, np.ndarray | None],
                 path: str | os.PathLike, labels: Mapping[str, int] | None = None, title: str = "",
                 spacing: Sequence[float] | None = None, scores: Mapping[str, float | None] | None = None,
                 slice_index: int | None = None, color_index: Mapping[str, int] | None = None) -> int:
    """One figure, one column each: image, reference on image, every method's prediction on image (an axial
    slice of 3D arrays ``(z, y, x)`` -- the slice with the most reference foreground unless ``slice_index``).
    ``labels``: name -> value drawn (colour legend); ``scores``: method -> the case's Dice averaged over its
    labels, shown in the column title;
    ``spacing``: voxel spacing in array order (z, y, x), for the aspect ratio; ``color_index``: label name ->
    index into ``LABEL_COLORS`` (e.g. the global task id, so a structure has one colour in every figure).
    Returns the slice index."""
    if image.ndim == 3:
        z = best_slice(reference) if slice_index is None else slice_index
        img2, ref2 = image[z], reference[z]
        preds2 = {m: (p[z] if p is not None else None) for m, p in predictions.items()}
    else:
        z = 0
        img2, ref2, preds2 = image, reference, dict(predictions)
    if labels is None:
        vals = sorted({int(v) for v in np.unique(reference) if v != 0})
        labels = {str(v): v for v in vals}
    values = list(labels.values())
    colors = [LABEL_COLORS[(color_index or {}).get(n, i) % len(LABEL_COLORS)] for i, n in enumerate(labels)]
    aspect = 1.0
    if spacing is not None and len(spacing) >= 2:
        aspect = float(spacing[-2]) / float(spacing[-1])  # (y, x) spacing of the shown slice
    lo, hi = _display_window(img2)
    plt = _pyplot()
    cols = 2 + len(preds2)
    panel_h = 2.6 * aspect * img2.shape[0] / max(1, img2.shape[1])
    fig, axes = plt.subplots(1, cols, figsize=(2.6 * cols, panel_h + 1.0))
    axes = np.atleast_1d(axes)
    panels = [("image", None), ("reference", ref2)] + list(preds2.items())
    for ax, (name, seg) in zip(axes, panels):
        ax.imshow(img2, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect,
                  interpolation="nearest")
        head = name
        if name not in ("image", "reference"):
            if seg is None:
                ax.text(0.5, 0.5, "no prediction", transform=ax.transAxes, ha="center", va="center",
                        color="white", fontsize=9, bbox={"facecolor": "black", "alpha": 0.6})
            s = (scores or {}).get(name)
            if _is_num(s):
                head = f"{name}\nmean Dice {s:.2f}"
        if seg is not None:
            ax.imshow(_label_rgba(seg, values, colors), aspect=aspect, interpolation="nearest")
        ax.set_title(head, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, label=f"{n} ({v})") for c, (n, v) in zip(colors, labels.items())]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"{title}  (slice {z})" if title else f"slice {z}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save_figure(fig, path)
    return z


# ---------------------------------------------------------------------------------------------- the report
def auto_member_lines(bench: Mapping) -> list[str]:
    """How often each method inferred the right member, and its Dice with the true member next to the Dice with the
    member it inferred (the same validation cases)."""
    out = []
    for method, members in bench.get("auto_member", {}).items():
        right = sum(v["correct"] for v in members.values())
        total = sum(v["cases"] for v in members.values())
        out.append(f"- **{method}**: inferred member right on {right}/{total} validation cases ("
                   + "; ".join(f"{name} {v['correct']}/{v['cases']}" for name, v in members.items()) + ")")
    rows = bench.get("auto_rows", [])
    if rows:
        out += ["", "Dice with the true member (column `METHOD`) and with the inferred one (`METHOD (auto)`):", "",
                results_table(rows, "dice")]
    return out


def markdown_report(bench: Mapping[str, Any]) -> str:
    """``results.md``: settings, the Dice (and NSD) tables, the computed conclusion, the time split, notes and the
    figures."""
    rows = bench.get("rows", [])
    timings = bench.get("timings", [])
    methods = [t["method"] for t in timings] or _ordered(r["method"] for r in rows)
    status = {t["method"]: t["status"] for t in timings if t.get("status") != "ok"}
    s = bench.get("settings", {})
    out = [f"# nnharmony benchmark: {s.get('collection', '')}", "",
           f"fold {s.get('fold')}, budget {s.get('budget')}, device {s.get('device')}"
           + (f" x {s['num_gpus']}" if s.get("num_gpus", 1) > 1 else "")
           + (f", configuration {s['configuration']}" if s.get("configuration") else "")
           + f", started {bench.get('started', '')}, total {fmt_seconds(bench.get('total_s'))}.", "",
           "## Dice per member and label (mean ± std over validation cases)", "",
           results_table(rows, "dice", methods, status)]
    if bench.get("conclusion"):
        out += ["## What the numbers say", "", "Computed from the per-case Dice above (a case's score is its Dice "
                "averaged over the member's labels).", "", *bench["conclusion"], ""]
    if bench.get("auto_member"):
        out += ["## Dataset-free prediction (`--dataset auto`)", "", *auto_member_lines(bench), ""]
    if any(_is_num(r.get("nsd_mean")) for r in rows):
        out += [f"## NSD at {s.get('nsd_tolerance_mm')} mm (mean ± std over validation cases)", "",
                results_table(rows, "nsd", methods, status)]
    out += ["## Time and memory per method", "", timing_table(timings, bench.get("shared_timings"))]
    notes = [f"- **{t['method']}**: {t['note']}" for t in timings if t.get("note")]
    if notes:
        out += ["### Notes", ""] + notes + [""]
    figs = bench.get("figures", {})
    shown = [(figs.get("bars"), "Dice per member and label"), (figs.get("curves"), "training curves")]
    shown += [(o, o) for o in figs.get("overlays", [])]
    if any(f for f, _ in shown):
        out += ["## Figures", ""] + [f"![{alt}]({f})\n" for f, alt in shown if f]
    out += ["## How to read this", "",
            "- Each cell is the mean over the member's validation cases of this fold, ± the standard deviation over "
            "those cases; `n` is the number of cases. The **mean** line averages the lines above it (each member x "
            "label counts once).",
            "- Every method trained on the same training cases with the same budget and is evaluated on the same "
            "validation cases, against nnU-Net's `gt_segmentations` of each member, in the member's own geometry.",
            "- `nnunet` is the per-dataset paradigm: one plain nnU-Net per member. `universeg` segments each label "
            "from a support set of the member's training cases (in-context), see the notes.",
            "- Times are wall-clock. *set-up* builds trainers, networks and data loaders; *validation* is the "
            "trainer's final validation (sliding-window prediction of the validation cases); *prediction* is the "
            "in-context method's; *total* is the method's wall time. *CPU time* is user + system time (on a busy "
            "machine it shows the work done better than wall time). Peak RAM is the largest resident size of this "
            "process while the method ran; peak GPU memory is PyTorch's maximum allocated memory.", ""]
    return "\n".join(out)
