"""Recipe loading: typos are refused before any work, with the right key suggested; overrides are typed and ranged."""
import pytest

from edgedistill.checks import load_checked
from edgedistill.recipe import RecipeError, builtin_recipes, dump_recipe, load_recipe

from conftest import tiny_recipe, write_recipe


def test_builtin_recipes_load_and_validate():
    names = builtin_recipes()
    assert {"quickstart", "pets-tinyvit"} <= set(names)
    for name in names:
        recipe = load_checked(name)
        assert recipe.name == name


def test_override_typo_names_key_and_suggests():
    with pytest.raises(RecipeError) as e:
        load_recipe("quickstart", ["train.epoch=3"])
    assert "'train.epoch'" in str(e.value) and "'train.epochs'" in str(e.value)


def test_yaml_typo_is_refused(tmp_path, image_folder):
    r = tiny_recipe(image_folder)
    r["student"]["pretrianed"] = True
    with pytest.raises(RecipeError, match=r"student.pretrianed.*Did you mean 'student.pretrained'"):
        load_recipe(write_recipe(tmp_path / "r.yaml", r))


def test_unknown_registry_name_suggests(tmp_path, image_folder):
    r = tiny_recipe(image_folder, teacher="tiny-cn")
    path = write_recipe(tmp_path / "r.yaml", r)
    with pytest.raises(RecipeError, match=r"teacher.name.*tiny-cnn"):
        load_checked(path)
    assert load_recipe(path).teacher.name == "tiny-cn"  # names are the registries' business, checked a level up


def test_unknown_student_model_suggests():
    with pytest.raises(RecipeError, match="resnet18"):
        load_checked("quickstart", ["student.name=resnet18x"])


def test_override_types_are_checked():
    assert load_recipe("quickstart", ["train.epochs=3"]).train.epochs == 3
    assert load_recipe("quickstart", ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)
    with pytest.raises(RecipeError, match="train.epochs.*integer"):
        load_recipe("quickstart", ["train.epochs=three"])
    with pytest.raises(RecipeError, match="train.schedule.*cosine"):
        load_recipe("quickstart", ["train.schedule=cosin"])


def test_negative_learning_rate_is_refused_naming_the_key():
    with pytest.raises(RecipeError, match=r"Recipe key 'train.lr' must be > 0, got -0.1"):
        load_recipe("quickstart", ["train.lr=-0.1"])


@pytest.mark.parametrize("override, match", [
    ("train.real_fraction=0", r"'train.real_fraction' must be > 0 and <= 1"),
    ("data.test_fraction=1", r"'data.test_fraction' must be >= 0 and < 1"),
    ("data.crop_pct=1.5", r"'data.crop_pct' must be >= 0 and <= 1"),
    ("eval.severities=[1, 6]", r"'eval.severities' must be >= 1 and <= 5, got 6"),
    ("bench.batch=[1, 0]", r"'bench.batch' must be >= 1, got 0"),
    ("export.opset=11", r"'export.opset' must be >= 17"),
    ("train.seed=-1", r"'train.seed' must be >= 0"),
    ("synthetic.prompt_weights={class: -1}", r"'synthetic.prompt_weights.class' must be >= 0"),
    ("loss.temperature=.inf", r"'loss.temperature' must be a finite number"),
    ("synthetic.guidance=.nan", r"'synthetic.guidance' must be a finite number"),
    ("data.prompt_names=[a, b]", r"'data.prompt_names' must be a mapping"),
    ("data.prompt_names={a: [b]}", r"'data.prompt_names.a' must be a string"),
    ("synthetic.dimensions={place: a garden}", r"'synthetic.dimensions.place' must be a list"),
    ("student.model_kwargs={~: 1}", r"'student.model_kwargs' must have text keys, got None"),
    ("teacher.templates=['a {c} {shape}']", r"'teacher.templates': template 'a {c} {shape}' may use only"),
])
def test_out_of_range_and_malformed_values_name_the_key(override, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe("quickstart", [override])


def test_edge_values_that_mean_default_or_off_are_accepted():
    recipe = load_recipe("quickstart", ["train.real_fraction=1", "data.crop_pct=0", "synthetic.guidance=-1",
                                        "data.max_per_class=0", "eval.severities=[1, 5]", "teacher.image_size=0"])
    assert recipe.train.real_fraction == 1.0 and recipe.synthetic.guidance == -1.0


def test_yaml_syntax_error_gives_file_line_and_column(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("name: broken\ntrain:\n  lr: a: b\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value) == f"Recipe {path} is not valid YAML: line 3, column 8: mapping values are not allowed here"


def test_override_that_is_not_yaml_names_the_override():
    with pytest.raises(RecipeError, match=r"Override 'export.formats=\[onnx' is not valid YAML: line 1, column 6"):
        load_recipe("quickstart", ["export.formats=[onnx"])


def test_registered_names_beyond_teacher_and_student_are_checked():
    with pytest.raises(RecipeError, match=r"'eval.corruptions'.*gaussian_noise"):
        load_checked("quickstart", ["eval.corruptions=[gaussian_nois]"])
    with pytest.raises(RecipeError, match=r"'bench.backends'.*onnxruntime"):
        load_checked("quickstart", ["bench.backends=[onnxrt]"])
    assert load_checked("quickstart", ["eval.corruptions=[default]"]).eval.corruptions == ("default",)


def test_optional_section_can_be_added_by_override():
    recipe = load_recipe("quickstart", ["bench.iters=5"])
    assert recipe.bench is not None and recipe.bench.iters == 5


def test_dump_round_trips(tmp_path):
    recipe = load_recipe("quickstart", ["train.epochs=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == recipe


def test_cli_list_and_show(capsys):
    from edgedistill.cli import main

    assert main(["recipe", "list"]) == 0
    listed = capsys.readouterr().out
    assert "quickstart" in listed and "pets-tinyvit" in listed
    assert main(["recipe", "show", "quickstart", "train.epochs=7"]) == 0
    shown = capsys.readouterr().out
    assert "epochs: 7" in shown and "efficientnet-lite" in shown
