"""One readable training loop, shared by distillation and the no-teacher baseline.

Sampling and augmentation are functions of (seed, epoch, item), and every rank takes an interleaved slice of
the same global batch, so 1 process and N DDP processes see the same batches, and a resumed run repeats exactly
what the killed one would have done.
"""
import ctypes
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from . import distributed
from .data import AUGMENTS, resize_normalize, view_image
from .data.cache import view_seed
from .objective import Objective
from .tensorboard_log import ScalarLog
from .utils import atomic_torch_save, atomic_write_text, derived_seed, progress

log = logging.getLogger(__name__)


class TeacherFeatures:
    """Teacher features for training items, read from one or more feature caches (real, synthetic)."""

    def __init__(self):
        self.parts = []  # (start, stop, cache, rows)

    def add(self, cache, rows):
        start = self.parts[-1][1] if self.parts else 0
        self.parts.append((start, start + len(rows), cache, np.asarray(rows, dtype=np.int64)))

    def get(self, idx: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        idx, views = idx.numpy(), views.numpy()
        out = None
        for start, stop, cache, rows in self.parts:
            mask = (idx >= start) & (idx < stop)
            if mask.any():
                f = cache.get(rows[idx[mask] - start], views[mask])
                out = torch.empty(len(idx), f.shape[1]) if out is None else out
                out[torch.from_numpy(mask)] = f
        return out


class DistillSet(Dataset):
    """Yields (student image, teacher image or empty, label, item index, view) for one epoch."""

    def __init__(self, items, student_spec: dict, teacher_spec: dict | None, augment: str, views: int,
                 crop_pct: float, seed: int, online: bool, n_real: int | None = None, student_augment: str = ""):
        """``items[:n_real]`` are real images, whose fixed views are drawn under ``seed`` (each seed has its own
        augmented views); the rest (synthetic) keep the views their shared cache was computed with (salt 0).
        ``student_augment`` (``data.student_augment``): a fresh augmentation of the student's image each epoch on top
        of the view, which is what the teacher saw (Noisy Student)."""
        self.items, self.sspec, self.tspec = items, student_spec, teacher_spec
        self.student_augment = student_augment
        self.augment, self.views, self.crop_pct, self.seed, self.online = augment, views, crop_pct, seed, online
        self.n_real = len(items) if n_real is None else n_real
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        # k = i + r * len(items): repeat r of item i (GlobalBatchSampler.repeats); r = 0 draws what it always drew.
        r, i = divmod(int(k), len(self.items))
        path, label = self.items[i][0], self.items[i][1]
        if self.online:  # a fresh augmentation each epoch (and repeat); the teacher sees this same view
            view, vseed = 0, derived_seed("online", self.seed, self.epoch, i, *((r,) if r else ()))
        else:  # one of the fixed views whose teacher features are cached
            rng = np.random.default_rng(derived_seed("pick", self.seed, self.epoch, i))
            view = int(rng.integers(self.views))
            if r:  # repeat r: the r-th of the other views in a random order, so N <= views repeats are N views
                others = rng.permutation([v for v in range(self.views) if v != view])
                view = int(([view] + others.tolist())[r % self.views])
            vseed = view_seed(path, view, self.seed if i < self.n_real else 0)
        img = view_image(path, self.augment, vseed, self.crop_pct)
        t = torch.from_numpy(resize_normalize(img, self.tspec)) if self.online and self.tspec else torch.empty(0)
        if self.student_augment:  # the view is already cropped: crop nothing more
            rng = np.random.default_rng(derived_seed("student", self.seed, self.epoch, i, *((r,) if r else ())))
            img = AUGMENTS.get(self.student_augment)(img, rng, 1.0)
        s = torch.from_numpy(resize_normalize(img, self.sspec))
        return s, t, label, i, view


class GlobalBatchSampler(Sampler):
    """Global batches drawn from real and synthetic items (P1: equal frequency); each rank takes batch[rank::world]."""

    def __init__(self, n_real: int, n_synth: int, batch_size: int, seed: int, real_fraction: float = 0.5,
                 epoch_size: int = 0, repeats: int = 1):
        """``epoch_size`` (> 0) fixes the items per epoch, e.g. a baseline matching the distilled student's budget
        with real images only: the real images are then repeated in fresh permutations. ``repeats`` (N > 1,
        ``train.repeated_aug``, which ``train`` sets): the first ceil(size / N) distinct items of the epoch, each N
        times in a row, so in the same global batch on one or across ranks (timm's RepeatAugSampler); the epoch keeps
        its size, and so its steps and the baseline's budget. Repeat r of item i is yielded as ``i + r * items``."""
        self.n_real, self.n_synth, self.seed, self.rf = n_real, n_synth, seed, real_fraction
        self.fixed_size, self.repeats = epoch_size, repeats
        self.rank, self.world = distributed.world()
        n = self.epoch_size()
        self.batch = min(batch_size, n)
        self.batch -= self.batch % self.world
        if self.batch < self.world:
            raise ValueError(f"Too few training images ({n}) for {self.world} processes")
        self.epoch = 0

    def epoch_size(self) -> int:
        if self.fixed_size:
            return self.fixed_size
        if self.n_real and self.n_synth:
            return self.n_real + int(round(self.n_real * (1 - self.rf) / self.rf))
        return self.n_real + self.n_synth

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def order(self) -> np.ndarray:
        rng = np.random.default_rng(derived_seed("order", self.seed, self.epoch))
        real = np.arange(self.n_real)
        synth = self.n_real + np.arange(self.n_synth)
        if not self.n_synth:
            n = self.epoch_size()
            return np.concatenate([rng.permutation(real) for _ in range(math.ceil(n / self.n_real))])[:n]
        if self.n_real:
            want = self.epoch_size() - self.n_real
            synth = np.concatenate([rng.permutation(synth) for _ in range(math.ceil(want / self.n_synth))])[:want]
        return rng.permutation(np.concatenate([real, synth]))

    def __len__(self):
        return self.epoch_size() // self.batch

    def repeated(self, order: np.ndarray) -> np.ndarray:
        """``order`` with its first ceil(n / N) distinct items each N times in a row (repeat r as ``i + r * items``)."""
        n, reps = len(order), self.repeats
        if reps <= 1:
            return order
        # Distinct: an epoch padded with synthetic images or to the baseline's budget holds some items twice, and a
        # second copy of repeat r would be the very same view.
        _, first = np.unique(order, return_index=True)
        drawn = np.resize(order[np.sort(first)], math.ceil(n / reps))  # cycles only if too few items are distinct
        return (np.repeat(drawn, reps) + np.tile(np.arange(reps), len(drawn)) * (self.n_real + self.n_synth))[:n]

    def __iter__(self):
        order = self.repeated(self.order())
        for b in range(len(self)):
            yield order[b * self.batch:(b + 1) * self.batch][self.rank::self.world].tolist()


def lr_lambda(cfg, steps_per_epoch: int):
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    total = max(1, cfg.epochs * steps_per_epoch)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def make_optimizer(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lamb":
        return make_lamb(model, cfg)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_lamb(model, cfg):
    """timm's LAMB as RSB and P3 train with it (timm's create_optimizer_v2 defaults): no weight decay on biases and
    norm weights, which LAMB then leaves un-adapted (its trust ratio applies where weight decay is on), and the
    gradient clipped to a global norm of 1 inside the step (timm's ``max_grad_norm``)."""
    from timm.optim import Lamb, param_groups_weight_decay

    return Lamb(param_groups_weight_decay(model, cfg.weight_decay), lr=cfg.lr)


def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap and never hand freed memory back to the kernel.

    A CPU training step frees and allocates the same large activation buffers again and again. By default glibc maps
    each buffer over 32 MB afresh and unmaps it when freed (and trims the heap's top), so the kernel zero-fills those
    pages on every step: system time and page faults. A Lite0 step at 192 px, batch 16, ran ~9% faster with this
    (benchmarks/RESULTS.md). The process keeps its peak memory until it exits. Returns whether it applied: only on
    Linux with glibc; elsewhere nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def train(model, dataset: DistillSet, sampler: GlobalBatchSampler, cfg, weights, out_dir, key: str,
          teacher=None, teacher_features: TeacherFeatures | None = None, workers: int = 0, desc: str = "train",
          device: str = "cpu", mixup: float = 0.0, num_classes: int = 0, cutmix: float = 0.0,
          evaluate=None) -> list[dict]:
    """Train ``model`` in place; checkpoints every epoch to ``out_dir/checkpoint.pt`` and resumes from it.

    ``evaluate(model, epoch) -> dict`` (optional) runs after an epoch when ``cfg.eval_every`` says so; its figures
    (validation accuracy) join that epoch's log row. Returns the per-epoch log rows (``out_dir/log.jsonl``).
    """
    # 1. Place the model, wrap it for DDP, build optimiser and schedule.
    keep_freed_memory()  # CPU steps reuse their activation memory instead of the kernel zero-filling it anew
    out_dir = Path(out_dir)
    rank, world = distributed.world()
    cuda = device.startswith("cuda")
    model.to(device)
    if cfg.channels_last:  # faster convolutions on GPUs and on oneDNN CPUs alike
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device)
    objective = Objective.for_dataset(model, weights, teacher, dataset, num_classes, cfg.seed, device)
    net = DistributedDataParallel(objective, device_ids=[device] if cuda else None) if world > 1 else objective
    step_fn = torch.compile(net) if cfg.compile else net
    sampler.repeats = cfg.repeated_aug  # the dataset decodes each repeat into a view of its own
    opt = make_optimizer(objective, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, len(sampler)))
    # Workers are started anew each epoch: a persistent worker keeps its copy of the dataset at epoch 0 forever.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.amp else torch.autocast("cpu", enabled=False)

    # 2. Resume from the last finished epoch of the same configuration.
    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "log.jsonl"
    start, rows = 0, []
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt.get("key") == key:
            objective.load(ckpt)  # the student's weights and the loss modules' state
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            start, rows = ckpt["epoch"] + 1, ckpt["log"]
            if distributed.is_main():
                log.info("%s: resuming from the checkpoint after epoch %d of %d", desc, start, cfg.epochs)

    # 3. Epochs (each row also to TensorBoard when train.log asks for it).
    scalars = ScalarLog(cfg, out_dir)
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        torch.manual_seed(derived_seed("torch", cfg.seed, epoch, rank))
        model.train()
        sums, seen, t0 = {}, 0, time.perf_counter()
        bar = progress(loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}", disable=not distributed.is_main())
        for xs, xt, labels, idx, views in bar:
            xs, labels = xs.to(device, non_blocking=True), labels.to(device)
            if cfg.channels_last:
                xs = xs.contiguous(memory_format=torch.channels_last)
            t_feat = t_logits = None
            if teacher is not None:
                t_feat = teacher.encode(xt.to(device)) if xt.numel() else teacher_features.get(idx, views).to(device)
                if mixup > 0 or cutmix > 0:
                    xs, t_feat, labels = mix_real(xs, xt.to(device) if xt.numel() else None, labels, teacher, mixup,
                                                  derived_seed("mix", cfg.seed, epoch, int(idx[0])), t_feat,
                                                  num_classes, cutmix)
                t_logits = teacher.logits(t_feat)
            with amp:
                terms = step_fn(xs, objective.inputs(t_feat, t_logits, labels, idx))
                loss = objective.total(terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            seen += len(xs) * world
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(xs)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}", refresh=False)
        elapsed = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "steps": len(sampler), "images": seen, "lr": sched.get_last_lr()[0],
               "images_per_s": seen / elapsed, "seconds": elapsed}
        row.update({k: distributed.all_reduce_mean(v / max(1, seen // world)) for k, v in sums.items()})
        if evaluate is not None and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            row.update(evaluate(model, epoch + 1))
        rows.append(row)
        if distributed.is_main():
            log.info("%s epoch %d/%d: %s", desc, epoch + 1, cfg.epochs,
                     ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch",)))
            atomic_torch_save({"key": key, "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "losses": objective.loss_state(), "log": rows},
                              ckpt_path)
            # Rewritten whole from the checkpoint's rows: a restarted stage never keeps a killed run's extra rows.
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in rows))
            scalars.add_row(row)
        distributed.barrier()
    scalars.close()
    objective.close()
    return rows


def mix_real(xs, xt, labels, teacher, alpha, seed, t_feat, num_classes: int, cutmix: float = 0.0):
    """Mixup or CutMix on real labelled images only (P1, P3); needs the online teacher so it sees the mixed image.

    With both set, each batch picks one of the two at even odds (as timm's Mixup does). CutMix pastes the same
    relative box into the student's and the teacher's image (their sizes may differ) and mixes the labels by the
    pasted area.
    """
    real = (labels >= 0).nonzero().flatten()
    soft = torch.zeros(len(labels), num_classes, device=labels.device)
    soft[real, labels[real]] = 1.0
    if len(real) < 2 or xt is None:
        return xs, t_feat, soft
    g = torch.Generator().manual_seed(seed)
    use_cut = cutmix > 0 and (alpha <= 0 or float(torch.rand(1, generator=g)) < 0.5)
    a = cutmix if use_cut else alpha
    lam = _beta(a, g)
    perm = real[torch.randperm(len(real), generator=g)]
    xs, xt = xs.clone(), xt.clone()
    if use_cut:
        box = cut_box(lam, g)
        for x in (xs, xt):
            y0, y1, x0, x1 = scale_box(box, x.shape[-2], x.shape[-1])
            x[real, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        y0, y1, x0, x1 = scale_box(box, xs.shape[-2], xs.shape[-1])
        lam = 1 - (y1 - y0) * (x1 - x0) / (xs.shape[-2] * xs.shape[-1])  # the area actually pasted
    else:
        xs[real] = lam * xs[real] + (1 - lam) * xs[perm]
        xt[real] = lam * xt[real] + (1 - lam) * xt[perm]
    soft[real] = lam * soft[real] + (1 - lam) * soft[perm]
    return xs, teacher.encode(xt), soft


def _beta(a: float, g: torch.Generator) -> float:
    """A Beta(a, a) draw from ``g`` (torch's Beta sampler has no generator argument): X / (X + Y), X, Y ~ Gamma(a)."""
    x, y = (float(torch._standard_gamma(torch.tensor(a, dtype=torch.float64), generator=g)) for _ in range(2))
    return x / (x + y) if x + y > 0 else 0.5


def cut_box(lam: float, g: torch.Generator) -> tuple[float, float, float, float]:
    """A box covering a (1 - lam) share of the image, centred at random, in relative coordinates (y0, y1, x0, x1)."""
    side = (1 - lam) ** 0.5
    cy, cx = (float(v) for v in torch.rand(2, generator=g))
    return (max(cy - side / 2, 0.0), min(cy + side / 2, 1.0), max(cx - side / 2, 0.0), min(cx + side / 2, 1.0))


def scale_box(box, h: int, w: int) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = box
    return int(round(y0 * h)), int(round(y1 * h)), int(round(x0 * w)), int(round(x1 * w))


class EvalSet(Dataset):
    def __init__(self, items, spec: dict, crop_pct: float):
        self.items, self.spec, self.crop_pct = items, spec, crop_pct

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img = view_image(self.items[i][0], "none", None, self.crop_pct)
        return torch.from_numpy(resize_normalize(img, self.spec)), self.items[i][1]


@torch.no_grad()
def predict(model, items, spec: dict, crop_pct: float, batch_size: int = 64, device: str = "cpu",
            workers: int = 0, desc: str = "evaluate") -> dict:
    """Outputs of the student on the un-augmented view of each item: {'logits': ..., 'embedding': ...}."""
    model.eval().to(device).to(memory_format=torch.channels_last)
    outs: dict = {}
    loader = DataLoader(EvalSet(items, spec, crop_pct), batch_size=batch_size, num_workers=workers)
    for x, _ in progress(loader, desc=desc, disable=not distributed.is_main()):
        for k, v in model(x.to(device).contiguous(memory_format=torch.channels_last)).items():
            outs.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in outs.items()}
