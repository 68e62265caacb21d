"""In-context prediction from a folder of labelled examples (UniverSeg): ``nnharmony_predict --support DIR``.

A trained :class:`~nnharmony.trainers.universeg_trainer.UniverSegTrainer` segments a task it may never have seen
(a held-out member, a new dataset) from a **support folder** of labelled examples of that task::

    nnharmony_predict -i IMAGES -o OUT -d COLLECTION -tr UniverSegTrainer -c 2d -f 0 \\
        --support DIR --label 1 -S 8 -K 5 -device cuda

A UniverSeg **release checkpoint** (``universeg_v1_nf64_ss64_STA.pt``, a state dict of the 2D model with encoder
blocks 64,64,64,64) does the same with no collection and no training (:func:`predict_from_weights_file`; read
with ``weights_only=True`` and loaded strictly, :func:`universeg_from_weights_file`)::

    nnharmony_predict -i IMAGES -o OUT --support DIR --label 1 -S 16 -K 5 -device cpu \\
        -pretrained_weights universeg_v1_nf64_ss64_STA.pt

Support folder layouts (:func:`find_support_pairs`):

* nnU-Net raw layout: ``DIR/imagesTr/CASE_0000.nii.gz`` + ``DIR/labelsTr/CASE.nii.gz`` (``DIR`` can be an
  nnU-Net raw dataset; its ``dataset.json`` lets ``--label`` be a label name);
* flat: ``DIR/CASE_0000.nii.gz`` next to ``DIR/CASE.nii.gz`` (``DIR/dataset.json`` optional).

Any SimpleITK-readable ending works (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``, ``.png``, ...). Inputs
(``-i``) follow nnU-Net's naming ``CASE_0000.<ending>``; the network takes one channel (UniverSeg), so a
case with ``CASE_0001`` is refused.

How a case is predicted (:func:`predict_probabilities`), in the image's own voxel grid (there are no nnU-Net
plans for new data, so nothing is resampled):

* 2D model: the volume is cut into slices along the axis of largest spacing (ties: the first numpy axis,
  i.e. the slice axis of a NIfTI volume), which is the axis nnU-Net's 2d configuration slices in training;
  a 2D image is one slice. 3D model: the whole volume.
* Every slice (volume) is clipped to its [0.5, 99.5] percentiles, min-max scaled to [0, 1] and resized to
  the network size (:func:`nnharmony.data.episodes.normalize_image`, ``resize_image``), exactly as training
  episodes are made.
* The support pool holds every slice (2D) / volume (3D) of the support cases that contains the requested
  label, prepared the same way. ``K`` support sets of ``S`` entries are drawn from it (without replacement
  when the pool has at least ``S`` entries, otherwise with replacement), seeded by ``--seed`` and the case's
  position in the sorted input list; all slices of a case share the ``K`` sets.
* The sigmoid probabilities of the ``K`` sets (and of every fold's model) are averaged (support-set
  ensembling, UniverSeg sec. 3.3), resized back to the slice (volume) size, thresholded at 0.5 and written
  with the input's origin, spacing and direction; the foreground gets the requested label's value.
  ``--save_probabilities`` also writes ``CASE.npz`` with ``probabilities`` ``(2, *shape)`` float32
  (background, foreground), nnU-Net's layout for a one-label task.

Bad input is refused before anything is predicted, with the file names: a missing or empty support folder,
an image without label or label without image, a truncated or corrupt file, image/label size, spacing, origin
or direction mismatch (the geometry check of raw-data validation), more channels than the
model takes (``CASE_0001`` files or vector pixels), wrong dimensionality (a 2D support or input for the 3D
model, 4D images), a support set without foreground for the requested label, an ambiguous or unknown
``--label``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nnharmony.data.episodes import normalize_image, resize_image, resize_label, resize_probabilities

#: file endings recognised in support and input folders (longest first)
KNOWN_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".bmp", ".tiff", ".tif", ".jpg",
                 ".jpeg")


class SupportError(ValueError):
    """Bad support folder, label choice or input images for in-context prediction (message names the files)."""


# ---------------------------------------------------------------------------------------------- folders
def file_ending(name: str) -> str | None:
    low = name.lower()
    for e in KNOWN_ENDINGS:
        if low.endswith(e):
            return name[-len(e):]
    return None


def _channel(stem: str) -> tuple[str, int] | None:
    """``CASE_0003`` -> ``("CASE", 3)``; None when the stem has no nnU-Net channel suffix."""
    if len(stem) >= 6 and stem[-5] == "_" and stem[-4:].isdigit():
        return stem[:-5], int(stem[-4:])
    return None


@dataclass
class SupportPair:
    """One labelled support example: its channel files (``CASE_0000``, ...) and its label file."""

    case: str
    image_files: list[Path]
    label_file: Path


def _images_by_case(files: Sequence[Path], where: Path) -> dict[str, list[Path]]:
    cases: dict[str, dict[int, Path]] = {}
    for f in files:
        e = file_ending(f.name)
        ch = _channel(f.name[: -len(e)])
        if ch is None:
            raise SupportError(f"{f}: image name does not follow nnU-Net's CASE_0000{e} channel naming")
        cases.setdefault(ch[0], {})[ch[1]] = f
    out = {}
    for case, chans in sorted(cases.items()):
        idx = sorted(chans)
        if idx != list(range(len(idx))):
            raise SupportError(f"{where}: case {case} has channels {idx}; expected 0..{len(idx) - 1} without gaps")
        out[case] = [chans[i] for i in idx]
    return out


def _listing(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and file_ending(p.name) is not None)


def find_support_pairs(folder: str | Path) -> list[SupportPair]:
    """Labelled examples of ``folder`` in either layout (module docstring), sorted by case; clear errors for a
    missing or empty folder and for images without labels or labels without images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"support folder {folder} not found")
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    if images_dir.is_dir() or labels_dir.is_dir():
        for d in (images_dir, labels_dir):
            if not d.is_dir():
                raise SupportError(f"support folder {folder}: has {'labelsTr' if d is images_dir else 'imagesTr'}/ "
                                   f"but no {d.name}/ (the nnU-Net layout needs both)")
        images = _images_by_case(_listing(images_dir), images_dir)
        label_files = _listing(labels_dir)
        labels = {}
        for f in label_files:
            labels[f.name[: -len(file_ending(f.name))]] = f
    else:
        files = _listing(folder)
        img_files = [f for f in files if _channel(f.name[: -len(file_ending(f.name))]) is not None]
        lab_files = [f for f in files if f not in img_files]
        images = _images_by_case(img_files, folder)
        labels = {f.name[: -len(file_ending(f.name))]: f for f in lab_files}
    if not images and not labels:
        raise SupportError(f"support folder {folder} is empty: no labelled examples found (expected imagesTr/ + "
                           f"labelsTr/ as in an nnU-Net raw dataset, or CASE_0000.nii.gz next to CASE.nii.gz)")
    no_label = [c for c in images if c not in labels]
    no_image = [c for c in labels if c not in images]
    if no_label or no_image:
        msg = [f"support folder {folder}: images and labels do not pair up"]
        if no_label:
            msg.append(f"images without label: {', '.join(str(images[c][0].name) for c in no_label[:10])}")
        if no_image:
            msg.append(f"labels without image: {', '.join(labels[c].name for c in no_image[:10])}")
        raise SupportError("; ".join(msg))
    return [SupportPair(c, images[c], labels[c]) for c in sorted(images)]


