"""Catalogue of bad weights and checkpoint files (issue 22 item 1): no code from a file ever runs.

Every path that reads such a file -- ``-chk`` in prediction, ``-pretrained_weights`` and ``--c`` in training
(collection trainers and the per-dataset paradigm through plain nnU-Net trainers), ``nnharmony_adapt``, the
benchmarks -- goes through :mod:`nnharmony.utils.safe_load`. A malicious pickle here creates a marker folder
when unpickled; it must be refused with one line naming the file and torch's reason, and the marker must not
exist afterwards. Files that do not fit the network are refused with the mismatching keys named.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli_error_line
from nnharmony.cli import train as train_cli
from nnharmony.utils.safe_load import (load_weights_into, read_weights_file, state_dict_of, torch_load_made_safe,
                                       weight_mismatches)

QUICK = ["-device", "cpu", "--epochs", "1", "--iterations-per-epoch", "1", "--val-iterations-per-epoch", "1"]


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``: the proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def malicious_file(path: Path, marker: Path, checkpoint_like: bool = True) -> Path:
    content = {"network_weights": {"w": torch.zeros(1)}, "current_epoch": 1, "evil": _Payload(marker)} \
        if checkpoint_like else _Payload(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)
    return path


def listing(*folders: Path) -> dict[str, str]:
    out = {}
    for root in folders:
        for p in sorted(Path(root).rglob("*")) if Path(root).exists() else []:
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def train_error(argv: list[str], capsys) -> str:
    """nnharmony_train's one ``error: ...`` line (exit status 2)."""
    return cli_error_line(train_cli.main, argv, capsys)


# ---------------------------------------------------------------------------------------------- unit level
def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    f = malicious_file(tmp_path / "evil.pth", marker)
    with pytest.raises(ValueError) as e:
        read_weights_file(f, "pretrained weights file")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{f}: not a loadable pretrained weights file")
    assert "mkdir" in msg, f"torch's reason (the refused global) must be kept: {msg}"
    assert not marker.exists()


def test_numpy_scalars_of_plain_nnunet_checkpoints_are_allowed(tmp_path):
    f = tmp_path / "ckpt.pth"
    torch.save({"logging": {"mean_fg_dice": [np.float64(0.5), np.float32(0.25)]}, "_best_ema": np.float64(0.1),
                "network_weights": {"a": torch.ones(2)}}, f)
    content = read_weights_file(f)
    assert float(content["_best_ema"]) == pytest.approx(0.1)
    assert float(content["logging"]["mean_fg_dice"][1]) == 0.25


def test_torch_load_made_safe_covers_third_party_loaders(tmp_path):
    """nnU-Net's own ``load_checkpoint`` calls ``torch.load(path, weights_only=False)``: within the block that
    call is the safe reader, and ``torch.load`` is itself again afterwards."""
    marker = tmp_path / "pwned"
    evil = malicious_file(tmp_path / "evil.pth", marker)
    original = torch.load
    with torch_load_made_safe("checkpoint"):
        with pytest.raises(ValueError, match="posix.mkdir"):
            torch.load(evil, map_location="cpu", weights_only=False)
    assert torch.load is original and not marker.exists()


@pytest.mark.parametrize("content, why", [(b"not a torch file at all", "not a loadable"),
                                          (None, "checkpoint not found")])
def test_unreadable_files(tmp_path, content, why):
    f = tmp_path / "x.pth"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=why):
        read_weights_file(f)


def test_state_dict_of_accepts_the_usual_layouts(tmp_path):
    sd = {"a.weight": torch.ones(2)}
    assert state_dict_of({"network_weights": {"module.a.weight": torch.ones(2)}}, "f").keys() == sd.keys()
    assert state_dict_of({"state_dict": {"_orig_mod.a.weight": torch.ones(2)}}, "f").keys() == sd.keys()
    assert state_dict_of(sd, "f").keys() == sd.keys()
    with pytest.raises(ValueError, match="f: holds no network weights"):
        state_dict_of({"epoch": 3}, "f")


