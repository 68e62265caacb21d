"""What Hermes's learned priors encode: cosine similarity of task priors and of modality priors (the paper's
figures 4-5), per fusion level and averaged over levels.

* task priors: row ``t`` of every level's ``task_prior`` (the null token, last row, is left out), one row per
  global task of the collection, named from the collection spec;
* modality priors: the mean of the modality's ``tokens_per_modality`` tokens (the unknown-modality entry,
  last, is left out), one per modality of the vocabulary.

Levels are the fusion levels of the network in execution order (encoder stages at 1/4, 1/8, 1/16, then
decoder stages at 1/8, 1/4); each has its own independent pool and width, so similarities are computed per
level and the "mean" matrix is the element-wise mean of the per-level matrices.

Outputs (all written atomically) in the output folder::

    task_prior_similarity.csv / .png             mean over levels (matrix CSV, labelled heatmap)
    task_prior_similarity_levels.csv / .png      every level (long CSV: level,row,column,cosine; panel grid)
    modality_prior_similarity.csv / .png         likewise for modalities
    modality_prior_similarity_levels.csv / .png
    prior_analysis.json                          levels, names, files
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nnharmony.utils.io import atomic_write, save_json_atomic

_POOL_KEY = re.compile(r"^(?:module\.)?(?:_orig_mod\.)?(encoder|decoder)_fusion\.(\d+)\.pool\.(task|modality)_prior$")


@dataclass
class PriorLevel:
    """One fusion level's pool: ``task_prior`` (T+1, C) incl. null row, ``modality_prior`` (M+1, L, C)."""
    part: str  # "encoder" | "decoder"
    stage: int
    task_prior: np.ndarray
    modality_prior: np.ndarray
    label: str = ""

    @property
    def key(self) -> str:
        return f"{self.part}{self.stage}"

    @property
    def channels(self) -> int:
        return int(self.task_prior.shape[1])


def extract_priors(state_dict: Mapping[str, object]) -> list[PriorLevel]:
    """Prior pools of a Hermes state dict, in execution order (encoder stages, then decoder stages)."""
    found: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for k, v in state_dict.items():
        m = _POOL_KEY.match(k)
        if m:
            arr = v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v, dtype=np.float32)
            found.setdefault((m.group(1), int(m.group(2))), {})[m.group(3)] = arr
    if not found:
        raise ValueError("no Hermes prior pools in this state dict (expected keys like "
                         "'encoder_fusion.2.pool.task_prior'): is it a HermesTrainer checkpoint?")
    levels = []
    for (part, stage) in sorted(found, key=lambda ps: (ps[0] != "encoder", ps[1])):
        d = found[(part, stage)]
        if set(d) != {"task", "modality"}:
            raise ValueError(f"{part} fusion {stage}: incomplete prior pool ({sorted(d)})")
        levels.append(PriorLevel(part, stage, d["task"], d["modality"]))
    return levels


def level_labels(levels: Sequence[PriorLevel], strides: Sequence | None) -> None:
    """Label each level ``"encoder stage 2 (1/4, C=128)"``; the resolution comes from the joint plan's
    per-stage ``strides`` (largest axis), omitted when unknown."""
    cum = []
    if strides:
        c = [1, 1, 1]
        for s in strides:
            s = [s] * 3 if isinstance(s, (int, float)) else list(s)
            c = [a * int(b) for a, b in zip(c, s + [1] * (3 - len(s)))]
            cum.append(max(c))
    n = len(cum)
    for lv in levels:
        enc_stage = lv.stage if lv.part == "encoder" else (n - 2 - lv.stage if n else None)
        res = f"1/{cum[enc_stage]}, " if n and enc_stage is not None and 0 <= enc_stage < n else ""
        lv.label = f"{lv.part} stage {lv.stage} ({res}C={lv.channels})"


def cosine_similarity_matrix(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (N, C) -> (N, N) cosine similarities (a zero row gives 0)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def prior_similarities(levels: Sequence[PriorLevel], num_tasks: int, num_modalities: int) -> dict:
    """``{"task": {"levels": {key: (T,T)}, "mean": (T,T)}, "modality": {...}}``; null/unknown rows excluded."""
    out = {"task": {"levels": {}}, "modality": {"levels": {}}}
    for lv in levels:
        if lv.task_prior.shape[0] != num_tasks + 1 or lv.modality_prior.shape[0] != num_modalities + 1:
            raise ValueError(f"{lv.key}: pool has {lv.task_prior.shape[0] - 1} tasks / {lv.modality_prior.shape[0] - 1} "
                             f"modalities, the collection {num_tasks} / {num_modalities}")
        out["task"]["levels"][lv.key] = cosine_similarity_matrix(lv.task_prior[:num_tasks])
        out["modality"]["levels"][lv.key] = cosine_similarity_matrix(lv.modality_prior[:num_modalities].mean(axis=1))
    for kind in ("task", "modality"):
        out[kind]["mean"] = np.mean(np.stack(list(out[kind]["levels"].values())), axis=0)
    return out


# ----------------------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------------------
def _write_matrix_csv(path: Path, names: Sequence[str], mat: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([""] + list(names))
            for n, row in zip(names, mat):
                w.writerow([n] + [f"{v:.6f}" for v in row])

    atomic_write(path, write)


def _write_levels_csv(path: Path, names: Sequence[str], mats: Mapping[str, np.ndarray], labels: Mapping[str, str]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["level", "level_label", "row", "column", "cosine"])
            for key, mat in mats.items():
                for i, a in enumerate(names):
                    for j, b in enumerate(names):
                        w.writerow([key, labels.get(key, key), a, b, f"{mat[i, j]:.6f}"])

    atomic_write(path, write)


def _heatmap(ax, names: Sequence[str], mat: np.ndarray, title: str, annotate: bool, fontsize: float):
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(names)))
    ax.set_yticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=fontsize)
    ax.set_yticklabels(names, fontsize=fontsize)
    ax.set_title(title, fontsize=fontsize + 2)
    if annotate:
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=fontsize - 1,
                        color="white" if abs(mat[i, j]) > 0.6 else "black")
    return im


