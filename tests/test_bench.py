"""Benchmark: rows, reports and backend selection on a tiny exported student."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from test_export import make_run

from edgedistill import bench, cli
from edgedistill.bench import Timed, bench_paths, bench_run, measure_interleaved
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



def test_rows_say_how_each_backend_ran(run_dir, monkeypatch):
    import onnxruntime as ort

    seen = []
    timed = bench.torch_call
    monkeypatch.setattr(bench, "torch_call", lambda fn, x: seen.append((fn, x)) or timed(fn, x))
    rows = bench_paths([run_dir], batches=[1], threads=1, warmup=1, iters=2, backends=["pytorch", "onnxruntime"])
    eager = next(r for r in rows if r["backend"] == "pytorch")
    assert eager["memory_format"] == "channels_last" and eager["runtime_threads"] == 1 and eager["providers"] is None
    fn, x = seen[0]  # what was really timed: a channels_last model on a channels_last input
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fn.parameters())
    saved = json.loads((run_dir / "bench.json").read_text())
    for r in (r for r in saved if r["backend"] == "onnxruntime"):
        assert r["runtime_threads"] == 1 and r["memory_format"] is None
        assert "CPUExecutionProvider" in r["providers"] and set(r["providers"]) <= set(ort.get_available_providers())
    assert all(r["host"]["cpu_count"] == os.cpu_count() for r in saved)
    assert "| onnxruntime | int8 | 1 |" in (run_dir / "bench.md").read_text()
    assert "CPUExecutionProvider" in (run_dir / "bench.md").read_text()


# Per-round timings (ms) where the backends' best rounds are different rounds: eager's median is 10 in every
# round, ONNX FP32 had one quiet round (2 ms) and INT8 a quiet one too. Same-round ratios: FP32 vs eager
# [2, 2, 5] -> 2; INT8 vs FP32 [2, 2, 1] -> 2. Best round against best round would claim 5x and 1x.
EAGER = [[9, 10, 11], [10, 10, 10], [11, 10, 9]]
FP32 = [[5, 5, 5], [4, 5, 6], [2, 2, 2]]
INT8 = [[2.5, 2.5, 2.5], [2.5, 2.5, 2.5], [2, 2, 2]]


def synthetic_rows() -> list:
    samples = {(Timed("pytorch", "fp32", None), 1): EAGER, (Timed("onnxruntime", "fp32", None), 1): FP32,
               (Timed("onnxruntime", "int8", None), 1): INT8}
    return bench.rows_for(samples, threads=0, warmup=0)


def test_speedup_compares_medians_of_the_same_rounds():
    assert bench.same_round_speedup(EAGER, FP32) == pytest.approx(2.0)
    assert bench.same_round_speedup(FP32, INT8) == pytest.approx(2.0)
    assert bench.same_round_speedup([10, 10, 10], [5, 5, 2]) == pytest.approx(2.0)  # rounds given as their p50s
    with pytest.raises(ValueError, match="same, non-zero number of rounds"):
        bench.same_round_speedup(EAGER, FP32[:2])


def test_bench_report_ratios_come_from_the_same_rounds():
    rows = synthetic_rows()
    assert [r["x_eager"] for r in rows] == pytest.approx([1.0, 2.0, 4.0])
    table = bench.markdown(rows, {})
    header, fp32 = ([c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()
                    if line.startswith(("| backend |", "| onnxruntime | fp32 |")))
    assert fp32[header.index("x eager")] == "2.00"
    assert "onnxruntime INT8 vs FP32 at batch 1: 2.00x" in table


def load_export_latency():
    path = Path(__file__).parents[1] / "benchmarks" / "export_latency.py"
    spec = importlib.util.spec_from_file_location("export_latency", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_latency_headlines_use_same_round_medians(capsys):
    script = load_export_latency()
    rows = synthetic_rows()
    for r in rows:  # what measure() adds to bench's rows
        r.update(agreement=None, best_round_p50_ms=min(r["round_p50_ms"]))
    summary = script.summarize("tiny", rows, flops=1e9, rate=1000.0)
    assert summary["fp32_vs_eager"] == pytest.approx(2.0) and summary["int8_vs_fp32"] == pytest.approx(2.0)
    script.print_report("tiny", rows, summary)
    out = capsys.readouterr().out
    assert "vs eager: 2.00x" in out and "vs best FP32: 2.00x" in out and "best-round p50 ms |" in out

@pytest.mark.slow
def test_torch_compile_is_measured_or_reported(run_dir):
    rows = bench_paths([run_dir], batches=[1], warmup=1, iters=3, backends=["torch-compile"])
    if rows:
        assert rows[0]["backend"] == "torch-compile"
    else:
        assert "torch-compile fp32: not measured" in (run_dir / "bench.md").read_text()
