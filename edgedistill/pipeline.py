"""``recipe run``: the stages of a recipe, each keyed by a fingerprint of everything it depends on.

Run folder layout::

    RUN/recipe.yaml          the resolved recipe
    RUN/split.json           {"classes", "train", "val", "test", "skipped"}; items are [path, label]
    RUN/stages/<stage>.json  the fingerprint a finished stage was computed with, plus its summary
    RUN/cache/<name>-<key>/  teacher-feature caches (memory-mapped)
    RUN/probe/head.pt        the teacher's head as a state dict (probed, zero-shot text head, or its own classifier)
    RUN/probe/head.json      how to rebuild that head (kind and sizes): nothing in a run folder is unpickled
    RUN/synth/               synthetic images and manifest.jsonl (when the recipe has a synthetic section)
    RUN/student/model.pt     the distilled student (plus checkpoint.pt and log.jsonl)
    RUN/baseline/model.pt    the same student trained CE-only with the same budget
    RUN/metrics.json, RUN/report.md, RUN/confusion-*.png
    RUN/export/<format>-<precision>/, RUN/bench.json   when the recipe asks for export and bench

A finished stage whose fingerprint matches is reused; a changed setting reruns that stage and what follows it.
"""
import dataclasses
import io
import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .data import make_split
from .data.cache import FeatureCache, RealViews
from .evaluate import agreement, classification_metrics, gflops, params_used, plot_confusion
from .recipe import Recipe, RecipeError, dump_recipe, to_plain
from .students import LogitsOnly, build_student, save_student, student_input_spec
from .teachers import Teacher, ZeroShotHead, build_teacher, load_head, make_probe_head, save_head
from .train import DistillSet, GlobalBatchSampler, TeacherTargets, predict, train
from .utils import atomic_write_bytes, atomic_write_text, fingerprint, read_json, write_json

log = logging.getLogger(__name__)
# Part of every stage's key: bump a stage's number when a fix changes what it computes from the same inputs, so a
# run folder made by older code is recomputed rather than silently reused.
STAGE_VERSIONS = {"split": 2, "features": 2, "views": 1, "probe": 3, "synth": 2, "distill": 3, "baseline": 3,
                  "evaluate": 3, "export": 2, "bench": 2}
SHARED_STAGES = ("split", "features", "probe", "synth")  # independent of the student and of the seed


class Run:
    """A run folder plus the recipe; stages record their fingerprints under ``stages/``.

    ``shared`` (used by sweeps) holds the stages that do not depend on the student: split, teacher features,
    teacher head and synthetic data, so several runs reuse them.
    """

    def __init__(self, folder, recipe: Recipe, shared=None):
        self.dir, self.recipe = Path(folder), recipe
        self.shared = Path(shared) if shared else self.dir
        self.device = distributed.pick_device(recipe.train.device)
        self._teacher: Teacher | None = None
        self.keys: dict = {}
        self.timings: dict = {}
        self.reused: list = []

    # -- stage bookkeeping
    def stage_file(self, name: str) -> Path:
        base = self.shared if name in SHARED_STAGES else self.dir
        return base / "stages" / f"{name}.json"

    def finished(self, name: str, key: str) -> dict | None:
        path = self.stage_file(name)
        if path.exists():
            info = read_json(path)
            if info.get("key") == key:
                return info
        return None

    def stage(self, name: str, key: str, fn) -> dict:
        """Run ``fn`` unless the stage already finished with this key; only rank 0 computes shared stages.

        The key is extended with the stage's code version. A reused stage reports the seconds it took when it ran.
        """
        key = fingerprint([name, STAGE_VERSIONS[name], key])
        self.keys[name] = key
        info = self.finished(name, key)
        if info is not None:
            log.info("stage %-9s reused (key %s)", name, key)
            self.timings[name] = info.get("seconds", 0.0)
            self.reused.append(name)
            return info["summary"]
        t0 = time.perf_counter()
        log.info("stage %-9s running (key %s)", name, key)
        summary = fn() or {}
        self.timings[name] = round(time.perf_counter() - t0, 1)
        if distributed.is_main():
            write_json(self.stage_file(name), {"key": key, "summary": summary, "seconds": self.timings[name]})
        return summary

    def teacher(self) -> Teacher:
        if self._teacher is None:
            self._teacher = build_teacher(self.recipe.teacher).to(self.device)
        return self._teacher


