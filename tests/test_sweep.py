import json
import sys
import types

import pytest

from edgedistill import sweep
from edgedistill.recipe import load_recipe
from edgedistill.sweep import (expand_grid, mark_pareto, pareto_front, plot_pareto, split_values, sweep_table_md,
                               varying_keys)


def test_grid_is_the_cartesian_product_first_key_slowest():
    assert expand_grid(["student.name=a,b", "export.precision=fp32,int8"]) == [
        ["student.name=a", "export.precision=fp32"], ["student.name=a", "export.precision=int8"],
        ["student.name=b", "export.precision=fp32"], ["student.name=b", "export.precision=int8"]]
    assert len(expand_grid(["student.name=a,b,c", "export.precision=fp32,int8", "train.epochs=1,2"])) == 12
    assert expand_grid([]) == [[]]


def test_bracket_lists_are_single_values():
    grid = expand_grid(["export.formats=[onnx,openvino]", "student.name=a,b"])
    assert grid == [["export.formats=[onnx,openvino]", "student.name=a"],
                    ["export.formats=[onnx,openvino]", "student.name=b"]]
    assert split_values("[onnx,openvino],[onnx]") == ["[onnx,openvino]", "[onnx]"]
    assert split_values("{a: 1, b: 2},x") == ["{a: 1, b: 2}", "x"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert varying_keys(["export.formats=[onnx,openvino]", "student.name=a,b"]) == ["student.name"]


@pytest.mark.parametrize("bad", ["student.name", "export.formats=[onnx,openvino", "student.name=a,,b"])
def test_malformed_overrides_are_refused(bad):
    with pytest.raises(ValueError):
        expand_grid([bad])


def test_a_key_given_twice_is_refused():
    with pytest.raises(ValueError, match="twice"):
        expand_grid(["student.name=a", "student.name=b"])


def test_pareto_front_on_a_hand_made_set():
    #          0: fast, weak   1: dominated by 0   2: slower, better   3: dominated by 2   4: slowest, best
    points = [(1.0, 0.70), (1.5, 0.65), (2.0, 0.80), (2.5, 0.80), (4.0, 0.85), (3.0, float("nan"))]
    assert pareto_front(points) == [0, 2, 4]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # ties: neither beats the other
    assert pareto_front([(2.0, 0.9), (1.0, 0.5)]) == [1, 0]  # sorted by latency
    assert pareto_front([]) == []


def make_rows():
    rows = []
    for name, top1 in [("a", 0.70), ("b", 0.80), ("c", 0.75)]:
        for backend, lat in [("onnxruntime", {"a": 1.0, "b": 2.0, "c": 3.0}), ("openvino", {"a": 2.0, "b": 1.0,
                                                                                         "c": 0.5})]:
            rows.append({"point": {"student.name": name}, "backend": backend, "precision": "fp32", "batch": 1,
                         "p50_ms": lat[name], "top1": top1})
    return rows


def test_pareto_is_marked_per_backend_and_the_table_and_plot_are_written(tmp_path):
    rows = make_rows()
    mark_pareto(rows)
    on = {(r["backend"], r["point"]["student.name"]) for r in rows if r["pareto"]}
    assert on == {("onnxruntime", "a"), ("onnxruntime", "b"), ("openvino", "b"), ("openvino", "c")}
    md = sweep_table_md(rows)
    assert md.splitlines()[0] == "| student.name | backend | precision | batch | top-1 % | p50 ms | Pareto |"
    assert "| c | openvino | fp32 | 1 | 0.75 | 0.5 | ★ |" in md
    path = tmp_path / "sub" / "pareto.png"
    plot_pareto(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_run_sweep_runs_every_point_with_the_shared_folder(tmp_path, monkeypatch):
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text("name: tiny\nstudent: {name: resnet18}\nloss: {kd: 1.0}\n")
    calls = []

    def run_recipe(recipe, out, seeds=1, shared_dir=None):
        calls.append((recipe.student.name, recipe.export.precision, out, shared_dir))
        out.mkdir(parents=True, exist_ok=True)
        top1 = {"resnet18": 0.8, "mobilenetv3_small_100": 0.7}[recipe.student.name]
        (out / "metrics.json").write_text(json.dumps({"student": {"top1": top1, "balanced_accuracy": top1}}))
        lat = (2.0 if recipe.student.name == "resnet18" else 1.0) / (2 if recipe.export.precision[0] == "int8" else 1)
        (out / "bench.json").write_text(json.dumps([{"backend": "onnxruntime", "precision": recipe.export.precision[0],
                                                     "batch": 1, "p50_ms": lat}]))

    monkeypatch.setitem(sys.modules, "edgedistill.pipeline", types.SimpleNamespace(run_recipe=run_recipe))
    monkeypatch.setattr(sweep, "load_checked", load_recipe)  # the registered names need timm; not what this tests
    out = tmp_path / "sweep"
    rows = sweep.run_sweep(str(recipe_path), ["student.name=resnet18,mobilenetv3_small_100",
                                              "export.precision=fp32,int8", "train.epochs=1"], str(out))
    assert len(calls) == 4 and all(shared == out for *_, shared in calls)
    assert calls[1][:2] == ("resnet18", ("int8",))
    assert calls[1][2] == out / "points" / "student.name=resnet18__export.precision=int8"
    assert len(rows) == 4 and sum(r["pareto"] for r in rows) == 2  # the two int8 points beat their fp32 twins
    assert (out / "pareto.png").exists() and "★" in (out / "sweep.md").read_text()
    assert len(json.loads((out / "sweep.json").read_text())["rows"]) == 4
