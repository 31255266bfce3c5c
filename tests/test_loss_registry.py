"""The new losses against arithmetic written out by hand (numpy), the registry's promises (no gradient reaches the
teacher; modules train and are checkpointed; constraints refuse recipes), and one epoch of each through train()."""
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from edgedistill import losses
from edgedistill.recipe import LossCfg, Recipe, RecipeError, StudentCfg, TrainCfg

from conftest import make_image_folder, tiny_recipe, write_recipe

NEW = ["dkd", "dist", "bkl", "bce", "crd", "infonce", "srrl", "hint", "contrastive", "clip_caption", "multi_positive"]


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Values computed by hand


def test_dkd_is_alpha_tckd_plus_beta_nckd():
    s, te, T, alpha, beta = np.array([[1.0, 2.0, 0.0]]), np.array([[2.0, 0.0, 1.0]]), 2.0, 0.5, 3.0
    ps, pt = softmax(s / T)[0], softmax(te / T)[0]
    bs, bt = np.array([ps[0], 1 - ps[0]]), np.array([pt[0], 1 - pt[0]])  # target class 0 against the rest
    tckd = np.sum(bt * np.log(bt / bs))
    qs, qt = softmax(s[0, 1:] / T), softmax(te[0, 1:] / T)  # classes 1, 2 renormalised among themselves
    nckd = np.sum(qt * np.log(qt / qs))
    got = losses.dkd(t(s), t(te), torch.tensor([0]), alpha, beta, T).item()
    assert got == pytest.approx(T * T * (alpha * tckd + beta * nckd), rel=1e-9)


def test_dkd_with_alpha_equal_beta_and_a_confident_target_approaches_kd():
    # KD = TCKD + (1 - p_t^T) NCKD (the DKD paper's decomposition), so alpha = 1, beta = 1 - p_t^T gives KD exactly.
    s, te = np.array([[0.3, -1.0, 2.0]]), np.array([[1.5, 0.2, -0.4]])
    pt0 = softmax(te)[0, 0]
    got = losses.dkd(t(s), t(te), torch.tensor([0]), 1.0, 1 - pt0, 1.0).item()
    assert got == pytest.approx(losses.kd(t(s), t(te), 1.0).item(), rel=1e-9)


def pearson_np(a, b):
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))


def test_dist_inter_and_intra_class_pearson():
    s = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    te = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    tau, beta, gamma = 2.0, 1.0, 2.0
    ys, yt = softmax(s / tau), softmax(te / tau)
    inter = 1 - np.mean([pearson_np(ys[i], yt[i]) for i in range(2)])
    intra = 1 - np.mean([pearson_np(ys[:, k], yt[:, k]) for k in range(3)])
    got = losses.dist(t(s), t(te), beta, gamma, tau).item()
    # rel 1e-5: DIST adds eps = 1e-8 to each correlation's denominator (as hunto/DIST_KD does); with B = 2 the
    # centred columns are short, so it shows in the 6th digit.
    assert got == pytest.approx(tau ** 2 * (beta * inter + gamma * intra), rel=1e-5)
    assert losses.dist(t(te), t(te)).item() == pytest.approx(0.0, abs=1e-6)


def test_bkl_is_a_binary_kl_per_class():
    s, te = np.array([[0.5, -1.0, 2.0]]), np.array([[1.0, 0.0, -1.0]])
    ps, pt = 1 / (1 + np.exp(-s[0])), softmax(te)[0]
    expected = np.sum(pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps)))
    assert losses.bkl(t(s), t(te)).item() == pytest.approx(expected, rel=1e-9)


def test_bce_against_one_hot_and_smoothed_targets():
    z = np.array([[2.0, -1.0, 0.0]])
    p = 1 / (1 + np.exp(-z[0]))
    for smoothing in (0.0, 0.3):
        y = np.array([1.0, 0.0, 0.0]) * (1 - smoothing) + smoothing / 3
        expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
        assert losses.bce(t(z), torch.tensor([0]), smoothing).item() == pytest.approx(expected, rel=1e-9)


