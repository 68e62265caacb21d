"""nnharmony_train COLLECTION CONFIG FOLD -tr NAME [-p PLANS] [-num_gpus N] [-device cpu|cuda|mps] [--c] ...

nnUNetv2_train's arguments and flags mean what they mean there (COLLECTION by name or id, as nnU-Net's dataset);
nnharmony's own flags (budget, trainer options) are spelt ``--like-this``.
"""
from __future__ import annotations

import argparse
import sys

from nnharmony.cli import preflight
from nnharmony.cli.common import exit_on_user_error, make_parser, parse_fold, parse_trainer_options

EXAMPLES = (
    "nnharmony_train 900 3d_fullres 0 -tr nnHarmonyTrainer -device cpu --epochs 20 --iterations-per-epoch 50",
    "nnharmony_train Collection900_Synthetic 3d_fullres 0 -tr UHarmonyTrainer --c          # continue",
    "nnharmony_train 900 2d all -tr HermesTrainer --trainer-options '{\"initial_lr\": 0.001}'",
    "nnharmony_train 900 3d_fullres 0 -tr nnUNetTrainer   # per-dataset paradigm: one nnU-Net per member",
)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(
        "nnharmony_train",
        "Train on a collection. -tr names an nnharmony trainer, a trainer of a package registered under the "
        "entry-point group 'nnharmony.trainers', or an nnU-Net trainer (then one plain nnU-Net is trained per "
        "member on the collection's folds).", EXAMPLES)
    p.add_argument("collection", help="collection name (Collection900_Synthetic) or id (900), as planned by "
                                      "nnharmony_plan_and_preprocess -n")
    p.add_argument("configuration", help="configuration of the joint plans, e.g. 3d_fullres or 2d")
    p.add_argument("fold", type=parse_fold,
                   help="fold 0-4 (the union of every member's nnU-Net fold) or 'all'")
    p.add_argument("-tr", default="nnHarmonyTrainer", help="trainer class name")
    p.add_argument("-p", default="nnHarmonyPlans", help="joint plans identifier")
    p.add_argument("-pretrained_weights", default=None,
                   help="checkpoint to initialize the network from (output layers not transferred), as nnU-Net")
    p.add_argument("-num_gpus", type=int, default=1, help="processes for DDP (NCCL on cuda, gloo on cpu)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"],
                   help="device (select GPUs with CUDA_VISIBLE_DEVICES, as in nnU-Net)")
    p.add_argument("--npz", action="store_true", help="save the final validation's probabilities")
    p.add_argument("--c", action="store_true", help="continue from checkpoint_final/latest/best")
    p.add_argument("--val", action="store_true", help="only run the final validation (needs checkpoint_final.pth)")
    p.add_argument("--val_best", action="store_true",
                   help="run the final validation with checkpoint_best.pth instead of the final weights")
    p.add_argument("--disable_checkpointing", action="store_true", help="write no checkpoints (testing)")
    p.add_argument("--verbose", action="store_true", help="full tracebacks on errors")
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (default: the trainer's, nnU-Net 1000)")
    p.add_argument("--iterations-per-epoch", type=int, default=None,
                   help="training iterations per epoch (default: the trainer's, nnU-Net 250)")
    p.add_argument("--val-iterations-per-epoch", type=int, default=None,
                   help="validation iterations per epoch (default: the trainer's, nnU-Net 50)")
    p.add_argument("--save-every", type=int, default=None,
                   help="write checkpoint_latest.pth every N epochs (default: the trainer's, nnU-Net 50)")
    p.add_argument("--trainer-options", default=None, metavar="JSON",
                   help='JSON object of trainer attributes, e.g. \'{"initial_lr": 0.001}\'')
    p.add_argument("--holdout", nargs="+", default=None, metavar="ID",
                   help="member dataset ids (or DatasetXXX_Name) never sampled in training, to measure generalization "
                        "to unseen datasets (trainers with a 'holdout' option, e.g. UniverSegTrainer); same as "
                        "--trainer-options '{\"holdout\": [ID, ...]}'")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Folders, collection, trainer name and configuration, checked before torch and nnU-Net are imported."""
    preflight.require_folders("nnUNet_preprocessed", outputs=["nnUNet_results"])
    args.collection = preflight.planned_collection(args.collection)
    preflight.check_trainer(args.tr)
    preflight.check_configuration(args.configuration, preflight.planned_configurations(args.collection, args.p),
                                  f"the joint plans {args.p} of {args.collection}")
    if args.val_best and args.disable_checkpointing:
        raise ValueError("--val_best needs checkpoint_best.pth, which --disable_checkpointing does not write")
    if args.num_gpus < 1:
        raise ValueError(f"-num_gpus must be at least 1, got {args.num_gpus}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    trainer_options = parse_trainer_options(args.trainer_options)
    from nnharmony.trainers.run import TrainingOptions, run_training

    if args.holdout:
        trainer_options["holdout"] = [int(h) if h.isdigit() else h for h in args.holdout]
    run_training(TrainingOptions(
        collection=args.collection, configuration=args.configuration, fold=args.fold, trainer=args.tr, plans=args.p,
        device=args.device, num_gpus=args.num_gpus, continue_training=args.c, validation_only=args.val,
        val_best=args.val_best, epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
        val_iterations_per_epoch=args.val_iterations_per_epoch, save_every=args.save_every,
        disable_checkpointing=args.disable_checkpointing, npz=args.npz, pretrained_weights=args.pretrained_weights,
        trainer_options=trainer_options,
    ))


if __name__ == "__main__":
    sys.exit(main())
