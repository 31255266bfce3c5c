"""Synthetic training images: text-to-image (P2, P4) or variations and mixes of real images (P1), as a dataset.

The artifact is ``RUN/synth/images/<class>/<index>-<hash>.png`` plus ``RUN/synth/manifest.jsonl``, one row per
image (class, prompt, negative prompt, seed, generator, steps, guidance, size, sha256, ...). Everything about an
image derives from (class, index): its seed, its prompt or source images, and the fixed batch ("chunk") it is
generated in. So a re-run makes only the missing images, byte-identical to the lost ones, and shards
(``--shard i/n`` or torchrun ranks) split the chunks with no overlap, their union equal to one process's output.

This module plans, shards and runs generation and writes the manifest; ``generators.py`` knows the generators and
draws one batch; ``curate.py`` scores the images with the teacher and keeps the good ones.
"""
import io
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..utils import atomic_write_bytes, atomic_write_text, derived_seed, fingerprint, sha256_file, write_json
from .generators import (GENERATOR_TABLE, GENERATORS, GeneratorEntry, HalvingBatcher, Settings, draw, load_pipeline,
                         resolve_dtype, resolve_settings)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# 1. Validation (before anything is loaded)


def check_synth(recipe, split: dict | None = None):
    """Settings a recipe's YAML types cannot catch; raises RecipeError naming the key."""
    from ..recipe import RecipeError

    cfg = recipe.synthetic
    entry = GENERATORS.get(cfg.generator)
    if (cfg.images_per_class > 0) == (cfg.times_train > 0):
        raise RecipeError("Set exactly one of 'synthetic.images_per_class' (e.g. 265, P4) and "
                          "'synthetic.times_train' (e.g. 10 for 10x the real train set, P1)")
    if cfg.mix and entry.kind != "image":
        image_gens = [s.name for s in GENERATOR_TABLE if s.kind == "image"]
        raise RecipeError(f"Recipe key 'synthetic.mix' is {cfg.mix!r}, but generator {cfg.generator!r} makes images "
                          f"from text; mixing real images needs one of {image_gens}")
    if cfg.batch_size < 1 or cfg.size % 8 or cfg.steps < 0:
        raise RecipeError("Recipe keys 'synthetic.batch_size' (>= 1), 'synthetic.size' (a multiple of 8) and "
                          "'synthetic.steps' (>= 0) are out of range")
    for key in ("curate_min_score", "curate_dedup", "curate_leakage"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise RecipeError(f"Recipe key 'synthetic.{key}' must be in [0, 1], got {getattr(cfg, key)}")
    check_prompts(cfg, RecipeError)
    if entry.kind == "image" and (cfg.dimensions or cfg.prompt_weights):
        log.warning("Generator %r is conditioned on real images: synthetic.dimensions and weights are ignored",
                    cfg.generator)
    if split is not None and entry.kind == "image" and not split["train"]:
        raise RecipeError(f"Generator {cfg.generator!r} varies or mixes real images, but the train split is empty")
    if split is not None and cfg.times_train > 0 and not split["train"]:
        raise RecipeError("'synthetic.times_train' sizes the set from the real train split, which is empty")


def check_prompts(cfg, error):
    if not cfg.templates:
        raise error("Recipe key 'synthetic.templates' is empty; e.g. ['a photo of a {c}']")
    for t in cfg.templates:
        try:
            t.format(c="x", superclass="y")
        except (KeyError, IndexError, ValueError) as e:
            raise error(f"Template {t!r} in 'synthetic.templates' may use only {{c}} and {{superclass}} ({e})") from e
    for dim, options in cfg.dimensions.items():
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise error(f"'synthetic.dimensions.{dim}' must be a list of strings (or [] for the LLM to fill)")
        if not options and not cfg.llm:
            raise error(f"'synthetic.dimensions.{dim}' is empty and no 'synthetic.llm' is set to fill it")
    known = ["class", "superclass", *cfg.dimensions]
    for key in cfg.prompt_weights:
        if key not in known:
            from difflib import get_close_matches

            close = get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise error(f"'synthetic.prompt_weights' names {key!r}, which is no prompt term.{hint} Terms: {known}")


# ---------------------------------------------------------------------------------------------------------------
# 2. Planning: every image's prompt or sources and seed, from (class, index) alone


@dataclass(frozen=True)
class Job:
    group: str                # class name, or "inter" for inter-class mixes
    label: int                # class index (inter mixes: the first source's class)
    index: int
    seed: int
    prompt: str = ""
    sources: tuple = ()       # real images whose CLIP embeddings condition the generator
    source_labels: tuple = ()

    def file(self, s: Settings) -> str:
        h = fingerprint([asdict(self), s.generator, s.model_id, s.lora_id, s.steps, s.guidance, s.size,
                         s.negative_prompt])[:10]
        folder = "inter" if self.group == "inter" else f"{self.label:03d}-{slug(self.group)}"
        return f"images/{folder}/{self.index:05d}-{h}.png"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40] or "class"


