"""Re-exports nnharmony's trainers for nnU-Net's ``nnUNet_extTrainer`` lookup (see the package docstring)."""
from nnharmony.trainers import *  # noqa: F401,F403
from nnharmony.records.model_folder import _classes_in

import nnharmony.trainers as _trainers
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as _base

globals().update(_classes_in(_trainers, _base))
