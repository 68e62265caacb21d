"""nnharmony_predict -i IN -o OUT -d COLLECTION [-c CONFIG] [-tr NAME] [-f FOLDS] [--member ID|auto] ...

Flags that nnUNetv2_predict has mean what they mean there (``-d`` the collection the model was trained on, by
name or id; ``-c`` the configuration); nnharmony's own flags are spelt ``--like-this``.
"""
from __future__ import annotations

import argparse
import os
import sys

from nnharmony.cli import preflight
from nnharmony.cli.common import (add_collection_flags, add_deprecated_alias, apply_old_collection_flags, exit_on_user_error,
                                  make_parser)
from nnharmony.records.model_folder import default_configuration

EXAMPLES = (
    "nnharmony_predict -i val902/images -o pred902 -d 900 -c 3d_fullres -f 0 --member 902 -device cpu",
    "nnharmony_predict -i IN -o OUT -d Collection900_Synthetic -c 3d_fullres -tr UHarmonyTrainer --member auto",
    "nnharmony_predict -i IN -o OUT -d 900 -c 3d_fullres --member 902 -num_parts 2 -part_id 0   # and -part_id 1",
)


def _env_int(var: str, default: int) -> int:
    """nnU-Net's ``nnUNet_npp``/``nnUNet_nps`` defaults for ``-npp``/``-nps``."""
    try:
        return int(os.environ.get(var, default))
    except ValueError:
        return default


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("nnharmony_predict", "Predict a folder of images (nnU-Net naming CASE_0000.nii.gz) with a model "
                    "trained on a collection; each case is written in its member's own label values.", EXAMPLES)
    p.add_argument("-i", required=True, help="input folder (nnU-Net naming CASE_0000<ending>, CASE_0001<ending>...)")
    p.add_argument("-o", required=True, help="output folder (created if needed)")
    add_collection_flags(p, "collection the model was trained on", None,
                         "configuration (default: the only one trained with -tr/-p, else 3d_fullres)")
    p.add_argument("-p", default="nnHarmonyPlans", help="joint plans identifier")
    p.add_argument("-tr", default="nnHarmonyTrainer", help="trainer class the model was trained with")
    p.add_argument("-f", nargs="+", default=None, help="folds to ensemble (default: every fold with -chk)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name in each fold folder")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation (faster)")
    p.add_argument("--save_probabilities", action="store_true", help="also write CASE.npz/CASE.pkl probabilities")
    p.add_argument("--continue_prediction", action="store_true",
                   help="resume an interrupted run: cases whose prediction exists in -o are skipped (files are "
                        "written atomically, so an existing one is complete)")
    p.add_argument("-npp", type=int, default=_env_int("nnUNet_npp", 3),
                   help="processes preprocessing cases ahead of the network (0 with -nps 0: no worker processes; "
                        "fewer than 4 cases run in one process; default from $nnUNet_npp, else 3)")
    p.add_argument("-nps", type=int, default=_env_int("nnUNet_nps", 3),
                   help="processes resampling and writing predictions (default from $nnUNet_nps, else 3)")
    p.add_argument("-num_parts", type=int, default=1,
                   help="split the input folder into this many parts, one per nnharmony_predict call")
    p.add_argument("-part_id", type=int, default=0, help="which part this call predicts (0 .. num_parts-1)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"],
                   help="device (select the GPU with CUDA_VISIBLE_DEVICES, as in nnU-Net)")
    p.add_argument("--disable_progress_bar", action="store_true", help="no progress bar (batch jobs)")
    p.add_argument("--verbose", action="store_true", help="talk more; full tracebacks on errors")
    p.add_argument("--member", default=None,
                   help="member dataset (id or DatasetXXX_Name) the input images come from, or 'auto' to let the "
                        "model infer it (UHarmonyTrainer, HermesTrainer); may be omitted with one member")
    p.add_argument("--tasks", nargs="+", default=None, help="predict only these global tasks (default: all)")
    p.add_argument("--support", default=None, help="UniverSeg: folder of labelled examples of the new task")
    p.add_argument("--label", default=None, help="UniverSeg: label value (or name) to segment in the support labels")
    p.add_argument("-K", "--ensemble", type=int, default=1, help="UniverSeg: number of random support sets")
    p.add_argument("-S", "--support-size", type=int, default=8, help="UniverSeg: support set size")
    p.add_argument("--seed", type=int, default=0, help="UniverSeg: seed of the support-set draw")
    p.add_argument("-pretrained_weights", default=None, metavar="FILE",
                   help="UniverSeg: segment from --support with this release state dict (or UniverSegTrainer "
                        "checkpoint), no collection and no training")
    add_deprecated_alias(p, "--dataset", "--member", "member")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked without torch or nnU-Net: flags, folders, collection, trainer name,
    configuration, folds and checkpoints."""
    preflight.require_folders("nnUNet_preprocessed", "nnUNet_results")
    apply_old_collection_flags(args, preflight.trained_collection)
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise ValueError(f"-part_id must be in 0..{args.num_parts - 1} for -num_parts {args.num_parts}, "
                         f"got {args.part_id}")
    if args.npp < 0 or args.nps < 0:
        raise ValueError(f"-npp and -nps must be 0 or more, got {args.npp} and {args.nps}")
    if not 0 < args.step_size <= 1:
        raise ValueError(f"-step_size must be in (0, 1], got {args.step_size}")
    args.collection = preflight.resolve_trained(args.collection)
    preflight.check_trainer(args.tr)
    if preflight.is_plain_nnunet_trainer(args.tr):
        raise ValueError(plain_trainer_message(args.tr))
    if args.cfg is None:
        args.cfg = default_configuration(args.collection, args.tr, args.p)
    if args.f is not None:
        bad = [f for f in args.f if f != "all" and not f.isdigit()]
        if bad:
            raise ValueError(f"-f: folds are integers or 'all', got {bad}")
    if args.support is None:  # in-context models (--support) are checked by their own predictor
        preflight.check_trained_model(args.collection, args.tr, args.p, args.cfg, args.f, args.chk)
    else:
        preflight.trained_collection(args.collection)


def plain_trainer_message(trainer: str) -> str:
    return (f"{trainer} is a plain nnU-Net trainer: its models are the per-dataset paradigm, one per member in "
            f"$nnUNet_results/DatasetXXX_Name/; predict them with nnUNetv2_predict -d DATASET -tr {trainer}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.pretrained_weights is not None:  # UniverSeg release checkpoint: no collection, no trainer
        from nnharmony.inference.predict_folder import check_output_folder
        from nnharmony.inference.support import predict_from_weights_file

        check_output_folder(args.o, {"-i": args.i, "--support": args.support})
        predict_from_weights_file(args, run_record(args, argv))
        return
    check_arguments(args)
    import torch

    from nnharmony.inference.predict_folder import check_output_folder, predict_folder
    from nnharmony.records.model_folder import find_trainer_class, model_folder

    trainer_class = find_trainer_class(args.tr)
    from nnharmony.trainers.nnharmony_trainer import nnHarmonyTrainer

    if not issubclass(trainer_class, nnHarmonyTrainer):
        raise ValueError(plain_trainer_message(args.tr))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("-device cuda was requested but no CUDA device is available; use -device cpu")
    # before a model is loaded: -i exists, -o is not -i (nor --support) and can be written
    check_output_folder(args.o, {"-i": args.i, "--support": args.support})
    if hasattr(trainer_class, "predict_from_support"):
        # in-context trainers predict from a support folder instead of a fixed task list
        trainer_class.predict_from_support(args, run_record(args, argv))
        return
    if args.support is not None:
        raise ValueError(f"--support is for in-context trainers (UniverSegTrainer), not {args.tr}")
    from nnharmony.inference.predictor import CollectionPredictor

    folder = model_folder(args.collection, args.tr, args.p, args.cfg)
    predictor = CollectionPredictor.from_model_folder(folder, args.f, args.chk, torch.device(args.device),
                                                      tile_step_size=args.step_size, use_mirroring=not args.disable_tta,
                                                      verbose=args.verbose)
    if predictor.trainer_class is not trainer_class:
        raise ValueError(f"{folder}: checkpoints were written by {predictor.trainer_class.__name__}, not {args.tr}")
    predict_folder(predictor, args.i, args.o, args.member, args.save_probabilities, args.tasks,
                   overwrite=not args.continue_prediction, num_parts=args.num_parts, part_id=args.part_id,
                   num_processes_preprocessing=args.npp, num_processes_export=args.nps,
                   progress_bar=not args.disable_progress_bar,
                   record=run_record(args, argv))


def run_record(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """What ``predict_args.json`` records of the command (with the model files, added by the route): every
    argument after the checks (a collection id resolved to its name) and the command line as typed."""
    return {"arguments": {k: v for k, v in vars(args).items() if k != "dataset"},
            "command": "nnharmony_predict " + " ".join(sys.argv[1:] if argv is None else argv)}


if __name__ == "__main__":
    sys.exit(main())