def plan(recipe, split: dict, dimensions: dict) -> list[Job]:
    """All images of the dataset in a fixed order: by class, then index."""
    cfg = recipe.synthetic
    entry = GENERATORS.get(cfg.generator)
    classes = split["classes"]
    if entry.kind == "text":
        prompts = ClassPrompts(cfg, recipe.data, dimensions)
        return [Job(c, y, i, derived_seed(cfg.seed, "synth", c, i), prompts.prompt(c, i), (), (y,))
                for y, c in enumerate(classes) for i in range(class_count(cfg, split, y))]
    by_class = {y: [p for p, lab in split["train"] if lab == y] for y in range(len(classes))}
    if cfg.mix == "inter":
        n = cfg.images_per_class * len(classes) or round(cfg.times_train * len(split["train"]))
        return [_inter_job(cfg, split["train"], i) for i in range(n)]
    return [_class_job(cfg, c, y, by_class[y], i) for y, c in enumerate(classes) if by_class[y]
            for i in range(class_count(cfg, split, y))]


def class_count(cfg, split: dict, label: int) -> int:
    if cfg.images_per_class > 0:
        return cfg.images_per_class
    return round(cfg.times_train * sum(1 for _, y in split["train"] if y == label))


def _inter_job(cfg, train: list, i: int) -> Job:
    """P1's inter-class mix: a random pair of train images regardless of class."""
    rng = np.random.default_rng(derived_seed(cfg.seed, "pair", "inter", i))
    a, b = rng.choice(len(train), size=2, replace=len(train) < 2)
    (pa, ya), (pb, yb) = train[a], train[b]
    return Job("inter", int(ya), i, derived_seed(cfg.seed, "synth", "inter", i), "", (str(pa), str(pb)),
               (int(ya), int(yb)))


def _class_job(cfg, c: str, y: int, pool: list, i: int) -> Job:
    """An intra-class pair (P1's D_sd-intra), or a variation of one image, cycling through the class's images."""
    seed = derived_seed(cfg.seed, "synth", c, i)
    if cfg.mix == "intra":
        rng = np.random.default_rng(derived_seed(cfg.seed, "pair", c, i))
        sources = tuple(str(pool[k]) for k in rng.choice(len(pool), size=2, replace=len(pool) < 2))
    else:
        sources = (str(pool[i % len(pool)]),)
    return Job(c, y, i, seed, "", sources, (y,) * len(sources))


class ClassPrompts:
    """One prompt plan (one covering array) shared by every class; the class fills the template."""

    def __init__(self, cfg, data, dimensions: dict):
        from .prompts import PromptPlan

        self.names = data.prompt_names
        self.plan = PromptPlan(cfg.templates, dimensions, cfg.prompt_weights, data.superclass, cfg.seed)
        n = cfg.images_per_class
        if dimensions and n and n < len(self.plan):
            log.warning("synthetic.images_per_class=%d is below the %d prompts that cover every pair of dimension "
                        "options; some pairs will be missing", n, len(self.plan))

    def prompt(self, c: str, i: int) -> str:
        return self.plan.prompt(self.names.get(c) or c.replace("_", " "), i)


