"""nnU-Net label handling for one-sigmoid-per-task outputs.

nnU-Net treats a dataset as region-based only when some label lists two or more values, so a task list such
as ``{"liver": [1], "spleen": [2]}`` would fall back to softmax with a background channel.
``SigmoidLabelManager`` keeps nnU-Net's ``LabelManager`` (region painting in ``regions_class_order``,
resampling, export) but always uses one sigmoid channel per label or region.
"""
from __future__ import annotations

from typing import Mapping

from nnunetv2.utilities.label_handling.label_handling import LabelManager


class SigmoidLabelManager(LabelManager):
    def __init__(self, label_dict: Mapping, regions_class_order, force_use_labels: bool = False,
                 inference_nonlin=None):
        label_dict = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in label_dict.items()}
        super().__init__(dict(label_dict), list(regions_class_order), force_use_labels=True,
                         inference_nonlin=inference_nonlin)
        self._has_regions = True
        self._force_use_labels = False
        self._regions = self._get_regions()
        import torch

        if inference_nonlin is None:
            self.inference_nonlin = torch.sigmoid


def sigmoid_label_manager(dataset_json: Mapping) -> SigmoidLabelManager:
    return SigmoidLabelManager(dataset_json["labels"], dataset_json["regions_class_order"])
