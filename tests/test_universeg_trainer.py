"""UniverSeg: episode sampler (held-out members, task mixing), episode shapes 2D/3D, support folders and their
errors, and the whole path on CPU: train with a held-out member -> predict it from a support folder -> evaluate."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnharmony.data.collection import CollectionError, CollectionSpec
from nnharmony.data.episodes import (EpisodeConfig, EpisodeSampler, InTaskAugmentation, build_episode_dataloaders,
                                     normalize_image, resolve_holdout)
from nnharmony.inference import support as sup

HOLDOUT = 902  # SynthMRI: single-channel, so its raw cases can serve as support and input
TINY = {"image_size": 32, "encoder_blocks": [8, 8, 8], "support_size": 2, "episode_batch_size": 2,
        "num_workers": 0, "validation_max_cases": 1}
QUICK = ["-device", "cpu", "--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations-per-epoch", "1"]


def toy_spec(n_members: int = 4) -> CollectionSpec:
    names = ["liver", "spleen", "kidney", "lesion"]
    members = []
    for i in range(n_members):
        labels = names[i % 3: i % 3 + 2]
        label_values = {n: k + 1 for k, n in enumerate(labels)}
        members.append({"dataset_id": 901 + i, "dataset_name": f"Dataset{901 + i}_M{i}", "channels": ["CT"],
                        "num_training": 5 + 10 * i, "labels": {"background": 0, **label_values},
                        "tasks": [{"label": n, "values": [k + 1], "task": n} for k, n in enumerate(labels)]})
    return CollectionSpec.from_dict({"name": "Collection999_Toy", "modalities": ["CT"], "tasks": names,
                                     "members": members})


# ---------------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("scheme", ["uniform", "tasks", "spec", "proportional"])
def test_sampler_never_draws_held_out_members(scheme):
    spec = toy_spec()
    s = EpisodeSampler(spec, holdout=[902, "Dataset904_M3"], member_sampling=scheme, seed=3)
    drawn = Counter(t.dataset_id for _ in range(500) for t in s.draw(8))
    assert set(drawn) == {901, 903}
    assert all(t.dataset_id not in (902, 904) for t in s.tasks)
    assert np.isclose(s.task_probabilities.sum(), 1.0)


def test_sampler_mixes_tasks_and_members_within_a_batch():
    spec = toy_spec()
    s = EpisodeSampler(spec, holdout=[903], seed=0)
    batches = [s.draw(8) for _ in range(200)]
    mixed_tasks = sum(len({t.name for t in b}) > 1 for b in batches)
    mixed_members = sum(len({t.member_index for t in b}) > 1 for b in batches)
    assert mixed_tasks == 200 and mixed_members >= 190
    # hierarchical: members uniform, tasks uniform within a member
    c = Counter(t.dataset_id for b in batches for t in b)
    assert all(abs(c[d] / 1600 - 1 / 3) < 0.05 for d in (901, 902, 904))
    # reproducible
    assert [t.name for t in EpisodeSampler(spec, [903], seed=5).draw(20)] == \
        [t.name for t in EpisodeSampler(spec, [903], seed=5).draw(20)]


def test_holdout_errors():
    spec = toy_spec(2)
    with pytest.raises(CollectionError, match="held-out dataset 999 is not a member"):
        resolve_holdout(spec, [999])
    with pytest.raises(CollectionError, match="every member is held out"):
        resolve_holdout(spec, ["901", 902])
    assert resolve_holdout(spec, "902") == [1]


def test_normalize_and_in_task_augmentation():
    x = torch.randn(6, 1, 16, 16) * 100 + 40
    x[0] = 5.0  # constant image
    y = (torch.rand(6, 1, 16, 16) > 0.7).float()
    xn = normalize_image(x, 2)
    assert xn.min() >= 0 and xn.max() <= 1 and torch.all(xn[0] == 0)
    aug = InTaskAugmentation(p_rotation=1, p_scaling=1, p_translation=1, p_noise=1, p_blur=1, p_brightness=1,
                             p_contrast=1, p_gamma=1)
    g = torch.Generator().manual_seed(0)
    xa, ya = aug(xn, y, g)
    assert xa.shape == xn.shape and ya.shape == y.shape
    assert xa.min() >= 0 and xa.max() <= 1 and set(ya.unique().tolist()) <= {0.0, 1.0}
    xa3, ya3 = aug(torch.rand(3, 1, 8, 8, 8), (torch.rand(3, 1, 8, 8, 8) > 0.5).float(), g)
    assert xa3.shape == (3, 1, 8, 8, 8) and set(ya3.unique().tolist()) <= {0.0, 1.0}


# ---------------------------------------------------------------------------------------------- episodes on data
@pytest.mark.parametrize("configuration,cfg", [
    ("2d", EpisodeConfig(dim=2, support_size=3, image_size=(32, 32), synthetic_task_prob=0.25)),
    ("3d_fullres", EpisodeConfig(dim=3, support_size=2, image_size=(16, 16, 16), crop_size=(24, 24, 24))),
])
def test_episode_shapes(synthetic_collection, configuration, cfg):
    spec = synthetic_collection["spec"]
    tr, val = build_episode_dataloaders(spec, synthetic_collection["joint"], configuration, 0, 4, cfg,
                                        holdout=[HOLDOUT], num_processes=0)
    held = spec.member_index(HOLDOUT)
    for it in (tr, val):
        b = next(it)
        size = cfg.image_size
        assert b["query_image"].shape == (4, 1, *size) and b["query_label"].shape == (4, 1, *size)
        assert b["support_images"].shape == (4, cfg.support_size, 1, *size)
        assert b["support_labels"].shape == (4, cfg.support_size, 1, *size)
        assert b["query_image"].min() >= 0 and b["query_image"].max() <= 1
        assert set(b["support_labels"].unique().tolist()) <= {0.0, 1.0}
        assert held not in b["member_index"].tolist() and len(b["keys"]) == 4
        real = b["task_id"] >= 0
        assert torch.all(b["member_index"][real] >= 0)
    assert all("SynthMRI" not in k for _ in range(5) for k in next(tr)["keys"])


# ---------------------------------------------------------------------------------------------- support folders
def _write(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 2.0), vector=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr, isVector=vector)
    img.SetSpacing(spacing[: img.GetDimension()])
    sitk.WriteImage(img, str(path))


def _case(folder: Path, name: str, layout: str, label_value: int = 1, shape=(4, 12, 12)):
    rng = np.random.default_rng(abs(hash(name)) % 2 ** 32)
    img = rng.normal(size=shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[1:3, 3:8, 4:9] = label_value
    if layout == "raw":
        _write(folder / "imagesTr" / f"{name}_0000.nii.gz", img)
        _write(folder / "labelsTr" / f"{name}.nii.gz", lab)
    else:
        _write(folder / f"{name}_0000.nii.gz", img)
        _write(folder / f"{name}.nii.gz", lab)


@pytest.mark.parametrize("layout", ["raw", "flat"])
def test_support_folder_layouts(tmp_path, layout):
    for c in ("a", "b"):
        _case(tmp_path, c, layout, label_value=2)
    pairs = sup.find_support_pairs(tmp_path)
    assert [p.case for p in pairs] == ["a", "b"] and all(len(p.image_files) == 1 for p in pairs)
    ex = sup.read_support_set(pairs, dim=2)
    assert sup.resolve_label(None, ex, tmp_path) == ((2,), 2, "2")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumour": 2}}))
    assert sup.resolve_label("tumour", ex, tmp_path)[:2] == ((2,), 2)
    pool = sup.build_support_pool([(e.case, e.image, e.label, e.spacing) for e in ex], (2,), 2, (16, 16))
    assert pool.images.shape == (4, 1, 16, 16)  # 2 cases x 2 foreground slices along the 2 mm axis


def test_support_bad_inputs(tmp_path):
    def err(match, fn, *a):
        with pytest.raises(sup.SupportError, match=match):
            fn(*a)

    (tmp_path / "empty").mkdir()
    err("is empty", sup.find_support_pairs, tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        sup.find_support_pairs(tmp_path / "missing")
    d = tmp_path / "unpaired"
    _case(d, "a", "flat")
    _write(d / "b_0000.nii.gz", np.zeros((4, 12, 12), np.float32))
    _write(d / "c.nii.gz", np.zeros((4, 12, 12), np.uint8))
    err(r"images without label: b_0000.nii.gz; labels without image: c.nii.gz", sup.find_support_pairs, d)
    d = tmp_path / "half_raw"
    _case(d, "a", "raw")
    shutil.rmtree(d / "labelsTr")
    err("no labelsTr/", sup.find_support_pairs, d)
    d = tmp_path / "size"
    _write(d / "a_0000.nii.gz", np.zeros((4, 12, 12), np.float32))
    _write(d / "a.nii.gz", np.zeros((4, 12, 10), np.uint8))
    err(r"a.nii.gz: geometry mismatch with its image .*a_0000.nii.gz: shape \(x, y, z\) \(10, 12, 4\) != \(12, 12, 4\)",
        sup.read_support_set, sup.find_support_pairs(d), 2)
    d = tmp_path / "spacing"
    _write(d / "a_0000.nii.gz", np.zeros((4, 12, 12), np.float32))
    _write(d / "a.nii.gz", np.zeros((4, 12, 12), np.uint8), spacing=(1.0, 1.0, 3.0))
    err("a.nii.gz: geometry mismatch with its image .*a_0000.nii.gz: spacing", sup.read_support_set,
        sup.find_support_pairs(d), 2)
    d = tmp_path / "channels"
    _case(d, "a", "flat")
    _write(d / "a_0001.nii.gz", np.zeros((4, 12, 12), np.float32))
    err("support case a has 2 channels .* model takes 1", sup.read_support_set, sup.find_support_pairs(d), 2)
    d = tmp_path / "rgb"
    _write(d / "a_0000.png", np.zeros((12, 12, 3), np.uint8), vector=True)
    _write(d / "a.png", np.zeros((12, 12), np.uint8))
    err("3 components per pixel", sup.read_support_set, sup.find_support_pairs(d), 2)
    d = tmp_path / "twod"
    _write(d / "a_0000.png", np.zeros((12, 12), np.uint8))
    _write(d / "a.png", np.ones((12, 12), np.uint8))
    assert sup.read_support_set(sup.find_support_pairs(d), 2)[0].image.shape == (12, 12)
    err("2D image, but the 3D model", sup.read_support_set, sup.find_support_pairs(d), 3)
    d = tmp_path / "labels"
    _case(d, "a", "flat", label_value=1)
    _case(d, "b", "flat", label_value=3)
    ex = sup.read_support_set(sup.find_support_pairs(d), 2)
    err(r"foreground values \[1, 3\]; choose", sup.resolve_label, None, ex, d)
    err(r"no foreground for label 2 \(values \[2\]\).*present: \[1, 3\]", sup.resolve_label, "2", ex, d)
    err("not a label name of the dataset.json", sup.resolve_label, "liver", ex, d)


def test_validation_counts_per_task_and_member():
    """Episodes' pseudo Dice counts go to their global task, pooled and per member (the query's member), as the
    base trainer logs them; synthetic episodes are not counted."""
    from nnharmony.trainers.universeg_trainer import SoftDiceBCELoss, UniverSegTrainer

    spec = toy_spec(3)  # tasks liver, spleen, kidney, lesion; members 0: liver+spleen, 1: spleen+kidney, 2: ...
    t = UniverSegTrainer.__new__(UniverSegTrainer)
    t.spec, t.device, t.loss = spec, torch.device("cpu"), SoftDiceBCELoss()
    logits = torch.full((4, 1, 4, 4), -10.0)
    logits[:, :, :2] = 10.0  # predicts the upper half (8 pixels)
    t.network = lambda q, sx, sy: logits
    label = torch.zeros((4, 1, 4, 4))
    label[:, :, 1:3] = 1.0  # 8 pixels, 4 of them predicted: tp 4, fp 4, fn 4
    batch = {"query_image": torch.zeros((4, 1, 4, 4)), "query_label": label,
             "support_images": torch.zeros((4, 2, 1, 4, 4)), "support_labels": torch.zeros((4, 2, 1, 4, 4)),
             "task_id": torch.tensor([0, 1, 1, -1]), "member_index": torch.tensor([0, 0, 1, -1])}
    res = t.validation_step(batch)
    assert res["tp_hard"].tolist() == [4, 8, 0, 0] and res["fn_hard"].tolist() == [4, 8, 0, 0]
    assert res["tp_member"].shape == (3, 4)
    assert res["tp_member"].tolist() == [[4, 4, 0, 0], [0, 4, 0, 0], [0, 0, 0, 0]]
    assert res["fp_member"].tolist() == res["tp_member"].tolist()


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def universeg_model(synthetic_collection):
    from nnharmony.cli import train as train_cli

    train_cli.main([synthetic_collection["name"], "2d", "0", "-tr", "UniverSegTrainer", *QUICK,
                    "--holdout", str(HOLDOUT), "--trainer-options", json.dumps(TINY)])
    return Path(synthetic_collection["nnUNet_results"]) / synthetic_collection["name"] / \
        "UniverSegTrainer__nnHarmonyPlans__2d"


def _support_and_inputs(collection, dest: Path, layout: str = "raw") -> list[str]:
    """Support folder from the held-out member's raw fold-0 training cases, inputs = its validation cases."""
    from nnharmony.data.splits import collection_fold

    spec = collection["spec"]
    i = spec.member_index(HOLDOUT)
    raw = collection["raw_folders"][i]
    train, val = collection_fold(spec, 0, "2d")[i]
    img_dir, lab_dir = ((dest / "support" / "imagesTr", dest / "support" / "labelsTr") if layout == "raw"
                        else (dest / "support", dest / "support"))
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    for c in train:
        shutil.copy(raw / "imagesTr" / f"{c}_0000.nii.gz", img_dir)
        shutil.copy(raw / "labelsTr" / f"{c}.nii.gz", lab_dir)
    if layout == "raw":
        shutil.copy(raw / "dataset.json", dest / "support")
    (dest / "in").mkdir(parents=True, exist_ok=True)
    for c in val:
        shutil.copy(raw / "imagesTr" / f"{c}_0000.nii.gz", dest / "in")
    return val


