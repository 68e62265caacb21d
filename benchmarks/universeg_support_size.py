"""UniverSeg on unseen datasets: Dice on each held-out member against the support size S, with and without
support-set ensembling, next to a supervised nnU-Net (nnHarmonyTrainer) trained on that member. Prints Markdown
tables (one summary row per held-out member, then one table each); not a test.

1. Data: the built-in synthetic collection (``--members`` members, ``--num-cases`` cases each) is made and
   planned for ``--configuration`` in ``--workdir`` (``$nnUNet_*`` point there; reused on a second run). Or,
   with ``--spec FILE``, a real-data collection (e.g. ``benchmarks/real_data/R2_2d.collection.json``: seven
   2D datasets, 21 tasks): members missing from ``WORKDIR/raw`` are imported with
   ``benchmarks/real_data/import_all.py``, the collection is planned from the spec, and ``--holdout`` (one or
   more of its member ids) is left out of UniverSeg's training: leave-one-dataset-out, or, with several ids,
   one UniverSeg model for several unseen datasets at once (every task of each held-out member is unseen).
2. UniverSeg: ``nnharmony_train COLL CFG 0 -tr UniverSegTrainer --holdout H ...`` for ``--budget-minutes`` of
   wall-clock training (``wall_clock_budget_minutes``; held-out members are never sampled).
3. Supervised reference, one per held-out member: a one-member collection of it, ``nnHarmonyTrainer``
   (nnU-Net's U-Net, BCE + Dice, SGD) on its fold 0 for ``--supervised-budget-minutes`` of wall clock
   (``--supervised-batch-size N`` writes and uses a batch-N plans variant, for a CPU). Or
   ``--supervised-predictions PATTERN``: existing predictions of the validation cases, e.g. those of
   ``real_data/real_benchmark.py``'s per-dataset models, trained on the same fold-0 training cases.
4. Evaluation on the held-out member's fold-0 validation cases, raw images (``imagesTr``) and labels, every
   foreground label of the member: UniverSeg predicts from supports drawn from the member's fold-0 TRAINING
   cases (the same cases the supervised model trained on; :mod:`nnharmony.inference.support`, slice-by-slice
   for the 2d model) for S in ``--support-sizes`` with K = 1 and K = ``--ensemble`` support sets, averaged over
   ``--repeats`` seeds; the supervised model predicts with ``nnharmony_predict --member H``. Dice per case
   and label (thresholded maps vs the raw label), mean over cases (cases where both are empty are left out),
   then over labels.

    python benchmarks/universeg_support_size.py --budget-minutes 2 -device cuda
    # real data: MSD hippocampus imported as member 910 and held out (experiment c of the README)
    python benchmarks/universeg_support_size.py --extra-dataset ../shared/data/msd_hippocampus_mri \\
        --workdir /tmp/nnharmony_universeg_hippo --members 3 --budget-minutes 5 -device cpu
    python benchmarks/universeg_support_size.py --budget-minutes 0.5 -device cpu \\
        --universeg-options '{"image_size": 32, "encoder_blocks": [16, 16, 16]}'
    # real 2D tasks, chest X-ray, DRIVE and PH2 held out, the paper preset scaled to a CPU
    python benchmarks/universeg_support_size.py --spec benchmarks/real_data/R2_2d.collection.json \\
        --holdout 934 935 936 --supervised-batch-size 4 --workdir /tmp/useg --budget-minutes 12 \\
        --supervised-budget-minutes 5 -device cpu \\
        --universeg-options '{"preset": "paper", "image_size": 64, "encoder_blocks": [32, 32, 32, 32],
                              "support_size": 8, "episode_batch_size": 4}'

``--train universeg`` / ``--train supervised`` trains only one of the two models (the other is reused from
``--workdir``), so they can run at different times; ``--train`` with nothing evaluates only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLLECTION = "Collection950_UniverSegBench"
SUPERVISED = "Collection960_UniverSegBenchSupervised"


def run(cmd: list[str], what: str) -> None:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
        raise SystemExit(f"{what} failed (exit {out.returncode}): {' '.join(cmd)}")
    print(f"[{what}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "nnharmony_universeg_bench"),
                   help="nnU-Net folders of the benchmark (reused by a second run)")
    p.add_argument("--members", type=int, default=5, help="synthetic members (default 5: 901..905)")
    p.add_argument("--num-cases", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=3, default=(32, 32, 32))
    p.add_argument("--holdout", type=int, nargs="+", default=[902],
                   help="member ids left out of UniverSeg's training, each evaluated with its own supervised model")
    p.add_argument("--configuration", default="2d", choices=["2d", "3d_fullres"])
    p.add_argument("--budget-minutes", type=float, default=2.0, help="wall-clock training budget of UniverSeg")
    p.add_argument("--supervised-budget-minutes", type=float, default=None,
                   help="wall-clock training budget of the supervised model (default: --budget-minutes)")
    p.add_argument("--spec", default=None, metavar="FILE",
                   help="real-data collection spec (members imported with benchmarks/real_data/import_all.py)")
    p.add_argument("--train", nargs="*", default=["universeg", "supervised"], choices=["universeg", "supervised"],
                   help="models to train (others are reused from --workdir)")
    p.add_argument("--supervised-plans", default="nnHarmonyPlans",
                   help="plans of the supervised model (e.g. a smaller-batch variant written by "
                        "benchmarks/real_data/plans_variant.py, for a CPU)")
    p.add_argument("--supervised-batch-size", type=int, default=None,
                   help="write and use a plans variant of the supervised collections with this batch size "
                        "(benchmarks/real_data/plans_variant.py; e.g. 4 on a CPU)")
    p.add_argument("--supervised-predictions", default=None, metavar="PATTERN",
                   help="use existing supervised predictions instead of training supervised models: a folder "
                        "pattern with {member} for the dataset name holding <case><file ending> label maps, e.g. "
                        "the validation folders of real_benchmark.py's per-dataset models")
    p.add_argument("--no-supervised", action="store_true",
                   help="no supervised reference (e.g. to compare UniverSeg models only: 2d against 3d_fullres)")
    p.add_argument("--eval-dataset", nargs="+", default=[], metavar="DIR",
                   help="also evaluate on these nnU-Net raw datasets outside the collection (fold 0 of nnU-Net's "
                        "split: supports from its training cases, queries its validation cases; no supervised "
                        "reference)")
    p.add_argument("--train-only", action="store_true", help="stop after training (evaluate in a later run)")
    p.add_argument("--iterations-per-epoch", type=int, default=50)
    p.add_argument("--support-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--ensemble", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="seeds averaged per (S, K)")
    p.add_argument("--universeg-options", default="{}", help="JSON trainer options of UniverSegTrainer")
    p.add_argument("--skip-training", action="store_true", help="reuse the trained models in --workdir")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--extra-dataset", default=None, metavar="DIR",
                   help="an nnU-Net raw dataset (e.g. ../shared/data/msd_hippocampus_mri) imported as member "
                        "--extra-id beside the synthetic ones and held out (real-data experiment)")
    p.add_argument("--extra-id", type=int, default=910)
    p.add_argument("--extra-modality", default="T1", help="modality name of the extra dataset's channel")
    p.add_argument("--max-queries", type=int, default=None, help="evaluate at most this many validation cases")
    args = p.parse_args(argv)
    if args.extra_dataset is not None:
        args.holdout = [args.extra_id]
    if args.skip_training:
        args.train = []
    if args.supervised_budget_minutes is None:
        args.supervised_budget_minutes = args.budget_minutes
    return args


def train(collection: str, cfg: str, trainer: str, args, options: dict, minutes: float,
          plans: str = "nnHarmonyPlans") -> None:
    cmd = [sys.executable, "-m", "nnharmony.cli.train", collection, cfg, "0", "-tr", trainer, "-p", plans,
           "-device", args.device,
           "--epochs", "100000", "--iterations-per-epoch", str(args.iterations_per_epoch),
           "--val-iterations-per-epoch", "2", "--save-every", "100000",
           "--trainer-options", json.dumps({"wall_clock_budget_minutes": minutes, **options})]
    run(cmd, f"train {trainer}")


def real_collection(args, work: Path) -> tuple[str, list[int], list[Path]]:
    """``(name, member ids, raw folders)`` of the ``--spec`` collection; missing members are imported first."""
    spec = json.loads(Path(args.spec).read_text())
    ids = [int(m["dataset_id"]) for m in spec["members"]]

    def raw_folder(i: int) -> Path | None:
        found = sorted((work / "raw").glob(f"Dataset{i:03d}_*"))
        return found[0] if found else None

    missing = [i for i in ids if raw_folder(i) is None]
    if missing:
        run([sys.executable, str(Path(__file__).parent / "real_data" / "import_all.py"), "--only",
             *map(str, missing)], "import")
    return spec["name"], ids, [raw_folder(i) for i in ids]


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    denom = pred.sum() + ref.sum()
    return float("nan") if denom == 0 else float(2 * (pred & ref).sum() / denom)


def mean_dice(per_label: dict[str, list[float]]) -> float:
    return float(np.mean([np.nanmean(v) for v in per_label.values() if not np.all(np.isnan(v))]))


def supervised_collection(index: int, member_id: int) -> str:
    """Name of the one-member collection of the supervised reference of the ``index``-th held-out member."""
    return SUPERVISED if index == 0 else f"Collection{960 + index}_UniverSegBenchSupervised{member_id}"


def peak_memory_mb(device) -> float:
    """Peak memory so far: CUDA allocations on a GPU, the process's resident set on a CPU (a running maximum)."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class EvalTarget:
    """A dataset UniverSeg never trained on: its raw folder, binary tasks ``(label name, label values)`` and fold-0
    cases (supports come from ``train_ids``, queries are ``val_ids``)."""

    name: str
    raw: Path
    file_ending: str
    tasks: list[tuple[str, tuple[int, ...]]]
    train_ids: list[str]
    val_ids: list[str]
    member_id: int | None = None  # its id in the collection (None: a dataset outside it, --eval-dataset)

    def query_ids(self, limit: int | None) -> list[str]:
        """The validation cases segmented: the first ``limit`` in sorted order (all when None)."""
        return sorted(self.val_ids)[:limit]


