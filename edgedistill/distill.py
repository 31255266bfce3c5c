"""The training stages: the distilled student, and the same student trained without a teacher (the baseline)."""
from pathlib import Path

import numpy as np
import torch

from . import distributed, losses
from .data.cache import RealViews
from .recipe import Recipe, fingerprinted, to_plain
from .run_folder import STAGE_VERSIONS, Run
from .stages import labelled_items, real_items
from .students import build_student, freeze_stages, save_student, student_input_spec
from .teachers import ZeroShotHead, head_layout
from .train import DistillSet, GlobalBatchSampler, TeacherFeatures, predict, train
from .utils import fingerprint


def student_spec(run: Run, feats: dict, backbone=None):
    """The student's preprocessing, cropped exactly as the teacher's views were (``view_crop``)."""
    spec = student_input_spec(run.recipe, backbone)
    spec.crop_pct = feats["crop_pct"]
    return spec


def noise_key(r: Recipe) -> list:
    """``data.student_augment`` in a training stage's key; nothing when unset, so older run folders still resume."""
    return [["student_augment", r.data.student_augment]] if r.data.student_augment else []


def validation_hook(run: Run, split: dict, spec):
    """``train``'s per-epoch evaluation: top-1 on the validation split (never the test split), or None."""
    if not run.recipe.train.eval_every or not split["val"]:
        return None
    labels = torch.tensor([y for _, y in split["val"]])

    def evaluate(model, epoch):
        out = predict(model, split["val"], spec.to_dict(), spec.crop_pct, run.recipe.train.batch_size, run.device,
                      desc=f"validate {epoch}")
        model.train()
        return {"val_top1": 100.0 * (out["logits"].argmax(1) == labels).float().mean().item()}
    return evaluate


def synth_split(run: Run, synth: dict | None) -> tuple[list, list]:
    """(training positions, held-out positions) within the kept synthetic images, for the synthetic-to-real gap."""
    if synth is None:
        return [], []
    n, frac = len(synth["items"]), run.recipe.eval.synthetic_holdout
    step = int(round(1 / frac)) if frac > 0 else 0
    held = list(range(0, n, step)) if step and n >= 2 * step else []
    return [i for i in range(n) if i not in set(held)], held


def distill(run: Run, split: dict, feats: dict, head, items: list, teacher_features: TeacherFeatures, n_real: int,
            folder: Path, key: str):
    """Train the recipe's student on ``items`` (real first, then synthetic) against the teacher; returns its log."""
    r = run.recipe
    text = head.text if r.eval.zero_shot and isinstance(head, ZeroShotHead) else None
    model = freeze_stages(build_student(r, len(split["classes"]), feats["dim"], text, backbone=run.student_backbone(),
                                        init=run.init_file), r.student)
    spec = student_spec(run, feats, model.backbone)
    online = r.train.teacher == "online"
    dataset = DistillSet(items, spec.to_dict(), feats["input"], r.data.augment, r.data.views, spec.crop_pct,
                         r.train.seed, online=online, n_real=n_real, student_augment=r.data.student_augment)
    sampler = GlobalBatchSampler(n_real, len(items) - n_real, r.train.batch_size, r.train.seed, r.train.real_fraction)
    rows = train(model, dataset, sampler, r.train, r.loss, folder, key, teacher=TeacherForTraining(run, head),
                 teacher_features=teacher_features, workers=r.data.num_workers, desc="distill", device=run.device,
                 mixup=r.data.mixup, cutmix=r.data.cutmix, num_classes=len(split["classes"]),
                 evaluate=validation_hook(run, split, spec))
    return model, spec, rows


def training_items(run: Run, split: dict, views: RealViews | None, synth) -> tuple[list, TeacherFeatures, int]:
    """What the student trains on: (items, their teacher features, how many are real); real images first.

    Real images whose label is not kept (``data.labels_per_class``) and the unlabelled folder's images carry label
    -1, as synthetic images do: they feed only the distillation terms, never the cross-entropy (P1).
    """
    items, teacher_features = [], TeacherFeatures()
    if run.recipe.data.real_train:
        labelled = set(split["labelled"])
        items += [(p, y if i in labelled else -1) for i, (p, y) in enumerate(real_items(split))]
        teacher_features.add(views, np.arange(len(items)))
    n_real = len(items)
    if synth is not None:
        keep, _ = synth_split(run, synth)
        items += [synth["items"][i] for i in keep]
        teacher_features.add(synth["cache"], [synth["rows"][i] for i in keep])
    return items, teacher_features, n_real


