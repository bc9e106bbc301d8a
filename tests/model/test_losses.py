"""The three losses against hand-written formulas; fused vs reference ops; the logit-scale clamp."""
import math

import pytest
import torch
import torch.nn.functional as F

from collat.model import losses as L
from collat.ops import reference


def _inputs(B=3, N=7, D=5, dtype=torch.float64):
    pred = torch.randn(B, N, D, dtype=dtype, requires_grad=True)
    target = torch.randn(B, N, D, dtype=dtype)
    lengths = torch.tensor([N, 3, 0][:B])
    return pred, target, lengths


def test_cross_token_loss_formula():
    pred, target, lengths = _inputs()
    loss, perm = L.cross_token_loss(pred, target, lengths, ops="reference")
    assert torch.equal(perm, reference.greedy_match(pred.detach(), target, lengths))
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for j in range(int(lengths[b])):
            total = total + (pred[b, perm[b, j]] - target[b, j]).abs().sum()
            count += 1
    expected = total / (count * pred.shape[-1])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    unmatched = torch.ones(pred.shape[:2], dtype=torch.bool)
    for b in range(pred.shape[0]):
        unmatched[b, perm[b, : int(lengths[b])]] = False
    assert (pred.grad[unmatched] == 0).all()  # only matched predicted tokens receive gradient


def test_matching_is_not_differentiated():
    pred, target, lengths = _inputs(dtype=torch.float32)
    _, perm = L.cross_token_loss(pred, target, lengths)
    assert not perm.requires_grad and perm.dtype == torch.int64


@pytest.mark.parametrize("matching", ["greedy", "optimal"])
def test_fused_and_reference_agree(matching):
    pred, target, lengths = _inputs(B=3, N=9, D=16, dtype=torch.float32)
    results = []
    for ops in ("fused", "reference"):
        p = pred.detach().clone().requires_grad_()
        loss, perm = L.cross_token_loss(p, target, lengths, matching=matching, ops=ops)
        loss.backward()
        results.append((loss.detach(), perm, p.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    if matching == "greedy":
        assert torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-6, atol=1e-8)


def test_optimal_never_costs_more_than_greedy():
    pred, target, lengths = _inputs(B=4, N=8, D=3, dtype=torch.float32)
    lengths = torch.tensor([8, 5, 2, 8])
    greedy, _ = L.cross_token_loss(pred.detach(), target, lengths, matching="greedy", ops="reference")
    optimal, _ = L.cross_token_loss(pred.detach(), target, lengths, matching="optimal", ops="reference")
    assert optimal <= greedy + 1e-6


def test_unimodal_token_loss_is_mean_abs():
    a = torch.randn(2, 5, 4, requires_grad=True)
    b = torch.randn(2, 5, 4, requires_grad=True)
    for ops in ("fused", "reference"):
        loss = L.unimodal_token_loss(a, b, ops=ops)
        torch.testing.assert_close(loss, (a - b).abs().mean())
    a.grad = b.grad = None
    L.unimodal_token_loss(a, b, ops="reference").backward()
    torch.testing.assert_close(a.grad, torch.sign(a - b).detach() / a.numel())
    torch.testing.assert_close(b.grad, -a.grad)  # both branches get gradients unless stopped


def test_contrastive_loss_is_symmetric_cross_entropy():
    za = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    zt = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    loss = L.ContrastiveLoss()(za, zt, scale)
    logits = scale * za @ zt.T
    log_a = logits.log_softmax(dim=1).diagonal()
    log_t = logits.T.log_softmax(dim=1).diagonal()
    expected = -(log_a.mean() + log_t.mean()) / 2  # the paper's Eq. 2 with the minus sign restored
    torch.testing.assert_close(loss, expected)
    # Identical embeddings with a large scale: loss near 0; all-equal embeddings: ln(B).
    assert L.ContrastiveLoss()(za, za, torch.tensor(100.0, dtype=torch.float64)) < 0.05
    same = F.normalize(torch.ones(6, 8, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(L.ContrastiveLoss()(same, same, scale), torch.tensor(math.log(6), dtype=torch.float64))


def test_logit_scale_init_and_clamp():
    assert math.isclose(L.LOGIT_SCALE_INIT, math.log(1 / 0.07))
    t = torch.tensor(10.0, requires_grad=True)
    s = L.clamped_logit_scale(t)
    assert math.isclose(float(s.detach()), 100.0, rel_tol=1e-6)
    s.backward()
    assert t.grad == 0  # above the clamp the temperature gets no gradient
    torch.testing.assert_close(L.clamped_logit_scale(torch.tensor(L.LOGIT_SCALE_INIT)), torch.tensor(1 / 0.07))


def test_bad_options():
    pred, target, lengths = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="matching"):
        L.cross_token_loss(pred, target, lengths, matching="hungarian-ish")
    with pytest.raises(ValueError, match="ops"):
        L.cross_token_loss(pred, target, lengths, ops="fast")


def test_unchecked_lengths_reach_the_matchers_that_take_them():
    """check_lengths=False (lengths from a mask: no host sync for a range check) goes to a matcher that
    accepts it, and is left out for one that does not (the references)."""
    from collat.ops import FUSED, REFERENCE, OpSet

    received = []

    def spy_match(pred, target, lengths, metric="l1", *, check_lengths=True):
        received.append(check_lengths)
        return reference.greedy_match(pred, target, lengths, metric)

    spy = OpSet("spy", spy_match, spy_match, REFERENCE.token_l1_loss, REFERENCE.cross_attention)
    pred, target, lengths = _inputs(dtype=torch.float32)
    for check in (True, False):
        L.cross_token_loss(pred, target, lengths, ops=spy, check_lengths=check)
    assert received == [True, False]
    expected, _ = L.cross_token_loss(pred, target, lengths, ops=FUSED)
    for ops in (FUSED, REFERENCE):
        loss, _ = L.cross_token_loss(pred, target, lengths, ops=ops, check_lengths=False)
        torch.testing.assert_close(loss, expected)
