"""The paradigms the benchmark compares: which trainer, configuration and kind of prediction each one is."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    trainer: str
    configuration: str  # the configuration of the full preset; the quick preset trains every method on ``2d``
    paradigm: str  # "per-dataset" | "collection" | "in-context"
    description: str


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("nnunet", "nnUNetTrainer", "3d_fullres", "per-dataset",
           "one plain nnU-Net per member, on the member's own plans"),
    Method("joint", "nnHarmonyTrainer", "3d_fullres", "collection",
           "one nnU-Net on the whole collection, one sigmoid per task, partial-label loss"),
    Method("separate_heads", "SeparateHeadsTrainer", "3d_fullres", "collection",
           "shared backbone, one head per member (oracle: the dataset is given at inference)"),
    Method("uharmony", "UHarmonyTrainer", "3d_fullres", "collection",
           "U-Harmony: harmonization normalization with domain-specific restoration"),
    Method("hermes", "HermesTrainer", "3d_fullres", "collection",
           "Hermes: task and modality prior tokens fused with the backbone"),
    Method("universeg", "UniverSegTrainer", "2d", "in-context",
           "UniverSeg: 2D in-context segmentation from a support set of the member's training cases"),
]}
DEFAULT_METHODS = ("nnunet", "joint", "uharmony", "hermes", "universeg")


def trainer_available(method: Method) -> str | None:
    """None if the method can run, else why not."""
    try:
        from nnharmony.records.model_folder import find_trainer_class

        cls = find_trainer_class(method.trainer)
    except Exception as e:  # noqa: BLE001 - any import problem means "skip", with the reason
        return f"trainer {method.trainer} is not available ({str(e).splitlines()[0][:200]})"
    if method.paradigm == "in-context" and not hasattr(cls, "predict_from_support"):
        return f"{method.trainer} has no predict_from_support (in-context prediction)"
    return None
