"""Multi-process training with torch DDP (gloo on CPU) and resuming a training killed with SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch


def _ddp_worker(rank: int, world_size: int, collection: str, out_dir: str, port: int) -> None:
    import torch.distributed as dist

    from nnharmony.trainers.run import TrainingOptions, build_trainer

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    opts = TrainingOptions(collection, "3d_fullres", 0, device="cpu", num_gpus=world_size)
    trainer = build_trainer(opts, torch.device("cpu"))
    trainer.on_train_start()
    keys = []
    trainer.on_train_epoch_start()
    for _ in range(3):
        batch = next(trainer.dataloader_train)
        keys.append(list(batch["keys"]))
        trainer.train_step(batch)
    params = torch.cat([p.detach().flatten() for p in trainer.unwrapped_network().parameters()])
    gathered = [torch.zeros_like(params) for _ in range(world_size)]
    dist.all_gather(gathered, params)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"keys": keys, "params_identical": same, "batch_size": trainer.batch_size,
         "global_batch": trainer.configuration_manager.batch_size}))
    trainer.on_train_end()
    dist.destroy_process_group()


def test_two_process_gloo_ddp(synthetic_collection, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, synthetic_collection["name"], str(tmp_path), port), nprocs=2,
                                join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["params_identical"] and r1["params_identical"]
    assert r0["batch_size"] + r1["batch_size"] == r0["global_batch"]  # the global batch is split across ranks
    assert r0["keys"] != r1["keys"]  # each rank draws its own samples


def test_kill_and_resume(synthetic_collection, tmp_path):
    env = dict(os.environ, nnUNet_n_proc_DA="0", OMP_NUM_THREADS="1")
    name = synthetic_collection["name"]
    args = [sys.executable, "-m", "nnharmony.cli.train", name, "3d_fullres", "0", "-tr", "SeparateHeadsTrainer",
            "-device", "cpu", "--epochs", "40", "--iterations-per-epoch", "1", "--val-iterations-per-epoch", "1",
            "--save-every", "1"]
    fold = Path(synthetic_collection["nnUNet_results"]) / name / "SeparateHeadsTrainer__nnHarmonyPlans__3d_fullres" / "fold_0"
    latest = fold / "checkpoint_latest.pth"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not latest.is_file():
            time.sleep(0.5)
            assert proc.poll() is None, "training ended before writing a checkpoint"
        time.sleep(2.0)  # let it get further, possibly mid-write of the next checkpoint
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert latest.is_file()
    epoch_before = torch.load(latest, weights_only=True)["current_epoch"]
    assert epoch_before >= 1
    resume = args[:]
    resume[resume.index("40")] = str(epoch_before + 2)
    done = subprocess.run(resume + ["--c"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = torch.load(fold / "checkpoint_final.pth", weights_only=True)
    assert final["current_epoch"] == epoch_before + 2
    assert len(final["logging"]["train_losses"]) == epoch_before + 2  # the log continued, not restarted
