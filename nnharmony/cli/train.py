"""nnharmony_train COLLECTION CONFIG FOLD -tr NAME [-p PLANS] [-num_gpus N] [-device cpu|cuda|mps] [--c] ..."""
from __future__ import annotations

import argparse
import sys

from nnharmony.cli.common import exit_on_user_error, parse_trainer_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnharmony_train",
        description="Train on a collection. -tr names an nnharmony trainer, a trainer of a package registered under "
        "the entry-point group 'nnharmony.trainers', or an nnU-Net trainer (then one plain nnU-Net is trained per "
        "member on the collection's folds).",
    )
    p.add_argument("collection", help="collection name, as given to nnharmony_plan_and_preprocess -n")
    p.add_argument("configuration", help="3d_fullres or 2d")
    p.add_argument("fold", help="fold 0-4 (the union of every member's nnU-Net fold) or 'all'")
    p.add_argument("-tr", default="nnHarmonyTrainer", help="trainer class name (default nnHarmonyTrainer)")
    p.add_argument("-p", default="nnHarmonyPlans", help="joint plans identifier (default nnHarmonyPlans)")
    p.add_argument("-num_gpus", type=int, default=1, help="processes for DDP (NCCL on cuda, gloo on cpu)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--val", action="store_true", help="only run the final validation (needs checkpoint_final.pth)")
    p.add_argument("--npz", action="store_true", help="save validation probabilities")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--iterations-per-epoch", type=int, default=None)
    p.add_argument("--val-iterations-per-epoch", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None, help="write checkpoint_latest.pth every N epochs (nnU-Net: 50)")
    p.add_argument("--disable_checkpointing", action="store_true")
    p.add_argument("-pretrained_weights", default=None)
    p.add_argument("--trainer-options", default=None,
                   help='JSON object of trainer attributes, e.g. \'{"uharmony_restoration": "domain"}\'')
    p.add_argument("--holdout", nargs="+", default=None, metavar="ID",
                   help="member dataset ids (or DatasetXXX_Name) never sampled in training, to measure generalization "
                        "to unseen datasets (trainers with a 'holdout' option, e.g. UniverSegTrainer); same as "
                        "--trainer-options '{\"holdout\": [ID, ...]}'")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from nnharmony.trainers.run import TrainingOptions, run_training

    trainer_options = parse_trainer_options(args.trainer_options)
    if args.holdout:
        trainer_options["holdout"] = [int(h) if h.isdigit() else h for h in args.holdout]
    run_training(TrainingOptions(
        collection=args.collection, configuration=args.configuration, fold=args.fold, trainer=args.tr, plans=args.p,
        device=args.device, num_gpus=args.num_gpus, continue_training=args.c, validation_only=args.val,
        epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
        val_iterations_per_epoch=args.val_iterations_per_epoch, save_every=args.save_every,
        disable_checkpointing=args.disable_checkpointing, npz=args.npz, pretrained_weights=args.pretrained_weights,
        trainer_options=trainer_options,
    ))


if __name__ == "__main__":
    sys.exit(main())
