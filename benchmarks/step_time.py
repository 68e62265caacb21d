"""Training step time and peak memory of nnharmony's trainers against plain nnU-Net, and the mixed loader's
throughput. Prints a Markdown table; not a test.

The reference is nnU-Net's own ``nnUNetTrainer.train_step`` (called unbound) on the same network topology,
patch and batch size (the collection's joint plan), with nnU-Net's softmax Dice+CE loss and deep supervision.
Each trainer runs in its own process so peak memory is its own (CUDA: max allocated; CPU: peak RSS).
Data loading is excluded from the step time (one batch reused), as in nnU-Net's
``nnUNetTrainerBenchmark_5epochs_noDataLoading``.

    python benchmarks/step_time.py                       # synthetic collection in a temp folder, CPU
    python benchmarks/step_time.py -c Collection900_X -device cuda --trainers nnHarmonyTrainer HermesTrainer
    python benchmarks/step_time.py -c Collection911_SynthHippo -p nnHarmonyPlans_bs2   # a plans variant
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
from pathlib import Path
from types import SimpleNamespace

REFERENCE = "nnUNetTrainer (reference)"


def ensure_collection(args) -> str:
    if args.collection:
        return args.collection
    from nnharmony.dataset_conversion.synthetic import make_synthetic_collection
    from nnharmony.planners.plan_and_preprocess import plan_and_preprocess_collection

    root = Path(tempfile.mkdtemp(prefix="nnharmony_bench_"))
    for k in ("raw", "preprocessed", "results"):
        (root / k).mkdir()
    os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                      nnUNet_results=str(root / "results"))
    folders = make_synthetic_collection(root / "raw", first_id=901, num_cases=8, shape=tuple(args.shape), seed=0)
    ids = [int(Path(f).name[7:10]) for f in folders]
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's planner prints; stdout is for the table
        plan_and_preprocess_collection(ids, "Collection900_Bench", [args.configuration])
    return "Collection900_Bench"


def _peak_memory_mb(device) -> float:
    import torch

    from nnharmony.utils.resources import own_peak_rss_mb

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return own_peak_rss_mb()  # not ru_maxrss: it would start from the planning parent's peak


def worker(args) -> dict:
    """Time one trainer (or the nnU-Net reference) in this process."""
    import torch

    from nnharmony.trainers.run import TrainingOptions, build_trainer

    device = torch.device(args.device)
    trainer_name = "nnHarmonyTrainer" if args.worker == REFERENCE else args.worker
    trainer = build_trainer(TrainingOptions(args.collection, args.configuration, 0, trainer_name, plans=args.plans,
                                            device=args.device), device)
    trainer.initialize()
    loader_tr, _ = trainer.get_dataloaders()
    batch = next(loader_tr)
    if args.worker == REFERENCE:
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        from nnharmony.losses.partial_label import nnunet_deep_supervision_weights

        pm, cm = trainer.plans_manager, trainer.configuration_manager
        net = nnUNetTrainer.build_network_architecture(pm, cm, trainer.num_input_channels, trainer.spec.num_tasks + 1,
                                                       True).to(device)
        targets = [(t * torch.arange(1, t.shape[1] + 1).view(1, -1, *([1] * (t.ndim - 2)))).amax(1, keepdim=True)
                   for t in batch["target"]]
        ref_batch = {"data": batch["data"], "target": targets}
        loss = DeepSupervisionWrapper(
            DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                           weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss),
            nnunet_deep_supervision_weights(len(targets)))
        opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
        scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        ref = SimpleNamespace(network=net, optimizer=opt, loss=loss, device=device, grad_scaler=scaler)
        step = lambda: nnUNetTrainer.train_step(ref, ref_batch)  # noqa: E731  nnU-Net's own step
    else:
        trainer.network.train()
        step = lambda: trainer.train_step(batch)  # noqa: E731
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / args.steps
    result = {"trainer": args.worker, "step_s": step_s, "peak_mb": _peak_memory_mb(device),
              "patch": list(trainer.configuration_manager.patch_size), "batch": trainer.batch_size}
    if args.worker == "nnHarmonyTrainer":
        for _ in range(2):
            next(loader_tr)
        t0 = time.perf_counter()
        for _ in range(args.loader_batches):
            next(loader_tr)
        result["loader_batches_per_s"] = args.loader_batches / (time.perf_counter() - t0)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--collection", default=None,
                   help="planned collection, name (default: a synthetic one in a temporary folder)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-p", "--plans", default="nnHarmonyPlans", help="joint plans identifier (e.g. a batch-size variant)")
    p.add_argument("-device", "--device", default="cpu")
    p.add_argument("--trainers", nargs="+", default=["nnHarmonyTrainer"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--shape", type=int, nargs=3, default=[48, 48, 48], help="synthetic volume shape")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    args.collection = ensure_collection(args)
    rows = []
    for name in [REFERENCE, *args.trainers]:
        cmd = [sys.executable, __file__, "--worker", name, "-d", args.collection, "-c", args.configuration,
               "-p", args.plans, "-device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--loader-batches", str(args.loader_batches)]
        # the reference step is not compiled; compile none unless the user asks (nnUNet_compile=t)
        env = {"nnUNet_compile": "f", **os.environ}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[-1][7:]))
    ref = next(r for r in rows if r["trainer"] == REFERENCE)
    base = next((r for r in rows if r["trainer"] == "nnHarmonyTrainer"), None)
    print(f"\ncollection {args.collection}, {args.plans}, {args.configuration}, device {args.device}, "
          f"patch {ref['patch']}, batch {ref['batch']}, {args.steps} steps after {args.warmup} warm-up\n")
    print("| trainer | step (s) | x nnU-Net | x nnHarmonyTrainer | peak memory (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        vs_base = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
        print(f"| {r['trainer']} | {r['step_s']:.3f} | {r['step_s'] / ref['step_s']:.2f} | {vs_base} | {r['peak_mb']:.0f} |")
    if base and "loader_batches_per_s" in base:
        n = os.environ.get("nnUNet_n_proc_DA", "default")
        print(f"\nmixed loader: {base['loader_batches_per_s']:.2f} batches/s with nnUNet_n_proc_DA={n} "
              f"(step: {1 / base['step_s']:.2f} steps/s)")


if __name__ == "__main__":
    main()
