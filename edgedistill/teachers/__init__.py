"""Teachers: a frozen image encoder plus an optional head that turns its features into class logits.

Every teacher gives ``encode(images) -> features`` (what the teacher-feature cache stores) and, once it has a
head, ``head(features) -> logits``. Features are what feature distillation targets; logits feed KD.
"""
from dataclasses import dataclass, field

import torch
from torch import nn

from ..registry import Registry

TEACHERS = Registry("teacher")


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (usually: offline and not cached). The message is one sentence."""


@dataclass
class InputSpec:
    """How images are turned into the tensor a model expects; recorded in run folders and export manifests."""

    size: int = 224
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct}


@dataclass
class TeacherInfo:
    name: str
    arch: str
    feature_dim: int
    input: InputSpec
    licence: str = "unknown"
    weights: str = "random"
    extra: dict = field(default_factory=dict)


class Teacher(nn.Module):
    """A frozen encoder with an optional head. Subclasses implement ``_encode``."""

    def __init__(self, info: TeacherInfo):
        super().__init__()
        self.info = info
        self.head: nn.Module | None = None
        self.class_names: list[str] = []

    @property
    def feature_dim(self) -> int:
        return self.info.feature_dim

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.eval()
        return self._encode(images).float()

    def _encode(self, images):
        raise NotImplementedError

    def logits(self, features: torch.Tensor) -> torch.Tensor | None:
        return None if self.head is None else self.head(features)

    def text_head(self, class_names, templates, superclass: str = "") -> nn.Module:
        raise NotImplementedError(f"Teacher {self.info.name!r} has no text encoder, so it has no zero-shot head")

    def native_head(self) -> tuple[nn.Module, list[str]]:
        raise NotImplementedError(f"Teacher {self.info.name!r} has no classifier of its own")

    def flops_model(self) -> nn.Module:
        """The module whose forward on an image is the teacher's per-image cost (encoder plus head)."""
        return _EncodeAndHead(self)


class _EncodeAndHead(nn.Module):
    def __init__(self, teacher: Teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x):
        f = self.teacher._encode(x)
        return f if self.teacher.head is None else self.teacher.head(f)


class LinearHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, f):
        return self.fc(f)


class MLPHead(nn.Module):
    """P1's probe head: one hidden layer of size n_in (small inputs) or sqrt(n_in * n_out) (large ones)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        hidden = dim if dim <= 1536 else int((dim * num_classes) ** 0.5)
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, f):
        return self.net(f)


class ZeroShotHead(nn.Module):
    """Cosine similarity to class text embeddings, scaled as CLIP does (P4: argmax_k <I, Z_k>)."""

    def __init__(self, text_embeddings: torch.Tensor, scale: float = 100.0):
        super().__init__()
        self.register_buffer("text", nn.functional.normalize(text_embeddings.float(), dim=-1))
        self.scale = scale

    def forward(self, f):
        return self.scale * nn.functional.normalize(f, dim=-1) @ self.text.t()


def make_probe_head(kind: str, dim: int, num_classes: int) -> nn.Module:
    return MLPHead(dim, num_classes) if kind == "mlp" else LinearHead(dim, num_classes)


def build_teacher(cfg) -> Teacher:
    """Build the teacher a recipe names (weights load here; a missing download raises WeightsUnavailable)."""
    teacher = TEACHERS.get(cfg.name)(cfg)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


# Registration imports only light modules; each factory imports its heavy library inside its body.
from . import clip, timm_teachers, tiny  # noqa: E402,F401
