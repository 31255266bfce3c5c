#!/usr/bin/env python3
"""Training throughput: the teacher's feature pass through PyTorch and each installed runtime, and a student step.

    python benchmarks/train_throughput.py [--recipe quickstart] [--images 192] [--device cpu] [--default-malloc]
                                          [key=value ...]

Uses the recipe's real teacher (pretrained weights, not fine-tuned: the speed is the same) and student on the first N
training images of its dataset. Prints images/s; each figure is the median of --repeats timed passes.
"""
import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgedistill.checks import load_checked
from edgedistill.data import make_split, resize_normalize, view_image
from edgedistill.data.cache import FeatureCache
from edgedistill.students import build_student, freeze_stages, student_input_spec
from edgedistill.teacher_runtime import feature_teacher
from edgedistill.teachers import build_teacher
from edgedistill.train import keep_freed_memory


def rate(fn, n_images: int, repeats: int) -> float:
    """Median images/s over ``repeats`` timed calls of ``fn`` (after one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="quickstart")
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--student-only", action="store_true", help="only the student step (e.g. to compare "
                   "student.freeze_stages=N overrides)")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator at its defaults (a recipe "
                   "run keeps freed memory for reuse from its start: train.keep_freed_memory)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    kept = False if args.default_malloc else keep_freed_memory()

    recipe = load_checked(args.recipe, args.overrides + [f"train.device={args.device}"])
    split = make_split(recipe.data)
    items = [tuple(it) for it in split["train"][: args.images]]
    teacher = build_teacher(recipe.teacher).to(args.device)
    spec = teacher.info.input.to_dict()
    crop = recipe.data.crop_pct or spec["crop_pct"]
    B = recipe.teacher.batch_size
    print(f"host: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device "
          f"{args.device}, torch {torch.__version__}, freed memory kept: {kept}; teacher {teacher.info.arch} @ "
          f"{spec['size']}px, batch {B}, {len(items)} images, median of {args.repeats}")
    if not args.student_only:
        teacher_passes(teacher, items, spec, crop, B, recipe, args)
    student_step(recipe, len(split["classes"]), teacher.feature_dim, args)


def teacher_passes(teacher, items, spec, crop, B, recipe, args):
    # 1. The teacher's forward alone, on the same preprocessed images, through each runtime.
    x = torch.from_numpy(np.stack([resize_normalize(view_image(path, "none", None, crop), spec) for path, _ in
                                   items[:B]]))
    folder = Path(tempfile.mkdtemp())
    encoders = {"pytorch": teacher}
    for name in ("onnxruntime", "openvino"):
        encoder, record = feature_teacher(teacher, name, folder, x[:16], args.device)
        if record["runtime"] == name:
            encoders[name] = encoder
        else:
            print(f"{name}: not used ({record['refused'].get(name)})")
    reps = max(1, len(items) // B)
    forward = {}
    for name, encoder in encoders.items():
        if name == "pytorch":
            teacher.to(memory_format=torch.channels_last)
        xb = x.contiguous(memory_format=torch.channels_last) if name == "pytorch" else x
        forward[name] = rate(lambda: [encoder.encode(xb) for _ in range(reps)], reps * len(x), args.repeats)
    # 2. The whole feature pass as the features stage runs it: decode, crop, resize, teacher, into the cache.
    fill = {}
    for name, encoder in encoders.items():
        def pass_():
            cache = FeatureCache(Path(tempfile.mkdtemp()), [p for p, _ in items], 1, teacher.feature_dim)
            cache.fill(encoder, items, "none", crop, B, recipe.data.num_workers, args.device)
        fill[name] = rate(pass_, len(items), args.repeats)
    print(f"{'teacher feature pass':<24}{'forward img/s':>14}{'x':>7}{'with decoding img/s':>22}{'x':>7}")
    for name in encoders:
        print(f"{name:<24}{forward[name]:>14.1f}{forward[name] / forward['pytorch']:>7.2f}"
              f"{fill[name]:>22.1f}{fill[name] / fill['pytorch']:>7.2f}")


def student_step(recipe, num_classes, feature_dim, args):
    """3. One student optimisation step (forward, backward, AdamW) at the student's size, with the recipe's frozen
    stages (student.freeze_stages) frozen as training freezes them."""
    model = freeze_stages(build_student(recipe, num_classes, feature_dim), recipe.student)
    model = model.to(args.device).train()
    model.to(memory_format=torch.channels_last)
    size = student_input_spec(recipe, model.backbone).size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    xs = torch.randn(recipe.train.batch_size, 3, size, size, device=args.device).contiguous(
        memory_format=torch.channels_last)

    def step():
        out = model(xs)
        (out["logits"].sum() if "logits" in out else out["embedding"].sum()).backward()
        opt.step()
        opt.zero_grad()
    print(f"student step ({recipe.student.name} @ {size}px, batch {len(xs)}, "
          f"{recipe.student.freeze_stages} stages frozen): "
          f"{rate(step, len(xs), args.repeats):.1f} img/s")


if __name__ == "__main__":
    main()
