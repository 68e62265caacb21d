"""Checkpoints that are written atomically and loaded without executing pickled code.

The file holds only tensors and plain Python values (numpy scalars of nnU-Net's logger are converted), so
``torch.load(..., weights_only=True)`` reads it. It also records the collection it was trained on, so a
checkpoint of another collection or trainer is refused with a clear message instead of a shape error.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from nnharmony.utils.io import save_torch_atomic
from nnharmony.utils.safe_load import read_weights_file


def to_plain(obj: Any) -> Any:
    """numpy scalars/arrays -> Python floats/lists, recursively; torch.device -> str."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.device):
        return str(obj)
    return obj


def collection_fingerprint(spec) -> dict:
    return {"collection": spec.name, "tasks": list(spec.tasks), "modalities": list(spec.modalities),
            "domains": list(spec.domains), "members": [m.dataset_name for m in spec.members]}


def save_trainer_checkpoint(trainer, filename: str) -> None:
    net = trainer.unwrapped_network()
    checkpoint = {
        "network_weights": net.state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": to_plain(trainer.logger.get_checkpoint()),
        "_best_ema": to_plain(trainer._best_ema),
        "current_epoch": trainer.current_epoch + 1,
        "init_args": to_plain(trainer.my_init_kwargs),
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": to_plain(trainer.inference_allowed_mirroring_axes),
        "nnharmony": collection_fingerprint(trainer.spec),
    }
    extra = getattr(trainer, "extra_checkpoint_state", None)
    if callable(extra):
        checkpoint["nnharmony"].update(to_plain(extra()))
    save_torch_atomic(checkpoint, filename)


def load_checkpoint_file(path: str | os.PathLike, expected_trainer: str | None = None, expected_collection=None,
                         map_location: str | torch.device = "cpu") -> dict:
    """Read safely (:func:`~nnharmony.utils.safe_load.read_weights_file`); refuse a checkpoint of another trainer
    or collection."""
    checkpoint = read_weights_file(path, "nnharmony checkpoint", map_location=map_location)
    info = checkpoint.get("nnharmony") if isinstance(checkpoint, dict) else None
    if info is None:
        raise ValueError(f"{path}: not an nnharmony checkpoint (no collection record)")
    if expected_trainer is not None and checkpoint.get("trainer_name") != expected_trainer:
        raise ValueError(
            f"{path}: checkpoint of trainer {checkpoint.get('trainer_name')!r}, not {expected_trainer!r}"
        )
    if expected_collection is not None:
        want = collection_fingerprint(expected_collection)
        for key in ("collection", "tasks", "modalities"):
            if info.get(key) != want[key]:
                raise ValueError(
                    f"{path}: checkpoint of collection {info.get('collection')!r} with {key} {info.get(key)}, "
                    f"but this is collection {want['collection']!r} with {key} {want[key]}"
                )
    return checkpoint
