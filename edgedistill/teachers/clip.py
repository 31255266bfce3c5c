"""CLIP teachers through open_clip: image features plus a zero-shot head from class-name prompts (P4)."""
from pathlib import Path

import torch

from ..utils import require
from .base import InputSpec, Teacher, TeacherInfo, WeightsUnavailable, ZeroShotHead, register_teacher

CLIP_LICENCES = {
    "datacomp_xl_s13b_b90k": "MIT (open_clip); DataComp-XL weights: MIT",
    "laion2b_s34b_b88k": "MIT (open_clip); LAION-2B weights: MIT",
    "openai": "MIT (OpenAI CLIP)",
}


class ClipTeacher(Teacher):
    def __init__(self, model, tokenizer, info: TeacherInfo):
        super().__init__(info)
        self.model, self.tokenizer = model, tokenizer

    def _encode(self, images):
        return self.model.encode_image(images)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(texts).to(device)).float()

    @torch.no_grad()
    def class_text_embeddings(self, class_names, templates, superclass: str = "") -> torch.Tensor:
        """Mean of the normalised embeddings of every template for each class (CLIP's prompt ensembling)."""
        rows = []
        for c in class_names:
            prompts = [t.format(c=c, superclass=superclass) for t in templates]
            emb = torch.nn.functional.normalize(self.encode_text(prompts), dim=-1).mean(0)
            rows.append(torch.nn.functional.normalize(emb, dim=-1))
        return torch.stack(rows)

    def text_head(self, class_names, templates, superclass: str = ""):
        scale = float(self.model.logit_scale.exp()) if hasattr(self.model, "logit_scale") else 100.0
        return ZeroShotHead(self.class_text_embeddings(class_names, templates, superclass), scale=min(scale, 100.0))


def clip_input_spec(model, size: int) -> InputSpec:
    visual = model.visual
    mean = tuple(getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = tuple(getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    return InputSpec(size=size, mean=mean, std=std, interpolation="bicubic", crop_pct=1.0)


def clip_names(cfg) -> tuple[str, str]:
    """The open_clip arch and pretrained tag a recipe's teacher section means."""
    return cfg.arch or "ViT-B-32", cfg.pretrained or "datacomp_xl_s13b_b90k"


def local_clip(open_clip, arch: str, path: str):
    """``teacher.weights``: a folder with open_clip_config.json and weights (open_clip's ``local-dir:``), or a
    checkpoint file of ``arch``. Returns the model and the name its tokenizer is looked up by."""
    from ..local_weights import loading

    folder = Path(path).is_dir()
    name = f"local-dir:{path}" if folder else arch
    what = "an open_clip folder" if folder else f"an open_clip {arch} checkpoint"
    with loading("teacher.weights", path, what):
        return open_clip.create_model(name, pretrained=None if folder else path, require_pretrained=True), name


@register_teacher("clip", text_encoder=True, weights="open_clip")
def clip_teacher(cfg) -> ClipTeacher:
    """Any open_clip model: ``arch`` (e.g. ViT-B-32) and ``pretrained`` tag (e.g. datacomp_xl_s13b_b90k), or the
    local ``weights`` (then the tag only names the licence)."""
    from ..local_weights import hub_cache

    open_clip = require("open_clip", "clip")
    arch, tag = clip_names(cfg)
    if cfg.weights:
        model, tokenizer_name = local_clip(open_clip, arch, cfg.weights)
    else:
        try:
            model, tokenizer_name = open_clip.create_model(arch, pretrained=tag), arch
        except Exception as e:  # hub errors come in many types; the user needs one sentence
            raise WeightsUnavailable(
                f"Teacher 'clip' needs the open_clip weights {arch}/{tag}: they download on first use with internet "
                f"and are cached under {hub_cache()} (loading failed: {type(e).__name__}).") from e
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    info = TeacherInfo(name="clip", arch=arch, feature_dim=model.text_projection.shape[1]
                       if getattr(model, "text_projection", None) is not None else model.visual.output_dim,
                       input=clip_input_spec(model, cfg.image_size or size), licence=CLIP_LICENCES.get(tag, "see open_clip"),
                       weights=f"local:{cfg.weights}" if cfg.weights else f"open_clip:{arch}/{tag}")
    return ClipTeacher(model, open_clip.get_tokenizer(tokenizer_name), info)
