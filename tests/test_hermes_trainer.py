"""Hermes trainers: network build from a joint plan, options, loss through the trainer, global-task validation
counts, --dataset auto rule, incremental learning (old outputs unchanged before fine-tuning), prior analysis;
and the whole CPU path on the synthetic collection: train -> predict (--dataset ID / auto / --tasks) ->
evaluate -> analyze priors."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnharmony.data.collection import CollectionSpec
from nnharmony.networks.hermes import HermesUNet
from nnharmony.networks.hermes_collection import HermesCollectionUNet
from nnharmony.trainers.hermes_trainer import (
    HermesConfig,
    HermesResEncTrainer,
    HermesTrainer,
)

torch.set_num_threads(1)

SMALL = {"encoder_blocks": [1, 1, 1], "decoder_blocks": [1, 1], "tokens_per_modality": 3, "proto_dim": 8}


def joint_plans(num_modalities: int, hermes: dict | None = SMALL, features=(8, 16, 32, 32), patch=(16, 16, 16)):
    """A joint-plan-like nnU-Net plans dict (the joint planner's architecture layout), small enough for CPU."""
    n = len(features)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_conv_per_stage": [1] * n, "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    cfg = {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
           "patch_size": list(patch), "median_image_size_in_voxels": list(patch), "spacing": [1.0, 1.0, 1.0],
           "normalization_schemes": ["ZScoreNormalization"] * num_modalities,
           "use_mask_for_norm": [False] * num_modalities, "batch_dice": True, "architecture": arch}
    nnh = {"collection": "Collection999_Unit", "member_plans": {}}
    if hermes is not None:
        nnh["hermes"] = dict(hermes)
    return {"dataset_name": "Collection999_Unit", "plans_name": "nnHarmonyPlans", "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": cfg}, "nnharmony": nnh}


def build(trainer_cls, num_modalities, num_tasks, ds=True, **kw):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(joint_plans(num_modalities, **kw))
    return trainer_cls.build_network_architecture(pm, pm.get_configuration("3d_fullres"), num_modalities, num_tasks, ds)


def make_spec(tasks, modalities, members, name="Collection999_Unit") -> CollectionSpec:
    """members: list of (channels, tasks, num_training)."""
    ms = []
    for i, (channels, mtasks, n) in enumerate(members):
        dn = f"Dataset{991 + i}_M{i}"
        ms.append({"dataset_id": 991 + i, "dataset_name": dn, "domain": dn, "channels": channels, "num_training": n,
                   "labels": {"background": 0, **{t: j + 1 for j, t in enumerate(mtasks)}},
                   "tasks": [{"label": t, "values": [j + 1], "task": t} for j, t in enumerate(mtasks)]})
    return CollectionSpec.from_dict({"name": name, "modalities": modalities, "tasks": tasks,
                                     "domains": [m["domain"] for m in ms], "members": ms})


SPEC = make_spec(["liver", "spleen", "kidney", "tumor"], ["CT", "T1", "T2"],
                 [(["CT"], ["liver", "spleen", "kidney"], 10), (["T1", "T2"], ["tumor"], 5), (["CT"], ["liver"], 20)])


def fake_trainer(network, spec=SPEC, hermes=None, ds_scales=3):
    """A HermesTrainer with only what the step methods read (no nnU-Net folders needed)."""
    t = HermesTrainer.__new__(HermesTrainer)
    t.hermes = HermesConfig.from_value(hermes or SMALL)
    t.spec, t.device, t.network, t.is_ddp, t.enable_deep_supervision = spec, torch.device("cpu"), network, False, True
    t.task_width = max(len(spec.task_ids(m.dataset_id)) for m in spec.members)
    t._get_deep_supervision_scales = lambda: [[1, 1, 1]] * ds_scales
    t.loss = t._build_loss()
    return t


