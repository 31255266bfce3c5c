"""Synthetic training images: text-to-image (P2, P4) or variations and mixes of real images (P1), as a dataset.

The artifact is ``RUN/synth/images/<class>/<index>-<hash>.png`` plus ``RUN/synth/manifest.jsonl``, one row per
image (class, prompt, negative prompt, seed, generator, steps, guidance, size, sha256, ...). Everything about an
image derives from (class, index): its seed, its prompt or source images, and the fixed batch ("chunk") it is
generated in. So a re-run makes only the missing images, byte-identical to the lost ones, and shards
(``--shard i/n`` or torchrun ranks) split the chunks with no overlap, their union equal to one process's output.

``synth_stage`` then runs the teacher once over the kept images (into a ``FeatureCache``) and curates them
(``curate.py``). Heavy libraries (diffusers, transformers) are imported only when a pipeline is built.
"""
import io
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..registry import Registry
from ..utils import atomic_write_bytes, atomic_write_text, derived_seed, fingerprint, require, sha256_file, write_json
from . import tiny_sd

log = logging.getLogger(__name__)
GENERATORS = Registry("generator")


@dataclass(frozen=True)
class GeneratorSpec:
    """One row of the generator table: what the generator is and its default settings."""

    name: str
    kind: str                 # text: prompts -> images; image: CLIP image embeddings of real images -> images
    family: str               # sd | sdxl: which text encoders condition the UNet
    model_id: str
    steps: int
    guidance: float
    size: int
    licence: str
    lora_id: str = ""         # LoRA fused into the UNet (LCM-LoRA)
    scheduler: str = ""       # lcm: swap in LCMScheduler; "": the model's own
    revision: str = ""
    build: Callable | None = None  # builds the pipeline in code (tiny random models); None: from_pretrained


_SD15, _SDXL = "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"
_OPENRAIL, _OPENRAILPP = "CreativeML OpenRAIL-M", "CreativeML OpenRAIL++-M"
_STABILITY = "Stability AI Community License (non-commercial research; commercial use needs registration)"
GENERATOR_TABLE = [
    GeneratorSpec("sd14", "text", "sd", "CompVis/stable-diffusion-v1-4", 50, 7.5, 512, _OPENRAIL),  # P2
    GeneratorSpec("sd15", "text", "sd", _SD15, 50, 7.5, 512, _OPENRAIL),
    GeneratorSpec("sd21", "text", "sd", "stabilityai/stable-diffusion-2-1", 50, 7.5, 768, _OPENRAILPP),
    GeneratorSpec("sdxl", "text", "sdxl", _SDXL, 50, 5.0, 1024, _OPENRAILPP),
    GeneratorSpec("sd-turbo", "text", "sd", "stabilityai/sd-turbo", 1, 0.0, 512, _STABILITY),
    GeneratorSpec("sdxl-turbo", "text", "sdxl", "stabilityai/sdxl-turbo", 1, 0.0, 512, _STABILITY),
    GeneratorSpec("sdxl-lcm", "text", "sdxl", _SDXL, 6, 0.5, 1024, _OPENRAILPP,  # P4's generator
                  lora_id="latent-consistency/lcm-lora-sdxl", scheduler="lcm"),
    GeneratorSpec("sd15-lcm", "text", "sd", _SD15, 6, 0.5, 512, _OPENRAIL,  # P4 Table 18
                  lora_id="latent-consistency/lcm-lora-sdv1-5", scheduler="lcm"),
    GeneratorSpec("sd-variations", "image", "sd", "lambdalabs/sd-image-variations-diffusers", 50, 3.0, 512,
                  _OPENRAIL, revision="v2.0"),  # P1: ImageVariations; mix pairs read as ImageMixer does
    GeneratorSpec("tiny-sd", "text", "sd", "", 4, 0.5, 32, "none (random weights)", scheduler="lcm",
                  build=tiny_sd.text_pipeline),
    GeneratorSpec("tiny-sdxl", "text", "sdxl", "", 4, 0.5, 32, "none (random weights)", scheduler="lcm",
                  build=tiny_sd.sdxl_pipeline),
    GeneratorSpec("tiny-sd-variations", "image", "sd", "", 4, 2.0, 32, "none (random weights)",
                  build=tiny_sd.variation_pipeline),
]
for _spec in GENERATOR_TABLE:
    GENERATORS.register(_spec.name)(_spec)


