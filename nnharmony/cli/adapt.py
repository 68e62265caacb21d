"""nnharmony_adapt --from OLD_COLLECTION -c NEW_COLLECTION -tr TRAINER [-cfg] [-f FOLD] [--epochs E] ..."""
from __future__ import annotations

import argparse
import sys

from nnharmony.cli.common import exit_on_user_error, parse_trainer_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnharmony_adapt",
        description="Adapt a model trained on OLD to NEW, a collection planned with "
                    "'nnharmony_plan_and_preprocess ... -n NEW --extends OLD' that adds members, modalities or "
                    "tasks: widen the model without disturbing existing weights, fine-tune the trainer's adaptation "
                    "parameters, and report old members' Dice before and after.")
    p.add_argument("--from", dest="old", required=True, help="collection the model was trained on")
    p.add_argument("-c", "--collection", required=True, help="the extended collection")
    p.add_argument("-tr", required=True, help="trainer of the model (e.g. UHarmonyTrainer, HermesTrainer)")
    p.add_argument("-p", default="nnHarmonyPlans")
    p.add_argument("-cfg", default="3d_fullres")
    p.add_argument("-f", default="0", help="fold")
    p.add_argument("-chk", default="checkpoint_final.pth")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--iterations-per-epoch", type=int, default=250)
    p.add_argument("--val-iterations-per-epoch", type=int, default=50)
    p.add_argument("--trainer-options", default=None,
                   help="JSON object of trainer attributes for fine-tuning, as for nnharmony_train")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from nnharmony.trainers.adapt import adapt_model

    adapt_model(args.old, args.collection, args.tr, args.cfg, args.f if args.f == "all" else int(args.f), args.p,
                args.device, args.epochs, args.iterations_per_epoch, args.val_iterations_per_epoch, args.chk,
                parse_trainer_options(args.trainer_options))


if __name__ == "__main__":
    sys.exit(main())