def resolve_dimensions(cfg, superclass: str, synth_dir: Path, generate=None) -> dict:
    """The recipe's dimension options; empty ones are asked of the local LLM once and kept in options.json."""
    missing = [d for d, opts in cfg.dimensions.items() if not opts]
    if not missing:
        return dict(cfg.dimensions)
    path, key = synth_dir / "options.json", fingerprint([cfg.llm, superclass, cfg.llm_options, missing])
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("key") != key:
        from .prompts import llm_options, local_llm

        generate = generate or local_llm(cfg.llm)
        saved = {"key": key, "llm": cfg.llm,
                 "options": {d: llm_options(generate, d, superclass, cfg.llm_options) for d in missing}}
        write_json(path, saved)
    return {d: opts or saved["options"][d] for d, opts in cfg.dimensions.items()}


# ---------------------------------------------------------------------------------------------------------------
# 3. Chunks and shards


def chunks(jobs: list[Job], batch: int) -> list[list[Job]]:
    """Fixed batches within each class, so an image's batch (and its exact pixels) never depends on the run."""
    out, current = [], []
    for job in jobs:
        if current and (len(current) == batch or current[0].group != job.group):
            out.append(current)
            current = []
        current.append(job)
    return out + ([current] if current else [])


def parse_shard(shard) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if shard is None:
        return 0, 1
    if isinstance(shard, tuple):
        return shard
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard must look like i/n with 0 <= i < n (e.g. 0/4), got {shard!r}")
    return int(m.group(1)), int(m.group(2))


def my_chunks(all_chunks: list, shard: tuple[int, int]) -> list:
    """Round-robin: chunk k belongs to shard k mod n, which spreads every class over every shard."""
    i, n = shard
    return all_chunks[i::n]


# ---------------------------------------------------------------------------------------------------------------
# 4. Generation and the manifest


def generate(recipe, synth_dir, split: dict, device: str = "cpu", shard=None, ranks: bool = False,
             generate_text=None) -> list | None:
    """Make this shard's missing images; return the full manifest rows once every image exists, else None.

    With ``ranks`` every torchrun rank calls this and they split the work further (shard i/n on rank r of w is
    shard i*w + r of n*w); without it the caller alone does its shard.
    """
    from .. import distributed

    check_synth(recipe, split)
    synth_dir = Path(synth_dir)
    cfg, entry, s = recipe.synthetic, GENERATORS.get(recipe.synthetic.generator), resolve_settings(recipe.synthetic)
    (i, n), (rank, size) = parse_shard(shard), distributed.world() if ranks else (0, 1)
    barrier = distributed.barrier if ranks else (lambda: None)
    dims = resolve_dimensions(cfg, recipe.data.superclass, synth_dir, generate_text) if rank == 0 else None
    barrier()
    jobs = plan(recipe, split, dims if rank == 0 else resolve_dimensions(cfg, recipe.data.superclass, synth_dir))
    todo = [c for c in my_chunks(chunks(jobs, cfg.batch_size), (i * size + rank, n * size))
            if any(not (synth_dir / j.file(s)).exists() for j in c)]
    made, seconds = make_images(cfg, entry, s, todo, synth_dir, device) if todo else (0, 0.0)
    log_cost(synth_dir, s, (i * size + rank, n * size), device, str(resolve_dtype(cfg.dtype, device)), made, seconds)
    barrier()
    complete = all((synth_dir / j.file(s)).exists() for j in jobs)
    if complete and rank == 0:
        write_manifest(synth_dir / "manifest.jsonl", [manifest_row(j, s, synth_dir) for j in jobs])
    barrier()
    if not complete:
        log.info("Shard %d/%d done; run the remaining shards to complete %s", i, n, synth_dir)
        return None
    return read_manifest(synth_dir / "manifest.jsonl")


