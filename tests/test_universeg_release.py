"""UniverSeg release checkpoints: a release-format state dict segments a folder from a support folder with no
training (``nnharmony_predict ... -pretrained_weights FILE``), read with weights_only and loaded strictly.

The fixture ``../shared/fixtures/universeg_official`` holds a state dict made by the official code (random
weights) and that code's logits for fixed inputs; the user-facing loader must reproduce them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnharmony.inference import support as sup

FIXTURE = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "universeg_official"
WEIGHTS = FIXTURE / "universeg_official_format_random.pt"
REFERENCE = FIXTURE / "reference_io.pt"

pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"fixture {FIXTURE} not present")


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REFERENCE, weights_only=True)


def test_release_state_dict_reproduces_official_logits(reference):
    net, cfg = sup.universeg_from_weights_file(WEIGHTS)
    assert cfg == sup.RELEASE_CONFIG and not net.training
    assert sum(p.numel() for p in net.parameters()) == 1_182_785
    with torch.no_grad():
        logits = net(reference["target_image"], reference["support_images"], reference["support_labels"])
    assert torch.allclose(logits, reference["logits"], atol=1e-4, rtol=0)


def _write(arr: np.ndarray, path: Path) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.7))
    sitk.WriteImage(img, str(path), True)


def _folders(reference, tmp_path: Path) -> tuple[Path, Path]:
    """Support folder (flat layout) with the reference's 5 support pairs of episode 0, one input image."""
    support, inputs = tmp_path / "support", tmp_path / "in"
    support.mkdir()
    inputs.mkdir()
    for s in range(5):
        _write((reference["support_images"][0, s, 0].numpy() * 1000).astype(np.float32), support / f"s{s}_0000.nii.gz")
        _write(reference["support_labels"][0, s, 0].numpy().astype(np.uint8), support / f"s{s}.nii.gz")
    _write((reference["target_image"][0, 0].numpy() * 1000).astype(np.float32), inputs / "q_0000.nii.gz")
    return support, inputs


def test_predict_folder_with_release_weights_no_collection(reference, tmp_path):
    """The CLI path end to end; with S = the 5 support images there is one support set (order does not matter),
    so the written probabilities equal the network applied to the prepared images."""
    from nnharmony.cli import predict as predict_cli

    support, inputs = _folders(reference, tmp_path)
    out = tmp_path / "out"
    predict_cli.main(["-i", str(inputs), "-o", str(out), "--support", str(support), "--label", "1", "-S", "5",
                      "-K", "1", "-device", "cpu", "--save_probabilities", "-pretrained_weights", str(WEIGHTS)])
    pred = sitk.ReadImage(str(out / "q.nii.gz"))
    assert pred.GetSize() == (64, 64) and np.allclose(pred.GetSpacing(), (0.7, 0.7))
    info = json.loads((out / "universeg_prediction.json").read_text())
    assert info["weights_file"] == str(WEIGHTS.resolve()) and info["network"] == sup.RELEASE_CONFIG
    record = json.loads((out / "predict_args.json").read_text())  # every argument and the model file, as nnU-Net
    assert record["model_files"] == [str(WEIGHTS.resolve())] and record["command"].startswith("nnharmony_predict -i")
    assert record["arguments"]["pretrained_weights"] == str(WEIGHTS) and record["arguments"]["support_size"] == 5
    assert record["support_cases"] == [f"s{s}" for s in range(5)] and record["label_values"] == [1]

    net, _ = sup.universeg_from_weights_file(WEIGHTS)
    size = (128, 128)
    q = sup.prepare_images(reference["target_image"][0].numpy() * 1000, 2, size)
    sx = sup.prepare_images(reference["support_images"][0, :, 0].numpy() * 1000, 2, size)[None]
    from nnharmony.data.episodes import resize_label, resize_probabilities

    sy = resize_label(reference["support_labels"][0], size)[None]
    with torch.no_grad():
        expected = resize_probabilities(torch.sigmoid(net(q, sx, sy)), (64, 64))[0, 0].numpy()
    written = np.load(out / "q.npz")["probabilities"][1]
    assert np.abs(written - expected).max() < 1e-5
    assert np.array_equal(sitk.GetArrayFromImage(pred), (expected > 0.5).astype(np.uint8))


