"""nnharmony_predict -i IN -o OUT -c COLLECTION -tr NAME [-cfg CONFIG] [-f FOLDS] [--dataset ID|auto] ..."""
from __future__ import annotations

import argparse
import sys

from nnharmony.cli.common import exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnharmony_predict",
                                description="Predict a folder of images (nnU-Net naming CASE_0000.nii.gz) with a "
                                            "model trained on a collection.")
    p.add_argument("-i", required=True, help="input folder")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-c", "--collection", default=None, help="collection of the trained model (required unless "
                                                             "-pretrained_weights)")
    p.add_argument("-tr", default="nnHarmonyTrainer")
    p.add_argument("-p", default="nnHarmonyPlans")
    p.add_argument("-cfg", default=None,
                   help="configuration (default: the only one trained for this trainer, else 3d_fullres)")
    p.add_argument("-f", nargs="+", default=None, help="folds to ensemble (default: all trained folds)")
    p.add_argument("-chk", default="checkpoint_final.pth")
    p.add_argument("--dataset", default=None, help="member dataset id of the input images, or 'auto'")
    p.add_argument("--tasks", nargs="+", default=None, help="predict only these global tasks")
    p.add_argument("--save_probabilities", action="store_true")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("-step_size", type=float, default=0.5)
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("--support", default=None, help="UniverSeg: folder of labelled examples of the new task")
    p.add_argument("--label", default=None, help="UniverSeg: label value (or name) to segment in the support labels")
    p.add_argument("-K", "--ensemble", type=int, default=1, help="UniverSeg: number of random support sets")
    p.add_argument("-S", "--support-size", type=int, default=8, help="UniverSeg: support set size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-pretrained_weights", default=None, metavar="FILE",
                   help="UniverSeg: segment from --support with this release state dict (or UniverSegTrainer "
                        "checkpoint), no collection and no training")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import torch

    if args.pretrained_weights is not None:  # UniverSeg release checkpoint: no collection, no trainer
        from nnharmony.inference.predict_folder import check_output_folder
        from nnharmony.inference.support import predict_from_weights_file

        check_output_folder(args.o, {"-i": args.i, "--support": args.support})
        predict_from_weights_file(args)
        return
    if args.collection is None:
        raise ValueError("-c COLLECTION is required (or -pretrained_weights FILE with --support for UniverSeg)")

    from nnharmony.utils.find_class import find_trainer_class

    from nnharmony.inference.predict_folder import (check_output_folder, default_configuration, model_folder,
                                                    predict_folder)

    trainer_class = find_trainer_class(args.tr)
    from nnharmony.trainers.nnharmony_trainer import nnHarmonyTrainer

    if not issubclass(trainer_class, nnHarmonyTrainer):
        raise ValueError(f"{args.tr} is a plain nnU-Net trainer: its models are the per-dataset paradigm, one per "
                         f"member in $nnUNet_results/DatasetXXX_Name/; predict them with nnUNetv2_predict -d DATASET "
                         f"-tr {args.tr}")
    if args.cfg is None:
        args.cfg = default_configuration(args.collection, args.tr, args.p)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("-device cuda was requested but no CUDA device is available; use -device cpu")
    # before a model is loaded: -i exists, -o is not -i (nor --support) and can be written
    check_output_folder(args.o, {"-i": args.i, "--support": args.support})
    if hasattr(trainer_class, "predict_from_support"):
        # in-context trainers predict from a support folder instead of a fixed task list
        trainer_class.predict_from_support(args)
        return
    if args.support is not None:
        raise ValueError(f"--support is for in-context trainers (UniverSegTrainer), not {args.tr}")
    from nnharmony.inference.predictor import CollectionPredictor

    folder = model_folder(args.collection, args.tr, args.p, args.cfg)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no trained model; run nnharmony_train {args.collection} {args.cfg} FOLD "
                                f"-tr {args.tr} first")
    predictor = CollectionPredictor.from_model_folder(folder, args.f, args.chk, torch.device(args.device),
                                                      tile_step_size=args.step_size, use_mirroring=not args.disable_tta)
    if predictor.trainer_class is not trainer_class:
        raise ValueError(f"{folder}: checkpoints were written by {predictor.trainer_class.__name__}, not {args.tr}")
    predict_folder(predictor, args.i, args.o, args.dataset, args.save_probabilities, args.tasks)


if __name__ == "__main__":
    sys.exit(main())