def held_out_target(spec, ids, folders, member_id: int, configuration: str) -> EvalTarget:
    """A held-out member of the collection, with the collection's fold 0."""
    from nnharmony.data.splits import collection_fold

    mi = spec.member_index(member_id)
    member = spec.members[mi]
    train_ids, val_ids = collection_fold(spec, 0, configuration)[mi]
    return EvalTarget(member.dataset_name, Path(folders[ids.index(member_id)]), member.file_ending,
                      [(t.label, tuple(t.values)) for t in member.tasks], list(train_ids), list(val_ids), member_id)


def extra_target(folder: Path) -> EvalTarget:
    """An nnU-Net raw dataset outside the collection (``--eval-dataset``): every label with integer values is a
    task; fold 0 of nnU-Net's 5-fold split of its cases (grouped as its dataset.json says)."""
    from nnharmony.data.splits import case_groups, crossval_split

    meta = json.loads((folder / "dataset.json").read_text())
    fe = meta["file_ending"]
    cases = sorted(f.name[: -len(fe)] for f in (folder / "labelsTr").iterdir() if f.name.endswith(fe))
    fold0 = crossval_split(cases, case_groups(meta, cases))[0]
    tasks = [(name, tuple(v) if isinstance(v, (list, tuple)) else (int(v),))
             for name, v in meta["labels"].items() if name != "background"]
    return EvalTarget(folder.name, folder, fe, tasks, fold0["train"], fold0["val"])


