"""Which generators exist and how one draws a batch: the generator table, settings, and the diffusers side.

Every generator is a row of ``GENERATOR_TABLE`` (model, default steps, guidance and size, licence), registered in
``GENERATORS``. Heavy libraries (diffusers, transformers) are imported only when a pipeline is built.
"""
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..registry import Registry
from ..utils import require
from . import tiny_sd

log = logging.getLogger(__name__)
GENERATORS = Registry("generator")


@dataclass(frozen=True)
class GeneratorEntry:
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
    GeneratorEntry("sd14", "text", "sd", "CompVis/stable-diffusion-v1-4", 50, 7.5, 512, _OPENRAIL),  # P2
    GeneratorEntry("sd15", "text", "sd", _SD15, 50, 7.5, 512, _OPENRAIL),
    GeneratorEntry("sd21", "text", "sd", "stabilityai/stable-diffusion-2-1", 50, 7.5, 768, _OPENRAILPP),
    GeneratorEntry("sdxl", "text", "sdxl", _SDXL, 50, 5.0, 1024, _OPENRAILPP),
    GeneratorEntry("sd-turbo", "text", "sd", "stabilityai/sd-turbo", 1, 0.0, 512, _STABILITY),
    GeneratorEntry("sdxl-turbo", "text", "sdxl", "stabilityai/sdxl-turbo", 1, 0.0, 512, _STABILITY),
    GeneratorEntry("sdxl-lcm", "text", "sdxl", _SDXL, 6, 0.5, 1024, _OPENRAILPP,  # P4's generator
                  lora_id="latent-consistency/lcm-lora-sdxl", scheduler="lcm"),
    GeneratorEntry("sd15-lcm", "text", "sd", _SD15, 6, 0.5, 512, _OPENRAIL,  # P4 Table 18
                  lora_id="latent-consistency/lcm-lora-sdv1-5", scheduler="lcm"),
    GeneratorEntry("sd-variations", "image", "sd", "lambdalabs/sd-image-variations-diffusers", 50, 3.0, 512,
                  _OPENRAIL, revision="v2.0"),  # P1: ImageVariations; mix pairs read as ImageMixer does
    GeneratorEntry("tiny-sd", "text", "sd", "", 4, 0.5, 32, "none (random weights)", scheduler="lcm",
                  build=tiny_sd.text_pipeline),
    GeneratorEntry("tiny-sdxl", "text", "sdxl", "", 4, 0.5, 32, "none (random weights)", scheduler="lcm",
                  build=tiny_sd.sdxl_pipeline),
    GeneratorEntry("tiny-sd-variations", "image", "sd", "", 4, 2.0, 32, "none (random weights)",
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
    entry = GENERATORS.get(cfg.generator)
    guidance = cfg.guidance if cfg.guidance >= 0 else entry.guidance
    negative = cfg.negative_prompt if guidance > 1 and entry.kind == "text" else ""  # without CFG it does nothing
    return Settings(cfg.generator, cfg.weights or cfg.model_id or entry.model_id, cfg.lora_id or entry.lora_id,
                    cfg.steps or entry.steps, guidance, cfg.size or entry.size, negative, cfg.batch_size)


def generator_info(cfg) -> dict:
    """What made the synthetic images, for the student's model card (licences carry forward)."""
    entry, s = GENERATORS.get(cfg.generator), resolve_settings(cfg)
    return {"generator": s.generator, "kind": entry.kind, "model_id": s.model_id, "lora_id": s.lora_id,
            "steps": s.steps, "guidance": s.guidance, "size": s.size, "mix": cfg.mix, "licence": entry.licence}


# ---------------------------------------------------------------------------------------------------------------
# Pipelines: built once per run, then drawn from in batches


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_pipeline(cfg, device: str):
    """The diffusers pipeline for a recipe, configured for speed (dtype, SDPA, VAE slicing, optional compile)."""
    import torch

    entry, s = GENERATORS.get(cfg.generator), resolve_settings(cfg)
    dtype = resolve_dtype(cfg.dtype, device)
    # synthetic.weights (a local pipeline folder) replaces the hub id, and the in-code build of the tiny generators
    pipe = entry.build() if entry.build and not cfg.weights else pretrained_pipeline(entry, s, dtype)
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


def pretrained_pipeline(entry: GeneratorEntry, s: Settings, dtype):
    """Weights from the Hugging Face hub (or its cache), or the local folder ``synthetic.weights`` names (then
    ``s.model_id`` is that folder). The safety checker is off: it blanks training images."""
    from pathlib import Path

    from ..local_weights import hub_cache
    from ..teachers import WeightsUnavailable

    diffusers = require("diffusers", "synth")
    try:
        pipe = _from_pretrained(diffusers, entry, s, dtype)
        if s.lora_id:
            require("peft", "synth")  # diffusers loads LoRAs through peft
            pipe.load_lora_weights(s.lora_id)
            pipe.fuse_lora()
    except ImportError:
        raise
    except Exception as e:  # hub and file errors come in many types; the user needs one sentence
        first = str(e).splitlines()[0][:200] if str(e) else ""
        if Path(s.model_id).is_dir():
            raise WeightsUnavailable(f"Generator {entry.name!r} could not load the local diffusers pipeline folder "
                                     f"{s.model_id} (synthetic.weights or synthetic.model_id): "
                                     f"{type(e).__name__}: {first}") from e
        weights = f"{s.model_id!r}" + (f" and the LoRA {s.lora_id!r}" if s.lora_id else "")
        raise WeightsUnavailable(
            f"Generator {entry.name!r} needs the diffusers weights {weights}: they download on first use with "
            f"internet and are cached under {hub_cache()}; loading failed with: "
            f"{type(e).__name__}: {first}") from e
    if entry.scheduler == "lcm":
        pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _from_pretrained(diffusers, entry: GeneratorEntry, s: Settings, dtype):
    revision = entry.revision if s.model_id == entry.model_id and entry.revision else None
    if entry.kind == "image":  # reuse the text pipeline's loop: image embeddings go in as prompt embeddings
        v = diffusers.StableDiffusionImageVariationPipeline.from_pretrained(
            s.model_id, revision=revision, torch_dtype=dtype, safety_checker=None)
        return diffusers.StableDiffusionPipeline(
            vae=v.vae, text_encoder=None, tokenizer=None, unet=v.unet, scheduler=v.scheduler, safety_checker=None,
            feature_extractor=v.feature_extractor, image_encoder=v.image_encoder, requires_safety_checker=False)
    if entry.family == "sdxl":
        return diffusers.StableDiffusionXLPipeline.from_pretrained(s.model_id, revision=revision, torch_dtype=dtype)
    return diffusers.StableDiffusionPipeline.from_pretrained(s.model_id, revision=revision, torch_dtype=dtype,
                                                             safety_checker=None, requires_safety_checker=False)


def condition(pipe, entry: GeneratorEntry, s: Settings, jobs: list) -> dict:
    """Pipeline keyword arguments that say what to draw: weighted text embeddings or CLIP image embeddings.

    ``jobs`` are ``generation.Job`` rows; only their ``prompt`` (text generators) or ``sources`` (image ones) are read.
    """
    import torch

    from .prompts import encode_weighted

    if entry.kind == "image":
        emb = image_embeddings(pipe, [j.sources for j in jobs])
        return {"prompt_embeds": emb, "negative_prompt_embeds": torch.zeros_like(emb)}
    prompts = [j.prompt for j in jobs]
    negative = {"negative_prompt": s.negative_prompt} if s.negative_prompt else {}
    if entry.family == "sdxl":  # both encoders' penultimate layers, pooled output of the second
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


def draw(pipe, entry: GeneratorEntry, s: Settings, jobs: list) -> list:
    """One batch of PIL images; each image has its own CPU generator, so its noise depends on its seed alone."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(j.seed) for j in jobs]
    return pipe(**condition(pipe, entry, s, jobs), num_inference_steps=s.steps, guidance_scale=s.guidance,
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