def test_crd_contrasts_each_side_with_the_other_sides_memory():
    zs, zt = unit(np.array([[1.0, 1.0], [1.0, -2.0]])), unit(np.array([[0.0, 1.0], [1.0, 0.0]]))
    ms, mt = unit(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])), unit(np.array([[1.0, 2.0], [-1.0, 0.0], [0.0, 1.0]]))
    index, neg, tau = np.array([2, 0]), np.array([[0, 1], [1, 1]]), 0.5

    def side(z, memory):
        total = 0.0
        for i in range(2):
            logits = [z[i] @ memory[index[i]] / tau] + [z[i] @ memory[k] / tau for k in neg[i]]
            total += -logits[0] + math.log(sum(math.exp(v) for v in logits))
        return total / 2

    expected = side(zs, mt) + side(zt, ms)
    got = losses.crd(t(zs), t(zt), t(ms), t(mt), torch.tensor(index), torch.tensor(neg), tau).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_crd_memory_update_is_a_normalised_running_mean():
    module = losses.CRDMemory(LossCfg(proj_dim=2), losses.Dims(features=2, teacher=2, items=3))
    before = module.memory_s.clone()
    z = torch.tensor([[0.0, 1.0]])
    module.update(torch.tensor([1]), z, z, 0.5)
    m = 0.5 * before[1].numpy() + 0.5 * np.array([0.0, 1.0])
    assert np.allclose(module.memory_s[1].numpy(), m / np.linalg.norm(m), atol=1e-6)
    assert torch.equal(module.memory_s[[0, 2]], before[[0, 2]])


def test_infonce_denominator_sums_both_directions():
    zs, zt, tau = unit(np.array([[1.0, 0.0], [1.0, 1.0]])), unit(np.array([[1.0, 0.5], [0.0, 1.0]])), 0.5
    L = zs @ zt.T / tau
    expected = np.mean([-L[i, i] + np.log(np.exp(L[i]).sum() + np.exp(L[:, i]).sum()) for i in range(2)])
    assert losses.infonce(t(zs), t(zt), tau).item() == pytest.approx(expected, rel=1e-9)


def test_srrl_matches_features_and_the_teachers_classifier_outputs():
    c, ft = np.array([[1.0, 2.0], [0.0, -1.0]]), np.array([[1.5, 2.0], [1.0, -1.0]])
    W, bias = np.array([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]]), np.array([0.1, 0.0, -0.2])
    zt = np.array([[1.0, 0.0, 4.0], [0.0, 1.0, -2.0]])
    head = nn.Linear(2, 3).double()
    head.weight.data, head.bias.data = t(W), t(bias)
    expected = np.mean((c - ft) ** 2) + np.mean((c @ W.T + bias - zt) ** 2)
    assert losses.srrl(t(c), t(ft), t(zt), head).item() == pytest.approx(expected, rel=1e-9)


def test_hint_adapts_channels_resizes_and_takes_l1_or_l2():
    s = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    te = np.stack([np.ones((2, 2)), np.zeros((2, 2))])[None]  # (1, 2, 2, 2)
    adapter = nn.Conv2d(1, 2, 1).double()
    adapter.weight.data, adapter.bias.data = t([[[[2.0]]], [[[-1.0]]]]), t([0.0, 1.0])
    mapped = np.stack([2 * s[0, 0], -s[0, 0] + 1])[None]
    assert losses.hint(t(s), t(te), adapter, "l2").item() == pytest.approx(np.mean((mapped - te) ** 2))
    assert losses.hint(t(s), t(te), adapter, "l1").item() == pytest.approx(np.mean(np.abs(mapped - te)))
    # A 1x1 student map is resized (bilinearly: constant) to the teacher's 2x2 before comparing.
    small = losses.hint(t([[[[3.0]]]]), t(te), adapter, "l2").item()
    assert small == pytest.approx(np.mean((np.stack([np.full((2, 2), 6.0), np.full((2, 2), -2.0)]) - te[0]) ** 2))