def run_recipe(recipe: Recipe, out=None, seeds: int = 1, shared_dir=None) -> dict:
    """Run every stage of ``recipe`` into ``out`` (default ``runs/<name>``); returns metrics.json's content."""
    # 1. Folder, distributed setup, the resolved recipe.
    out = Path(out or Path("runs") / recipe.name)
    run = Run(out, recipe, shared_dir)
    distributed.init_from_env(run.device)
    validate_for_run(recipe)
    preflight_weights(run)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
    t0 = time.perf_counter()

    # 2. Shared stages: split, teacher features, teacher head, synthetic data.
    split = stage_split(run)
    feats = stage_features(run, split)
    head = stage_head(run, split, feats)
    synth = stage_synth(run, split, feats) if recipe.synthetic is not None else None

    # 3. Training stages, per seed (each seed its own augmented views, initialisation, order and dropout).
    results, seed_runs = [], []
    for k in range(seeds):
        seed_run = with_seed(run, k) if seeds > 1 else run
        seed_runs.append(seed_run)
        views = stage_views(seed_run, split, feats)
        student = stage_distill(seed_run, split, feats, views, head, synth)
        baseline = stage_baseline(seed_run, split, feats, synth) if recipe.baseline else None
        results.append(stage_evaluate(seed_run, split, feats, head, student, baseline, synth))
    metrics = combine_seeds(run, results) if seeds > 1 else results[0]

    # 4. Export and benchmark when the recipe asks for them: the first seed's student (its own run folder).
    first = seed_runs[0]
    if distributed.is_main() and recipe.export is not None:
        from .export import export_run

        first.stage("export", fingerprint([first.keys["evaluate"], to_plain(recipe.export)]),
                    lambda: {"bundles": [str(p) for p in export_run(first.dir, cfg=recipe.export) or []]})
    if distributed.is_main() and recipe.bench is not None:
        from .bench import bench_run

        first.stage("bench", fingerprint([first.keys.get("export"), first.keys["evaluate"], to_plain(recipe.bench)]),
                    lambda: {"rows": len(bench_run(first.dir, recipe.bench) or [])})
    if distributed.is_main():
        if seeds > 1 and (recipe.export is not None or recipe.bench is not None):
            metrics["exported_seed"] = str(first.dir)
        metrics["timings"] = stage_timings(seed_runs, time.perf_counter() - t0)
        write_json(out / "metrics.json", metrics)
        write_report(run, metrics, split)
        print_summary(out, metrics)
    distributed.barrier()
    return metrics


def stage_timings(runs: list, elapsed: float) -> dict:
    """Seconds each stage took when it was computed (kept when a re-run reuses it), their sum, and this call's."""
    seconds, reused = {}, []
    for r in runs:
        prefix = f"{r.dir.name}/" if len(runs) > 1 and r.dir.name.startswith("seed-") else ""
        for name, sec in r.timings.items():
            seconds.setdefault(name if name in SHARED_STAGES else prefix + name, sec)
        reused += [n if n in SHARED_STAGES else prefix + n for n in r.reused]
    return {"stages_seconds": seconds, "total_seconds": round(sum(seconds.values()), 1),
            "reused": sorted(set(reused)), "this_run_seconds": round(elapsed, 1)}


def validate_for_run(recipe: Recipe):
    """Combinations that only make sense together, checked before any work."""
    if recipe.teacher.head == "zeroshot" and recipe.teacher.name not in ("clip", "tiny-clip"):
        raise RecipeError(f"Recipe key 'teacher.head' is 'zeroshot' but teacher {recipe.teacher.name!r} has no text "
                          "encoder; use head: linear or mlp")
    for mix in ("mixup", "cutmix"):
        if getattr(recipe.data, mix) and recipe.train.teacher != "online":
            raise RecipeError(f"Recipe key 'data.{mix}' needs 'train.teacher: online' (the teacher must see the mixed "
                              f"image); set train.teacher=online or data.{mix}=0")
    if recipe.train.eval_every and recipe.data.val_fraction <= 0:
        raise RecipeError("Recipe key 'train.eval_every' evaluates on the validation split, which is empty: set "
                          "data.val_fraction (e.g. 0.1) or train.eval_every=0")
    if not recipe.data.real_train and recipe.synthetic is None:
        raise RecipeError("Recipe key 'data.real_train' is false but the recipe has no 'synthetic' section: "
                          "there would be nothing to train on")
    if recipe.teacher.pool != "avg" and (recipe.teacher.head == "native" or recipe.teacher.name not in
                                         ("timm", "efficientnet-lite", "tiny-cnn")):
        raise RecipeError("Recipe key 'teacher.pool' other than 'avg' needs a timm/efficientnet-lite teacher with a "
                          "probed head (linear or mlp)")
    if recipe.eval.zero_shot and recipe.teacher.head != "zeroshot":
        raise RecipeError("Recipe key 'eval.zero_shot' needs 'teacher.head: zeroshot' (class text embeddings)")


def preflight_weights(run: Run):
    """Load hub weights before any data work, so a missing download is what gets reported, all at once."""
    from .students import create_backbone
    from .teachers import WeightsUnavailable

    problems = []
    if not (run.shared / "stages" / "features.json").exists():
        try:
            run.teacher()
        except WeightsUnavailable as e:
            problems.append(str(e))
    if run.recipe.student.pretrained and not (run.dir / "stages" / "distill.json").exists():
        try:
            create_backbone(run.recipe.student)
        except WeightsUnavailable as e:
            problems.append(str(e))
    if problems:
        raise WeightsUnavailable("\n  ".join(problems))


def with_seed(run: Run, k: int) -> Run:
    train = dataclasses.replace(run.recipe.train, seed=run.recipe.train.seed + k)
    recipe = dataclasses.replace(run.recipe, train=train)
    seeded = Run(run.dir / f"seed-{k}", recipe, run.shared)
    seeded._teacher, seeded.keys, seeded.timings = run._teacher, dict(run.keys), dict(run.timings)
    seeded.reused, seeded.device = list(run.reused), run.device
    if distributed.is_main():  # export, demo and bench read a seed's folder like any run folder
        seeded.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(seeded.dir / "recipe.yaml", dump_recipe(recipe))
        if (run.shared / "split.json").exists():
            write_json(seeded.dir / "split.json", read_json(run.shared / "split.json"))
    return seeded


# ---------------------------------------------------------------------------------------------------------------
# Shared stages


