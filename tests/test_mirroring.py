"""Mirroring augmentation is switched off where labels name a body side (``nnharmony.trainers.mirroring``)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nnharmony.trainers.mirroring import apply_to_nnunet_trainer, mirroring_wanted, side_labels


def test_side_labels_are_words_left_or_right():
    names = ["left lung", "Right Kidney", "kidney_left", "adrenal-right", "liver", "leftover", "bright spot",
             "upright", "cardiomediastinum"]
    assert side_labels(names) == ["left lung", "Right Kidney", "kidney_left", "adrenal-right"]


def test_modes():
    logged = []
    assert not mirroring_wanted("auto", ["liver", "left lung"], logged.append)
    assert "left lung" in logged[0] and "mirroring 'on'" in logged[0]
    assert mirroring_wanted("auto", ["liver", "spleen"], logged.append) and len(logged) == 1
    assert mirroring_wanted("on", ["left lung"]) and not mirroring_wanted("off", ["liver"], logged.append)
    with pytest.raises(ValueError, match="mirroring must be one of auto, on, off"):
        mirroring_wanted("sometimes", ["liver"])


def test_plain_nnunet_trainer_with_side_labels_trains_and_predicts_without_mirroring():
    trainer = SimpleNamespace(dataset_json={"labels": {"background": 0, "left lung": 1, "heart": 2}},
                              inference_allowed_mirroring_axes=(0, 1), print_to_log_file=lambda *a: None,
                              configure_rotation_dummyDA_mirroring_and_inital_patch_size=lambda: ("rot", False,
                                                                                                  [64, 64], (0, 1)))
    apply_to_nnunet_trainer(trainer)
    assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size() == ("rot", False, [64, 64], None)
    assert trainer.inference_allowed_mirroring_axes is None


def test_collection_trainer_applies_the_policy(synthetic_collection):
    from nnharmony.trainers.run import TrainingOptions, build_trainer

    trainer = build_trainer(TrainingOptions(synthetic_collection["name"], "2d", 0, device="cpu"), torch.device("cpu"))
    assert trainer.mirroring == "auto"  # synthetic labels (liver, spleen, kidney, lesion) name no side
    assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] == (0, 1)
    trainer.mirroring = "off"
    assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] is None
    assert trainer.inference_allowed_mirroring_axes is None
