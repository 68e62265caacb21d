"""UniverSeg training corpus and recipe: 3D members sliced along several axes in 2D episodes, support size drawn
per batch, task-level (shared) augmentation, Sobel-edge tasks, the "paper" preset, CPU defaults for 3D and the
expected time per iteration logged before training."""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from nnharmony.data.episodes import EpisodeConfig, InTaskAugmentation, build_episode_dataloaders
from nnharmony.data.task_augmentation import label_edge_map, task_augment
from nnharmony.trainers.universeg_trainer import PRESETS, UniverSegTrainer

HOLDOUT = 902
QUICK = ["-device", "cpu", "--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations-per-epoch", "1"]


def test_episodes_slice_3d_members_along_every_axis_with_support_size_drawn_per_batch(synthetic_collection):
    cfg = EpisodeConfig(dim=2, support_size=4, min_support_size=1, image_size=(32, 32), slice_axes=(0, 1, 2),
                        shared_augmentation_prob=0.5, synthetic_task_prob=0.2,
                        task_augmentation={"edge_mode": "sobel", "label_inversion": True})
    tr, val = build_episode_dataloaders(synthetic_collection["spec"], synthetic_collection["joint"], "2d", 0, 3, cfg,
                                        holdout=[HOLDOUT], num_processes=0)
    sizes, axes = set(), set()
    for _ in range(12):
        b = next(tr)
        s = b["support_images"].shape[1]
        sizes.add(s)
        assert b["support_labels"].shape == (3, s, 1, 32, 32) and b["query_image"].shape == (3, 1, 32, 32)
        assert set(b["support_labels"].unique().tolist()) <= {0.0, 1.0}
        assert 0 <= b["support_images"].min() and b["support_images"].max() <= 1
        for k in b["keys"]:
            if k != "synthetic":
                axes.add(k.split("@")[1][0])
                assert "SynthMRI" not in k
    assert sizes <= {1, 2, 3, 4} and len(sizes) > 1
    assert axes == {"z", "y", "x"}
    assert next(val)["support_images"].shape[1] in {1, 2, 3, 4}


def test_episode_config_refuses_bad_values():
    with pytest.raises(ValueError, match="min_support_size must be in"):
        EpisodeConfig(support_size=4, min_support_size=5)
    with pytest.raises(ValueError, match="slice_axes must be"):
        EpisodeConfig(slice_axes=(3,))
    with pytest.raises(ValueError, match="shared_augmentation_prob must be in"):
        EpisodeConfig(shared_augmentation_prob=2)


def test_shared_augmentation_gives_one_transform_per_episode():
    aug = InTaskAugmentation(p_rotation=1, p_scaling=1, p_translation=1, p_noise=0, p_blur=1, p_brightness=1,
                             p_contrast=1, p_gamma=1)
    img = torch.rand(1, 1, 24, 24).repeat(6, 1, 1, 1)  # two episodes of three identical images
    lab = (torch.rand(1, 1, 24, 24) > 0.5).float().repeat(6, 1, 1, 1)
    xs, ys = aug(img, lab, torch.Generator().manual_seed(1), group=3)
    for e in (0, 3):
        assert torch.allclose(xs[e], xs[e + 1]) and torch.allclose(xs[e], xs[e + 2]) and torch.equal(ys[e], ys[e + 2])
    assert not torch.allclose(xs[0], xs[3])
    xi, _ = aug(img, lab, torch.Generator().manual_seed(1), group=1)
    assert not torch.allclose(xi[0], xi[1])
    with pytest.raises(ValueError, match="group must divide"):
        aug(img, lab, torch.Generator(), group=4)


def test_sobel_edge_task_is_a_binary_band_across_the_boundary():
    y = torch.zeros(1, 2, 1, 16, 16)
    y[..., 4:12, 4:12] = 1
    e = label_edge_map(y, mode="sobel")
    assert set(e.unique().tolist()) == {0.0, 1.0}
    assert e[0, 0, 0, 8, 3] == 1 and e[0, 0, 0, 8, 4] == 1 and e[0, 0, 0, 8, 8] == 0 and e[0, 0, 0, 0, 0] == 0
    x = torch.rand(1, 2, 1, 16, 16)
    _, ya = task_augment(x, y, torch.Generator().manual_seed(0), flip_p=0, intensity_inversion_p=0, edge_map_p=1,
                         edge_mode="sobel")
    assert torch.equal(ya, e)


def test_paper_preset_sets_the_recipe_and_later_options_win():
    t = types.SimpleNamespace(_preset=None)
    UniverSegTrainer.preset.fset(t, "paper")
    paper = PRESETS["paper"]
    assert t.bce_weight == 0.0 and t.support_size == 64 and t.min_support_size == 1 and t.image_size == 128
    assert t.task_augmentation["edge_mode"] == "sobel" and t.task_augmentation["label_inversion"]
    assert t.synthetic_task_prob == paper["synthetic_task_prob"] and t.fit_support_size_to_memory
    with pytest.raises(ValueError, match="unknown UniverSeg preset 'nope'; known: paper"):
        UniverSegTrainer.preset.fset(t, "nope")


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_training_with_the_paper_preset_logs_the_expected_iteration_time(synthetic_collection, configuration):
    from nnharmony.cli import train as train_cli

    options = {"preset": "paper", "image_size": 16 if configuration == "3d_fullres" else 32,
               "encoder_blocks": [8, 8, 8], "support_size": 3, "episode_batch_size": 2, "num_workers": 0,
               "validation_max_cases": 1}
    train_cli.main([synthetic_collection["name"], configuration, "0", "-tr", "UniverSegTrainer", *QUICK,
                    "--holdout", str(HOLDOUT), "--trainer-options", json.dumps(options)])
    model = Path(synthetic_collection["nnUNet_results"]) / synthetic_collection["name"] / \
        f"UniverSegTrainer__nnHarmonyPlans__{configuration}" / "fold_0"
    log = "".join(p.read_text() for p in model.glob("training_log_*.txt"))
    assert "expected time per training iteration: ~" in log
    ckpt = torch.load(model / "checkpoint_final.pth", weights_only=True)
    rec = ckpt["nnharmony"]["universeg"]
    assert rec["preset"] == "paper" and rec["support_size"] == 3 and rec["min_support_size"] == 1
    assert rec["slice_axes"] == [0, 1, 2]
