import math

import pytest

from edgedistill.stats import aggregate_metrics, format_ci, mean_ci


def test_ci_is_1_96_sample_std_over_sqrt_n():
    # values 1, 2, 3: mean 2, sample std (ddof=1) 1, half-width 1.96 / sqrt(3) = 1.1316
    mean, hw = mean_ci([1, 2, 3])
    assert mean == 2 and hw == pytest.approx(1.96 / math.sqrt(3)) and hw == pytest.approx(1.1316, abs=1e-4)
    # 0.80, 0.82, 0.84, 0.86: mean 0.83, squared deviations sum 0.002, s = sqrt(0.002 / 3) = 0.025820,
    # half-width 1.96 * 0.025820 / 2 = 0.025303 (the population std would give 0.021913)
    mean, hw = mean_ci([0.80, 0.82, 0.84, 0.86])
    assert mean == pytest.approx(0.83) and hw == pytest.approx(0.025303, abs=1e-6)


def test_ci_edge_cases():
    assert mean_ci([0.7]) == (0.7, 0.0)
    assert mean_ci([5, 5, 5]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_ci([])
    assert format_ci(0.8123, 0.0041, digits=1, scale=100) == "81.2 ± 0.4"


def test_aggregate_metrics_keeps_the_tree_and_summarises_numeric_leaves():
    runs = [{"student": {"top1": 0.80, "params": 5}, "backend": "onnx", "ok": True, "bench": [{"p50_ms": 1.0}]},
            {"student": {"top1": 0.82, "params": 5}, "backend": "onnx", "ok": True, "bench": [{"p50_ms": 3.0}]},
            {"student": {"top1": 0.84}, "backend": "openvino", "ok": False, "bench": [{"p50_ms": 2.0}]}]
    agg = aggregate_metrics(runs)
    top1 = agg["student"]["top1"]
    assert top1["mean"] == pytest.approx(0.82) and top1["n"] == 3 and top1["values"] == [0.80, 0.82, 0.84]
    assert top1["ci95"] == pytest.approx(1.96 * 0.02 / math.sqrt(3))
    assert agg["student"]["params"] == {"mean": 5.0, "ci95": 0.0, "n": 2, "values": [5, 5]}  # missing in one run
    assert agg["backend"] == ["onnx", "onnx", "openvino"] and agg["ok"] == [True, True, False]  # bools aren't numbers
    assert agg["bench"][0]["p50_ms"]["mean"] == pytest.approx(2.0)
    assert aggregate_metrics([{"name": "x"}, {"name": "x"}]) == {"name": "x"}
