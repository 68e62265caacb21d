"""Import every real dataset of ``../shared/data`` into ``$nnUNet_raw`` with ``nnharmony_convert``, under fixed ids,
so that the real-data collections R2 (2D) and R3 (3D) and their benchmarks start from the same raw datasets.

    python benchmarks/real_data/import_all.py                    # all datasets, files hard-linked
    python benchmarks/real_data/import_all.py --only r2          # the members of R2 (ids 931-937)
    python benchmarks/real_data/import_all.py --only 923 921 --max-cases 6   # a quick try on a few cases

Each dataset is one ``nnharmony_convert`` command line (:data:`DATASETS`, printed before it runs), the same a
user types; a dataset already in ``$nnUNet_raw`` is skipped unless ``--overwrite``. ``--max-cases N`` imports
N cases spread over the dataset (symbolic links in a temporary folder; for btcv_ct_slices whole patients are
kept apart by the grouped split, not by this selection). Prints one line per dataset: id, cases, seconds.

Ids: R3 (3D) 921 cardiac bSSFP, 922 CHAOS T2-SPIR, 923 hippocampus, 926 TotalSegmentator MR; other 3D data
924 spleen CT (1 case), 925 TotalSegmentator CT, 927-929 spinal cord T1/T2/T2*; R2 (2D PNG) 931-937.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[2] / "shared" / "data"


@dataclass(frozen=True)
class RealDataset:
    """One shared-data folder and the ``nnharmony_convert`` arguments that import it (``{src}`` = the folder)."""

    dataset_id: int
    folder: str
    argv: tuple[str, ...]

    def command(self, src: Path) -> list[str]:
        return [a.replace("{src}", str(src)) for a in self.argv] + ["-d", str(self.dataset_id)]


def _nnunet(name: str, *extra: str) -> tuple[str, ...]:
    return ("nnunet", "-i", "{src}", "-n", name, "--link", "hardlink", *extra)


def _plain(name: str, *extra: str) -> tuple[str, ...]:
    return ("folder", "-i", "{src}/images", "-l", "{src}/labels", "-n", name, "--labels-json", "{src}/labels.json",
            *extra)


def _single(name: str, image: str, label: str, modality: str, label_arg: str) -> tuple[str, ...]:
    return ("folder", "-i", f"{{src}}/{image}", "-l", f"{{src}}/{label}", "-n", name, "-m", modality,
            "--labels", label_arg, "--case-ids", "sct_sub01")


DATASETS: tuple[RealDataset, ...] = (
    # R3 (3D)
    RealDataset(921, "mscmrseg_bssfp_mri", _plain("CardiacBSSFP", "-m", "bSSFP")),  # 200/500/600 -> 1/2/3
    RealDataset(922, "chaos_t2spir_mri", _nnunet("CHAOST2SPIR")),
    RealDataset(923, "msd_hippocampus_mri", _nnunet("Hippocampus", "-m", "T1")),
    RealDataset(926, "totalseg_ct_mr/mr", _plain("TotalSegMR")),  # modality "MR" from its labels.json
    # other 3D data
    RealDataset(924, "msd_spleen_ct_1case", _nnunet("SpleenCT")),
    RealDataset(925, "totalseg_ct_mr/ct", _plain("TotalSegCT")),
    RealDataset(927, "sct_spinalcord_mri", _single("SpinalCordT1", "t1/t1w.nii.gz", "t1/t1w_seg-manual.nii.gz", "T1",
                                                   "spinal cord=1")),
    RealDataset(928, "sct_spinalcord_mri", _single("SpinalCordT2", "t2/t2.nii.gz", "t2/t2_seg-manual.nii.gz", "T2",
                                                   "spinal cord=1")),
    RealDataset(929, "sct_spinalcord_mri", _single("SpinalCordT2star", "t2s/t2s.nii.gz",
                                                   "t2s/t2s_gmseg_manual.nii.gz", "T2star", "grey matter=1")),
    # R2 (2D PNG): slices of one BTCV patient never straddle a fold
    RealDataset(931, "btcv_ct_slices", _nnunet("BTCVSlices", "--group-pattern", r"^btcv_(?P<group>\d+)_")),
    RealDataset(932, "wbc_source1_microscopy", _nnunet("WBCSite1")),
    RealDataset(933, "wbc_source2_microscopy", _nnunet("WBCSite2")),
    RealDataset(934, "covid_cxr_xray", _nnunet("CovidCXR")),
    RealDataset(935, "drive_fundus_vessels", _nnunet("DRIVE")),
    RealDataset(936, "ph2_dermoscopy", _nnunet("PH2")),
    RealDataset(937, "isbi_em_membranes", _nnunet("ISBI2012EM")),
)
GROUPS = {"r2": [931, 932, 933, 934, 935, 936, 937], "r3": [921, 922, 923, 926]}


def spread(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when ``n`` is 0 or large)."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else [items[0]]


def subset_source(src: Path, dest: Path, n: int) -> Path:
    """A copy of ``src`` (nnU-Net raw, or plain ``images``/``labels`` + ``labels.json``) with ``n`` of its cases,
    as symbolic links; single-file sources are returned unchanged."""
    if (src / "dataset.json").is_file():
        dj = json.loads((src / "dataset.json").read_text())
        fe, images, labels = dj["file_ending"], "imagesTr", "labelsTr"
    elif (src / "images").is_dir():
        dj, fe, images, labels = None, None, "images", "labels"
    else:
        return src
    (dest / images).mkdir(parents=True)
    (dest / labels).mkdir()
    kept = spread(sorted(p for p in (src / labels).iterdir() if not p.name.startswith(".")), n)
    for lab in kept:
        case = lab.name[: -len(fe)] if fe else lab.name.split(".")[0]
        os.symlink(lab, dest / labels / lab.name)
        for img in (src / images).iterdir():
            rest = img.name[len(case):]
            if img.name.startswith(case) and (rest.startswith(".") or (rest[:1] == "_" and rest[1:5].isdigit())):
                os.symlink(img, dest / images / img.name)
    for f in src.iterdir():
        if f.is_file() and f.name != "dataset.json":
            os.symlink(f, dest / f.name)
    if dj is not None:
        (dest / "dataset.json").write_text(json.dumps({**dj, "numTraining": len(kept)}, indent=2))
    return dest


def import_dataset(ds: RealDataset, data: Path, raw: Path, max_cases: int = 0, overwrite: bool = False) -> float:
    """Run the dataset's ``nnharmony_convert`` command; returns seconds. SystemExit on error (its message)."""
    from nnharmony.cli.convert import main as convert

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nnharmony_import_") as tmp:
        src = data / ds.folder
        if max_cases:
            src = subset_source(src, Path(tmp) / ds.folder.replace("/", "_"), max_cases)
        argv = ds.command(src) + ["-o", str(raw)] + (["--overwrite"] if overwrite else [])
        print("nnharmony_convert " + " ".join(argv), file=sys.stderr)
        rc = convert(argv)
        if rc:
            raise SystemExit(f"import of {ds.folder} failed (exit {rc})")
    return time.perf_counter() - t0


