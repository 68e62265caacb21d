"""Dataset-free prediction in the benchmark (``--dataset auto``): each member's validation cases predicted by a
trained collection model that must first infer which member a case comes from (U-Harmony's domain gate, Hermes'
modality head). Reports how often the inferred member is right, and scores the predictions made with it, so that
the Dice with the inferred member can be read next to the Dice with the true one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from nnharmony.benchmark.files import raw_images
from nnharmony.benchmark.methods import Method

#: suffix of the method name under which the dataset-free predictions are scored
AUTO_SUFFIX = " (auto)"


def supports_auto(method: Method) -> bool:
    from nnharmony.records.model_folder import find_trainer_class

    return method.paradigm == "collection" and getattr(find_trainer_class(method.trainer), "supports_auto_dataset",
                                                       False)


def predict_auto(method: Method, spec, model_folder: Path, fold, validation_cases: list[list[str]],
                 output_folder: Path, device: str = "cpu", mirroring: bool = True) -> dict[str, Any]:
    """Predict every member's validation cases with ``dataset="auto"`` into ``output_folder/<member>``; returns
    ``{member: {"cases", "correct", "inferred": {case: member}}}``."""
    from nnharmony.inference.predict_folder import predict_folder
    from nnharmony.inference.predictor import CollectionPredictor

    predictor = CollectionPredictor.from_model_folder(model_folder, folds=[fold], device=device,
                                                      use_mirroring=mirroring)
    out: dict[str, Any] = {}
    for m, cases in zip(spec.members, validation_cases):
        if not cases:
            continue
        with tempfile.TemporaryDirectory(prefix="nnharmony_auto_") as tmp:
            for case in cases:  # the member's validation images only, as one input folder
                for f in raw_images(m, case):
                    os.symlink(f.resolve(), Path(tmp) / f.name)
            info = predict_folder(predictor, tmp, output_folder / m.dataset_name, dataset="auto",
                                  progress_bar=False, record={"benchmark": method.name, "member": m.dataset_name})
        inferred = {c: v["dataset"] for c, v in info.items()}
        out[m.dataset_name] = {"cases": len(inferred), "correct": sum(v == m.dataset_name for v in inferred.values()),
                               "inferred": inferred}
    return out


def accuracy_lines(auto: dict[str, dict[str, Any]]) -> list[str]:
    """One line per method: inferred member right on k of n validation cases, per member."""
    lines = []
    for method, members in auto.items():
        parts = [f"{name} {v['correct']}/{v['cases']}" for name, v in members.items()]
        total = sum(v["correct"] for v in members.values()), sum(v["cases"] for v in members.values())
        lines.append(f"{method} --dataset auto: inferred member right on {total[0]}/{total[1]} validation cases "
                     f"({'; '.join(parts)})")
    return lines
