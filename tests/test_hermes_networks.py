"""Hermes networks and loss: shapes (2D, 3D, anisotropic), mixed-task batches, masking, extend, counts."""

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnharmony.networks.hermes import (
    OFFICIAL_PRIOR_PARAMETERS,
    HermesUNet,
    ModalityClassifier,
    PosteriorPrototypeHead,
    PriorAttentionBlock,
    PriorFusion,
    PriorPool,
    count_prior_parameters,
    gather_tasks,
    hermes_fusion_stages,
    task_ids_from_mask,
)
from nnharmony.losses.hermes import HermesLoss, adaptive_dice, masked_bce

torch.set_num_threads(1)


def _kw(dim):
    return dict(
        conv_op=nn.Conv3d if dim == 3 else nn.Conv2d,
        norm_op=nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        conv_bias=True,
    )


def plain(dim, features=(8, 16, 16, 32, 32), strides=None, in_ch=2, ds=True):
    n = len(features)
    strides = strides or [1] + [2] * (n - 1)
    return PlainConvUNet(in_ch, n, list(features), kernel_sizes=3, strides=strides, n_conv_per_stage=1,
                         num_classes=3, n_conv_per_stage_decoder=1, deep_supervision=ds, **_kw(dim))


def resenc(dim, features=(8, 16, 16, 32), in_ch=1, ds=False):
    n = len(features)
    return ResidualEncoderUNet(in_ch, n, list(features), kernel_sizes=3, strides=[1] + [2] * (n - 1),
                               n_blocks_per_stage=1, num_classes=3, n_conv_per_stage_decoder=1,
                               deep_supervision=ds, **_kw(dim))


def hermes(backbone, num_tasks=5, num_modalities=3, **kw):
    torch.manual_seed(0)
    kw.setdefault("blocks_per_level", {"encoder": (1, 1, 1), "decoder": (1, 1)})
    kw.setdefault("tokens_per_modality", 3)
    kw.setdefault("proto_dim", 8)
    return HermesUNet(backbone, num_tasks, num_modalities, **kw)


# mixed batch: sample 0 from a dataset with tasks {0, 1, 2}, sample 1 from one with task {4}
TASK_IDS = torch.tensor([[0, 1, 2], [4, -1, -1]])
MOD_IDS = torch.tensor([1, -1])


# ----------------------------------------------------------------------------------------------------------
def test_prior_pool_select_and_extend():
    torch.manual_seed(0)
    pool = PriorPool(num_tasks=4, num_modalities=2, channels=6, tokens_per_modality=3)
    assert pool.task_prior.shape == (5, 6) and pool.modality_prior.shape == (3, 3, 6)
    pr = pool.select(torch.tensor([[0, 3, -1], [2, -1, -1]]), torch.tensor([1, -1]))
    assert pr.shape == (2, 3 + 3, 6)
    assert torch.equal(pr[0, 2], pool.task_prior[-1]) and torch.equal(pr[1, 1], pool.task_prior[4])
    assert torch.equal(pr[0, 3:], pool.modality_prior[1]) and torch.equal(pr[1, 3:], pool.modality_prior[-1])
    old_t, old_m = pool.task_prior.detach().clone(), pool.modality_prior.detach().clone()
    pool.extend(num_new_tasks=2, num_new_modalities=1)
    assert pool.task_prior.shape == (7, 6) and pool.modality_prior.shape == (4, 3, 6)
    assert torch.equal(pool.task_prior[:4], old_t[:4]) and torch.equal(pool.task_prior[-1], old_t[-1])
    assert torch.equal(pool.modality_prior[:2], old_m[:2]) and torch.equal(pool.modality_prior[-1], old_m[-1])


@pytest.mark.parametrize("spatial", [(6, 5), (3, 4, 5)])
def test_prior_attention_block_maps_and_tokens(spatial):
    torch.manual_seed(0)
    blk = PriorAttentionBlock(64)
    assert blk.heads == 2 and blk.dim_head == 32
    x, pr = torch.randn(2, 64, *spatial), torch.randn(2, 7, 64)
    y, pr2 = blk(x, pr)
    assert y.shape == x.shape and pr2.shape == pr.shape
    yt, pr3 = blk(x.flatten(2).transpose(1, 2), pr)  # token layout gives the same result
    assert torch.allclose(yt.transpose(1, 2).reshape_as(y), y, atol=1e-5) and torch.allclose(pr3, pr2, atol=1e-5)


