import math

import pytest

from edgedistill.stats import aggregate_metrics, format_ci, mean_ci, t_quantile


def test_ci_is_student_t_sample_std_over_sqrt_n():
    # values 1, 2, 3: mean 2, sample std (ddof=1) 1, n = 3 so t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3) = 2.4843
    # (the normal approximation, 1.96 / sqrt(3) = 1.13, would claim an interval less than half as wide)
    mean, hw = mean_ci([1, 2, 3])
    assert mean == 2 and hw == pytest.approx(2.4843, abs=1e-4)
    # 0.80, 0.82, 0.84, 0.86: mean 0.83, squared deviations sum 0.002, s = sqrt(0.002 / 3) = 0.025820,
    # t(0.975, 3) = 3.182: half-width 3.182 * 0.025820 / 2 = 0.041080
    mean, hw = mean_ci([0.80, 0.82, 0.84, 0.86])
    assert mean == pytest.approx(0.83) and hw == pytest.approx(0.041080, abs=1e-5)


def test_t_quantile_matches_tables_and_tends_to_the_normal():
    assert t_quantile(1) == pytest.approx(12.706, abs=1e-3) and t_quantile(9) == pytest.approx(2.262, abs=1e-3)
    assert t_quantile(40) == pytest.approx(2.021, abs=1e-3) and t_quantile(120) == pytest.approx(1.980, abs=1e-3)
    assert t_quantile(100000) == pytest.approx(1.96, abs=1e-3)


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
    assert top1["ci95"] == pytest.approx(4.303 * 0.02 / math.sqrt(3))
    assert agg["student"]["params"] == {"mean": 5.0, "ci95": 0.0, "n": 2, "values": [5, 5]}  # missing in one run
    assert agg["backend"] == ["onnx", "onnx", "openvino"] and agg["ok"] == [True, True, False]  # bools aren't numbers
    assert agg["bench"][0]["p50_ms"]["mean"] == pytest.approx(2.0)
    assert aggregate_metrics([{"name": "x"}, {"name": "x"}]) == {"name": "x"}
