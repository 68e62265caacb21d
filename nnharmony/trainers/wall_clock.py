"""The one training loop with a wall-clock budget: nnU-Net's ``run_training``, re-reading ``num_epochs`` and
``num_iterations_per_epoch`` every epoch, stopping after the epoch in which ``wall_clock_budget_minutes`` of wall
time have passed (None: the epochs decide).

Every budget form of ``nnharmony_benchmark`` runs through it: ``Nmin`` sets ``wall_clock_budget_minutes``;
``EPOCHSxNmin`` and ``EPOCHSxNcpumin`` (wall or CPU clock) fit the iterations per epoch from the trainer's epoch
hooks (:class:`nnharmony.benchmark.budget.EpochsInMinutes`), which this loop calls like nnU-Net's.
:class:`~nnharmony.trainers.nnharmony_trainer.nnHarmonyTrainer` uses it as its ``run_training``; plain nnU-Net
trainers get it from :func:`wall_clock_nnunet_trainer` (the per-dataset paradigm under a time budget).
"""
from __future__ import annotations

import time

import torch


def run_training_with_budget(trainer) -> None:
    """nnU-Net's loop on ``trainer``, ended early by its ``wall_clock_budget_minutes`` (if set); records the start
    in ``trainer._train_start_time`` (``time.time()``) for the progress lines."""
    trainer.on_train_start()
    trainer._train_start_time = time.time()
    while trainer.current_epoch < trainer.num_epochs:
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        train_outputs = [trainer.train_step(next(trainer.dataloader_train))
                         for _ in range(trainer.num_iterations_per_epoch)]
        trainer.on_train_epoch_end(train_outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            val_outputs = [trainer.validation_step(next(trainer.dataloader_val))
                           for _ in range(trainer.num_val_iterations_per_epoch)]
            trainer.on_validation_epoch_end(val_outputs)
        trainer.on_epoch_end()
        budget = getattr(trainer, "wall_clock_budget_minutes", None)
        if budget is not None and time.time() - trainer._train_start_time > 60 * budget:
            trainer.print_to_log_file(f"wall-clock budget of {budget} min reached after {trainer.current_epoch} epochs")
            break
    trainer.on_train_end()


def wall_clock_nnunet_trainer() -> type:
    """``nnUNetTrainer`` with the budgeted loop (``nnUNetTrainerWallClock``): nnU-Net's own loop cannot stop early.
    Built on request, so that ``-tr`` lookups in ``nnharmony.trainers`` do not list it."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerWallClock(nnUNetTrainer):
        # nnU-Net records its __init__ arguments by name: keep its signature
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.wall_clock_budget_minutes: float | None = None

        def run_training(self):
            run_training_with_budget(self)

    return nnUNetTrainerWallClock