class SupportLabelMean:
    """Control without the image: the mean of the support labels (resized to the network's input, like the
    supports) as the prediction. Where a dataset's crops align its structures, this alone scores well, and the
    in-context model's Dice is only worth what it adds to it."""

    def eval(self):
        return self

    def __call__(self, target_image, support_images, support_labels):
        import torch

        return torch.logit(support_labels.float().mean(1).clamp(1e-4, 1 - 1e-4))


def evaluate_target(args, target: EvalTarget, networks, cfg, device, supervised_dir: Path | None) -> dict:
    """In-context Dice of one unseen dataset by (S, K) on its fold-0 validation cases, next to the supervised
    predictions in ``supervised_dir`` (when given); seconds and peak memory per prediction by S."""
    import torch

    from nnharmony.inference import support as sup

    raw, fe = target.raw, target.file_ending

    def read(case):
        img, spacing, _ = sup.read_image(raw / "imagesTr" / f"{case}_0000{fe}")
        lab, _, _ = sup.read_image(raw / "labelsTr" / f"{case}{fe}")
        return img.astype(np.float32), lab.astype(np.int64), spacing

    support = [(c, *read(c)) for c in target.train_ids]
    queries = [(c, *read(c)) for c in target.query_ids(args.max_queries)]
    dim, size = int(cfg["dim"]), tuple(cfg["image_size"])
    results, seconds_per_case, memory, control = {}, {}, {}, {}
    pools = {label: sup.build_support_pool(support, values, dim, size) for label, values in target.tasks}

    def in_context_dice(models, S: int, K: int) -> tuple[float, dict[str, float]]:
        per_label: dict[str, list[float]] = {}
        for label, values in target.tasks:
            scores = []
            for r in range(args.repeats):
                probs = sup.predict_cases_in_memory(models, [(c, x, sp) for c, x, _, sp in queries], pools[label],
                                                    dim, size, S, K, seed=1000 * r + S, device=device)
                scores.append([dice(probs[c] > 0.5, np.isin(y, values)) for c, _, y, _ in queries])
            per_label[label] = list(np.nanmean(np.array(scores, dtype=float), axis=0))
        return mean_dice(per_label), {k: float(np.nanmean(v)) for k, v in per_label.items()}

    for S in args.support_sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for K in (1, args.ensemble):
            t_pred = time.perf_counter()
            results[(S, K)] = in_context_dice(networks, S, K)
            seconds_per_case[(S, K)] = (time.perf_counter() - t_pred) / (len(target.tasks) * args.repeats
                                                                         * len(queries))
        memory[S] = peak_memory_mb(device)
        control[S] = in_context_dice([SupportLabelMean()], S, 1)

    supervised = None
    if supervised_dir is not None:
        missing = [f"{c}{fe}" for c, *_ in queries if not (supervised_dir / f"{c}{fe}").is_file()]
        if missing:
            raise SystemExit(f"{supervised_dir}: no supervised prediction of {', '.join(missing[:5])}")
        predicted = {c: sup.read_image(supervised_dir / f"{c}{fe}")[0] for c, *_ in queries}
        per_label = {label: [dice(np.isin(predicted[c], values), np.isin(y, values)) for c, _, y, _ in queries]
                     for label, values in target.tasks}
        supervised = (mean_dice(per_label), {k: float(np.nanmean(v)) for k, v in per_label.items()})
    return {"member": target.name, "labels": [label for label, _ in target.tasks], "supports": len(support),
            "queries": len(queries), "universeg": results, "label_average": control, "supervised": supervised,
            "seconds_per_case": seconds_per_case, "peak_memory_mb": memory}


