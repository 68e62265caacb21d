"""U-Harmony modules: harmonization norm, insertion depth, domain gate, gated heads, adaptation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnharmony.networks.uharmony import (
    DomainGate, GatedHeads, GateEncoder, UHarmonyNet, UHarmonyNorm, UHarmonyNorm2d, UHarmonyNorm3d, add_domains,
    add_output_tasks, adaptation_parameters, freeze_for_adaptation, gate_context, parse_stages, replace_norms,
    content_view, widen_input_channels,
)

torch.set_num_threads(1)


def _unet(dim=3, kind="plain", in_ch=1, classes=2, ds=True, feats=(4, 8, 8)):
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    n = len(feats)
    common = dict(input_channels=in_ch, n_stages=n, features_per_stage=list(feats), conv_op=conv, kernel_sizes=3,
                  strides=[1] + [2] * (n - 1), num_classes=classes, n_conv_per_stage_decoder=[1] * (n - 1),
                  conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
                  nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=ds)
    if kind == "plain":
        net = PlainConvUNet(n_conv_per_stage=2, **common)
    else:
        net = ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 1][:n], **common)
    return net


def _randomize_affine(net):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


# ---------------------------------------------------------------------------------------------- layer
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("restoration", ["instance", "domain", "none"])
def test_equals_instance_norm_at_init(dim, restoration):
    torch.manual_seed(0)
    ref = (nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d)(6, affine=True)
    _randomize_affine(ref)
    layer = UHarmonyNorm.from_norm(ref, poly_order=3, restoration=restoration, num_domains=3)
    x = torch.randn(2, 6, *([5] * dim)) * 3 + 2
    x.view(-1)[7] = 80.0  # an outlier with |xhat| > clamp: the linear term must stay unclamped
    torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)
    cls = UHarmonyNorm3d if dim == 3 else UHarmonyNorm2d
    drop_in = cls(6, eps=1e-5, momentum=0.1, affine=True, track_running_stats=False, restoration=restoration)
    torch.testing.assert_close(drop_in(x), nn.InstanceNorm3d(6)(x) if dim == 3 else nn.InstanceNorm2d(6)(x),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("restoration", ["instance", "domain", "none"])
def test_gradients_reach_every_layer_parameter(restoration):
    torch.manual_seed(0)
    layer = UHarmonyNorm3d(4, restoration=restoration, num_domains=2)
    x = torch.randn(2, 4, 4, 4, 4) * 2 + 1
    g = torch.softmax(torch.randn(2, 2), 1)
    with gate_context(layer, g):
        (layer(x) * torch.randn(2, 4, 4, 4, 4)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer.zero_grad()
    with gate_context(layer, g):
        (layer(x) * torch.randn(2, 4, 4, 4, 4)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad.abs().sum() > 0, name
    assert layer.current_gate is None


def _known_stats_input(dim=3):
    torch.manual_seed(1)
    x = torch.randn(2, 3, *([12] * dim))
    x = (x - x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)) / x.std(dim=tuple(range(2, x.ndim)), keepdim=True,
                                                                          correction=0)
    return x * 3 + 5  # every (sample, channel): mean 5, std 3


def _stats(y):
    red = tuple(range(2, y.ndim))
    return y.mean(red), y.std(red, correction=0)


def test_instance_restoration_mix():
    x = _known_stats_input()
    layer = UHarmonyNorm3d(3, eps=1e-8, poly_order=1, restoration="instance")
    layer.set_restore_mix(1.0)
    assert torch.allclose(layer.restore_mix, torch.ones(3))
    m, s = _stats(layer(x))
    torch.testing.assert_close(m, torch.full_like(m, 5.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(s, torch.full_like(s, 3.0), atol=1e-4, rtol=0)
    layer.set_restore_mix(0.0)
    m, s = _stats(layer(x))
    torch.testing.assert_close(m, torch.zeros_like(m), atol=1e-4, rtol=0)
    torch.testing.assert_close(s, torch.ones_like(s), atol=1e-4, rtol=0)
    layer.set_restore_mix(0.5)  # halfway: mean 2.5, std 2
    m, s = _stats(layer(x))
    torch.testing.assert_close(m, torch.full_like(m, 2.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(s, torch.full_like(s, 2.0), atol=1e-4, rtol=0)


def test_domain_restoration_one_hot_gate():
    x = _known_stats_input()
    layer = UHarmonyNorm3d(3, eps=1e-8, poly_order=3, restoration="domain", num_domains=2)
    with torch.no_grad():
        layer.domain_gamma.copy_(torch.tensor([[2.0, 3.0, 4.0], [0.5, 0.5, 0.5]]))
        layer.domain_beta.copy_(torch.tensor([[-1.0, 0.0, 7.0], [10.0, 10.0, 10.0]]))
    with gate_context(layer, torch.tensor([[1.0, 0.0], [0.0, 1.0]])):
        m, s = _stats(layer(x))
    torch.testing.assert_close(m, torch.tensor([[-1.0, 0.0, 7.0], [10.0, 10.0, 10.0]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(s, torch.tensor([[2.0, 3.0, 4.0], [0.5, 0.5, 0.5]]), atol=1e-4, rtol=0)
    m, _ = _stats(layer(x))  # no gate set: uniform mix
    torch.testing.assert_close(m, torch.tensor([[4.5, 5.0, 8.5]] * 2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("restoration", ["instance", "domain"])
def test_bf16_autocast_large_inputs_finite(restoration):
    torch.manual_seed(0)
    conv = nn.Conv3d(2, 4, 3, padding=1)
    layer = UHarmonyNorm3d(4, poly_order=3, restoration=restoration, num_domains=2)
    with torch.no_grad():
        layer.poly_weight.fill_(1.0)
        if restoration == "instance":
            layer.set_restore_mix(1.0)
    x = torch.randn(2, 2, 6, 6, 6) * 1e4
    x.view(-1)[0] = 6e4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = layer(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()


# ----------------------------------------------------------------------------------------- insertion
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("kind", ["plain", "res"])
def test_replace_norms_stage_options(dim, kind):
    def norm_count(net, prefix):
        return sum(1 for n, m in net.named_modules()
                   if isinstance(m, nn.modules.instancenorm._InstanceNorm) and n.startswith(prefix))

    base = _unet(dim, kind)
    per_enc = []
    for i in range(3):
        c = norm_count(base, f"encoder.stages.{i}.")
        if i == 0:
            c += norm_count(base, "encoder.stem.")
        per_enc.append(c)
    n_dec = norm_count(base, "decoder.stages.")
    assert all(c > 0 for c in per_enc) and n_dec == 2
    expected = {
        "all": sum(per_enc) + n_dec, "encoder": sum(per_enc), "decoder": n_dec, "none": 0,
        "first:1": per_enc[0], "first:2": per_enc[0] + per_enc[1], "last:1": per_enc[2],
        "last:2": per_enc[1] + per_enc[2], "encoder-first:1": per_enc[1] + per_enc[2],
        "last:1+decoder": per_enc[2] + n_dec,
    }
    x = torch.randn(1, 1, *([8] * dim))
    for spec, n in expected.items():
        net = _unet(dim, kind)
        names = replace_norms(net, spec, poly_order=2)
        assert len(names) == n, spec
        hn = [m for m in net.modules() if isinstance(m, UHarmonyNorm)]
        assert len(hn) == n, spec
        assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in net.modules()) or spec != "all"
        # every reference (conv.norm and conv.all_modules[i]) was swapped
        for m in net.modules():
            if hasattr(m, "norm") and hasattr(m, "all_modules"):
                assert any(m.norm is a for a in m.all_modules)
    net = _unet(dim, kind)
    _randomize_affine(net)
    ref = copy.deepcopy(net)
    replace_norms(net, "all")
    net.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        parse_stages("encoder+middle:2")
    with pytest.raises(ValueError):
        parse_stages("-decoder")


# ------------------------------------------------------------------------------------------ network
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("restoration", ["instance", "domain"])
def test_uharmony_net_shapes_and_modes(dim, restoration):
    torch.manual_seed(0)
    backbone = _unet(dim, "plain", in_ch=2, classes=3, ds=True)
    ref = copy.deepcopy(backbone)
    net = UHarmonyNet(backbone, num_domains=3, restoration=restoration, poly_order=3, stages="all",
                      gate_features=4, gate_depth=2)
    x = torch.randn(2, 2, *([16] * dim))
    out = net(x)
    assert isinstance(out, list) and len(out) == 2
    assert [tuple(o.shape) for o in out] == [(2, 3, *([s] * dim)) for s in (16, 8)]
    assert net.last_gate.shape == (2, 3) and torch.allclose(net.last_gate.sum(1), torch.ones(2))
    # at initialisation (copied heads, identity harmonization) it equals the InstanceNorm backbone
    with torch.no_grad():
        for a, b in zip(net(x), ref(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    oracle = net(x, domain_id=torch.tensor([2, 0]), gate_mode="oracle")
    assert torch.equal(net.last_gate, torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    assert [o.shape for o in oracle] == [o.shape for o in out]
    net(x, cond={"domain_id": torch.tensor([1, 1])}, gate_mode="oracle")
    assert torch.equal(net.last_gate.argmax(1), torch.tensor([1, 1]))
    with pytest.raises(ValueError):
        net(x, gate_mode="oracle")
    # nnU-Net's set_deep_supervision_enabled
    net.decoder.deep_supervision = False
    single = net(x)
    assert torch.is_tensor(single) and single.shape == (2, 3, *([16] * dim))
    net.set_inference_condition(domain_id=1, gate_mode="oracle")
    net(x)
    assert torch.equal(net.last_gate.argmax(1), torch.tensor([1, 1]))
    assert all(m.current_gate is None for m in net.modules() if isinstance(m, UHarmonyNorm))


def test_uharmony_net_resenc_bottleneck_gate():
    net = UHarmonyNet(_unet(3, "res", ds=False), num_domains=2, restoration="instance", stages="last:2",
                      gate_source="bottleneck")
    y = net(torch.randn(2, 1, 16, 16, 16))
    assert y.shape == (2, 2, 16, 16, 16) and net.gate_encoder is None
    assert len(net.replaced_norms) > 0
    with pytest.raises(ValueError):
        UHarmonyNet(_unet(3), num_domains=2, restoration="domain", gate_source="bottleneck")


def _perturb(net, scale=0.05):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("restoration", ["instance", "domain"])
def test_network_gradients_reach_every_new_parameter(restoration):
    torch.manual_seed(0)
    net = UHarmonyNet(_unet(2, ds=True), num_domains=2, restoration=restoration, gate_features=4, gate_depth=2)
    x, d = torch.randn(2, 1, 16, 16), torch.tensor([0, 1])

    def step():
        net.zero_grad()
        out = net(x)
        loss = sum((o * torch.randn_like(o)).sum() for o in out) + net.gate_loss(d)
        loss.backward()

    step()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
    _perturb(net)
    step()
    for name, p in net.named_parameters():
        assert p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------- adaptation
@pytest.mark.parametrize("restoration", ["instance", "domain"])
def test_adaptation_keeps_old_outputs(restoration):
    torch.manual_seed(0)
    net = UHarmonyNet(_unet(3, in_ch=2, classes=2, ds=True), num_domains=2, restoration=restoration,
                      gate_features=4, gate_depth=2)
    _perturb(net)  # a "trained" network whose heads and restoration differ per domain
    net.eval()
    x = torch.randn(2, 2, 16, 16, 16)
    d = torch.tensor([1, 0])
    with torch.no_grad():
        soft, oracle = net(x), net(x, domain_id=d, gate_mode="oracle")
        widen_input_channels(net, 3)
        x3 = torch.cat([x, torch.randn(2, 1, 16, 16, 16)], 1)  # anything in the new channel
        for a, b in zip(net(x3), soft):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        add_domains(net, 2, init_from=1)
        assert net.num_domains == 4 and net.gate.prototypes.shape[0] == 4
        for a, b in zip(net(x3), soft):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for a, b in zip(net(x3, domain_id=d, gate_mode="oracle"), oracle):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        add_output_tasks(net, 3)
        for a, b in zip(net(x3), soft):
            assert a.shape[1] == 5
            torch.testing.assert_close(a[:, :2], b, atol=1e-5, rtol=1e-5)
    # the new domain is usable and the subset is the documented one
    net.train()
    net(x3, domain_id=torch.tensor([3, 2]), gate_mode="oracle")
    params = adaptation_parameters(net)
    ids = {id(p) for p in params}
    for m in net.modules():
        if isinstance(m, UHarmonyNorm):
            assert all(id(p) in ids for p in m.parameters())
    assert all(id(p) in ids for p in net.heads.parameters()) and id(net.gate.prototypes) in ids
    backbone_conv = next(m for m in net.decoder.stages.modules() if isinstance(m, nn.Conv3d))
    assert id(backbone_conv.weight) not in ids
    freeze_for_adaptation(net)
    assert not backbone_conv.weight.requires_grad and net.heads.weights[0].requires_grad


def test_domain_gate_and_heads_units():
    gate = DomainGate(6, 3, temperature=0.5)
    g, logits = gate(torch.randn(4, 6, 3, 3))
    assert g.shape == logits.shape == (4, 3) and torch.allclose(g.sum(1), torch.ones(4))
    assert logits.abs().max() <= 1 / 0.5 + 1e-5
    heads = GatedHeads([5, 7], num_outputs=2, num_domains=3)
    f = torch.randn(4, 7, 3, 3)
    onehot = torch.eye(3)[[0, 2, 1, 2]]
    out = heads(f, onehot, 1)
    for b, d in enumerate([0, 2, 1, 2]):
        ref = torch.einsum("kc,cxy->kxy", heads.weights[1][d], f[b]) + heads.biases[1][d][:, None, None]
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-5)
    mixed = heads(f, g, 1)
    ref = sum(g[:, d, None, None, None] * heads(f, torch.eye(3)[[d] * 4], 1) for d in range(3))
    torch.testing.assert_close(mixed, ref, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------- gate learning
def test_gate_learns_two_domains():
    torch.manual_seed(0)
    net = UHarmonyNet(_unet(3, feats=(8, 8, 8), ds=True), num_domains=2, restoration="domain",
                      gate_features=8, gate_depth=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def batch(n=8):
        d = torch.arange(n) % 2
        x = torch.randn(n, 1, 16, 16, 16)
        smooth = F.avg_pool3d(x, 3, 1, 1)  # two textures: the content view removes intensity offsets and scales
        x = torch.where(d.view(-1, 1, 1, 1, 1) == 0, x * 1.0, smooth * 0.3 + 1.5)
        return x, d

    for _ in range(60):
        x, d = batch()
        net(x)
        loss = net.gate_loss(d)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        x, d = batch(32)
        net(x)
        acc = (net.predicted_domain() == d).float().mean().item()
    assert acc > 0.9, acc


def test_content_view_is_the_same_for_every_slot_and_normalization():
    """A case preprocessed as different members' case (another modality slot, another affine normalization)
    looks the same to a 'content' gate; a 'slots' gate tells the slots apart (what --dataset auto must not
    rely on)."""
    torch.manual_seed(0)
    image = torch.randn(2, 24, 24)
    as_ct, as_mr = torch.zeros(1, 3, 24, 24), torch.zeros(1, 3, 24, 24)
    as_ct[0, 0], as_mr[0, 2] = image[0] * 40 + 60, (image[0] - 0.1) / 2
    view = content_view(torch.cat([as_ct, as_mr]))
    torch.testing.assert_close(view[0], view[1], atol=1e-4, rtol=1e-4)
    assert view[:, 1:].abs().max() == 0 and view[:, 0].std().item() == pytest.approx(1.0, abs=1e-3)
    two = torch.zeros(1, 3, 24, 24)
    two[0, 1], two[0, 2] = image[0], image[1] * 5  # a two-channel member: slots 1, 2 -> channels 0, 1
    packed = content_view(two)
    torch.testing.assert_close(packed[0, :2], content_view(image[None])[0], atol=1e-4, rtol=1e-4)
    torch.manual_seed(1)
    content, slots = GateEncoder(3, 2, 8, 2, "content"), GateEncoder(3, 2, 8, 2, "slots")
    torch.testing.assert_close(content(as_ct), content(as_mr), atol=1e-4, rtol=1e-4)
    assert (slots(as_ct) - slots(as_mr)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="gate view"):
        GateEncoder(3, 2, view="raw")


def _reference_uharmony_norm(layer, x):
    """The layer's formula written with plain autograd ops (what the fused function must equal)."""
    shape = (1, -1) + (1,) * layer.dim
    var, mu = torch.var_mean(x, dim=tuple(range(2, x.ndim)), correction=0, keepdim=True)
    std = torch.sqrt(var + layer.eps)
    xhat = (x - mu) / std
    h = xhat * layer.weight.view(shape) + layer.bias.view(shape)
    if layer.poly_weight is not None:
        xc = xhat if layer.clamp is None else xhat.clamp(-layer.clamp, layer.clamp)
        for j in range(layer.poly_weight.shape[0]):
            h = h + layer.poly_weight[j].view(shape) * xc ** (j + 2)
    if layer.restoration == "instance":
        lam = (torch.sigmoid(layer.restore_logit) * layer.restore_scale).view(shape)
        return lam * (h * std + mu) + (1 - lam) * h
    if layer.restoration == "domain":
        g = layer._gate(x.shape[0], x.device, x.dtype)
        bshape = (x.shape[0], -1) + (1,) * layer.dim
        return (g @ layer.domain_gamma).view(bshape) * h + (g @ layer.domain_beta).view(bshape)
    return h


@pytest.mark.parametrize("restoration,poly_order,clamp", [
    ("instance", 3, 1.5), ("instance", 1, None), ("domain", 2, 1.0), ("none", 4, None), ("none", 2, 0.5)])
def test_fused_norm_matches_autograd_formula(restoration, poly_order, clamp):
    """The hand-written backward of the fused harmonization gives autograd's values and gradients."""
    torch.manual_seed(0)
    layer = UHarmonyNorm3d(3, restoration=restoration, poly_order=poly_order, clamp=clamp, num_domains=2).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    if restoration == "domain":
        layer.current_gate = torch.softmax(torch.randn(2, 2, dtype=torch.float64), 1)
    x = (torch.randn(2, 3, 4, 5, 3, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    w = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64)
    params = [x] + list(layer.parameters())
    out = layer(x)
    ref = _reference_uharmony_norm(layer, x)
    assert torch.allclose(out, ref, atol=1e-10)
    g_fused = torch.autograd.grad((out * w).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    for a, b in zip(g_fused, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-8), (a - b).abs().max()
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
