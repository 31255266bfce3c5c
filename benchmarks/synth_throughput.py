#!/usr/bin/env python3
"""Throughput of the synthetic-data engine: images/s per generator and size, and the speed-up of few-step
generators (LCM-LoRA, Turbo) over the 50-step model they come from.

Speed does not depend on the weights, so every model is built with random weights from its published diffusers
config (written out below): nothing is downloaded. Images go through the engine's own path
(``generators.draw``: weighted prompt encoding, per-image seeded noise, batched denoising, VAE decode).

    python benchmarks/synth_throughput.py                    # GPU: fp16, 512/1024 px, 8 images per generator
    python benchmarks/synth_throughput.py --quick            # CPU smoke: 128 px, 1 image, SD 1.x/2.x only
    python benchmarks/synth_throughput.py --archs sd15,sdxl --sizes 512,768 --images 16 --batch 8
"""
import argparse
import platform
import sys
import time
from dataclasses import replace

import torch

from edgedistill.data.generation import Job
from edgedistill.data.generators import GENERATORS, Settings, draw
from edgedistill.data.tiny_sd import clip_tokenizer

# Published configs (diffusers config.json of each model's unet / vae / text_encoder), trimmed to what differs
# from the library defaults.
SD_UNET = {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "attention_head_dim": 8,
           "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
UNETS = {
    "sd15": {**SD_UNET, "cross_attention_dim": 768, "sample_size": 64},
    "sd21": {**SD_UNET, "cross_attention_dim": 1024, "sample_size": 96, "attention_head_dim": (5, 10, 20, 20),
             "use_linear_projection": True, "upcast_attention": True},
    "sdxl": {"block_out_channels": (320, 640, 1280), "layers_per_block": 2, "attention_head_dim": (5, 10, 20),
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048, "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128},
}
VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
       "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}
OPENCLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
              "projection_dim": 512, "hidden_act": "gelu"}
OPENCLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                 "projection_dim": 1280, "hidden_act": "gelu"}
TEXT = {"sd15": [CLIP_L], "sd21": [OPENCLIP_H], "sdxl": [CLIP_L, OPENCLIP_BIGG]}

# (generator, architecture, scheduler): each few-step generator is compared with the 50-step model it comes from.
CASES = [("sd15", "sd15", "euler"), ("sd15-lcm", "sd15", "lcm"),
         ("sd21", "sd21", "euler"), ("sd-turbo", "sd21", "turbo"),
         ("sdxl", "sdxl", "euler"), ("sdxl-lcm", "sdxl", "lcm"), ("sdxl-turbo", "sdxl", "turbo")]
BASELINE = {"sd15-lcm": "sd15", "sd-turbo": "sd21", "sdxl-lcm": "sdxl", "sdxl-turbo": "sdxl"}


def text_encoder(cfg: dict, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=49407, **cfg)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def scheduler(kind: str):
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    sd = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    if kind == "lcm":
        return LCMScheduler(**sd, set_alpha_to_one=False, clip_sample=False)
    return EulerDiscreteScheduler(**sd, timestep_spacing="trailing" if kind == "turbo" else "leading")


