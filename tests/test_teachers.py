"""Tiny random teachers of each kind: features, heads, and the zero-shot text head through real open_clip code."""
import pytest
import torch

from edgedistill.recipe import TeacherCfg
from edgedistill.teachers import TEACHERS, ZeroShotHead, WeightsUnavailable, build_teacher


@pytest.mark.parametrize("name", ["tiny-cnn", "tiny-vit", "tiny-clip"])
def test_tiny_teacher_encodes_to_its_feature_dim(name):
    t = build_teacher(TeacherCfg(name=name, width=32, depth=2, n_cls_blocks=2, embed_dim=48))
    x = torch.randn(3, 3, t.info.input.size, t.info.input.size)
    f = t.encode(x)
    assert f.shape == (3, t.feature_dim)
    assert not any(p.requires_grad for p in t.parameters())
    assert torch.equal(f, t.encode(x)), "a frozen teacher is deterministic"


def test_dinov2_style_teacher_concatenates_last_cls_tokens():
    one = build_teacher(TeacherCfg(name="tiny-vit", width=32, depth=3, n_cls_blocks=1))
    three = build_teacher(TeacherCfg(name="tiny-vit", width=32, depth=3, n_cls_blocks=3, avgpool=True))
    x = torch.randn(2, 3, 32, 32)
    assert three.encode(x).shape == (2, 32 * 4)
    # The last CLS token block is the tail of the (CLS..., avgpool) concatenation, before the avgpool part.
    assert torch.allclose(three.encode(x)[:, 64:96], one.encode(x), atol=1e-5)


def test_clip_zero_shot_head_ranks_by_cosine_to_class_prompts():
    t = build_teacher(TeacherCfg(name="tiny-clip", embed_dim=32))
    head = t.text_head(["cat", "dog", "car"], ["a photo of a {c}.", "a {c}, a type of {superclass}."], "thing")
    assert isinstance(head, ZeroShotHead) and head.text.shape == (3, 32)
    text = t.class_text_embeddings(["dog"], ["a photo of a {c}."])
    logits = head(text)  # the text embedding of "dog" is closest to the "dog" row
    assert logits.argmax(1).item() == 1


def test_hub_teachers_are_registered_and_fail_offline_with_one_sentence(monkeypatch):
    assert {"clip", "dinov2", "timm", "efficientnet-lite"} <= set(TEACHERS.names())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="vit_small_patch14_dinov2.*download on first use"):
        build_teacher(TeacherCfg(name="dinov2", arch="vit_small_patch14_dinov2.lvd142m"))


def test_real_efficientnet_lite_teacher_knows_a_cat():
    skimage = pytest.importorskip("skimage.data")
    from PIL import Image

    from edgedistill.target.run import preprocess

    t = build_teacher(TeacherCfg(name="efficientnet-lite", arch="lite0"))
    head, names = t.native_head()
    x = torch.from_numpy(preprocess(Image.fromarray(skimage.chelsea()), t.info.input.to_dict()))[None]
    assert "cat" in names[head(t.encode(x)).argmax().item()]
