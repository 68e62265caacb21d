"""nnharmony_analyze_priors -d COLLECTION -tr HermesTrainer [-p PLANS] [-c CONFIG] [-f FOLD] -o OUT"""
from __future__ import annotations

import argparse
import sys

from nnharmony.cli import preflight
from nnharmony.cli.common import (add_collection_flags, apply_old_collection_flags, exit_on_user_error, make_parser,
                                  parse_fold)

EXAMPLES = ("nnharmony_analyze_priors -d 900 -c 3d_fullres -f 0 -o priors900",)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(
        "nnharmony_analyze_priors",
        "Cosine similarity of a trained Hermes model's learned task priors and modality priors (mean of each "
        "modality's tokens), per fusion level and averaged over levels: CSV matrices and PNG heatmaps (Hermes "
        "paper, figures 4-5).", EXAMPLES)
    add_collection_flags(p, "collection the model was trained on", "3d_fullres", "configuration of the model")
    p.add_argument("-tr", default="HermesTrainer", help="Hermes trainer of the model")
    p.add_argument("-p", default="nnHarmonyPlans", help="joint plans identifier")
    p.add_argument("-f", type=parse_fold, default=0, help="fold")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("--verbose", action="store_true", help="full tracebacks on errors")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    preflight.require_folders("nnUNet_results")
    apply_old_collection_flags(args, preflight.trained_collection, "3d_fullres")
    args.collection = preflight.trained_collection(args.collection)
    preflight.check_trainer(args.tr)
    folder = preflight.check_trained_model(args.collection, args.tr, args.p, args.cfg, [str(args.f)], args.chk)
    from nnharmony.evaluation.prior_analysis import analyze_model

    summary = analyze_model(folder, args.o, args.f, args.chk, expected_trainer=args.tr)
    print(f"{len(summary['levels'])} fusion levels: " + ", ".join(lv["label"] for lv in summary["levels"]))
    for kind in ("task", "modality"):
        print(f"{kind} priors: " + ", ".join(f"{args.o}/{f}" for f in summary["files"][kind]))


if __name__ == "__main__":
    sys.exit(main())
