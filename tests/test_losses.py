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


def test_class_balanced_hard_kd_weighs_each_teacher_class_equally():
    s = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    t = torch.tensor([[5.0, 0.0, 0.0], [4.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # classes 0, 0, 0, 2

    def ce(row, k):
        return -math.log(math.exp(row[k]) / sum(math.exp(v) for v in row))

    rows = s.tolist()
    class0 = (ce(rows[0], 0) + ce(rows[1], 0) + ce(rows[2], 0)) / 3
    assert losses.hard_kd(s, t, class_balance=True).item() == pytest.approx((class0 + ce(rows[3], 2)) / 2, rel=1e-6)
    plain = sum(ce(r, k) for r, k in zip(rows, (0, 0, 0, 2))) / 4
    assert losses.hard_kd(s, t).item() == pytest.approx(plain, rel=1e-6)  # off: the plain mean over images


def test_the_recipe_key_loss_class_balance_reaches_hard_kd():
    from edgedistill.losses.base import ENTRIES, LossInputs
    from edgedistill.recipe import LossCfg

    s = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    t = torch.tensor([[5.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    b = LossInputs(logits=s, teacher_logits=t)
    term = ENTRIES["hard_kd"].term
    for balance in (False, True):
        got = term(b, None, LossCfg(hard_kd=1.0, class_balance=balance))
        assert got.item() == pytest.approx(losses.hard_kd(s, t, class_balance=balance).item())
    assert term(b, None, LossCfg(hard_kd=1.0, class_balance=True)) != term(b, None, LossCfg(hard_kd=1.0))


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


class RecordingTeacher:
    """Stands in for the online teacher: its features are its input flattened, and it remembers what it saw."""

    def __init__(self):
        self.seen = None

    def encode(self, x):
        self.seen = x.clone()
        return x.flatten(1)


def mixing_weights(mixed, originals):
    """Each mixed image as weights over the originals, which are one-hot images (image k lights pixel k only)."""
    return torch.stack([m.flatten()[:len(originals)] for m in mixed])


def check_mix(seed: int) -> float:
    """Mix a batch of one-hot images; assert what mixing must do; return the lam it used (1.0: nothing mixed)."""
    from edgedistill.train import mix_real

    # Four items; item 2 is synthetic/unlabelled (label -1). Student images are one-hot over the first pixels, the
    # teacher's are the same one-hot pattern at the teacher's own (larger) size, scaled by 3 to tell them apart.
    labels = torch.tensor([0, 2, -1, 1])
    xs = torch.zeros(4, 3, 4, 4)
    xt = torch.zeros(4, 3, 6, 6)
    for k in range(4):
        xs.view(4, -1)[k, k] = 1.0
        xt.view(4, -1)[k, k] = 3.0
    teacher = RecordingTeacher()
    torch.manual_seed(seed)
    mixed, t_feat, soft = mix_real(xs, xt, labels, teacher, 0.4, seed=seed, t_feat=None, num_classes=3)

    w = mixing_weights(mixed, xs)
    # 1. Real images become convex combinations of real images only, with one lam for the whole batch.
    assert torch.allclose(w.sum(1), torch.ones(4))
    assert torch.all(w >= 0) and torch.all(w[:, 2][[0, 1, 3]] == 0), "a synthetic image never mixes into a real one"
    mixed_rows = [i for i in (0, 1, 3) if w[i, i] < 1]
    lam = w[mixed_rows[0], mixed_rows[0]].item() if mixed_rows else 1.0
    for i in mixed_rows:
        others = [j for j in (0, 1, 3) if j != i and w[i, j] > 0]
        assert w[i, i].item() == pytest.approx(lam, abs=1e-6) and len(others) == 1
        assert w[i, others[0]].item() == pytest.approx(1 - lam, abs=1e-6)
    # 2. The synthetic item is left as it was.
    assert torch.equal(mixed[2], xs[2])
    # 3. Soft labels mix the same way as the images: the same partners with the same weights.
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), 3).float()
    for i in (0, 1, 3):
        assert torch.allclose(soft[i], w[i, [0, 1, 3]] @ onehot[[0, 1, 3]])
    assert torch.equal(soft[2], torch.zeros(3)), "the synthetic item has no label to mix"
    # 4. The teacher saw the mixed image (at its own size), and the features returned are its features of it.
    assert teacher.seen.shape == xt.shape
    assert torch.allclose(mixing_weights(teacher.seen / 3, xt), w)
    assert torch.equal(t_feat, teacher.seen.flatten(1))
    return lam


def test_mixup_mixes_real_images_teacher_inputs_and_labels_alike():
    lams = [check_mix(seed) for seed in range(8)]
    assert any(0.1 < lam < 0.9 for lam in lams), f"no batch was really mixed: lam {lams}"


def test_mixup_leaves_a_batch_with_fewer_than_two_real_images_alone():
    from edgedistill.train import mix_real

    xs, xt = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 6, 6)
    teacher = RecordingTeacher()
    t_feat = torch.randn(3, 5)
    out, feat, soft = mix_real(xs, xt, torch.tensor([-1, 1, -1]), teacher, 0.4, seed=1, t_feat=t_feat, num_classes=3)
    assert torch.equal(out, xs) and torch.equal(feat, t_feat) and teacher.seen is None
    assert torch.equal(soft, torch.tensor([[0.0, 0, 0], [0, 1, 0], [0, 0, 0]]))


def test_mixed_soft_labels_feed_the_task_term_of_real_images_only():
    from edgedistill.recipe import LossCfg
    from edgedistill.objective import loss_terms

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, -5.0, 0.0]])
    soft = torch.tensor([[0.7, 0.0, 0.3], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # row 2: a synthetic image
    terms = loss_terms({"logits": logits}, None, None, soft, LossCfg(ce=1.0, kd=0.0), 1.0, 0.0)
    logp = torch.log_softmax(logits, 1)
    expected = -(0.7 * logp[0, 0] + 0.3 * logp[0, 2] + logp[1, 1]) / 2
    assert terms["ce"].item() == pytest.approx(expected.item(), rel=1e-6)
