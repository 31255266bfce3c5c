"""Students: heads fit whatever the timm backbone returns, and initialisation depends only on the recipe seed."""
import pytest
import torch

from edgedistill.recipe import load_recipe
from edgedistill.students import build_student


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "test_efficientnet", "test_resnet"])
def test_heads_match_backbone_output(name):
    # MobileNetV3 returns its 1024-wide conv_head output with num_classes=0, not num_features (576 for small_100).
    recipe = load_recipe("quickstart", [f"student.name={name}", "student.packaged_weights=''", "loss.feature_l2=1.0"])
    student = build_student(recipe, num_classes=3, teacher_dim=48).eval()
    out = student(torch.randn(2, 3, 64, 64))
    assert out["logits"].shape == (2, 3) and out["embedding"].shape == (2, 48)


def test_initialisation_ignores_earlier_random_draws():
    recipe = load_recipe("quickstart", ["student.name=test_efficientnet", "student.packaged_weights=''"])
    a = build_student(recipe, 3, 16)
    torch.rand(1000)  # e.g. a probe stage that ran earlier in the same process
    b = build_student(recipe, 3, 16)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_seed_changes_a_random_initialisation():
    # A random-init student (no packaged or hub weights): each seed must start from different weights, the same seed
    # from the same ones; otherwise `--seeds N` measures N copies of one run.
    def weights(seed):
        recipe = load_recipe("quickstart", ["student.name=test_efficientnet", "student.packaged_weights=''",
                                            f"train.seed={seed}"])
        return build_student(recipe, 3, 16).state_dict()

    a, a2, b = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], a2[k]) for k in a)
    conv = next(k for k in a if k.endswith("weight") and a[k].dim() == 4)  # the backbone's first convolution
    assert not torch.equal(a[conv], b[conv]), "the backbone's initialisation ignores the seed"
    assert not torch.equal(a["classifier.weight"], b["classifier.weight"])