def stage_distill(run: Run, split: dict, feats: dict, views, head, synth) -> dict:
    r = run.recipe
    key = fingerprint([run.keys["probe"], run.keys.get("views"), run.keys.get("synth"), fingerprinted(r.student),
                       to_plain(r.loss), fingerprinted(r.train), r.data.augment, r.data.views, r.data.mixup,
                       r.data.cutmix, r.data.image_size, r.data.crop_pct, r.data.real_train, r.eval.zero_shot,
                       r.eval.synthetic_holdout] + noise_key(r) + run.init_key())
    folder = run.dir / "student"

    def compute():
        items, teacher_features, n_real = training_items(run, split, views, synth)
        model, spec, rows = distill(run, split, feats, head, items, teacher_features, n_real, folder, key)
        if distributed.is_main():
            extra = {"teacher": feats["info"], "generator": synth_generator_info(r)}
            save_student(folder / "model.pt", model.cpu(), r, split["classes"], spec, extra)
        return {"epochs": len(rows), "last": rows[-1] if rows else {}}

    summary = run.stage("distill", key, compute)
    return {"key": run.keys["distill"], "folder": folder, "summary": summary}


def synth_generator_info(recipe: Recipe):
    if recipe.synthetic is None:
        return None
    try:
        from .data.generators import generator_info

        return generator_info(recipe.synthetic)
    except (ImportError, AttributeError):
        return {"generator": recipe.synthetic.generator, "model_id": recipe.synthetic.model_id}


class TeacherForTraining:
    """What the training loop needs of the teacher: features (online), the frozen head and the feature size it reads
    (``dim``), the class text embeddings of a zero-shot head (``text``) and the network a hint loss taps."""

    def __init__(self, run: Run, head):
        self.run, self.head = run, head.to(run.device)
        self.dim = head_layout(head)["dim"]
        self.text = head.text if isinstance(head, ZeroShotHead) else None

    def network(self):
        return self.run.teacher().model

    def encode(self, x):
        return self.run.teacher().encode(x)

    def logits(self, features):
        return self.head(features)

    def to(self, device):
        self.head.to(device)
        return self


def copy_baseline(trained: Path, folder: Path, recipe: Recipe):
    """A run's own copy of a baseline trained in a sweep's shared folder, recording this run's recipe."""
    from .utils import atomic_torch_save, atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    saved = torch.load(trained / "model.pt", map_location="cpu", weights_only=True)
    atomic_torch_save({**saved, "recipe": recipe.to_dict()}, folder / "model.pt")
    if (trained / "log.jsonl").exists():
        atomic_write_text(folder / "log.jsonl", (trained / "log.jsonl").read_text())


def stage_baseline(run: Run, split: dict, feats: dict, synth) -> dict:
    """The same student trained on the labelled images alone with cross-entropy only: what the teacher is worth.

    Equal budget: as many optimiser steps of as many images as the distilled student gets, also when synthetic
    images enlarge the distillation epoch (the real images are then repeated); the same views and augmentation.
    """
    r = run.recipe
    n_synth = len(synth_split(run, synth)[0]) if synth is not None else 0
    n_real = len(real_items(split)) if r.data.real_train else 0
    budget = GlobalBatchSampler(n_real, n_synth, r.train.batch_size, r.train.seed, r.train.real_fraction).epoch_size()
    key = fingerprint([run.keys["features"], fingerprinted(r.student), fingerprinted(r.train), r.data.augment,
                       r.data.views, r.data.image_size, r.data.crop_pct, r.loss.label_smoothing, budget]
                      + noise_key(r) + run.init_key())
    folder = run.dir / "baseline"
    # In a sweep every point of a seed trains the very same baseline (its key leaves the losses out): train it once
    # in the shared folder, and give each point its own copy.
    trained = folder if run.shared == run.dir else \
        run.shared / "baselines" / fingerprint(["baseline", STAGE_VERSIONS["baseline"], key])

    def compute():
        if not (trained / "model.pt").exists():
            train_baseline()
        if trained != folder and distributed.is_main():
            copy_baseline(trained, folder, r)
        return {"epochs": r.train.epochs, "trained_in": str(trained)}

    def train_baseline():
        model = freeze_stages(build_student(r, len(split["classes"]), 0, baseline=True, backbone=run.student_backbone(),
                                            init=run.init_file), r.student)
        spec = student_spec(run, feats, model.backbone)
        items = labelled_items(split)  # never an unlabelled image
        dataset = DistillSet(items, spec.to_dict(), None, r.data.augment, r.data.views, spec.crop_pct,
                             r.train.seed, online=r.train.teacher == "online", student_augment=r.data.student_augment)
        sampler = GlobalBatchSampler(len(items), 0, r.train.batch_size, r.train.seed, epoch_size=budget)
        ce_only = losses.only(r.loss, ce=1.0)
        train(model, dataset, sampler, r.train, ce_only, trained, key, workers=r.data.num_workers,
              desc="baseline", device=run.device, evaluate=validation_hook(run, split, spec))
        if distributed.is_main():
            save_student(trained / "model.pt", model.cpu(), r, split["classes"], spec, {"baseline": True})
        distributed.barrier()

    summary = run.stage("baseline", key, compute)
    return {"key": run.keys["baseline"], "folder": folder, "summary": summary}