def select(only: list[str] | None) -> list[RealDataset]:
    if not only:
        return list(DATASETS)
    ids = {i for o in only for i in (GROUPS[o.lower()] if o.lower() in GROUPS else [int(o)])}
    return [d for d in DATASETS if d.dataset_id in ids]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("NNHARMONY_SHARED_DATA", DEFAULT_DATA)),
                   help="the shared data folder (default: ../shared/data next to the repository)")
    p.add_argument("--only", nargs="+", default=None, help="dataset ids, or r2 / r3 (default: every dataset)")
    p.add_argument("--max-cases", type=int, default=0, help="import only this many cases of each dataset (0: all)")
    p.add_argument("--overwrite", action="store_true", help="re-import datasets already in $nnUNet_raw")
    args = p.parse_args(argv)
    from nnharmony.paths import raw_dir

    raw = raw_dir()
    if not args.data.is_dir():
        raise SystemExit(f"shared data folder {args.data} does not exist (--data)")
    for ds in select(args.only):
        done = sorted(raw.glob(f"Dataset{ds.dataset_id:03d}_*"))
        if done and not args.overwrite:
            print(f"{ds.dataset_id} {ds.folder}: already imported as {done[0].name}")
            continue
        seconds = import_dataset(ds, args.data, raw, args.max_cases, args.overwrite)
        folder = sorted(raw.glob(f"Dataset{ds.dataset_id:03d}_*"))[0]
        n = json.loads((folder / "dataset.json").read_text())["numTraining"]
        print(f"{ds.dataset_id} {ds.folder}: {folder.name}, {n} cases, {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
