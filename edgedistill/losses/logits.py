"""Losses on class scores: the task terms (CE, BCE) and the logit distillation terms (KD, hard KD, DKD, DIST, BKL).

Teacher tensors are detached inside every function: no gradient ever reaches the teacher.
"""
import torch
import torch.nn.functional as F

from .base import labelled_mask, register_loss, target_classes


def cross_entropy(logits, target, label_smoothing: float = 0.0):
    """Task loss on real labels (P1 Eq. 2); ``target`` is class indices or a soft (B, K) distribution (Mixup)."""
    if target.dim() == 2:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def kd(student_logits, teacher_logits, temperature: float = 2.0):
    """Hinton KD (P1 Eq. 4, P3 Eq. 1): T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    T = temperature
    log_p_s = F.log_softmax(student_logits / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / T, dim=-1)
    return T * T * torch.sum(log_p_t.exp() * (log_p_t - log_p_s), dim=-1).mean()


def hard_kd(student_logits, teacher_logits, class_balance: bool = False):
    """Hard-label KD (P1 Table I): cross-entropy against the teacher's argmax.

    ``class_balance``: the mean over the teacher's classes present in the batch of each class's mean loss, so a rare
    class (a defect) weighs as much as the majority.
    """
    target = teacher_logits.detach().argmax(dim=-1)
    if not class_balance:
        return F.cross_entropy(student_logits, target)
    per_image = F.cross_entropy(student_logits, target, reduction="none")
    weight = 1.0 / torch.bincount(target, minlength=student_logits.shape[-1]).to(per_image.dtype)[target]
    return (weight * per_image).sum() / weight.sum()


def dkd(student_logits, teacher_logits, target, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0):
    """Decoupled KD (Zhao et al. 2022; P1 Table I, P3 Tables 3-5): alpha * TCKD + beta * NCKD.

    With p = softmax(z/T): TCKD = T^2 KL([p_t^T, 1 - p_t^T] || [p_t^S, 1 - p_t^S]), the binary split into the
    target class and the rest; NCKD = T^2 KL(p^T_rest || p^S_rest), over the non-target classes renormalised among
    themselves. Both are averaged over the batch (checked against mdistiller's ``dkd_loss``). P1 Table I and P3
    print no equation for it; this is the DKD paper's alpha * TCKD + beta * NCKD.
    """
    T = temperature
    gt = F.one_hot(target, student_logits.shape[-1]).bool()
    p_s, p_t = F.softmax(student_logits / T, dim=-1), F.softmax(teacher_logits.detach() / T, dim=-1)
    bs = torch.stack([p_s[gt], 1 - p_s[gt]], dim=-1).clamp_min(1e-12)
    bt = torch.stack([p_t[gt], 1 - p_t[gt]], dim=-1)
    tckd = torch.sum(torch.xlogy(bt, bt) - bt * bs.log(), dim=-1).mean()
    # Non-target classes only: the target logit masked out before the softmax (its probability becomes 0).
    log_q_s = F.log_softmax(student_logits / T - 1000.0 * gt, dim=-1)
    q_t = F.softmax(teacher_logits.detach() / T - 1000.0 * gt, dim=-1)
    nckd = torch.sum((torch.xlogy(q_t, q_t) - q_t * log_q_s).masked_fill(gt, 0.0), dim=-1).mean()
    return T * T * (alpha * tckd + beta * nckd)


def pearson(a, b, eps: float = 1e-8):
    """Row-wise Pearson correlation of (N, M) tensors: the cosine of the mean-centred rows."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist(student_logits, teacher_logits, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0):
    """DIST (Huang et al. 2022; P3 Tables 3-5): beta * inter-class + gamma * intra-class relation loss.

    With Y = softmax(z / tau) of shape (B, K): inter = 1 - mean_i pearson(Y_s[i, :], Y_t[i, :]) (each image's
    class ranking), intra = 1 - mean_k pearson(Y_s[:, k], Y_t[:, k]) (each class across the batch); both times
    tau^2 (checked against hunto/DIST_KD; P3 prints no equation for it).
    """
    y_s, y_t = F.softmax(student_logits / tau, dim=-1), F.softmax(teacher_logits.detach() / tau, dim=-1)
    inter = 1 - pearson(y_s, y_t).mean()
    intra = 1 - pearson(y_s.t(), y_t.t()).mean()
    return tau * tau * (beta * inter + gamma * intra)


def bkl(student_logits, teacher_logits):
    """Binary KL (P3 Eq. 3): sum_k [p_t log(p_t / p_s) + (1 - p_t) log((1 - p_t) / (1 - p_s))], batch mean.

    p_s = sigmoid(z_s) per class (the student as K binary classifiers, as with a BCE label loss) and p_t =
    softmax(z_t) (vanillaKD's BinaryKLDiv takes the teacher's softmax as its BCE targets; the two differ by the
    teacher's entropy, a constant).
    """
    p_t = F.softmax(teacher_logits.detach(), dim=-1)
    log_ps, log_1mps = F.logsigmoid(student_logits), F.logsigmoid(-student_logits)
    per_class = torch.xlogy(p_t, p_t) - p_t * log_ps + torch.xlogy(1 - p_t, 1 - p_t) - (1 - p_t) * log_1mps
    return per_class.sum(-1).mean()


def bce(logits, target, label_smoothing: float = 0.0):
    """BCE label loss (P3 Table 4, after "ResNet strikes back"): sigmoid cross-entropy against one-hot (or Mixup
    soft) targets, averaged over classes and images; smoothing as timm's BinaryCrossEntropy (off = s/K, on = 1-s+off).
    """
    K = logits.shape[-1]
    onehot = target if target.dim() == 2 else F.one_hot(target, K).to(logits.dtype)
    off = label_smoothing / K
    return F.binary_cross_entropy_with_logits(logits, onehot * (1 - label_smoothing) + off)


# ---------------------------------------------------------------------------------------------------------------
# Registry entries: how each loss is fed from a batch (LossInputs) and the recipe's LossCfg.


@register_loss("ce", needs=("logits", "labels"))
def _ce(b, module, cfg):
    keep = labelled_mask(b.labels)  # synthetic/unlabelled images never feed the task term (P1)
    return cross_entropy(b.logits[keep], b.labels[keep], cfg.label_smoothing) if keep.any() else None


@register_loss("kd", needs=("logits", "teacher_logits"))
def _kd(b, module, cfg):
    return kd(b.logits, b.teacher_logits, cfg.temperature)


@register_loss("hard_kd", needs=("logits", "teacher_logits"))
def _hard_kd(b, module, cfg):
    return hard_kd(b.logits, b.teacher_logits, cfg.class_balance)


@register_loss("dkd", needs=("logits", "teacher_logits", "labels"))
def _dkd(b, module, cfg):
    target = target_classes(b.labels, b.teacher_logits)
    return dkd(b.logits, b.teacher_logits, target, cfg.dkd_alpha, cfg.dkd_beta, cfg.temperature)


@register_loss("dist", needs=("logits", "teacher_logits"))
def _dist(b, module, cfg):
    return dist(b.logits, b.teacher_logits, cfg.dist_beta, cfg.dist_gamma, cfg.dist_tau)


@register_loss("bkl", needs=("logits", "teacher_logits"))
def _bkl(b, module, cfg):
    return bkl(b.logits, b.teacher_logits)


@register_loss("bce", needs=("logits", "labels"))
def _bce(b, module, cfg):
    keep = labelled_mask(b.labels)
    return bce(b.logits[keep], b.labels[keep], cfg.label_smoothing) if keep.any() else None