def test_training_outputs(universeg_model, synthetic_collection):
    fold = universeg_model / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pth", weights_only=True)
    assert ckpt["trainer_name"] == "UniverSegTrainer"
    assert ckpt["nnharmony"]["universeg"]["holdout"] == [HOLDOUT] and ckpt["nnharmony"]["universeg"]["dim"] == 2
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    held = [n for n, m in summary["members"].items() if m["held_out"]]
    assert held == ["Dataset902_SynthMRI"]
    for name, m in summary["members"].items():
        member = synthetic_collection["spec"].member(name)
        assert set(m["tasks"]) == {t.label for t in member.tasks}
    plans = json.loads((universeg_model / "plans.json").read_text())
    assert plans["nnharmony"]["universeg"]["encoder_blocks"] == [8, 8, 8]
    # the epoch log and progress_members.json/png name members and tasks, as the base trainer's do
    spec = synthetic_collection["spec"]
    log = "\n".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "np.float" not in log and "Pseudo dice " + spec.tasks[0] + " " in log
    assert "episodes, member_sampling" in log and "Dataset902_SynthMRI: 0 / 0 cases, p = 0.000" in log
    history = json.loads((fold / "progress_members.json").read_text())
    assert len(history) == 1 and history[0] and "Dataset902_SynthMRI" not in history[0]
    for name, per_task in history[0].items():
        assert f"  {name}: " in log
        assert set(per_task) == {spec.tasks[t] for t in spec.task_ids(spec.member(name).dataset_id)}
    assert (fold / "progress_members.png").is_file()


