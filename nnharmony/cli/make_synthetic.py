"""``nnharmony_make_synthetic``: write the built-in synthetic multi-domain collection into ``$nnUNet_raw``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnharmony.cli.common import HelpFormatter

EPILOG = """\
members (ids first-id, first-id+1, ...):
  Dataset901_SynthCT        CT, 1 mm isotropic, HU                   labels liver, spleen, kidney
  Dataset902_SynthMRI       T1, 3 x 1 x 1 mm (thick slices), bias   labels liver, kidney, lesion
  Dataset903_SynthMultiMR   T1 + T2, 1.2 mm isotropic                labels spleen, lesion
  Dataset904_SynthCTLowDose CT, 2 x 0.8 x 0.8 mm, strong noise       labels liver, spleen, kidney, lesion
  Dataset905_SynthT2        T2, 1.5 mm isotropic, strong bias        labels liver, spleen
  (more members repeat these with a number appended to the name)

examples:
  nnharmony_make_synthetic                                # 3 members x 10 cases of about 48^3 in $nnUNet_raw
  nnharmony_make_synthetic --members 5 --cases 40 --shape 96 128 128 --seed 1 -o /data/nnUNet_raw
  nnharmony_make_synthetic --preset quick --first-id 961 --shape 20 48 48   # nnharmony_benchmark --quick's data
  nnharmony_plan_and_preprocess -d 901 902 903 -n Collection900_Synthetic
"""


def build_parser() -> argparse.ArgumentParser:
    from nnharmony.dataset_conversion.synthetic import MEMBER_PRESETS

    p = argparse.ArgumentParser(
        prog="nnharmony_make_synthetic",
        description="Write a collection of small synthetic abdominal datasets (different modalities, intensity "
                    "ranges, spacings, channel counts and partly overlapping label sets) in nnU-Net raw format. "
                    "Deterministic in --seed; an existing member made with the same parameters is kept.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="raw folder to write into (default: $nnUNet_raw)")
    p.add_argument("--first-id", type=int, default=901, help="dataset id of the first member (default: 901)")
    p.add_argument("--cases", type=int, default=10, help="training cases per member (default: 10)")
    p.add_argument("--shape", type=int, nargs=3, default=(48, 48, 48), metavar=("Z", "Y", "X"),
                   help="field of view in mm = voxels of the 1 mm member (default: 48 48 48)")
    p.add_argument("--members", type=int, default=3, help="number of member datasets (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--preset", default=None, choices=sorted(MEMBER_PRESETS),
                   help="members of a preset instead of --members/--cases: 'quick' = nnharmony_benchmark --quick's "
                        "(CT and T1 with 8 training + 4 validation cases, a T2 member with 3 + 5; each writes its "
                        "fold-0 split, see nnharmony.dataset_conversion.synthetic.synthetic_splits)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace datasets that already use these ids (otherwise refused)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nnharmony.dataset_conversion.synthetic import MEMBER_PRESETS, make_synthetic_collection

    try:
        folders = make_synthetic_collection(
            out_root=args.output, first_id=args.first_id, num_cases=args.cases, shape=tuple(args.shape),
            seed=args.seed, num_members=args.members, overwrite=args.overwrite, verbose=True,
            members=MEMBER_PRESETS[args.preset] if args.preset else None,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"nnharmony_make_synthetic: error: {e}", file=sys.stderr)
        return 2
    for f in folders:
        print(f)
    ids = " ".join(str(args.first_id + k) for k in range(len(folders)))
    print(f"next: nnharmony_plan_and_preprocess -d {ids} -n Collection{args.first_id - 1:03d}_Synthetic")
    return 0


if __name__ == "__main__":
    sys.exit(main())