def test_contrastive_image_loss_with_a_temperature():
    s, te, tau = np.array([[2.0, 0.0], [1.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 3.0]]), 0.2
    L = unit(s) @ unit(te).T / tau
    expected = np.mean([-L[i, i] + np.log(np.exp(L[i]).sum()) for i in range(2)])
    assert losses.contrastive(t(s), t(te), tau).item() == pytest.approx(expected, rel=1e-9)


def test_learnable_temperature_starts_at_its_value_and_learns():
    temp = losses.LearnableTemperature(0.07)
    assert temp().item() == pytest.approx(0.07, rel=1e-6)
    losses.contrastive(torch.randn(4, 3), torch.randn(4, 3), temp()).backward()
    assert temp.log_scale.grad is not None


def test_clip_caption_loss_is_symmetric_over_each_images_caption():
    s = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = np.array([[1.0, 0.2], [0.0, 1.0]])
    classes, tau = np.array([0, 1, 0]), 0.5
    L = unit(s) @ unit(text[classes]).T / tau
    rows = np.mean([-L[i, i] + np.log(np.exp(L[i]).sum()) for i in range(3)])
    cols = np.mean([-L[j, j] + np.log(np.exp(L[:, j]).sum()) for j in range(3)])
    got = losses.clip_caption(t(s), t(text), torch.tensor(classes), tau).item()
    assert got == pytest.approx((rows + cols) / 2, rel=1e-9)


def test_multi_positive_weights_each_caption_by_its_images():
    s = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
    text = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # K = 3 captions; class 2 absent from the batch
    classes, tau = np.array([0, 1, 0, 0]), 0.1
    log_q = np.log(softmax(unit(s) @ unit(text).T / tau))
    # Class 0: images 0, 2 and 3 with p = 1/3 each; class 1: image 1 with p = 1; class 2: nothing. Divided by K = 3.
    expected = -((log_q[0, 0] + log_q[2, 0] + log_q[3, 0]) / 3 + log_q[1, 1]) / 3
    got = losses.multi_positive(t(s), t(text), torch.tensor(classes), tau).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_unlabelled_images_take_the_teachers_class():
    labels, teacher = torch.tensor([2, -1]), torch.tensor([[0.0, 1.0, 0.0], [3.0, 0.0, 1.0]])
    assert losses.target_classes(labels, teacher).tolist() == [2, 0]
    soft = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.0, 0.0]])  # Mixup soft labels; row 1 unlabelled
    assert losses.target_classes(soft, teacher).tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------------------------
# The registry: every weight in LossCfg is a registered loss, and no gradient ever reaches the teacher


def test_every_loss_weight_in_the_recipe_is_a_registered_loss():
    weights = sorted(f.name for f in dataclasses.fields(LossCfg) if f.metadata.get("weight"))
    assert weights == losses.LOSSES.names()
    assert set(NEW) <= set(weights)
    baseline = losses.only(LossCfg(kd=1.0, crd=2.0, dkd_beta=3.0), ce=1.0)
    assert [e.name for e in losses.active_entries(baseline)] == ["ce"] and baseline.dkd_beta == 3.0


