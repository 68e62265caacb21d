"""nnharmony_adapt --from OLD_COLLECTION -d NEW_COLLECTION -tr TRAINER [-c CONFIG] [-f FOLD] [--epochs E] ..."""
from __future__ import annotations

import argparse
import sys

from nnharmony.cli import preflight
from nnharmony.cli.common import (add_collection_flags, apply_old_collection_flags, exit_on_user_error, make_parser,
                                  parse_fold, parse_trainer_options)

EXAMPLES = ("nnharmony_adapt --from 900 -d 905 -c 3d_fullres -f 0 -tr UHarmonyTrainer -device cpu --epochs 20",)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(
        "nnharmony_adapt",
        "Adapt a model trained on OLD to NEW, a collection planned with "
        "'nnharmony_plan_and_preprocess ... -n NEW --extends OLD' that adds members, modalities or tasks: widen "
        "the model without disturbing existing weights, fine-tune the trainer's adaptation parameters, and report "
        "old members' Dice before and after.", EXAMPLES)
    p.add_argument("--from", dest="old", required=True, help="collection the model was trained on (name or id)")
    add_collection_flags(p, "the extended collection", "3d_fullres", "configuration of the trained model")
    p.add_argument("-tr", required=True, help="trainer of the model (e.g. UHarmonyTrainer, HermesTrainer)")
    p.add_argument("-p", default="nnHarmonyPlans", help="joint plans identifier")
    p.add_argument("-f", type=parse_fold, default=0, help="fold")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint of the trained model")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="device")
    p.add_argument("--verbose", action="store_true", help="full tracebacks on errors")
    p.add_argument("--epochs", type=int, default=50, help="fine-tuning epochs")
    p.add_argument("--iterations-per-epoch", type=int, default=250, help="fine-tuning iterations per epoch")
    p.add_argument("--val-iterations-per-epoch", type=int, default=50, help="validation iterations per epoch")
    p.add_argument("--trainer-options", default=None, metavar="JSON",
                   help="JSON object of trainer attributes for fine-tuning, as for nnharmony_train")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    preflight.require_folders("nnUNet_preprocessed", "nnUNet_results")
    apply_old_collection_flags(args, preflight.planned_collection, "3d_fullres")
    args.collection = preflight.planned_collection(args.collection)
    args.old = preflight.trained_collection(args.old)
    preflight.check_trainer(args.tr)
    preflight.check_trained_model(args.old, args.tr, args.p, args.cfg, [str(args.f)], args.chk)
    trainer_options = parse_trainer_options(args.trainer_options)
    from nnharmony.trainers.adapt import adapt_model

    adapt_model(args.old, args.collection, args.tr, args.cfg, args.f, args.p, args.device, args.epochs,
                args.iterations_per_epoch, args.val_iterations_per_epoch, args.chk, trainer_options)


if __name__ == "__main__":
    sys.exit(main())
