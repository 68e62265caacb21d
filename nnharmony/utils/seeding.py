"""Seeding for repeatable runs. nnU-Net does not seed its training; with a seed and augmentation in the training
process (``nnUNet_n_proc_DA=0``) a CPU run is repeatable, so two runs differ only by what was changed."""
from __future__ import annotations

import random


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators (the ones nnU-Net's augmentation and network
    initialization draw from)."""
    import numpy as np
    import torch

    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))
