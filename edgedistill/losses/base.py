"""The loss registry: each entry says what a loss needs, which trainable modules it owns and what recipes it refuses.

A loss is a plain function of tensors (in ``logits.py``, ``features.py``, ``contrastive.py``) plus one
``@register_loss`` entry beside it. The training loop (``objective.py``) reads only the entries: it builds their
modules (projectors, adapters, learnable temperatures, memory buffers), adds them to the optimiser and the
checkpoint, gathers what they need and sums their weighted terms; ``checks.py`` runs their constraints before any
work. Adding a loss therefore touches its function, its entry and its weight (and settings) in ``LossCfg``.
"""
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..registry import Registry

LOSSES = Registry("loss")
ENTRIES: dict = {}  # name -> LossEntry, in registration order (the order terms are summed in)

# What an entry may ask for; LossInputs has one field per name.
NEEDS = ("logits", "embedding", "features", "student_map", "teacher_features", "teacher_logits", "teacher_map",
         "labels", "index", "text", "teacher_head")


@dataclass
class LossInputs:
    """One batch's tensors, each None when nobody needs it or it does not exist (no teacher: the baseline).

    ``labels``: class indices with -1 for synthetic/unlabelled images, or (B, K) soft labels after Mixup/CutMix
    (all-zero rows for unlabelled images). ``index``: the training items' positions (CRD's memory slots).
    ``text``: (K, D) class text embeddings of the CLIP teacher. ``teacher_head``: the frozen teacher classifier.
    """

    logits: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    features: torch.Tensor | None = None
    student_map: torch.Tensor | None = None
    teacher_features: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    teacher_map: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    index: torch.Tensor | None = None
    text: torch.Tensor | None = None
    teacher_head: nn.Module | None = None


@dataclass(frozen=True)
class Dims:
    """Sizes a loss module is built for: student pooled features, student embedding, teacher features, classes,
    training items (memory slots) and the channels of the student's and teacher's intermediate feature maps."""

    features: int = 0
    embedding: int = 0
    teacher: int = 0
    classes: int = 0
    items: int = 0
    student_map: int = 0
    teacher_map: int = 0


@dataclass(frozen=True)
class LossEntry:
    name: str
    term: Callable  # term(inputs: LossInputs, module | None, cfg: LossCfg) -> tensor, or None to skip this batch
    needs: tuple = ()
    modules: Callable | None = None  # modules(cfg, dims) -> nn.Module: trained with the student, checkpointed
    constraints: tuple = field(default=())  # each constraint(recipe) -> why the recipe cannot use it, or None


def register_loss(name: str, needs=(), modules=None, constraints=()):
    """Register ``term`` as the loss selected by the ``loss.<name>`` weight of a recipe."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"Loss {name!r} needs unknown inputs {sorted(unknown)}; known: {list(NEEDS)}")

    def decorator(term):
        entry = LossEntry(name, term, tuple(needs), modules, tuple(constraints))
        LOSSES.register(name)(entry)
        ENTRIES[name] = entry
        return term
    return decorator


def active_entries(cfg) -> list[LossEntry]:
    """The entries whose weight in ``cfg`` (a LossCfg) is non-zero, in registration order."""
    return [e for e in ENTRIES.values() if getattr(cfg, e.name, 0)]


def active_needs(cfg) -> set:
    return {n for e in active_entries(cfg) for n in e.needs}


def only(cfg, **weights):
    """``cfg`` with every registered loss weight set to 0 except ``weights`` (e.g. the baseline: ``ce=1.0``)."""
    import dataclasses

    return dataclasses.replace(cfg, **{name: weights.get(name, 0.0) for name in ENTRIES})


# ---------------------------------------------------------------------------------------------------------------
# Helpers the entries share


def labelled_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which images carry a real label: index >= 0, or a soft-label row that is not all zero."""
    return labels >= 0 if labels.dim() == 1 else labels.sum(-1) > 0


def target_classes(labels: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
    """One class per image: its label where it has one, else the teacher's top-1 (synthetic/unlabelled images).

    DKD's target class and the caption of P4's caption losses need a class for every image; P4's synthetic images
    come from class prompts, here they carry no label, so the teacher's best class (its best caption) stands in.
    """
    hard = labels if labels.dim() == 1 else labels.argmax(-1)
    if teacher_logits is None:
        return hard
    return torch.where(labelled_mask(labels), hard, teacher_logits.detach().argmax(-1))


def needs_online_teacher(key: str, why: str):
    def constraint(recipe):
        if recipe.train.teacher != "online":
            return (f"Recipe key 'loss.{key}' needs 'train.teacher: online' ({why}); set train.teacher=online "
                    f"or loss.{key}=0")
        return None
    return constraint


def needs_teacher_head(key: str, heads: tuple, why: str):
    def constraint(recipe):
        if recipe.teacher.head not in heads:
            return (f"Recipe key 'loss.{key}' needs teacher.head in {list(heads)} ({why}); it is "
                    f"{recipe.teacher.head!r}: change teacher.head or set loss.{key}=0")
        return None
    return constraint


class LearnableTemperature(nn.Module):
    """A trainable softmax temperature, stored as CLIP stores it: log(1/tau), the scale 1/tau capped at 100."""

    def __init__(self, tau: float):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(-torch.log(torch.tensor(tau)))))

    def forward(self) -> torch.Tensor:
        return 1.0 / self.log_scale.exp().clamp(max=100.0)
