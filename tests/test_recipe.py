"""Recipe loading: typos are refused before any work, with the right key suggested; overrides are typed."""
import pytest

from edgedistill.recipe import RecipeError, builtin_recipes, dump_recipe, load_recipe

from conftest import tiny_recipe, write_recipe


def test_builtin_recipes_load_and_validate():
    names = builtin_recipes()
    assert {"quickstart", "pets-tinyvit"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
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
    with pytest.raises(RecipeError, match=r"teacher.name.*tiny-cnn"):
        load_recipe(write_recipe(tmp_path / "r.yaml", r))


def test_unknown_student_model_suggests():
    with pytest.raises(RecipeError, match="resnet18"):
        load_recipe("quickstart", ["student.name=resnet18x"])


def test_override_types_are_checked():
    assert load_recipe("quickstart", ["train.epochs=3"]).train.epochs == 3
    assert load_recipe("quickstart", ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)
    with pytest.raises(RecipeError, match="train.epochs.*integer"):
        load_recipe("quickstart", ["train.epochs=three"])
    with pytest.raises(RecipeError, match="train.schedule.*cosine"):
        load_recipe("quickstart", ["train.schedule=cosin"])


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
