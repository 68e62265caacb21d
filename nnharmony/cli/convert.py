"""``nnharmony_convert``: bring datasets into nnU-Net raw format (``$nnUNet_raw/DatasetXXX_Name``).

Subcommands: ``msd`` (Medical Segmentation Decathlon task folder), ``folder`` (plain images + labels in any
format SimpleITK reads), ``nnunet`` (import an existing nnU-Net raw folder under a new id), ``split-sites``
(one dataset per site from a CSV), ``check`` (validate a raw dataset).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnharmony.cli.common import HelpFormatter, add_subcommand

EPILOG = """\
examples:
  nnharmony_convert msd -i /downloads/Task04_Hippocampus -d 4
  nnharmony_convert folder -i ct/images -l ct/labels -d 950 -n TotalSegCT -m CT --labels-json ct/labels.json
  nnharmony_convert folder -i t1/t1w.nii.gz -l t1/t1w_seg-manual.nii.gz -d 960 -n SpinalCordT1 -m T1 \\
        --labels spinal_cord=1 --case-ids sub01
  nnharmony_convert nnunet -i /data/msd_hippocampus_mri -d 904 -n Hippocampus -m T1
  nnharmony_convert folder -i cmr/images -l cmr/labels -d 921 -n CardiacBSSFP -m bSSFP --labels-json cmr/labels.json
  nnharmony_convert nnunet -i /data/btcv_ct_slices -d 931 -n BTCVSlices --group-pattern '^btcv_(\\d+)_'
  nnharmony_convert split-sites -d 904 --csv sites.csv --first-id 910
  nnharmony_convert check -d 904

