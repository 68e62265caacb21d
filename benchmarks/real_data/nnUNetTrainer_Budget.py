"""A plain nnU-Net trainer whose schedule comes from the environment, for running ``nnUNetv2_train`` with the
same small budget as ``nnharmony_train --epochs E --iterations-per-epoch I`` (point ``nnUNet_extTrainer`` at
this folder). Nothing else differs from ``nnUNetTrainer``.

``BUDGET_SEED`` (optional) seeds Python's, NumPy's and PyTorch's generators before the network is built and
again just before the first training batch. nnU-Net itself does not seed, so two runs of the same command
differ; with the seed and ``nnUNet_n_proc_DA=0`` (augmentation in the training process) a run is repeatable,
which lets (a) compare ``nnharmony_train`` and ``nnUNetv2_train`` launching this trainer on identical
randomness."""
import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _seed_everything() -> None:
    seed = os.environ.get("BUDGET_SEED")
    if seed is not None:
        random.seed(int(seed))
        np.random.seed(int(seed))
        torch.manual_seed(int(seed))


class nnUNetTrainer_Budget(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ["BUDGET_EPOCHS"])
        self.num_iterations_per_epoch = int(os.environ["BUDGET_ITERATIONS"])
        self.num_val_iterations_per_epoch = int(os.environ["BUDGET_VAL_ITERATIONS"])

    def initialize(self):
        _seed_everything()
        super().initialize()

    def on_train_start(self):
        super().on_train_start()
        _seed_everything()
