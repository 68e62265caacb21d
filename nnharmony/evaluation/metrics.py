"""Segmentation metrics: nnU-Net's own Dice/IoU (re-exported, never re-implemented) and the normalized surface
Dice (NSD), which nnU-Net does not have.

* Dice, IoU, TP/FP/FN/TN, n_pred, n_ref per label or region: :func:`compute_metrics` /
  :func:`compute_metrics_on_folder` are nnU-Net's (``nnunetv2.evaluation.evaluate_predictions``), with its
  conventions: Dice and IoU are NaN when neither reference nor prediction contains the label, voxels of the
  reference's ignore label are left out.
* :func:`normalized_surface_dice`: the surface Dice at a tolerance in millimetres (Nikolov et al. 2021,
  "Clinically applicable segmentation of head and neck anatomy for radiotherapy"), computed on voxel
  boundaries with Euclidean distance transforms that respect anisotropic spacing.
* :func:`case_nsd`: NSD of every label/region of one prediction/reference file pair (worker of the folder
  evaluation; a module-level function so that a spawn pool can pickle it).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

# nnU-Net's metrics, re-exported so that nnharmony code has one place to import them from
from nnunetv2.evaluation.evaluate_predictions import (  # noqa: F401  (re-export)
    compute_metrics,
    compute_metrics_on_folder,
    load_summary_json,
    region_or_label_to_mask,
    save_summary_json,
)

__all__ = [
    "compute_metrics",
    "compute_metrics_on_folder",
    "save_summary_json",
    "load_summary_json",
    "region_or_label_to_mask",
    "normalized_surface_dice",
    "case_nsd",
]


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face neighbour outside it (outside the array counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def normalized_surface_dice(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float],
                            tolerance_mm: float) -> float:
    """Normalized surface Dice of two binary masks at ``tolerance_mm``.

    The surface of a mask is its set of boundary voxels (foreground voxels with a face neighbour in the
    background; voxels on the array's edge count as boundary). With ``d_ref(p)`` the Euclidean distance in mm
    from boundary voxel ``p`` to the nearest boundary voxel of the reference (and ``d_pred`` likewise)::

        NSD = (#{p in S_pred : d_ref(p) <= tol} + #{r in S_ref : d_pred(r) <= tol}) / (#S_pred + #S_ref)

    i.e. the fraction of both surfaces that lies within the tolerance of the other one; 1 is perfect.
    Distances use ``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``, so anisotropic voxels are
    measured in mm. A tolerance of 0 counts only boundary voxels that coincide.

    ``spacing``: voxel size in mm of each array axis, in the array's axis order (nnU-Net's reader-writers
    return it in that order; for an array from ``sitk.GetArrayFromImage`` it is ``image.GetSpacing()[::-1]``).
    Axes of length 1 are dropped first, so a 2D image stored as ``(1, y, x)`` (spacing ``(999, sy, sx)`` in
    nnU-Net) is measured in 2D.

    Returns NaN when both masks are empty (undefined, like nnU-Net's Dice; means leave such cases out) and 0.0
    when exactly one of them is empty.
    """
    pred = np.asarray(pred_mask).astype(bool, copy=False)
    ref = np.asarray(ref_mask).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"normalized_surface_dice: prediction shape {pred.shape} != reference shape {ref.shape}")
    spacing = [float(s) for s in spacing]
    if len(spacing) != pred.ndim:
        raise ValueError(f"normalized_surface_dice: {len(spacing)} spacing values for a {pred.ndim}D mask")
    if tolerance_mm is None or not math.isfinite(float(tolerance_mm)) or tolerance_mm < 0:
        raise ValueError(f"normalized_surface_dice: tolerance must be a finite number >= 0 mm, got {tolerance_mm!r}")
    any_pred, any_ref = bool(pred.any()), bool(ref.any())
    if not any_pred and not any_ref:
        return float("nan")
    if not any_pred or not any_ref:
        return 0.0
    # drop singleton axes (2D data in nnU-Net's 3D layout)
    keep = [i for i, n in enumerate(pred.shape) if n > 1]
    if len(keep) < pred.ndim:
        if not keep:  # a single voxel, present in both
            return 1.0
        pred = pred.reshape([pred.shape[i] for i in keep])
        ref = ref.reshape([ref.shape[i] for i in keep])
        spacing = [spacing[i] for i in keep]
    # crop to the union's bounding box plus one voxel (clipped at the array's edge): the surfaces, and so all
    # distances between them, lie inside, and the erosion sees the same neighbourhood as on the full array
    coords = np.nonzero(pred | ref)
    box = tuple(slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, n)) for c, n in zip(coords, pred.shape))
    pred, ref = pred[box], ref[box]
    s_pred, s_ref = _boundary(pred), _boundary(ref)
    d_to_ref = ndimage.distance_transform_edt(~s_ref, sampling=spacing)
    d_to_pred = ndimage.distance_transform_edt(~s_pred, sampling=spacing)
    # a tiny slack so that a distance of exactly `tol` mm is not lost to floating point
    tol = float(tolerance_mm) + 1e-6
    within = np.count_nonzero(d_to_ref[s_pred] <= tol) + np.count_nonzero(d_to_pred[s_ref] <= tol)
    return float(within / (np.count_nonzero(s_pred) + np.count_nonzero(s_ref)))


def case_nsd(reference_file: str, prediction_file: str, image_reader_writer: Any,
             labels_or_regions: Sequence[Any], tolerance_mm: float, ignore_label: int | None = None) -> dict:
    """``{label_or_region: NSD}`` of one case, read with an nnU-Net reader-writer (its spacing is used).

    Prediction voxels lying on the reference's ``ignore_label`` are disregarded (set to background)."""
    seg_ref, props = image_reader_writer.read_seg(reference_file)
    seg_pred, _ = image_reader_writer.read_seg(prediction_file)
    seg_ref, seg_pred = seg_ref[0], seg_pred[0]
    spacing = list(props["spacing"])[-seg_ref.ndim:]
    ignore = (seg_ref == ignore_label) if ignore_label is not None else None
    out = {}
    for r in labels_or_regions:
        ref = region_or_label_to_mask(seg_ref, r)
        pred = region_or_label_to_mask(seg_pred, r)
        if ignore is not None:
            pred &= ~ignore
        out[r] = normalized_surface_dice(pred, ref, spacing, tolerance_mm)
    return out
