"""Distillation losses: plain functions of tensors, one per loss, each citing the paper it comes from."""
import torch
import torch.nn.functional as F


def cross_entropy(logits, target, label_smoothing: float = 0.0):
    """Task loss on real labels; ``target`` is class indices or a soft (B, K) distribution (Mixup)."""
    if target.dim() == 2:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def kd(student_logits, teacher_logits, temperature: float = 2.0):
    """Hinton KD (P1 Eq. 4, P3 Eq. 1): T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    T = temperature
    log_p_s = F.log_softmax(student_logits / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=-1)
    return T * T * torch.sum(log_p_t.exp() * (log_p_t - log_p_s), dim=-1).mean()


def hard_kd(student_logits, teacher_logits):
    """Hard-label KD (P1 Table I): cross-entropy against the teacher's argmax."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))


def feature_l2(student_embedding, teacher_embedding):
    """P4's L_FD: ||s/||s|| - t/||t|| ||_2 averaged over the batch (not squared; squared equals 2 - 2cos)."""
    s = F.normalize(student_embedding, dim=-1)
    t = F.normalize(teacher_embedding, dim=-1)
    return (s - t).norm(dim=-1).mean()


def alignment(zs, zt, alpha: float = 2.0):
    """P2 Eq. 2 (Wang & Isola): E ||z_s - z_t||^alpha over positive pairs of L2-normalised projections."""
    return (zs - zt).norm(dim=-1).pow(alpha).mean()


def uniformity(z, t: float = 2.0):
    """Wang & Isola: log E_{i != j} exp(-t ||z_i - z_j||^2) (P2 prints it without the log; the log is stable)."""
    sq = torch.pdist(z, p=2).pow(2)
    return sq.mul(-t).exp().mean().log()


def align_uniform(zs, zt, w_align: float = 1.0, w_uniform: float = 1.0):
    """P2's L_Embed = w_a * L_align + w_u * (L_uniform(S) + L_uniform(T)); inputs are L2-normalised."""
    return w_align * alignment(zs, zt) + w_uniform * (uniformity(zs) + uniformity(zt))