def stage_split(run: Run) -> dict:
    d = run.recipe.data
    key = fingerprint([d.dataset, d.root, d.classes, d.test_fraction, d.val_fraction, d.max_per_class, d.split_seed,
                       folder_listing(d)])
    path = run.shared / "split.json"

    def compute():
        split = make_split(d)
        write_json(path, split)
        if split["skipped"]:
            log.warning("%d unreadable images were skipped (listed in %s)", len(split["skipped"]), path)
        return {"train": len(split["train"]), "val": len(split["val"]), "test": len(split["test"]),
                "skipped": len(split["skipped"]), "classes": len(split["classes"])}

    summary = run.stage("split", key, compute if distributed.is_main() else dict)
    distributed.barrier()
    split = read_json(path)
    if distributed.is_main() and run.shared != run.dir:  # export, demo and bench read the split from the run folder
        write_json(run.dir / "split.json", split)
    split["summary"] = summary
    return split


def folder_listing(d) -> str:
    """A fingerprint of the image files (relative path and size) under an image folder: added, removed or replaced
    images make a new split. Datasets fetched by name are fixed releases and are keyed by their name alone."""
    if d.dataset == "imagefolder":
        root = Path(d.root).expanduser()
    elif d.dataset == "conformal-clip-data":
        import conformal_clip_data

        root = Path(conformal_clip_data.textile_simulated_root())
    else:
        return ""
    if not root.is_dir():
        return "missing"
    from .data import IMAGE_EXTENSIONS

    files = sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return fingerprint(files)


def teacher_key(recipe: Recipe) -> str:
    t = recipe.teacher
    return fingerprint([t.name, t.arch, t.pretrained, t.image_size, t.n_cls_blocks, t.avgpool, t.pool, t.width,
                        t.depth, t.embed_dim])


def open_caches(run: Run, split: dict, tdim: int, crop: float) -> dict:
    """The shared real-image caches, un-augmented view only: train and eval (val + test)."""
    tkey = teacher_key(run.recipe)
    out = {}
    for name, items in {"train": split["train"], "eval": split["val"] + split["test"]}.items():
        meta = {"teacher": tkey, "crop_pct": crop, "keys": fingerprint(items),
                "version": STAGE_VERSIONS["features"]}
        out[name] = FeatureCache(run.shared / "cache" / f"{name}-{fingerprint(meta)}", [p for p, _ in items], 1,
                                 tdim, meta)
    return out


def view_crop(run: Run, teacher_input: dict) -> float:
    """The centre-crop fraction of every view, the teacher's and the student's alike: ``data.crop_pct``, else the
    teacher's own default (its cached features were computed on that view, so the student must see it too)."""
    return run.recipe.data.crop_pct or teacher_input["crop_pct"]


def stage_features(run: Run, split: dict) -> dict:
    """Teacher features of the un-augmented view of every image, computed once and shared by every seed (train
    images only when real images are trained on); augmented views are each seed's own (``stage_views``)."""
    r = run.recipe
    key = fingerprint([run.keys["split"], teacher_key(r), r.data.crop_pct, r.data.real_train])

    def compute():
        t = run.teacher()
        crop = view_crop(run, t.info.input.to_dict())
        caches = open_caches(run, split, t.feature_dim, crop)
        groups = [("eval", split["val"] + split["test"])] + ([("train", split["train"])] if r.data.real_train else [])
        for name, items in groups:
            n = caches[name].fill(t, items, r.data.augment, crop, r.teacher.batch_size, r.data.num_workers,
                                  run.device, desc=f"teacher features ({name})")
            log.info("teacher features (%s): %d computed, %d reused", name, n, caches[name].done.size - n)
        return {"dim": t.feature_dim, "input": t.info.input.to_dict(), "crop_pct": crop,
                "gflops": gflops(t.flops_model(), t.info.input.size),
                "params_m": params_used(t.flops_model(), t.info.input.size) / 1e6,
                "info": {"name": t.info.name, "arch": t.info.arch, "weights": t.info.weights,
                         "licence": t.info.licence}}

    run.stage("features", key, compute if distributed.is_main() else dict)
    distributed.barrier()
    summary = read_json(run.stage_file("features"))["summary"]
    return {**summary, "caches": open_caches(run, split, summary["dim"], summary["crop_pct"])}


def stage_views(run: Run, split: dict, feats: dict) -> RealViews | None:
    """Teacher features of this seed's augmented views of the real training images (views 1 .. data.views - 1)."""
    r = run.recipe
    if not r.data.real_train:
        return None
    base = feats["caches"]["train"]
    if r.data.views < 2:
        return RealViews(base, None)
    meta = {"teacher": teacher_key(r), "crop_pct": feats["crop_pct"], "augment": r.data.augment,
            "seed": r.train.seed, "keys": fingerprint(split["train"]), "version": STAGE_VERSIONS["views"]}
    folder = run.shared / "cache" / f"train-views-{fingerprint(meta)}"
    key = fingerprint([run.keys["features"], meta, r.data.views])

    def compute():
        cache = FeatureCache(folder, [p for p, _ in split["train"]], r.data.views - 1, feats["dim"], meta)
        n = cache.fill(run.teacher(), split["train"], r.data.augment, feats["crop_pct"], r.teacher.batch_size,
                       r.data.num_workers, run.device, desc="teacher features (augmented views)", salt=r.train.seed,
                       first_view=1)
        log.info("teacher features (augmented views): %d computed", n)
        return {"views": r.data.views - 1, "seed": r.train.seed}

    run.stage("views", key, compute if distributed.is_main() else dict)
    distributed.barrier()
    return RealViews(base, FeatureCache(folder, [p for p, _ in split["train"]], r.data.views - 1, feats["dim"], meta))


def class_prompt_names(recipe: Recipe, classes) -> list[str]:
    return [recipe.data.prompt_names.get(c, c.replace("_", " ")) for c in classes]


