"""Episodes for in-context (UniverSeg) training: a task, a query and ``S`` support pairs of that task.

An **episode task** is one label of one member (:class:`EpisodeTask`: member, local label, label values and
the global task it feeds). Tasks are per member even when a global task merges labels of several members
("liver" of a CT and of an MR dataset are two episode tasks): a support set and its query always come from
one dataset, as in UniverSeg, where a task is a (dataset, label) pair.

Sampling (:class:`EpisodeSampler`) is hierarchical, as UniverSeg's Algorithm 1 and the maintainers' advice
(issues #31, #34): draw a member, then one of its tasks uniformly, independently for every episode of a batch,
so one batch mixes tasks of several members. Member probabilities: ``"uniform"`` (default; every dataset
equally often, whatever its size), ``"tasks"`` (uniform over all tasks), ``"spec"`` (the collection spec's
scheme) or any scheme name of :func:`nnharmony.data.sampling.member_probabilities`. **Held-out members**
(``holdout``: dataset ids or names) get probability 0 and their data are never opened by the training
loaders, so they measure generalization to unseen datasets.

Episode content (:class:`EpisodeLoader`), from every member's own nnU-Net preprocessed data (own spacing and
normalization; :func:`nnharmony.data.loader.load_member_data`):

* ``dim=2`` (configuration ``2d``): an item is one slice along the first axis of the preprocessed volume
  (nnU-Net's 2d configuration puts the out-of-plane axis first; the inference code slices along the axis of
  largest spacing, which is the same axis). ``slice_axes=(0, 1, 2)`` cuts the slices of 3D members along
  an axis drawn per episode (query and supports alike, so a (label, axis) pair acts as a task, as
  UniverSeg's per-axis slices of 3D volumes); a 2D member (one slice) always uses axis 0. So one collection
  planned in ``2d`` with 2D and 3D members gives a multi-task corpus of every (member, label) pair. A case is drawn uniformly, then a slice: with probability
  ``query_foreground_prob`` / ``support_foreground_prob`` one through a random foreground voxel of the task
  (nnU-Net's stored ``class_locations``), otherwise uniformly. Supports default to foreground slices (1.0)
  because inference builds support sets from slices that show the structure; queries are foreground slices
  half of the time (0.5), so the network also learns to answer "nothing here".
* ``dim=3`` (``3d_fullres``): an item is a patch of ``crop_size`` (default: the joint plan's patch size),
  centred on a foreground voxel or at a random position with the same probabilities, zero-padded (label) /
  min-padded (image) at the borders; ``crop_size=None`` takes the whole volume.
* Only the member's **first image channel** is used (UniverSeg is single-channel; the first channel is the
  member's primary modality in the collection spec). Averaging channels would mix contrasts (T1 and T2) that
  no single-channel input at inference would show.
* Each image is clipped to its own [0.5, 99.5] percentiles and min-max scaled to [0, 1]
  (:func:`normalize_image`; UniverSeg's inputs are in [0, 1]; the clipping makes raw CT at inference behave
  like nnU-Net's clipped CT in training), then resized to ``image_size`` (bilinear with antialiasing in 2D,
  trilinear in 3D, no padding: the aspect ratio is not kept, as in UniverSeg's 128x128 MegaMedical). Labels
  are resized as soft masks and thresholded at 0.5 (:func:`resize_label`), which keeps thin structures
  better than nearest-neighbour.
* The query's case is excluded from its own support set whenever the member has another case, so the network
  never sees the query (or a neighbouring slice of it) among the supports; inference uses supports from other
  subjects too.

Augmentation, in this order: **in-task** (:class:`InTaskAugmentation`, independent for every image of the
episode: nnU-Net's probabilities and similar ranges for rotation, scaling, translation, Gaussian noise, blur,
brightness, contrast and gamma, implemented with batched torch ops instead of batchgeneratorsv2 so that it
runs on the resized [0, 1] images of a whole episode at once; no elastic deformation, off by default in
nnU-Net too), then, with probability ``shared_augmentation_prob`` per episode, ONE draw of the same
transforms for all images of the episode (a task augmentation: a new task, not a perturbed image), then
**task augmentation** (:func:`nnharmony.data.task_augmentation.task_augment`: one flip / intensity
inversion / label edge-map (morphological or Sobel) / label inversion decision for all images of an
episode). The support size is fixed (``support_size``) or drawn per batch uniformly in
[``min_support_size``, ``support_size``] (all episodes of a batch share it, so they stack). With probability
``synthetic_task_prob`` an episode is replaced by a random-shape task
(:func:`~nnharmony.data.task_augmentation.synthetic_task`), which gets both augmentations as well.

Batch (dict, CPU tensors)::

    query_image     float [B, 1, *size]     in [0, 1]
    query_label     float [B, 1, *size]     {0, 1}
    support_images  float [B, S, 1, *size]
    support_labels  float [B, S, 1, *size]
    task_id         long  [B]               global task id (-1: synthetic task)
    member_index    long  [B]               index in spec.members (-1: synthetic task)
    keys            list[str]               "DatasetXXX_Name:label/case@z12" of the query ("synthetic" ...)

Seeding: every loader (and every augmentation worker, by ``thread_id``) owns a NumPy and a torch generator
seeded from ``SeedSequence(seed, spawn_key=(rank, stream, worker))``; the same seed gives the same batches
with ``SingleThreadedAugmenter``.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from batchgenerators.dataloading.data_loader import DataLoader

from nnharmony.data.collection import SAMPLING_SCHEMES, CollectionError, CollectionSpec
from nnharmony.data.sampling import member_probabilities

TRAIN_STREAM = 0
VAL_STREAM = 1
MEMBER_SAMPLING = ("uniform", "tasks", "spec") + tuple(s for s in SAMPLING_SCHEMES if s != "uniform")


# ---------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class EpisodeTask:
    """One label (or region) of one member: the unit an episode is drawn from."""

    member_index: int
    dataset_id: int
    dataset_name: str
    label: str
    values: tuple[int, ...]
    global_task: int

    @property
    def name(self) -> str:
        return f"{self.dataset_name}:{self.label}"


def resolve_holdout(spec: CollectionSpec, holdout: Sequence[int | str] | int | str | None) -> list[int]:
    """Member indices of the held-out datasets (ids, digit strings or ``DatasetXXX_Name``); a clear error for an
    unknown dataset or when nothing would be left to train on."""
    if holdout is None:
        return []
    if isinstance(holdout, (int, str)):
        holdout = [holdout]
    out = []
    for h in holdout:
        key = int(h) if isinstance(h, str) and h.strip().isdigit() else h
        try:
            out.append(spec.member_index(key))
        except CollectionError:
            raise CollectionError(
                f"held-out dataset {h!r} is not a member of collection {spec.name} (members: "
                f"{', '.join(f'{m.dataset_id} ({m.dataset_name})' for m in spec.members)})") from None
    out = sorted(set(out))
    if len(out) == len(spec.members):
        raise CollectionError(f"collection {spec.name}: every member is held out, nothing is left to train on")
    return out


def episode_tasks(spec: CollectionSpec, holdout: Sequence[int | str] | None = None) -> list[EpisodeTask]:
    """Every (member, label) task of the members that are not held out, in spec order."""
    held = set(resolve_holdout(spec, holdout))
    tasks = []
    for i, m in enumerate(spec.members):
        if i in held:
            continue
        for t in m.tasks:
            tasks.append(EpisodeTask(i, m.dataset_id, m.dataset_name, t.label, tuple(int(v) for v in t.values),
                                     spec.tasks.index(t.task)))
    return tasks


class EpisodeSampler:
    """Draws episode tasks i.i.d.: a member (``member_sampling``), then one of its tasks uniformly.

    Args:
        spec: the collection.
        holdout: held-out datasets (never drawn).
        member_sampling: ``"uniform"`` | ``"tasks"`` | ``"spec"`` | a scheme of ``member_probabilities``.
        available: member indices that have data in this split (others are never drawn; None: all).
        counts: case counts per member for count-based schemes (default: the spec's ``num_training``).
        seed, rank, stream: ``SeedSequence(seed, spawn_key=(rank, stream))``.

    ``task_probabilities`` holds the resulting probability of every task in ``tasks``.
    """

    def __init__(self, spec: CollectionSpec, holdout: Sequence[int | str] | None = None,
                 member_sampling: str = "uniform", available: Sequence[int] | None = None,
                 counts: Sequence[int] | None = None, seed: int = 12345, rank: int = 0, stream: int = 0):
        if member_sampling not in MEMBER_SAMPLING:
            raise ValueError(f"member_sampling must be one of {MEMBER_SAMPLING}, got {member_sampling!r}")
        self.spec = spec
        self.holdout = resolve_holdout(spec, holdout)
        avail = set(range(len(spec.members))) if available is None else {int(i) for i in available}
        self.tasks = [t for t in episode_tasks(spec, holdout) if t.member_index in avail]
        if not self.tasks:
            raise CollectionError(f"collection {spec.name}: no task to draw episodes from (held out: "
                                  f"{[spec.members[i].dataset_name for i in self.holdout]}, members with data: "
                                  f"{sorted(avail)})")
        members = sorted({t.member_index for t in self.tasks})
        if member_sampling == "tasks":
            p_member = np.zeros(len(spec.members))
            for t in self.tasks:
                p_member[t.member_index] += 1
        elif member_sampling == "uniform":
            p_member = np.zeros(len(spec.members))
            p_member[members] = 1.0
        else:
            scheme = None if member_sampling == "spec" else member_sampling
            p_member = member_probabilities(spec, scheme, counts=counts).copy()
            keep = np.zeros(len(spec.members), dtype=bool)
            keep[members] = True
            p_member[~keep] = 0.0
        p_member = p_member / p_member.sum()
        n_tasks = {i: sum(t.member_index == i for t in self.tasks) for i in members}
        self.task_probabilities = np.array([p_member[t.member_index] / n_tasks[t.member_index] for t in self.tasks])
        self.task_probabilities /= self.task_probabilities.sum()
        self.member_sampling = member_sampling
        self._rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(rank), int(stream))))

    def draw(self, n: int) -> list[EpisodeTask]:
        idx = self._rng.choice(len(self.tasks), size=int(n), replace=True, p=self.task_probabilities)
        return [self.tasks[int(i)] for i in idx]


# ---------------------------------------------------------------------------------------------- image ops
def normalize_image(x: torch.Tensor, ndim: int, lower: float = 0.5, upper: float = 99.5) -> torch.Tensor:
    """Clip every image to its own [``lower``, ``upper``] percentiles and min-max scale it to [0, 1].

    ``x``: ``(..., *spatial)`` with ``ndim`` spatial axes; every leading index is one image. A constant image
    becomes zeros. Percentiles of images with more than 2**20 voxels are estimated on a strided subsample.
    """
    x = x.float()
    lead = x.shape[: x.ndim - ndim]
    flat = x.reshape(-1, int(np.prod(x.shape[x.ndim - ndim:])))
    sample = flat if flat.shape[1] <= 2 ** 20 else flat[:, :: math.ceil(flat.shape[1] / 2 ** 20)]
    q = torch.quantile(sample, torch.tensor([lower / 100.0, upper / 100.0], dtype=flat.dtype), dim=1)  # (2, N)
    lo, hi = q[0][:, None], q[1][:, None]
    out = (flat.clamp(min=lo, max=hi) - lo) / (hi - lo).clamp_min(1e-8)
    out = torch.where((hi - lo) > 1e-8, out, torch.zeros_like(out))
    return out.reshape(*lead, *x.shape[x.ndim - ndim:])


def resize_image(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(N, C, *sp) -> (N, C, *size)``: bilinear with antialiasing (2D) or trilinear (3D)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x.float()
    if len(size) == 2:
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(x.float(), size=size, mode="trilinear", align_corners=False)


def resize_probabilities(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Soft map ``(N, C, *sp) -> (N, C, *size)``, (bi/tri)linear without antialiasing, values kept in [0, 1]."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x.float()
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(x.float(), size=size, mode=mode, align_corners=False).clamp(0, 1)


def resize_label(y: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Binary ``(N, C, *sp) -> (N, C, *size)`` in {0, 1}: resized as a soft mask, thresholded at 0.5."""
    if tuple(y.shape[2:]) == tuple(int(s) for s in size):
        return (y > 0.5).float()
    soft = resize_image(y.float(), size) if len(size) == 2 else resize_probabilities(y, size)
    return (soft > 0.5).float()


# ---------------------------------------------------------------------------------------------- in-task augmentation
def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one image ``(1, *sp)`` with ``sigma`` pixels (reflect padding)."""
    d = x.ndim - 1
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    out = x[None]  # (1, 1, *sp)
    conv = F.conv2d if d == 2 else F.conv3d
    for axis in range(d):
        shape = [1, 1] + [1] * d
        shape[2 + axis] = k.numel()
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = radius
        size = out.shape[2 + axis]
        mode = "reflect" if size > radius else "replicate"
        out = conv(F.pad(out, pad, mode=mode), k.view(shape))
    return out[0]


@dataclass
class InTaskAugmentation:
    """Independent per-image augmentation of an episode's images (query and every support alike).

    Probabilities follow nnU-Net's ``get_training_transforms`` (rotation 0.2, scaling 0.2, noise 0.1, blur 0.2,
    brightness 0.15, contrast 0.15, gamma 0.3); ranges are milder for rotation (nnU-Net 2D rotates by up to
    180 degrees, which would make query and supports of one task disagree about orientation) and scaled to
    [0, 1] images for noise. Spatial transforms: one affine warp per image (rotation about every axis in 3D,
    isotropic scaling, translation), bilinear for images (border padding), the label warped as a soft mask
    and thresholded at 0.5. Images are clipped back to [0, 1].
    """

    p_rotation: float = 0.2
    rotation_degrees: float = 15.0
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.85, 1.25)
    p_translation: float = 0.2
    translation: float = 0.1  # fraction of the half field of view
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.05)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator, group: int = 1):
        """images, labels ``(N, 1, *sp)`` -> augmented copies (labels in {0, 1}).

        ``group``: every ``group`` consecutive images share one draw of every parameter (1: in-task
        augmentation, each image its own; ``S + 1``: one transform for a whole episode, a task augmentation).
        Pixel noise stays independent per image."""
        n, d = images.shape[0], images.ndim - 2
        if group < 1 or n % group:
            raise ValueError(f"group must divide the number of images {n}, got {group}")
        m = n // group

        def per_image(x: torch.Tensor) -> torch.Tensor:
            return x.repeat_interleave(group, dim=0)

        def rand() -> torch.Tensor:
            return per_image(torch.rand(m, generator=g))

        def uniform(lo: float, hi: float, k: int = 1) -> torch.Tensor:
            x = per_image(_uniform(g, m * k, lo, hi).view(m, k))
            return x[:, 0] if k == 1 else x

        # ---- spatial: theta maps output coords to input coords (normalized [-1, 1])
        eye = torch.eye(d).repeat(n, 1, 1)
        rot = eye.clone()
        do_rot = rand() < self.p_rotation
        angles = uniform(-1, 1, 1 if d == 2 else 3).view(n, -1) * math.radians(self.rotation_degrees)
        for j in range(angles.shape[1]):
            a = torch.where(do_rot, angles[:, j], torch.zeros(n))
            c, s = torch.cos(a), torch.sin(a)
            r = eye.clone()
            i0, i1 = [(0, 1), (0, 2), (1, 2)][j] if d == 3 else (0, 1)
            r[:, i0, i0], r[:, i0, i1], r[:, i1, i0], r[:, i1, i1] = c, -s, s, c
            rot = rot @ r
        do_scale = rand() < self.p_scaling
        scale = torch.where(do_scale, uniform(*self.scaling), torch.ones(n))
        do_shift = rand() < self.p_translation
        shift = uniform(-self.translation, self.translation, d).view(n, d) * do_shift[:, None]
        spatial = do_rot | do_scale | do_shift
        if spatial.any():
            idx = spatial.nonzero()[:, 0]
            theta = torch.cat([rot[idx] / scale[idx, None, None], shift[idx, :, None]], dim=2)
            grid = F.affine_grid(theta, [len(idx), 1, *images.shape[2:]], align_corners=False)
            images = images.clone()
            labels = labels.clone().float()
            images[idx] = F.grid_sample(images[idx], grid, mode="bilinear", padding_mode="border", align_corners=False)
            labels[idx] = (F.grid_sample(labels[idx].float(), grid, mode="bilinear", padding_mode="zeros",
                                         align_corners=False) > 0.5).float()
        # ---- intensity
        images = images.clone()
        view = (n,) + (1,) * (d + 1)
        do_blur, sigma = rand() < self.p_blur, uniform(*self.blur_sigma)
        for i in do_blur.nonzero()[:, 0].tolist():
            images[i] = _gaussian_blur(images[i], float(sigma[i]))
        do = (rand() < self.p_noise).view(view)
        std = uniform(*self.noise_std).view(view)
        images = images + do * std * torch.randn(images.shape, generator=g)
        do = (rand() < self.p_brightness).view(view)
        images = torch.where(do, images * uniform(*self.brightness).view(view), images)
        do = (rand() < self.p_contrast).view(view)
        mean = images.mean(dim=tuple(range(1, d + 2)), keepdim=True)
        images = torch.where(do, (images - mean) * uniform(*self.contrast).view(view) + mean, images)
        images = images.clamp(0, 1)
        do = (rand() < self.p_gamma).view(view)
        images = torch.where(do, images.clamp_min(0) ** uniform(*self.gamma).view(view), images)
        return images.clamp(0, 1), labels.float()


# ---------------------------------------------------------------------------------------------- loader
@dataclass
class EpisodeConfig:
    """What an episode looks like (see the module docstring)."""

    dim: int = 2
    support_size: int = 8
    image_size: tuple[int, ...] = (128, 128)
    crop_size: tuple[int, ...] | None = None  # 3D only: patch cropped before resizing (None: whole volume)
    query_foreground_prob: float = 0.5
    support_foreground_prob: float = 1.0
    in_task_augmentation: bool = True
    task_augmentation: dict | None = field(default_factory=dict)  # kwargs of task_augment; None: off
    synthetic_task_prob: float = 0.0
    member_sampling: str = "uniform"
    min_support_size: int | None = None  # S drawn per batch in [min_support_size, support_size]; None: fixed
    slice_axes: tuple[int, ...] = (0,)  # 2D episodes of volumes: axes an episode's slices are cut along
    shared_augmentation_prob: float = 0.0  # episodes whose images all get ONE in-task-style transform

    def __post_init__(self):
        if self.dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {self.dim}")
        self.image_size = tuple(int(s) for s in self.image_size)
        if len(self.image_size) != self.dim or min(self.image_size) < 4:
            raise ValueError(f"image_size must be {self.dim} sizes >= 4, got {self.image_size}")
        if self.crop_size is not None:
            if self.dim != 3:
                raise ValueError("crop_size is for 3D episodes")
            self.crop_size = tuple(int(s) for s in self.crop_size)
            if len(self.crop_size) != 3 or min(self.crop_size) < 1:
                raise ValueError(f"crop_size must be 3 positive sizes, got {self.crop_size}")
        if int(self.support_size) < 1:
            raise ValueError(f"support_size must be >= 1, got {self.support_size}")
        self.support_size = int(self.support_size)
        if self.min_support_size is not None:
            self.min_support_size = int(self.min_support_size)
            if not 1 <= self.min_support_size <= self.support_size:
                raise ValueError(f"min_support_size must be in [1, support_size={self.support_size}], got "
                                 f"{self.min_support_size}")
        self.slice_axes = tuple(int(a) for a in self.slice_axes)
        if not self.slice_axes or any(a not in (0, 1, 2) for a in self.slice_axes):
            raise ValueError(f"slice_axes must be a non-empty subset of (0, 1, 2), got {self.slice_axes}")
        for name in ("query_foreground_prob", "support_foreground_prob", "synthetic_task_prob",
                     "shared_augmentation_prob"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.member_sampling not in MEMBER_SAMPLING:
            raise ValueError(f"member_sampling must be one of {MEMBER_SAMPLING}, got {self.member_sampling!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def draw_support_size(self, rng: np.random.Generator) -> int:
        """S of one batch: ``support_size``, or uniform in [``min_support_size``, ``support_size``]."""
        if self.min_support_size is None:
            return self.support_size
        return int(rng.integers(self.min_support_size, self.support_size + 1))


def _fg_key_locations(props: dict, values: tuple[int, ...]) -> np.ndarray | None:
    """Stored foreground voxel coordinates ``(n, ndim)`` of a task from nnU-Net's ``class_locations`` (None if
    the pickle has no entry for these values)."""
    locs = props.get("class_locations")
    if not locs:
        return None
    if len(values) == 1 and values[0] in locs:
        arrs = [locs[values[0]]]
    elif tuple(values) in locs:
        arrs = [locs[tuple(values)]]
    elif all(v in locs for v in values):
        arrs = [locs[v] for v in values]
    else:
        return None
    arrs = [np.asarray(a) for a in arrs if len(a)]
    if not arrs:
        return np.zeros((0, 3), dtype=np.int64)
    a = np.concatenate(arrs)
    return a[:, 1:] if a.shape[1] == 4 else a  # drop the channel column


class EpisodeLoader(DataLoader):
    """Infinite loader of episode batches (module docstring).

    Args:
        spec: the collection.
        query_members / support_members: one ``MemberData`` (or None) per member, in ``spec.members`` order:
            the cases queries and supports are drawn from (training: both the training cases; validation:
            queries from the validation cases, supports from the training cases).
        config: :class:`EpisodeConfig`.
        batch_size: episodes per batch.
        holdout: held-out datasets (never drawn; their ``MemberData`` may be None).
        seed, rank, stream: seeding (module docstring).
        augmentation: the in-task augmentation (default :class:`InTaskAugmentation`; only used when
            ``config.in_task_augmentation``).
    """

    def __init__(self, spec: CollectionSpec, query_members: Sequence[Any], support_members: Sequence[Any],
                 config: EpisodeConfig, batch_size: int, holdout: Sequence[int | str] | None = None,
                 seed: int = 12345, rank: int = 0, stream: int = TRAIN_STREAM,
                 augmentation: InTaskAugmentation | None = None, cache_size: int = 256):
        super().__init__(list(range(len(spec.members))), int(batch_size), 1, None, True, False, True, None)
        if len(query_members) != len(spec.members) or len(support_members) != len(spec.members):
            raise ValueError("query_members and support_members need one entry per collection member")
        self.spec = spec
        self.query_members = list(query_members)
        self.support_members = list(support_members)
        self.config = config
        self.holdout = resolve_holdout(spec, holdout)  # member indices
        self.holdout_ids = [spec.members[i].dataset_id for i in self.holdout]
        self.available = [i for i in range(len(spec.members)) if i not in self.holdout
                          and self._n(self.query_members[i]) > 0 and self._n(self.support_members[i]) > 0]
        self.counts = [max(1, self._n(md)) for md in self.support_members]
        self.seed, self.rank, self.stream = int(seed), int(rank), int(stream)
        self.augmentation = augmentation or InTaskAugmentation()
        self.cache_size = int(cache_size)
        self._cache: OrderedDict = OrderedDict()
        self._fg_cache: dict = {}
        self._rng_owner = None
        EpisodeSampler(spec, self.holdout_ids, config.member_sampling, self.available, self.counts, seed, rank, stream)

    @staticmethod
    def _n(md) -> int:
        return 0 if md is None else len(md.dataset.identifiers)

    # ---------------------------------------------------------------- randomness
    def _init_rngs(self) -> None:
        sub = self.stream * 10_000 + int(self.thread_id)
        self.sampler = EpisodeSampler(self.spec, self.holdout_ids, self.config.member_sampling, self.available,
                                      self.counts, self.seed, self.rank, sub)
        ss = np.random.SeedSequence(self.seed, spawn_key=(self.rank, sub, 1))
        self.rng = np.random.default_rng(ss)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(ss.generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF)
        self._rng_owner = (os.getpid(), int(self.thread_id))

    def _ensure_rngs(self) -> None:
        if self._rng_owner != (os.getpid(), int(self.thread_id)):
            self._init_rngs()

    # ---------------------------------------------------------------- data access
    def _case(self, md, case: str):
        key = (md.index, md.data_folder, case)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        data, seg, _, props = md.dataset.load_case(case)
        self._cache[key] = (data, seg, props)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return self._cache[key]

    def _fg_locations(self, md, case: str, seg, props, values: tuple[int, ...]) -> np.ndarray:
        key = (md.index, md.data_folder, case, values)
        if key not in self._fg_cache:
            locs = _fg_key_locations(props, values)
            if locs is None:  # no stored locations for these values: compute them once
                locs = np.argwhere(np.isin(np.asarray(seg[0][...]), values))
                if len(locs) > 10000:
                    locs = locs[np.random.default_rng(0).choice(len(locs), 10000, replace=False)]
            self._fg_cache[key] = locs
        return self._fg_cache[key]

    def _slice_axis(self, md) -> int:
        """Axis (of the stored ``(Z, Y, X)`` grid) the slices of one 2D episode are cut along: one of
        ``slice_axes`` that gives a real 2D slice for this member (a 2D member, ``Z = 1``, has only axis 0)."""
        case = md.identifiers[0]
        spatial = tuple(int(v) for v in self._case(md, case)[0].shape[1:])
        usable = [a for a in self.config.slice_axes if all(n > 1 for i, n in enumerate(spatial) if i != a)]
        return int(usable[int(self.rng.integers(len(usable)))]) if usable else 0

    def _item(self, task, md, fg_prob: float, exclude_case: str | None, axis: int = 0):
        """One normalized, resized (image, label) pair ``(1, *size)`` of ``task`` from ``md``, and its key;
        2D: a slice along ``axis``."""
        ids = md.identifiers
        if exclude_case is not None and len(ids) > 1:
            ids = [i for i in ids if i != exclude_case]
        case = ids[int(self.rng.integers(len(ids)))]
        data, seg, props = self._case(md, case)
        spatial = tuple(int(s) for s in data.shape[1:])
        locs = self._fg_locations(md, case, seg, props, task.values)
        use_fg = len(locs) > 0 and self.rng.random() < fg_prob
        if self.config.dim == 2:
            z = int(locs[self.rng.integers(len(locs))][axis]) if use_fg else int(self.rng.integers(spatial[axis]))
            index = (0,) + (slice(None),) * axis + (z,)
            img = np.asarray(data[index], dtype=np.float32)
            lab = np.isin(np.asarray(seg[index]), task.values)
            where = f"@{'zyx'[axis]}{z}"
        else:
            crop = spatial if self.config.crop_size is None else self.config.crop_size
            if use_fg:
                center = np.asarray(locs[self.rng.integers(len(locs))], dtype=np.int64)
            else:
                center = np.array([self.rng.integers(s) for s in spatial])
            lo = [int(c) - cs // 2 for c, cs in zip(center, crop)]
            # keep the crop inside the volume where the volume is large enough (as nnU-Net does)
            lo = [min(max(l_, 0), max(s - cs, 0)) if s >= cs else (s - cs) // 2 for l_, s, cs in zip(lo, spatial, crop)]
            src = tuple(slice(max(l_, 0), min(l_ + cs, s)) for l_, cs, s in zip(lo, crop, spatial))
            dst = tuple(slice(sl.start - l_, sl.stop - l_) for sl, l_ in zip(src, lo))
            part = np.asarray(data[(0,) + src], dtype=np.float32)
            img = np.full(crop, part.min() if part.size else 0.0, dtype=np.float32)
            img[dst] = part
            lab = np.zeros(crop, dtype=bool)
            lab[dst] = np.isin(np.asarray(seg[(0,) + src]), task.values)
            where = "@" + ",".join(f"{s.start}" for s in src)
        x = resize_image(torch.from_numpy(img)[None, None], self.config.image_size)[0]
        x = normalize_image(x, self.config.dim)
        y = resize_label(torch.from_numpy(lab.astype(np.float32))[None, None], self.config.image_size)[0]
        return x, y, f"{task.name}/{case}{where}", case

    def _episode(self, task, support_size: int):
        cfg = self.config
        q_md, s_md = self.query_members[task.member_index], self.support_members[task.member_index]
        # 2D: one axis per episode, so (label, axis) is the task, as UniverSeg's per-axis slices of 3D volumes
        axis = self._slice_axis(q_md) if cfg.dim == 2 and len(cfg.slice_axes) > 1 else 0
        qx, qy, key, qcase = self._item(task, q_md, cfg.query_foreground_prob, None, axis)
        # exclude the query's case from the supports when query and supports share cases
        exclude = qcase if qcase in set(s_md.identifiers) else None
        items = [self._item(task, s_md, cfg.support_foreground_prob, exclude, axis) for _ in range(support_size)]
        images = torch.stack([qx] + [it[0] for it in items])
        labels = torch.stack([qy] + [it[1] for it in items])
        return images, labels, key

    def _augment(self, x: torch.Tensor, y: torch.Tensor, episodes: torch.Tensor, group: int):
        """:class:`InTaskAugmentation` of the ``episodes`` (bool ``(B,)``) of ``(B, M, 1, *sp)`` batches, each
        image its own draw (``group=1``) or one draw per episode (``group=M``, a task augmentation)."""
        if not episodes.any():
            return x, y
        idx = episodes.nonzero()[:, 0]
        b, m = len(idx), x.shape[1]
        xa, ya = self.augmentation(x[idx].flatten(0, 1), y[idx].flatten(0, 1), self.generator, group=group)
        x, y = x.clone(), y.clone().float()
        x[idx], y[idx] = xa.view(b, m, *xa.shape[1:]), ya.view(b, m, *ya.shape[1:])
        return x, y

    def generate_train_batch(self) -> dict:
        from nnharmony.data.task_augmentation import synthetic_task, task_augment

        self._ensure_rngs()
        cfg = self.config
        tasks = self.sampler.draw(self.batch_size)
        support_size = cfg.draw_support_size(self.rng)
        images, labels, keys, task_ids, member_ids = [], [], [], [], []
        for task in tasks:
            if cfg.synthetic_task_prob > 0 and self.rng.random() < cfg.synthetic_task_prob:
                x, y = synthetic_task(cfg.image_size, self.generator, num_members=support_size + 1)
                images.append(x)
                labels.append(y)
                keys.append("synthetic")
                task_ids.append(-1)
                member_ids.append(-1)
                continue
            x, y, key = self._episode(task, support_size)
            images.append(x)
            labels.append(y)
            keys.append(key)
            task_ids.append(task.global_task)
            member_ids.append(task.member_index)
        x = torch.stack(images)  # (B, S+1, 1, *size)
        y = torch.stack(labels)
        if cfg.in_task_augmentation:
            x, y = self._augment(x, y, torch.ones(x.shape[0], dtype=torch.bool), group=1)
        if cfg.shared_augmentation_prob > 0:
            chosen = torch.rand(x.shape[0], generator=self.generator) < cfg.shared_augmentation_prob
            x, y = self._augment(x, y, chosen, group=x.shape[1])
        if cfg.task_augmentation is not None:
            x, y = task_augment(x, y, self.generator, **cfg.task_augmentation)
        return {
            "query_image": x[:, 0].contiguous(),
            "query_label": y[:, 0].contiguous(),
            "support_images": x[:, 1:].contiguous(),
            "support_labels": y[:, 1:].contiguous(),
            "task_id": torch.tensor(task_ids, dtype=torch.long),
            "member_index": torch.tensor(member_ids, dtype=torch.long),
            "keys": keys,
        }


# ---------------------------------------------------------------------------------------------- building
def build_episode_dataloaders(spec: CollectionSpec, joint_plans: dict, configuration: str, fold: int | str,
                              batch_size: int, config: EpisodeConfig, holdout: Sequence[int | str] | None = None,
                              seed: int = 12345, rank: int = 0, num_processes: int | None = None,
                              pin_memory: bool = False, plans_identifier: str = "nnUNetPlans",
                              val_config: EpisodeConfig | None = None):
    """Training and validation iterators of episodes over collection fold ``fold``.

    Training episodes: queries and supports from the training cases of the members that are not held out
    (held-out members' data are not opened). Validation episodes (``val_config``, default: ``config``
    without augmentation and synthetic tasks): queries from the validation cases, supports from the training
    cases. ``num_processes``: augmentation workers (default ``$nnUNet_n_proc_DA``); 0 gives
    ``SingleThreadedAugmenter``s, otherwise ``NonDetMultiThreadedAugmenter``s as in nnU-Net.
    """
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    from nnharmony.data.loader import load_member_data, member_plan_identifiers
    from nnharmony.data.splits import collection_fold

    held = resolve_holdout(spec, holdout)
    plans_ids, data_ids = member_plan_identifiers(spec, joint_plans, configuration, plans_identifier)
    folds = collection_fold(spec, fold, configuration, plans_identifier, data_identifiers=data_ids)
    train_md, val_md = [], []
    for i in range(len(spec.members)):
        if i in held:
            train_md.append(None)
            val_md.append(None)
            continue
        tr, val = folds[i]
        train_md.append(load_member_data(spec, i, configuration, tr, plans_ids[i], data_ids.get(i)) if tr else None)
        val_md.append(load_member_data(spec, i, configuration, val, plans_ids[i], data_ids.get(i)) if val else None)
    if val_config is None:
        val_config = EpisodeConfig(**{**config.to_dict(), "in_task_augmentation": False, "task_augmentation": None,
                                      "synthetic_task_prob": 0.0, "shared_augmentation_prob": 0.0})
    held_ids = [spec.members[i].dataset_id for i in held]
    dl_tr = EpisodeLoader(spec, train_md, train_md, config, batch_size, held_ids, seed, rank, TRAIN_STREAM)
    if not any(md is not None for md in val_md):
        val_md = train_md  # e.g. single-case members: validate on training cases rather than not at all
    dl_val = EpisodeLoader(spec, val_md, train_md, val_config, batch_size, held_ids, seed, rank, VAL_STREAM)
    n = get_allowed_n_proc_DA() if num_processes is None else int(num_processes)
    if n == 0:
        return SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
    it_tr = NonDetMultiThreadedAugmenter(data_loader=dl_tr, transform=None, num_processes=n,
                                         num_cached=max(6, n // 2), seeds=None, pin_memory=pin_memory,
                                         wait_time=0.002)
    it_val = NonDetMultiThreadedAugmenter(data_loader=dl_val, transform=None, num_processes=max(1, n // 2),
                                          num_cached=max(3, n // 4), seeds=None, pin_memory=pin_memory,
                                          wait_time=0.002)
    return it_tr, it_val