@dataclass(frozen=True)
class Settings:
    """A recipe's synthetic section resolved against its generator's defaults."""

    generator: str
    model_id: str
    lora_id: str
    steps: int
    guidance: float
    size: int
    negative_prompt: str
    batch_size: int


def resolve_settings(cfg) -> Settings:
    spec = GENERATORS.get(cfg.generator)
    guidance = cfg.guidance if cfg.guidance >= 0 else spec.guidance
    negative = cfg.negative_prompt if guidance > 1 and spec.kind == "text" else ""  # without CFG it does nothing
    return Settings(cfg.generator, cfg.model_id or spec.model_id, cfg.lora_id or spec.lora_id,
                    cfg.steps or spec.steps, guidance, cfg.size or spec.size, negative, cfg.batch_size)


def generator_info(cfg) -> dict:
    """What made the synthetic images, for the student's model card (licences carry forward)."""
    spec, s = GENERATORS.get(cfg.generator), resolve_settings(cfg)
    return {"generator": s.generator, "kind": spec.kind, "model_id": s.model_id, "lora_id": s.lora_id,
            "steps": s.steps, "guidance": s.guidance, "size": s.size, "mix": cfg.mix, "licence": spec.licence}


# ---------------------------------------------------------------------------------------------------------------
# 1. Validation (before anything is loaded)


