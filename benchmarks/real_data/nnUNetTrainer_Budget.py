"""A plain nnU-Net trainer whose schedule comes from the environment, for running ``nnUNetv2_train`` with the
same small budget as ``nnharmony_train --epochs E --iterations-per-epoch I`` (point ``nnUNet_extTrainer`` at
this folder). Nothing else differs from ``nnUNetTrainer``."""
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_Budget(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ["BUDGET_EPOCHS"])
        self.num_iterations_per_epoch = int(os.environ["BUDGET_ITERATIONS"])
        self.num_val_iterations_per_epoch = int(os.environ["BUDGET_VAL_ITERATIONS"])