def make_images(cfg, entry: GeneratorEntry, s: Settings, todo: list, synth_dir: Path, device: str) -> tuple[int, float]:
    """Generate every chunk in ``todo`` and write its missing images; returns (images written, seconds)."""
    from tqdm import tqdm

    pipe = load_pipeline(cfg, device)
    batcher = HalvingBatcher(lambda jobs: draw(pipe, entry, s, jobs), cfg.batch_size)
    made, start = 0, time.perf_counter()
    for chunk in tqdm(todo, desc=f"synth {s.generator}", unit="batch", leave=False):
        for job, image in zip(chunk, batcher(chunk)):
            path = synth_dir / job.file(s)
            if not path.exists():  # a chunk regenerated for one lost image rewrites only that image
                atomic_write_bytes(path, png_bytes(image))
                made += 1
    return made, time.perf_counter() - start


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def manifest_row(job: Job, s: Settings, synth_dir: Path) -> dict:
    entry = GENERATORS.get(s.generator)
    return {"file": job.file(s), "class": job.group, "label": job.label,
            "index": job.index, "prompt": job.prompt, "negative_prompt": s.negative_prompt, "seed": job.seed,
            "sources": list(job.sources), "source_labels": list(job.source_labels), "generator": s.generator,
            "model_id": s.model_id, "lora_id": s.lora_id, "scheduler": entry.scheduler or "default",
            "steps": s.steps, "guidance": s.guidance, "size": s.size, "batch_size": s.batch_size,
            "licence": entry.licence, "sha256": sha256_file(synth_dir / job.file(s))}


def is_complete(run_dir) -> bool:
    """Whether RUN/synth holds a manifest and every image it lists (a pipeline can re-run the stage if not)."""
    path = Path(run_dir) / "synth" / "manifest.jsonl"
    return path.exists() and all((path.parent / r["file"]).exists() for r in read_manifest(path))


def write_manifest(path: Path, rows: list[dict]):
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_manifest(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def log_cost(synth_dir: Path, s: Settings, shard, device, dtype, made: int, seconds: float):
    """Generation cost, one line per process (P1/P2 report generation hours)."""
    if not made:
        return
    import torch

    line = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "shard": f"{shard[0]}/{shard[1]}", "generator": s.generator,
            "device": torch.cuda.get_device_name(device) if str(device).startswith("cuda") else "cpu",
            "dtype": dtype, "images": made, "seconds": round(seconds, 2),
            "images_per_s": round(made / max(seconds, 1e-9), 3)}
    synth_dir.mkdir(parents=True, exist_ok=True)
    with open(synth_dir / "cost.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    log.info("Generated %d images in %.1f s (%.2f images/s) with %s", made, seconds, made / max(seconds, 1e-9),
             s.generator)


# ---------------------------------------------------------------------------------------------------------------
# 5. `edgedistill synth`


def run_synth(recipe, out=None, shard=None) -> list | None:
    """Generate a recipe's synthetic images (this shard's share) into OUT/synth; curation runs in ``recipe run``."""
    from ..distributed import init_from_env, pick_device
    from . import make_split

    if recipe.synthetic is None:
        from ..recipe import RecipeError

        raise RecipeError(f"Recipe {recipe.name!r} has no 'synthetic' section")
    run_dir = Path(out or f"runs/{recipe.name}")
    device = pick_device(recipe.train.device)
    init_from_env(device)
    split = make_split(recipe.data)
    rows = generate(recipe, run_dir / "synth", split, device, shard, ranks=True)
    if rows is not None:
        print(f"{len(rows)} synthetic images in {run_dir / 'synth'}; manifest: {run_dir / 'synth' / 'manifest.jsonl'}")
    return rows
