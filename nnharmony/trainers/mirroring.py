"""Mirroring augmentation and labels that name a body side.

nnU-Net mirrors training patches (and test-time tiles) along every spatial axis. A mirrored image shows the
patient's left on the other side while its label still says "left lung", so the network has to tell the sides
apart from anatomical context alone; nnU-Net's maintainers answer left/right confusions with a trainer without
mirroring (``nnUNetTrainerNoMirroring``, nnU-Net issues #80, #869, #2225). Which array axis is the patient's
left-right axis is not known in general, so the whole augmentation is switched off, as that trainer does.

``mirroring`` (a trainer option of every nnharmony trainer): ``"auto"`` (default) switches mirroring off for
training and prediction when a label names a side (``left``/``right`` as a word: "left kidney", "kidney_right",
"Left Lung"); ``"on"`` keeps nnU-Net's behaviour; ``"off"`` switches it off always.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

MIRRORING_MODES = ("auto", "on", "off")
_SIDE = re.compile(r"(?<![a-z])(left|right)(?![a-z])", re.IGNORECASE)


def side_labels(label_names: Iterable[str]) -> list[str]:
    """The label names that name a body side."""
    return [n for n in label_names if _SIDE.search(n)]


def mirroring_wanted(mode: str, label_names: Iterable[str], log: Callable[[str], Any] = print) -> bool:
    """Whether to keep nnU-Net's mirroring under ``mode`` for these labels (the decision is logged)."""
    if mode not in MIRRORING_MODES:
        raise ValueError(f"mirroring must be one of {', '.join(MIRRORING_MODES)}, not {mode!r}")
    if mode != "auto":
        return mode == "on"
    sided = side_labels(label_names)
    if sided:
        log(f"mirroring augmentation off (training and prediction): labels name a body side ({', '.join(sided)}); "
            f"trainer option mirroring 'on' keeps it")
    return not sided


def configure_with_policy(trainer, configure: Callable[[], tuple], mode: str, label_names: Iterable[str]) -> tuple:
    """``configure()`` (nnU-Net's ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``), with no mirror
    axes for training and none for prediction where ``mode`` and the labels say so."""
    rotation, dummy_2d, initial_patch_size, mirror_axes = configure()
    if mirroring_wanted(mode, label_names, trainer.print_to_log_file):
        return rotation, dummy_2d, initial_patch_size, mirror_axes
    trainer.inference_allowed_mirroring_axes = None
    return rotation, dummy_2d, initial_patch_size, None


def apply_to_nnunet_trainer(trainer, mode: str = "auto") -> None:
    """The same policy for a plain nnU-Net trainer instance (the per-dataset baseline of the benchmark), from its
    dataset.json labels."""
    labels = [k for k in trainer.dataset_json.get("labels", {}) if k != "background"]
    configure = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size = (
        lambda: configure_with_policy(trainer, configure, mode, labels))