def supervised_predictions(args, target: EvalTarget, work: Path, name: str, plans: str) -> Path:
    """Folder of the supervised model's predictions of ``target``'s queries: ``--supervised-predictions``; else its
    own fold-0 validation predictions when they cover the queries; else predicted now."""
    if args.supervised_predictions:
        return Path(args.supervised_predictions.format(member=target.name))
    fe = target.file_ending
    queries = target.query_ids(args.max_queries)
    model = work / "results" / name / f"nnHarmonyTrainer__{plans}__{args.configuration}"
    out = model / "fold_0" / "validation" / target.name
    if all((out / f"{c}{fe}").is_file() for c in queries):
        return out
    inputs, out = work / "eval" / f"inputs{target.member_id}", work / "eval" / f"supervised{target.member_id}"
    inputs.mkdir(parents=True, exist_ok=True)
    for c in queries:
        link = inputs / f"{c}_0000{fe}"
        if not link.exists():
            os.symlink(target.raw / "imagesTr" / f"{c}_0000{fe}", link)
    run([sys.executable, "-m", "nnharmony.cli.predict", "-i", str(inputs), "-o", str(out), "-d", name, "-tr",
         "nnHarmonyTrainer", "-p", plans, "-c", args.configuration, "-f", "0", "--member", str(target.member_id),
         "-device", args.device], "supervised prediction")
    return out


def ratio(dice_: float, supervised: tuple | None) -> float:
    """``dice_`` as a fraction of the supervised Dice (NaN without a supervised reference)."""
    return dice_ / supervised[0] if supervised and supervised[0] > 0 else float("nan")