def batch_for(name: str, B: int = 4, K: int = 3, D: int = 6, F: int = 5):
    """Random inputs for one entry: the student's with requires_grad, the teacher's too (they must get no grad)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()  # noqa: E731
    head = nn.Linear(D, K)  # the teacher's classifier, left trainable here: the loss must not train it anyway
    student = {"logits": r(B, K), "embedding": r(B, D), "features": r(B, F), "student_map": r(B, 4, 3, 3)}
    teacher = {"teacher_features": r(B, D), "teacher_logits": r(B, K), "teacher_map": r(B, 2, 3, 3), "text": r(K, D)}
    batch = losses.LossInputs(**student, **teacher, labels=torch.tensor([0, -1, 2, 1]), index=torch.arange(B),
                              teacher_head=head)
    cfg = LossCfg(**{name: 1.0}, crd_negatives=3)
    dims = losses.Dims(features=F, embedding=D, teacher=D, classes=K, items=8, student_map=4, teacher_map=2)
    entry = losses.LOSSES.get(name)
    module = entry.modules(cfg, dims) if entry.modules else None
    return entry, batch, module, cfg, student, teacher, head


@pytest.mark.parametrize("name", losses.LOSSES.names())
def test_no_gradient_reaches_the_teacher(name):
    entry, batch, module, cfg, student, teacher, head = batch_for(name)
    entry.term(batch, module, cfg).backward()
    assert all(v.grad is None for v in teacher.values()), "a teacher tensor got a gradient"
    assert all(p.grad is None for p in head.parameters()), "the teacher's classifier got a gradient"
    used = [k for k in student if k in entry.needs]
    assert any(student[k].grad is not None and student[k].grad.abs().sum() > 0 for k in used), "the student learns"
    if module is not None and any(p.requires_grad for p in module.parameters()):
        assert any(p.grad is not None for p in module.parameters()), "the loss's own modules learn"


# ---------------------------------------------------------------------------------------------------------------
# One epoch of each new loss through the real training loop (train()), with a real tiny teacher


SPEC = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0}


@pytest.fixture(scope="module")
def few_images(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("few"), per_class=3, size=32, corrupt=False)
    paths = sorted(root.rglob("*.png"))
    # Two of every class labelled, the third unlabelled (label -1: it feeds the distillation terms only).
    return [(str(p), ["red", "green", "blue"].index(p.parent.name) if int(p.stem) < 2 else -1) for p in paths]


def training_setup(name: str, images, seed: int = 0, **loss):
    from edgedistill.distill import TeacherForTraining
    from edgedistill.students import build_student
    from edgedistill.recipe import TeacherCfg
    from edgedistill.teachers import LinearHead, ZeroShotHead, build_teacher
    from edgedistill.train import DistillSet, GlobalBatchSampler

    teacher = build_teacher(TeacherCfg(name="tiny-cnn", width=8))
    torch.manual_seed(1)
    captions = name in ("clip_caption", "multi_positive")
    head = ZeroShotHead(torch.randn(3, teacher.feature_dim)) if captions else LinearHead(teacher.feature_dim, 3)
    for p in head.parameters():
        p.requires_grad_(False)
    frozen = {k: v.clone() for k, v in {**teacher.state_dict(), **head.state_dict()}.items()}
    run = SimpleNamespace(device="cpu", teacher=lambda: teacher)
    recipe = Recipe(student=StudentCfg(name="test_efficientnet"), loss=LossCfg(**{name: 1.0}, **loss),
                    train=TrainCfg(seed=seed))
    model = build_student(recipe, 3, teacher.feature_dim)
    dataset = DistillSet(images, SPEC, teacher.info.input.to_dict(), "light", 1, 1.0, seed, online=True)
    sampler = GlobalBatchSampler(len(images), 0, 4, seed)
    cfg = TrainCfg(epochs=1, batch_size=4, lr=1e-3, device="cpu", seed=seed, schedule="constant")
    return model, dataset, sampler, cfg, recipe.loss, TeacherForTraining(run, head), (teacher, head, frozen)


def train_one(name, images, folder, epochs=1, evaluate=None, **loss):
    from edgedistill.train import train

    model, dataset, sampler, cfg, weights, teacher, frozen = training_setup(name, images, **loss)
    cfg = dataclasses.replace(cfg, epochs=epochs, eval_every=1 if evaluate else 0)
    rows = train(model, dataset, sampler, cfg, weights, folder, f"key-{name}", teacher=teacher, num_classes=3,
                 evaluate=evaluate)
    return model, rows, frozen


@pytest.mark.parametrize("name", NEW)
def test_one_epoch_of_each_new_loss_through_the_training_loop(name, few_images, tmp_path):
    from edgedistill.students import build_student

    model, rows, (teacher, head, frozen) = train_one(name, few_images, tmp_path, crd_negatives=5)
    assert math.isfinite(rows[0][name]) and rows[0]["steps"] == 2
    fresh = build_student(Recipe(student=StudentCfg(name="test_efficientnet"), loss=LossCfg(**{name: 1.0})), 3,
                          teacher.feature_dim)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    after = {**teacher.state_dict(), **head.state_dict()}
    assert all(torch.equal(after[k], v) for k, v in frozen.items()), "the teacher changed"
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    entry = losses.LOSSES.get(name)
    assert bool(ckpt["losses"]) == (entry.modules is not None), "the loss modules' state is checkpointed"
    assert not any(k.startswith(name) for k in model.state_dict()), "loss modules are never part of the student"
    assert all(not m._forward_hooks for m in [*model.modules(), *teacher.modules()]), "taps removed after training"


class Interrupt(Exception):
    pass


def stop_after_first_epoch(model, epoch):
    if epoch >= 2:
        raise Interrupt  # the checkpoint after epoch 1 is written; epoch 2's is not: like a kill mid-epoch 2
    return {}


@pytest.mark.parametrize("name", ["crd", "contrastive", "hint"])
def test_a_resumed_run_repeats_the_uninterrupted_one_bit_for_bit(name, few_images, tmp_path):
    # CRD's memory, the learnt temperature and the hint adapter are state outside the student: the checkpoint
    # must carry them, or the resumed epoch trains against other values than the uninterrupted run did.
    whole, _, _ = train_one(name, few_images, tmp_path / "whole", epochs=2, crd_negatives=5)
    with pytest.raises(Interrupt):
        train_one(name, few_images, tmp_path / "killed", epochs=2, evaluate=stop_after_first_epoch, crd_negatives=5)
    resumed, rows, _ = train_one(name, few_images, tmp_path / "killed", epochs=2, crd_negatives=5)
    assert len(rows) == 2
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed student differs"
    la = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["losses"]
    lb = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["losses"]
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


# ---------------------------------------------------------------------------------------------------------------
# Constraints: refused before any work, naming the key


@pytest.mark.parametrize("loss, refused, fixed", [
    ("hint", [], ["train.teacher=online"]),  # cached teacher features hold no intermediate maps
    ("srrl", ["teacher.name=tiny-clip", "teacher.head=zeroshot"], ["teacher.name=tiny-clip", "teacher.head=linear"]),
    ("clip_caption", [], ["teacher.name=tiny-clip", "teacher.head=zeroshot"]),  # a probe has no class captions
    ("multi_positive", [], ["teacher.name=tiny-clip", "teacher.head=zeroshot"]),
])
def test_a_loss_constraint_refuses_the_recipe_naming_the_key(loss, refused, fixed, tmp_path, image_folder):
    from edgedistill.checks import load_checked

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(image_folder, loss={"ce": 1.0, loss: 1.0}))
    with pytest.raises(RecipeError, match=f"'loss.{loss}'"):
        load_checked(path, refused)
    load_checked(path, fixed)  # what the message says to change is enough


def test_a_recipe_with_no_loss_weight_lists_every_registered_loss(tmp_path, image_folder):
    from edgedistill.recipe import load_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(image_folder, loss={"temperature": 2.0}))
    with pytest.raises(RecipeError, match="multi_positive"):
        load_recipe(path)


def test_new_losses_run_end_to_end_through_recipe_run(tmp_path, image_folder):
    # The whole pipeline (features, probe, distill, baseline, evaluate) with several new losses at once, the
    # online teacher feeding the hint loss its intermediate map.
    import json

    from edgedistill.cli import main

    r = tiny_recipe(image_folder, loss={"ce": 0.5, "dkd": 0.5, "dist": 0.5, "crd": 0.1, "srrl": 0.5, "hint": 0.5,
                                        "crd_negatives": 16},
                    train={"epochs": 1, "batch_size": 8, "lr": 0.003, "device": "cpu", "teacher": "online"})
    path = write_recipe(tmp_path / "r.yaml", r)
    assert main(["recipe", "run", str(path), "--out", str(tmp_path / "run")]) == 0
    row = json.loads((tmp_path / "run" / "student" / "log.jsonl").read_text().splitlines()[0])
    assert all(math.isfinite(row[k]) for k in ("dkd", "dist", "crd", "srrl", "hint"))