def test_fusion_padding_invariance():
    """With mask_padded_tasks the real tasks' outputs do not depend on how wide the batch is padded."""
    torch.manual_seed(0)
    fus = PriorFusion(16, 2, num_tasks=5, num_modalities=2, tokens_per_modality=3)
    x = torch.randn(1, 16, 4, 4)
    y1, p1 = fus(x, torch.tensor([[3]]), torch.tensor([0]))
    y2, p2 = fus(x, torch.tensor([[3, -1, -1]]), torch.tensor([0]))
    assert torch.allclose(y1, y2, atol=1e-6) and torch.allclose(p1[:, 0], p2[:, 0], atol=1e-6)
    assert torch.allclose(p1[:, 1:], p2[:, 3:], atol=1e-6)
    fus.mask_padded_tasks = False  # official behaviour: null tokens are keys too
    y3, _ = fus(x, torch.tensor([[3, -1, -1]]), torch.tensor([0]))
    assert not torch.allclose(y1, y3, atol=1e-6)


def test_heads_shapes():
    torch.manual_seed(0)
    head = PosteriorPrototypeHead([16, 32], feat_channels=[8, 16], proto_dim=4)
    post = [torch.randn(2, 3, 16), torch.randn(2, 3, 32)]
    out = head(post, [torch.randn(2, 8, 10, 12), torch.randn(2, 16, 5, 6)])
    assert [o.shape for o in out] == [(2, 3, 10, 12), (2, 3, 5, 6)]
    # folded projection == explicit 1x1 conv projection then dot with the prototypes
    f = torch.randn(2, 8, 3, 4, 5)
    proj = torch.einsum("pc,bcdhw->bpdhw", head.projections[0].weight, f)
    ref = torch.einsum("btp,bpdhw->btdhw", head.prototypes(post), proj)
    assert torch.allclose(head(post, f), ref, atol=1e-5)
    mc = ModalityClassifier([16, 32], num_modalities=4)
    assert mc([torch.randn(2, 3, 16), torch.randn(2, 3, 32)]).shape == (2, 4)


