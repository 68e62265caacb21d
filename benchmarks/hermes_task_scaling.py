"""How Hermes' training step grows with the number of global tasks: step time and peak memory of
``HermesUNet`` + ``HermesLoss`` for 1, 4, 16 and 64 global tasks, next to the universal baseline (the same
U-Net with one sigmoid output per global task and the partial-label loss). Prints a Markdown table; not a test.

Two batch layouts per task count G:
* ``all``: every sample requests all G tasks (one dataset annotating G structures: the worst case);
* ``4/sample``: G/4 members with 4 tasks each (a collection of many small datasets); each sample requests its
  member's 4 tasks, the batch mixes members.

The network is nnU-Net's 3d_fullres ``PlainConvUNet`` topology for the patch (features 32..320, two convs per
stage, deep supervision), built directly (no dataset needed). One batch is reused; each configuration runs
warm-up steps first.

    python benchmarks/hermes_task_scaling.py                                  # CPU, 48^3 patch, batch 2
    python benchmarks/hermes_task_scaling.py -device cuda --patch 128 128 128 --batch 2
"""
from __future__ import annotations

import argparse
import time

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnharmony.utils.resources import own_peak_rss_mb
from nnharmony.networks.hermes import HermesUNet
from nnharmony.losses.hermes import HermesLoss
from nnharmony.losses.partial_label import PartialLabelLoss, nnunet_deep_supervision_weights


def unet(num_outputs: int, n_stages: int, in_ch: int = 1) -> PlainConvUNet:
    features = [min(32 * 2 ** i, 320) for i in range(n_stages)]
    return PlainConvUNet(in_ch, n_stages, features, nn.Conv3d, 3, [1] + [2] * (n_stages - 1), 2, num_outputs, 2,
                         conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)


def targets_like(outputs, rng: torch.Generator):
    return [(torch.rand(o.shape, generator=rng) > 0.9).float().to(o.device) for o in outputs]


def time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def measure(kind: str, num_tasks: int, layout: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(0)
    n_stages = 5 if min(args.patch) >= 64 else 4
    x = torch.randn(args.batch, 1, *args.patch, device=device)
    per_sample = num_tasks if layout == "all" else min(4, num_tasks)
    # sample b belongs to member b % (G / per_sample); its tasks are that member's block of global ids
    members = max(1, num_tasks // per_sample)
    task_ids = torch.stack([torch.arange(per_sample) + (b % members) * per_sample for b in range(args.batch)])
    task_mask = torch.ones(args.batch, per_sample, dtype=torch.bool, device=device)
    if kind == "hermes":
        net = HermesUNet(unet(1, n_stages), num_tasks, num_modalities=2).to(device)
        loss_fn = HermesLoss(ds_weights=nnunet_deep_supervision_weights(n_stages - 1))
        task_ids = task_ids.to(device)
        modality = torch.zeros(args.batch, dtype=torch.long, device=device)

        def forward():
            out = net.forward_with_modality(x, task_ids=task_ids, modality_id=modality)
            return out.seg, out.modality_logits
    else:
        net = unet(num_tasks, n_stages).to(device)
        loss_fn = PartialLabelLoss(nnunet_deep_supervision_weights(n_stages - 1))
        full_mask = torch.zeros(args.batch, num_tasks, dtype=torch.bool, device=device)
        full_mask.scatter_(1, task_ids.to(device), True)

        def forward():
            return net(x), None
    opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
    with torch.no_grad():
        seg, _ = forward()
    target = targets_like(seg, rng)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            seg, mod_logits = forward()
            if kind == "hermes":
                loss = loss_fn(seg, target, task_mask, mod_logits, modality)
            else:
                loss = loss_fn(seg, target, full_mask)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = time_steps(step, args.steps, args.warmup, device)
    peak = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
            else own_peak_rss_mb())
    return {"kind": kind, "tasks": num_tasks, "layout": layout, "per_sample": per_sample, "step_s": step_s,
            "peak_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-device", "--device", default="cpu")
    p.add_argument("--patch", type=int, nargs=3, default=[48, 48, 48])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    for g in args.tasks:
        base = measure("baseline", g, "all", args, device)
        for layout in (["all", "4/sample"] if g > 4 else ["all"]):
            rows.append((measure("hermes", g, layout, args, device), base))
    mem = "peak CUDA memory (MB)" if device.type == "cuda" else "peak RSS of the process so far (MB)"
    print(f"patch {args.patch}, batch {args.batch}, device {device}, {args.steps} timed steps\n")
    print(f"| global tasks | tasks per sample | baseline step (s) | Hermes step (s) | Hermes / baseline | "
          f"Hermes {mem} |")
    print("|---:|---:|---:|---:|---:|---:|")
    for h, b in rows:
        print(f"| {h['tasks']} | {h['per_sample']} | {b['step_s']:.3f} | {h['step_s']:.3f} | "
              f"{h['step_s'] / b['step_s']:.2f} | {h['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
