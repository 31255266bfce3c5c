"""Distillation losses: plain functions of tensors, one per loss, each citing its paper, and the registry that tells
the training loop what each needs (``base.py``). ``from edgedistill import losses; losses.kd(s, t, 2.0)``.

| key | loss | paper | module |
|---|---|---|---|
| ce, bce | task terms on real labels (CE; BCE as in RSB) | P1, P3 Table 4 | logits.py |
| kd, hard_kd, dkd, dist, bkl | logit distillation | P1, P3 | logits.py |
| feature_l2, align_uniform, infonce, srrl, hint | feature distillation | P4, P2, P3 | features.py |
| crd, contrastive, clip_caption, multi_positive | contrastive distillation | P1/P2/P3, P4 | contrastive.py |
"""
from .base import (ENTRIES, LOSSES, NEEDS, Dims, LearnableTemperature, LossEntry, LossInputs,  # noqa: F401
                   active_entries, active_needs, labelled_mask, only, register_loss, target_classes)
from .logits import bce, bkl, cross_entropy, dist, dkd, hard_kd, kd, pearson  # noqa: F401
from .features import align_uniform, alignment, feature_l2, hint, infonce, srrl, uniformity  # noqa: F401
from .contrastive import CRDMemory, clip_caption, contrastive, crd, multi_positive  # noqa: F401