Label values become consecutive 1..N in nnU-Net; the mapping from the source values is recorded in the
dataset.json under "nnharmony_conversion". 2D PNG datasets (nnU-Net's natural-image format) import like any
other and are planned with -c 2d; --group-pattern keeps grouped cases (slices of one patient) on one side of
every cross-validation fold. Output is written to a hidden staging folder and renamed into place
only after validation, so a failed conversion leaves nothing behind.
"""


def build_parser() -> argparse.ArgumentParser:
    from nnharmony.dataset_conversion.convert import DEFAULT_IMAGE_PATTERN, DEFAULT_LABEL_PATTERN

    p = argparse.ArgumentParser(
        prog="nnharmony_convert",
        description="Convert datasets into nnU-Net raw format, checked and atomically written.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{msd,folder,nnunet,split-sites,check}")

    def group_pattern(sp):
        sp.add_argument("--group-pattern", default=None, metavar="REGEX",
                        help="cases that must stay on one side of every cross-validation fold (e.g. slices of one "
                             "patient): a regex matched at the start of each case id whose group (?P<group>...), or "
                             "first group, names the group, e.g. '^btcv_(\\d+)_'; written to dataset.json as "
                             "case_groups")

    def common(sp):
        sp.add_argument("-o", "--output", type=Path, default=None, help="raw folder (default: $nnUNet_raw)")
        sp.add_argument("--overwrite", action="store_true", help="replace a dataset that already uses the id")
        sp.add_argument("-np", "--num-processes", type=int, default=None, help="reader processes for large datasets (default: up to 4)")

    s = add_subcommand(
        sub, "msd", help="Medical Segmentation Decathlon task folder (TaskXX_Name)",
        description="Convert an MSD task folder: 4D multi-modal images are split into one file per channel, "
                    "labels checked and cast to integers, imagesTs converted too.",
        epilog="example: nnharmony_convert msd -i /downloads/Task04_Hippocampus -d 4",
    )
    s.add_argument("-i", "--input", type=Path, required=True, help="MSD task folder (TaskXX_Name)")
    s.add_argument("-d", "--dataset-id", type=int, default=None, help="new dataset id (default: the task number)")
    s.add_argument("-n", "--name", default=None, help="dataset name (default: the task name)")
    s.add_argument("--no-test", action="store_true", help="do not convert imagesTs")
    common(s)

    s = add_subcommand(
        sub, "folder", help="plain images + labels in any format SimpleITK reads",
        description="Convert plain image and label files. Images and labels are either folders (paired by case "
                    "name: --image-pattern / --label-pattern, regexes with a (?P<case>...) group and an optional "
                    "(?P<channel>...) group holding a 4-digit index or a modality name) or lists of files (one "
                    "case each, in the same order). Label names: --labels NAME=VALUE ... or --labels-json FILE "
                    "(name -> value map, or {\"labels\": {...}, \"modality\": \"CT\"} like TotalSegmentator's "
                    "labels.json).",
        epilog="examples:\n"
               "  nnharmony_convert folder -i ct/images -l ct/labels -d 950 -n TotalSegCT --labels-json ct/labels.json\n"
               "  nnharmony_convert folder -i t2/t2.nii.gz -l t2/t2_seg-manual_labeled.nii.gz -d 961 -n CordT2 \\\n"
               "        -m T2 --labels spinal_cord=2,3,4,5 --case-ids sub01\n"
               "  nnharmony_convert folder -i imgs -l segs -d 970 -n Prostate -m T2 ADC \\\n"
               "        --image-pattern '(?P<case>.+)_(?P<channel>T2|ADC)\\.nii\\.gz' --labels prostate=1",
    )
    s.add_argument("-i", "--images", nargs="+", required=True, help="image folder, or image files (one per case)")
    s.add_argument("-l", "--labels-from", nargs="+", required=True, dest="label_files",
                   help="label folder, or label files in the order of the images")
    s.add_argument("-d", "--dataset-id", type=int, required=True, help="new dataset id")
    s.add_argument("-n", "--name", required=True, help="dataset name (DatasetXXX_NAME)")
    s.add_argument("-m", "--modalities", nargs="+", default=None,
                   help="modality name of every channel, in order (default: 'modality' of the labels JSON)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--labels", nargs="+", dest="label_pairs", metavar="NAME=VALUE[,VALUE]",
                   help="label names and their source values (several values merge into one label)")
    g.add_argument("--labels-json", type=Path, help="JSON file with label names -> source values")
    s.add_argument("--keep", choices=("present", "declared"), default="present",
                   help="keep only declared labels that occur in the data (present) or all declared labels (declared) "
                        "(default: present)")
    s.add_argument("--undeclared", choices=("error", "background"), default="error",
                   help="label values found but not declared: error, or set to background (default: error)")
    s.add_argument("--image-pattern", default=DEFAULT_IMAGE_PATTERN, help="regex for image files in a folder")
    s.add_argument("--label-pattern", default=DEFAULT_LABEL_PATTERN, help="regex for label files in a folder")
    s.add_argument("--case-ids", nargs="+", default=None, help="case names for file lists (default: file names)")
    group_pattern(s)
    common(s)

    s = add_subcommand(
        sub, "nnunet", help="import an existing nnU-Net raw dataset under a new id",
        description="Copy (or link) an nnU-Net raw dataset under a new id: checks every case, casts label maps "
                    "to integers (after checking they are integral) and remaps non-consecutive label values.",
        epilog="example: nnharmony_convert nnunet -i /data/msd_hippocampus_mri -d 904 -n Hippocampus -m T1 --link hardlink",
    )
    s.add_argument("-i", "--input", required=True, help="source dataset folder, or id/name in $nnUNet_raw")
    s.add_argument("-d", "--dataset-id", type=int, required=True, help="new dataset id")
    s.add_argument("-n", "--name", default=None, help="new name (default: the source's)")
    s.add_argument("--link", choices=("copy", "hardlink", "symlink"), default="copy",
                   help="how image files are brought over (default: copy)")
    s.add_argument("--no-test", action="store_true", help="do not bring imagesTs over")
    s.add_argument("-m", "--modalities", nargs="+", default=None,
                   help="rename the channels (e.g. -m T1 for a channel called 'MRI')")
    group_pattern(s)
    common(s)

    s = add_subcommand(
        sub, "split-sites", help="split one dataset into one dataset per site/institution (CSV case,site)",
        description="Write one dataset per site (ids --first-id, --first-id+1, ... in sorted site order) with "
                    "that site's cases, linked or copied. The CSV has two columns case,site (header optional) or "
                    "named columns (--case-column, --site-column). All sites are written, or none.",
        epilog="example: nnharmony_convert split-sites -d 904 --csv sites.csv --first-id 910",
    )
    s.add_argument("-d", "--dataset", required=True, help="source dataset id or name")
    s.add_argument("--csv", type=Path, required=True, help="CSV case -> site")
    s.add_argument("--first-id", type=int, required=True, help="id of the first site dataset")
    s.add_argument("--name-template", default="{name}_{site}", help="dataset name template (default: {name}_{site})")
    s.add_argument("--case-column", default=None, help="CSV column with the case names")
    s.add_argument("--site-column", default=None, help="CSV column with the site names")
    s.add_argument("--skip-unassigned", action="store_true", help="leave out cases missing from the CSV")
    s.add_argument("--link", choices=("copy", "hardlink", "symlink"), default="hardlink",
                   help="how files are brought over (default: hardlink, copy across file systems)")
    common(s)

    s = add_subcommand(
        sub, "check", help="validate a raw dataset (dataset.json, files, geometry, label values, NaN/Inf)",
        epilog="example: nnharmony_convert check -d 904",
    )
    s.add_argument("-d", "--dataset", nargs="+", required=True, help="dataset ids, names or folders")
    s.add_argument("--headers-only", action="store_true", help="do not read voxel data")
    s.add_argument("-o", "--output", type=Path, default=None, help="raw folder (default: $nnUNet_raw)")
    s.add_argument("-np", "--num-processes", type=int, default=None, help="reader processes for large datasets (default: up to 4)")
    return p


def _one(paths: list[str]):
    return paths[0] if len(paths) == 1 and Path(paths[0]).is_dir() else paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nnharmony.dataset_conversion import convert as cv
    from nnharmony.dataset_conversion.validation import validate_members_compatible, validate_raw_dataset

    try:
        if args.command == "msd":
            out = [cv.convert_msd(args.input, args.dataset_id, args.name, raw_root=args.output,
                                  overwrite=args.overwrite, include_test=not args.no_test,
                                  num_processes=args.num_processes)]
        elif args.command == "folder":
            labels = cv.parse_label_args(args.label_pairs) if args.label_pairs else args.labels_json
            out = [cv.convert_plain_folder(
                _one(args.images), _one(args.label_files), args.dataset_id, args.name, modalities=args.modalities,
                label_names=labels, keep=args.keep, undeclared=args.undeclared, image_pattern=args.image_pattern,
                label_pattern=args.label_pattern, case_ids=args.case_ids, raw_root=args.output,
                overwrite=args.overwrite, num_processes=args.num_processes, case_groups=args.group_pattern)]
        elif args.command == "nnunet":
            out = [cv.import_nnunet_dataset(args.input, args.dataset_id, args.name, raw_root=args.output,
                                            link_mode=args.link, overwrite=args.overwrite,
                                            include_test=not args.no_test, num_processes=args.num_processes,
                                            modalities=args.modalities, case_groups=args.group_pattern)]
        elif args.command == "split-sites":
            out = cv.split_by_site(args.dataset, args.csv, args.first_id, raw_root=args.output,
                                   name_template=args.name_template, case_column=args.case_column,
                                   site_column=args.site_column,
                                   unassigned="skip" if args.skip_unassigned else "error", link_mode=args.link,
                                   overwrite=args.overwrite, num_processes=args.num_processes)
        else:  # check
            for d in args.dataset:
                validate_raw_dataset(d, check_images=not args.headers_only, num_processes=args.num_processes,
                                     raw_root=args.output)
                print(f"{d}: OK")
                _print_notes(d, args.output)
            if len(args.dataset) > 1:
                validate_members_compatible(args.dataset, raw_root=args.output)
            return 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"nnharmony_convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    for o in out:
        print(o)
        _print_notes(o, None)
    return 0


def _print_notes(dataset, raw_root: Path | None) -> None:
    """What is fine but worth knowing (a 2D dataset, 2D images of different sizes), one ``note:`` line each."""
    from nnharmony.dataset_conversion.validation import dataset_notes

    for n in dataset_notes(dataset, raw_root):
        print(f"note: {n}")


if __name__ == "__main__":
    sys.exit(main())
