"""GFLOP counting leaves the model where it was: same device, same storage, same training flags."""
import pytest
import torch
from torch import nn

from edgedistill.evaluate import gflops

# Conv2d(3, 8, 3, padding=1) on 8x8 is 8*8*8 outputs of 3*3*3 multiply-adds; Linear(8, 4) is 8*4; 2 FLOPs each.
EXPECTED_GFLOPS = 2 * (8 * 8 * 8 * 27 + 8 * 4) / 1e9


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


class Unmovable(Tiny):
    """Fails on any .to()/.cpu()/.cuda()/.half(): they all go through ``_apply``."""

    def _apply(self, fn, recurse=True):
        raise AssertionError("gflops moved or cast the model")


def test_gflops_leaves_parameters_storage_and_modes_as_they_were():
    torch.manual_seed(0)
    model = Tiny().train()
    model.bn.eval()  # a frozen part inside a training model, as a partly frozen student has
    before = {n: (p.device, p.data_ptr()) for n, p in model.named_parameters()}
    stats = model.bn.running_mean.clone()
    assert gflops(model, 8) == pytest.approx(EXPECTED_GFLOPS)
    assert {n: (p.device, p.data_ptr()) for n, p in model.named_parameters()} == before
    assert model.training and model.conv.training and model.head.training and not model.bn.training
    assert torch.equal(model.bn.running_mean, stats)  # counting ran in eval mode: no BatchNorm update


def test_gflops_never_moves_the_model():
    torch.manual_seed(0)
    model = Unmovable()
    assert gflops(model, 8) == pytest.approx(EXPECTED_GFLOPS)
    assert model.training


@pytest.mark.parametrize("device, dtype", [("meta", torch.float32), ("cpu", torch.bfloat16)])
def test_gflops_counts_where_the_model_lives(device, dtype):
    """A model on another device (meta stands in for CUDA here) or dtype is counted there, with inputs to match."""
    with torch.device(device):
        model = Tiny().to(dtype)
    assert gflops(model, 8) == pytest.approx(EXPECTED_GFLOPS)
    assert all(p.device.type == device and p.dtype == dtype for p in model.parameters())


def test_a_students_cost_is_that_of_the_exported_network_not_of_its_training_only_projection_head():
    """feature_l2 trains the student through a projection to the teacher's features; the exported network (and the
    GFLOPs and parameters the run reports) is backbone + classifier, with the very same scores."""
    from edgedistill.evaluate import params_used
    from edgedistill.recipe import Recipe, build
    from edgedistill.students import LogitsOnly, build_student

    def student(loss):
        return build_student(build(Recipe, {"name": "t", "student": {"name": "test_efficientnet"}, "loss": loss},
                                   ""), 3, 512).eval()

    projected, plain = student({"ce": 0.1, "hard_kd": 0.9, "feature_l2": 1.0}), student({"ce": 1.0})
    assert projected.proj is not None and projected.proj.weight.numel() > 0.5 * params_used(plain, 32)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(LogitsOnly(projected)(x), projected(x)["logits"])
    assert params_used(LogitsOnly(projected), 32) == params_used(LogitsOnly(plain), 32)
    assert gflops(LogitsOnly(projected), 32) == pytest.approx(gflops(LogitsOnly(plain), 32))
