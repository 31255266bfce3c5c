"""A run folder and its stage cache: each stage is keyed by a fingerprint of everything it depends on.

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
    RUN/seed-<k>/            with --seeds N: each seed's training stages (stages/evaluate-metrics.json: its figures)

A finished stage whose fingerprint matches is reused; a changed setting reruns that stage and what follows it.
"""
import dataclasses
import logging
import time
from pathlib import Path

from . import distributed
from .recipe import Recipe, dump_recipe
from .teachers import Teacher, build_teacher, load_head
from .utils import atomic_write_text, fingerprint, read_json, write_json

log = logging.getLogger(__name__)
# Part of every stage's key: bump a stage's number when a fix changes what it computes from the same inputs, so a
# run folder made by older code is recomputed rather than silently reused.
STAGE_VERSIONS = {"split": 3, "finetune": 1, "features": 3, "views": 3, "probe": 4, "synth": 2, "distill": 6,
                  "baseline": 6,
                  "evaluate": 4, "export": 2, "bench": 2}
SHARED_STAGES = ("split", "finetune", "features", "probe", "synth")  # independent of the student and of the seed


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
        self.pretrained_backbone = None  # the student's hub-weights backbone, when fetched up front
        self.teacher_file: Path | None = None  # the fine-tuned teacher's state dict (teacher.mode: finetune)
        self.student_init: dict | None = None  # student.init_from: {"from", "path", "sha256", ...} (use_student_init)
        self.feature_runtime = None  # (teacher as the feature stages run it, record), chosen once per process
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

    def student_backbone(self):
        """A fresh copy of the up-front backbone (a stage trains it), or None: build one from the recipe."""
        import copy

        return copy.deepcopy(self.pretrained_backbone) if self.pretrained_backbone is not None else None

    def teacher(self) -> Teacher:
        """The recipe's teacher, with its fine-tuned weights once the finetune stage has made them."""
        if self._teacher is None:
            self._teacher = build_teacher(self.recipe.teacher)
            if self.teacher_file is not None:
                load_teacher_weights(self._teacher, self.teacher_file)
            self._teacher.to(self.device)
        return self._teacher

    def use_teacher_weights(self, path: Path):
        """From now on the teacher carries the fine-tuned weights in ``path``."""
        self.teacher_file, self._teacher, self.feature_runtime = Path(path), None, None

    def use_student_init(self, source: str, path: Path):
        """The training stages start their student from the trained student in ``path`` (``student.init_from`` is
        ``source``); its sha256 joins their keys, so a changed earlier student trains this one again."""
        from .local_weights import describe

        record = describe(path)
        self.student_init = {"from": source, "path": record["path"], "sha256": record["sha256"],
                             "bytes": record["bytes"]}

    @property
    def init_file(self) -> Path | None:
        """The model.pt the student starts from (``student.init_from``), or None."""
        return Path(self.student_init["path"]) if self.student_init else None

    def init_key(self) -> list:
        """What the training stages add to their key: the sha256 of the student they start from; nothing without
        ``student.init_from``, so every other run keeps the keys it had."""
        return [self.student_init["sha256"]] if self.student_init else []

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


def with_seed(run: Run, k: int) -> Run:
    train = dataclasses.replace(run.recipe.train, seed=run.recipe.train.seed + k)
    recipe = dataclasses.replace(run.recipe, train=train)
    seeded = Run(run.dir / f"seed-{k}", recipe, run.shared)
    seeded._teacher, seeded.keys, seeded.timings = run._teacher, dict(run.keys), dict(run.timings)
    seeded.reused, seeded.device, seeded.pretrained_backbone = list(run.reused), run.device, run.pretrained_backbone
    seeded.teacher_file, seeded.feature_runtime = run.teacher_file, run.feature_runtime
    seeded.student_init = run.student_init
    if distributed.is_main():  # export, demo and bench read a seed's folder like any run folder
        seeded.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(seeded.dir / "recipe.yaml", dump_recipe(recipe))
        if (run.shared / "split.json").exists():
            write_json(seeded.dir / "split.json", read_json(run.shared / "split.json"))
    return seeded


def load_run_recipe(run_dir) -> Recipe:
    import yaml

    from .recipe import build

    return build(Recipe, yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()), "")


def load_run_teacher(run_dir, device: str = "cpu") -> Teacher:
    """The teacher of a finished run with its head attached (raises WeightsUnavailable when weights are absent)."""
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir)
    teacher = build_teacher(recipe.teacher)
    tuned = shared_file(run_dir, "teacher/model.pt")
    if recipe.teacher.mode == "finetune":
        if not tuned.exists():
            raise FileNotFoundError(f"{run_dir} has no fine-tuned teacher (teacher/model.pt): finish the run first")
        load_teacher_weights(teacher, tuned)
    teacher.to(device)
    head = shared_file(run_dir, "probe/head.pt")
    teacher.head = load_head(head, device)
    teacher.class_names = read_json(run_dir / "split.json")["classes"]
    return teacher


def shared_file(run_dir: Path, relative: str) -> Path:
    """``run_dir/relative``, or where a seed's folder (RUN/seed-k) or a sweep point (SWEEP/points/p) finds it: in the
    shared folder above. The run folder's own path when none exists."""
    return next((d / relative for d in (run_dir, run_dir.parent, run_dir.parent.parent) if (d / relative).exists()),
                run_dir / relative)


def load_teacher_weights(teacher: Teacher, path):
    """A fine-tuned teacher's encoder weights: tensors only (``weights_only=True``), never pickled code."""
    import torch

    teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()