def member_table(args, r: dict) -> list[str]:
    """Markdown table of one unseen dataset: Dice by S for K = 1 and K = ``--ensemble``, per label."""
    labels, sup_dice = r["labels"], r["supervised"]
    lines = [f"| S | Dice K=1 | Dice K={args.ensemble} | label average | x supervised (K=1) | s/case K=1 | peak MB | "
             + " | ".join(f"{lb} K=1 / K={args.ensemble}" for lb in labels) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(labels)]
    for S in args.support_sizes:
        a, b = r["universeg"][(S, 1)], r["universeg"][(S, args.ensemble)]
        lines.append(f"| {S} | {a[0]:.3f} | {b[0]:.3f} | {r['label_average'][S][0]:.3f} | "
                     f"{ratio(a[0], sup_dice):.2f} | "
                     f"{r['seconds_per_case'][(S, 1)]:.2f} | {r['peak_memory_mb'][S]:.0f} | "
                     + " | ".join(f"{a[1][lb]:.3f} / {b[1][lb]:.3f}" for lb in labels) + " |")
    if sup_dice:
        lines.append(f"| supervised nnU-Net | {sup_dice[0]:.3f} | | | 1.00 | | | "
                     + " | ".join(f"{sup_dice[1][lb]:.3f}" for lb in labels) + " |")
    return lines


