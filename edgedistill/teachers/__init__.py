"""Teachers: a frozen image encoder plus an optional head that turns its features into class logits.

Every teacher gives ``encode(images) -> features`` (what the teacher-feature cache stores) and, once it has a
head, ``head(features) -> logits``. Features are what feature distillation targets; logits feed KD. The shared
pieces (the Teacher class, input specs, heads, capabilities) are in ``base.py``.
"""
from .base import (CAPABILITIES, TEACHERS, Capabilities, InputSpec, LinearHead, MLPHead, Teacher,  # noqa: F401
                   TeacherInfo, WeightsUnavailable, ZeroShotHead, build_head, head_layout, load_head, make_probe_head,
                   save_head)


def build_teacher(cfg) -> Teacher:
    """Build the teacher a recipe names (weights load here; a missing download raises WeightsUnavailable)."""
    teacher = TEACHERS.get(cfg.name)(cfg)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def capability_problem(cfg) -> str | None:
    """Why teacher settings ``cfg`` ask for something the named teacher cannot do, or None."""
    can = CAPABILITIES.get(cfg.name, Capabilities())
    able = lambda flag: sorted(n for n, c in CAPABILITIES.items() if getattr(c, flag))  # noqa: E731
    if cfg.head == "zeroshot" and not can.text_encoder:
        return (f"Recipe key 'teacher.head' is 'zeroshot' but teacher {cfg.name!r} has no text encoder; use head: "
                f"linear or mlp, or a teacher with one: {able('text_encoder')}")
    if cfg.head == "native" and not can.native_head:
        return (f"Recipe key 'teacher.head' is 'native' but teacher {cfg.name!r} has no classifier of its own; "
                f"teachers with one: {able('native_head')}")
    if cfg.pool != "avg" and (not can.pooling or cfg.head == "native"):
        return ("Recipe key 'teacher.pool' other than 'avg' needs a probed head (linear or mlp) on a teacher that "
                f"pools a feature map: {able('pooling')}")
    return None


# Registration imports only light modules; each factory imports its heavy library inside its body.
from . import clip, timm_teachers, tiny  # noqa: E402,F401
