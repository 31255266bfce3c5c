"""Loss presets (``losses/presets.py``): ``loss: dkd`` / ``loss=dkd`` expand to a complete loss section before
validation, unknown names are refused with the list, and ``recipe sweep NAME loss=a,b --seeds N`` tabulates them."""
import dataclasses
import json
import sys
import types

import pytest

from edgedistill import sweep
from edgedistill.checks import load_checked, section_presets
from edgedistill.cli import main
from edgedistill.losses import ENTRIES
from edgedistill.losses.presets import LOSS_PRESETS
from edgedistill.recipe import LossCfg, RecipeError, load_recipe
from edgedistill.stats import aggregate_metrics
from conftest import tiny_recipe, write_recipe

WEIGHTS = [f.name for f in dataclasses.fields(LossCfg) if f.metadata.get("weight")]


@pytest.fixture
def tiny_path(tmp_path, image_folder):
    return write_recipe(tmp_path / "tiny.yaml", tiny_recipe(image_folder))


@pytest.mark.parametrize("name", sorted(LOSS_PRESETS))
def test_each_preset_is_a_complete_loss_section(name, tiny_path):
    preset = LOSS_PRESETS[name]
    assert set(preset) <= {f.name for f in dataclasses.fields(LossCfg)} and set(preset) & set(WEIGHTS) <= set(ENTRIES)
    loss = load_recipe(tiny_path, [f"loss={name}"], section_presets()).loss
    assert {w for w in WEIGHTS if getattr(loss, w)} == {k for k in preset if k in WEIGHTS}  # the rest are 0
    assert all(getattr(loss, k) == v for k, v in preset.items())
    others = {f.name: f.default for f in dataclasses.fields(LossCfg) if f.name not in preset}
    assert all(getattr(loss, k) == v for k, v in others.items())  # tiny's own kd: 0.5 is replaced, not merged
    assert load_checked(tiny_path, [f"loss={name}"]).loss == loss  # every preset passes the registry checks too


def test_papers_settings():
    assert LOSS_PRESETS["kd"] == {"ce": 0.5, "kd": 0.5, "temperature": 2.0}
    assert LOSS_PRESETS["dkd"] == {"ce": 1.0, "dkd": 1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0, "temperature": 4.0}
    assert {k: LOSS_PRESETS["crd"][k] for k in ("ce", "kd", "crd")} == {"ce": 1.0, "kd": 1.0, "crd": 0.8}


def test_override_yaml_and_later_overrides(tmp_path, image_folder):
    recipe = load_checked("quickstart", ["loss=dkd"])
    assert (recipe.loss.ce, recipe.loss.kd, recipe.loss.dkd, recipe.loss.temperature) == (1.0, 0.0, 1.0, 4.0)
    edited = load_checked("quickstart", ["loss=dkd", "loss.temperature=8"])  # a later override edits the preset
    assert (edited.loss.dkd, edited.loss.temperature) == (1.0, 8.0)
    path = write_recipe(tmp_path / "preset.yaml", tiny_recipe(image_folder, loss="hard_kd"))
    assert load_checked(path).loss == LossCfg(ce=0.5, hard_kd=0.5)


def test_recipe_show_expands_a_preset(tiny_path, capsys):
    assert main(["recipe", "show", str(tiny_path), "loss=bkl"]) == 0
    assert "bkl: 0.5" in capsys.readouterr().out


@pytest.mark.parametrize("overrides", [["loss=dkdd"], ["loss=kd", "loss=dkdd"]])
def test_unknown_preset_is_refused_naming_loss_and_the_presets(overrides, tiny_path):
    with pytest.raises(RecipeError, match="'loss'") as e:
        load_checked(tiny_path, overrides)
    assert "Did you mean 'dkd'?" in str(e.value) and all(repr(name) in str(e.value) for name in LOSS_PRESETS)


def fake_run_recipe(calls):
    """Writes metrics.json as ``pipeline.combine_seeds`` does: means under ``student``, intervals under ``seeds``."""
    def run_recipe(recipe, out, seeds=1, shared_dir=None):
        calls.append((recipe.loss, seeds))
        base = 80.0 if recipe.loss.dkd else 70.0
        per_seed = [{"student": {"top1": base + 2 * k, "balanced_accuracy": base - 1 + 2 * k},
                     "baseline": {"balanced_accuracy": 60.0}} for k in range(seeds)]
        agg = aggregate_metrics(per_seed)
        agg["validation"] = aggregate_metrics([{"student": {"balanced_accuracy": base + 5 + 2 * k}}
                                               for k in range(seeds)])
        out.mkdir(parents=True, exist_ok=True)
        means = {m: {k: v["mean"] for k, v in agg[m].items()} for m in ("student", "baseline")}
        (out / "metrics.json").write_text(json.dumps({**means, "seeds": agg, "n_seeds": seeds,
                                                      "validation": {"student": {"balanced_accuracy": base + 6}}}))
        (out / "seed-0").mkdir()  # with seeds, seed 0's student is exported and benchmarked in its own folder
        (out / "seed-0" / "bench.json").write_text(json.dumps([{"backend": "onnxruntime", "precision": "fp32",
                                                                "batch": 1, "p50_ms": 1.0}]))
    return run_recipe


def test_sweep_over_two_presets_tabulates_intervals(tiny_path, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "edgedistill.pipeline", types.SimpleNamespace(run_recipe=fake_run_recipe(calls)))
    out = tmp_path / "sweep"
    sweep.run_sweep(str(tiny_path), ["loss=kd,dkd"], str(out), seeds=2)
    assert [(loss, n) for loss, n in calls] == [(LossCfg(ce=0.5, kd=0.5, temperature=2.0), 2),
                                                (LossCfg(ce=1.0, dkd=1.0, temperature=4.0), 2)]
    md = (out / "sweep.md").read_text()
    assert ("| loss | seeds | val balanced acc % | test balanced acc % | test top-1 % | baseline test balanced acc % |"
            in md) and "test split" in md and "nothing" in md and "choose a point on the validation column" in md
    # two seeds 2 points apart: s = sqrt(2), half-width t(0.975, 1) * s / sqrt(2) = 12.706
    assert "| kd | 2 | 76.00 ± 12.71 | 70.00 ± 12.71 | 71.00 ± 12.71 | 60.00 ± 0.00 |" in md
    assert "| dkd | 2 | 86.00 ± 12.71 | 80.00 ± 12.71 | 81.00 ± 12.71 | 60.00 ± 0.00 |" in md
    assert "| kd | onnxruntime | fp32 | 1 | 71 | 1 |  |" in md
    assert [a["point"] for a in json.loads((out / "sweep.json").read_text())["accuracy"]] == [{"loss": "kd"},
                                                                                               {"loss": "dkd"}]


def test_sweep_refuses_an_unknown_preset_before_any_run(tiny_path, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "edgedistill.pipeline", types.SimpleNamespace(run_recipe=fake_run_recipe(calls)))
    with pytest.raises(RecipeError, match="'loss'"):
        sweep.run_sweep(str(tiny_path), ["loss=kd,dkdd"], str(tmp_path / "sweep"))
    assert calls == []
