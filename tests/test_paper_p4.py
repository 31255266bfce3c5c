"""P4's two stages (Popp et al.): a student that starts from an earlier run's (``student.init_from``), and ``tiny-p4``,
which runs the domain-agnostic stage (``tiny-p4-agnostic``) and then the synthetic-only one in one command."""
import json

import pytest
import torch
import yaml

from edgedistill import cli
from edgedistill.local_weights import file_sha256
from edgedistill.recipe import RecipeError, builtin_recipes, load_recipe

STAGE1 = "tiny-p4-agnostic"


def run_cli(*args):
    return cli.main(["recipe", "run", *map(str, args)])


def reused_line(caplog) -> str:
    """The pipeline's line saying which of the earlier recipe's stages a run reused."""
    return next(r.message for r in caplog.records if "student.init_from" in r.message and "finished" in r.message)


def stage1_student(run):
    return run / "init" / STAGE1 / "student" / "model.pt"


def trained_weights(path) -> dict:
    """The backbone's and projection head's parameters of a saved student (buffers such as BatchNorm's running
    statistics move in any forward pass in training mode, so they are left out)."""
    from edgedistill.students import load_student

    model, _ = load_student(path)
    return {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith(("backbone.", "proj."))}


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    pytest.importorskip("open_clip")
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp("p4") / "run"
    assert run_cli("tiny-p4", "--out", out) == 0
    return out


def test_tiny_p4_runs_both_stages_offline(two_stage):
    first = two_stage / "init" / STAGE1
    assert yaml.safe_load((first / "recipe.yaml").read_text())["name"] == STAGE1
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (first, two_stage))
    for m in (m1, m2):  # both students are scored zero-shot through the teacher's class text embeddings
        assert 0 <= m["student"]["top1"] <= 100 and m["student"]["n"] == m["n_test"] > 0
    # Stage 1 learnt from real images (no labels read: feature_l2 only); stage 2 from synthetic images alone.
    assert json.loads((first / "stages" / "split.json").read_text())["summary"]["train"] > 0
    synth = [json.loads(line) for line in (two_stage / "synth" / "manifest.jsonl").read_text().splitlines()]
    assert len(synth) == 12
    # What stage 2 started from is on record, by sha256: weights.json and metrics.json.
    init = json.loads((two_stage / "weights.json").read_text())["student.init_from"]
    assert init["from"] == f"recipe:{STAGE1}" and init["path"] == str(stage1_student(two_stage).resolve())
    assert init["sha256"] == file_sha256(stage1_student(two_stage)) == m2["student_init"]["sha256"]


def test_rerun_reuses_stage1_and_stage2_starts_from_its_weights(two_stage, caplog):
    # With a learning rate of ~0 stage 2 cannot move its weights: what it ends with is what it started from.
    caplog.set_level("INFO")
    assert run_cli("tiny-p4", "--out", two_stage, "train.lr=1e-12") == 0
    assert reused_line(caplog).endswith("stages reused: distill, evaluate, features, probe, split")
    messages = " ".join(r.message for r in caplog.records)
    assert "stage synth     reused" in messages and "stage distill   running" in messages  # stage 2's own
    first, second = trained_weights(stage1_student(two_stage)), trained_weights(two_stage / "student" / "model.pt")
    assert first.keys() == second.keys() and any(k.startswith("proj.") for k in first)
    assert max((first[k] - second[k]).abs().max().item() for k in first) < 1e-8


def test_changed_stage1_recipe_reruns_both_stages(two_stage, tmp_path, caplog):
    # Copies of the two recipes, stage 2 naming stage 1 by its path: stage 1 is edited, stage 2 is not.
    stage1 = yaml.safe_load(builtin_recipes()[STAGE1].read_text())
    stage2 = yaml.safe_load(builtin_recipes()["tiny-p4"].read_text())
    stage2["student"]["init_from"] = f"recipe:{tmp_path / 'stage1.yaml'}"
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump(stage1))
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(stage2))
    caplog.set_level("INFO")
    assert run_cli(tmp_path / "stage2.yaml", "--out", two_stage) == 0  # stage 1's copy is unchanged: all reused
    assert reused_line(caplog).endswith("stages reused: distill, evaluate, features, probe, split")
    before = file_sha256(stage1_student(two_stage))

    stage1["train"]["lr"] = 2e-3
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump(stage1))
    caplog.clear()
    assert run_cli(tmp_path / "stage2.yaml", "--out", two_stage) == 0
    assert reused_line(caplog).endswith("stages reused: features, probe, split")  # stage 1 trains again
    after = file_sha256(stage1_student(two_stage))
    assert after != before
    timings = json.loads((two_stage / "metrics.json").read_text())["timings"]
    assert timings["reused"] == ["features", "probe", "split", "synth"]  # stage 2 trains and evaluates again
    assert json.loads((two_stage / "weights.json").read_text())["student.init_from"]["sha256"] == after


