"""The training loop's one loss path: the recipe's active losses from the registry, their trainable modules, and what
each needs gathered from the student, the teacher and the batch.

``Objective`` holds the student and the loss modules as one module: the optimiser, gradient clipping and DDP see
every trained parameter (projectors, adapters, learnable temperatures), and ``loss_state`` is what the checkpoint
keeps besides the student (those parameters and CRD's memory buffers), so a resumed run repeats the killed one.
"""
import dataclasses

import torch
from torch import nn

from .losses import Dims, LossInputs, active_entries
from .losses.features import as_map
from .utils import derived_seed


class Tap:
    """The output of one submodule's latest forward: an intermediate feature map, read after the network ran."""

    def __init__(self, module: nn.Module):
        self.value = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.value = output[0] if isinstance(output, (tuple, list)) else output

    def close(self):
        self.handle.remove()


def find_layer(network: nn.Module, name: str, key: str) -> nn.Module:
    """``network``'s submodule ``name``; "" takes its last stage from timm's ``feature_info``."""
    from .recipe import RecipeError

    if not name:
        info = getattr(network, "feature_info", None)
        if not info:
            raise RecipeError(f"Recipe key {key!r} is empty and {type(network).__name__} declares no timm "
                              "feature_info to take its last stage from: name one of its modules")
        name = info[-1]["module"]
    try:
        return network.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in network.named_children()]
        raise RecipeError(f"Recipe key {key!r}: {type(network).__name__} has no module {name!r}; its top-level "
                          f"modules: {names}") from None


def feature_dim(student: nn.Module) -> int:
    """What the student's backbone returns (Student.forward's ``features``)."""
    backbone = getattr(student, "backbone", None)
    return (getattr(backbone, "head_hidden_size", None) or backbone.num_features) if backbone is not None else 0


def terms_of(entries, batch: LossInputs, modules, cfg) -> dict:
    """Each entry's term on ``batch``; an entry may skip a batch (None: e.g. CE on a batch with no label)."""
    terms = {}
    for e in entries:
        value = e.term(batch, modules[e.name] if e.name in modules else None, cfg)
        if value is not None:
            terms[e.name] = value
    return terms


def loss_terms(out: dict, t_feat, t_logits, labels, w, temperature: float, label_smoothing: float) -> dict:
    """The terms of the losses that own no module, on one batch's student outputs ``out`` (for quick checks)."""
    cfg = dataclasses.replace(w, temperature=temperature, label_smoothing=label_smoothing)
    batch = LossInputs(logits=out.get("logits"), embedding=out.get("embedding"), features=out.get("features"),
                       teacher_features=t_feat, teacher_logits=t_logits, labels=labels)
    return terms_of([e for e in active_entries(cfg) if e.modules is None], batch, {}, cfg)


class Objective(nn.Module):
    """The student plus the active losses' modules; ``forward(images, inputs)`` returns each unweighted term."""

    def __init__(self, student: nn.Module, weights, teacher=None, items: int = 0, classes: int = 0,
                 sizes: tuple = (0, 0), seed: int = 0, device: str = "cpu"):
        """``sizes``: the student's and the teacher's input sizes (a blank image of each measures tapped maps)."""
        super().__init__()
        self.student, self.weights = student, weights
        self.__dict__["teacher"] = teacher  # not a submodule: nothing of the teacher is trained or checkpointed
        self.entries = active_entries(weights)
        self.needs = {n for e in self.entries for n in e.needs}
        self.student_tap = self.teacher_tap = None
        maps = (0, 0)
        if "student_map" in self.needs or "teacher_map" in self.needs:
            self.student_tap = Tap(find_layer(student.backbone, weights.hint_layer, "loss.hint_layer"))
            self.teacher_tap = Tap(find_layer(teacher.network(), weights.hint_teacher_layer, "loss.hint_teacher_layer"))
            maps = self.map_channels(sizes, device)
        dims = Dims(features=feature_dim(student), embedding=getattr(getattr(student, "proj", None), "out_features", 0),
                    teacher=getattr(teacher, "dim", 0), classes=classes, items=items, student_map=maps[0],
                    teacher_map=maps[1])
        torch.manual_seed(derived_seed("loss-modules", seed))  # the modules' initial weights depend on the seed only
        self.terms = nn.ModuleDict({e.name: e.modules(weights, dims) for e in self.entries if e.modules is not None})
        self.terms.to(device)

    @classmethod
    def for_dataset(cls, student, weights, teacher, dataset, classes: int, seed: int, device: str) -> "Objective":
        """The objective for training on ``dataset`` (a DistillSet): its items are CRD's memory slots."""
        sizes = (dataset.sspec["size"], (dataset.tspec or {}).get("size", 0))
        return cls(student, weights, teacher, len(dataset), classes, sizes, seed, device)

    @torch.no_grad()
    def map_channels(self, sizes: tuple, device: str) -> tuple[int, int]:
        """Channels of the tapped maps, from one blank image through each network (eval mode: nothing changes)."""
        was = self.student.training
        self.student.eval()
        self.student(torch.zeros(1, 3, sizes[0], sizes[0], device=device))
        self.student.train(was)
        self.teacher.encode(torch.zeros(1, 3, sizes[1], sizes[1], device=device))
        return as_map(self.student_tap.value).shape[1], as_map(self.teacher_tap.value).shape[1]

    def inputs(self, t_feat, t_logits, labels, index) -> LossInputs:
        """What the batch gives besides the student's outputs; the teacher's map is what its tap saw last (the
        online teacher's pass on this batch, mixed images included)."""
        t = self.teacher
        return LossInputs(teacher_features=t_feat, teacher_logits=t_logits, labels=labels, index=index,
                          teacher_map=self.teacher_tap.value if self.teacher_tap is not None else None,
                          text=getattr(t, "text", None) if "text" in self.needs else None,
                          teacher_head=getattr(t, "head", None) if "teacher_head" in self.needs else None)

    def forward(self, images, batch: LossInputs) -> dict:
        out = {k: v.float() for k, v in self.student(images).items()}
        batch = dataclasses.replace(batch, logits=out.get("logits"), embedding=out.get("embedding"),
                                    features=out.get("features"))
        if self.student_tap is not None:
            batch.student_map = self.student_tap.value.float()
        return terms_of(self.entries, batch, self.terms, self.weights)

    def total(self, terms: dict):
        return sum(getattr(self.weights, k) * v for k, v in terms.items())

    def loss_state(self) -> dict:
        return self.terms.state_dict()

    def load(self, checkpoint: dict):
        """The student's weights and the loss modules' state from a training checkpoint (``loss_state``)."""
        self.student.load_state_dict(checkpoint["model"])
        self.terms.load_state_dict(checkpoint.get("losses", {}))

    def close(self):
        """Remove the hooks: the trained student is saved, exported and evaluated without them."""
        for tap in (self.student_tap, self.teacher_tap):
            if tap is not None:
                tap.close()
