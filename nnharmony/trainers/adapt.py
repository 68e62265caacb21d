"""``nnharmony_adapt``: adapt a trained model to a collection that extends its own with new members, new
modalities and/or new tasks, without disturbing what it already knows.

1. The new collection is planned with ``nnharmony_plan_and_preprocess ... --extends OLD``: modality, task and
   domain ids of the old collection are kept and the joint network configuration is reused.
2. The trainer's ``transfer_weights`` hook loads the old weights into the wider network (generic rule in
   :mod:`nnharmony.trainers.weight_transfer`;
   U-Harmony and Hermes extend their own modules), so old members' predictions are unchanged before
   fine-tuning (tested).
3. The old members are validated (Dice before), the trainer's ``adaptation_parameters`` are fine-tuned on the
   new collection, everything is validated again, and a report of old members' Dice before/after is written:
   forgetting is measured, never silent.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from nnharmony.data.collection import CollectionSpec, check_extends
from nnharmony.utils.io import atomic_write, save_json_atomic


def _dice_table(summaries: dict[str, dict]) -> dict[str, dict[str, float]]:
    table = {}
    for member, summary in summaries.items():
        table[member] = {str(k): float(v.get("Dice", float("nan"))) for k, v in summary.get("mean", {}).items()}
    return table


def adapt_model(old_collection: str, new_collection: str, trainer_name: str, configuration: str = "3d_fullres",
                fold: int | str = 0, plans: str = "nnHarmonyPlans", device: str = "cpu", epochs: int = 50,
                iterations_per_epoch: int = 250, val_iterations_per_epoch: int = 50,
                checkpoint: str = "checkpoint_final.pth", trainer_options: dict | None = None) -> dict:
    """Adapt, fine-tune and report. Returns the report dict (also written next to the new model).
    ``trainer_options``: trainer attributes for fine-tuning (as ``nnharmony_train --trainer-options``)."""
    from nnharmony.records.model_folder import model_folder
    from nnharmony.records.model_folder import load_checkpoint_file
    from nnharmony.trainers.run import TrainingOptions, apply_options, build_trainer, training_device
    from nnharmony.trainers.validation import validate_members

    old_folder = model_folder(old_collection, trainer_name, plans, configuration)
    spec_file = old_folder / "collection.json"
    if not spec_file.is_file():
        raise FileNotFoundError(f"{old_folder}: no trained {trainer_name} model of collection {old_collection}")
    old_spec = CollectionSpec.load(spec_file)
    ckpt = load_checkpoint_file(old_folder / f"fold_{fold}" / checkpoint, expected_trainer=trainer_name,
                                expected_collection=old_spec)
    opts = TrainingOptions(new_collection, configuration, fold, trainer_name, plans, device=device, epochs=epochs,
                           iterations_per_epoch=iterations_per_epoch,
                           val_iterations_per_epoch=val_iterations_per_epoch,
                           trainer_options=dict(trainer_options or {}))
    trainer = build_trainer(opts, training_device(opts))
    check_extends(trainer.spec, old_spec)
    apply_options(trainer, opts)
    trainer.adaptation_mode = True
    trainer.initialize()
    type(trainer).transfer_weights(ckpt["network_weights"], old_spec, trainer.spec, trainer.unwrapped_network())
    # mirroring axes of the old model (set by get_dataloaders during training)
    trainer.inference_allowed_mirroring_axes = ckpt.get("inference_allowed_mirroring_axes")
    trainer.network.eval()
    trainer.set_deep_supervision_enabled(False)
    before = validate_members(trainer)
    fold_dir = Path(trainer.output_folder)
    before_dir = fold_dir / "validation_before_adaptation"
    if before_dir.exists():
        shutil.rmtree(before_dir)
    (fold_dir / "validation").rename(before_dir)
    trainer.set_deep_supervision_enabled(True)
    trainer.run_training()
    trainer.perform_actual_validation()
    after = {}
    for m in trainer.spec.members:
        f = fold_dir / "validation" / m.dataset_name / "summary.json"
        if f.is_file():  # a training-only member (no validation cases in this fold) has none
            after[m.dataset_name] = json.loads(f.read_text())
    old_members = [m.dataset_name for m in old_spec.members]
    b, a = _dice_table(before), _dice_table(after)
    report = {"old_collection": old_collection, "new_collection": new_collection, "trainer": trainer_name,
              "fold": fold, "fine_tuned_parameters": int(sum(p.numel() for p in
                                                             type(trainer).adaptation_parameters(trainer.unwrapped_network()))),
              "members": {}}
    lines = ["| member | label | old member | Dice before | Dice after | change |", "|---|---|---|---|---|---|"]
    for m in trainer.spec.members:
        name = m.dataset_name
        report["members"][name] = {"old": name in old_members, "before": b.get(name, {}), "after": a.get(name, {})}
        for label in a.get(name, {}):
            db, da = b.get(name, {}).get(label, float("nan")), a[name][label]
            lines.append(f"| {name} | {label} | {'yes' if name in old_members else 'no'} | {db:.4f} | {da:.4f} | "
                         f"{da - db:+.4f} |")
    old_before = [v for n in old_members for v in b.get(n, {}).values() if not np.isnan(v)]
    old_after = [v for n in old_members for v in a.get(n, {}).values() if not np.isnan(v)]
    report["old_members_mean_dice_before"] = float(np.mean(old_before)) if old_before else float("nan")
    report["old_members_mean_dice_after"] = float(np.mean(old_after)) if old_after else float("nan")
    save_json_atomic(report, fold_dir / "adaptation_report.json")
    text = "\n".join(lines) + "\n"
    atomic_write(fold_dir / "adaptation_report.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    print(f"old members' mean Dice: before {report['old_members_mean_dice_before']:.4f}, "
          f"after {report['old_members_mean_dice_after']:.4f}")
    return report
