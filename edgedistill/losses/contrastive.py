"""Contrastive losses: CRD with its memory of negatives (P1/P2/P3), and P4's image-image contrastive loss, CLIP loss
against class captions and multi-positive loss. Teacher tensors are detached inside every function.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .base import LearnableTemperature, needs_teacher_head, register_loss, target_classes
from .features import mlp


def crd(zs, zt, memory_s, memory_t, index, negatives, tau: float = 0.07):
    """CRD (Tian et al. 2020; P1 Table I with KD, P2's CRD++, P3 Tables 3-4), in its softmax form.

    ``zs``, ``zt``: (B, d) L2-normalised projections of the student's and the teacher's features; ``memory_s``,
    ``memory_t``: (N, d) running embeddings of every training item; ``index``: (B,) the batch's items (the
    positives' slots); ``negatives``: (B, K) other slots. Each side is contrasted with the other side's memory:
    CE([z_s . m_t[i], z_s . m_t[n_1..K]] / tau, 0) + CE([z_t . m_s[i], z_t . m_s[n_1..K]] / tau, 0).
    RepDistiller estimates this with NCE and a normalising constant; the softmax form needs no constant and uses
    the same positives and negatives.
    """
    slots = torch.cat([index[:, None], negatives], dim=1)  # column 0: the positive
    target = torch.zeros(len(zs), dtype=torch.long, device=zs.device)
    l_s = torch.einsum("bd,bkd->bk", zs, memory_t[slots].detach()) / tau
    l_t = torch.einsum("bd,bkd->bk", zt, memory_s[slots].detach()) / tau
    return F.cross_entropy(l_s, target) + F.cross_entropy(l_t, target)


def contrastive(student_embedding, teacher_embedding, tau):
    """P4 App. A.7: sum_i -log[exp(<I_i^S, I_i^T>/tau) / sum_k exp(<I_i^S, I_k^T>/tau)], here the batch mean, on
    L2-normalised embeddings; ``tau`` is learnable (a tensor from ``LearnableTemperature``)."""
    s, t = F.normalize(student_embedding, dim=-1), F.normalize(teacher_embedding.detach(), dim=-1)
    logits = s @ t.t() / tau
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device))


def clip_caption(student_embedding, text, classes, tau):
    """P4's vision-language baseline (Tables 10-11, "CLIP"): the standard symmetric CLIP loss between the student's
    image embeddings and the teacher's text embeddings of each image's class caption, (CE(L, diag) + CE(L^T, diag)) / 2
    with
    L[i, j] = <I_i, Z_{c_j}> / tau. Captions repeat within a batch, as P4 notes; they stay negatives, as printed.
    """
    s = F.normalize(student_embedding, dim=-1)
    z = F.normalize(text.detach()[classes], dim=-1)
    logits = s @ z.t() / tau
    diag = torch.arange(len(s), device=s.device)
    return (F.cross_entropy(logits, diag) + F.cross_entropy(logits.t(), diag)) / 2


def multi_positive(student_embedding, text, classes, tau: float = 0.1):
    """P4 App. A.15 (after StableRep): L_MP = -(1/K) sum_k sum_i p_i(k) log q_i(k), with
    q_i(k) = softmax_k(<I_i, Z_k> / tau) over the K class captions and p_i(k) = 1[c_i = k] / #{j : c_j = k}
    (classes absent from the batch add nothing)."""
    K = text.shape[0]
    log_q = F.log_softmax(F.normalize(student_embedding, dim=-1) @ F.normalize(text.detach(), dim=-1).t() / tau, -1)
    onehot = F.one_hot(classes, K).to(log_q.dtype)
    p = onehot / onehot.sum(0, keepdim=True).clamp_min(1.0)
    return -(p * log_q).sum() / K


# ---------------------------------------------------------------------------------------------------------------
# Modules and registry entries


class CRDMemory(nn.Module):
    """CRD's trainable projectors (P2: MLP) and its memory of every item's student and teacher embeddings.

    The memories are buffers: they are checkpointed with the loss modules, so a resumed run draws the same
    negatives against the same memory.
    """

    def __init__(self, cfg, dims):
        super().__init__()
        self.student, self.teacher = mlp(dims.features, cfg.proj_dim), mlp(dims.teacher, cfg.proj_dim)
        n = max(1, dims.items)
        self.register_buffer("memory_s", F.normalize(torch.randn(n, cfg.proj_dim), dim=-1))
        self.register_buffer("memory_t", F.normalize(torch.randn(n, cfg.proj_dim), dim=-1))

    @torch.no_grad()
    def update(self, index, zs, zt, momentum: float):
        """m[i] <- normalise(momentum * m[i] + (1 - momentum) * z_i), as RepDistiller's ContrastMemory."""
        for memory, z in ((self.memory_s, zs), (self.memory_t, zt)):
            memory.index_copy_(0, index, F.normalize(momentum * memory[index] + (1 - momentum) * z.detach(), dim=-1))


@register_loss("crd", needs=("features", "teacher_features", "index"), modules=CRDMemory)
def _crd(b, module, cfg):
    zs = F.normalize(module.student(b.features), dim=-1)
    zt = F.normalize(module.teacher(b.teacher_features.detach()), dim=-1)
    index = b.index.to(zs.device)
    negatives = torch.randint(0, module.memory_s.shape[0], (len(zs), cfg.crd_negatives), device=zs.device)
    loss = crd(zs, zt, module.memory_s, module.memory_t, index, negatives, cfg.crd_tau)
    module.update(index, zs, zt, cfg.crd_momentum)
    return loss


@register_loss("contrastive", needs=("embedding", "teacher_features"),
               modules=lambda cfg, dims: LearnableTemperature(cfg.contrastive_tau))
def _contrastive(b, module, cfg):
    return contrastive(b.embedding, b.teacher_features, module())


def needs_text(key: str):
    return needs_teacher_head(key, ("zeroshot",), "the class caption embeddings come from the CLIP teacher's text "
                                                  "encoder (its zero-shot head)")


@register_loss("clip_caption", needs=("embedding", "text", "labels", "teacher_logits"),
               modules=lambda cfg, dims: LearnableTemperature(cfg.clip_caption_tau),
               constraints=(needs_text("clip_caption"),))
def _clip_caption(b, module, cfg):
    return clip_caption(b.embedding, b.text, target_classes(b.labels, b.teacher_logits), module())


@register_loss("multi_positive", needs=("embedding", "text", "labels", "teacher_logits"),
               constraints=(needs_text("multi_positive"),))
def _multi_positive(b, module, cfg):
    return multi_positive(b.embedding, b.text, target_classes(b.labels, b.teacher_logits), cfg.multi_positive_tau)
