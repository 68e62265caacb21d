"""UniverSeg networks (CrossConv, CrossBlock, UniverSeg 2D/3D) and task augmentation. Tiny sizes, CPU."""

import pytest
import torch
import torch.nn.functional as F

from nnharmony.networks.cross_conv import CrossConv, CrossConv3d
from nnharmony.data.task_augmentation import (
    flip,
    label_edge_map,
    random_flip,
    random_intensity_inversion,
    synthetic_task,
    task_augment,
)
from nnharmony.networks.universeg import CrossBlock, UniverSeg


def _episode(dim, B=2, S=3, size=None, C=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sp = (size or (32 if dim == 2 else 16),) * dim
    t = torch.rand(B, C, *sp, generator=g, dtype=dtype)
    si = torch.rand(B, S, C, *sp, generator=g, dtype=dtype)
    sl = (torch.rand(B, S, 1, *sp, generator=g) > 0.5).to(dtype)
    return t, si, sl


def test_param_count_default_matches_release():
    model = UniverSeg()
    assert sum(p.numel() for p in model.parameters()) == 1_182_785
    keys = model.state_dict().keys()
    assert {"enc_blocks.0.cross.cross_conv.weight", "enc_blocks.0.target.vmapped.conv.weight",
            "dec_blocks.2.support.vmapped.conv.bias", "out_conv.conv.weight"} <= set(keys)


@pytest.mark.parametrize("dim", [2, 3])
def test_cross_conv_equals_per_pair_conv(dim):
    torch.manual_seed(0)
    cc = CrossConv((2, 3), 4, dim=dim).double()
    sp = (6,) * dim
    x, y = torch.randn(2, 2, 2, *sp, dtype=torch.float64), torch.randn(2, 3, 3, *sp, dtype=torch.float64)
    out = cc(x, y)
    assert out.shape == (2, 2, 3, 4, *sp)
    conv = F.conv2d if dim == 2 else F.conv3d
    ref = conv(torch.cat([x[:, 1], y[:, 2]], 1), cc.weight, cc.bias, padding=1)
    assert torch.allclose(out[:, 1, 2], ref, atol=1e-10)
    with pytest.raises(ValueError):
        cc(x[:, :, :1], y)
    with pytest.raises(ValueError):
        CrossConv3d(1, 4, kernel_size=2)


@pytest.mark.parametrize("dim", [2, 3])
def test_permutation_invariance(dim):
    torch.manual_seed(0)
    widths = (8, 8, 8, 8) if dim == 2 else (4, 4, 4)
    model = UniverSeg(widths, dim=dim).double().eval()
    t, si, sl = _episode(dim, B=1, S=3, dtype=torch.float64)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        a = model(t, si, sl)
        b = model(t, si[:, perm], sl[:, perm])
    assert torch.allclose(a, b, atol=1e-5)
    block = CrossBlock((1, 2), 4, dim=dim).double()
    tt, ss = block(t[:, None], torch.cat([si, sl], 2))
    tp, sp = block(t[:, None], torch.cat([si, sl], 2)[:, perm])
    assert torch.allclose(tt, tp, atol=1e-10) and torch.allclose(ss[:, perm], sp, atol=1e-10)


@pytest.mark.parametrize("dim,S", [(2, 1), (2, 3), (3, 1), (3, 3)])
def test_forward_backward_shapes(dim, S):
    torch.manual_seed(0)
    widths = (8, 8, 8, 8) if dim == 2 else (4, 4, 4)
    model = UniverSeg(widths, dim=dim)
    t, si, sl = _episode(dim, B=2, S=S)
    out = model(t, si, sl)
    assert out.shape == t.shape
    out.mean().backward()
    assert model.enc_blocks[0].cross.cross_conv.weight.grad is not None
    assert model.out_conv.conv.weight.grad is not None


def test_multichannel_and_tuple_widths():
    model = UniverSeg([(4, 6), (4, 6)], dim=2, in_channels=3)
    t, si, sl = _episode(2, B=1, S=2, size=8, C=3)
    assert model(t, si, sl).shape == (1, 1, 8, 8)


def test_invalid_inputs_raise():
    model = UniverSeg((4, 4, 4, 4))
    t, si, sl = _episode(2, B=1, S=2, size=12)  # 12 not divisible by 8
    with pytest.raises(ValueError, match="divisible"):
        model(t, si, sl)
    t, si, sl = _episode(2, B=1, S=2, size=16)
    with pytest.raises(ValueError):
        model(t, si, sl[:, :1])  # S mismatch
    with pytest.raises(ValueError):
        model(t[:, :, :8], si, sl)  # spatial mismatch
    for kwargs in ({"dim": 4}, {"encoder_blocks": ()}, {"decoder_blocks": (4,)}, {"in_channels": 0}):
        with pytest.raises(ValueError):
            UniverSeg(**{"encoder_blocks": (4, 4, 4), **kwargs})


def test_flip_is_identical_for_all_members():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 1, 8, 8, generator=g)
    y = (x > 0.5).float()
    fx, fy = flip(x, y, axes=[1])
    assert torch.equal(fx, x.flip(-1)) and torch.equal(fy, y.flip(-1))
    rx, ry = random_flip(x, y, torch.Generator().manual_seed(3), p=0.5)
    for b in range(2):
        # every member of episode b got the same transform; image and label moved together
        matches = [torch.equal(rx[b], x[b].flip(dims)) for dims in ([], [-1], [-2], [-2, -1])]
        assert sum(matches) == 1
        assert torch.equal(ry[b], (rx[b] > 0.5).float())
    inv = random_intensity_inversion(x, torch.Generator().manual_seed(1), p=1.0)
    assert torch.allclose(inv, 1 - x)


def test_edge_map_subset_and_task_augment():
    _, labels = synthetic_task((16, 16), torch.Generator().manual_seed(0), num_members=3)
    y = labels[None]
    edge = label_edge_map(y)
    assert edge.sum() > 0 and edge.sum() < y.sum()
    assert torch.all(edge <= y)
    grad = label_edge_map(y, mode="gradient")
    assert torch.all(grad >= edge)
    _, y3 = synthetic_task((8, 8, 8), torch.Generator().manual_seed(0))
    assert torch.all(label_edge_map(y3[None]) <= y3[None])
    imgs = torch.rand(2, 3, 1, 16, 16)
    a = task_augment(imgs, y.expand(2, -1, -1, -1, -1), torch.Generator().manual_seed(5), label_inversion=True)
    b = task_augment(imgs, y.expand(2, -1, -1, -1, -1), torch.Generator().manual_seed(5), label_inversion=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape == imgs.shape


@pytest.mark.parametrize("shape", [(32, 32), (12, 12, 12)])
def test_synthetic_task_deterministic_with_fg_and_bg(shape):
    i1, l1 = synthetic_task(shape, torch.Generator().manual_seed(7), num_members=3)
    i2, l2 = synthetic_task(shape, torch.Generator().manual_seed(7), num_members=3)
    i3, _ = synthetic_task(shape, torch.Generator().manual_seed(8), num_members=3)
    assert i1.shape == l1.shape == (3, 1, *shape)
    assert torch.equal(i1, i2) and torch.equal(l1, l2) and not torch.equal(i1, i3)
    assert i1.min() >= 0 and i1.max() <= 1
    for m in range(3):
        assert 0 < l1[m].sum() < l1[m].numel()
    with pytest.raises(ValueError):
        synthetic_task((3, 3))
