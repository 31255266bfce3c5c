"""``student.pool: avgmax``: the student pools its last feature map by average and max, concatenated, as
``teacher.pool`` does; a student that cannot is refused before any work; the pooling survives save, load and export."""
import json

import numpy as np
import pytest
import torch

from edgedistill.checks import load_checked
from edgedistill.recipe import Recipe, RecipeError, build
from edgedistill.students import build_student, load_student

from test_export import make_run


def recipe_with(**student):
    return build(Recipe, {"name": "t", "student": {"name": "test_efficientnet", **student}, "loss": {"ce": 1.0}}, "")


def test_avgmax_concatenates_average_and_max_of_the_feature_map():
    student = build_student(recipe_with(pool="avgmax"), 3, 0).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        fmap = student.backbone.forward_features(x)
        out = student(x)
    want = torch.cat([fmap.mean((2, 3)), fmap.amax((2, 3))], dim=1)
    torch.testing.assert_close(out["features"], want)
    assert student.classifier.in_features == want.shape[1] == 2 * student.backbone.num_features


def test_avgmax_sees_one_bright_spot_that_averaging_dilutes():
    avg = build_student(recipe_with(), 3, 0).eval().backbone
    both = build_student(recipe_with(pool="avgmax"), 3, 0).eval().backbone
    x = torch.zeros(1, 3, 96, 96)
    spot = x.clone()
    spot[..., 40:44, 40:44] = 3.0
    with torch.no_grad():
        d_avg = (avg(spot) - avg(x)).abs().max().item()
        d_both = (both(spot) - both(x)).abs().max().item()
    assert d_both > 2 * d_avg  # the max half of the pooled vector moves far more than the average does


@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "convnext_atto"])
def test_a_student_that_cannot_pool_so_is_refused_naming_the_key(name, tmp_path):
    with pytest.raises(RecipeError, match="student.pool"):
        load_checked("quickstart", [f"student.name={name}", "student.packaged_weights=''", "student.pool=avgmax"])


def test_a_bad_pool_name_names_the_valid_ones():
    with pytest.raises(RecipeError, match="student.pool.*avgmax"):
        load_checked("quickstart", ["student.pool=max"])


def test_avgmax_student_loads_and_exports_with_its_pooling(tmp_path):
    from edgedistill.export import export_run
    from edgedistill.runtime.run import load_bundle

    run = make_run(tmp_path, student_pool="avgmax")
    model, _ = load_student(run)
    assert model.classifier.in_features == 2 * model.backbone.num_features
    (path,) = export_run(run, formats=["onnx"], precisions=["fp32"])
    assert json.loads((path / "manifest.json").read_text())["parity"]["passed"]
    x = np.random.default_rng(0).standard_normal((2, 3, 48, 48), dtype=np.float32)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x))["logits"].numpy()
    np.testing.assert_allclose(load_bundle(path).predict(x), want, rtol=1e-4, atol=1e-4)
