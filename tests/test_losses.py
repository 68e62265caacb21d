"""The partial-label loss only sees tasks annotated in each sample's dataset."""
import torch

from nnharmony.losses.partial_label import PartialLabelLoss, masked_bce, masked_soft_dice, nnunet_deep_supervision_weights


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 6, 6, 6, generator=g)
    target = (torch.rand(3, 4, 6, 6, 6, generator=g) > 0.7).float()
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    return logits, target, mask


def test_unannotated_task_does_not_change_loss():
    logits, target, mask = _batch()
    loss = PartialLabelLoss(batch_dice=True)
    ref = loss(logits, target, mask)
    t2, l2 = target.clone(), logits.clone()
    t2[0, 2] = 1 - t2[0, 2]          # sample 0 does not annotate task 2
    l2[1, 0] = 50.0                  # sample 1 does not annotate task 0
    t2[2, 1:3] = torch.rand_like(t2[2, 1:3])
    assert torch.equal(loss(l2, t2, mask), ref)
    for bd in (True, False):
        assert torch.equal(masked_soft_dice(l2, t2, mask, bd), masked_soft_dice(logits, target, mask, bd))
    assert torch.equal(masked_bce(l2, t2, mask), masked_bce(logits, target, mask))


def test_annotated_task_changes_loss_and_gets_gradient():
    logits, target, mask = _batch()
    logits.requires_grad_(True)
    loss = PartialLabelLoss()
    value = loss(logits, target, mask)
    value.backward()
    assert logits.grad[0, 0].abs().sum() > 0
    assert logits.grad[0, 2].abs().sum() == 0
    t2 = target.clone()
    t2[0, 0] = 1 - t2[0, 0]
    assert not torch.equal(loss(logits.detach(), t2, mask), value.detach())


def test_no_annotation_gives_zero_and_deep_supervision():
    logits, target, _ = _batch()
    none = torch.zeros(3, 4, dtype=torch.bool)
    assert PartialLabelLoss()(logits, target, none).item() == 0.0
    w = nnunet_deep_supervision_weights(3)
    assert abs(sum(w) - 1) < 1e-9 and w[-1] == 0 and w[0] > w[1]
    assert nnunet_deep_supervision_weights(1) == [1.0]  # no deep supervision outputs: weight 1, not 0/0
    outs = [logits, logits[..., ::2, ::2, ::2]]
    tgts = [target, target[..., ::2, ::2, ::2]]
    mask = torch.ones(3, 4, dtype=torch.bool)
    ds = PartialLabelLoss([0.75, 0.25])(outs, tgts, mask)
    single = PartialLabelLoss()
    expected = 0.75 * single(outs[0], tgts[0], mask) + 0.25 * single(outs[1], tgts[1], mask)
    assert torch.allclose(ds, expected)