def _fails(argv, capsys, match: str) -> str:
    from nnharmony.cli import predict as predict_cli

    with pytest.raises(SystemExit):
        predict_cli.main(argv)
    err = capsys.readouterr().err
    assert match in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_wrong_weights_files_are_refused_with_keys_named(reference, tmp_path, capsys):
    support, inputs = _folders(reference, tmp_path)
    base = ["-i", str(inputs), "-o", str(tmp_path / "out"), "--support", str(support), "--label", "1", "-device",
            "cpu", "-pretrained_weights"]
    state = torch.load(WEIGHTS, weights_only=True)

    renamed = dict(state)
    renamed["enc_blocks.0.cross.conv.weight"] = renamed.pop("enc_blocks.0.cross.cross_conv.weight")
    torch.save(renamed, tmp_path / "renamed.pt")
    err = _fails(base + [str(tmp_path / "renamed.pt")], capsys, "renamed.pt: does not fit the UniverSeg release")
    assert "missing 1 key(s): enc_blocks.0.cross.cross_conv.weight" in err
    assert "unexpected 1 key(s): enc_blocks.0.cross.conv.weight" in err

    from nnharmony.networks.universeg import UniverSeg

    torch.save(UniverSeg(encoder_blocks=[32, 32, 32, 32]).state_dict(), tmp_path / "nf32.pt")
    _fails(base + [str(tmp_path / "nf32.pt")], capsys, "of another shape: ")

    class Payload:  # a pickle that would run code when unpickled without weights_only
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "pwned"),)

    torch.save({"state_dict": Payload()}, tmp_path / "evil.pt")
    _fails(base + [str(tmp_path / "evil.pt")], capsys, "refused without running code from it")
    assert not (tmp_path / "pwned").exists()
    _fails(base + [str(tmp_path / "missing.pt")], capsys, "missing.pt: UniverSeg weights file not found")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_weights_file_without_support_folder_says_what_is_needed(reference, tmp_path, capsys):
    _, inputs = _folders(reference, tmp_path)
    _fails(["-i", str(inputs), "-o", str(tmp_path / "out"), "-device", "cpu", "-pretrained_weights", str(WEIGHTS)],
           capsys, "give --support DIR")


def test_trainer_checkpoint_loads_with_its_recorded_configuration(tmp_path):
    """A UniverSegTrainer checkpoint (``network_weights`` + ``nnharmony.universeg``) works as -pretrained_weights."""
    cfg = {**sup.RELEASE_CONFIG, "encoder_blocks": [8, 8, 8], "image_size": [32, 32]}
    net = sup.network_from_config(cfg)
    torch.save({"network_weights": net.state_dict(), "nnharmony": {"universeg": cfg}}, tmp_path / "ckpt.pth")
    loaded, got = sup.universeg_from_weights_file(tmp_path / "ckpt.pth")
    assert got == cfg
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_release_weights_fine_tune_through_nnharmony_train(synthetic_collection):
    """``nnharmony_train ... -tr UniverSegTrainer -pretrained_weights FILE`` starts from the release weights."""
    from nnharmony.cli import train as train_cli

    options = {"image_size": 32, "support_size": 2, "episode_batch_size": 2, "num_workers": 0,
               "validation_max_cases": 1, "estimate_iteration_time": False}
    train_cli.main([synthetic_collection["name"], "2d", "0", "-tr", "UniverSegTrainer", "-device", "cpu", "--epochs",
                    "1", "--iterations-per-epoch", "1", "--val-iterations-per-epoch", "1", "--holdout", "902",
                    "-pretrained_weights", str(WEIGHTS), "--trainer-options", json.dumps(options)])
    model = Path(synthetic_collection["nnUNet_results"]) / synthetic_collection["name"] / \
        "UniverSegTrainer__nnHarmonyPlans__2d" / "fold_0"
    tuned = torch.load(model / "checkpoint_final.pth", weights_only=True)["network_weights"]
    release = torch.load(WEIGHTS, weights_only=True)
    assert tuned.keys() == release.keys()
    # one Adam step at lr 1e-4 moves every weight by at most ~1e-4: the start was the release, not a fresh init
    assert max((tuned[k] - release[k]).abs().max().item() for k in release) < 1e-3
