#!/usr/bin/env python3
"""Training throughput: teacher forward, one student step, and a distillation epoch, online teacher vs cache.

    python benchmarks/train_throughput.py [--recipe quickstart] [--images 160] [--device cpu]

Uses the recipe's real teacher and student on the first N training images of its dataset. Prints images/s.
"""
import argparse
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgedistill import distributed
from edgedistill.data import make_split
from edgedistill.data.cache import FeatureCache
from edgedistill.distill import TeacherForTraining, student_spec
from edgedistill.run_folder import Run
from edgedistill.stages import probe
from edgedistill.checks import load_checked
from edgedistill.students import build_student
from edgedistill.teachers import build_teacher
from edgedistill.train import DistillSet, GlobalBatchSampler, TeacherFeatures, train


def timed(fn, n_images: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n_images / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="quickstart")
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    recipe = load_checked(args.recipe, args.overrides + ["train.epochs=1", f"train.device={args.device}"])
    split = make_split(recipe.data)
    items = [tuple(it) for it in split["train"][: args.images]]
    teacher = build_teacher(recipe.teacher).to(args.device)
    run = Run(tempfile.mkdtemp(), recipe)
    run._teacher = teacher
    spec = student_spec(run)
    tspec = teacher.info.input
    B = recipe.train.batch_size
    print(f"host: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device "
          f"{args.device}, torch {torch.__version__}; teacher {teacher.info.arch} @ {tspec.size}px, student "
          f"{recipe.student.name} @ {spec.size}px, batch {B}, {len(items)} images")

    # 1. Teacher forward alone (pre-processed tensors; no decoding).
    cl = torch.channels_last if recipe.train.channels_last else torch.contiguous_format  # as training uses
    teacher.to(memory_format=cl)
    x_t = torch.randn(B, 3, tspec.size, tspec.size, device=args.device).contiguous(memory_format=cl)
    teacher.encode(x_t[:2])
    reps = max(1, args.images // B)
    print(f"teacher forward        {timed(lambda: [teacher.encode(x_t) for _ in range(reps)], reps * B):8.1f} img/s")

    # 2. One student optimisation step alone.
    model = build_student(recipe, len(split["classes"]), teacher.feature_dim).to(args.device).train()
    model.to(memory_format=cl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x_s = torch.randn(B, 3, spec.size, spec.size, device=args.device).contiguous(memory_format=cl)

    def steps():
        for _ in range(reps):
            out = model(x_s)
            (out["logits"].sum() if "logits" in out else out["embedding"].sum()).backward()
            opt.step()
            opt.zero_grad()
    steps()
    print(f"student step           {timed(steps, reps * B):8.1f} img/s")

    # 3. A distillation epoch: online teacher vs cached teacher features (cache filled beforehand, not timed).
    folder = Path(run.dir)
    cache = FeatureCache(folder / "cache", [p for p, _ in items], recipe.data.views, teacher.feature_dim)
    crop = spec.crop_pct
    fill_rate = timed(lambda: cache.fill(teacher, items, recipe.data.augment, crop, B, device=args.device),
                      len(items) * recipe.data.views)
    print(f"cache fill (decode+teacher) {fill_rate:5.1f} img/s")
    head = probe(cache, {"train": items, "classes": split["classes"]}, teacher.feature_dim, recipe.teacher, 0) \
        if recipe.teacher.head in ("linear", "mlp") else teacher.head
    for mode in ("online", "cached"):
        model = build_student(recipe, len(split["classes"]), teacher.feature_dim)
        teacher_features = TeacherFeatures()
        teacher_features.add(cache, np.arange(len(items)))
        online = mode == "online"
        ds = DistillSet(items, spec.to_dict(), tspec.to_dict(), recipe.data.augment, recipe.data.views, crop,
                        0, online=online)
        sampler = GlobalBatchSampler(len(items), 0, B, 0)
        cfg = dataclasses.replace(recipe.train, epochs=1)
        out = folder / mode
        rate = timed(lambda: train(model, ds, sampler, cfg, recipe.loss, out, mode,
                                   teacher=TeacherForTraining(run, head), teacher_features=teacher_features,
                                   device=args.device, desc=mode), len(sampler) * sampler.batch)
        print(f"distill epoch, {mode:<7} {rate:8.1f} img/s")
    distributed.barrier()


if __name__ == "__main__":
    main()
