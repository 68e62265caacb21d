"""Final validation of a collection model: every member's validation cases, predicted with the member's own
plans and label values, evaluated against the member's ground truth (nnU-Net's ``gt_segmentations``)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from nnharmony.paths import preprocessed_dir
from nnharmony.trainers.progress import fmt, format_duration


def validate_members(trainer, save_probabilities: bool = False) -> dict[str, dict]:
    """Writes ``<fold>/validation/<DatasetXXX_Name>/`` predictions + ``summary.json``; returns the summaries."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnharmony.data.splits import collection_fold
    from nnharmony.evaluation.evaluate import evaluate_folder
    from nnharmony.inference.predictor import CollectionPredictor

    predictor = CollectionPredictor(
        trainer.spec, trainer.plans_manager.plans, trainer.configuration_name, type(trainer),
        [trainer.unwrapped_network().state_dict()], trainer.device,
        inference_allowed_mirroring_axes=trainer.inference_allowed_mirroring_axes)
    summaries = {}
    joint = trainer.joint_plan
    data_ids = joint.data_identifiers((m.dataset_id for m in trainer.spec.members), trainer.configuration_name)
    folds = collection_fold(trainer.spec, trainer.fold, trainer.configuration_name, joint.member_plans_identifier,
                            data_identifiers=data_ids)
    total = sum(len(val_ids) for _, val_ids in folds.values())
    trainer.print_to_log_file(f"final validation: {total} cases of {len(folds)} members")
    bar = tqdm(total=total, desc="final validation", unit="case", disable=trainer.local_rank != 0)
    start, done = time.time(), 0
    for member_index, (_, val_ids) in folds.items():
        ctx = predictor.member_context(member_index)
        m = ctx.member
        if not val_ids:  # a training-only member (e.g. one case, every fold's training set): nothing to score
            trainer.print_to_log_file(f"{m.dataset_name}: no validation cases in fold {trainer.fold}, not validated")
            continue
        out_dir = Path(trainer.output_folder) / "validation" / m.dataset_name
        out_dir.mkdir(parents=True, exist_ok=True)
        data_folder = preprocessed_dir() / m.dataset_name / ctx.configuration_manager.data_identifier
        dataset = infer_dataset_class(str(data_folder))(str(data_folder), list(val_ids))
        trainer.print_to_log_file(f"validating {m.dataset_name}: {len(val_ids)} cases")
        bar.set_postfix_str(m.dataset_name)
        for key in val_ids:
            data, _, _, props = dataset.load_case(key)
            full = torch.zeros((trainer.spec.num_modalities, *data.shape[1:]), dtype=torch.float32)
            for ch, slot in enumerate(ctx.slots):
                full[slot] = torch.from_numpy(data[ch][:])
            logits = predictor.predict_logits(full, member_index)
            predictor.export(logits, props, ctx, str(out_dir / key), save_probabilities)
            bar.update()
            done += 1
        summaries[m.dataset_name] = evaluate_folder(
            str(preprocessed_dir() / m.dataset_name / "gt_segmentations"), str(out_dir), m.labels,
            file_ending=m.file_ending, output_folder=str(out_dir), member_name=m.dataset_name,
            num_processes=1 if len(val_ids) <= 16 else 2)  # a spawn pool costs seconds per member
        fg = summaries[m.dataset_name].get("foreground_mean", {}).get("Dice")
        elapsed = time.time() - start
        left = elapsed / done * (total - done) if done else 0.0
        trainer.print_to_log_file(f"{m.dataset_name}: mean validation Dice {fmt(fg)} ({format_duration(elapsed)} "
                                  f"so far, about {format_duration(left)} left)")
    bar.close()
    return summaries
