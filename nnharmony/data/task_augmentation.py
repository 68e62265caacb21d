"""Task ("episode-level") augmentation and synthetic tasks for UniverSeg-style in-context training.

UniverSeg (ICCV 2023) adds, besides independent per-image ("in-task") augmentation, transforms
that are applied IDENTICALLY to the query and to every support entry of one episode, so that
they define a new task rather than perturb an image. An episode here is one batch element::

    images (B, M, C, *sp)     M = S + 1 members (query + supports, in any order), C channels
    labels (B, M, L, *sp)     L label channels (1 for UniverSeg), values in {0, 1}
    *sp = (H, W) or (D, H, W)

Every ``random_*`` function draws ONE decision per episode (per batch element ``b``) and
applies it to all ``M`` members of that episode; episodes of a batch get independent draws.
All randomness comes from the optional ``torch.Generator`` (the global RNG when None), in a
fixed order, so results are deterministic given a seeded generator. Inputs are not modified.

Functions:

- :func:`flip` / :func:`random_flip`: flips along spatial axes (image and label together).
- :func:`invert_intensity` / :func:`random_intensity_inversion`: ``1 - x`` (images in [0, 1]).
- :func:`label_edge_map` / :func:`random_label_edge_map`: thin boundary of the label by
  morphological gradients computed with max-pooling (dilation) and min-pooling (erosion).
- :func:`invert_label` / :func:`random_label_inversion`: ``1 - y`` (off by default in
  :func:`task_augment`).
- :func:`task_augment`: the above in a fixed order with per-transform probabilities.
- :func:`synthetic_task`: a random-shape binary task (labels from thresholded sums of random
  Gaussians plus smooth noise, images rendered from the labels), 2D or 3D.

The paper names flips, intensity inversion, Sobel-edge labels and label inversion (from the
research notes, unverified). Edge maps come in two kinds: morphological (``"inner"``, the default:
a subset of the label; ``"outer"``; ``"gradient"``) and ``"sobel"``, the pixels where the Sobel
gradient magnitude of the label is non-zero (a band about two pixels wide across the boundary,
binarized so that every label stays in {0, 1}). The ``"paper"`` preset of UniverSegTrainer uses
``"sobel"``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "flip",
    "random_flip",
    "invert_intensity",
    "random_intensity_inversion",
    "label_edge_map",
    "random_label_edge_map",
    "invert_label",
    "random_label_inversion",
    "task_augment",
    "synthetic_task",
]

_EDGE_MODES = ("inner", "outer", "gradient", "sobel")


# ----------------------------------------------------------------------------- helpers
def _spatial_ndim(x: torch.Tensor, name: str) -> int:
    """Number of spatial axes of an episode tensor ``(B, M, C, *sp)``; 2 or 3."""
    d = x.ndim - 3
    if d not in (2, 3):
        raise ValueError(f"{name} must be (B, M, C, H, W) or (B, M, C, D, H, W), got shape {tuple(x.shape)}")
    return d


def _check_pair(images: torch.Tensor, labels: torch.Tensor) -> int:
    d = _spatial_ndim(images, "images")
    if labels.ndim != images.ndim or labels.shape[:2] != images.shape[:2] or labels.shape[3:] != images.shape[3:]:
        raise ValueError(
            f"images {tuple(images.shape)} and labels {tuple(labels.shape)} must share B, M and spatial sizes"
        )
    return d


def _check_p(p: float, name: str = "p") -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p!r}")
    return float(p)


def _uniform(n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``n`` U(0,1) draws on CPU (on the generator's device, then moved to CPU)."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device).cpu()


def _episode_mask(x: torch.Tensor, p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Bool ``(B, 1, 1, 1, ...)`` on x's device: True for episodes that get the transform."""
    B = x.shape[0]
    m = _uniform(B, generator) < p
    return m.to(x.device).view(B, *([1] * (x.ndim - 1)))


