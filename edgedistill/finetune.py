"""The fine-tuned teacher (``teacher.mode: finetune``): encoder and head trained end to end on the labelled images.

P1 (Table 1) finds a probed teacher good only when its frozen features already fit the task; when the domain is far
from the teacher's pretraining (fabric texture, not ImageNet objects), fine-tuning the whole teacher is what makes it
worth distilling from. The stage runs the same training loop as the students (checkpoint each epoch, resume,
progress), on the labelled training images only, with fresh augmentation each epoch, and saves the encoder's state
dict (``RUN/teacher/model.pt``) and its head (``RUN/teacher/head.pt`` + ``head.json``). Every later stage (features,
the head, evaluation) then uses the fine-tuned teacher.
"""
import dataclasses

import torch
from torch import nn

from . import distributed
from .recipe import LossCfg, fingerprinted
from .run_folder import Run
from .stages import labelled_items
from .students import freeze_first_stages, keep_in_eval
from .teachers import build_teacher, make_probe_head, save_head
from .train import DistillSet, GlobalBatchSampler, train
from .utils import atomic_torch_save, derived_seed, fingerprint


class TeacherNet(nn.Module):
    """The teacher's encoder and a probe-style head as one trainable model, in the training loop's output format."""

    def __init__(self, teacher, head: nn.Module):
        super().__init__()
        self.teacher, self.head = teacher, head
        self.frozen: list[str] = []  # modules of teacher.model kept in eval mode (teacher.finetune_freeze_stages)

    def train(self, mode: bool = True):
        super().train(mode)
        keep_in_eval(self.teacher.model, self.frozen)
        return self

    def forward(self, x):
        return {"logits": self.head(self.teacher._encode(x))}


def stage_finetune(run: Run, split: dict) -> dict | None:
    """Fine-tune the teacher when the recipe asks for it; afterwards ``run.teacher()`` is the fine-tuned teacher."""
    r, t = run.recipe, run.recipe.teacher
    if t.mode != "finetune":
        return None
    items = labelled_items(split)
    cfg = dataclasses.replace(r.train, epochs=t.finetune_epochs, lr=t.finetune_lr, batch_size=t.finetune_batch_size,
                              eval_every=0, compile=False)
    key = fingerprint([run.keys["split"], fingerprinted(t), r.data.augment, r.data.crop_pct, fingerprinted(cfg), items])
    folder = run.shared / "teacher"

    def compute():
        # 1. The pretrained teacher with a fresh head, every parameter trainable (but teacher.finetune_freeze_stages).
        torch.manual_seed(derived_seed("teacher-head", r.train.seed))
        teacher = build_teacher(t)
        crop = r.data.crop_pct or teacher.info.input.crop_pct  # the view every later stage uses (stages.view_crop)
        head = make_probe_head(t.head, teacher.feature_dim, len(split["classes"]))
        net = TeacherNet(teacher, head)
        for p in net.parameters():
            p.requires_grad_(True)
        net.frozen = freeze_first_stages(teacher.model, t.finetune_freeze_stages, "teacher.finetune_freeze_stages",
                                         f"teacher {teacher.info.arch!r}")  # none when 0
        net.train()
        # 2. The training loop on the labelled images alone, a fresh augmented view each epoch, CE only.
        spec = {**teacher.info.input.to_dict(), "crop_pct": crop}
        dataset = DistillSet(items, spec, None, r.data.augment, 1, crop, r.train.seed, online=True)
        sampler = GlobalBatchSampler(len(items), 0, t.finetune_batch_size, r.train.seed)
        rows = train(net, dataset, sampler, cfg, LossCfg(ce=1.0, label_smoothing=0.1), folder, key,
                     workers=r.data.num_workers, desc="fine-tune teacher", device=run.device)
        # 3. Encoder and head saved apart, both as state dicts.
        if distributed.is_main():
            teacher.head = None
            atomic_torch_save({k: v.detach().cpu() for k, v in teacher.state_dict().items()}, folder / "model.pt")
            save_head(head.cpu(), folder / "head.pt")
        return {"epochs": len(rows), "labelled": len(items), "last": rows[-1] if rows else {}}

    summary = run.stage("finetune", key, compute)
    distributed.barrier()
    run.use_teacher_weights(folder / "model.pt")
    return summary