@pytest.mark.parametrize("override, message", [
    ("student.init_from=/no/such/run/model.pt", "/no/such/run/model.pt does not exist"),
    (f"student.init_from=recipe:{STAGE1[:-1]}", f"Unknown recipe '{STAGE1[:-1]}'. Did you mean ['{STAGE1}'"),
    ("student.init_from=recipe:tiny-p4", "in a circle (tiny-p4 -> tiny-p4)"),
    ("student.name=resnet18", f"recipe '{STAGE1}' trains a test_efficientnet student, but this recipe's student is a "
                              "resnet18"),
    ("student.pretrained=true", "'student.init_from' and 'student.pretrained' both set"),
])
def test_bad_init_from_is_refused_before_any_work(tmp_path, capsys, override, message):
    assert run_cli("tiny-p4", "--out", tmp_path / "run", override) == 2
    err = capsys.readouterr().err
    assert "student.init_from" in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_init_from_a_run_folder_or_file_is_checked_against_the_student(two_stage, tmp_path, capsys):
    from edgedistill.checks import load_checked

    # A finished run folder stands for its student; its architecture and projection size are compared up front.
    assert load_checked("tiny-p4", [f"student.init_from={two_stage / 'init' / STAGE1}"]).student.init_from
    cases = [([f"student.init_from={tmp_path}"], "is a folder without student/model.pt"),
             ([f"student.init_from={two_stage / 'metrics.json'}"], "is not a student edgedistill saved"),
             (["student.embed_dim=32", f"student.init_from={stage1_student(two_stage)}"],
              "holds a student projecting to 64 dimensions, but this recipe's student.embed_dim is 32")]
    for overrides, message in cases:
        assert run_cli("tiny-p4", "--out", tmp_path / "run", *overrides) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_student_whose_shapes_differ_is_refused_naming_both(two_stage):
    import timm

    from edgedistill.students import Student, load_init

    cfg = load_recipe("tiny-p4").student
    student = Student(timm.create_model("test_efficientnet", num_classes=0), 3, embed_dim=48, classifier=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(RecipeError, match=r"test_efficientnet student .*: proj\.\w+ is \[64\D.* there and \[48\D"):
        load_init(student, stage1_student(two_stage), cfg)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # nothing half-loaded


def test_p4_recipes_chain_and_stage2_is_pets_tinyvit_from_the_agnostic_student():
    pytest.importorskip("datasets")  # p4-agnostic reads ImageNet by its Hugging Face id
    from edgedistill.checks import init_recipe, load_checked

    two = load_checked("pets-tinyvit-two-stage")
    one = init_recipe(two)
    assert one.name == "p4-agnostic" and one.student.name == two.student.name == "tiny_vit_11m_224"
    assert (one.loss.feature_l2, one.train.epochs, one.train.batch_size, one.train.lr, one.train.schedule,
            one.train.optimizer) == (1.0, 1, 256, 5e-4, "constant", "adamw")  # P4: one epoch, its settings
    assert one.student.embed_dim == two.student.embed_dim == 512 and not two.student.pretrained
    stage2, pets = two.to_dict(), load_checked("pets-tinyvit").to_dict()
    for d in (stage2, pets):
        for key in ("name", "description", "student"):
            d.pop(key)
    assert stage2 == pets  # the same stage 2 as pets-tinyvit, from the agnostic student instead of ImageNet weights
    for name in ("p4-agnostic", "pets-tinyvit-two-stage", STAGE1, "tiny-p4"):
        assert len(builtin_recipes()[name].read_text().splitlines()) < 40
