"""A plans variant for small machines: the same preprocessed data with a narrower network and a smaller batch.

nnU-Net documents editing plans for such needs; a variant is a copy under a new plans identifier
(``<plans>_<suffix>``) that keeps the ``data_identifier``, so no case is preprocessed again. The quick preset
writes one for every member (the per-dataset models) and for the joint plans (whose ``member_plans_identifier``
then points at the members' variants), so every method trains the same narrower topology. Why: a CPU step of
nnU-Net's 2d network (32 to 256 features, batch 16) costs seconds; at half the widths and batch 8 a
few hundred steps fit into a minute, and these synthetic images need no more capacity (with a quarter, 8 features,
and nnU-Net's SGD the networks had found no foreground after 120-250 steps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from nnharmony.utils.io import load_json, save_json_atomic


@dataclass(frozen=True)
class PlansVariant:
    suffix: str
    base_features: int  # features of the first stage (nnU-Net: 32), doubled per stage up to nnU-Net's cap
    max_batch_size: int

    def name(self, plans: str) -> str:
        return f"{plans}_{self.suffix}"

    def apply(self, plans: dict, configurations: Sequence[str]) -> dict:
        out = dict(plans, plans_name=self.name(plans["plans_name"]))
        out["configurations"] = dict(plans["configurations"])
        for c in configurations:
            out["configurations"][c] = self._narrow(out["configurations"][c])
        return out

    def _narrow(self, configuration: dict) -> dict:
        cfg = dict(configuration)
        arch = dict(cfg["architecture"])
        kwargs = dict(arch["arch_kwargs"])
        cap = max(kwargs["features_per_stage"])
        kwargs["features_per_stage"] = [min(self.base_features * 2 ** i, cap)
                                        for i in range(len(kwargs["features_per_stage"]))]
        arch["arch_kwargs"] = kwargs
        cfg["architecture"] = arch
        cfg["batch_size"] = min(int(cfg["batch_size"]), self.max_batch_size)
        return cfg


def write_variant(spec, joint_plans: str, configurations: Sequence[str], variant: PlansVariant) -> str:
    """Writes the members' and the joint plans' variants (atomically, also when they exist: cheap and always
    current); returns the joint variant's identifier."""
    from nnharmony.paths import collection_dir, joint_plans_path, preprocessed_dir

    joint = load_json(joint_plans_path(spec.name, joint_plans))
    member_ident = joint["nnharmony"]["member_plans_identifier"]
    for m in spec.members:
        folder = preprocessed_dir() / m.dataset_name
        plans = load_json(folder / f"{member_ident}.json")
        save_json_atomic(variant.apply(plans, configurations), folder / f"{variant.name(member_ident)}.json")
    out = variant.apply(joint, configurations)
    out["nnharmony"] = dict(joint["nnharmony"], member_plans_identifier=variant.name(member_ident))
    name = variant.name(joint["plans_name"])
    save_json_atomic(out, collection_dir(spec.name) / f"{name}.json")
    return name
