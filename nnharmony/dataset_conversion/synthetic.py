"""Built-in multi-domain data: small synthetic abdominal phantoms in nnU-Net raw format.

``make_synthetic_collection`` writes ``num_members`` datasets (``Dataset901_SynthCT``, ``Dataset902_SynthMRI``,
``Dataset903_SynthMultiMR``, ...) that reproduce what makes real collections hard:

=====  ===============  ===========  ================  =====================================  ==========================
 id     name             channels     spacing z,y,x mm  intensities                            labels (value order)
=====  ===============  ===========  ================  =====================================  ==========================
 901    SynthCT          CT           1 x 1 x 1         Hounsfield units (-1000 air .. 400     liver, spleen, kidney
                                                        bone), int16, Gaussian noise
 902    SynthMRI         T1           3 x 1 x 1         arbitrary units, random gain, bias     liver, kidney, lesion
                                      (thick slices)    field, Rician noise, float32
 903    SynthMultiMR     T1, T2       1.2 isotropic     two co-registered MR contrasts         spleen, lesion
 904    SynthCTLowDose   CT           2 x 0.8 x 0.8     HU, strong noise                       liver, spleen, kidney,
                                                                                               lesion
 905    SynthT2          T2           1.5 isotropic     arbitrary units, bias field            liver, spleen
=====  ===============  ===========  ================  =====================================  ==========================

Further members repeat these templates with a number appended to the name (``SynthCT2``) and their own random
stream. Label sets overlap partly: liver, spleen, kidney and lesion each appear in at least two members under the
same name, so a collection merges them into one global task while each member annotates only a subset (partial
labels). Lesions are inside the liver; members that annotate the liver but not lesions count lesion voxels as
liver (as organ datasets do); members that annotate neither leave them background.

Anatomy (per case, deterministic in ``(seed, member index, case index)`` only, so case 3 is the same whatever
``num_cases`` is): an elliptic body with a subcutaneous fat layer, spine with vertebrae and discs, aorta, two
bean-shaped kidneys in perirenal fat (one touching the liver), spleen, a wedge-shaped liver and 1-3 lesions of
varying size inside it; organ sizes, positions and orientations vary, organ surfaces wobble and the whole
phantom is smoothly deformed. Partial volume: analytic fractional occupancy at the voxel edge (and sub-slice
rendering averaged over thick slices); labels take the tissue with the largest volume fraction in each voxel.
Then a point-spread blur, noise and (MR) a multiplicative bias field and random gain. The field of view is
``shape`` x 1 mm for every member, so the anatomy has the same physical size and the voxel grids differ (901:
48^3 voxels; 902: 16 x 48 x 48; 903: 40^3 for the default shape), with a +-8 % per-case jitter of the grid size.

``QUICK_MEMBERS`` is the collection of ``nnharmony_benchmark --quick`` (``nnharmony_make_synthetic --preset quick``):
CT (liver, spleen, kidney), thick-slice T1 MRI (liver, kidney) and a T2 member with only 3 training cases that
shares the liver and spleen with the CT member -- the case where training one model on all members may help (or
not). Its members carry their own fold-0 split (:class:`SyntheticMember`, :func:`synthetic_splits`), because
nnU-Net's 5-fold split needs at least 5 cases and keeps 80 % of them for training.

Each dataset is written into a hidden staging folder, validated and renamed into place (see
:class:`nnharmony.dataset_conversion.convert.DatasetStager`). An existing dataset generated with the same
parameters is reused; a different one is refused unless ``overwrite=True``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnharmony.data.collection import CollectionError

GENERATOR_VERSION = 2

TISSUES = ("air", "fat", "soft", "disc", "bone", "blood", "kidney", "spleen", "liver", "lesion")

# mean intensity of every tissue per modality (CT in HU; MR in relative units, scaled by a random gain)
TISSUE_MEANS: dict[str, dict[str, float]] = {
    "CT": {"air": -1000, "fat": -100, "soft": 35, "disc": 80, "bone": 400, "blood": 160, "kidney": 150,
           "spleen": 105, "liver": 85, "lesion": 45},
    "T1": {"air": 0.0, "fat": 1.0, "soft": 0.42, "disc": 0.35, "bone": 0.75, "blood": 0.08, "kidney": 0.48,
           "spleen": 0.36, "liver": 0.6, "lesion": 0.27},
    "T2": {"air": 0.0, "fat": 0.75, "soft": 0.45, "disc": 0.85, "bone": 0.5, "blood": 0.15, "kidney": 0.72,
           "spleen": 0.7, "liver": 0.3, "lesion": 0.95},
}


@dataclass(frozen=True)
class MemberTemplate:
    name: str
    channels: tuple[str, ...]
    spacing: tuple[float, float, float]  # z, y, x (mm)
    labels: tuple[str, ...]  # structure names, label values 1..N in this order
    noise: float  # CT: HU standard deviation; MR: fraction of the gain
    bias: float = 0.0  # MR bias field strength (std of the log-field coefficients)
    flip_xy: bool = False  # direction diag(-1, -1, 1) instead of identity
    description: str = ""
    case_prefix: str = field(default="")


TEMPLATES: tuple[MemberTemplate, ...] = (
    MemberTemplate("SynthCT", ("CT",), (1.0, 1.0, 1.0), ("liver", "spleen", "kidney"), noise=15.0,
                   description="synthetic contrast-enhanced abdominal CT, Hounsfield units, 1 mm isotropic"),
    MemberTemplate("SynthMRI", ("T1",), (3.0, 1.0, 1.0), ("liver", "kidney", "lesion"), noise=0.03, bias=0.25,
                   flip_xy=True, description="synthetic T1 MRI, thick slices (3 mm), bias field, arbitrary units"),
    MemberTemplate("SynthMultiMR", ("T1", "T2"), (1.2, 1.2, 1.2), ("spleen", "lesion"), noise=0.03, bias=0.2,
                   description="synthetic co-registered T1 + T2 MRI, 1.2 mm isotropic"),
    MemberTemplate("SynthCTLowDose", ("CT",), (2.0, 0.8, 0.8), ("liver", "spleen", "kidney", "lesion"), noise=40.0,
                   description="synthetic low-dose CT, 0.8 mm in-plane, 2 mm slices, strong noise"),
    MemberTemplate("SynthT2", ("T2",), (1.5, 1.5, 1.5), ("liver", "spleen"), noise=0.04, bias=0.3, flip_xy=True,
                   description="synthetic T2 MRI, 1.5 mm isotropic, strong bias field"),
)


@dataclass(frozen=True)
class SyntheticMember:
    """A member of a preset collection: its template and the size of its fold 0 (the first ``num_training``
    cases train, the next ``num_validation`` validate), so a member can have very few training cases."""

    template: MemberTemplate
    num_training: int
    num_validation: int

    @property
    def num_cases(self) -> int:
        return self.num_training + self.num_validation


#: ``nnharmony_benchmark --quick``: two members with enough cases, and a few-shot member in its own modality (T2)
#: whose structures (liver, spleen) the CT member also annotates. Small structures (lesions) are left out: at the
#: quick preset's 2D resolution they are a few pixels wide and would not be learnt in minutes on a CPU.
QUICK_MEMBERS: tuple[SyntheticMember, ...] = (
    SyntheticMember(TEMPLATES[0], num_training=8, num_validation=4),
    SyntheticMember(MemberTemplate("SynthT1", ("T1",), (3.0, 1.0, 1.0), ("liver", "kidney"), noise=0.03, bias=0.25,
                                   flip_xy=True, description="synthetic T1 MRI, thick slices (3 mm), bias field, "
                                                             "arbitrary units"),
                    num_training=8, num_validation=4),
    SyntheticMember(MemberTemplate("SynthT2Few", ("T2",), (1.5, 1.5, 1.5), ("liver", "spleen"), noise=0.04, bias=0.3,
                                   flip_xy=True, description="synthetic T2 MRI with only 3 training cases, 1.5 mm "
                                                             "isotropic, strong bias field"),
                    num_training=3, num_validation=5),
)

#: member presets by name (``nnharmony_make_synthetic --preset NAME``)
MEMBER_PRESETS: dict[str, tuple[SyntheticMember, ...]] = {"quick": QUICK_MEMBERS}


def member_template(index: int) -> MemberTemplate:
    """Template of the ``index``-th member (0-based); templates repeat with a number appended to the name."""
    t = TEMPLATES[index % len(TEMPLATES)]
    rep = index // len(TEMPLATES)
    if rep:
        t = MemberTemplate(**{**t.__dict__, "name": f"{t.name}{rep + 1}"})
    return t


# ---------------------------------------------------------------------------------------------- shapes
def _smooth_field(rng: np.random.Generator, x, y, z, amplitude: float, wavelengths=(12.0, 40.0), terms: int = 4):
    """Smooth random scalar field of about the given amplitude (mm): a sum of separable products of cosines on
    the broadcastable axis vectors ``x`` (1, 1, X), ``y`` (1, Y, 1), ``z`` (Z, 1, 1)."""
    out = None
    for _ in range(terms):
        lam = rng.uniform(*wavelengths, size=3)
        ph = rng.uniform(0, 2 * np.pi, size=3)
        t = (np.cos(2 * np.pi * z / lam[0] + ph[0]) * np.cos(2 * np.pi * y / lam[1] + ph[1])) \
            * np.cos(2 * np.pi * x / lam[2] + ph[2])
        out = t if out is None else out + t
    return (out * np.float32(2 * amplitude / np.sqrt(terms))).astype(np.float32, copy=False)


def _occupancy(d: np.ndarray, w: float) -> np.ndarray:
    """Fraction of a voxel of edge ``w`` inside a surface at signed distance ``d`` (negative inside)."""
    return np.clip(0.5 - d / w, 0.0, 1.0).astype(np.float32)


def _ellipsoid_distance(X, Y, Z, c, r, angle: float = 0.0):
    """Approximate signed distance (mm) to an ellipsoid rotated by ``angle`` about z; ``r[2] = inf``: cylinder."""
    dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    if np.isinf(r[2]):
        q2 = (u / r[0]) ** 2 + (v / r[1]) ** 2
        g = 2 * np.sqrt((u / r[0] ** 2) ** 2 + (v / r[1] ** 2) ** 2)
    else:
        q2 = (u / r[0]) ** 2 + (v / r[1]) ** 2 + (dz / r[2]) ** 2
        g = 2 * np.sqrt((u / r[0] ** 2) ** 2 + (v / r[1] ** 2) ** 2 + (dz / r[2] ** 2) ** 2)
    return (q2 - 1) / (g + 1e-6)


@dataclass
class _Object:
    tissue: str
    structure: str | None  # "liver", "kidney", ... or None (unlabelled tissue)
    occ: np.ndarray


def _phantom_objects(rng: np.random.Generator, x, y, z, half: tuple[float, float, float], w: float) -> list[_Object]:
    """Objects in painting order (later ones cover earlier ones); ``x, y, z``: broadcastable axis vectors (mm)."""
    hz, hy, hx = half
    # smooth global deformation
    amp = 0.05 * hx
    wl = (1.2 * hx, 3.5 * hx)
    X = x + _smooth_field(rng, x, y, z, amp, wl, 3)
    Y = y + _smooth_field(rng, x, y, z, amp, wl, 3)
    Z = z + _smooth_field(rng, x, y, z, amp, wl, 3)
    objs: list[_Object] = []
    inf = np.inf

    def wobble(a):
        return _smooth_field(rng, x, y, z, a, (0.4 * hx, 1.5 * hx), 4)

    brx, bry = 0.92 * hx * rng.uniform(0.9, 1.0), 0.75 * hy * rng.uniform(0.9, 1.0)
    body_d = _ellipsoid_distance(X, Y, Z, (0, 0, 0), (brx, bry, inf)) - wobble(0.02 * hx)
    objs.append(_Object("fat", None, _occupancy(body_d, w)))
    fat_t = rng.uniform(0.05, 0.12) * hx
    objs.append(_Object("soft", None, _occupancy(body_d + fat_t, w)))
    # spine: discs everywhere in the column, vertebral bodies in slabs
    sc = (rng.normal(0, 0.03) * hx, 0.5 * hy, 0)
    sr = 0.13 * hx * rng.uniform(0.9, 1.1)
    spine = _occupancy(_ellipsoid_distance(X, Y, Z, sc, (sr, 0.9 * sr, inf)), w)
    objs.append(_Object("disc", None, spine))
    period = rng.uniform(0.35, 0.5) * hz
    phase = rng.uniform(0, period)
    slab = np.abs(((Z - phase) % period) - period / 2) - 0.38 * period  # negative inside a vertebra
    objs.append(_Object("bone", None, spine * _occupancy(slab, w)))
    # aorta
    ac = (0.14 * hx + rng.normal(0, 0.02) * hx, 0.27 * hy, 0)
    ar = 0.065 * hx * rng.uniform(0.85, 1.15)
    objs.append(_Object("blood", None, _occupancy(_ellipsoid_distance(X, Y, Z, ac, (ar, ar, inf)), w)))
    # kidneys (bean: ellipsoid minus a hilum sphere), right one (x < 0) high enough to touch the liver
    for side in (-1, 1):
        s = rng.uniform(0.8, 1.2)
        c = (side * 0.38 * hx * rng.uniform(0.95, 1.05), 0.36 * hy * rng.uniform(0.9, 1.1),
             (-0.2 if side < 0 else -0.3) * hz + rng.normal(0, 0.05) * hz)
        r = (0.15 * hx * s, 0.13 * hy * s, 0.32 * hz * s)
        ang = side * rng.uniform(0.1, 0.45)
        kd = _ellipsoid_distance(X, Y, Z, c, r, ang) - wobble(0.03 * hx)
        hil_c = (c[0] - side * 0.75 * r[0] * np.cos(ang), c[1] - 0.75 * r[0] * np.sin(abs(ang)), c[2])
        hil = _occupancy(_ellipsoid_distance(X, Y, Z, hil_c, (0.45 * r[0],) * 2 + (0.5 * r[2],)), w)
        # perirenal fat: the rim that outlines a kidney on T1 MRI, where kidney and muscle have similar signal
        objs.append(_Object("fat", None, _occupancy(kd - rng.uniform(0.04, 0.07) * hx, w)))
        objs.append(_Object("kidney", "kidney", _occupancy(kd, w) * (1 - hil)))
    # spleen
    s = rng.uniform(0.7, 1.3)
    c = (0.55 * hx, 0.18 * hy * rng.uniform(0.7, 1.3), 0.25 * hz + rng.normal(0, 0.05) * hz)
    spd = _ellipsoid_distance(X, Y, Z, c, (0.17 * hx * s, 0.3 * hy * s, 0.34 * hz * s), rng.uniform(0.3, 0.8))
    objs.append(_Object("spleen", "spleen", _occupancy(spd - wobble(0.03 * hx), w)))
    # liver: big ellipsoid cut by a tilted plane (wedge towards the patient's left)
    s = rng.uniform(0.85, 1.15)
    c = (-0.3 * hx, -0.02 * hy, 0.18 * hz + rng.normal(0, 0.04) * hz)
    ld = _ellipsoid_distance(X, Y, Z, c, (0.5 * hx * s, 0.52 * hy * s, 0.45 * hz * s), rng.normal(0, 0.1))
    theta = rng.uniform(-0.5, -0.2)
    plane = (X - 0.12 * hx) * np.cos(theta) + (Y + 0.1 * hy) * np.sin(theta)
    liver = np.minimum(_occupancy(ld - wobble(0.04 * hx), w), _occupancy(plane, w))
    objs.append(_Object("liver", "liver", liver))
    # lesions inside the liver
    inside = np.argwhere(liver >= 0.999)
    for _ in range(int(rng.integers(1, 4))):
        if len(inside) == 0:
            break
        p = inside[rng.integers(len(inside))]
        c = (X[tuple(p)], Y[tuple(p)], Z[tuple(p)])
        r = rng.uniform(0.05, 0.13) * hx
        rr = (r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2))
        objs.append(_Object("lesion", "lesion", _occupancy(_ellipsoid_distance(X, Y, Z, c, rr, rng.uniform(0, 3)), w)))
    return objs


def _label_of(structure: str | None, labels: Sequence[str]) -> int:
    if structure is None:
        return 0
    if structure in labels:
        return labels.index(structure) + 1
    if structure == "lesion" and "liver" in labels:
        return labels.index("liver") + 1
    return 0


def make_synthetic_case(template: MemberTemplate, shape: Sequence[int], rng: np.random.Generator
                        ) -> tuple[list[np.ndarray], np.ndarray, tuple[float, float, float]]:
    """One case: (images per channel [z, y, x], label map [z, y, x] uint8, spacing z, y, x)."""
    fov = np.asarray(shape, dtype=float)  # mm (shape at 1 mm)
    spacing = np.asarray(template.spacing, dtype=float)
    n = np.maximum(4, np.round(fov / spacing * rng.uniform(0.92, 1.08, size=3))).astype(int)
    inplane = float(min(spacing[1], spacing[2]))
    ss = max(1, int(round(spacing[0] / inplane))) if spacing[0] > 1.5 * inplane else 1
    rz = n[0] * ss
    half = (n[0] * spacing[0] / 2, n[1] * spacing[1] / 2, n[2] * spacing[2] / 2)
    z = (np.arange(rz) + 0.5) * (spacing[0] / ss) - half[0]
    y = (np.arange(n[1]) + 0.5) * spacing[1] - half[1]
    x = (np.arange(n[2]) + 0.5) * spacing[2] - half[2]
    z, y, x = (z.astype(np.float32)[:, None, None], y.astype(np.float32)[None, :, None],
               x.astype(np.float32)[None, None, :])
    w = float(min(inplane, spacing[0] / ss))
    objs = _phantom_objects(rng, x, y, z, half, w)
    grid = (rz, int(n[1]), int(n[2]))

    # composite: weight of each object = its occupancy times what later objects leave uncovered
    rem = np.ones(grid, dtype=np.float32)
    weights = []
    for o in reversed(objs):
        weights.append(o.occ * rem)
        rem = rem * (1 - o.occ)
    weights.reverse()
    air = rem

    ct = template.channels[0] == "CT"
    texture = ndimage.gaussian_filter(rng.normal(size=grid).astype(np.float32), sigma=(2 * ss, 2, 2))
    texture /= texture.std() + 1e-6
    images = []
    for ch in template.channels:
        means = dict(TISSUE_MEANS[ch])
        for k in means:
            if k != "air":
                means[k] = means[k] + rng.normal(0, 8) if ch == "CT" else means[k] * (1 + rng.normal(0, 0.05))
        img = air * means["air"]
        for o, wt in zip(objs, weights):
            mu = means[o.tissue]
            if o.tissue in ("soft", "liver", "spleen"):
                mu = mu + (0.12 if o.tissue == "soft" else 0.04) * texture * (abs(mu) if ch != "CT" else 60.0)
            img = img + wt * mu
        if ss > 1:
            img = img.reshape(n[0], ss, n[1], n[2]).mean(axis=1)
        images.append(ndimage.gaussian_filter(img, sigma=0.5).astype(np.float32))

    # labels: the label class with the largest volume fraction in each (output) voxel
    nl = len(template.labels)
    cls = np.zeros((nl + 1,) + grid, dtype=np.float32)
    cls[0] = air
    for o, wt in zip(objs, weights):
        cls[_label_of(o.structure, template.labels)] += wt
    if ss > 1:
        cls = cls.reshape(nl + 1, n[0], ss, n[1], n[2]).mean(axis=2)
    label = np.argmax(cls, axis=0).astype(np.uint8)

    # acquisition: noise, bias field, gain
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, k, dtype=np.float32) for k in n), indexing="ij")
    if ct:
        out = [np.clip(np.round(im + rng.normal(0, template.noise, im.shape)), -1024, 3071).astype(np.int16)
               for im in images]
    else:
        c = rng.normal(0, template.bias, size=6)
        bias = np.exp(c[0] * xx + c[1] * yy + c[2] * zz + c[3] * xx * yy + c[4] * (xx ** 2 - 0.33) + c[5] * yy * zz)
        out = []
        for im in images:
            gain = float(np.exp(rng.uniform(np.log(200), np.log(2000))))
            sig = im * bias * gain
            sd = template.noise * gain
            n1, n2 = rng.normal(0, sd, im.shape), rng.normal(0, sd, im.shape)
            out.append(np.sqrt((sig + n1) ** 2 + n2 ** 2).astype(np.float32))
    return out, label, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


# ---------------------------------------------------------------------------------------------- writing
def _case_rng(seed: int, member: int, case: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(member), int(case), GENERATOR_VERSION]))


def _write_case(folder: Path, case_id: str, images, label, spacing_zyx, flip_xy: bool) -> None:
    sp = (spacing_zyx[2], spacing_zyx[1], spacing_zyx[0])
    size = np.array(label.shape[::-1]) * np.array(sp)
    direction = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0) if flip_xy else (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    origin = tuple(float(v) for v in (size / 2 * np.array([1 if flip_xy else -1] * 2 + [-1])))

    def to_itk(a):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing(sp)
        im.SetOrigin(origin)
        im.SetDirection(direction)
        return im

    for c, a in enumerate(images):
        sitk.WriteImage(to_itk(a), str(folder / "imagesTr" / f"{case_id}_{c:04d}.nii.gz"), useCompression=True)
    sitk.WriteImage(to_itk(label), str(folder / "labelsTr" / f"{case_id}.nii.gz"), useCompression=True)


def _case_ids(template: MemberTemplate, num_cases: int) -> list[str]:
    prefix = template.case_prefix or template.name.lower()
    return [f"{prefix}_{i:03d}" for i in range(num_cases)]


def _fingerprint(template: MemberTemplate, index: int, seed: int, num_cases: int, shape,
                 num_training: int | None = None) -> dict[str, Any]:
    fp = {"generator_version": GENERATOR_VERSION, "template": template.name, "member_index": index,
          "seed": int(seed), "num_cases": int(num_cases), "shape": [int(s) for s in shape]}
    if num_training is not None:  # a preset member: its labels and fold-0 split are part of what was made
        fp.update(labels=list(template.labels), num_training=int(num_training),
                  training_cases=_case_ids(template, num_cases)[:num_training])
    return fp


def synthetic_splits(folder: str | os.PathLike) -> list[dict[str, list[str]]] | None:
    """nnU-Net ``splits_final.json`` content (fold 0 only) of a preset member (:class:`SyntheticMember`) made by
    :func:`make_synthetic_collection`; None for other datasets, which keep nnU-Net's own 5-fold split."""
    try:
        fp = json.loads((Path(folder) / "dataset.json").read_text()).get("nnharmony_synthetic") or {}
    except (OSError, ValueError):
        return None
    if "training_cases" not in fp:
        return None
    train = list(fp["training_cases"])
    every = sorted(p.name[: -len(".nii.gz")] for p in (Path(folder) / "labelsTr").glob("*.nii.gz"))
    return [{"train": train, "val": [c for c in every if c not in train]}]


