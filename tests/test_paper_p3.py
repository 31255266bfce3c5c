"""P3 (Hao et al., vanilla KD at scale; RSB A2): LAMB, repeated augmentation, the P3 recipes and their offline twin.

``tiny-p3`` runs end to end offline; LAMB is what trains it (its update is layer-wise, its checkpoint LAMB's);
repeated augmentation draws each image N times in one batch, each repeat its own view, and keeps the epoch's length;
bad values are refused before any work, naming the key.
"""
import json
import math

import numpy as np
import pytest
import torch
from timm.optim import Lamb

from edgedistill.checks import load_checked
from edgedistill.cli import main
from edgedistill.recipe import RecipeError, TrainCfg
from edgedistill.train import DistillSet, GlobalBatchSampler, make_optimizer

SPEC = {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "crop_pct": 1.0}


@pytest.fixture(scope="module")
def tiny_p3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-p3") / "run"
    assert main(["recipe", "run", "tiny-p3", "--out", str(out)]) == 0
    return out


def test_tiny_p3_runs_offline_end_to_end(tiny_p3_run):
    metrics = json.loads((tiny_p3_run / "metrics.json").read_text())
    assert {"teacher", "student", "baseline"} <= set(metrics)
    assert all(0 <= metrics[m]["top1"] <= 100 for m in ("teacher", "student", "baseline"))
    rows = [json.loads(x) for x in (tiny_p3_run / "student" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # 36 training images, batch 12: repeats keep the epoch at 3 steps of 12; both P3 terms, BCE and KD, trained.
    assert all(r["steps"] == 3 and r["images"] == 36 and r["bce"] > 0 and math.isfinite(r["kd"]) for r in rows)
    assert (tiny_p3_run / "student" / "model.pt").exists() and (tiny_p3_run / "baseline" / "model.pt").exists()


@pytest.mark.parametrize("stage", ["student", "baseline"])
def test_tiny_p3_trained_with_lamb(tiny_p3_run, stage):
    opt = torch.load(tiny_p3_run / stage / "checkpoint.pt", weights_only=True)["optimizer"]
    groups = opt["param_groups"]
    # timm's LAMB: its own settings in each group, and RSB's split: no weight decay on biases and norm weights.
    assert all({"trust_clip", "always_adapt", "grad_averaging", "max_grad_norm"} <= set(g) for g in groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.03]
    assert all(set(s) == {"exp_avg", "exp_avg_sq"} for s in opt["state"].values())


def test_lamb_steps_each_layer_by_lr_times_its_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 4))
    cfg = TrainCfg(optimizer="lamb", lr=0.01, weight_decay=0.03)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, Lamb)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.randn(8, 64)).square().sum() * 1e3).backward()  # a huge loss scale changes nothing below
    opt.step()
    for (name, p), p0 in zip(model.named_parameters(), before):
        step = (p.detach() - p0).norm().item()
        if name.endswith("weight"):  # trust ratio: the step is lr x the layer's own norm, whatever the gradient
            assert step == pytest.approx(cfg.lr * p0.norm().item(), rel=1e-3), name
        else:  # biases: no decay, no trust ratio: Adam's first step, lr per element
            assert step == pytest.approx(cfg.lr * math.sqrt(p.numel()), rel=1e-3), name


