"""Loss presets: named, complete ``loss:`` sections, so ``loss: dkd`` in a recipe, ``loss=dkd`` as an override and
``recipe sweep NAME loss=ce,kd,dkd`` compare losses at their papers' settings.

A preset replaces the whole section: every weight it does not name is 0 and every setting it does not name is
``LossCfg``'s default. ``checks.load_checked`` expands it before validation (``recipe.load_recipe(presets=...)``);
an unknown name is refused there with the list below. Settings a paper does not state are left at the defaults
and said so. [P1]-[P4] are the papers in README.md; mdistiller, RepDistiller and DIST are the reference codebases.
"""

LOSS_PRESETS: dict[str, dict] = {
    # The task term alone: the same student trained on labels, no teacher (what `baseline` trains).
    "ce": {"ce": 1.0},
    # [P1] Eqs. 1-4: (1 - a) CE + a T^2 KL with a = 0.5, T = 2 (P3 Eq. 1 also uses 0.5, T not given).
    "kd": {"ce": 0.5, "kd": 0.5, "temperature": 2.0},
    # [P1] Table I "hard-label KD": CE against the teacher's argmax (DeiT-style, no distillation token), a = 0.5.
    "hard_kd": {"ce": 0.5, "hard_kd": 0.5},
    # [P1] Table I / [P3] DKD at mdistiller's CIFAR settings: CE 1, alpha (TCKD) 1, beta (NCKD) 8, T 4.
    "dkd": {"ce": 1.0, "dkd": 1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0, "temperature": 4.0},
    # [P3] compares DIST at its own code's defaults: CE 1 + DIST 1, beta (inter) 1, gamma (intra) 1, tau 1.
    "dist": {"ce": 1.0, "dist": 1.0, "dist_beta": 1.0, "dist_gamma": 1.0, "dist_tau": 1.0},
    # [P1] Table I "CRD combined with KD" as RepDistiller's CRD+KD: CE 1 (-r 1), KD 1 (-a 1, kd_T 4), CRD 0.8
    # (-b 0.8), nce_t 0.07, momentum 0.5. P1's "tau = 0.5" is not said to be CRD's; crd_negatives stays 4096.
    "crd": {"ce": 1.0, "kd": 1.0, "crd": 0.8, "temperature": 4.0, "crd_tau": 0.07, "crd_momentum": 0.5},
    # [P3] Eq. 1 and Table 4 "BCE+KL" (its best, 80.89 with BEiTv2-L -> ResNet50): BCE label loss as RSB + KD, a =
    # 0.5; T = 1, the default of vanillaKD's train-kd.py (--temperature 1; the paper's text gives no T).
    "bce_kd": {"bce": 0.5, "kd": 0.5, "temperature": 1.0},
    # [P3] Eq. 3 and Table 4 "BCE+BKL": BCE label loss as RSB, binary KL, a = 0.5 as P3 Eq. 1.
    "bkl": {"bce": 0.5, "bkl": 0.5},
    # [P2] L = l1 CE + l2 L_Embed + l3 KD with l1 = l2 = l3 = 1 (KD's T not given: the default 2), L_Embed being:
    "align_uniform": {"ce": 1.0, "align_uniform": 1.0, "kd": 1.0},  # Eq. 2, w_align = w_uniform = 1, a = 2, t = 2
    "infonce": {"ce": 1.0, "infonce": 1.0, "kd": 1.0},  # Eq. 1, InfoNCE form (tau not given: the default 0.1)
    "srrl": {"ce": 1.0, "srrl": 1.0, "kd": 1.0},  # SRRL in L_Embed's place (our reading); teacher.head linear/mlp
}
