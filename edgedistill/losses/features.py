"""Losses on features: P4's L2 on normalised embeddings, P2's alignment/uniformity, InfoNCE and SRRL, and P3's hint
loss on an intermediate feature map. Their projectors, connectors and adapters train with the student and are never
exported. Teacher tensors are detached inside every function: no gradient ever reaches the teacher.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .base import needs_online_teacher, needs_teacher_head, register_loss


def feature_l2(student_embedding, teacher_embedding):
    """P4's L_FD: ||s/||s|| - t/||t|| ||_2 averaged over the batch (not squared; squared equals 2 - 2cos)."""
    s = F.normalize(student_embedding, dim=-1)
    t = F.normalize(teacher_embedding.detach(), dim=-1)
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


def infonce(zs, zt, tau: float = 0.1):
    """P2 Eq. 1: -log[e^{s_i.t_i/tau} / (sum_j e^{s_i.t_j/tau} + sum_j e^{s_j.t_i/tau})], mean over i.

    The denominator sums both directions, as printed (the positive pair appears in both sums); ``zs``, ``zt`` are
    L2-normalised projections of the student's and the teacher's features of the same images.
    """
    L = zs @ zt.t() / tau  # L[i, j] = s_i . t_j / tau
    denominator = torch.logsumexp(torch.cat([L, L.t()], dim=1), dim=1)  # row i: s_i against every t_j, t_i every s_j
    return (denominator - L.diagonal()).mean()


def srrl(connected, teacher_features, teacher_logits, teacher_head):
    """SRRL (Yang et al. 2021; P2 Sec. 1): the student's features through a connector are regressed onto the teacher's
    features (feature matching) and, passed through the teacher's frozen classifier, onto its logits (softmax
    regression): MSE(c, f_t) + MSE(W_t(c), z_t), with c = connector(f_s) (jingyang2017/SRRL weighs both 1).

    The classifier runs with detached copies of its parameters, so the gradient reaches the connector through it
    but never its weights.
    """
    params = {k: v.detach() for k, v in teacher_head.named_parameters()}
    buffers = dict(teacher_head.named_buffers())
    regressed = functional_call(teacher_head, {**params, **buffers}, (connected,))
    return F.mse_loss(connected, teacher_features.detach()) + F.mse_loss(regressed, teacher_logits.detach())


def as_map(x: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) feature map, or ViT tokens (B, N, C) as a (B, C, N, 1) map."""
    return x if x.dim() == 4 else x.transpose(1, 2).unsqueeze(-1)


def hint(student_map, teacher_map, adapter: nn.Module, norm: str = "l2"):
    """P3 Eq. 2 (FitNets-style hint): D_hint(T_s(F^s), F^t), D the mean squared (l2) or absolute (l1) difference.

    T_s is the ``adapter`` (a 1x1 convolution to the teacher's channels), its output resized bilinearly to the
    teacher map's spatial size; the teacher side is the identity.
    """
    t = as_map(teacher_map.detach())
    s = adapter(as_map(student_map))
    if s.shape[-2:] != t.shape[-2:]:
        s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
    return F.l1_loss(s, t) if norm == "l1" else F.mse_loss(s, t)


# ---------------------------------------------------------------------------------------------------------------
# Modules and registry entries


def mlp(n_in: int, n_out: int, hidden: int = 0) -> nn.Module:
    """MoCo v2's 2-layer projector (P2's default): Linear, ReLU, Linear."""
    hidden = hidden or n_in
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def two_projectors(cfg, dims) -> nn.Module:
    """Student and teacher projectors to ``loss.proj_dim`` (P2: both trained, the teacher backbone frozen)."""
    return nn.ModuleDict({"student": mlp(dims.features, cfg.proj_dim), "teacher": mlp(dims.teacher, cfg.proj_dim)})


def project(module, b):
    return (F.normalize(module["student"](b.features), dim=-1),
            F.normalize(module["teacher"](b.teacher_features.detach()), dim=-1))


@register_loss("feature_l2", needs=("embedding", "teacher_features"))
def _feature_l2(b, module, cfg):
    return feature_l2(b.embedding, b.teacher_features)


@register_loss("align_uniform", needs=("features", "teacher_features"), modules=two_projectors)
def _align_uniform(b, module, cfg):
    return align_uniform(*project(module, b))


@register_loss("infonce", needs=("features", "teacher_features"), modules=two_projectors)
def _infonce(b, module, cfg):
    return infonce(*project(module, b), cfg.infonce_tau)


def srrl_connector(cfg, dims) -> nn.Module:
    """P2: an MLP connector from the student's features to the teacher's, mid_dim the mean of the two."""
    return mlp(dims.features, dims.teacher, (dims.features + dims.teacher) // 2)


@register_loss("srrl", needs=("features", "teacher_features", "teacher_logits", "teacher_head"),
               modules=srrl_connector,
               constraints=(needs_teacher_head("srrl", ("linear", "mlp"), "SRRL passes the student's features "
                                               "through the teacher's linear or MLP classifier"),))
def _srrl(b, module, cfg):
    return srrl(module(b.features), b.teacher_features, b.teacher_logits, b.teacher_head)


def hint_adapter(cfg, dims) -> nn.Module:
    """FitNets' regressor: a 1x1 convolution from the student map's channels to the teacher map's."""
    return nn.Conv2d(dims.student_map, dims.teacher_map, kernel_size=1)


@register_loss("hint", needs=("student_map", "teacher_map"), modules=hint_adapter,
               constraints=(needs_online_teacher("hint", "cached teacher features hold no intermediate maps"),))
def _hint(b, module, cfg):
    return hint(b.student_map, b.teacher_map, module, cfg.hint_norm)