def keys_of(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return [list(b) for b in sampler]


@pytest.mark.parametrize("n_synth", [0, 6])
def test_repeated_aug_draws_each_image_n_times_per_batch_and_keeps_the_epoch(n_synth):
    n_items = 12 + n_synth
    plain = GlobalBatchSampler(12, n_synth, 6, seed=3)
    sampler = GlobalBatchSampler(12, n_synth, 6, seed=3, repeats=3)
    assert len(sampler) == len(plain) and sampler.epoch_size() == plain.epoch_size()  # same steps, same budget
    batches = keys_of(sampler)
    assert sum(map(len, batches)) == sum(map(len, keys_of(plain)))
    for batch in batches:  # each drawn image three times in the same batch, as repeats 0, 1 and 2
        decoded = [divmod(k, n_items) for k in batch]
        images = {i for _, i in decoded}
        assert len(images) == 2 and sorted(decoded) == sorted((r, i) for i in images for r in range(3))
    drawn = [k % n_items for b in batches for k in b]
    assert len(set(drawn)) == len(drawn) // 3  # a third of the epoch's items, each seen 3 times
    assert keys_of(sampler) == batches and keys_of(sampler, 1) != batches  # a function of (seed, epoch): resumable


def test_repeated_aug_keys_past_the_end_are_cut_not_grown():
    sampler = GlobalBatchSampler(10, 0, 5, seed=0, repeats=3)  # ceil(10 / 3) = 4 images, the last one once
    keys = [k for b in keys_of(sampler) for k in b]
    assert len(keys) == 10 and sorted(np.bincount([k % 10 for k in keys], minlength=10))[-4:] == [1, 3, 3, 3]


@pytest.fixture
def items(image_folder):
    paths = sorted(p for p in image_folder.rglob("*.png"))[:4]
    return [(str(p), k % 3) for k, p in enumerate(paths)]


def test_online_repeats_are_distinct_fresh_views(items):
    ds = DistillSet(items, SPEC, SPEC, "crop_flip_randaugment", 1, 1.0, seed=0, online=True)
    ds.set_epoch(2)
    n = len(items)
    for i in range(n):
        outs = [ds[i + r * n] for r in range(3)]
        assert all(o[2] == items[i][1] and o[3] == i for o in outs)  # same image and label, decoded index
        for a in range(3):
            for b in range(a + 1, 3):
                assert not torch.equal(outs[a][0], outs[b][0]), f"repeats {a} and {b} of image {i} are one view"
        assert all(torch.equal(o[0], o[1]) for o in outs)  # the teacher sees the student's view (same spec here)
        assert torch.equal(ds[i + n][0], outs[1][0])  # deterministic: the same view again on a resumed run


def test_cached_repeats_pick_distinct_cached_views(items):
    n = len(items)
    for views, want in ((3, 3), (2, 2)):  # N <= views: N distinct views; views < N: they cycle
        ds = DistillSet(items, SPEC, None, "light", views, 1.0, seed=0, online=False)
        for epoch in range(3):
            ds.set_epoch(epoch)
            for i in range(n):
                picked = [ds[i + r * n][4] for r in range(3)]
                assert ds[i][4] == picked[0] and len(set(picked)) == want and set(picked) <= set(range(views))


def test_repeat_zero_is_what_the_dataset_always_drew(items):
    from edgedistill.data import resize_normalize, view_image
    from edgedistill.utils import derived_seed

    ds = DistillSet(items, SPEC, None, "crop_flip_randaugment", 1, 1.0, seed=5, online=True)
    ds.set_epoch(1)
    img = view_image(items[2][0], "crop_flip_randaugment", derived_seed("online", 5, 1, 2), 1.0)
    assert torch.equal(ds[2][0], torch.from_numpy(resize_normalize(img, SPEC)))  # runs without repeats unchanged


class Interrupt(Exception):
    pass


def stop_in_epoch_2(model, epoch):
    if epoch >= 2:
        raise Interrupt  # epoch 1's checkpoint is written, epoch 2's is not: like a kill during epoch 2
    return {}


def train_p3(items, folder, evaluate=None):
    """Two epochs of tiny-p3's loop (LAMB, repeats 3, online teacher, Mixup + CutMix, BCE + KD) through train()."""
    from types import SimpleNamespace

    from edgedistill.distill import TeacherForTraining
    from edgedistill.recipe import LossCfg, Recipe, StudentCfg, TeacherCfg
    from edgedistill.students import build_student
    from edgedistill.teachers import LinearHead, build_teacher
    from edgedistill.train import train

    teacher = build_teacher(TeacherCfg(name="tiny-cnn", width=8))
    torch.manual_seed(1)
    head = LinearHead(teacher.feature_dim, 3).requires_grad_(False)
    recipe = Recipe(student=StudentCfg(name="test_resnet", drop_path=0.05), loss=LossCfg(bce=0.5, kd=0.5))
    model = build_student(recipe, 3, teacher.feature_dim)
    cfg = TrainCfg(epochs=2, batch_size=6, lr=5e-3, weight_decay=0.03, optimizer="lamb", warmup_epochs=1,
                   teacher="online", repeated_aug=3, device="cpu", channels_last=False, eval_every=int(bool(evaluate)))
    dataset = DistillSet(items, SPEC, teacher.info.input.to_dict(), "crop_flip_randaugment", 1, 1.0, 0, online=True)
    train(model, dataset, GlobalBatchSampler(len(items), 0, 6, 0), cfg, recipe.loss, folder, "key", num_classes=3,
          teacher=TeacherForTraining(SimpleNamespace(device="cpu", teacher=lambda: teacher), head), mixup=0.1,
          cutmix=1.0, evaluate=evaluate)
    return model


def test_a_resumed_p3_run_repeats_the_uninterrupted_one_bit_for_bit(image_folder, tmp_path):
    items = [(str(p), ["red", "green", "blue"].index(p.parent.name)) for p in sorted(image_folder.rglob("*.png"))][::4]
    whole = train_p3(items, tmp_path / "whole")
    with pytest.raises(Interrupt):
        train_p3(items, tmp_path / "killed", evaluate=stop_in_epoch_2)
    resumed = train_p3(items, tmp_path / "killed")
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed student differs"
    oa, ob = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["optimizer"] for d in ("whole", "killed"))
    assert [int(g["step"]) for g in oa["param_groups"]] == [int(g["step"]) for g in ob["param_groups"]]  # LAMB's
    assert all(torch.equal(oa["state"][k][s], ob["state"][k][s]) for k in oa["state"] for s in oa["state"][k])