# ---------------------------------------------------------------------------------------------- reading
def _read_info(path: Path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise SupportError(f"{path}: cannot be read by SimpleITK ({str(e).strip().splitlines()[-1][:200]})") from None
    return reader


def check_image_file(path: Path, dim: int, what: str) -> tuple[int, ...]:
    """Header checks of one image: complete file (not truncated, no CRC error), one component per pixel, 2D/3D
    (3D only for the 3D model). Returns its size (SimpleITK order)."""
    from nnharmony.dataset_conversion.image_integrity import image_file_problem

    broken = image_file_problem(path)
    if broken:
        raise SupportError(f"{what} {path}: {broken}")
    info = _read_info(path)
    ncomp = info.GetNumberOfComponents()
    if ncomp != 1:
        raise SupportError(f"{what} {path}: {ncomp} components per pixel (e.g. RGB); UniverSeg takes one channel: "
                           f"give a single-channel image (nnU-Net naming CASE_0000)")
    d = info.GetDimension()
    size = tuple(int(s) for s in info.GetSize())
    if d == 3 and size[2] == 1 and dim == 2:
        d = 2
    if d not in (2, 3):
        raise SupportError(f"{what} {path}: {d}D image; expected 2D images or 3D volumes")
    if dim == 3 and d != 3:
        raise SupportError(f"{what} {path}: {d}D image, but the 3D model (3d_fullres) needs 3D volumes; use the 2d "
                           f"model for 2D images")
    return size


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    """``(array in numpy axis order, spacing in numpy axis order, sitk.Image)``; a ``(1, Y, X)`` volume is
    returned as the 2D ``(Y, X)`` image."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    spacing = np.asarray(img.GetSpacing()[::-1], dtype=np.float64)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr, spacing = arr[0], spacing[1:]
    return arr, spacing, img


@dataclass
class SupportExample:
    """A support case in memory: image (float32), label map (int), spacing, numpy axis order."""

    case: str
    image: np.ndarray
    label: np.ndarray
    spacing: np.ndarray
    image_file: Path
    label_file: Path


def read_support_set(pairs: Sequence[SupportPair], dim: int, in_channels: int = 1) -> list[SupportExample]:
    """Read and check every support pair (channels, dimensionality, complete files, image/label geometry: size,
    spacing, origin and direction with the tolerances of raw-data validation,
    :func:`nnharmony.dataset_conversion.validation.geometry_mismatch`)."""
    from nnharmony.dataset_conversion.validation import Geometry, geometry_mismatch

    for p in pairs:
        if len(p.image_files) > in_channels:
            raise SupportError(
                f"support case {p.case} has {len(p.image_files)} channels ({', '.join(f.name for f in p.image_files)})"
                f" but the model takes {in_channels}; keep only {p.case}_0000 (UniverSeg is single-channel)")
        check_image_file(p.image_files[0], dim, "support image")
        check_image_file(p.label_file, dim, "support label")
        why = geometry_mismatch(Geometry.of_file(p.image_files[0]), Geometry.of_file(p.label_file))
        if why:
            raise SupportError(f"support label {p.label_file}: geometry mismatch with its image "
                               f"{p.image_files[0]}: {why}")
    out = []
    for p in pairs:
        img, sp, _ = read_image(p.image_files[0])
        lab, lsp, _ = read_image(p.label_file)
        if not np.allclose(sp, lsp, rtol=1e-3, atol=1e-4):
            raise SupportError(f"support image {p.image_files[0]} (spacing {tuple(sp[::-1])}) and its label "
                               f"{p.label_file} (spacing {tuple(lsp[::-1])}) do not match")
        if np.issubdtype(lab.dtype, np.floating):
            if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
                raise SupportError(f"support label {p.label_file} has non-integer values; labels must be integer maps")
        out.append(SupportExample(p.case, img.astype(np.float32), lab.astype(np.int64), sp, p.image_files[0],
                                  p.label_file))
    return out


def _dataset_json_labels(folder: Path) -> dict | None:
    for f in (folder / "dataset.json", folder.parent / "dataset.json"):
        if f.is_file():
            try:
                return dict(json.loads(f.read_text()).get("labels", {}))
            except (json.JSONDecodeError, AttributeError):
                return None
    return None


def resolve_label(label: str | int | None, examples: Sequence[SupportExample], folder: Path
                  ) -> tuple[tuple[int, ...], int, str]:
    """``(label values, output value, display name)`` of ``--label``: a value, a name from the support folder's
    ``dataset.json`` (a region list gives several values and output value 1), or None when the support labels
    contain exactly one foreground value. Raises when there is no foreground for it in any support label."""
    present = sorted({int(v) for e in examples for v in np.unique(e.label) if v > 0})
    if label is None:
        if len(present) != 1:
            raise SupportError(
                f"support labels in {folder} contain " + (f"the foreground values {present}" if present else
                                                          "no foreground at all")
                + ("; choose the one to segment with --label VALUE" if present else ""))
        values, out, name = (present[0],), present[0], str(present[0])
    elif str(label).strip().lstrip("-").isdigit():
        v = int(label)
        if v <= 0:
            raise SupportError(f"--label {label}: label values to segment are positive integers (0 is background)")
        values, out, name = (v,), v, str(v)
    else:
        labels = _dataset_json_labels(folder)
        if not labels or str(label) not in labels:
            raise SupportError(f"--label {label!r}: not a number, and not a label name of the dataset.json in {folder}"
                               + (f" (names: {', '.join(k for k in labels if k != 'background')})" if labels else
                                  " (there is no dataset.json there)"))
        v = labels[str(label)]
        values = tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)
        out, name = (values[0] if len(values) == 1 else 1), str(label)
    if not any(np.isin(e.label, values).any() for e in examples):
        raise SupportError(f"support set {folder} has no foreground for label {name} (values {list(values)}) in any "
                           f"of its {len(examples)} label files; foreground values present: {present}")
    return values, out, name


# ---------------------------------------------------------------------------------------------- geometry helpers
def slicing_axis(spacing: Sequence[float]) -> int:
    """Axis (numpy order) of the largest spacing; ties go to the first axis."""
    sp = np.asarray(spacing, dtype=np.float64)
    return int(np.flatnonzero(np.isclose(sp, sp.max(), rtol=1e-3))[0])


def _slices(volume: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(volume, axis, 0)


def prepare_images(arr: np.ndarray, dim: int, size: Sequence[int]) -> torch.Tensor:
    """``(N, *sp)`` raw images -> ``(N, 1, *size)`` normalized to [0, 1] and resized (as training episodes)."""
    x = resize_image(torch.as_tensor(np.ascontiguousarray(arr), dtype=torch.float32)[:, None], size)
    return normalize_image(x, dim)


@dataclass
class SupportPool:
    """Prepared support entries: ``images``, ``labels`` ``(N, 1, *size)`` and where each came from."""

    images: torch.Tensor
    labels: torch.Tensor
    sources: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def draw(self, support_size: int, rng: np.random.Generator) -> np.ndarray:
        n = len(self)
        return rng.choice(n, size=support_size, replace=n < support_size)


def build_support_pool(examples: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], values: Sequence[int],
                       dim: int, size: Sequence[int], axis: int | None = None) -> SupportPool:
    """Pool of ``(name, image, label map, spacing)`` examples: every slice (2D; slicing axis of largest spacing
    unless ``axis``) or volume (3D) that contains ``values``."""
    imgs, labs, sources = [], [], []
    for name, image, label, spacing in examples:
        fg = np.isin(label, values)
        if dim == 3 or image.ndim == 2:
            if fg.any():
                imgs.append(prepare_images(image[None], dim, size))
                labs.append(resize_label(torch.from_numpy(fg[None, None].astype(np.float32)), size))
                sources.append(name)
            continue
        ax = slicing_axis(spacing) if axis is None else axis
        s_img, s_fg = _slices(image, ax), _slices(fg, ax)
        keep = np.flatnonzero(s_fg.reshape(s_fg.shape[0], -1).any(1))
        if len(keep) == 0:
            continue
        imgs.append(prepare_images(s_img[keep], dim, size))
        labs.append(resize_label(torch.from_numpy(s_fg[keep][:, None].astype(np.float32)), size))
        sources += [f"{name}@{ax}:{k}" for k in keep]
    if not imgs:
        raise SupportError(f"no support slice/volume contains the label values {list(values)}")
    return SupportPool(torch.cat(imgs), torch.cat(labs), sources)


# ---------------------------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict_probabilities(networks: Sequence[torch.nn.Module], image: np.ndarray, spacing: Sequence[float],
                          pool: SupportPool, dim: int, size: Sequence[int], support_size: int, ensemble: int,
                          rng: np.random.Generator, device: torch.device, axis: int | None = None,
                          max_images_per_forward: int = 256) -> np.ndarray:
    """Foreground probability map of ``image`` (numpy order, 2D or 3D) with the shape of ``image``.

    ``ensemble`` (K) support sets of ``support_size`` (S) entries are drawn from ``pool`` with ``rng``; the
    sigmoids of every set and every network are averaged. 2D networks predict slice by slice along ``axis``
    (default: the axis of largest spacing); 3D networks the whole volume. Forwards are chunked so that one
    holds at most ``max_images_per_forward`` images (queries plus supports).
    """
    if support_size < 1 or ensemble < 1:
        raise ValueError(f"support size S and ensemble size K must be >= 1, got S={support_size}, K={ensemble}")
    if dim == 2 and image.ndim == 3:
        ax = slicing_axis(spacing) if axis is None else axis
        queries = _slices(image, ax)
    elif dim == 2:
        ax, queries = None, image[None]
    else:
        if image.ndim != 3:
            raise SupportError(f"the 3D model needs a 3D volume, got an image of shape {image.shape}")
        ax, queries = None, image[None]
    q = prepare_images(queries, dim, size)  # (Z, 1, *size)
    sets = [pool.draw(support_size, rng) for _ in range(ensemble)]
    chunk = max(1, max_images_per_forward // (support_size + 1))
    prob = torch.zeros(q.shape, dtype=torch.float32)
    use_amp = device.type == "cuda"
    for net in networks:
        net.eval()
        for idx in sets:
            sx = pool.images[idx].to(device)[None]  # (1, S, 1, *size)
            sy = pool.labels[idx].to(device)[None]
            for start in range(0, q.shape[0], chunk):
                xb = q[start: start + chunk].to(device)
                b = xb.shape[0]
                with torch.autocast(device.type, enabled=use_amp):
                    logits = net(xb, sx.expand(b, *sx.shape[1:]), sy.expand(b, *sy.shape[1:]))
                prob[start: start + b] += torch.sigmoid(logits.float()).cpu()
    prob /= len(networks) * len(sets)
    out = resize_probabilities(prob, queries.shape[1:])[:, 0].numpy()  # (Z, *slice)
    if dim == 2 and image.ndim == 3:
        return np.moveaxis(out, 0, ax)
    return out[0]


# ---------------------------------------------------------------------------------------------- models
#: the released v1 model (``universeg_v1_nf64_ss64_STA.pt``): 2D, four blocks of 64, trained on 128x128 images
RELEASE_CONFIG: dict[str, Any] = {"dim": 2, "image_size": [128, 128], "in_channels": 1,
                                  "encoder_blocks": [64, 64, 64, 64], "decoder_blocks": None,
                                  "cross_nonlinearity": None}


def network_from_config(cfg: dict) -> torch.nn.Module:
    """The UniverSeg network a recorded configuration (checkpoint ``nnharmony.universeg``) describes."""
    from nnharmony.networks.universeg import UniverSeg

    def blocks(v):
        return None if v is None else [tuple(b) if isinstance(b, (list, tuple)) else int(b) for b in v]

    return UniverSeg(encoder_blocks=blocks(cfg["encoder_blocks"]), decoder_blocks=blocks(cfg.get("decoder_blocks")),
                     dim=int(cfg["dim"]), in_channels=int(cfg.get("in_channels", 1)),
                     cross_nonlinearity=cfg.get("cross_nonlinearity"))


def _load_strict(net: torch.nn.Module, content: Any, path: Path, what: str) -> torch.nn.Module:
    """Weights of ``content`` (read from ``path``) into ``net``; every missing, unexpected or mis-shaped key named."""
    from nnharmony.utils.safe_load import state_dict_of, weight_mismatches

    state = state_dict_of(content, path)
    problems = weight_mismatches(net.state_dict(), state)
    if problems:
        raise ValueError(f"{path}: does not fit {what} ({'; '.join(problems)})")
    net.load_state_dict(state, strict=True)
    return net


def universeg_from_weights_file(path: str | Path, device: torch.device | str = "cpu"
                                ) -> tuple[torch.nn.Module, dict]:
    """``(network in eval mode, configuration)`` from one weights file, with no collection or training:

    * a UniverSeg release state dict (``universeg_v1_nf64_ss64_STA.pt``): :data:`RELEASE_CONFIG`;
    * a ``UniverSegTrainer`` checkpoint: the configuration it records (``nnharmony.universeg``).

    Read with ``weights_only=True`` (:mod:`nnharmony.utils.safe_load`), so no code from the file runs; loaded
    strictly, so a file of another architecture is refused with its mismatching keys named.
    """
    from nnharmony.records.model_folder import checkpoint_record
    from nnharmony.utils.safe_load import read_weights_file

    path = Path(path)
    content = read_weights_file(path, "UniverSeg weights file")
    recorded = (checkpoint_record(content) or {}).get("universeg")
    cfg = dict(recorded) if isinstance(recorded, dict) else dict(RELEASE_CONFIG)
    what = "this checkpoint's recorded UniverSeg" if recorded else \
        "the UniverSeg release architecture (2D, encoder blocks 64,64,64,64)"
    net = _load_strict(network_from_config(cfg), content, path, what)
    return net.to(device).eval(), cfg


def load_universeg_models(model_dir: Path, folds: Sequence[str] | None, checkpoint_name: str, device: torch.device,
                          trainer_name: str = "UniverSegTrainer") -> tuple[list[torch.nn.Module], dict]:
    """The networks of ``model_dir/fold_F/checkpoint_name`` (all trained folds when ``folds`` is None) and their
    shared UniverSeg configuration (``checkpoint['nnharmony']['universeg']``)."""
    from nnharmony.records.model_folder import checkpoint_record, load_checkpoint_file

    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no trained model; run nnharmony_train ... -tr {trainer_name} first")
    networks, config = [], None
    for d in universeg_fold_dirs(model_dir, folds, checkpoint_name):
        ckpt = load_checkpoint_file(d / checkpoint_name, expected_trainer=trainer_name)
        cfg = checkpoint_record(ckpt).get("universeg")
        if cfg is None:
            raise ValueError(f"{d / checkpoint_name}: no UniverSeg configuration recorded in the checkpoint")
        key = {k: cfg[k] for k in ("dim", "image_size", "in_channels")}
        if config is not None and {k: config[k] for k in key} != key:
            raise ValueError(f"{d / checkpoint_name}: network configuration {key} differs from the other folds'")
        config = cfg
        net = _load_strict(network_from_config(cfg), ckpt, d / checkpoint_name, "its recorded UniverSeg")
        networks.append(net.to(device).eval())
    return networks, config


def universeg_fold_dirs(model_dir: Path, folds: Sequence[str] | None, checkpoint_name: str) -> list[Path]:
    """``model_dir/fold_F`` of ``folds``, or of every fold with ``checkpoint_name`` when ``folds`` is None."""
    if folds is not None:
        return [model_dir / f"fold_{f}" for f in folds]
    fold_dirs = sorted(p for p in model_dir.glob("fold_*") if (p / checkpoint_name).is_file())
    if not fold_dirs:
        raise FileNotFoundError(f"{model_dir}: no fold_*/{checkpoint_name}")
    return fold_dirs


def list_input_cases(folder: Path) -> dict[str, list[Path]]:
    """Input cases (nnU-Net naming) of ``folder``: case -> channel files; every file checked complete
    (:func:`nnharmony.dataset_conversion.image_integrity.image_file_problem`)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: input folder not found")
    from nnharmony.dataset_conversion.image_integrity import image_file_problem

    files = _listing(folder)
    if not files:
        raise SupportError(f"{folder}: no images found (expected nnU-Net naming CASE_0000.nii.gz)")
    cases = _images_by_case(files, folder)
    for f in files:  # truncated/corrupt files would be read with zeros for the missing part
        why = image_file_problem(f)
        if why:
            raise SupportError(f"input image {f}: {why}")
    return cases


def _check_support_request(args, trainer_name: str) -> tuple[int, int]:
    """``(K, S)`` of the command line; a support folder is required."""
    if args.support is None:
        raise SupportError(f"{trainer_name} predicts from labelled examples: give --support DIR (imagesTr/ + "
                           f"labelsTr/, or CASE_0000.nii.gz next to CASE.nii.gz)")
    K, S = int(args.ensemble), int(args.support_size)
    if K < 1 or S < 1:
        raise SupportError(f"-K/--ensemble and -S/--support-size must be >= 1, got K={K}, S={S}")
    return K, S


def write_mask(prob: np.ndarray, value: int, ref, target: Path) -> None:
    """``prob > 0.5`` painted with ``value`` on the grid of ``ref`` (the input image), written atomically."""
    import SimpleITK as sitk

    from nnharmony.utils.io import atomic_write

    dtype = np.uint8 if value < 256 else np.uint16
    seg = (prob > 0.5).astype(dtype) * dtype(value)
    if ref.GetDimension() == 3 and seg.ndim == 2:
        seg = seg[None]
    out = sitk.GetImageFromArray(seg)
    out.CopyInformation(ref)

    def write(tmp: str) -> None:  # SimpleITK picks its writer by the file ending: write beside tmp, then move
        with_ending = tmp + target.name
        try:
            sitk.WriteImage(out, with_ending, True)
            os.replace(with_ending, tmp)
        finally:
            if os.path.exists(with_ending):
                os.remove(with_ending)

    atomic_write(target, write)


def predict_from_support(args, trainer_name: str = "UniverSegTrainer", run_record: dict | None = None) -> list[Path]:
    """``nnharmony_predict ... -tr UniverSegTrainer --support DIR``: see the module docstring. Returns the files
    written. ``run_record`` (the command's arguments) goes into ``predict_args.json`` with the model files."""
    from nnharmony.records.model_folder import model_folder

    _check_support_request(args, trainer_name)
    model_dir = model_folder(args.collection, args.tr, args.p, args.cfg)
    if not model_dir.is_dir():
        parent = model_dir.parent
        have = sorted(p.name for p in parent.glob(f"{args.tr}__*")) if parent.is_dir() else []
        raise FileNotFoundError(f"{model_dir}: no trained model" + (f" (trained: {', '.join(have)})" if have else
                                                                      f"; run nnharmony_train {args.collection} "
                                                                      f"{args.cfg} FOLD -tr {args.tr} first"))
    # folders listed and input files checked complete before a model is loaded
    pairs, cases = find_support_pairs(Path(args.support)), list_input_cases(Path(args.i))
    networks, cfg = load_universeg_models(model_dir, args.f, args.chk, torch.device(args.device), trainer_name)
    record = {"trainer": trainer_name, "model_folder": str(model_dir), "checkpoint": args.chk, "folds": args.f,
              "configuration": args.cfg, "collection": args.collection,
              "model_files": [str((d / args.chk).resolve()) for d in universeg_fold_dirs(model_dir, args.f, args.chk)]}
    return predict_folder_in_context(args, networks, cfg, pairs, cases, record, run_record)


def predict_from_weights_file(args, run_record: dict | None = None) -> list[Path]:
    """``nnharmony_predict -i IN -o OUT --support DIR --label L -pretrained_weights FILE``: segment a folder with a
    UniverSeg release state dict (or a UniverSegTrainer checkpoint), no collection and no training
    (:func:`universeg_from_weights_file`). Returns the files written."""
    _check_support_request(args, "UniverSeg (-pretrained_weights)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("-device cuda was requested but no CUDA device is available; use -device cpu")
    pairs, cases = find_support_pairs(Path(args.support)), list_input_cases(Path(args.i))
    net, cfg = universeg_from_weights_file(args.pretrained_weights, torch.device(args.device))
    weights = str(Path(args.pretrained_weights).resolve())
    record = {"weights_file": weights, "model_files": [weights]}
    return predict_folder_in_context(args, [net], cfg, pairs, cases, record, run_record)


def predict_folder_in_context(args, networks: Sequence[torch.nn.Module], cfg: dict, pairs: Sequence[SupportPair],
                              cases: dict[str, list[Path]], record: dict, run_record: dict | None = None) -> list[Path]:
    """Segment every input case (``args.i``) from the support ``pairs`` with ``networks`` (configuration
    ``cfg``), write ``args.o``; every check runs before the first prediction. ``record`` says where the model
    came from in ``universeg_prediction.json``; ``predict_args.json`` holds ``run_record`` (every argument of
    the command), the model files and the support set, as the other prediction route's does."""
    from nnharmony.utils.io import save_json_atomic

    K, S = int(args.ensemble), int(args.support_size)
    device = torch.device(args.device)
    dim, size, in_ch = int(cfg["dim"]), tuple(int(s) for s in cfg["image_size"]), int(cfg.get("in_channels", 1))
    support_dir = Path(args.support)
    examples = read_support_set(pairs, dim, in_ch)
    values, out_value, label_name = resolve_label(args.label, examples, support_dir)
    for case, files in cases.items():
        if len(files) > in_ch:
            raise SupportError(f"input case {case} has {len(files)} channels ({', '.join(f.name for f in files)}) but "
                               f"the model takes {in_ch}; give only {case}_0000")
        check_image_file(files[0], dim, "input image")
    pool = build_support_pool([(e.case, e.image, e.label, e.spacing) for e in examples], values, dim, size)

    out_dir = Path(args.o)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for n, (case, files) in enumerate(sorted(cases.items())):
        image, spacing, ref = read_image(files[0])
        rng = np.random.default_rng([int(args.seed), n])
        prob = predict_probabilities(networks, image.astype(np.float32), spacing, pool, dim, size, S, K, rng, device)
        target = out_dir / f"{case}{file_ending(files[0].name)}"
        write_mask(prob, out_value, ref, target)
        written.append(target)
        if getattr(args, "save_probabilities", False):
            np.savez_compressed(out_dir / f"{case}.npz", probabilities=np.stack([1 - prob, prob]).astype(np.float32))
    support = {"support_folder": str(support_dir), "support_cases": [e.case for e in examples]}
    save_json_atomic({
        **record, **support,
        "support_pool_size": len(pool), "label": label_name, "label_values": list(values), "output_value": out_value,
        "support_size": S, "ensemble": K, "seed": int(args.seed), "network": cfg,
    }, out_dir / "universeg_prediction.json")
    run_record = run_record if run_record is not None else {"arguments": {k: v for k, v in vars(args).items()}}
    save_json_atomic({**run_record, "collection": record.get("collection"),
                      "trainer": record.get("trainer", "UniverSeg release weights (-pretrained_weights)"),
                      "configuration": record.get("configuration"), "model_files": record["model_files"], **support,
                      "label": label_name, "label_values": list(values)}, out_dir / "predict_args.json")
    return written


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks (nan when both are empty)."""
    p, r = pred.astype(bool), ref.astype(bool)
    denom = p.sum() + r.sum()
    return float("nan") if denom == 0 else float(2 * (p & r).sum() / denom)


def predict_cases_in_memory(networks, queries: Sequence[tuple[str, np.ndarray, np.ndarray]], pool: SupportPool,
                            dim: int, size: Sequence[int], support_size: int, ensemble: int, seed: int,
                            device: torch.device, axis: int | None = None) -> dict[str, np.ndarray]:
    """Probability maps of in-memory ``(name, image, spacing)`` queries (trainer validation, benchmarks)."""
    out = {}
    for n, (name, image, spacing) in enumerate(queries):
        rng = np.random.default_rng([int(seed), n])
        out[name] = predict_probabilities(networks, image, spacing, pool, dim, size, support_size, ensemble, rng,
                                          device, axis=axis)
    return out


__all__ = [
    "SupportError", "SupportPair", "SupportExample", "SupportPool", "find_support_pairs", "read_support_set",
    "resolve_label", "check_image_file", "read_image", "slicing_axis", "build_support_pool", "prepare_images",
    "predict_probabilities", "predict_cases_in_memory", "load_universeg_models", "list_input_cases",
    "predict_from_support", "predict_from_weights_file", "predict_folder_in_context", "universeg_from_weights_file",
    "network_from_config", "RELEASE_CONFIG", "dice",
]