@pytest.mark.parametrize("layout", ["raw", "flat"])
def test_predict_held_out_member_from_support_and_evaluate(universeg_model, synthetic_collection, tmp_path, layout):
    from nnharmony.cli import evaluate as evaluate_cli
    from nnharmony.cli import predict as predict_cli

    cases = _support_and_inputs(synthetic_collection, tmp_path, layout)
    out = tmp_path / "out"
    label = "liver" if layout == "raw" else "1"  # a name needs the dataset.json of the raw layout
    predict_cli.main(["-i", str(tmp_path / "in"), "-o", str(out), "-d", synthetic_collection["name"],
                      "-tr", "UniverSegTrainer", "-c", "2d", "-f", "0", "--support", str(tmp_path / "support"),
                      "--label", label, "-S", "3", "-K", "2", "-device", "cpu", "--save_probabilities"])
    for c in cases:
        pred = sitk.ReadImage(str(out / f"{c}.nii.gz"))
        img = sitk.ReadImage(str(tmp_path / "in" / f"{c}_0000.nii.gz"))
        assert pred.GetSize() == img.GetSize()
        assert np.allclose(pred.GetSpacing(), img.GetSpacing()) and np.allclose(pred.GetOrigin(), img.GetOrigin())
        assert np.allclose(pred.GetDirection(), img.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1}
        probs = np.load(out / f"{c}.npz")["probabilities"]
        assert probs.shape == (2, *sitk.GetArrayFromImage(img).shape)
    info = json.loads((out / "universeg_prediction.json").read_text())
    assert info["ensemble"] == 2 and info["support_size"] == 3 and info["label_values"] == [1]
    record = json.loads((out / "predict_args.json").read_text())  # every argument and the model files, as nnU-Net
    assert record["arguments"]["support"] == str(tmp_path / "support") and record["arguments"]["ensemble"] == 2
    assert record["arguments"]["label"] == label and record["command"].startswith("nnharmony_predict -i")
    assert record["model_files"] == [str((universeg_model / "fold_0" / "checkpoint_final.pth").resolve())]
    assert (record["collection"], record["trainer"], record["configuration"]) == (
        synthetic_collection["name"], "UniverSegTrainer", "2d")
    (tmp_path / "labels.json").write_text(json.dumps({"liver": 1}))
    raw = synthetic_collection["raw_folders"][synthetic_collection["spec"].member_index(HOLDOUT)]
    evaluate_cli.main(["-ref", str(raw / "labelsTr"), "-pred", str(out), "-l", str(tmp_path / "labels.json"),
                       "-o", str(tmp_path / "eval"), "-np", "1"])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == len(cases)
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0


def test_predict_bad_inputs_fail_before_predicting(universeg_model, synthetic_collection, tmp_path, capsys):
    from nnharmony.cli import predict as predict_cli

    _support_and_inputs(synthetic_collection, tmp_path, "raw")
    base = ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", synthetic_collection["name"],
            "-tr", "UniverSegTrainer", "-c", "2d", "-f", "0", "-device", "cpu"]

    def fails(extra, match):
        with pytest.raises(SystemExit):
            predict_cli.main(base + extra)
        assert match in capsys.readouterr().err
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    fails([], "give --support DIR")
    (tmp_path / "empty").mkdir()
    fails(["--support", str(tmp_path / "empty")], "is empty")
    fails(["--support", str(tmp_path / "support"), "--label", "9"], "no foreground for label 9")
    fails(["--support", str(tmp_path / "support")], "choose the one to segment with --label")
    # a two-channel input case
    first = sorted((tmp_path / "in").iterdir())[0]
    shutil.copy(first, first.with_name(first.name.replace("_0000", "_0001")))
    fails(["--support", str(tmp_path / "support"), "--label", "1"], "has 2 channels")