def check_synth(recipe, split: dict | None = None):
    """Settings a recipe's YAML types cannot catch; raises RecipeError naming the key."""
    from ..recipe import RecipeError

    cfg = recipe.synthetic
    spec = GENERATORS.get(cfg.generator)
    if (cfg.images_per_class > 0) == (cfg.times_train > 0):
        raise RecipeError("Set exactly one of 'synthetic.images_per_class' (e.g. 265, P4) and "
                          "'synthetic.times_train' (e.g. 10 for 10x the real train set, P1)")
    if cfg.mix and spec.kind != "image":
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
    if spec.kind == "image" and (cfg.dimensions or cfg.weights):
        log.warning("Generator %r is conditioned on real images: synthetic.dimensions and weights are ignored",
                    cfg.generator)
    if split is not None and spec.kind == "image" and not split["train"]:
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
    for key in cfg.weights:
        if key not in known:
            from difflib import get_close_matches

            close = get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise error(f"'synthetic.weights' names {key!r}, which is no prompt term.{hint} Terms: {known}")


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
    spec = GENERATORS.get(cfg.generator)
    classes = split["classes"]
    if spec.kind == "text":
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
        self.plan = PromptPlan(cfg.templates, dimensions, cfg.weights, data.superclass, cfg.seed)
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
# 4. Pipelines


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_pipeline(cfg, device: str):
    """The diffusers pipeline for a recipe, configured for speed (dtype, SDPA, VAE slicing, optional compile)."""
    import torch

    spec, s = GENERATORS.get(cfg.generator), resolve_settings(cfg)
    dtype = resolve_dtype(cfg.dtype, device)
    pipe = spec.build() if spec.build else pretrained_pipeline(spec, s, dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if pipe.unet.dtype != dtype:  # tiny pipelines are built in float32
        pipe.to(dtype=dtype)
    # diffusers' attention already uses torch's scaled_dot_product_attention (AttnProcessor2_0) under torch 2
    if cfg.vae_slicing:
        pipe.vae.enable_slicing()
    if cfg.compile:
        pipe.unet = torch.compile(pipe.unet)
    return pipe


def pretrained_pipeline(spec: GeneratorSpec, s: Settings, dtype):
    """Weights from the Hugging Face hub (or its cache). The safety checker is off: it blanks training images."""
    from ..teachers import WeightsUnavailable

    diffusers = require("diffusers", "synth")
    try:
        pipe = _from_pretrained(diffusers, spec, s, dtype)
        if s.lora_id:
            require("peft", "synth")  # diffusers loads LoRAs through peft
            pipe.load_lora_weights(s.lora_id)
            pipe.fuse_lora()
    except ImportError:
        raise
    except Exception as e:  # hub and file errors come in many types; the user needs one sentence
        first = str(e).splitlines()[0][:200] if str(e) else ""
        weights = f"{s.model_id!r}" + (f" and the LoRA {s.lora_id!r}" if s.lora_id else "")
        raise WeightsUnavailable(
            f"Generator {spec.name!r} needs the diffusers weights {weights}: they download on first use with "
            f"internet and are cached under ~/.cache/huggingface/hub (HF_HOME); loading failed with: "
            f"{type(e).__name__}: {first}") from e
    if spec.scheduler == "lcm":
        pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _from_pretrained(diffusers, spec: GeneratorSpec, s: Settings, dtype):
    revision = spec.revision if s.model_id == spec.model_id and spec.revision else None
    if spec.kind == "image":  # reuse the text pipeline's loop: image embeddings go in as prompt embeddings
        v = diffusers.StableDiffusionImageVariationPipeline.from_pretrained(
            s.model_id, revision=revision, torch_dtype=dtype, safety_checker=None)
        return diffusers.StableDiffusionPipeline(
            vae=v.vae, text_encoder=None, tokenizer=None, unet=v.unet, scheduler=v.scheduler, safety_checker=None,
            feature_extractor=v.feature_extractor, image_encoder=v.image_encoder, requires_safety_checker=False)
    if spec.family == "sdxl":
        return diffusers.StableDiffusionXLPipeline.from_pretrained(s.model_id, revision=revision, torch_dtype=dtype)
    return diffusers.StableDiffusionPipeline.from_pretrained(s.model_id, revision=revision, torch_dtype=dtype,
                                                             safety_checker=None, requires_safety_checker=False)


def condition(pipe, spec: GeneratorSpec, s: Settings, jobs: list[Job]) -> dict:
    """Pipeline keyword arguments that say what to draw: weighted text embeddings or CLIP image embeddings."""
    import torch

    from .prompts import encode_weighted

    if spec.kind == "image":
        emb = image_embeddings(pipe, [j.sources for j in jobs])
        return {"prompt_embeds": emb, "negative_prompt_embeds": torch.zeros_like(emb)}
    prompts = [j.prompt for j in jobs]
    negative = {"negative_prompt": s.negative_prompt} if s.negative_prompt else {}
    if spec.family == "sdxl":  # both encoders' penultimate layers, pooled output of the second
        z1, _ = encode_weighted(pipe.tokenizer, pipe.text_encoder, prompts, layer=-2)
        z2, pooled = encode_weighted(pipe.tokenizer_2, pipe.text_encoder_2, prompts, layer=-2)
        return {"prompt_embeds": torch.cat([z1, z2], dim=-1), "pooled_prompt_embeds": pooled, **negative}
    return {"prompt_embeds": encode_weighted(pipe.tokenizer, pipe.text_encoder, prompts)[0], **negative}


def image_embeddings(pipe, sources: list[tuple]):
    """[B, k, D] CLIP image embeddings of each job's k source images, concatenated along the sequence (ImageMixer)."""
    import torch

    from . import load_rgb, preprocess

    enc = pipe.image_encoder
    spec = {"size": enc.config.image_size, "mean": tiny_sd.CLIP_MEAN, "std": tiny_sd.CLIP_STD,
            "interpolation": "bicubic", "crop_pct": 1.0}
    x = torch.from_numpy(np.stack([preprocess(load_rgb(p), spec) for src in sources for p in src]))
    with torch.no_grad():
        e = enc(x.to(enc.device, enc.dtype)).image_embeds
    return e.view(len(sources), -1, e.shape[-1])


def draw(pipe, spec: GeneratorSpec, s: Settings, jobs: list[Job]) -> list:
    """One batch of PIL images; each image has its own CPU generator, so its noise depends on its seed alone."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(j.seed) for j in jobs]
    return pipe(**condition(pipe, spec, s, jobs), num_inference_steps=s.steps, guidance_scale=s.guidance,
                height=s.size, width=s.size, generator=generators).images


class HalvingBatcher:
    """Runs a chunk through ``fn``; a CUDA out-of-memory error halves the batch for this and every later chunk."""

    def __init__(self, fn, limit: int):
        self.fn, self.limit = fn, limit

    def __call__(self, jobs: list) -> list:
        import torch

        out, i = [], 0
        while i < len(jobs):
            part = jobs[i:i + self.limit]
            try:
                out += self.fn(part)
                i += len(part)
            except torch.cuda.OutOfMemoryError:
                if len(part) == 1:
                    raise
                self.limit = len(part) // 2
                log.warning("CUDA out of memory at batch %d; continuing with batch %d", len(part), self.limit)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return out


# ---------------------------------------------------------------------------------------------------------------
# 5. Generation and the manifest


def generate(recipe, synth_dir, split: dict, device: str = "cpu", shard=None, ranks: bool = False,
             generate_text=None) -> list | None:
    """Make this shard's missing images; return the full manifest rows once every image exists, else None.

    With ``ranks`` every torchrun rank calls this and they split the work further (shard i/n on rank r of w is
    shard i*w + r of n*w); without it the caller alone does its shard.
    """
    from .. import distributed

    check_synth(recipe, split)
    synth_dir = Path(synth_dir)
    cfg, spec, s = recipe.synthetic, GENERATORS.get(recipe.synthetic.generator), resolve_settings(recipe.synthetic)
    (i, n), (rank, size) = parse_shard(shard), distributed.world() if ranks else (0, 1)
    barrier = distributed.barrier if ranks else (lambda: None)
    dims = resolve_dimensions(cfg, recipe.data.superclass, synth_dir, generate_text) if rank == 0 else None
    barrier()
    jobs = plan(recipe, split, dims if rank == 0 else resolve_dimensions(cfg, recipe.data.superclass, synth_dir))
    todo = [c for c in my_chunks(chunks(jobs, cfg.batch_size), (i * size + rank, n * size))
            if any(not (synth_dir / j.file(s)).exists() for j in c)]
    made, seconds = make_images(cfg, spec, s, todo, synth_dir, device) if todo else (0, 0.0)
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


def make_images(cfg, spec: GeneratorSpec, s: Settings, todo: list, synth_dir: Path, device: str) -> tuple[int, float]:
    """Generate every chunk in ``todo`` and write its missing images; returns (images written, seconds)."""
    from tqdm import tqdm

    pipe = load_pipeline(cfg, device)
    batcher = HalvingBatcher(lambda jobs: draw(pipe, spec, s, jobs), cfg.batch_size)
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
    spec = GENERATORS.get(s.generator)
    return {"file": job.file(s), "class": job.group, "label": job.label,
            "index": job.index, "prompt": job.prompt, "negative_prompt": s.negative_prompt, "seed": job.seed,
            "sources": list(job.sources), "source_labels": list(job.source_labels), "generator": s.generator,
            "model_id": s.model_id, "lora_id": s.lora_id, "scheduler": spec.scheduler or "default",
            "steps": s.steps, "guidance": s.guidance, "size": s.size, "batch_size": s.batch_size,
            "licence": spec.licence, "sha256": sha256_file(synth_dir / job.file(s))}


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
# 6. The pipeline stage: generate, teacher features, curate


def synth_stage(recipe, run_dir, teacher, split: dict, device, ranks: bool = False, eval_features=None) -> dict:
    """Generate (resuming), cache teacher features of every image, curate; what distillation trains on.

    Returns ``items`` [(path, label)] kept, ``cache`` (FeatureCache over all generated images, ``data.views`` views),
    ``rows`` (each kept item's row in that cache), ``report`` (images each filter removed) and ``manifest``.
    ``ranks``: every torchrun rank calls this and generation is split between them (otherwise the caller does it
    all). ``eval_features``: the teacher's features of split val + test, if the caller has them cached.
    """
    from .curate import curate

    cfg, synth_dir = recipe.synthetic, Path(run_dir) / "synth"
    check_synth(recipe, split)
    if (cfg.curate_min_score > 0 or cfg.curate_agree) and teacher.head is None:
        from ..recipe import RecipeError

        raise RecipeError("'synthetic.curate_min_score' and 'synthetic.curate_agree' score images with the teacher's "
                          "head, and this teacher has none (set teacher.head)")
    rows = generate(recipe, synth_dir, split, str(device), ranks=ranks)
    items = [(str(synth_dir / r["file"]), r["label"]) for r in rows]
    cache = feature_cache(synth_dir / "features", teacher, items, [r["sha256"] for r in rows], recipe, device, ranks)
    features = cache.get(np.arange(len(items)))
    logits = teacher_logits(teacher, features, device)
    if cfg.curate_leakage and eval_features is None:
        eval_features = eval_feature_matrix(synth_dir, teacher, split, recipe, device)
    keep, report, dropped = curate(features, logits, [r["source_labels"] for r in rows], eval_features, cfg)
    write_json(synth_dir / "curation.json", {"report": report, "dropped": [
        {"file": rows[k]["file"], "filter": why, "value": v} for k, why, v in dropped]})
    log.info("Synthetic images: %s", ", ".join(f"{k} {v}" for k, v in report.items()))
    return {"items": [items[k] for k in keep], "cache": cache, "rows": list(keep), "report": report,
            "manifest": rows}


def feature_cache(folder, teacher, items: list, identity: list, recipe, device, ranks=False, views=None):
    """A filled FeatureCache; its identity covers the teacher, its input, the views and ``identity`` (per-image
    hashes for generated images), so a changed image never reuses stale features."""
    from ..distributed import barrier, is_main
    from .cache import FeatureCache

    views = views or recipe.data.views
    crop = recipe.data.crop_pct or teacher.info.input.crop_pct
    meta = {"teacher": [teacher.info.name, teacher.info.arch, teacher.info.weights], "augment": recipe.data.augment,
            "input": teacher.info.input.to_dict(), "crop_pct": crop, "images": fingerprint(identity)}
    keys = [p for p, _ in items]
    if is_main() or not ranks:
        FeatureCache(folder, keys, views, teacher.feature_dim, meta).fill(
            teacher, items, recipe.data.augment, crop, recipe.teacher.batch_size, recipe.data.num_workers, device,
            desc=f"teacher features ({Path(folder).name})")
    if ranks:
        barrier()
    return FeatureCache(folder, keys, views, teacher.feature_dim, meta)


def teacher_logits(teacher, features, device, batch: int = 1024):
    import torch

    if teacher.head is None:
        return None
    teacher.to(device)
    with torch.no_grad():
        return torch.cat([teacher.logits(features[k:k + batch].to(device)).float().cpu()
                          for k in range(0, len(features), batch)]) if len(features) else None


def eval_feature_matrix(synth_dir: Path, teacher, split: dict, recipe, device):
    """Teacher features (view 0) of the evaluation images, for the leakage filter."""
    items = list(split.get("test", [])) + list(split.get("val", []))
    if not items:
        return None
    cache = feature_cache(synth_dir / "eval-features", teacher, items, [p for p, _ in items], recipe, device,
                          views=1)
    return cache.get(np.arange(len(items)))


# ---------------------------------------------------------------------------------------------------------------
# 7. `edgedistill synth`


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
