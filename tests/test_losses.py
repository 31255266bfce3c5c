"""Loss values against hand-computed numbers."""
import math

import pytest
import torch

from edgedistill import losses


def test_kd_matches_hand_computation():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    T = 2.0
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = ps[::-1]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    assert losses.kd(s, t, T).item() == pytest.approx(T * T * kl, rel=1e-6)
    assert losses.kd(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_hard_kd_is_ce_against_teacher_argmax():
    s = torch.tensor([[2.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, 5.0]])
    expected = -math.log(1 / (math.exp(2) + 2))
    assert losses.hard_kd(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_feature_l2_uses_normalised_embeddings():
    s = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[10.0, 0.0], [5.0, 0.0]])
    # Row 1 identical direction: 0; row 2 orthogonal: sqrt(2). Mean: sqrt(2)/2.
    assert losses.feature_l2(s, t).item() == pytest.approx(math.sqrt(2) / 2, rel=1e-6)


def test_alignment_and_uniformity():
    zs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zt = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert losses.alignment(zs, zt).item() == pytest.approx((2.0 + 0.0) / 2)
    # One pair at squared distance 2: log(exp(-2 * 2)) = -4.
    assert losses.uniformity(zs).item() == pytest.approx(-4.0)


def test_align_uniform_sum():
    zs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zt = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    expected = losses.alignment(zs, zt) + losses.uniformity(zs) + losses.uniformity(zt)
    assert losses.align_uniform(zs, zt).item() == pytest.approx(expected.item())
    assert losses.uniformity(zt).item() == pytest.approx(-8.0)


def test_cross_entropy_soft_targets_equal_hard_for_one_hot():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    hard = losses.cross_entropy(logits, torch.tensor([1]))
    soft = losses.cross_entropy(logits, torch.tensor([[0.0, 1.0, 0.0]]))
    assert soft.item() == pytest.approx(hard.item(), rel=1e-6)