def make_batch(patch=(16, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    # sample 0: member 0 (CT, tasks 0,1,2); sample 1: member 1 (T1+T2, task 3)
    data = torch.randn(2, 3, *patch, generator=g)
    data[0, 1:] = 0
    data[1, 0] = 0
    task_mask = torch.tensor([[True, True, True, False], [False, False, False, True]])
    targets = []
    for s in range(3):
        shp = [p // 2 ** s for p in patch]
        targets.append((torch.rand(2, 4, *shp, generator=g) > 0.7).float())
    return {"data": data, "target": targets, "task_mask": task_mask, "modality_id": torch.tensor([0, 1]),
            "dataset_id": torch.tensor([0, 1]), "domain_id": torch.tensor([0, 1]),
            "channel_mask": data.flatten(2).abs().sum(-1) > 0, "keys": ["a/0", "b/0"]}


# ----------------------------------------------------------------------------------------------------------
# configuration and network build
# ----------------------------------------------------------------------------------------------------------
def test_config_in_one_place():
    cfg = HermesConfig()
    assert (cfg.encoder_blocks, cfg.decoder_blocks, cfg.tokens_per_modality, cfg.proto_dim) == ((2, 2, 4), (2, 2), 10, 32)
    assert (cfg.bce_weight, cfg.dice_weight, cfg.mod_weight, cfg.mask_padded_tasks) == (1.0, 1.0, 0.01, True)
    cfg = HermesConfig.from_value(json.loads('{"encoder_blocks": [1, 2, 3], "mod_weight": 0.1}'))
    assert cfg.encoder_blocks == (1, 2, 3) and cfg.to_dict()["encoder_blocks"] == [1, 2, 3]
    with pytest.raises(ValueError, match="unknown hermes option.*tokens_per_modality"):
        HermesConfig.from_value({"tokens": 3})
    with pytest.raises(ValueError, match="3 values"):
        HermesConfig(encoder_blocks=(1, 1))


@pytest.mark.parametrize("trainer_cls", [HermesTrainer, HermesResEncTrainer])
def test_build_from_joint_plan(trainer_cls):
    torch.manual_seed(0)
    net = build(trainer_cls, num_modalities=3, num_tasks=4)
    assert isinstance(net, HermesCollectionUNet)
    # 4 stages at 1, 1/2, 1/4, 1/8: encoder fusion at 1/4 (stage 2) and 1/8 (stage 3, the bottleneck),
    # decoder fusion at 1/4 (decoder stage 0 outputs stage 2's resolution); 1/16 and the decoder's 1/8 do
    # not exist
    assert net.fusion_stages == {"encoder": {2: 1, 3: 1}, "decoder": {0: 1}}
    pools = net.pools()
    assert len(pools) == 3 and all(p.num_tasks == 4 and p.num_modalities == 3 and p.tokens_per_modality == 3
                                   for p in pools)
    assert net.head.proto_dim == 8 and len(net.decoder.seg_layers) == 0
    if trainer_cls is HermesResEncTrainer:
        assert type(net.encoder).__name__ == "ResidualEncoder"
        assert [len(s.blocks) for s in net.encoder.stages] == [1, 3, 4, 6]
        assert net.encoder.stem is not None
    batch = make_batch()
    out = net(batch["data"], task_ids=torch.tensor([[0, 1, 2], [3, -1, -1]]), modality_id=torch.tensor([0, 1]))
    assert [tuple(o.shape) for o in out] == [(2, 3, 16, 16, 16), (2, 3, 8, 8, 8), (2, 3, 4, 4, 4)]
    assert net.last_modality_logits.shape == (2, 3)
    # nnU-Net's predictor: network(x) with a bound condition -> one channel per global task
    net.eval()
    net.decoder.deep_supervision = False
    net.set_inference_condition(**trainer_cls.inference_condition(SPEC, 1))
    glob = net(batch["data"][1:])
    assert glob.shape == (1, 4, 16, 16, 16)
    assert torch.count_nonzero(glob[:, :3]) == 0 and torch.count_nonzero(glob[:, 3]) > 0
    own = net(batch["data"][1:], task_ids=torch.tensor([[3]]), modality_id=torch.tensor([1]))
    assert torch.equal(glob[:, 3:], own)


def test_options_are_recorded_in_plans_and_rebuild_the_same_network():
    plans = joint_plans(2, hermes={"tokens_per_modality": 5, "encoder_blocks": [1, 1, 1], "decoder_blocks": [1, 2]})
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    net = HermesTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 3, False)
    assert net.pools()[0].tokens_per_modality == 5 and net.fusion_stages["decoder"] == {0: 2}
    assert isinstance(net, HermesUNet) and net.decoder.deep_supervision is False
    # no record (plans of a collection never trained with Hermes): paper defaults
    pm = PlansManager(joint_plans(2, hermes=None))
    net = HermesTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 3, False)
    assert net.pools()[0].tokens_per_modality == 10 and net.fusion_stages["encoder"] == {2: 2, 3: 2}


# ----------------------------------------------------------------------------------------------------------
# loss and validation through the trainer
# ----------------------------------------------------------------------------------------------------------
def test_compute_loss_ignores_padded_and_unannotated_tasks():
    torch.manual_seed(0)
    t = fake_trainer(build(HermesTrainer, 3, 4), hermes={**SMALL, "unknown_modality_prob": 0.0})
    batch = make_batch()
    task_ids = t.batch_task_ids(batch)
    assert task_ids.tolist() == [[0, 1, 2], [3, -1, -1]]  # fixed width = largest member task count
    out = t.network_forward(batch["data"], batch)
    loss = t.compute_loss(out, batch["target"], batch)
    assert torch.isfinite(loss) and set(t.loss.last_terms) == {"bce", "dice", "mod"}
    # targets of tasks a sample's dataset does not annotate do not matter
    other = [tg.clone() for tg in batch["target"]]
    for tg in other:
        tg[0, 3] = 1 - tg[0, 3]
        tg[1, :3] = 1 - tg[1, :3]
    assert torch.equal(t.compute_loss(out, other, batch), loss)
    # padded output slots (sample 1, slots 1-2) are never read, not even NaN
    poisoned = [o.detach().clone() for o in out]
    for o in poisoned:
        o[1, 1:] = float("nan")
    t.network(batch["data"], task_ids=task_ids, modality_id=batch["modality_id"])  # refresh modality logits
    assert torch.allclose(t.compute_loss(poisoned, batch["target"], batch), loss.detach(), atol=1e-6)
    loss.backward()
    pool = t.network.pools()[0]
    assert pool.task_prior.grad[:4].abs().sum() > 0 and pool.task_prior.grad[4].abs().sum() == 0  # null row unused


def test_validation_counts_global_tasks():
    torch.manual_seed(0)
    t = fake_trainer(build(HermesTrainer, 3, 4))
    t.network.eval()
    batch = make_batch()
    res = t.validation_step(batch)
    assert res["tp_hard"].shape == (4,) and res["fp_hard"].shape == (4,) and res["fn_hard"].shape == (4,)
    # every global task is annotated by one sample: fn + tp = that sample's positives
    tgt = batch["target"][0]
    pos = [tgt[0, 0].sum(), tgt[0, 1].sum(), tgt[0, 2].sum(), tgt[1, 3].sum()]
    assert np.allclose(res["tp_hard"] + res["fn_hard"], [float(p) for p in pos])
    # per member (K, T), as the base trainer logs them: sample 0 is member 0 (tasks 0-2), sample 1 member 1
    for key in ("tp", "fp", "fn"):
        per_member = res[f"{key}_member"]
        assert per_member.shape == (len(SPEC.members), 4)
        assert np.allclose(per_member.sum(0), res[f"{key}_hard"])
        assert per_member[0, 3] == 0 and not per_member[1, :3].any() and not per_member[2].any()


def test_unknown_modality_dropout_only_in_training():
    torch.manual_seed(0)
    t = fake_trainer(build(HermesTrainer, 3, 4), hermes={**SMALL, "unknown_modality_prob": 1.0})
    batch = make_batch()
    seen = []
    orig = t.network.forward

    def spy(x, **kw):
        seen.append(kw["modality_id"].tolist())
        return orig(x, **kw)

    t.network.forward = spy
    t.network.train()
    t.network_forward(batch["data"], batch)
    t.network.eval()
    t.network_forward(batch["data"], batch)
    assert seen == [[-1, -1], [0, 1]]


# ----------------------------------------------------------------------------------------------------------
# --dataset auto
# ----------------------------------------------------------------------------------------------------------
def test_infer_member_rule(monkeypatch):
    """Candidates by channel count; the best-scoring hypothesis's modality; ties by training cases."""
    spec = make_spec(["a", "b", "c"], ["CT", "T1", "T2"],
                     [(["CT"], ["a"], 5), (["T1"], ["b"], 50), (["CT"], ["c"], 9), (["T1", "T2"], ["a"], 99)])
    probs = {(0,): np.array([0.7, 0.2, 0.1]), (1,): np.array([0.3, 0.6, 0.1]),  # hypothesis = channel slots
             (1, 2): np.array([0.5, 0.3, 0.2])}

    class Pred:
        def __init__(self):
            self.spec = spec

        def member_context(self, i):
            return SimpleNamespace(slots=spec.channel_slots(spec.members[i].dataset_id),
                                   configuration_manager=SimpleNamespace(configuration={"spacing": [1, 1, 1]}),
                                   plans_manager=SimpleNamespace(plans={}, transpose_forward=[0, 1, 2]))

        def preprocess(self, files, ctx):
            return torch.tensor(ctx.slots), {}

    seen_tasks = []

    def fake(cls, pred, data, task_ids):
        seen_tasks.append(task_ids)
        return probs[tuple(data.tolist())]

    monkeypatch.setattr(HermesTrainer, "modality_probabilities", classmethod(fake))
    idx, info = HermesTrainer.infer_member(Pred(), ["case_0000.nii.gz"])
    # each hypothesis runs with its own member's tasks (members 0 and 2 share the CT slot, not the tasks)
    assert sorted(seen_tasks) == sorted(tuple(spec.task_ids(m.dataset_id)) for m in spec.members[:3])
    # CT hypothesis scores 0.7 > T1 hypothesis 0.6: CT; members 0 and 2 are CT: 2 has more cases
    assert idx == 2 and info["predicted_modality"] == "CT"
    assert info["modality_probabilities"] == pytest.approx({"CT": 0.7, "T1": 0.2, "T2": 0.1})
    assert set(info["candidate_scores"]) == {"Dataset991_M0", "Dataset992_M1", "Dataset993_M2"}
    probs[(1,)] = np.array([0.1, 0.8, 0.1])
    assert HermesTrainer.infer_member(Pred(), ["case_0000.nii.gz"])[0] == 1
    assert HermesTrainer.infer_member(Pred(), ["c_0000.nii.gz", "c_0001.nii.gz"])[0] == 3  # only 2-channel member
    with pytest.raises(ValueError, match="no member .* has that many channels"):
        HermesTrainer.infer_member(Pred(), ["c_0000.nii.gz", "c_0001.nii.gz", "c_0002.nii.gz"])



# ----------------------------------------------------------------------------------------------------------
# incremental learning
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("new_modality", [False, True])
def test_transfer_weights_keeps_old_outputs(new_modality):
    old_spec = SPEC
    mods = ["CT", "T1", "T2"] + (["PET"] if new_modality else [])
    new_spec = make_spec(["liver", "spleen", "kidney", "tumor", "lesion"], mods,
                         [(["CT"], ["liver", "spleen", "kidney"], 10), (["T1", "T2"], ["tumor"], 5),
                          (["CT"], ["liver"], 20), ([mods[-1]], ["lesion"], 7)], name="Collection998_Unit")
    torch.manual_seed(1)
    old = build(HermesTrainer, 3, 4, ds=False)
    with torch.no_grad():  # make old weights differ from any fresh init
        for p in old.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(2)
    new = build(HermesTrainer, len(mods), 5, ds=False)
    params_before = {k: id(v) for k, v in new.named_parameters()}
    HermesTrainer.transfer_weights(old.state_dict(), old_spec, new_spec, new)
    assert {k: id(v) for k, v in new.named_parameters()} == params_before  # optimizer stays valid
    for po, pn in zip(old.pools(), new.pools()):
        assert torch.equal(pn.task_prior[:4], po.task_prior[:4]) and torch.equal(pn.task_prior[-1], po.task_prior[-1])
        assert torch.equal(pn.modality_prior[:3], po.modality_prior[:3])
        assert torch.equal(pn.modality_prior[-1], po.modality_prior[-1])
    old.eval(), new.eval()
    x = make_batch()["data"]
    x_new = torch.cat([x, torch.zeros(2, len(mods) - 3, *x.shape[2:])], 1)
    for member in (0, 1, 2):
        old.set_inference_condition(**HermesTrainer.inference_condition(old_spec, member))
        new.set_inference_condition(**HermesTrainer.inference_condition(new_spec, member))
        with torch.no_grad():
            a, b = old(x), new(x_new)
        assert b.shape[1] == 5 and torch.count_nonzero(b[:, 4]) == 0
        if new_modality:  # the input convolution has one more (zero-weight) channel: same up to rounding
            assert torch.allclose(a, b[:, :4], atol=1e-5, rtol=1e-5)
            assert torch.allclose(old.last_modality_logits, new.last_modality_logits[:, :3], atol=1e-5)
        else:
            assert torch.equal(a, b[:, :4])
            assert torch.equal(old.last_modality_logits, new.last_modality_logits[:, :3])
    # the new task gets a mask: the new member's condition produces its channel
    new.set_inference_condition(**HermesTrainer.inference_condition(new_spec, 3))
    with torch.no_grad():
        out = new(x_new)
    assert torch.count_nonzero(out[:, 4]) > 0 and torch.count_nonzero(out[:, :4]) == 0
    # fine-tune subset: pools, fusion blocks and heads, not the backbone
    sub = {id(p) for p in HermesTrainer.adaptation_parameters(new)}
    assert all(id(p) in sub for pool in new.pools() for p in pool.parameters())
    assert all(id(p) in sub for p in new.head.parameters()) and all(id(p) in sub for p in new.modality_classifier.parameters())
    assert not any(id(p) in sub for p in new.encoder.parameters()) and not any(id(p) in sub for p in new.decoder.parameters())


def test_transfer_weights_refuses_non_extension():
    old = build(HermesTrainer, 3, 4, ds=False)
    shuffled = make_spec(["spleen", "liver", "kidney", "tumor"], ["CT", "T1", "T2"],
                         [(["CT"], ["liver", "spleen", "kidney"], 10), (["T1", "T2"], ["tumor"], 5)])
    with pytest.raises(ValueError, match="does not extend"):
        HermesTrainer.transfer_weights(old.state_dict(), SPEC, shuffled, build(HermesTrainer, 3, 4, ds=False))
    other_opts = build(HermesTrainer, 3, 4, ds=False, hermes={**SMALL, "tokens_per_modality": 4})
    with pytest.raises(ValueError, match="other Hermes options"):
        HermesTrainer.transfer_weights(old.state_dict(), SPEC, SPEC, other_opts)


# ----------------------------------------------------------------------------------------------------------
# prior analysis
# ----------------------------------------------------------------------------------------------------------
def test_prior_analysis_matrices_and_files(tmp_path):
    from nnharmony.evaluation.prior_analysis import analyze_priors, extract_priors

    torch.manual_seed(0)
    net = build(HermesTrainer, 3, 4)
    with torch.no_grad():  # liver and spleen priors identical at every level, kidney opposite
        for pool in net.pools():
            pool.task_prior[1] = pool.task_prior[0]
            pool.task_prior[2] = -pool.task_prior[0]
    levels = extract_priors(net.state_dict())
    assert [lv.key for lv in levels] == ["encoder2", "encoder3", "decoder0"]
    s = analyze_priors(net.state_dict(), SPEC.tasks, SPEC.modalities, tmp_path,
                       strides=[[1, 1, 1]] + [[2, 2, 2]] * 3)
    assert [lv["label"] for lv in s["levels"]] == ["encoder stage 2 (1/4, C=32)", "encoder stage 3 (1/8, C=32)",
                                                   "decoder stage 0 (1/4, C=32)"]
    m = np.array(s["task_similarity_mean"])
    assert m.shape == (4, 4) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    assert m[0, 1] == pytest.approx(1) and m[0, 2] == pytest.approx(-1)
    rows = (tmp_path / "task_prior_similarity.csv").read_text().splitlines()
    assert rows[0] == ",liver,spleen,kidney,tumor" and rows[1].startswith("liver,1.0")
    assert len((tmp_path / "modality_prior_similarity_levels.csv").read_text().splitlines()) == 1 + 3 * 9
    for f in s["files"]["task"] + s["files"]["modality"]:
        assert (tmp_path / f).stat().st_size > 0
    assert (tmp_path / "task_prior_similarity.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------------------
# end to end on the synthetic collection (CPU)
# ----------------------------------------------------------------------------------------------------------
QUICK = ["-device", "cpu", "--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations-per-epoch", "1"]
E2E_OPTIONS = {"hermes": {**SMALL, "tokens_per_modality": 4}}


def _validation_cases(collection, member_index: int) -> list[str]:
    from nnharmony.data.splits import collection_fold

    return collection_fold(collection["spec"], 0, "3d_fullres")[member_index][1]


def _input_folder(collection, member_index: int, dest: Path) -> list[str]:
    import shutil

    raw = collection["raw_folders"][member_index]
    cases = _validation_cases(collection, member_index)
    dest.mkdir(parents=True, exist_ok=True)
    for c in cases:
        for f in (raw / "imagesTr").glob(f"{c}_*.nii.gz"):
            shutil.copy(f, dest / f.name)
    return cases


def _predict(collection, inp, out, *extra):
    from nnharmony.cli import predict as predict_cli

    predict_cli.main(["-i", str(inp), "-o", str(out), "-c", collection["name"], "-tr", "HermesTrainer", "-device",
                      "cpu", "--disable_tta", *extra])


@pytest.fixture(scope="module")
def hermes_model(synthetic_collection):
    from nnharmony.cli import train as train_cli

    train_cli.main([synthetic_collection["name"], "3d_fullres", "0", "-tr", "HermesTrainer", *QUICK,
                    "--trainer-options", json.dumps(E2E_OPTIONS)])
    return Path(synthetic_collection["nnUNet_results"]) / synthetic_collection["name"] / \
        "HermesTrainer__nnHarmonyPlans__3d_fullres"


def test_hermes_end_to_end(hermes_model, synthetic_collection, tmp_path):
    import SimpleITK as sitk

    from nnharmony.cli import analyze_priors as analyze_cli
    from nnharmony.cli import evaluate as evaluate_cli

    spec = synthetic_collection["spec"]
    fold = hermes_model / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pth", weights_only=True)
    assert ckpt["trainer_name"] == "HermesTrainer" and ckpt["nnharmony"]["hermes"]["tokens_per_modality"] == 4
    plans = json.loads((hermes_model / "plans.json").read_text())
    assert plans["nnharmony"]["hermes"]["tokens_per_modality"] == 4  # the predictor rebuilds this network
    for m in spec.members:
        summary = json.loads((fold / "validation" / m.dataset_name / "summary.json").read_text())
        assert len(summary["mean"]) == len(m.tasks)
    # the epoch log and progress_members.json/png name members and tasks, as the base trainer's do
    log = "\n".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "np.float" not in log and "Pseudo dice " + spec.tasks[0] + " " in log
    history = json.loads((fold / "progress_members.json").read_text())
    assert len(history) == 1 and history[0]
    for name, per_task in history[0].items():
        assert f"  {name}: " in log
        assert set(per_task) == {spec.tasks[t] for t in spec.task_ids(spec.member(name).dataset_id)}
    assert (fold / "progress_members.png").is_file()

    # known member: its task list and modality from the collection; geometry and label values of the member
    m0 = spec.members[0]
    inp = tmp_path / "in0"
    cases = _input_folder(synthetic_collection, 0, inp)
    _predict(synthetic_collection, inp, tmp_path / "by_id", "--dataset", str(m0.dataset_id))
    allowed = {0} | {v for t in m0.tasks for v in t.values}
    for c in cases:
        pred, img = sitk.ReadImage(str(tmp_path / "by_id" / f"{c}.nii.gz")), sitk.ReadImage(str(inp / f"{c}_0000.nii.gz"))
        assert pred.GetSize() == img.GetSize() and np.allclose(pred.GetSpacing(), img.GetSpacing())
        assert np.allclose(pred.GetOrigin(), img.GetOrigin())
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= allowed
    evaluate_cli.main(["-ref", str(synthetic_collection["raw_folders"][0] / "labelsTr"), "-pred",
                       str(tmp_path / "by_id"), "-d", str(m0.dataset_id), "-o", str(tmp_path / "eval")])
    assert len(json.loads((tmp_path / "eval" / "summary.json").read_text())["metric_per_case"]) == len(cases)

    # only some tasks
    keep = m0.tasks[-1]
    _predict(synthetic_collection, inp, tmp_path / "tasks", "--dataset", str(m0.dataset_id), "--tasks", keep.task)
    for c in cases:
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "tasks" / f"{c}.nii.gz")))).tolist())
        assert values <= {0, *keep.values}

    # --dataset auto: a one-channel member's images and the two-channel member's images in one folder
    two = next(i for i, m in enumerate(spec.members) if len(m.channels) == 2)
    cases_two = _input_folder(synthetic_collection, two, inp)
    _predict(synthetic_collection, inp, tmp_path / "auto", "--dataset", "auto")
    info = json.loads((tmp_path / "auto" / "predicted_datasets.json").read_text())
    assert set(info) == set(cases) | set(cases_two)
    for c, rec in info.items():
        assert rec["predicted_modality"] in spec.modalities
        assert sum(rec["modality_probabilities"].values()) == pytest.approx(1, abs=1e-4)
        member = spec.member(rec["dataset"])
        if c in cases_two:  # the only member with two channels
            assert rec["dataset"] == spec.members[two].dataset_name
        else:
            assert len(member.channels) == 1
            assert spec.primary_modality(member.dataset_id) == spec.modalities.index(rec["predicted_modality"])
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "auto" / f"{c}.nii.gz")))).tolist())
        assert values <= {0} | {v for t in member.tasks for v in t.values}

    # prior analysis: CSV + PNG of task and modality priors
    analyze_cli.main(["-c", synthetic_collection["name"], "-tr", "HermesTrainer", "-o", str(tmp_path / "priors")])
    rows = (tmp_path / "priors" / "task_prior_similarity.csv").read_text().splitlines()
    assert rows[0].split(",")[1:] == spec.tasks and len(rows) == 1 + len(spec.tasks)
    assert (tmp_path / "priors" / "modality_prior_similarity.csv").read_text().splitlines()[0].split(",")[1:] == \
        spec.modalities
    for f in ("task_prior_similarity.png", "modality_prior_similarity.png", "task_prior_similarity_levels.png"):
        assert (tmp_path / "priors" / f).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_hermes_adaptation_adds_a_task(hermes_model, synthetic_collection, tmp_path):
    """nnharmony_adapt: a new member with a new task; old members' predictions before fine-tuning equal the old
    model's; the new task is predicted after fine-tuning."""
    import shutil

    import SimpleITK as sitk

    from nnharmony.cli import adapt as adapt_cli
    from nnharmony.planners.plan_and_preprocess import plan_and_preprocess_collection

    spec = synthetic_collection["spec"]
    src = synthetic_collection["raw_folders"][0]
    new_raw = Path(synthetic_collection["nnUNet_raw"]) / "Dataset906_SynthRenal"
    if not new_raw.exists():
        shutil.copytree(src, new_raw)
        dj = json.loads((new_raw / "dataset.json").read_text())
        dj["labels"] = {("renal_cortex" if k == "kidney" else k): v for k, v in dj["labels"].items()}
        dj.pop("nnharmony_synthetic", None)
        (new_raw / "dataset.json").write_text(json.dumps(dj))
    new_name = "Collection910_SynthPlus"
    new_spec, _ = plan_and_preprocess_collection(synthetic_collection["ids"] + [906], new_name, ["3d_fullres"],
                                                 num_processes={"3d_fullres": 2}, extends=synthetic_collection["name"])
    assert new_spec.tasks[: len(spec.tasks)] == spec.tasks and new_spec.tasks[-1] == "renal_cortex"
    adapt_cli.main(["--from", synthetic_collection["name"], "-c", new_name, "-tr", "HermesTrainer", *QUICK])
    folder = Path(synthetic_collection["nnUNet_results"]) / new_name / "HermesTrainer__nnHarmonyPlans__3d_fullres"
    report = json.loads((folder / "fold_0" / "adaptation_report.json").read_text())
    assert 0 < report["fine_tuned_parameters"]
    # before fine-tuning, old members' predictions are the old model's
    for m in spec.members:
        for f in sorted((hermes_model / "fold_0" / "validation" / m.dataset_name).glob("*.nii.gz")):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "fold_0" / "validation_before_adaptation" /
                                                          m.dataset_name / f.name)))
            assert np.array_equal(a, b), (m.dataset_name, f.name)
    assert report["members"]["Dataset906_SynthRenal"]["old"] is False
    # the new task is predicted for the new member
    new_member = new_spec.member(906)
    inp = tmp_path / "in"
    inp.mkdir()
    case = sorted((new_raw / "imagesTr").glob("*_0000.nii.gz"))[0]
    shutil.copy(case, inp / case.name)
    from nnharmony.cli import predict as predict_cli

    predict_cli.main(["-i", str(inp), "-o", str(tmp_path / "out"), "-c", new_name, "-tr", "HermesTrainer", "-device",
                      "cpu", "--disable_tta", "--dataset", "906", "--tasks", "renal_cortex"])
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / case.name.replace("_0000", ""))))
    assert set(np.unique(out).tolist()) <= {0, next(t.values[0] for t in new_member.tasks if t.task == "renal_cortex")}
