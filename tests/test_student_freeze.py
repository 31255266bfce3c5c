"""``student.freeze_stages``: the stem and the first N stages of the student keep their starting weights and
BatchNorm statistics while the student and the baseline train; a value the architecture cannot take is refused
before any work, naming the key and the valid range."""
import pytest
import torch

from conftest import tiny_recipe, write_recipe
from edgedistill.checks import load_checked
from edgedistill.cli import main
from edgedistill.recipe import Recipe, RecipeError, build
from edgedistill.students import build_student, freeze_stages


def recipe_with(**student):
    return build(Recipe, {"name": "t", "student": {"name": "test_efficientnet", **student}, "loss": {"ce": 1.0}}, "")


def frozen_and_trained(state: dict, n: int) -> tuple[list, list]:
    """Backbone entries (weights and BatchNorm buffers) of the stem and the first n stages, and of the last stage."""
    head = ("backbone.conv_stem.", "backbone.bn1.") + tuple(f"backbone.blocks.{i}." for i in range(n))
    frozen = [k for k in state if k.startswith(head) and "num_batches_tracked" not in k]
    last = [k for k in state if k.startswith("backbone.blocks.4.") and "num_batches_tracked" not in k]
    return frozen, last


def test_no_gradient_reaches_the_frozen_stages_and_their_batchnorm_stays_in_eval_mode():
    student = freeze_stages(build_student(recipe_with(freeze_stages=2), 3, 0), recipe_with(freeze_stages=2).student)
    student.train()
    student(torch.randn(4, 3, 32, 32))["logits"].sum().backward()
    grads = {f"backbone.{k}": p.grad for k, p in student.backbone.named_parameters()}
    frozen, last = frozen_and_trained(dict(student.state_dict()), 2)
    assert all(grads[k] is None for k in frozen if k in grads)  # their backward pass is skipped
    assert all(grads[k] is not None for k in last if k in grads)
    assert not student.backbone.bn1.training and not student.backbone.blocks[1][0].bn1.training
    assert student.backbone.blocks[2][0].bn1.training and student.training


def test_the_student_and_the_baseline_keep_the_frozen_stages_as_they_started(tmp_path, image_folder):
    recipe = tiny_recipe(image_folder, baseline=True)
    recipe["student"]["freeze_stages"] = 2
    recipe["data"]["views"] = 1
    recipe["train"]["epochs"] = 1
    assert main(["recipe", "run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "run")]) == 0
    start = build_student(load_checked(str(tmp_path / "r.yaml")), 3, 0).state_dict()
    for which in ("student", "baseline"):
        trained = torch.load(tmp_path / "run" / which / "model.pt", weights_only=False)["state_dict"]
        frozen, last = frozen_and_trained(trained, 2)
        assert frozen and last
        for k in frozen:  # the weights and the BatchNorm running statistics alike
            torch.testing.assert_close(trained[k], start[k], msg=f"{which}: {k} moved")
        assert any(not torch.equal(trained[k], start[k]) for k in last), f"{which}: the last stage did not train"


@pytest.mark.parametrize("value, valid", [("9", "0 to 6"), ("-1", ">= 0")])
def test_a_value_the_student_cannot_take_is_refused_naming_the_key(value, valid):
    with pytest.raises(RecipeError, match=f"student.freeze_stages.*{valid}"):
        load_checked("quickstart", [f"student.freeze_stages={value}"])


def test_a_fine_tuned_teacher_keeps_its_frozen_stages_as_they_started(tmp_path, image_folder):
    from edgedistill.recipe import load_recipe
    from edgedistill.teachers import build_teacher

    recipe = tiny_recipe(image_folder)
    recipe["teacher"] = {"name": "efficientnet-lite", "arch": "lite0", "image_size": 32, "head": "linear",
                         "mode": "finetune", "finetune_epochs": 1, "finetune_batch_size": 4, "finetune_lr": 0.003,
                         "finetune_freeze_stages": 2, "runtime": "pytorch"}
    recipe["train"]["epochs"] = 1
    assert main(["recipe", "run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "run")]) == 0
    tuned = torch.load(tmp_path / "run" / "teacher" / "model.pt", weights_only=True)
    start = build_teacher(load_recipe(tmp_path / "run" / "recipe.yaml").teacher).state_dict()  # the ImageNet weights
    head = ("model.conv_stem.", "model.bn1.", "model.blocks.0.", "model.blocks.1.")
    frozen = [k for k in tuned if k.startswith(head) and "num_batches_tracked" not in k]
    last = [k for k in tuned if k.startswith("model.blocks.6.") and "num_batches_tracked" not in k]
    assert frozen and last
    for k in frozen:  # weights and BatchNorm running statistics
        torch.testing.assert_close(tuned[k], start[k], msg=f"teacher: {k} moved")
    assert any(not torch.equal(tuned[k], start[k]) for k in last), "the teacher's last stage did not train"


@pytest.mark.parametrize("overrides, message", [
    (["teacher.finetune_freeze_stages=7"], "teacher.finetune_freeze_stages.*0 to 6"),
    (["teacher.mode=probe", "teacher.finetune_freeze_stages=2"], "teacher.finetune_freeze_stages.*only with teacher.mode"),
    (["teacher.name=tiny-cnn", "teacher.finetune_freeze_stages=2"], "teacher.finetune_freeze_stages.*timm teacher"),
])
def test_a_teacher_freeze_it_cannot_take_is_refused_naming_the_key(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_checked("quickstart", overrides)


def test_both_keys_at_their_default_leave_the_stage_fingerprints_of_older_run_folders_alone():
    from edgedistill.recipe import fingerprinted, load_recipe

    plain = load_recipe("quickstart-probe")  # neither key set: its stages resume in folders made before they existed
    assert "freeze_stages" not in fingerprinted(plain.student)
    assert "finetune_freeze_stages" not in fingerprinted(plain.teacher)
    frozen = load_recipe("quickstart-probe", ["student.freeze_stages=2", "teacher.finetune_freeze_stages=1"])
    assert fingerprinted(frozen.student)["freeze_stages"] == 2  # set, it is part of the key: the stage reruns
    assert fingerprinted(frozen.teacher)["finetune_freeze_stages"] == 1


def test_the_teacher_check_reads_an_empty_arch_as_the_teachers_own_default():
    load_checked("quickstart", ["teacher.arch=''", "teacher.finetune_freeze_stages=2"])  # lite2, as the teacher does
    with pytest.raises(RecipeError, match="tf_efficientnet_lite2.*0 to 6"):
        load_checked("quickstart", ["teacher.arch=''", "teacher.finetune_freeze_stages=7"])