def test_fusion_stage_mapping():
    iso = hermes_fusion_stages([1, 2, 2, 2, 2, 2])  # nnU-Net 3d_fullres: cum 1,2,4,8,16,32
    assert iso == {"encoder": {2: 2, 3: 2, 4: 4}, "decoder": {1: 2, 2: 2}}
    aniso = hermes_fusion_stages([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])  # max cum 1,2,4,8
    assert aniso == {"encoder": {2: 2, 3: 2}, "decoder": {0: 2}}  # 1/8 is the bottleneck: no decoder stage
    shallow = hermes_fusion_stages([1, 2, 2])  # cum 1,2,4: only the 1/4 level exists (bottleneck)
    assert shallow == {"encoder": {2: 2}, "decoder": {}}


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,patch", [(2, (32, 32)), (3, (32, 32, 32))])
def test_hermes_unet_shapes_ds(dim, patch):
    net = hermes(plain(dim, ds=True))
    assert net.fusion_stages == {"encoder": {2: 1, 3: 1, 4: 1}, "decoder": {0: 1, 1: 1}}
    assert net.level_channels == [16, 32, 32, 32, 16]
    x = torch.randn(2, 2, *patch)
    out = net(x, task_ids=TASK_IDS, modality_id=MOD_IDS)
    assert isinstance(out, list) and len(out) == 4
    for i, o in enumerate(out):
        assert o.shape == (2, 3, *[p // 2 ** i for p in patch])
    assert net.last_modality_logits.shape == (2, 3)
    # nnU-Net's set_deep_supervision_enabled
    net.decoder.deep_supervision = False
    single = net(x, cond={"task_ids": TASK_IDS, "modality_id": MOD_IDS})
    assert isinstance(single, torch.Tensor) and torch.allclose(single, out[0], atol=1e-5)


def test_hermes_unet_fusion_shapes_3d():
    net = hermes(plain(3))
    seen = []
    for name, mod in net.named_modules():
        if isinstance(mod, PriorFusion):
            mod.register_forward_hook(lambda m, i, o, n=name: seen.append((n, tuple(o[0].shape), tuple(o[1].shape))))
    net(torch.randn(2, 2, 32, 32, 32), task_ids=TASK_IDS, modality_id=MOD_IDS)
    # levels 1/4, 1/8, 1/16 down and 1/8, 1/4 up; priors (B, T + L, C) with T = 3, L = 3
    assert seen == [
        ("encoder_fusion.2", (2, 16, 8, 8, 8), (2, 6, 16)),
        ("encoder_fusion.3", (2, 32, 4, 4, 4), (2, 6, 32)),
        ("encoder_fusion.4", (2, 32, 2, 2, 2), (2, 6, 32)),
        ("decoder_fusion.0", (2, 32, 4, 4, 4), (2, 6, 32)),
        ("decoder_fusion.1", (2, 16, 8, 8, 8), (2, 6, 16)),
    ]


def test_hermes_unet_anisotropic_resenc():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    bb = ResidualEncoderUNet(1, 4, [8, 16, 16, 32], kernel_sizes=3, strides=strides, n_blocks_per_stage=1,
                             num_classes=3, n_conv_per_stage_decoder=1, deep_supervision=True, **_kw(3))
    net = hermes(bb)
    assert net.fusion_stages == {"encoder": {2: 1, 3: 1}, "decoder": {0: 1}}
    out = net(torch.randn(2, 1, 8, 32, 32), task_ids=TASK_IDS, modality_id=MOD_IDS)
    assert [tuple(o.shape) for o in out] == [(2, 3, 8, 32, 32), (2, 3, 8, 16, 16), (2, 3, 4, 8, 8)]


def test_inference_condition_and_padding_invariance():
    net = hermes(resenc(2)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        batch = net(x, task_ids=TASK_IDS, modality_id=MOD_IDS)
        net.set_inference_condition([4], -1)  # what a predictor binds for sample 1's dataset
        alone = net(x[1:])
        wide = net(x[1:], task_ids=torch.tensor([[4, -1, -1, -1, -1]]), modality_id=torch.tensor([-1]))
    assert alone.shape == (1, 1, 32, 32)
    assert torch.allclose(alone[0, 0], batch[1, 0], atol=1e-5)  # independent of the other sample / padding
    assert torch.allclose(wide[0, 0], alone[0, 0], atol=1e-5)
    with pytest.raises(ValueError):
        net(x, task_ids=torch.tensor([[0, 9], [1, 2]]), modality_id=MOD_IDS)  # task id out of range


def test_gradients_reach_priors_and_all_parameters():
    net = hermes(plain(2, ds=True))
    out = net(torch.randn(2, 2, 32, 32), task_ids=TASK_IDS, modality_id=torch.tensor([1, 0]))
    target = [(torch.rand_like(o) > 0.5).float() for o in out]
    loss = HermesLoss()(out, target, TASK_IDS >= 0, net.last_modality_logits, torch.tensor([1, 0]))
    loss.backward()
    pools = net.pools()
    assert len(pools) == 5
    for p in pools:
        assert p.task_prior.grad[[0, 1, 2, 4]].abs().sum(1).gt(0).all()
        assert p.modality_prior.grad[[0, 1]].abs().sum((1, 2)).gt(0).all()
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert unused == [], unused  # DDP-safe: seg_layers removed, every DS projection used


def test_extend_keeps_old_outputs():
    net = hermes(plain(3, features=(8, 16, 16, 32)), num_tasks=4, num_modalities=2).eval()
    x = torch.randn(2, 2, 16, 16, 16)
    tids, mids = torch.tensor([[0, 3], [2, -1]]), torch.tensor([1, -1])
    with torch.no_grad():
        before = [o.clone() for o in net(x, task_ids=tids, modality_id=mids)]
        mod_before = net.last_modality_logits.clone()
        n_before = count_prior_parameters(net)
        net.extend(num_new_tasks=3, num_new_modalities=1)
        after = net(x, task_ids=tids, modality_id=mids)
    assert net.num_tasks == 7 and net.num_modalities == 3
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert torch.equal(net.last_modality_logits[:, :2], mod_before)
    # per pool: 3 new task rows + 1 new modality x 3 tokens, C each
    assert count_prior_parameters(net) == n_before + sum((3 + 1 * 3) * p.channels for p in net.pools())
    with torch.no_grad():
        new = net(x, task_ids=torch.tensor([[6, 0], [5, -1]]), modality_id=torch.tensor([2, 2]))
    assert new[0].shape == (2, 2, 16, 16, 16)


def test_official_prior_parameter_count():
    # Hermes-R levels: C = 128, 256, 320 (encoder 1/4, 1/8, 1/16) and 256, 128 (decoder 1/8, 1/4);
    # official tn=72 -> task prior (73, C), mn=6 -> modality prior (6, 10, C): num_tasks=72, num_modalities=5
    assert OFFICIAL_PRIOR_PARAMETERS == 144_704
    pools = [PriorPool(72, 5, c, 10) for c in (128, 256, 320, 256, 128)]
    assert pools[0].task_prior.shape == (73, 128) and pools[0].modality_prior.shape == (6, 10, 128)
    assert sum(count_prior_parameters(p) for p in pools) == 144_704
    assert round(144_704 / 1e6, 3) == 0.145
    # the same sizes from a wrapped nnU-Net backbone (features 32,64,128,256,320), channels only, no forward
    bb = PlainConvUNet(1, 5, [32, 64, 128, 256, 320], nn.Conv3d, 3, [1, 2, 2, 2, 2], 1, 72, 1,
                       norm_op=nn.InstanceNorm3d, nonlin=nn.LeakyReLU)
    net = HermesUNet(bb, num_tasks=72, num_modalities=5)
    assert net.level_channels == [128, 256, 320, 256, 128]
    assert net.fusion_stages == {"encoder": {2: 2, 3: 2, 4: 4}, "decoder": {0: 2, 1: 2}}
    assert count_prior_parameters(net) == OFFICIAL_PRIOR_PARAMETERS


# ----------------------------------------------------------------------------------------------------------
def test_loss_ignores_padded_and_unannotated_tasks():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6, 6, requires_grad=True)
    target = (torch.rand(3, 4, 6, 6) > 0.6).float()
    mask = torch.tensor([[True, True, False, False], [True, False, True, False], [False, False, False, True]])
    lf = HermesLoss()
    ref = lf(logits, target, mask)
    logits2, target2 = logits.detach().clone(), target.clone()
    logits2[~mask] = float("nan")  # even NaN in unsupervised channels must not leak
    target2[~mask] = 1 - target2[~mask]
    logits2.requires_grad_(True)
    out = lf(logits2, target2, mask)
    assert torch.equal(out, ref)
    out.backward()
    assert torch.isfinite(logits2.grad).all() and (logits2.grad[~mask] == 0).all()
    for fn in (masked_bce, adaptive_dice):
        assert torch.equal(fn(logits2, target2, mask), fn(logits, target, mask))
    # masked BCE = mean over supervised pairs of per-pair voxel means
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((2, 3))
    assert torch.allclose(masked_bce(logits, target, mask), bce[mask].mean())
    # nothing supervised -> 0, still differentiable
    z = HermesLoss()(logits, target, torch.zeros_like(mask))
    z.backward()
    assert z.item() == 0


def test_adaptive_dice_values_and_ds_modality():
    y = torch.zeros(1, 1, 100)
    y[..., :50] = 1
    perfect = torch.where(y > 0, 20.0, -20.0)
    assert adaptive_dice(perfect, y, torch.ones(1, 1, dtype=torch.bool)).item() < 1e-6
    # alpha clamping: all-wrong prediction gives loss ~1
    assert adaptive_dice(-perfect, y, torch.ones(1, 1, dtype=torch.bool)).item() > 0.99
    # DS + modality term, modality id -1 ignored
    torch.manual_seed(0)
    seg = [torch.randn(2, 2, 8, 8), torch.randn(2, 2, 4, 4)]
    tgt = [(torch.rand_like(s) > 0.5).float() for s in seg]
    mask = torch.tensor([[True, True], [True, False]])
    mlog = torch.randn(2, 3)
    lf = HermesLoss(mod_weight=0.01)
    base = HermesLoss(mod_weight=0.0)(seg, tgt, mask)
    w = [2 / 3, 1 / 3]
    exp = sum(wi * (masked_bce(s, t, mask) + adaptive_dice(s, t, mask)) for wi, s, t in zip(w, seg, tgt))
    assert torch.allclose(base, exp)
    full = lf(seg, tgt, mask, mlog, torch.tensor([2, -1]))
    ce = torch.nn.functional.cross_entropy(mlog[:1], torch.tensor([2]))
    assert torch.allclose(full, base + 0.01 * ce)
    assert torch.allclose(lf(seg, tgt, mask, mlog, torch.tensor([-1, -1])), base)


def test_task_layout_helpers():
    tm = torch.tensor([[False, True, False, True, True], [False, False, True, False, False]])
    ids = task_ids_from_mask(tm)
    assert ids.tolist() == [[1, 3, 4], [2, -1, -1]]
    tgt = torch.arange(2 * 5 * 2, dtype=torch.float).reshape(2, 5, 2)
    g = gather_tasks(tgt, ids)
    assert torch.equal(g[0], tgt[0, [1, 3, 4]]) and torch.equal(g[1, 0], tgt[1, 2])
    assert (g[1, 1:] == 0).all()


def test_loss_average_samples_weighs_every_sample_once():
    """'samples': a sample with one task weighs as much as a sample with three (official 'pairs': 1/4)."""
    torch.manual_seed(0)
    logits, target = torch.randn(3, 3, 6, 6), (torch.rand(3, 3, 6, 6) > 0.5).float()
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    per_pair = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((2, 3))
    by_sample = (per_pair[0].mean() + per_pair[1, 0]) / 2
    assert torch.allclose(masked_bce(logits, target, mask, "samples"), by_sample)
    assert not torch.allclose(masked_bce(logits, target, mask, "pairs"), by_sample)
    one_task = adaptive_dice(logits[1:2, :1], target[1:2, :1], mask[1:2, :1])
    three_tasks = adaptive_dice(logits[:1], target[:1], mask[:1])
    assert torch.allclose(adaptive_dice(logits, target, mask, average="samples"), (one_task + three_tasks) / 2)
    assert HermesLoss(average="samples")(logits, target, torch.zeros_like(mask)).item() == 0
    with pytest.raises(ValueError, match="average"):
        HermesLoss(average="tasks")
