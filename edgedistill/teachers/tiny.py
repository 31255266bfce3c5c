"""Tiny random teachers built in code (seeded, no downloads) for tests and offline smoke runs."""
import torch

from .base import InputSpec, TeacherInfo, register_teacher
from .clip import ClipTeacher
from .timm_teachers import Dinov2Teacher, TimmTeacher

TINY_INPUT = InputSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=1.0)


def tiny_clip_model(embed_dim: int = 64, width: int = 64, depth: int = 2, image_size: int = 32):
    """A real open_clip CLIP with tiny towers and random weights; the tokenizer is open_clip's own BPE."""
    import open_clip

    torch.manual_seed(0)
    vision = open_clip.model.CLIPVisionCfg(layers=depth, width=width, head_width=32, image_size=image_size,
                                           patch_size=8)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=2, layers=depth)
    return open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)


@register_teacher("tiny-clip", text_encoder=True)
def tiny_clip_teacher(cfg) -> ClipTeacher:
    from ..utils import require

    open_clip = require("open_clip", "clip")
    size = cfg.image_size or 32
    model = tiny_clip_model(cfg.embed_dim, cfg.width, cfg.depth, size).eval()
    info = TeacherInfo(name="tiny-clip", arch="tiny", feature_dim=cfg.embed_dim,
                       input=InputSpec(size=size, mean=TINY_INPUT.mean, std=TINY_INPUT.std,
                                       interpolation="bicubic", crop_pct=1.0), licence="none (random weights)")
    return ClipTeacher(model, open_clip.get_tokenizer("ViT-B-32"), info)


@register_teacher("tiny-vit", cls_tokens=True)
def tiny_vit_teacher(cfg) -> Dinov2Teacher:
    """A DINOv2-shaped ViT (CLS tokens of the last blocks) with random weights."""
    import timm

    torch.manual_seed(0)
    size = cfg.image_size or 32
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=size, patch_size=8, embed_dim=cfg.width, depth=cfg.depth, num_heads=2, num_classes=0)
    n = min(cfg.n_cls_blocks, cfg.depth)
    info = TeacherInfo(name="tiny-vit", arch="tiny", feature_dim=cfg.width * (n + int(cfg.avgpool)),
                       input=InputSpec(**{**TINY_INPUT.to_dict(), "size": size}), licence="none (random weights)")
    return Dinov2Teacher(model.eval(), info, n, cfg.avgpool)


@register_teacher("tiny-cnn", native_head=True, pooling=True)
def tiny_cnn_teacher(cfg) -> TimmTeacher:
    """A small timm ResNet with random weights."""
    import timm

    torch.manual_seed(0)
    w = cfg.width
    model = timm.models.resnet.ResNet(block=timm.models.resnet.BasicBlock, layers=[1, 1, 1, 1], num_classes=10,
                                      stem_width=16, channels=(w, w, 2 * w, 2 * w)).eval()
    info = TeacherInfo(name="tiny-cnn", arch="tiny", feature_dim=model.num_features,
                       input=InputSpec(**{**TINY_INPUT.to_dict(), "size": cfg.image_size or 32}),
                       licence="none (random weights)")
    return TimmTeacher(model, info, cfg.pool)
