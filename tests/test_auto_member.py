"""The shared part of ``--dataset auto``: the central patch a member hypothesis is scored on."""
import torch

from nnharmony.inference.auto_member import central_patch


def test_central_patch_crops_and_pads():
    x = torch.arange(2 * 5 * 8, dtype=torch.float32).reshape(2, 5, 8)
    p = central_patch(x, (4, 4))
    assert p.shape == (2, 4, 4) and torch.equal(p, x[:, 0:4, 2:6])
    p = central_patch(x, (7, 4))
    assert p.shape == (2, 7, 4) and torch.equal(p[:, 1:6], x[:, :, 2:6]) and p[:, 0].abs().sum() == 0
    x = torch.arange(2 * 5 * 9 * 4, dtype=torch.float32).reshape(2, 5, 9, 4)
    p = central_patch(x, (3, 3, 6))
    assert p.shape == (2, 3, 3, 6) and torch.equal(p[:, :, :, 1:5], x[:, 1:4, 3:6]) and p[..., 0].abs().sum() == 0


def test_central_patch_of_a_volume_for_a_2d_model_is_its_central_slice():
    """A 3D case predicted by a 2D model (the quick preset's ``2d`` configuration on volumes) used to fail with
    'data (3, 20, 49, 49) does not match patch [56, 48]'."""
    x = torch.arange(3 * 5 * 6 * 4, dtype=torch.float32).reshape(3, 5, 6, 4)
    p = central_patch(x, (6, 4))
    assert p.shape == (3, 6, 4) and torch.equal(p, x[:, 2])
