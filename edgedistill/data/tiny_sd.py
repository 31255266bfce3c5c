"""Tiny random Stable Diffusion pipelines built in code (seeded, no downloads), for tests and offline smoke runs.

The shapes follow diffusers' own ``get_dummy_components``; the tokenizer is a real CLIP BPE tokenizer written from
the vocabulary open_clip ships, so prompts tokenize exactly as they would for Stable Diffusion 1.x.
"""
import gzip
import json
import tempfile
from pathlib import Path

import torch

from ..utils import require

CLIP_VOCAB = 49408
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_tokenizer(model_max_length: int = 77):
    """transformers' CLIPTokenizer with the BPE merges open_clip ships (the tokenizer of SD 1.x's text encoder)."""
    require("transformers", "synth")
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # the slice open_clip's SimpleTokenizer and CLIPTokenizer both read
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"),
                             model_max_length=model_max_length)


def tiny_unet(cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8)


def tiny_scheduler():
    """The LCM scheduler with SD's noise schedule: P4's generator samples in a few steps."""
    from diffusers import LCMScheduler

    return LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)


def text_pipeline(dim: int = 32):
    """A StableDiffusionPipeline (text to image) with random weights: 32x32 images in a few milliseconds a step."""
    require("diffusers", "synth")
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=CLIP_VOCAB, hidden_size=dim, intermediate_size=2 * dim, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407, projection_dim=dim))
        return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(),
                                       unet=tiny_unet(dim), scheduler=tiny_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


def variation_pipeline(dim: int = 32):
    """The image-variations layout (Pinkney's): a UNet conditioned on CLIP image embeddings instead of text.

    It is a StableDiffusionPipeline without a text encoder plus a CLIP vision tower; the UNet reads the image
    embeddings as its cross-attention sequence, so two images' embeddings concatenated make an ImageMixer pair (P1).
    """
    require("diffusers", "synth")
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng():
        torch.manual_seed(0)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=dim, intermediate_size=2 * dim, num_attention_heads=4, num_hidden_layers=2, image_size=32,
            patch_size=8, projection_dim=dim))
        return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=tiny_unet(dim),
                                       scheduler=tiny_scheduler(), safety_checker=None, feature_extractor=None,
                                       image_encoder=image_encoder.eval(), requires_safety_checker=False)


def sdxl_pipeline(dim: int = 32):
    """A StableDiffusionXLPipeline with random weights: two text encoders (the second with a projection whose
    pooled output, with the size and crop conditioning, feeds the UNet's added embedding), as in SDXL."""
    require("diffusers", "synth")
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = {"vocab_size": CLIP_VOCAB, "hidden_size": dim, "intermediate_size": 2 * dim, "num_attention_heads": 4,
              "num_hidden_layers": 2, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
              "pad_token_id": 49407, "projection_dim": dim}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8,
            use_linear_projection=True, cross_attention_dim=2 * dim, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + dim)  # 6 size/crop numbers
        text_encoder = CLIPTextModel(CLIPTextConfig(**config)).eval()
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
        return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                         scheduler=tiny_scheduler())
