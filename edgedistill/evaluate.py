"""Accuracy, teacher-student agreement, per-class accuracy, confusion matrices and per-image GFLOPs."""
from contextlib import contextmanager

import numpy as np
import torch

from .utils import atomic_savefig


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percent of rows whose label is among the k highest scores."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hits.float().mean().item()


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (labels, pred), 1)
    return m


def balanced_accuracy(m: np.ndarray) -> float:
    """Mean per-class recall in percent over the classes present (rows of the confusion matrix with images)."""
    present = m.sum(1) > 0
    return float(100.0 * (np.diag(m)[present] / m.sum(1)[present]).mean()) if present.any() else 0.0


def macro_f1(m: np.ndarray) -> float:
    """Unweighted mean over classes present of F1 = 2 TP / (2 TP + FP + FN), in percent."""
    tp = np.diag(m).astype(float)
    fp, fn = m.sum(0) - tp, m.sum(1) - tp
    present = m.sum(1) > 0
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(100.0 * f1[present].mean()) if present.any() else 0.0


def classification_metrics(logits: torch.Tensor, labels, class_names, top_k: int = 5) -> dict:
    """top-1, balanced accuracy and macro-F1 (percent), per-class recall, the confusion matrix (rows: true class),
    and top-k only when there are more than k classes (with k or fewer it is 100% by construction)."""
    labels = torch.as_tensor(labels)
    pred = logits.argmax(1)
    m = confusion(pred.numpy(), labels.numpy(), len(class_names))
    per_class = {c: (100.0 * m[i, i] / m[i].sum() if m[i].sum() else None) for i, c in enumerate(class_names)}
    out = {"top1": topk_accuracy(logits, labels, 1), "balanced_accuracy": balanced_accuracy(m),
           "macro_f1": macro_f1(m), "per_class": per_class, "confusion": m.tolist(), "n": int(len(labels))}
    if len(class_names) > top_k:
        out[f"top{top_k}"] = topk_accuracy(logits, labels, top_k)
    return out


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Percent of images on which two models predict the same class."""
    return 100.0 * (a.argmax(1) == b.argmax(1)).float().mean().item()


def gflops(model: torch.nn.Module, size: int) -> float:
    """Forward GFLOPs for one image (2 FLOPs per multiply-add), counted by torch's FlopCounterMode.

    Counted where the model lives (CPU, CUDA or the meta device), on an input of its dtype, in eval mode. The
    parameters are never moved or cast and every module's training flag is put back: a teacher still in use on
    CUDA afterwards (online teacher, corruption runs) must find itself where it was.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device, dtype = _placement(model)
    x = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
    with torch.no_grad(), _eval_mode(model), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def params_used(model: torch.nn.Module, size: int) -> int:
    """Parameters of the modules that one forward pass actually runs (an unused classifier does not count)."""
    ran = []
    hooks = [m.register_forward_pre_hook(lambda mod, _: ran.append(mod)) for m in model.modules()]
    device, dtype = _placement(model)
    try:
        with torch.no_grad(), _eval_mode(model):
            model(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
    seen = {id(p): p.numel() for m in ran for p in m.parameters(recurse=False)}
    return sum(seen.values())


def _placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter or buffer (CPU float32 when none)."""
    tensors = (t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    first = next(tensors, None)
    return (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode inside the block (no BatchNorm statistics update); each module's own flag restored after.

    Flags are restored one by one, not with ``model.train(flag)``, which would unfreeze a submodule deliberately
    kept in eval mode inside a training model.
    """
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def plot_confusion(matrix, class_names, path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * n, 16), min(1.6 + 0.45 * n, 15)))
    ax.imshow(m, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticklabels(class_names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(m[i, j]), ha="center", va="center",
                        color="white" if m[i, j] > m.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
