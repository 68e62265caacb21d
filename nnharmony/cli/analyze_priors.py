"""nnharmony_analyze_priors -c COLLECTION -tr HermesTrainer [-p PLANS] [-cfg CONFIG] [-f FOLD] -o OUT"""
from __future__ import annotations

import argparse
import sys

from nnharmony.cli.common import exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnharmony_analyze_priors",
        description="Cosine similarity of a trained Hermes model's learned task priors and modality priors (mean "
                    "of each modality's tokens), per fusion level and averaged over levels: CSV matrices and PNG "
                    "heatmaps (Hermes paper, figures 4-5).")
    p.add_argument("-c", "--collection", required=True)
    p.add_argument("-tr", default="HermesTrainer", help="Hermes trainer of the model (default HermesTrainer)")
    p.add_argument("-p", default="nnHarmonyPlans")
    p.add_argument("-cfg", default="3d_fullres")
    p.add_argument("-f", default="0", help="fold")
    p.add_argument("-chk", default="checkpoint_final.pth")
    p.add_argument("-o", required=True, help="output folder")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from nnharmony.evaluation.prior_analysis import analyze_model
    from nnharmony.inference.predict_folder import model_folder

    folder = model_folder(args.collection, args.tr, args.p, args.cfg)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no trained model; run nnharmony_train {args.collection} {args.cfg} "
                                f"{args.f} -tr {args.tr} first")
    summary = analyze_model(folder, args.o, args.f, args.chk, expected_trainer=args.tr)
    print(f"{len(summary['levels'])} fusion levels: " + ", ".join(lv["label"] for lv in summary["levels"]))
    for kind in ("task", "modality"):
        print(f"{kind} priors: " + ", ".join(f"{args.o}/{f}" for f in summary["files"][kind]))


if __name__ == "__main__":
    sys.exit(main())