def random_pipeline(arch: str, dtype):
    """A pipeline of the real architecture with random weights (no download)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("cpu"):
        unet, vae = UNet2DConditionModel(**UNETS[arch]), AutoencoderKL(**VAE)
        encoders = [text_encoder(c, with_projection=(arch == "sdxl" and k == 1)) for k, c in enumerate(TEXT[arch])]
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                         scheduler=scheduler("euler"))
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=clip_tokenizer(), unet=unet,
                                       scheduler=scheduler("euler"), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def seconds_per_image(pipe, settings: Settings, images: int, device: str) -> float:
    entry = GENERATORS.get(settings.generator)
    prompt = "a photo of a (keeshond:1.5) ((dog:1.2)), a cozy living room, 10:00 AM, sitting on a blanket"
    jobs = [Job("keeshond", 0, i, 1000 + i, prompt) for i in range(images)]
    draw(pipe, entry, replace(settings, steps=1), jobs[:1])  # warm-up (kernels, allocator)
    sync(device)
    start = time.perf_counter()
    for k in range(0, images, settings.batch_size):
        draw(pipe, entry, settings, jobs[k:k + settings.batch_size])
    sync(device)
    return (time.perf_counter() - start) / images


def images_per_second(pipe, s: Settings, args, device: str) -> tuple[float, str]:
    """Measured images/s; with --quick, a many-step generator is timed at 2 and 4 steps and extrapolated
    (the cost is linear in the steps: a fixed part for text encoding and VAE decoding plus one per step)."""
    if not (args.quick and s.steps > 8):
        return 1 / seconds_per_image(pipe, s, args.images, device), "measured"
    t2, t4 = (seconds_per_image(pipe, replace(s, steps=k), args.images, device) for k in (2, 4))
    return 1 / (t2 + (t4 - t2) / 2 * (s.steps - 2)), "estimated from 2- and 4-step runs"


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    rows = []
    for arch in args.archs:
        pipe = random_pipeline(arch, dtype).to(device)
        for name, case_arch, sched in CASES:
            if case_arch != arch or (args.generators and name not in args.generators):
                continue
            pipe.scheduler = scheduler(sched)
            entry = GENERATORS.get(name)
            for size in args.sizes or [entry.size]:
                s = Settings(name, entry.model_id, entry.lora_id, entry.steps, entry.guidance, size, "", args.batch)
                ips, how = images_per_second(pipe, s, args, device)
                rows.append({"generator": name, "size": size, "steps": s.steps, "guidance": s.guidance, "ips": ips,
                             "how": how})
                print(f"  {name:<11} {size:>5} px  {s.steps:>2} steps  guidance {s.guidance:<4}  {ips:8.4f} images/s "
                      f"({how})", flush=True)
        del pipe
    return rows


def print_table(rows: list[dict], device_line: str):
    base = {(r["generator"], r["size"]): r["ips"] for r in rows}
    print(f"\nsynthetic-data throughput on {device_line}")
    print(f"{'generator':<11} {'size':>5} {'steps':>5} {'guidance':>8} {'images/s':>10} {'s/image':>9} "
          f"{'speed-up vs 50-step':>20}  timing")
    for r in rows:
        ref = base.get((BASELINE.get(r["generator"], ""), r["size"]))
        up = f"{r['ips'] / ref:.1f}x vs {BASELINE[r['generator']]}" if ref else "-"
        print(f"{r['generator']:<11} {r['size']:>5} {r['steps']:>5} {r['guidance']:>8} {r['ips']:>10.4f} "
              f"{1 / r['ips']:>9.2f} {up:>20}  {r['how']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 128 px, 1 image, batch 1, SD 1.x/2.x; "
                   "50-step generators are extrapolated from 2- and 4-step runs")
    p.add_argument("--archs", default="sd15,sd21,sdxl", help="comma list of sd15, sd21, sdxl")
    p.add_argument("--generators", default="", help="comma list to restrict the generators")
    p.add_argument("--sizes", default="", help="comma list of image sizes (default: each generator's own)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is available")
    args = p.parse_args(argv)
    if args.quick:
        args.cpu, args.images, args.batch = True, 1, 1
        args.sizes = args.sizes or "128"
        args.archs = "sd15,sd21" if args.archs == p.get_default("archs") else args.archs
    args.archs = [a for a in args.archs.split(",") if a]
    args.generators = [g for g in args.generators.split(",") if g]
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    return args


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    on_gpu = torch.cuda.is_available() and not args.cpu
    device_line = (f"{torch.cuda.get_device_name()} (fp16)" if on_gpu else
                   f"CPU only ({cpu_name()}, {torch.get_num_threads()} threads, "
                   f"fp32): CPU numbers, not representative of GPU generation")
    print(f"random weights at the published architecture sizes; {args.images} image(s) per generator, "
          f"batch {args.batch}; {device_line}", flush=True)
    print_table(run(args), device_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