def _save_png(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_similarity(path: Path, names: Sequence[str], mat: np.ndarray, title: str, axis_label: str) -> None:
    """One labelled heatmap (Agg, no global matplotlib state touched)."""
    from matplotlib.figure import Figure

    n = len(names)
    size = min(max(4.5, 0.35 * n + 3), 24)
    fs = 9 if n <= 20 else max(4, 9 - n // 15)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot(1, 1, 1)
    im = _heatmap(ax, names, mat, title, n <= 15, fs)
    ax.set_xlabel(axis_label)
    ax.set_ylabel(axis_label)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    _save_png(fig, path)


def plot_levels(path: Path, names: Sequence[str], mats: Mapping[str, np.ndarray], labels: Mapping[str, str],
                title: str, axis_label: str) -> None:
    """A grid of heatmaps, one per fusion level."""
    from matplotlib.figure import Figure

    k = len(mats)
    cols = min(3, k)
    rows = math.ceil(k / cols)
    n = len(names)
    panel = min(max(3.5, 0.25 * n + 2.5), 12)
    fs = 8 if n <= 20 else max(4, 8 - n // 15)
    fig = Figure(figsize=(panel * cols + 1, panel * rows + 0.8))
    im = None
    for i, (key, mat) in enumerate(mats.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        im = _heatmap(ax, names, mat, labels.get(key, key), n <= 8, fs)
        ax.set_xlabel(axis_label, fontsize=fs)
        if i % cols == 0:
            ax.set_ylabel(axis_label, fontsize=fs)
    fig.subplots_adjust(wspace=0.3, hspace=0.35)
    fig.suptitle(title)
    fig.colorbar(im, ax=fig.axes, fraction=0.02, pad=0.02, label="cosine similarity")
    _save_png(fig, path)


def analyze_priors(state_dict: Mapping[str, object], task_names: Sequence[str], modality_names: Sequence[str],
                   output_folder: str | Path, strides: Sequence | None = None, title: str = "") -> dict:
    """Compute and write everything; returns the ``prior_analysis.json`` content (matrices included)."""
    out = Path(output_folder)
    levels = extract_priors(state_dict)
    level_labels(levels, strides)
    sims = prior_similarities(levels, len(task_names), len(modality_names))
    labels = {lv.key: lv.label for lv in levels}
    files = {}
    for kind, names, axis in (("task", list(task_names), "task prior"),
                              ("modality", list(modality_names), "modality prior (mean of tokens)")):
        base = f"{kind}_prior_similarity"
        head = f"{title}: " if title else ""
        _write_matrix_csv(out / f"{base}.csv", names, sims[kind]["mean"])
        _write_levels_csv(out / f"{base}_levels.csv", names, sims[kind]["levels"], labels)
        plot_similarity(out / f"{base}.png", names, sims[kind]["mean"],
                        f"{head}{kind} priors, cosine similarity (mean of {len(levels)} levels)", axis)
        plot_levels(out / f"{base}_levels.png", names, sims[kind]["levels"], labels,
                    f"{head}{kind} priors, cosine similarity per fusion level", axis)
        files[kind] = [f"{base}.csv", f"{base}.png", f"{base}_levels.csv", f"{base}_levels.png"]
    summary = {
        "levels": [{"key": lv.key, "label": lv.label, "channels": lv.channels} for lv in levels],
        "tasks": list(task_names), "modalities": list(modality_names), "files": files,
        "task_similarity_mean": sims["task"]["mean"].round(6).tolist(),
        "modality_similarity_mean": sims["modality"]["mean"].round(6).tolist(),
    }
    save_json_atomic(summary, out / "prior_analysis.json")
    return summary


def analyze_model(model_folder: str | Path, output_folder: str | Path, fold: int | str = 0,
                  checkpoint_name: str = "checkpoint_final.pth", expected_trainer: str | None = None) -> dict:
    """Prior analysis of a trained Hermes model folder (``TRAINER__PLANS__CONFIG``)."""
    from nnharmony.data.collection import CollectionSpec
    from nnharmony.paths import COLLECTION_SPEC_FILE
    from nnharmony.records.model_folder import load_checkpoint_file
    from nnharmony.utils.io import load_json

    folder = Path(model_folder)
    spec_file = folder / COLLECTION_SPEC_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(f"{folder}: no {COLLECTION_SPEC_FILE}; is this a trained nnharmony model folder?")
    spec = CollectionSpec.load(spec_file)
    ckpt = load_checkpoint_file(folder / f"fold_{fold}" / checkpoint_name, expected_trainer=expected_trainer,
                                expected_collection=spec)
    strides = None
    plans_file = folder / "plans.json"
    if plans_file.is_file():
        cfg = ckpt.get("init_args", {}).get("configuration")
        arch = load_json(plans_file).get("configurations", {}).get(cfg, {}).get("architecture", {})
        strides = arch.get("arch_kwargs", {}).get("strides")
    return analyze_priors(ckpt["network_weights"], spec.tasks, spec.modalities, output_folder, strides,
                          title=f"{spec.name} {ckpt.get('trainer_name', '')} fold {fold}")