def summary_table(args, per_member: list[dict]) -> list[str]:
    """One row per unseen dataset: K = 1 Dice by S, the supervised Dice, and the ratio at each S; the last row
    averages the ratios over the datasets with a supervised reference (the mean over held-out tasks)."""
    sizes = args.support_sizes
    lines = ["| unseen dataset | " + " | ".join(f"S={S}" for S in sizes) + " | supervised | "
             + " | ".join(f"x sup. S={S}" for S in sizes) + " |",
             "|---|" + "---:|" * (2 * len(sizes) + 1)]
    ratios = {S: [] for S in sizes}
    for r in per_member:
        row = [r["universeg"][(S, 1)][0] for S in sizes]
        rat = [ratio(v, r["supervised"]) for v in row]
        if r["supervised"]:
            for S, v in zip(sizes, rat):
                ratios[S].append(v)
        sup_cell = f"{r['supervised'][0]:.3f}" if r["supervised"] else "–"
        lines.append(f"| {r['member']} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {sup_cell} | "
                     + " | ".join(f"{v:.2f}" for v in rat) + " |")
    if any(ratios.values()):
        lines.append("| **mean over held-out members** | " + " | " * (len(sizes) - 1) + " | | "
                     + " | ".join(f"**{np.nanmean(ratios[S]):.2f}**" for S in sizes) + " |")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.workdir).resolve()
    for k in ("raw", "preprocessed", "results"):
        (work / k).mkdir(parents=True, exist_ok=True)
        os.environ[f"nnUNet_{k}"] = str(work / k)
    import torch

    from nnharmony.dataset_conversion.synthetic import make_synthetic_collection
    from nnharmony.inference import support as sup
    from nnharmony.paths import JOINT_PLANS_NAME
    from nnharmony.planners.plan_and_preprocess import plan_and_preprocess_collection
    from nnharmony.utils.safe_load import read_weights_file

    t0 = time.perf_counter()
    collection = COLLECTION
    if args.spec is not None:
        collection, ids, folders = real_collection(args, work)
    else:
        folders = make_synthetic_collection(work / "raw", first_id=901, num_cases=args.num_cases, shape=args.shape,
                                            seed=0, num_members=args.members)
    if args.extra_dataset is not None and args.spec is None:
        from nnharmony.dataset_conversion.convert import import_nnunet_dataset

        existing = list((work / "raw").glob(f"Dataset{args.extra_id:03d}_*"))
        folders.append(existing[0] if existing else import_nnunet_dataset(
            args.extra_dataset, args.extra_id, name=Path(args.extra_dataset).name.title().replace("_", ""),
            raw_root=work / "raw", link_mode="symlink", modalities=[args.extra_modality]))
    ids = [int(Path(f).name[7:10]) for f in folders]
    if not set(args.holdout) <= set(ids):
        raise SystemExit(f"--holdout {args.holdout}: not all are members {ids}")
    if len(args.holdout) >= len(ids):
        raise SystemExit(f"--holdout {args.holdout} leaves no member to train UniverSeg on")
    workers = {args.configuration: 1}
    supervised_names = [supervised_collection(i, h) for i, h in enumerate(args.holdout)]
    supervised_plans = args.supervised_plans
    train_supervised = not (args.supervised_predictions or args.no_supervised)
    if args.supervised_batch_size:
        sys.path.insert(0, str(Path(__file__).parent / "real_data"))
        from plans_variant import write_variant
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's planner prints; stdout is for the table
        spec, _ = plan_and_preprocess_collection(ids, collection, [args.configuration], spec_file=args.spec,
                                                 num_processes=workers, num_processes_fingerprint=1)
        for h, name in zip(args.holdout, supervised_names if train_supervised else []):
            plan_and_preprocess_collection([h], name, [args.configuration], num_processes=workers,
                                           num_processes_fingerprint=1)
            if args.supervised_batch_size:
                pre = Path(os.environ["nnUNet_preprocessed"])
                write_variant(pre / spec.members[spec.member_index(h)].dataset_name, "nnUNetPlans",
                              args.supervised_batch_size, args.configuration)
                supervised_plans = write_variant(pre / name, JOINT_PLANS_NAME, args.supervised_batch_size,
                                                 args.configuration)
    print(f"[data: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)

    useg_options = {"holdout": list(args.holdout), **json.loads(args.universeg_options)}
    if "universeg" in args.train:
        train(collection, args.configuration, "UniverSegTrainer", args, useg_options, args.budget_minutes)
    if "supervised" in args.train and train_supervised:
        for name in supervised_names:
            train(name, args.configuration, "nnHarmonyTrainer", args, {}, args.supervised_budget_minutes,
                  supervised_plans)
    if args.train_only:
        return

    device = torch.device(args.device)
    model_dir = work / "results" / collection / f"UniverSegTrainer__nnHarmonyPlans__{args.configuration}"
    networks, cfg = sup.load_universeg_models(model_dir, ["0"], "checkpoint_final.pth", device)
    ckpt = read_weights_file(model_dir / "fold_0" / "checkpoint_final.pth")
    useg_epochs = ckpt["current_epoch"]
    per_member = []
    for h, name in zip(args.holdout, supervised_names):
        target = held_out_target(spec, ids, folders, h, args.configuration)
        reference = None if args.no_supervised else supervised_predictions(args, target, work, name,
                                                                            supervised_plans)
        per_member.append(evaluate_target(args, target, networks, cfg, device, reference))
    for folder in args.eval_dataset:
        per_member.append(evaluate_target(args, extra_target(Path(folder)), networks, cfg, device, None))

    # ---- tables
    held = [spec.member_index(h) for h in args.holdout]
    print(f"\n### UniverSeg on unseen datasets {', '.join(r['member'] for r in per_member)} ({args.configuration}), "
          f"{args.budget_minutes:g} min training (UniverSeg), {args.supervised_budget_minutes:g} min per supervised "
          f"model, device {args.device}\n")
    print(f"UniverSeg trained on {', '.join(m.dataset_name for i, m in enumerate(spec.members) if i not in held)} "
          f"({useg_epochs} epochs x {args.iterations_per_epoch} it, options {json.dumps(useg_options)}); supports "
          f"from each held-out member's fold-0 training cases, queries its validation cases, {args.repeats} seeds; "
          + ("no supervised reference.\n" if args.no_supervised else
             f"supervised: the predictions in {args.supervised_predictions}.\n" if args.supervised_predictions else
             f"supervised nnHarmonyTrainer (plans {supervised_plans}) on the same training cases, one model per "
             f"held-out member.\n"))
    if len(per_member) > 1:
        print("K = 1 Dice (mean over labels) and the ratio to the supervised model:\n")
        print("\n".join(summary_table(args, per_member)))
    for r in per_member:
        print(f"\n{r['member']}: {r['supports']} support cases, {r['queries']} validation cases\n")
        print("\n".join(member_table(args, r)))

    def keyed(d):
        return {f"S{S}_K{K}": v for (S, K), v in d.items()}

    out = {"configuration": args.configuration, "budget_minutes": args.budget_minutes,
           "supervised_budget_minutes": args.supervised_budget_minutes, "command": " ".join(sys.argv),
           "universeg_epochs": useg_epochs, "options": useg_options, "supervised_plans": supervised_plans,
           "members": [{**r, "universeg": keyed(r["universeg"]), "seconds_per_case": keyed(r["seconds_per_case"]),
                        "peak_memory_mb": {f"S{S}": v for S, v in r["peak_memory_mb"].items()},
                        "label_average": {f"S{S}_K1": v for S, v in r["label_average"].items()}}
                       for r in per_member]}
    (work / "universeg_support_size.json").write_text(json.dumps(out, indent=2))
    print(f"\n[total {time.perf_counter() - t0:.0f} s; results in {work / 'universeg_support_size.json'}]",
          file=sys.stderr)


if __name__ == "__main__":
    main()