def test_mismatching_keys_are_named(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 2, 1))
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["1.weight"] = torch.zeros(3, 4, 1, 1)
    sd.pop("0.bias")
    sd["extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "w.pth")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_weights_into(net, tmp_path / "w.pth")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'w.pth'}: does not fit the network")
    assert "missing 1 key(s): 0.bias" in msg and "unexpected 1 key(s): extra" in msg
    assert "1.weight: file (3, 4, 1, 1), network (2, 4, 1, 1)" in msg
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "weights changed on refusal"
    # skipped parts keep the network's values; the others are loaded
    sd.pop("extra")
    sd["0.bias"] = torch.full((4,), 3.0)
    torch.save(sd, tmp_path / "w.pth")
    assert weight_mismatches(net.state_dict(), sd, skip=("1.",)) == []
    load_weights_into(net, tmp_path / "w.pth", skip=("1.",))
    assert torch.equal(net[0].bias, torch.full((4,), 3.0)) and torch.equal(net[1].weight, before["1.weight"])


# ---------------------------------------------------------------------------------------------- commands
def _results(synthetic_collection) -> Path:
    return Path(synthetic_collection["nnUNet_results"])


def test_pretrained_weights_malicious_file_is_refused(synthetic_collection, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = malicious_file(tmp_path / "evil.pth", marker)
    before = listing(_results(synthetic_collection))
    line = train_error([synthetic_collection["name"], "2d", "0", "-tr", "nnHarmonyTrainer", "-pretrained_weights",
                        str(evil), *QUICK, "--disable_checkpointing"], capsys)
    assert f"{evil}: not a loadable pretrained weights file" in line and "mkdir" in line
    assert not marker.exists()
    after = listing(_results(synthetic_collection))
    assert not any(k.endswith(".pth") for k in after.keys() - before.keys()), "a checkpoint was written"


def test_pretrained_weights_mismatch_names_the_keys(synthetic_collection, tmp_path, capsys):
    wrong = tmp_path / "wrong.pth"
    torch.save({"network_weights": {"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(1, 1, 1, 1)}}, wrong)
    line = train_error([synthetic_collection["name"], "2d", "0", "-tr", "nnHarmonyTrainer", "-pretrained_weights",
                        str(wrong), *QUICK, "--disable_checkpointing"], capsys)
    assert f"{wrong}: does not fit the network" in line and "missing" in line and "another shape" in line
    assert "encoder.stages.0.0.convs.0.conv.weight" in line


def test_pretrained_weights_and_continue_exclude_each_other(synthetic_collection, tmp_path, capsys):
    line = train_error([synthetic_collection["name"], "2d", "0", "-tr", "nnHarmonyTrainer", "--c",
                        "-pretrained_weights", str(tmp_path / "w.pth"), *QUICK], capsys)
    assert "--c" in line and "-pretrained_weights" in line


def test_pretrained_weights_are_loaded_except_the_output_layers(synthetic_collection, tmp_path):
    """Another model's weights (same architecture) are a valid -pretrained_weights file: everything but the
    output layers is taken from it (nnU-Net's rule), with no training step needed to see it."""
    from nnharmony.trainers.run import TrainingOptions, _maybe_load, build_trainer

    opts = TrainingOptions(synthetic_collection["name"], "2d", 0, device="cpu")
    source = build_trainer(opts, torch.device("cpu"))
    source.initialize()
    with torch.no_grad():
        for p in source.network.parameters():
            p.add_(1.0)  # differs from any fresh initialization
    torch.save({"network_weights": source.network.state_dict()}, tmp_path / "pretrained.pth")
    target = build_trainer(TrainingOptions(**{**opts.__dict__, "pretrained_weights": str(tmp_path / "pretrained.pth")}),
                           torch.device("cpu"))
    _maybe_load(target, TrainingOptions(**{**opts.__dict__, "pretrained_weights": str(tmp_path / "pretrained.pth")}))
    mine, theirs = target.network.state_dict(), source.network.state_dict()
    head = [k for k in mine if ".seg_layers." in k]
    assert head, "the plain network has output layers named like nnU-Net's"
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if k not in head)
    assert not any(torch.equal(mine[k], theirs[k]) for k in head if mine[k].is_floating_point())


def test_continue_per_dataset_refuses_malicious_checkpoint(synthetic_collection, tmp_path, capsys):
    """``--c -tr nnUNetTrainer`` used to hand the file to nnU-Net's own loader (``weights_only=False``)."""
    spec = synthetic_collection["spec"]
    member = spec.members[0]
    folder = _results(synthetic_collection) / member.dataset_name / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0"
    marker = tmp_path / "pwned"
    evil = malicious_file(folder / "checkpoint_latest.pth", marker)
    try:
        line = train_error([synthetic_collection["name"], "2d", "0", "-tr", "nnUNetTrainer", "--c", *QUICK], capsys)
        assert f"{evil}: not a loadable checkpoint" in line and "mkdir" in line
        assert not marker.exists()
    finally:
        evil.unlink()


def test_continue_per_dataset_resumes_a_plain_nnunet_checkpoint(synthetic_collection):
    """``--c -tr nnUNetTrainer`` on a checkpoint written by nnU-Net's own ``save_checkpoint`` (numpy floats in
    its log, a torch.device in its init args): read through the allow-list, and training state restored."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnharmony.paths import preprocessed_dir
    from nnharmony.trainers.run import TrainingOptions, _maybe_load
    from nnharmony.utils.io import load_json

    member = synthetic_collection["spec"].members[0]
    ident = synthetic_collection["joint"]["nnharmony"]["member_plans_identifier"]
    folder = preprocessed_dir() / member.dataset_name

    def plain_trainer(continue_training: bool) -> nnUNetTrainer:
        plans = {**load_json(folder / f"{ident}.json"), "continue_training": continue_training}  # as run_per_dataset
        return nnUNetTrainer(plans, "2d", 0, load_json(folder / "dataset.json"), torch.device("cpu"))

    trainer = plain_trainer(False)
    trainer.initialize()
    for epoch in range(2):  # a log like an epoch's: numpy scalars of every kind nnU-Net logs
        trainer.logger.log("mean_fg_dice", np.float64(0.25 * epoch), epoch)
        trainer.logger.log("dice_per_class_or_region", [np.float32(0.5)], epoch)
        trainer.logger.log("train_losses", np.float32(1.0), epoch)
        trainer.logger.log("val_losses", np.float64(0.9), epoch)
        trainer.logger.log("lrs", 0.01, epoch)
        trainer.logger.log("epoch_start_timestamps", 1.0, epoch)
        trainer.logger.log("epoch_end_timestamps", 2.0, epoch)
    trainer._best_ema = np.float64(0.2)
    trainer.current_epoch = 1
    latest = Path(trainer.output_folder) / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(latest))
    load = torch.load
    try:
        resumed = plain_trainer(True)
        _maybe_load(resumed, TrainingOptions(synthetic_collection["name"], "2d", 0, trainer="nnUNetTrainer",
                                             device="cpu", continue_training=True))
        assert resumed.current_epoch == 2 and float(resumed._best_ema) == pytest.approx(0.2)
        assert torch.load is load  # restored after loading
    finally:
        latest.unlink()


@pytest.mark.slow
def test_continue_per_dataset_resumes_a_real_nnunet_checkpoint(synthetic_collection, capsys):
    """A plain nnU-Net checkpoint (numpy floats in its log) is read by the safe loader and training continues."""
    name = synthetic_collection["name"]
    train_cli.main([name, "2d", "0", "-tr", "nnUNetTrainer", *QUICK])
    train_cli.main([name, "2d", "0", "-tr", "nnUNetTrainer", "--c", *QUICK[:2], "--epochs", "2",
                    "--iterations-per-epoch", "1", "--val-iterations-per-epoch", "1"])
    for m in synthetic_collection["spec"].members:
        final = _results(synthetic_collection) / m.dataset_name / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0" / \
            "checkpoint_final.pth"
        assert read_weights_file(final)["current_epoch"] == 2
