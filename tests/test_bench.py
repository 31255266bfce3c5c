"""Benchmark: rows, reports and backend selection on a tiny exported student."""
import json

import pytest
from test_export import make_run

from edgedistill import cli
from edgedistill.bench import bench_paths, bench_run, measure_interleaved
from edgedistill.recipe import BenchCfg, RecipeError

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'edgedistill[onnx]')")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from edgedistill.export import export_run

    run = make_run(tmp_path_factory.mktemp("bench"))
    export_run(run, formats=["onnx"], precisions=["fp32", "int8"])
    return run


def test_bench_writes_rows_table_and_plot(run_dir):
    rows = bench_paths([run_dir], batches=[1, 2], warmup=1, iters=6, backends=["pytorch", "onnxruntime"])
    keys = {(r["backend"], r["precision"], r["batch"]) for r in rows}
    assert keys == {(b, p, n) for b, p in [("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
                    for n in (1, 2)}
    saved = json.loads((run_dir / "bench.json").read_text())
    assert isinstance(saved, list) and len(saved) == 6
    for r in saved:
        assert r["p50_ms"] > 0 and r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["iters"] == 6
        assert r["throughput_ips"] == pytest.approx(r["batch"] * 1000 / r["p50_ms"])
        assert r["top1"] is not None and r["host"]["cpu_count"] >= 1 and "onnxruntime" in r["versions"]
    table = (run_dir / "bench.md").read_text()
    assert "| onnxruntime | int8 | 2 |" in table and "Host:" in table
    assert (run_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_on_a_bundle_writes_into_its_run(run_dir):
    (run_dir / "bench.json").unlink(missing_ok=True)
    code = cli.main(["bench", str(run_dir / "export" / "onnx-int8"), "--batch", "1", "--warmup", "1", "--iters", "3"])
    assert code == 0
    rows = json.loads((run_dir / "bench.json").read_text())
    assert [(r["backend"], r["precision"]) for r in rows] == [("onnxruntime", "int8")]


def test_bench_run_follows_the_recipe_section(run_dir):
    rows = bench_run(run_dir, BenchCfg(batch=(1,), warmup=1, iters=2, threads=1, backends=("onnxruntime",)))
    assert {r["precision"] for r in rows} == {"fp32", "int8"} and all(r["threads"] == 1 for r in rows)


def test_unknown_backend_names_the_known_ones(run_dir):
    with pytest.raises(RecipeError, match="Unknown benchmark backend.*'openvino'"):
        bench_paths([run_dir], backends=["openvno"])


def test_not_a_run_or_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        bench_paths([tmp_path])


def test_rounds_interleave_and_add_up():
    order = []
    samples = measure_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                  warmup=0, iters=7, rounds=3)
    assert [len(r) for r in samples["a"]] == [3, 2, 2] and sum(map(len, samples["b"])) == 7
    assert order[:6] == ["a"] * 3 + ["b"] * 3  # a's first round, then b's, then a again


@pytest.mark.slow
def test_torch_compile_is_measured_or_reported(run_dir):
    rows = bench_paths([run_dir], batches=[1], warmup=1, iters=3, backends=["torch-compile"])
    if rows:
        assert rows[0]["backend"] == "torch-compile"
    else:
        assert "torch-compile fp32: not measured" in (run_dir / "bench.md").read_text()
