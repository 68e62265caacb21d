"""Hermes' shared (modality-agnostic) input and the 'official' recipe (issue 18): the per-slot collection layout
gathered into the shared stem at training and at inference, legacy records rebuilt per-slot, the official
LAMB + warm-up/poly schedule, EMA weights used for validation and written as the checkpoint's network weights,
and the whole CPU path with the official recipe (train -> final validation -> predict from the EMA weights)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from test_hermes_trainer import SMALL, SPEC, build, fake_trainer, make_batch

from nnharmony.networks.hermes_collection import occupied_slots, shared_input_layout, slot_table
from nnharmony.trainers.hermes_trainer import (
    HermesConfig,
    HermesTrainer,
    WarmupPolyLRScheduler,
    WeightEMA,
    hermes_config_from_plans,
)
from nnharmony.trainers.nnharmony_trainer import nnHarmonyTrainer

torch.set_num_threads(1)

SHARED = {**SMALL, "input_mode": "shared", "input_channels": 2}  # SPEC: members CT | T1+T2 | CT


def _first_conv(net):
    return next(m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv3d))


# ----------------------------------------------------------------------------------------------------------
# shared input
# ----------------------------------------------------------------------------------------------------------
def test_config_defaults_and_legacy_records():
    cfg = HermesConfig()
    assert (cfg.input_mode, cfg.recipe, cfg.resolved_ema_decay()) == ("shared", "nnunet", None)
    assert HermesConfig(recipe="official").resolved_ema_decay() == 0.99
    assert HermesConfig(ema_decay=0.9).resolved_ema_decay() == 0.9  # EMA in either recipe
    assert HermesConfig(recipe="official", ema_decay=0).resolved_ema_decay() is None
    assert HermesConfig().resolved_warmup_epochs(200) == 5 and HermesConfig().resolved_warmup_epochs(10) == 1
    with pytest.raises(ValueError, match="input_mode"):
        HermesConfig(input_mode="stacked")
    with pytest.raises(ValueError, match="recipe"):
        HermesConfig(recipe="paper")
    assert HermesConfig().loss_average == "pairs"  # the official averaging
    with pytest.raises(ValueError, match="loss_average"):
        HermesConfig(loss_average="tasks")
    # a model trained before the shared input existed keeps its per-slot stem
    legacy = {"nnharmony": {"hermes": {k: v for k, v in HermesConfig().to_dict().items() if k != "input_mode"}}}
    assert hermes_config_from_plans(legacy).input_mode == "per_slot"
    assert hermes_config_from_plans({"nnharmony": {}}).input_mode == "shared"


def test_slot_table_and_layout():
    table = slot_table([[0], [2, 1], [1]], 2)
    assert table.tolist() == [[0, -1], [1, 2], [1, -1]]  # collection modality order, padded
    with pytest.raises(ValueError, match="shared input has 1"):
        slot_table([[0, 1]], 1)
    x = torch.arange(3 * 3 * 4, dtype=torch.float32).reshape(3, 3, 4) + 1
    out = shared_input_layout(x, table)
    assert torch.equal(out[0, 0], x[0, 0]) and torch.equal(out[1], x[1, 1:]) and torch.equal(out[2, 0], x[2, 1])
    assert out[0, 1].abs().sum() == 0 and out[2, 1].abs().sum() == 0
    data = torch.zeros(3, 4, 4)
    data[2] = 1
    assert occupied_slots(data) == [2]


def test_shared_stem_sees_no_modality_slot():
    """A single-channel image gives the same output whichever slot its modality occupies: the stem is shared,
    the modality enters only through the modality prior."""
    torch.manual_seed(0)
    net = build(HermesTrainer, 3, 4, ds=False, hermes=SHARED)
    assert net.input_width == 2 and _first_conv(net).in_channels == 2
    per_slot = build(HermesTrainer, 3, 4, ds=False, hermes={**SMALL, "input_mode": "per_slot"})
    assert per_slot.input_width is None and _first_conv(per_slot).in_channels == 3
    net.eval()
    img = torch.randn(1, 16, 16, 16)
    ct, t1 = torch.zeros(1, 3, 16, 16, 16), torch.zeros(1, 3, 16, 16, 16)
    ct[:, 0], t1[:, 1] = img, img
    kw = dict(task_ids=torch.tensor([[0, 1]]), modality_id=torch.tensor([0]))
    with torch.no_grad():
        a = net(ct, input_slots=torch.tensor([[0, -1]]), **kw)
        b = net(t1, input_slots=torch.tensor([[1, -1]]), **kw)
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="channel slots"):
        net(ct, **kw)


def test_trainer_and_predictor_feed_the_same_layout():
    """Training (slots from the batch's member) and prediction (slots bound by ``inference_condition``) give
    the shared stem the same channels."""
    torch.manual_seed(0)
    t = fake_trainer(build(HermesTrainer, 3, 4, hermes=SHARED), hermes={**SHARED, "unknown_modality_prob": 0.0})
    batch = make_batch()
    assert t.batch_input_slots(batch).tolist() == [[0, -1], [1, 2]]
    t.network.eval()
    t.network.decoder.deep_supervision = False
    with torch.no_grad():
        trained = t.network_forward(batch["data"], batch)
        t.network.set_inference_condition(**HermesTrainer.inference_condition(SPEC, 1))
        predicted = t.network(batch["data"][1:])
    assert torch.allclose(predicted[:, 3], trained[1:, 0], atol=1e-5)  # batch of 2 vs 1: rounding only
    # per-slot trainers pass no slots
    t.hermes = HermesConfig.from_value({**SMALL, "input_mode": "per_slot"})
    assert t.batch_input_slots(batch) is None


def test_transfer_weights_widens_the_shared_stem():
    """Adaptation to a collection whose widest member has more channels: new stem channels start at zero, so a
    one-channel member's output is unchanged."""
    torch.manual_seed(1)
    old = build(HermesTrainer, 3, 4, ds=False, hermes={**SHARED, "input_channels": 1})
    new = build(HermesTrainer, 3, 4, ds=False, hermes=SHARED)
    HermesTrainer.transfer_weights(old.state_dict(), SPEC, SPEC, new)
    assert _first_conv(new).weight[:, 1].abs().sum() == 0
    old.eval(), new.eval()
    x = make_batch()["data"][:1]
    for net in (old, new):
        net.set_inference_condition(**HermesTrainer.inference_condition(SPEC, 0))
    with torch.no_grad():
        assert torch.allclose(old(x), new(x), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# official recipe
# ----------------------------------------------------------------------------------------------------------
def test_warmup_poly_schedule_is_the_official_one():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupPolyLRScheduler(opt, 2e-3, 200, 5)
    for e, want in [(0, 2e-3 * math.exp(-10)), (3, 2e-3 * math.exp(10 * (3 / 5 - 1))), (5, 2e-3),
                    (6, 2e-3 * (1 - 6 / 200) ** 0.9), (199, 2e-3 * (1 / 200) ** 0.9)]:
        s.step(e)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)
    s = WarmupPolyLRScheduler(opt, 1.0, 10, 0)  # no warm-up: nnU-Net's poly
    assert opt.param_groups[0]["lr"] == 1.0


def test_official_recipe_optimizer():
    from timm.optim import Lamb

    t = fake_trainer(build(HermesTrainer, 3, 4, hermes=SHARED), hermes={**SHARED, "recipe": "official"})
    t.num_epochs, t.adaptation_mode = 200, False
    opt, sched = t.configure_optimizers()
    assert isinstance(opt, Lamb) and isinstance(sched, WarmupPolyLRScheduler) and sched.warmup_steps == 5
    g = opt.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"], g["max_grad_norm"]) == ((0.9, 0.999), 1e-5, 1e-5, 1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * math.exp(-10))


def test_weight_ema_matches_the_official_update():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(net, 0.99)
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    for step in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(1.0)
        ema.update(net)
        a = min(1 - 1 / (step + 1), 0.99)
        for k, p in net.named_parameters():
            ref[k] = a * ref[k] + (1 - a) * p.detach()
    for k, _ in net.named_parameters():
        torch.testing.assert_close(ema.weights[k], ref[k])
    assert torch.equal(ema.weights["1.running_mean"], net[1].running_mean)  # buffers copied
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    ema.hold(net)
    assert torch.equal(net[0].weight, ema.weights["0.weight"]) and ema.held_weights is not None
    with pytest.raises(RuntimeError, match="held"):
        ema.update(net)
    ema.release(net)
    assert all(torch.equal(v, trained[k]) for k, v in net.state_dict().items())


def test_checkpoint_holds_ema_weights_and_resume_restores_both(monkeypatch):
    torch.manual_seed(0)
    t = fake_trainer(build(HermesTrainer, 3, 4, hermes=SHARED), hermes={**SHARED, "recipe": "official"})
    t.was_initialized = True
    t.unwrapped_network = lambda: t.network
    t.ema = WeightEMA(t.network, 0.99)
    with torch.no_grad():
        for p in t.network.parameters():
            p.add_(1.0)
    t.ema.update(t.network)  # step 0: EMA = weights
    with torch.no_grad():
        for p in t.network.parameters():
            p.add_(1.0)
    t.ema.update(t.network)  # step 1: EMA halfway
    training = {k: v.clone() for k, v in t.network.state_dict().items()}
    saved = {}

    def fake_save(self, filename):
        saved["checkpoint"] = {"network_weights": {k: v.clone() for k, v in self.unwrapped_network().state_dict().items()},
                               "nnharmony": self.extra_checkpoint_state()}

    monkeypatch.setattr(nnHarmonyTrainer, "save_checkpoint", fake_save)
    t.save_checkpoint("x.pth")
    ckpt = saved["checkpoint"]
    key = "head.proj.0.weight" if "head.proj.0.weight" in training else next(iter(training))
    assert torch.equal(ckpt["network_weights"][key], t.ema.weights[key])  # prediction loads the EMA weights
    assert torch.equal(ckpt["nnharmony"]["ema"]["training_weights"][key], training[key])
    assert ckpt["nnharmony"]["ema"]["step"] == 2 and ckpt["nnharmony"]["hermes"]["recipe"] == "official"
    assert all(torch.equal(v, training[k]) for k, v in t.network.state_dict().items())  # released after saving

    loaded = {}

    def fake_load(self, checkpoint):
        loaded["weights"] = checkpoint["network_weights"]
        self.unwrapped_network().load_state_dict(checkpoint["network_weights"])

    monkeypatch.setattr(nnHarmonyTrainer, "load_checkpoint", fake_load)
    ema_weights = {k: v.clone() for k, v in t.ema.weights.items()}
    t.ema = WeightEMA(t.network, 0.99)
    t.load_checkpoint(ckpt)
    assert torch.equal(loaded["weights"][key], training[key]) and t.ema.step == 2
    assert all(torch.equal(t.ema.weights[k], v) for k, v in ema_weights.items())


# ----------------------------------------------------------------------------------------------------------
# end to end: official recipe, shared input (the defaults' other half)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_official_recipe_end_to_end(synthetic_collection, tmp_path):
    """Train (API, no final validation: slow on a CPU) -> checkpoint with EMA weights -> resume restores the
    training and EMA weights -> prediction loads the EMA weights and writes a case."""
    from nnharmony.cli import predict as predict_cli
    from nnharmony.inference.predictor import CollectionPredictor
    from nnharmony.trainers.run import TrainingOptions, apply_options, build_trainer

    opts = TrainingOptions(synthetic_collection["name"], "2d", 0, "HermesTrainer", device="cpu", epochs=2,
                           iterations_per_epoch=2, val_iterations_per_epoch=1,
                           trainer_options={"hermes": {**SMALL, "recipe": "official"}})
    trainer = build_trainer(opts, torch.device("cpu"))
    apply_options(trainer, opts)
    trainer.run_training()
    assert trainer.enable_deep_supervision is False and trainer.ema.step == 4
    folder = Path(trainer.output_folder_base)
    record = json.loads((folder / "plans.json").read_text())["nnharmony"]["hermes"]
    spec = synthetic_collection["spec"]
    assert record["recipe"] == "official" and record["input_mode"] == "shared"
    assert record["input_channels"] == max(len(m.channels) for m in spec.members)
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    ema = ckpt["nnharmony"]["ema"]
    assert ema["step"] == 4 and ema["decay"] == 0.99
    assert any(not torch.equal(v, ema["training_weights"][k]) for k, v in ckpt["network_weights"].items())
    assert ckpt["optimizer_state"]["param_groups"][0]["weight_decay"] == 1e-5
    # resume (--c): training weights into the network, EMA weights into the EMA
    resumed = build_trainer(opts, torch.device("cpu"))
    apply_options(resumed, opts)
    resumed.load_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"))
    net = resumed.unwrapped_network().state_dict()
    assert all(torch.equal(net[k], v) for k, v in ema["training_weights"].items())
    assert all(torch.equal(resumed.ema.weights[k], v) for k, v in ckpt["network_weights"].items())
    # prediction: the EMA weights, the shared stem
    predictor = CollectionPredictor.from_model_folder(folder, folds=[0])
    assert predictor.network.input_width == record["input_channels"]
    assert all(torch.equal(predictor.parameters[0][k], v) for k, v in ckpt["network_weights"].items())
    src = synthetic_collection["raw_folders"][0] / "imagesTr"
    inp = tmp_path / "in"
    inp.mkdir()
    case = sorted(src.glob("*_0000.nii.gz"))[0]
    (inp / case.name).write_bytes(case.read_bytes())
    predict_cli.main(["-i", str(inp), "-o", str(tmp_path / "out"), "-c", synthetic_collection["name"], "-tr",
                      "HermesTrainer", "-cfg", "2d", "-f", "0", "-device", "cpu", "--disable_tta", "--dataset",
                      str(spec.members[0].dataset_id)])
    assert (tmp_path / "out" / case.name.replace("_0000", "")).is_file()


# ----------------------------------------------------------------------------------------------------------
# prior ablations
# ----------------------------------------------------------------------------------------------------------
def test_ablation_switches():
    torch.manual_seed(0)
    net = build(HermesTrainer, 3, 4, ds=False, hermes={**SHARED, "task_priors": False})
    fusion = next(iter(net.encoder_fusion.values()))
    ids, mod = torch.tensor([[0, 1, -1]]), torch.tensor([0])
    x = torch.randn(1, fusion.channels, 4, 4, 4)
    _, priors = fusion(x, ids, mod)
    assert torch.equal(priors[:, :3], fusion.pool.select(ids, mod)[:, :3])  # task tokens not fused: static
    assert not torch.equal(priors[:, 3:], fusion.pool.select(ids, mod)[:, 3:])  # modality tokens are
    net = build(HermesTrainer, 3, 4, ds=False, hermes={**SHARED, "modality_priors": False}).eval()
    img = torch.randn(1, 3, 16, 16, 16)
    slots = torch.tensor([[0, -1]])
    with torch.no_grad():
        a = net(img, task_ids=torch.tensor([[0]]), modality_id=torch.tensor([0]), input_slots=slots)
        b = net(img, task_ids=torch.tensor([[0]]), modality_id=torch.tensor([1]), input_slots=slots)
    assert torch.equal(a, b)
    t = fake_trainer(net, hermes={**SHARED, "modality_priors": False}, ds_scales=1)
    assert t.loss.mod_weight == 0
