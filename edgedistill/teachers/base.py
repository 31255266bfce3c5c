"""What every teacher is: a frozen encoder, its input spec, what it can do, and the heads that turn features into
class logits. The teachers themselves register in ``clip.py``, ``timm_teachers.py`` and ``tiny.py``."""
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..registry import Registry

TEACHERS = Registry("teacher")


@dataclass(frozen=True)
class Capabilities:
    """What a teacher can do, declared where it is registered; recipes are checked against it before any work."""

    text_encoder: bool = False  # head: zeroshot (class names through a text encoder)
    native_head: bool = False   # head: native (the model's own classifier)
    pooling: bool = False       # teacher.pool: avgmax (a choice of how the final feature map is pooled)
    cls_tokens: bool = False    # teacher.n_cls_blocks / avgpool (CLS tokens of the last ViT blocks, P1)
    weights: str = ""           # what teacher.weights may name: a key of local_weights.KINDS; "": no weights file


CAPABILITIES: dict[str, Capabilities] = {}


def register_teacher(name: str, **can):
    """``@TEACHERS.register(name)`` plus the teacher's capabilities (keyword flags of ``Capabilities``)."""
    def decorator(fn):
        CAPABILITIES[name] = Capabilities(**can)
        return TEACHERS.register(name)(fn)
    return decorator


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


def head_layout(head: nn.Module) -> dict:
    """How to rebuild a teacher head without unpickling it: its kind and sizes (saved beside its state dict)."""
    if isinstance(head, LinearHead):
        return {"kind": "linear", "dim": head.fc.in_features, "classes": head.fc.out_features}
    if isinstance(head, MLPHead):
        return {"kind": "mlp", "dim": head.net[1].in_features, "classes": head.net[3].out_features}
    if isinstance(head, ZeroShotHead):
        return {"kind": "zeroshot", "dim": head.text.shape[1], "classes": head.text.shape[0], "scale": head.scale}
    if isinstance(head, nn.Linear):  # a timm teacher's own classifier
        return {"kind": "fc", "dim": head.in_features, "classes": head.out_features, "bias": head.bias is not None}
    raise TypeError(f"A teacher head of type {type(head).__name__} cannot be saved as a state dict")


def build_head(spec: dict) -> nn.Module:
    """An empty head of ``spec``'s kind and sizes, ready for ``load_state_dict``."""
    kind, dim, classes = spec["kind"], int(spec["dim"]), int(spec["classes"])
    if kind in ("linear", "mlp"):
        return make_probe_head(kind, dim, classes)
    if kind == "zeroshot":
        return ZeroShotHead(torch.zeros(classes, dim), scale=float(spec["scale"]))
    if kind == "fc":
        return nn.Linear(dim, classes, bias=bool(spec["bias"]))
    raise ValueError(f"Unknown teacher head kind {kind!r} in a head's JSON")


def save_head(head: nn.Module, path) -> None:
    """``path`` (head.pt) gets the state dict only, ``head.json`` beside it how to rebuild the module."""
    from ..utils import atomic_torch_save, write_json

    path = Path(path)
    write_json(path.with_suffix(".json"), head_layout(head))
    atomic_torch_save({k: v.detach().cpu() for k, v in head.state_dict().items()}, path)


def load_head(path, device="cpu") -> nn.Module:
    """The head saved by ``save_head``; tensors only are read (``weights_only=True``), never pickled code."""
    import json

    path = Path(path)
    head = build_head(json.loads(path.with_suffix(".json").read_text()))
    head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return head.to(device).eval()