def test_p3_recipes_carry_the_papers_settings():
    r = load_checked("p3-imagenet-resnet50")
    assert (r.teacher.name, r.teacher.arch, r.teacher.head, r.student.name) == \
        ("timm", "beitv2_large_patch16_224", "native", "resnet50")
    t = r.train
    assert (t.optimizer, t.lr, t.weight_decay, t.batch_size, t.epochs, t.warmup_epochs, t.schedule, t.teacher,
            t.repeated_aug, t.amp) == ("lamb", 5e-3, 0.03, 2048, 300, 5, "cosine", "online", 3, True)
    assert (r.loss.bce, r.loss.kd, r.loss.ce, r.loss.temperature) == (0.5, 0.5, 0.0, 1.0)
    assert (r.data.augment, r.data.mixup, r.data.cutmix, r.student.drop_path) == \
        ("crop_flip_randaugment", 0.1, 1.0, 0.05)
    twin = load_checked("tiny-p3")
    same = ("optimizer", "lr", "weight_decay", "schedule", "teacher", "repeated_aug")
    assert all(getattr(twin.train, k) == getattr(t, k) for k in same) and twin.loss == r.loss
    assert (twin.data.augment, twin.data.mixup, twin.data.cutmix, twin.student.drop_path) == \
        (r.data.augment, r.data.mixup, r.data.cutmix, r.student.drop_path)


@pytest.mark.parametrize("override, message", [
    ("train.optimizer=lamm", r"'train.optimizer' is 'lamm'\. Did you mean 'lamb'\?.*'adamw', 'sgd', 'lamb'"),
    ("train.repeated_aug=0", r"'train.repeated_aug' must be >= 1, got 0"),
])
def test_bad_values_are_refused_naming_the_key(override, message, tmp_path, capsys):
    with pytest.raises(RecipeError, match=message):
        load_checked("tiny-p3", [override])
    out = tmp_path / "run"
    assert main(["recipe", "run", "tiny-p3", "--out", str(out), override]) == 2
    assert override.split("=")[0] in capsys.readouterr().err and not out.exists()  # refused before any work
