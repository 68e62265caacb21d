"""nnharmony_plan_and_preprocess -d 901 902 903 -n Collection900_Synthetic [-c 3d_fullres 2d] [-np N] [-npfp N]"""
from __future__ import annotations

import argparse
import sys

from nnharmony.cli import preflight
from nnharmony.cli.common import HelpFormatter, exit_on_user_error, parse_key_value_pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnharmony_plan_and_preprocess",
        description="Run nnU-Net's fingerprint extraction, planning and preprocessing for every member dataset, "
        "then write the collection spec and the joint plan to $nnUNet_preprocessed/NAME/.",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    p.add_argument("-d", nargs="*", default=[], help="member dataset ids (or DatasetXXX_Name)")
    p.add_argument("-n", "--name", required=True, help="collection name, e.g. Collection900_Abdomen")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations (3d_fullres, 2d) (default: 3d_fullres)")
    p.add_argument("-np", nargs="+", type=int, default=None,
                   help="processes for preprocessing, one value or one per configuration (default: 2d 4, 3d_fullres 2)")
    p.add_argument("-npfp", type=int, default=None,
                   help="processes for fingerprint extraction and raw-data validation (default: the largest -np)")
    p.add_argument("-pl", default="ExperimentPlanner", help="experiment planner class name, as in nnU-Net")
    p.add_argument("-gpu_memory_target", type=float, default=None, help="GPU memory target in GB for the planner")
    p.add_argument("--spec", default=None, help="use this hand-written collection spec (JSON) instead of generating one")
    p.add_argument("--domain", nargs="*", default=[], metavar="ID=DOMAIN",
                   help="domain of a member (default: one domain per dataset), e.g. 901=siteA 902=siteA")
    p.add_argument("--modality-alias", nargs="*", default=[], metavar="CHANNEL=MODALITY",
                   help="map channel names onto one modality, e.g. T1w=T1 MR=MRI")
    p.add_argument("--task-alias", nargs="*", default=[], metavar="[DatasetXXX_Name:]LABEL=TASK",
                   help="map a label onto a global task name, e.g. Dataset902_B:tumour=lesion")
    p.add_argument("--no-merge", action="store_true", help="do not merge labels with the same name across members")
    p.add_argument("--sampling", default=None, choices=["uniform", "proportional", "sqrt", "temperature", "explicit"],
                   help="how the member of each training sample is drawn (default sqrt; see README)")
    p.add_argument("--temperature", type=float, default=None,
                   help="tau of the 'temperature' sampling scheme (default 0.5)")
    p.add_argument("--extends", default=None, metavar="COLLECTION",
                   help="this collection extends COLLECTION (new members, modalities, tasks) so that models trained on "
                        "it can be adapted with nnharmony_adapt: ids and network configuration are kept")
    p.add_argument("--clean", action="store_true", help="redo every step and replace an existing collection")
    p.add_argument("--verbose", action="store_true",
                   help="nnU-Net's verbose planning output, and the traceback of an error instead of one line")
    return p


def _preprocessing_processes(np_values: list[int] | None, configurations: list[str]) -> dict[str, int] | None:
    if np_values is None:
        return None
    if len(np_values) not in (1, len(configurations)):
        raise ValueError(f"-np takes one value or one per configuration ({len(configurations)}), got {np_values}")
    return dict(zip(configurations, np_values * len(configurations) if len(np_values) == 1 else np_values))


def _spec_options(args: argparse.Namespace) -> dict:
    """The spec options given on the command line, and only those: re-planning applies them to a kept spec."""
    options: dict = {}
    if args.domain:
        options["domains"] = {int(k): v for k, v in parse_key_value_pairs(args.domain, "--domain").items()}
    if args.modality_alias:
        options["modality_aliases"] = parse_key_value_pairs(args.modality_alias, "--modality-alias")
    if args.task_alias:
        options["task_aliases"] = parse_key_value_pairs(args.task_alias, "--task-alias")
    if args.no_merge:
        options["merge_by_name"] = False
    sampling = {k: v for k, v in (("scheme", args.sampling), ("temperature", args.temperature)) if v is not None}
    if sampling:
        options["sampling"] = sampling
    return options


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # before nnU-Net is imported: the folders and the planner's name (close matches listed)
    preflight.require_folders("nnUNet_raw", outputs=["nnUNet_preprocessed"])
    preflight.check_planner(args.pl)
    from nnharmony.planners.plan_and_preprocess import plan_and_preprocess_collection

    spec, joint = plan_and_preprocess_collection(
        [int(d) if str(d).isdigit() else d for d in args.d], args.name, args.c, args.pl, args.gpu_memory_target,
        _preprocessing_processes(args.np, args.c), args.clean, args.spec, _spec_options(args), args.verbose,
        args.extends, args.npfp,
    )
    print(f"\ncollection {spec.name}: {len(spec.members)} members, modalities {spec.modalities}, "
          f"{spec.num_tasks} global tasks {spec.tasks}")
    for c, cfg in joint["configurations"].items():
        print(f"  {c}: shared patch {[int(x) for x in cfg['patch_size']]}, batch {cfg['batch_size']}, "
              f"{cfg['architecture']['arch_kwargs']['n_stages']} stages")


if __name__ == "__main__":
    sys.exit(main())
