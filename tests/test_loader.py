"""Mixed-dataset loader on two tiny datasets planned and preprocessed by nnU-Net itself.

Dataset901_MixA: 1 channel (CT), labels {background, a, b}; Dataset902_MixB: 2 channels (T1, T2), labels
{background, b, c}. Collection: modalities [CT, T1, T2], global tasks [a, b, c].
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from nnharmony.data.collection import build_collection_spec
from nnharmony.data.loader import build_mixed_dataloaders
from nnharmony.data.splits import collection_fold

PATCH = [16, 16, 16]
DS_SCALES = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
N_CASES = 5  # nnU-Net's 5-fold split needs at least 5 cases

# nnU-Net's own fingerprinting, planning and preprocessing, in a subprocess because nnunetv2.paths reads the
# environment at import time. Two changes for speed only: worker pools fork instead of spawn (no re-import of
# nnunetv2 per pool) and the fingerprint samples 10k instead of 1e8 foreground voxels for intensity statistics.
PREPROCESS = textwrap.dedent("""
    import multiprocessing
    _get_context = multiprocessing.get_context
    multiprocessing.get_context = lambda method=None: _get_context("fork" if method == "spawn" else method)
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiments, preprocess)

    class FastFingerprintExtractor(DatasetFingerprintExtractor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = 10000

    for d in (901, 902):
        extract_fingerprint_dataset(d, FastFingerprintExtractor, num_processes=1, check_dataset_integrity=False,
                                    verbose=False, show_progress_bar=False)
    plan_experiments([901, 902])
    preprocess([901, 902], configurations=["3d_fullres"], num_processes=[1], show_progress_bar=False)
""")


def _write_datasets(raw: str) -> None:
    import SimpleITK as sitk
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    rng = np.random.default_rng(0)
    shape = (24, 24, 24)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for did, name, channels, labels in [(901, "MixA", ["CT"], {"background": 0, "a": 1, "b": 2}),
                                        (902, "MixB", ["T1", "T2"], {"background": 0, "b": 1, "c": 2})]:
        folder = os.path.join(raw, f"Dataset{did}_{name}")
        os.makedirs(os.path.join(folder, "imagesTr"))
        os.makedirs(os.path.join(folder, "labelsTr"))
        for c in range(N_CASES):
            seg = np.zeros(shape, np.uint8)
            for value in (1, 2):
                centre, r = rng.integers(6, 18, 3), rng.integers(3, 5)
                seg[(zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= r * r] = value
            case = f"{name.lower()}_{c:03d}"
            for ch in range(len(channels)):
                # label 2 is brighter than label 1 in every channel: lets the test check the task mapping
                img = rng.normal(0, 10, shape) + 100 * (seg == 1) + 200 * (seg == 2) + 50 * ch
                sitk.WriteImage(sitk.GetImageFromArray(img.astype(np.float32)),
                                os.path.join(folder, "imagesTr", f"{case}_{ch:04d}.nii.gz"))
            sitk.WriteImage(sitk.GetImageFromArray(seg), os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
        generate_dataset_json(folder, {str(i): c for i, c in enumerate(channels)}, labels, N_CASES, ".nii.gz",
                              dataset_name=f"Dataset{did}_{name}")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed_loader")
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results")}
    for v in env.values():
        os.makedirs(v)
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    mp.setenv("nnUNet_n_proc_DA", "0")  # (nnU-Net's planner needs >= 1: the subprocess gets 1)
    try:
        _write_datasets(env["nnUNet_raw"])
        r = subprocess.run([sys.executable, "-c", PREPROCESS], env={**os.environ, **env, "nnUNet_n_proc_DA": "1"}, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        spec = build_collection_spec("Collection990_Mix", [901, 902], sampling={"scheme": "uniform"})
        member_plans = {
            str(m.dataset_id): {"plans_identifier": "nnUNetPlans",
                                "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres"}}}
            for m in spec.members
        }
        plans = {"dataset_name": spec.name, "plans_name": "nnHarmonyPlans",
                 "configurations": {"3d_fullres": {"patch_size": PATCH, "batch_size": 2}},
                 "nnharmony": {"collection": spec.name, "member_plans_identifier": "nnUNetPlans",
                               "member_plans": member_plans}}
        yield spec, plans
    finally:
        mp.undo()


def build(collection, **kwargs):
    spec, plans = collection
    spec = kwargs.pop("spec", spec)
    args = dict(fold=0, batch_size=2, deep_supervision_scales=DS_SCALES, seed=0, num_processes=0)
    args.update(kwargs)
    return build_mixed_dataloaders(spec, plans, "3d_fullres", args.pop("fold"), args.pop("batch_size"),
                                   args.pop("deep_supervision_scales"), **args)


def check_batch(spec, batch, batch_size=2, ds=True, patch=PATCH):
    m_, t_ = spec.num_modalities, spec.num_tasks
    assert set(batch) == {"data", "channel_mask", "target", "task_mask", "dataset_id", "domain_id", "modality_id",
                          "keys"}
    data = batch["data"]
    assert data.dtype == torch.float32 and tuple(data.shape) == (batch_size, m_, *patch)
    for k in ("channel_mask", "task_mask"):
        assert batch[k].dtype == torch.bool
    assert tuple(batch["channel_mask"].shape) == (batch_size, m_)
    assert tuple(batch["task_mask"].shape) == (batch_size, t_)
    for k in ("dataset_id", "domain_id", "modality_id"):
        assert batch[k].dtype == torch.long and tuple(batch[k].shape) == (batch_size,)
    targets = batch["target"]
    if ds:
        assert isinstance(targets, list) and len(targets) == len(DS_SCALES)
        for t, s in zip(targets, DS_SCALES):
            assert tuple(t.shape) == (batch_size, t_, *[round(p * f) for p, f in zip(patch, s)])
    else:
        assert torch.is_tensor(targets)
        targets = [targets]
        assert tuple(targets[0].shape) == (batch_size, t_, *patch)
    assert isinstance(batch["keys"], list) and len(batch["keys"]) == batch_size
    for j in range(batch_size):
        i = int(batch["dataset_id"][j])
        m = spec.members[i]
        assert batch["keys"][j].startswith(m.dataset_name + "/")
        assert int(batch["domain_id"][j]) == spec.domain_index(m.dataset_id)
        assert int(batch["modality_id"][j]) == spec.primary_modality(m.dataset_id)
        slots = spec.channel_slots(m.dataset_id)
        cmask = torch.zeros(m_, dtype=torch.bool)
        cmask[slots] = True
        assert torch.equal(batch["channel_mask"][j], cmask)
        assert torch.all(data[j][~cmask] == 0), "absent modalities must be zero"
        assert all(data[j][s].abs().sum() > 0 for s in slots)
        tmask = torch.zeros(t_, dtype=torch.bool)
        tmask[spec.task_ids(m.dataset_id)] = True
        assert torch.equal(batch["task_mask"][j], tmask)
        for t in targets:
            assert t.dtype == torch.float32
            assert torch.all((t == 0) | (t == 1))
            assert torch.all(t[j][~tmask] == 0), "unannotated tasks must have all-zero targets"
            # the members' labels do not overlap: at most one task per voxel
            assert torch.all(t[j].sum(0) <= 1)


def test_splits_are_nnunet_splits(collection):
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnharmony.paths import preprocessed_dir

    spec, _ = collection
    fold0 = collection_fold(spec, 0, "3d_fullres")
    for i, m in enumerate(spec.members):
        f = preprocessed_dir() / m.dataset_name / "splits_final.json"
        assert f.is_file()
        ids = sorted(f"{m.dataset_name[len('Dataset901_'):].lower()}_{c:03d}" for c in range(N_CASES))
        expected = generate_crossval_split(ids, seed=12345, n_splits=5)
        assert fold0[i] == (list(expected[0]["train"]), list(expected[0]["val"]))
        vals = [v for k in range(5) for v in collection_fold(spec, k)[i][1]]
        assert sorted(vals) == ids
        assert collection_fold(spec, "all")[i] == (ids, ids)
        tr, val = collection_fold(spec, 7)[i]  # beyond the split file: nnU-Net's seeded 80:20 split
        assert len(tr) == 4 and len(val) == 1 and not set(tr) & set(val)


def test_batch_contract_with_deep_supervision(collection):
    spec, _ = collection
    tr, val = build(collection, seed=3)
    seen = set()
    for _ in range(8):
        b = next(tr)
        check_batch(spec, b)
        seen.update(int(i) for i in b["dataset_id"])
    assert seen == {0, 1}
    check_batch(spec, next(val))


def test_batch_contract_without_deep_supervision_and_task_mapping(collection):
    spec, _ = collection
    _, val = build(collection, deep_supervision_scales=None, oversample_foreground_percent=1.0, seed=5)
    # validation patches are not augmented: brighter voxels belong to the member's label 2. Label 2 is task 'b'
    # in Dataset901_MixA (labels a=1, b=2) and task 'c' in Dataset902_MixB (labels b=1, c=2).
    brighter = {0: (spec.tasks.index("a"), spec.tasks.index("b")), 1: (spec.tasks.index("b"), spec.tasks.index("c"))}
    checked = set()
    for _ in range(12):
        b = next(val)
        check_batch(spec, b, ds=False)
        for j in range(2):
            i = int(b["dataset_id"][j])
            t = b["target"][j]
            assert t.sum() > 0, "oversample_foreground_percent=1 must give foreground in every patch"
            lo, hi = brighter[i]
            if t[lo].sum() > 0 and t[hi].sum() > 0:
                img = b["data"][j][spec.channel_slots(spec.members[i].dataset_id)[0]]
                assert img[t[hi].bool()].mean() > img[t[lo].bool()].mean()
                checked.add(i)
    assert checked == {0, 1}


def test_reproducible_and_rank_dependent(collection):
    outer = np.random.get_state()[1].copy(), torch.get_rng_state().clone()

    def batches(**kw):
        tr, _ = build(collection, deep_supervision_scales=None, **kw)
        return [next(tr) for _ in range(4)]

    a, b = batches(seed=11), batches(seed=11)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        assert torch.equal(x["data"], y["data"]) and torch.equal(x["target"], y["target"])
    # the caller's global random generators are neither used nor changed by the loader
    assert np.array_equal(np.random.get_state()[1], outer[0]) and torch.equal(torch.get_rng_state(), outer[1])

    def differs(c):
        return any(x["keys"] != y["keys"] or not torch.equal(x["data"], y["data"]) for x, y in zip(a, c))

    assert differs(batches(seed=12))
    assert differs(batches(seed=11, rank=1, world_size=2))


def test_member_frequencies_follow_scheme(collection):
    spec, _ = collection
    spec = copy.deepcopy(spec)
    spec.sampling = {"scheme": "explicit"}
    spec.members[0].weight, spec.members[1].weight = 3.0, 1.0
    _, val = build(collection, spec=spec, deep_supervision_scales=None, batch_size=4, seed=2)
    ids = np.concatenate([next(val)["dataset_id"].numpy() for _ in range(100)])
    n, p = ids.size, 0.75
    assert abs((ids == 0).sum() - n * p) <= 4 * np.sqrt(n * p * (1 - p))


def test_two_worker_processes(collection, monkeypatch):
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

    spec, _ = collection
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    tr, val = build(collection, num_processes=None, seed=4)
    try:
        assert isinstance(tr, NonDetMultiThreadedAugmenter) and tr.num_processes == 2
        assert isinstance(val, NonDetMultiThreadedAugmenter) and val.num_processes == 1
        batches = [next(tr) for _ in range(6)]
        for b in batches:
            check_batch(spec, b)
        check_batch(spec, next(val))
        # the two workers draw different samples (not two copies of one random stream)
        datas = [b["data"] for b in batches]
        assert all(not torch.equal(datas[i], datas[j]) for i in range(6) for j in range(i + 1, 6))
    finally:
        tr._finish()
        val._finish()