def make_synthetic_collection(
    out_root: str | os.PathLike | None = None,
    first_id: int = 901,
    num_cases: int = 10,
    shape: Sequence[int] = (48, 48, 48),
    seed: int = 0,
    num_members: int = 3,
    overwrite: bool = False,
    verbose: bool = False,
    members: Sequence[SyntheticMember] | None = None,
) -> list[Path]:
    """Write ``num_members`` synthetic datasets ``Dataset{first_id + k}_...`` into ``out_root`` (default
    ``$nnUNet_raw``); returns their folders. ``shape`` (z, y, x) is the field of view in mm (= voxels of the 1 mm
    member). Deterministic in ``seed``. An existing dataset made with the same parameters is kept as is.
    ``members`` (e.g. ``QUICK_MEMBERS``) replaces ``num_members``/``num_cases``: each member's template and fold-0
    split (see :func:`synthetic_splits`)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    from nnharmony.dataset_conversion.convert import DatasetStager, dataset_folder_name

    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise CollectionError(f"synthetic shape must be three sizes >= 8 (z y x), got {shape}")
    if members is not None:
        plan = [(m.template, m.num_cases, m.num_training) for m in members]
        if not plan or any(m.num_training < 1 or m.num_validation < 1 for m in members):
            raise CollectionError("every preset member needs at least one training and one validation case")
    elif num_cases < 1 or num_members < 1:
        raise CollectionError(f"need at least one case and one member (got {num_cases} cases, {num_members} members)")
    else:
        plan = [(member_template(k), num_cases, None) for k in range(num_members)]
    out: list[Path] = []
    for k, (t, num_cases, num_training) in enumerate(plan):
        did = first_id + k
        fp = _fingerprint(t, k, seed, num_cases, shape, num_training)
        with DatasetStager(out_root, overwrite=True) as st:
            existing = st.existing(did)
            target = st.raw_root / dataset_folder_name(did, t.name)
            if existing == [target] and _same_synthetic(target, fp):
                out.append(target)
                if verbose:
                    print(f"{target.name}: up to date")
                continue
            if existing and not overwrite:
                raise CollectionError(
                    f"dataset id {did} is already taken by {', '.join(e.name for e in existing)} in {st.raw_root} "
                    f"(not this synthetic member with these parameters); pass overwrite=True (--overwrite) to "
                    f"replace it or choose another --first-id"
                )
            staging = st.add(did, t.name)
            (staging / "imagesTr").mkdir()
            (staging / "labelsTr").mkdir()
            for i, case_id in enumerate(_case_ids(t, num_cases)):
                images, label, spacing = make_synthetic_case(t, shape, _case_rng(seed, k, i))
                _write_case(staging, case_id, images, label, spacing, t.flip_xy)
            generate_dataset_json(
                str(staging),
                channel_names={i: c for i, c in enumerate(t.channels)},
                labels={"background": 0, **{n: i + 1 for i, n in enumerate(t.labels)}},
                num_training_cases=num_cases,
                file_ending=".nii.gz",
                dataset_name=t.name,
                description=t.description,
                license="CC0 (synthetic data generated by nnharmony)",
                converted_by="nnharmony_make_synthetic",
                nnharmony_synthetic=fp,
            )
            out.append(st.commit(validate=True, check_images=False)[0])
            if verbose:
                print(f"{out[-1].name}: {num_cases} cases written")
    return out


def _same_synthetic(folder: Path, fp: dict[str, Any]) -> bool:
    try:
        dj = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    if dj.get("nnharmony_synthetic") != fp:
        return False
    n = fp["num_cases"]
    return len([p for p in (folder / "labelsTr").glob("*.nii.gz")]) == n