# ----------------------------------------------------------------------------- flips
def flip(images: torch.Tensor, labels: torch.Tensor, axes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flip every member of every episode along the given spatial ``axes`` (0 = first spatial axis).

    images (B,M,C,*sp), labels (B,M,L,*sp) -> same shapes.
    """
    d = _check_pair(images, labels)
    axes = tuple(int(a) for a in axes)
    if any(not 0 <= a < d for a in axes):
        raise ValueError(f"axes must be spatial axis indices in [0, {d}), got {axes}")
    dims = [3 + a for a in axes]
    if not dims:
        return images.clone(), labels.clone()
    return images.flip(dims), labels.flip(dims)


def random_flip(
    images: torch.Tensor, labels: torch.Tensor, generator: Optional[torch.Generator] = None, p: float = 0.5
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per episode and per spatial axis, flip with probability ``p`` (all members alike).

    images (B,M,C,*sp), labels (B,M,L,*sp) -> same shapes. Draws ``B * n_spatial`` uniforms.
    """
    d = _check_pair(images, labels)
    p = _check_p(p)
    B = images.shape[0]
    decisions = (_uniform(B * d, generator) < p).view(B, d)
    shape = (B,) + (1,) * (images.ndim - 1)
    for a in range(d):
        m = decisions[:, a].view(shape)
        if not m.any():
            continue
        images = torch.where(m.to(images.device), images.flip(3 + a), images)
        labels = torch.where(m.to(labels.device), labels.flip(3 + a), labels)
    return images, labels


# ----------------------------------------------------------------------------- intensity
def invert_intensity(images: torch.Tensor) -> torch.Tensor:
    """``1 - images`` (images scaled to [0, 1]); any shape."""
    return 1.0 - images


def random_intensity_inversion(
    images: torch.Tensor, generator: Optional[torch.Generator] = None, p: float = 0.5
) -> torch.Tensor:
    """Per episode with probability ``p``: ``1 - x`` for all members. images (B,M,C,*sp) in [0, 1]."""
    _spatial_ndim(images, "images")
    m = _episode_mask(images, _check_p(p), generator)
    return torch.where(m, 1.0 - images, images)


# ----------------------------------------------------------------------------- labels
def _float(labels: torch.Tensor) -> torch.Tensor:
    return labels if labels.is_floating_point() else labels.float()


def _sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of every channel of ``(N, C, *sp)`` (2D or 3D; replicate padding, so the image
    border is no edge): per axis, the derivative ``[-1, 0, 1]`` along it and smoothing ``[1, 2, 1]`` along the others."""
    d = x.ndim - 2
    n, c = x.shape[:2]
    flat = x.reshape(n * c, 1, *x.shape[2:])
    conv = F.conv2d if d == 2 else F.conv3d
    deriv = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype, device=x.device)
    smooth = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    padded = F.pad(flat, [1, 1] * d, mode="replicate")
    squares = torch.zeros_like(flat)
    for axis in range(d):
        kernel = torch.ones((1, 1) + (1,) * d, dtype=x.dtype, device=x.device)
        for other in range(d):
            shape = [1] * d
            shape[other] = 3
            kernel = kernel * (deriv if other == axis else smooth).view(1, 1, *shape)
        squares = squares + conv(padded, kernel) ** 2
    return squares.sqrt().view_as(x)


def label_edge_map(labels: torch.Tensor, kernel_size: int = 3, mode: str = "inner") -> torch.Tensor:
    """Boundary of binary labels by morphological gradients: labels (B,M,L,*sp) -> same shape, float.

    With ``dil = maxpool_k(y)`` and ``ero = minpool_k(y) = -maxpool_k(-y)`` (stride 1, "same"):

    - ``"inner"`` (default): ``y - ero``, the label pixels that touch the background; a subset
      of the label, about ``kernel_size // 2`` pixels thick;
    - ``"outer"``: ``dil - y``, background pixels that touch the label (disjoint from it);
    - ``"gradient"``: ``dil - ero``, both (the classic morphological gradient);
    - ``"sobel"``: 1 where the Sobel gradient magnitude of ``y`` exceeds 1/2 (``kernel_size`` unused), 0 elsewhere.

    Pixels beyond the image border are ignored (the border itself is not an edge).
    Non-float labels are converted to float32.
    """
    d = _spatial_ndim(labels, "labels")
    if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 3, got {kernel_size!r}")
    if mode not in _EDGE_MODES:
        raise ValueError(f"mode must be one of {_EDGE_MODES}, got {mode!r}")
    y = _float(labels)
    B, M = y.shape[:2]
    flat = y.reshape(B * M, *y.shape[2:])
    if mode == "sobel":
        return (_sobel_magnitude(flat) > 0.5).to(y.dtype).view_as(y)
    pool = F.max_pool2d if d == 2 else F.max_pool3d
    pad = kernel_size // 2
    dil = pool(flat, kernel_size, stride=1, padding=pad).view_as(y)
    ero = (-pool(-flat, kernel_size, stride=1, padding=pad)).view_as(y)
    if mode == "inner":
        return y - ero
    if mode == "outer":
        return dil - y
    return dil - ero


def random_label_edge_map(
    labels: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    p: float = 0.5,
    kernel_size: int = 3,
    mode: str = "inner",
) -> torch.Tensor:
    """Per episode with probability ``p``: replace all members' labels by :func:`label_edge_map`."""
    m = _episode_mask(labels, _check_p(p), generator)
    edges = label_edge_map(labels, kernel_size, mode)
    return torch.where(m, edges, _float(labels))


def invert_label(labels: torch.Tensor) -> torch.Tensor:
    """``1 - labels`` (foreground <-> background); non-float labels become float32."""
    return 1.0 - _float(labels)


def random_label_inversion(
    labels: torch.Tensor, generator: Optional[torch.Generator] = None, p: float = 0.5
) -> torch.Tensor:
    """Per episode with probability ``p``: ``1 - y`` for all members. labels (B,M,L,*sp)."""
    _spatial_ndim(labels, "labels")
    m = _episode_mask(labels, _check_p(p), generator)
    y = _float(labels)
    return torch.where(m, 1.0 - y, y)


# ----------------------------------------------------------------------------- composite
def task_augment(
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    *,
    flip_p: float = 0.5,
    intensity_inversion_p: float = 0.5,
    edge_map_p: float = 0.25,
    edge_mode: str = "inner",
    label_inversion: bool = False,
    label_inversion_p: float = 0.5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Episode-level augmentation: images (B,M,C,*sp), labels (B,M,L,*sp) -> same shapes (float labels).

    In order: :func:`random_flip` (``flip_p`` per axis), :func:`random_intensity_inversion`,
    :func:`random_label_edge_map` (``edge_mode``: inner boundary by default, ``"sobel"``), and, only when
    ``label_inversion`` is True,
    :func:`random_label_inversion`. Each decision is per episode and shared by its members.
    The draws happen in that order whatever the probabilities, so a seed gives one result.
    """
    _check_pair(images, labels)
    images, labels = random_flip(images, labels, generator, flip_p)
    images = random_intensity_inversion(images, generator, intensity_inversion_p)
    labels = random_label_edge_map(labels, generator, edge_map_p, mode=edge_mode)
    if label_inversion:
        labels = random_label_inversion(labels, generator, label_inversion_p)
    return images, labels


# ----------------------------------------------------------------------------- synthetic tasks
def _randu(generator: Optional[torch.Generator], *size: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return (low + (high - low) * torch.rand(*size, generator=generator, device=device)).cpu()


def _randn(generator: Optional[torch.Generator], *size: int) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randn(*size, generator=generator, device=device).cpu()


def _smooth_noise(shape: Tuple[int, ...], generator: Optional[torch.Generator], cells: int = 4) -> torch.Tensor:
    """Smooth noise ``(*shape)``: N(0,1) on a coarse grid of ``cells + 1`` nodes per axis, linearly upsampled."""
    coarse = _randn(generator, 1, 1, *[min(cells + 1, s) for s in shape])
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(coarse, size=shape, mode=mode, align_corners=True)[0, 0]


def _gaussian_field(grid: torch.Tensor, centers: torch.Tensor, sigmas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of axis-aligned Gaussians. grid (d,*sp); centers, sigmas (k,d); weights (k,) -> (*sp)."""
    d = grid.shape[0]
    view = (-1,) + (1,) * d
    field = torch.zeros(grid.shape[1:])
    for c, s, w in zip(centers, sigmas, weights):
        z = ((grid - c.view(view)) / s.view(view)) ** 2
        field = field + w * torch.exp(-0.5 * z.sum(0))
    return field


def _threshold_top(field: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the ``fraction`` largest values (at least one pixel in, at least one out)."""
    flat = field.flatten()
    n = flat.numel()
    k = min(max(int(round((1.0 - fraction) * n)), 1), n - 1)
    thr = flat.kthvalue(k).values
    return field > thr


def synthetic_task(
    shape: Sequence[int],
    generator: Optional[torch.Generator] = None,
    *,
    num_members: int = 2,
    num_blobs: Tuple[int, int] = (1, 4),
    num_distractors: Tuple[int, int] = (0, 3),
    foreground_fraction: Tuple[float, float] = (0.05, 0.3),
    deformation: float = 0.05,
    noise: float = 0.08,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A random-shape binary task: ``images, labels`` each ``(num_members, 1, *shape)``, float32.

    The task (shared by all members) is drawn first: ``num_blobs`` Gaussian blobs (random
    centers, anisotropic widths, weights), a foreground fraction, a background and a foreground
    intensity (at least 0.2 apart), and a few distractor blobs with a third intensity. Each
    member then jitters the blob centers/widths by ``deformation`` (in units of the half field of
    view), adds smooth noise to the blob field, and thresholds it at its top ``fraction`` -> label
    (so every label has foreground and background). The image is rendered from the label
    (slightly blurred, for partial-volume edges) and the distractors with the task intensities,
    plus smooth noise of amplitude ``noise`` and a little white noise, then min-max scaled to [0, 1].

    Args:
        shape: spatial shape, 2 or 3 ints, each >= 4.
        generator: source of all randomness (global RNG when None); same seed -> same task.
        num_members: ``M = S + 1`` (query + supports); split as ``images[:1]``, ``images[1:]``.
        num_blobs, num_distractors: inclusive ranges for the counts.
        foreground_fraction: range of the fraction of pixels in the label.
        deformation, noise: member-level variability.

    Use ``images[None], labels[None]`` to get an episode ``(1, M, 1, *shape)`` for
    :func:`task_augment` or UniverSeg.
    """
    shape = tuple(int(s) for s in shape)
    d = len(shape)
    if d not in (2, 3) or any(s < 4 for s in shape):
        raise ValueError(f"shape must be 2 or 3 spatial sizes >= 4, got {shape}")
    if not isinstance(num_members, int) or num_members < 1:
        raise ValueError(f"num_members must be a positive int, got {num_members!r}")
    for name, (lo, hi) in (("num_blobs", num_blobs), ("num_distractors", num_distractors)):
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi) or (name == "num_blobs" and lo < 1):
            raise ValueError(f"{name} must be an int range (lo, hi) with 0 <= lo <= hi (lo >= 1 for blobs), got {(lo, hi)}")
    lo_f, hi_f = foreground_fraction
    if not 0.0 < lo_f <= hi_f < 1.0:
        raise ValueError(f"foreground_fraction must satisfy 0 < lo <= hi < 1, got {foreground_fraction}")
    if deformation < 0 or noise < 0:
        raise ValueError("deformation and noise must be >= 0")

    g = generator
    axes = [torch.linspace(-1.0, 1.0, s) for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (d, *shape)

    # task-level draws
    k = int(_randu(g, 1, low=num_blobs[0], high=num_blobs[1] + 1).floor().clamp(max=num_blobs[1]).item())
    centers = _randu(g, k, d, low=-0.6, high=0.6)
    sigmas = _randu(g, k, d, low=0.12, high=0.4)
    weights = _randu(g, k, low=0.5, high=1.0)
    fraction = float(_randu(g, 1, low=lo_f, high=hi_f).item())
    nd = int(_randu(g, 1, low=num_distractors[0], high=num_distractors[1] + 1).floor().clamp(max=num_distractors[1]).item())
    d_centers = _randu(g, max(nd, 1), d, low=-0.8, high=0.8)[:nd]
    d_sigmas = _randu(g, max(nd, 1), d, low=0.05, high=0.2)[:nd]
    bg, delta, d_delta = _randu(g, 3).tolist()
    fg = (bg + 0.2 + 0.6 * delta) % 1.0  # circular distance to bg in [0.2, 0.8] -> |fg - bg| >= 0.2
    distractor_intensity = (fg + 0.2 + 0.6 * d_delta) % 1.0

    images, labels = [], []
    pool = F.avg_pool2d if d == 2 else F.avg_pool3d
    for _ in range(num_members):
        c = centers + deformation * _randn(g, k, d)
        s = sigmas * torch.exp(2 * deformation * _randn(g, k, d))
        field = _gaussian_field(grid, c, s, weights)
        field = field + 0.1 * float(weights.max()) * _smooth_noise(shape, g)
        label = _threshold_top(field, fraction).float()

        dc = d_centers + deformation * _randn(g, nd, d)
        distractor = (_gaussian_field(grid, dc, d_sigmas, torch.ones(nd)) > 0.5).float() * (1 - label)

        soft = pool(label[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
        image = bg + (fg - bg) * soft + (distractor_intensity - bg) * distractor
        image = image + noise * _smooth_noise(shape, g) + 0.02 * _randn(g, *shape)
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-8)
        images.append(image)
        labels.append(label)
    return torch.stack(images)[:, None], torch.stack(labels)[:, None]
