"""What a collection training reports: per-member and per-task pseudo Dice with names, the members' splits and
sampling weights, time left, and ``progress_members.png`` (one panel per task, one curve per member).

nnU-Net's pooled pseudo Dice over all members hides which dataset is learning; these helpers keep the counts
per member so that every line of the log and every curve names its member and task.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nnharmony.data.collection import CollectionSpec
from nnharmony.evaluation.report import default_style

#: keys of the per-member (K, T) pseudo Dice counts in a validation step's output
MEMBER_COUNT_KEYS = ("tp_member", "fp_member", "fn_member")
MEMBER_PROGRESS_FILE = "progress_members.json"
MEMBER_PROGRESS_PLOT = "progress_members.png"


def dice(tp: float, fp: float, fn: float) -> float:
    """Pseudo Dice from counts as nnU-Net computes it; NaN where nothing was predicted nor annotated."""
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator > 0 else float("nan")


def member_task_dice(spec: CollectionSpec, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, dict]:
    """``{member name: {task name: pseudo Dice}}`` from (K, T) counts, only the tasks each member annotates."""
    table: dict[str, dict] = {}
    for k, m in enumerate(spec.members):
        if tp[k].sum() + fp[k].sum() + fn[k].sum() == 0:
            continue  # no validation sample of this member this epoch
        table[m.dataset_name] = {spec.tasks[t]: dice(tp[k, t], fp[k, t], fn[k, t]) for t in
                                 spec.task_ids(m.dataset_id)}
    return table


def fmt(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.4f}"


def named_values(names: Sequence[str], values: Iterable[float]) -> str:
    """``liver 0.8123, spleen nan``: plain floats with their names (nnU-Net prints ``[np.float32(0.81), ...]``)."""
    values = [float(v) for v in values]
    if len(values) != len(names):  # a trainer whose counts are not per global task
        names = [str(i) for i in range(len(values))]
    return ", ".join(f"{n} {fmt(v)}" for n, v in zip(names, values))


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def time_left(epoch_durations: Sequence[float], epochs_done: int, num_epochs: int,
              budget_minutes: float | None = None, elapsed: float | None = None) -> str:
    """``epoch 3/20, about 4 min 10 s left`` from the mean epoch time of this run (and a wall-clock budget)."""
    remaining = max(0, num_epochs - epochs_done)
    text = f"epoch {epochs_done}/{num_epochs}"
    if not epoch_durations:
        return text
    left = remaining * float(np.mean(epoch_durations))
    if budget_minutes is not None and elapsed is not None:
        left = min(left, max(0.0, 60 * budget_minutes - elapsed))
    return f"{text}, about {format_duration(left)} left"


def describe_members(spec: CollectionSpec, fold, train_loader, val_loader) -> list[str]:
    """One line per member: training and validation cases of the fold and the sampling probability (of a
    mixed-dataset loader, or of a UniverSeg episode loader: the member's share of the episodes)."""
    tr, va = _mixed(train_loader), _mixed(val_loader)
    p_tr = _member_probabilities(spec, tr)
    held = set(getattr(tr, "holdout", ()) or ())
    lines = [f"members (fold {fold}): training / validation cases, probability of being sampled "
             f"(scheme {_scheme(spec, tr)})"]
    for k, m in enumerate(spec.members):
        n_tr, n_va = _cases(tr, k), _cases(va, k)
        p = float(p_tr[k]) if p_tr is not None else float("nan")
        lines.append(f"  {m.dataset_name}: {n_tr} / {n_va} cases, p = {p:.3f}, tasks "
                     f"{', '.join(spec.tasks[t] for t in spec.task_ids(m.dataset_id))}"
                     f"{' (held out)' if k in held else ''}")
    return lines


def _member_data(loader) -> list | None:
    return getattr(loader, "members", None) if hasattr(loader, "probabilities") else \
        getattr(loader, "query_members", None)


def _cases(loader, k: int) -> int:
    members = _member_data(loader) if loader is not None else None
    return len(members[k].identifiers) if members is not None and members[k] is not None else 0


def _scheme(spec: CollectionSpec, loader) -> str:
    config = getattr(loader, "config", None)
    if hasattr(config, "member_sampling"):  # UniverSeg episodes
        return f"episodes, member_sampling {config.member_sampling}"
    return spec.sampling.get("scheme", "sqrt")


def _member_probabilities(spec: CollectionSpec, loader) -> np.ndarray | None:
    """Probability that a sample (or an episode) comes from each member."""
    if loader is None:
        return None
    if hasattr(loader, "probabilities"):
        return np.asarray(loader.probabilities, dtype=float)
    sampler = getattr(loader, "sampler", None)
    if sampler is None:  # an episode loader draws its sampler in the worker; the same one from its settings
        from nnharmony.data.episodes import EpisodeSampler

        sampler = EpisodeSampler(spec, loader.holdout_ids, loader.config.member_sampling, loader.available,
                                 loader.counts)
    p = np.zeros(len(spec.members))
    for task, q in zip(sampler.tasks, sampler.task_probabilities):
        p[task.member_index] += q
    return p


def _mixed(loader):
    """The mixed-dataset (or episode) loader inside nnU-Net's augmenter wrappers (None if there is none)."""
    for _ in range(3):
        if (hasattr(loader, "probabilities") and hasattr(loader, "members")) or hasattr(loader, "query_members"):
            return loader
        loader = getattr(loader, "data_loader", None) or getattr(loader, "generator", None)
        if loader is None:
            return None
    return None


@default_style  # nnU-Net's seaborn font_scale 2.5 made the titles and legends of many panels overlap
def plot_member_progress(spec: CollectionSpec, history: Sequence[dict], output_folder: str | Path) -> None:
    """``progress_members.png``: one panel per global task, one pseudo Dice curve per member annotating it."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in spec.tasks if any(t in epoch.get(m, {}) for epoch in history for m in epoch)]
    if not tasks:
        return
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for m in spec.members:
            y = [epoch.get(m.dataset_name, {}).get(task, float("nan")) for epoch in history]
            if not all(math.isnan(v) for v in y):
                ax.plot(range(len(y)), y, marker=".", label=m.dataset_name)
        ax.set_title(f"pseudo Dice: {task}")
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        if ax.get_lines():
            ax.legend(fontsize="small")
        else:  # every member's value was NaN (nothing predicted nor annotated in the validation batches)
            ax.text(0.5, 0.5, "no values yet", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(Path(output_folder) / MEMBER_PROGRESS_PLOT)
    plt.close(fig)