def stage_head(run: Run, split: dict, feats: dict) -> torch.nn.Module:
    """The teacher's head: probed on cached features (linear/MLP), CLIP's text head, or its own classifier."""
    r, t = run.recipe, run.recipe.teacher
    key = fingerprint([run.keys["features"], t.head, t.templates, r.data.prompt_names, r.data.superclass,
                       t.probe_epochs, t.probe_lr, t.probe_weight_decay, t.probe_batch_size])
    path = run.shared / "probe" / "head.pt"

    def compute():
        if t.head == "zeroshot":
            head = run.teacher().text_head(class_prompt_names(r, split["classes"]), t.templates, r.data.superclass)
        elif t.head == "native":
            head, _ = run.teacher().native_head()
        else:
            head = probe(feats["caches"]["train"], split, feats["dim"], t, r.train.seed)
        save_head(head.cpu(), path)
        return {"kind": t.head}

    run.stage("probe", key, compute if distributed.is_main() else dict)
    distributed.barrier()
    head = load_head(path)
    for p in head.parameters():
        p.requires_grad_(False)
    return head


def probe(cache: FeatureCache, split: dict, dim: int, t, seed: int) -> torch.nn.Module:
    """Train a linear or MLP head on frozen, cached teacher features of the un-augmented views (P1 step 1)."""
    torch.manual_seed(seed)
    x = cache.get(np.arange(len(split["train"])))
    y = torch.tensor([label for _, label in split["train"]])
    head = make_probe_head(t.head, dim, len(split["classes"]))
    opt = torch.optim.AdamW(head.parameters(), lr=t.probe_lr, weight_decay=t.probe_weight_decay)
    steps = t.probe_epochs * max(1, len(x) // t.probe_batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    g = torch.Generator().manual_seed(seed)
    for _ in range(t.probe_epochs):
        perm = torch.randperm(len(x), generator=g)
        for b in range(0, len(x), t.probe_batch_size):
            idx = perm[b:b + t.probe_batch_size]
            loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def stage_synth(run: Run, split: dict, feats: dict) -> dict:
    from .data.synth import is_complete, synth_stage

    key = fingerprint([run.keys["probe"], to_plain(run.recipe.synthetic), run.recipe.data.views,
                       run.recipe.data.augment, run.recipe.data.prompt_names, run.recipe.data.superclass])
    def compute():
        teacher = run.teacher()
        teacher.head = load_head(run.shared / "probe" / "head.pt", run.device)
        n_eval = len(split["val"]) + len(split["test"])
        eval_features = feats["caches"]["eval"].get(np.arange(n_eval)) if n_eval else None
        result = synth_stage(run.recipe, run.shared, teacher, split, run.device, eval_features=eval_features)
        rows = [int(i) for i in result["rows"]]
        write_json(run.shared / "synth" / "kept.json", {"items": result["items"], "rows": rows,
                                                         "cache": str(result["cache"].folder),
                                                         "report": result.get("report", {})})
        return {"kept": len(result["items"]), "report": result.get("report", {})}

    if distributed.is_main() and not is_complete(run.shared):  # images deleted since: make only those again
        run.stage_file("synth").unlink(missing_ok=True)
    run.stage("synth", key, compute if distributed.is_main() else dict)
    distributed.barrier()
    kept = read_json(run.shared / "synth" / "kept.json")
    meta = read_json(Path(kept["cache"]) / "meta.json")
    cache = FeatureCache(kept["cache"], read_json(Path(kept["cache"]) / "keys.json"), meta["views"], meta["dim"],
                         {k: v for k, v in meta.items() if k not in ("items", "views", "dim")})
    # Synthetic images feed only the distillation terms (P1), so their training label is -1.
    return {"items": [(p, -1) for p, _ in kept["items"]],
            "labels": [y for _, y in kept["items"]], "rows": kept["rows"], "cache": cache, "report": kept["report"]}


# ---------------------------------------------------------------------------------------------------------------
# Training stages


def student_spec(run: Run, feats: dict, backbone=None):
    """The student's preprocessing, cropped exactly as the teacher's views were (``view_crop``)."""
    spec = student_input_spec(run.recipe, backbone)
    spec.crop_pct = feats["crop_pct"]
    return spec


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


def distill(run: Run, split: dict, feats: dict, head, items: list, targets: TeacherTargets, n_real: int,
            folder: Path, key: str):
    """Train the recipe's student on ``items`` (real first, then synthetic) against the teacher; returns its log."""
    r = run.recipe
    text = head.text if r.eval.zero_shot and isinstance(head, ZeroShotHead) else None
    model = build_student(r, len(split["classes"]), feats["dim"], text)
    spec = student_spec(run, feats, model.backbone)
    online = r.train.teacher == "online"
    dataset = DistillSet(items, spec.to_dict(), feats["input"], r.data.augment, r.data.views, spec.crop_pct,
                         r.train.seed, online=online, n_real=n_real)
    sampler = GlobalBatchSampler(n_real, len(items) - n_real, r.train.batch_size, r.train.seed, r.train.real_fraction)
    rows = train(model, dataset, sampler, r.train, r.loss, folder, key, teacher=TeacherForTraining(run, head),
                 targets=targets, workers=r.data.num_workers, desc="distill", device=run.device, mixup=r.data.mixup,
                 cutmix=r.data.cutmix, num_classes=len(split["classes"]), evaluate=validation_hook(run, split, spec))
    return model, spec, rows


def training_items(run: Run, split: dict, views: RealViews | None, synth) -> tuple[list, TeacherTargets, int]:
    """What the student trains on: (items, their teacher features, how many are real); real images first."""
    items, targets = [], TeacherTargets()
    if run.recipe.data.real_train:
        items += [tuple(it) for it in split["train"]]
        targets.add(views, np.arange(len(split["train"])))
    n_real = len(items)
    if synth is not None:
        keep, _ = synth_split(run, synth)
        items += [synth["items"][i] for i in keep]
        targets.add(synth["cache"], [synth["rows"][i] for i in keep])
    return items, targets, n_real


def stage_distill(run: Run, split: dict, feats: dict, views, head, synth) -> dict:
    r = run.recipe
    key = fingerprint([run.keys["probe"], run.keys.get("views"), run.keys.get("synth"), to_plain(r.student),
                       to_plain(r.loss), to_plain(r.train), r.data.augment, r.data.views, r.data.mixup,
                       r.data.cutmix, r.data.image_size, r.data.crop_pct, r.data.real_train, r.eval.zero_shot,
                       r.eval.synthetic_holdout])
    folder = run.dir / "student"

    def compute():
        items, targets, n_real = training_items(run, split, views, synth)
        model, spec, rows = distill(run, split, feats, head, items, targets, n_real, folder, key)
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
        from .data.synth import generator_info

        return generator_info(recipe.synthetic)
    except (ImportError, AttributeError):
        return {"generator": recipe.synthetic.generator, "model_id": recipe.synthetic.model_id}


class TeacherForTraining:
    """What the training loop needs of the teacher: features (online) and the frozen head."""

    def __init__(self, run: Run, head):
        self.run, self.head = run, head.to(run.device)

    def encode(self, x):
        return self.run.teacher().encode(x)

    def logits(self, features):
        return self.head(features)

    def to(self, device):
        self.head.to(device)
        return self


def stage_baseline(run: Run, split: dict, feats: dict, synth) -> dict:
    """The same student trained on the real labelled images with cross-entropy only: what the teacher is worth.

    Equal budget: as many optimiser steps of as many images as the distilled student gets, also when synthetic
    images enlarge the distillation epoch (the real images are then repeated); the same views and augmentation.
    """
    r = run.recipe
    n_synth = len(synth_split(run, synth)[0]) if synth is not None else 0
    n_real = len(split["train"]) if r.data.real_train else 0
    budget = GlobalBatchSampler(n_real, n_synth, r.train.batch_size, r.train.seed, r.train.real_fraction).epoch_size()
    key = fingerprint([run.keys["features"], to_plain(r.student), to_plain(r.train), r.data.augment, r.data.views,
                       r.data.image_size, r.data.crop_pct, r.loss.label_smoothing, budget])
    folder = run.dir / "baseline"

    def compute():
        model = build_student(r, len(split["classes"]), 0, baseline=True)
        spec = student_spec(run, feats, model.backbone)
        items = [tuple(it) for it in split["train"]]
        dataset = DistillSet(items, spec.to_dict(), None, r.data.augment, r.data.views, spec.crop_pct,
                             r.train.seed, online=r.train.teacher == "online")
        sampler = GlobalBatchSampler(len(items), 0, r.train.batch_size, r.train.seed, epoch_size=budget)
        weights = dataclasses.replace(r.loss, ce=1.0, kd=0.0, hard_kd=0.0, feature_l2=0.0, align_uniform=0.0)
        rows = train(model, dataset, sampler, r.train, weights, folder, key, workers=r.data.num_workers,
                     desc="baseline", device=run.device, evaluate=validation_hook(run, split, spec))
        if distributed.is_main():
            save_student(folder / "model.pt", model.cpu(), r, split["classes"], spec, {"baseline": True})
        return {"epochs": len(rows), "last": rows[-1] if rows else {}}

    summary = run.stage("baseline", key, compute)
    return {"key": run.keys["baseline"], "folder": folder, "summary": summary}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and report


def stage_evaluate(run: Run, split: dict, feats: dict, head, student: dict, baseline: dict | None, synth) -> dict:
    from .students import load_student

    r = run.recipe
    key = fingerprint([student["key"], baseline and baseline["key"], run.keys["probe"], to_plain(r.eval)])
    path = run.dir / "stages" / "evaluate-metrics.json"  # the stage's own copy; RUN/metrics.json may combine seeds
    if distributed.is_main() and not path.exists():
        run.stage_file("evaluate").unlink(missing_ok=True)
    classes, test = split["classes"], split["test"]
    labels = torch.tensor([y for _, y in test])

    def compute():
        if not distributed.is_main():
            return {}
        tk = r.eval.top_k
        n_eval = len(split["val"])
        t_feat = feats["caches"]["eval"].get(np.arange(n_eval, n_eval + len(test)))
        t_logits = head(t_feat)
        metrics = {"recipe": r.name, "classes": classes, "n_test": len(test),
                   "teacher": {**classification_metrics(t_logits, labels, classes, tk), "gflops": feats["gflops"],
                               "params_m": feats["params_m"] + sum(p.numel() for p in head.parameters()) / 1e6,
                               **feats["info"]}}
        loaded = {}
        for name, stage in (("student", student), ("baseline", baseline)):
            if stage is None:
                continue
            model, blob = loaded[name] = load_student(run.dir, name)
            out = predict(model, test, blob["input"], blob["input"]["crop_pct"],
                          r.train.batch_size, run.device, r.data.num_workers, desc=f"evaluate {name}")
            logits = out["logits"]
            metrics[name] = {**classification_metrics(logits, labels, classes, tk),
                             "gflops": gflops(LogitsOnly(model), blob["input"]["size"]),
                             "params_m": sum(p.numel() for n, p in model.named_parameters()
                                             if not n.startswith("au_")) / 1e6,
                             "image_size": blob["input"]["size"], "model": r.student.name}
            metrics[name]["agreement_with_teacher"] = agreement(logits, t_logits)
            if name == "student" and "embedding" in out and out["embedding"].shape[1] == t_feat.shape[1]:
                metrics[name]["feature_cosine"] = torch.nn.functional.cosine_similarity(
                    out["embedding"], t_feat).mean().item()
        metrics["gflops_ratio"] = metrics["student"]["gflops"] / max(metrics["teacher"]["gflops"], 1e-12)
        if r.eval.corruptions:
            metrics["robustness"] = evaluate_robustness(run, test, head, *loaded["student"])
        metrics["gap"] = evaluate_gap(run, split, head, synth, metrics, *loaded["student"])
        if r.eval.spurious:
            metrics["spurious"] = evaluate_spurious(run, split, feats, head, student["key"])
        for name in ("teacher", "student", "baseline"):
            if name in metrics:
                plot_confusion(metrics[name]["confusion"], classes, run.dir / f"confusion-{name}.png",
                               f"{name}: top-1 {metrics[name]['top1']:.1f}%")
        write_json(path, metrics)
        return {"student_top1": metrics["student"]["top1"]}

    run.stage("evaluate", key, compute)
    distributed.barrier()
    return read_json(path)


def evaluate_robustness(run: Run, test: list, head, student, blob: dict) -> dict:
    """Common corruptions (P4 §7): teacher and student see the very same corrupted pixels; mPC and rPC per model."""
    from . import robustness
    from .data import view_image
    from .target.run import resize_normalize

    r = run.recipe
    names = {"default": robustness.DEFAULT_SUBSET, "all": robustness.ALL_CORRUPTIONS}.get(
        r.eval.corruptions[0], r.eval.corruptions) if len(r.eval.corruptions) == 1 else r.eval.corruptions
    for name in names:
        robustness.CORRUPTIONS.get(name)
    items = test[:: max(1, len(test) // max(1, r.eval.corruption_images))][: r.eval.corruption_images]
    labels = [y for _, y in items]
    teacher, sspec = run.teacher(), blob["input"]
    tspec = teacher.info.input.to_dict()
    crop = view_crop(run, tspec)
    # The un-augmented view once, at 224 px; corruptions act on what both models then resize.
    images = [view_image(path, "none", None, crop).resize((224, 224)) for path, _ in items]

    def predictor(fn, spec):
        def predict(batch):
            x = torch.from_numpy(np.stack([resize_normalize(im, spec) for im in batch])).to(run.device)
            with torch.no_grad():
                return fn(x).argmax(1).cpu().numpy()
        return predict

    models = {"teacher": predictor(lambda x: head.to(run.device)(teacher.encode(x)), tspec),
              "student": predictor(lambda x: student.to(run.device)(x)["logits"], sspec)}
    tables, clean = {}, {}
    for name, fn in models.items():
        clean[name] = float((fn(images) == np.asarray(labels)).mean())
        tables[name] = robustness.evaluate_corruptions(fn, images, labels, names, r.eval.severities,
                                                       seed=r.train.seed)
    summary = robustness.corruption_summary(tables, clean)
    markdown = (f"## Common corruptions\n\n{len(items)} held-out images, severities "
                f"{list(r.eval.severities)}; accuracy in %. mPC: mean over corruptions of the mean over severities; "
                f"rPC = mPC / clean.\n\n" + robustness.corruption_report(tables, clean))
    return {**summary, "images": len(items), "markdown": markdown}


def evaluate_gap(run: Run, split: dict, head, synth, metrics: dict, model, blob: dict) -> dict:
    """Synthetic-to-real gap (P4): held-out synthetic vs real test accuracy, and train vs test accuracy."""
    r = run.recipe

    def student_acc(items):
        out = predict(model, items, blob["input"], blob["input"]["crop_pct"], r.train.batch_size, run.device,
                      desc="evaluate gap")
        return 100.0 * (out["logits"].argmax(1) == torch.tensor([y for _, y in items])).float().mean().item()

    # Training accuracy on (up to 500 of) the images the student was trained on: real if any, else synthetic.
    train_pool = split["train"] if r.data.real_train else (synth["items"] if synth else [])
    labels = [y for _, y in split["train"]] if r.data.real_train else (synth["labels"] if synth else [])
    sample = [(p, y) for (p, _), y in list(zip(train_pool, labels))[:: max(1, len(train_pool) // 500)]]
    rows = {"real test": {"student": metrics["student"]["top1"], "teacher": metrics["teacher"]["top1"]}}
    if sample:
        rows["train (sample)"] = {"student": student_acc(sample)}
    _, held = synth_split(run, synth)
    if held:
        items = [(synth["items"][i][0], synth["labels"][i]) for i in held]
        t_logits = head(synth["cache"].get([synth["rows"][i] for i in held]))
        rows["synthetic held-out"] = {"student": student_acc(items), "teacher": 100.0 * (
            t_logits.argmax(1) == torch.tensor([y for _, y in items])).float().mean().item()}
    lines = ["## Synthetic-to-real gap", "", "Top-1 % on each set; a large train-test or synthetic-real difference "
             "means the student fits its training images (or the generator's style) more than the task.", "",
             "| images | student | teacher |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(v.get('student'))} | {fmt(v.get('teacher'))} |" for k, v in rows.items()]
    return {"rows": rows, "markdown": "\n".join(lines)}


def evaluate_spurious(run: Run, split: dict, feats: dict, head, distill_key: str) -> dict:
    """P4's spurious-feature probe: distil a second student on images whose class is also painted as a colour cue,
    then test teacher and student with the cue on the right class and on a shuffled one."""
    from . import robustness
    from .data import load_rgb

    r, K = run.recipe, len(split["classes"])
    folder = run.dir / "spurious"
    rng = np.random.default_rng(r.train.seed)
    test_labels = [y for _, y in split["test"]]
    sets = {"train": (split["train"], [y for _, y in split["train"]]), "cue": (split["test"], test_labels),
            "shuffled": (split["test"], list(robustness.shuffled_labels_for_cue(test_labels, rng)))}
    paths = {}
    for name, (items, cues) in sets.items():  # 1. cued copies, each named by what it depicts, written atomically
        paths[name] = []
        for (path, y), cue in zip(items, cues):
            out = folder / "images" / f"{fingerprint([path, int(cue), K, r.eval.spurious])}.png"
            if not out.exists():
                buf = io.BytesIO()
                robustness.add_cue(load_rgb(path), int(cue), K, kind=r.eval.spurious).save(buf, format="PNG")
                atomic_write_bytes(out, buf.getvalue())
            paths[name].append((str(out), y))
    # 2. Teacher features of the cued images (augmented views under the seed, as the student draws them), then a
    #    student distilled on the cued training images.
    teacher, crop = run.teacher(), feats["crop_pct"]
    caches = {}
    for name, items in paths.items():
        views = r.data.views if name == "train" else 1
        meta = {"teacher": teacher_key(r), "spurious": r.eval.spurious, "augment": r.data.augment, "crop_pct": crop,
                "seed": r.train.seed, "keys": fingerprint(items), "version": STAGE_VERSIONS["features"]}
        caches[name] = FeatureCache(folder / "cache" / name, [p for p, _ in items], views, teacher.feature_dim, meta)
        caches[name].fill(teacher, items, r.data.augment, crop, r.teacher.batch_size, device=run.device,
                          desc=f"teacher features (cued {name})", salt=r.train.seed)
    targets = TeacherTargets()
    targets.add(caches["train"], np.arange(len(paths["train"])))
    model, spec, _ = distill(run, split, feats, head, paths["train"], targets, len(paths["train"]),
                             folder / "student", fingerprint([distill_key, r.eval.spurious]))
    # 3. Accuracy with the cue on the true class and on a shuffled one.
    acc = {"cue": {}, "shuffled": {}}
    labels = torch.tensor(test_labels)
    for name in ("cue", "shuffled"):
        out = predict(model, paths[name], spec.to_dict(), spec.crop_pct, r.train.batch_size, run.device)
        acc[name]["student"] = (out["logits"].argmax(1) == labels).float().mean().item()
        t_logits = head(caches[name].get(np.arange(len(paths[name]))))
        acc[name]["teacher"] = (t_logits.argmax(1) == labels).float().mean().item()
    markdown = (f"## Spurious-feature probe ({r.eval.spurious})\n\nA student distilled on training images carrying a "
                "class-coloured cue, tested with the cue on the true class and on a shuffled one; the teacher is "
                "unchanged. Accuracy in %.\n\n" + robustness.spurious_report(acc["cue"], acc["shuffled"]))
    return {**robustness.spurious_summary(acc["cue"], acc["shuffled"]), "markdown": markdown}


def combine_seeds(run: Run, results: list[dict]) -> dict:
    """One metrics dict over seeds: every model's figures are means over seeds (per-class accuracy included), with
    Student-t intervals under ``seeds``; confusion matrices are summed over seeds."""
    from .stats import INTERVAL, aggregate_metrics

    models = [n for n in ("teacher", "student", "baseline") if n in results[0]]
    keep = [{n: {k: v for k, v in m[n].items() if k not in ("per_class", "confusion", "name", "arch", "weights",
                                                             "licence", "model")} for n in models} for m in results]
    metrics = dict(results[0])
    metrics["seeds"] = aggregate_metrics(keep)
    metrics["seeds"]["interval"] = INTERVAL
    metrics["n_seeds"] = len(results)
    for name in models:
        group = metrics["seeds"][name]
        merged = dict(results[0][name])
        for k, v in group.items():
            if isinstance(v, dict) and "mean" in v:
                merged[k] = v["mean"]
        merged["top1_ci95"] = group["top1"]["ci95"]
        classes = results[0][name]["per_class"]
        merged["per_class"] = {c: mean_or_none([m[name]["per_class"][c] for m in results]) for c in classes}
        merged["confusion"] = np.sum([m[name]["confusion"] for m in results], axis=0).tolist()
        metrics[name] = merged
    for extra in ("robustness", "gap", "spurious"):  # per-seed suites: seed 0's tables, labelled as such
        if isinstance(metrics.get(extra), dict) and "markdown" in metrics[extra]:
            title, _, rest = metrics[extra]["markdown"].partition("\n")
            metrics[extra] = {**metrics[extra], "seed": 0, "markdown": f"{title} (seed 0)\n{rest}"}
    if all("robustness" in m for m in results):
        metrics["seeds"]["robustness"] = aggregate_metrics(
            [{n: {k: m["robustness"][n][k] for k in ("mpc", "rpc")} for n in ("teacher", "student")} for m in results])
    return metrics


def mean_or_none(values: list):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt(v, digits=1):
    return "–" if v is None else f"{v:.{digits}f}"


def summary_rows(metrics: dict) -> list[tuple]:
    rows = []
    for name in ("teacher", "student", "baseline"):
        m = metrics.get(name)
        if m:
            top5 = next((v for k, v in m.items() if k.startswith("top") and k != "top1" and k[3:].isdigit()), None)
            ci = f" ± {m['top1_ci95']:.1f}" if "top1_ci95" in m else ""
            rows.append((name, f"{fmt(m['top1'])}{ci}", fmt(top5), fmt(m.get("gflops"), 3), fmt(m.get("params_m"), 2),
                         fmt(m.get("agreement_with_teacher"))))
    return rows


def print_summary(out: Path, metrics: dict):
    header = ("model", "top-1 %", "top-5 %", "GFLOPs", "params M", "agree %")
    rows = [header] + summary_rows(metrics)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    print()
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"\nRun folder: {out}  (metrics.json, report.md)")


def write_report(run: Run, metrics: dict, split: dict):
    r = run.recipe
    lines = [f"# {r.name}", "", r.description, "",
             f"Teacher `{r.teacher.name}` ({metrics['teacher'].get('arch', '')}, "
             f"{metrics['teacher'].get('weights', '')})"
             f" → student `{r.student.name}`; {len(split['classes'])} classes. Every accuracy is on the "
             f"{metrics['n_test']} images of the held-out test split unless its table says otherwise.",
             "", "| model | top-1 % | top-5 % | GFLOPs/img | params (M) | agreement with teacher % |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(metrics)]
    lines += ["", f"Student GFLOPs are {100 * metrics['gflops_ratio']:.0f}% of the teacher's.", ""]
    if "seeds" in metrics:
        lines += ["## Seeds", "", f"{metrics['n_seeds']} seeds; every figure above is the mean over seeds, confusion "
                  f"matrices are summed over seeds. ± is the {metrics['seeds']['interval']}.", "",
                  "| model | metric | mean | ± t-interval 95% | values |", "|---|---|---|---|---|"]
        for name, group in metrics["seeds"].items():
            if not isinstance(group, dict):
                continue
            rows = [(f"{name}", m, v) for m, v in group.items()]
            rows += [(f"{name} {m}", k, x) for m, v in group.items() if isinstance(v, dict) and "mean" not in v
                     for k, x in v.items()]  # e.g. robustness -> student -> mpc
            for label, metric, s in rows:
                if isinstance(s, dict) and "mean" in s:
                    lines.append(f"| {label} | {metric} | {s['mean']:.2f} | {s['ci95']:.2f} | "
                                 f"{', '.join(f'{v:.2f}' for v in s['values'])} |")
        lines.append("")
    lines += ["## Per-class top-1 %", "", "| class | " + " | ".join(n for n in ("teacher", "student", "baseline")
                                                                     if n in metrics) + " |",
              "|---|" + "---|" * sum(n in metrics for n in ("teacher", "student", "baseline"))]
    for c in split["classes"]:
        vals = [fmt(metrics[n]["per_class"].get(c)) for n in ("teacher", "student", "baseline")
                if n in metrics and "per_class" in metrics[n]]
        lines.append(f"| {c} | " + " | ".join(vals) + " |")
    lines += ["", "## Confusion matrices" + (" (summed over seeds)" if "seeds" in metrics else ""), ""]
    if "seeds" in metrics:
        for n in ("teacher", "student", "baseline"):
            if n in metrics:
                plot_confusion(metrics[n]["confusion"], split["classes"], run.dir / f"confusion-{n}.png",
                               f"{n}: top-1 {metrics[n]['top1']:.1f}% (mean of {metrics['n_seeds']} seeds)")
    lines += [f"![{n}](confusion-{n}.png)" for n in ("teacher", "student", "baseline") if n in metrics]
    for extra in ("robustness", "synthetic", "spurious", "gap"):
        if extra in metrics and isinstance(metrics[extra], dict) and "markdown" in metrics[extra]:
            lines += ["", metrics[extra]["markdown"]]
    timings = metrics.get("timings", {})
    lines += ["", "## Stages", "", "Seconds each stage took when it was computed; a stage this call reused keeps "
              "its time.", "", "| stage | seconds | this call |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {'reused' if k in timings.get('reused', []) else 'computed'} |"
              for k, v in timings.get("stages_seconds", {}).items()]
    lines += [f"| total | {timings.get('total_seconds', 0)} | {timings.get('this_run_seconds', 0)} s |"]
    if split.get("skipped"):
        lines += ["", f"{len(split['skipped'])} unreadable images were skipped; see split.json."]
    atomic_write_text(run.dir / "report.md", "\n".join(lines) + "\n")


def load_run_recipe(run_dir) -> Recipe:
    import yaml

    from .recipe import build

    return build(Recipe, yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()), "")


def load_run_teacher(run_dir, device: str = "cpu") -> Teacher:
    """The teacher of a finished run with its head attached (raises WeightsUnavailable when weights are absent)."""
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir)
    teacher = build_teacher(recipe.teacher).to(device)
    # A seed's folder (RUN/seed-k) or a sweep point (SWEEP/points/p) finds the head in the shared folder above.
    head = next((d / "probe" / "head.pt" for d in (run_dir, run_dir.parent, run_dir.parent.parent)
                 if (d / "probe" / "head.pt").exists()), run_dir / "probe" / "head.pt")
    teacher.head = load_head(head, device)
    teacher.class_names = read_json(run_dir / "split.json")["classes"]
    return teacher
