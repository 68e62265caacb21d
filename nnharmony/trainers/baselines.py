"""Reference paradigms trained in the same pipeline as the methods."""
from __future__ import annotations

from typing import Any

import torch

from nnharmony.data.collection import CollectionSpec
from nnharmony.networks.separate_heads import SeparateHeadsNet
from nnharmony.trainers.backbones import planned_backbone
from nnharmony.trainers.nnharmony_trainer import nnHarmonyTrainer, load_collection_spec


class SeparateHeadsTrainer(nnHarmonyTrainer):
    """Oracle: shared nnU-Net backbone, one head per member; the dataset must be given at inference."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        spec = load_collection_spec(plans_manager.plans)
        member_tasks = [spec.task_ids(m.dataset_id) for m in spec.members]
        backbone = planned_backbone(configuration_manager, num_input_channels, sum(len(t) for t in member_tasks),
                                    enable_deep_supervision)
        return SeparateHeadsNet(backbone, member_tasks, num_output_channels)

    def network_forward(self, data: torch.Tensor, batch: dict):
        return self.network(data, member_index=batch["dataset_id"].to(self.device))

    @classmethod
    def inference_condition(cls, spec: CollectionSpec, member_index: int) -> dict[str, Any]:
        return {"member_index": member_index}
