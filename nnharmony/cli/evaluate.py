"""nnharmony_evaluate -ref REF -pred PRED (-d DATASET_ID | -c COLLECTION | -l labels.json) [--nsd-tolerance MM]
[-o OUT] [-np N]

* ``-d ID``: one dataset; labels and file ending from ``$nnUNet_raw/DatasetXXX_Name/dataset.json``, REF defaults
  to its ``labelsTr``.
* ``-l FILE``: one folder with the labels of FILE (a dataset.json, or a bare ``{"name": value}`` dict); REF
  required.
* ``-c NAME``: a collection (spec ``$nnUNet_preprocessed/NAME/collection.json``, or a path to a collection.json);
  PRED holds one sub-folder per member (``PRED/DatasetXXX_Name/``) or all cases flat; REF is the reference root
  (``REF/DatasetXXX_Name/labelsTr`` or ``REF/DatasetXXX_Name``; default ``$nnUNet_raw``).

Writes ``summary.json``, ``results.md`` and ``results.csv`` into OUT (default PRED) and prints the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnharmony.cli.common import exit_on_user_error, make_parser

PIXEL_SPACING_ENDINGS = (".png", ".bmp", ".jpg", ".jpeg")  # nnU-Net's natural-image reader: spacing 1 per pixel


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(
        "nnharmony_evaluate",
        "Per-member, per-label Dice (nnU-Net's metrics) and normalized surface Dice of predicted "
        "segmentations; writes summary.json, results.md and results.csv.",
        ("nnharmony_evaluate -ref $nnUNet_raw/Dataset902_SynthMRI/labelsTs -pred pred902 -d 902 -o eval902",
         "nnharmony_evaluate -pred pred_all -c Collection900_Synthetic --nsd-tolerance 1"))
    p.add_argument("-ref", default=None,
                   help="reference folder (-d: default $nnUNet_raw/DatasetXXX/labelsTr; -c: reference root holding "
                        "DatasetXXX_Name/labelsTr or DatasetXXX_Name/, default $nnUNet_raw)")
    p.add_argument("-pred", required=True, help="prediction folder (-c: one sub-folder per member, or flat)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("-d", "--dataset", default=None, help="dataset id or DatasetXXX_Name in $nnUNet_raw")
    what.add_argument("-c", "--collection", default=None,
                      help="collection name ($nnUNet_preprocessed/NAME/collection.json) or path of a collection.json")
    what.add_argument("-l", "--labels", default=None, help="dataset.json or JSON dict of label name -> value/region")
    p.add_argument("--nsd-tolerance", type=float, default=None, metavar="MM",
                   help="also compute the normalized surface Dice at this tolerance in mm")
    p.add_argument("-o", default=None, help="output folder (None: PRED)")
    p.add_argument("--verbose", action="store_true", help="full tracebacks on errors")
    p.add_argument("-np", type=int, default=2, help="worker processes (1 = no worker processes)")
    p.add_argument("--file-ending", default=None,
                   help="-l: file ending of the segmentations (default: the labels file's, else .nii.gz)")
    p.add_argument("--method", default=None, help="method name shown in the table and CSV")
    p.add_argument("--case-members", default=None, metavar="JSON",
                   help="-c with a flat PRED: JSON dict case id -> member dataset id or name, for cases whose "
                        "member cannot be told from the references")
    return p


def _load_labels_file(path: str) -> tuple[dict, str | None, str | None]:
    """(labels, file ending or None, dataset name or None) of a dataset.json or a bare labels dict."""
    from nnharmony.utils.io import load_json

    d = load_json(path)
    if isinstance(d, dict) and isinstance(d.get("labels"), dict):
        return d["labels"], d.get("file_ending"), d.get("name")
    if isinstance(d, dict) and d:
        return d, None, None
    raise ValueError(f"{path}: expected a dataset.json with a 'labels' dict, or a dict of label name -> value")


def _resolve_spec_path(collection: str) -> Path:
    p = Path(collection)
    if p.is_file():
        return p
    if p.is_dir() and (p / "collection.json").is_file():
        return p / "collection.json"
    from nnharmony.paths import collection_spec_path

    spec_path = collection_spec_path(collection)
    if not spec_path.is_file():
        raise FileNotFoundError(f"collection {collection}: no spec {spec_path} (plan the collection first, or give "
                                f"the path of a collection.json)")
    return spec_path


def check_references_match(reference_folder: Path, dataset_folder: Path, labels: dict) -> None:
    """References inside another raw dataset (``DatasetYYY/labelsTr``) whose labels differ from ``-d``'s would be
    scored under the wrong names (902's kidney as 901's spleen): refuse, naming the dataset to give."""
    if reference_folder.name not in ("labelsTr", "labelsTs"):
        return
    owner = reference_folder.resolve().parent
    if owner == dataset_folder.resolve() or not (owner / "dataset.json").is_file():
        return
    from nnharmony.utils.io import load_json

    theirs = load_json(owner / "dataset.json").get("labels")
    if theirs != labels:
        raise ValueError(f"{reference_folder}: references of {owner.name}, whose labels {theirs} differ from "
                         f"{dataset_folder.name}'s {labels}; evaluate with -d {owner.name}")


def warn_unpredicted(summary: dict, name: str) -> None:
    """One line when reference cases have no prediction: they are not in the means (summary.json lists them)."""
    missing = summary.get("references_without_prediction") or []
    if missing:
        n = len(summary.get("metric_per_case", []))
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        print(f"warning: {name}: {len(missing)} of {len(missing) + n} reference case(s) have no prediction and are "
              f"not evaluated (n = {n}): {shown} (listed in summary.json under references_without_prediction)",
              file=sys.stderr)


def _run(args: argparse.Namespace) -> str:
    from nnharmony.evaluation.evaluate import (evaluate_collection, evaluate_folder, format_table, summary_rows,
                                               write_tables)
    from nnharmony.utils.io import load_json

    out = Path(args.o) if args.o else Path(args.pred)
    if args.collection is not None:
        from nnharmony.data.collection import CollectionSpec

        spec = CollectionSpec.load(_resolve_spec_path(args.collection))
        case_members = load_json(args.case_members) if args.case_members else None
        if case_members is not None and not isinstance(case_members, dict):
            raise ValueError(f"{args.case_members}: expected a JSON dict case id -> member")
        result = evaluate_collection(spec, args.pred, reference_root=args.ref, member=case_members,
                                     nsd_tolerance_mm=args.nsd_tolerance, num_processes=args.np, output_folder=out,
                                     method=args.method)
        table = format_table(result["rows"], nsd=args.nsd_tolerance is not None or None)
        for member, member_summary in result.get("members", {}).items():
            warn_unpredicted(member_summary, member)
        skipped = result["members_without_predictions"]
        if skipped:
            print(f"members without predictions (not evaluated): {', '.join(skipped)}")
    else:
        if args.dataset is not None:
            from nnharmony.paths import find_dataset_folder

            folder = find_dataset_folder(args.dataset)
            dj = load_json(folder / "dataset.json")
            if not isinstance(dj.get("labels"), dict):
                raise ValueError(f"{folder / 'dataset.json'}: no 'labels' dict")
            labels, file_ending, name = dj["labels"], dj.get("file_ending", ".nii.gz"), folder.name
            ref = args.ref if args.ref is not None else folder / "labelsTr"
            check_references_match(Path(ref), folder, labels)
        else:
            if args.ref is None:
                raise ValueError("-ref is required with -l (the folder of reference segmentations)")
            labels, file_ending, name = _load_labels_file(args.labels)
            file_ending = args.file_ending or file_ending or ".nii.gz"
            ref = Path(args.ref)
            if not name:  # member column: the dataset's name, else the reference folder's
                name = ref.parent.name if ref.name in ("labelsTr", "labelsTs", "gt_segmentations") else ref.name
        if args.dataset is not None and args.file_ending:
            file_ending = args.file_ending
        summary = evaluate_folder(ref, args.pred, labels, file_ending=file_ending,
                                  nsd_tolerance_mm=args.nsd_tolerance, num_processes=args.np, output_folder=out,
                                  member_name=name)
        warn_unpredicted(summary, name)
        rows = summary_rows(summary, labels, member=name, method=args.method)
        table = write_tables(rows, out, title=f"Evaluation of {name}" + (f" ({args.method})" if args.method else ""),
                             nsd_tolerance_mm=args.nsd_tolerance)
    print(f"wrote {out / 'summary.json'}, {out / 'results.md'}, {out / 'results.csv'}")
    if args.nsd_tolerance is not None:
        unit = "mm" if args.collection is not None or file_ending not in PIXEL_SPACING_ENDINGS else \
            f"pixel(s) ({file_ending} images carry no spacing: nnU-Net reads them with spacing 1)"
        print(f"NSD tolerance: {args.nsd_tolerance:g} {unit}")
    print()
    print(table, end="")
    return table


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.np < 1:
        raise ValueError(f"-np must be at least 1, got {args.np}")
    try:
        _run(args)
    except RuntimeError as e:
        if "is not set" in str(e):  # nnU-Net's folders not configured (nnharmony.paths)
            raise ValueError(str(e)) from None
        raise


if __name__ == "__main__":
    main()
