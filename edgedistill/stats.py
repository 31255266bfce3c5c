"""Statistics over repeated runs: mean and 95% confidence interval, as reported in P1 (Tables D-F).

The half-width is 1.96 * s / sqrt(n) with ``s`` the *sample* standard deviation (``ddof=1``, Bessel's correction):
the normal-approximation 95% interval of the mean over ``n`` seeds. With n = 3 seeds this is narrower than the
Student-t interval (t = 4.30), which is the convention the papers follow, not a claim of exact coverage.
"""
import math
import numbers

Z95 = 1.96


def mean_ci(values) -> tuple[float, float]:
    """Mean and 95% CI half-width 1.96 * s / sqrt(n), s the sample std (ddof=1). One value gives half-width 0."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(xs) / n
    if n == 1:
        return mean, 0.0
    s = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, Z95 * s / math.sqrt(n)


def format_ci(mean: float, half_width: float, digits: int = 2, scale: float = 1.0) -> str:
    """``"81.23 ± 0.41"``; ``scale=100`` prints fractions as percentages."""
    return f"{mean * scale:.{digits}f} ± {half_width * scale:.{digits}f}"


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def aggregate_metrics(runs: list):
    """Aggregate the metric dicts of several seeds into one tree of the same shape.

    Every numeric leaf becomes ``{"mean", "ci95", "n", "values"}`` (``ci95`` is the half-width of ``mean_ci``).
    Dicts are merged over the union of their keys, so a metric missing from some runs is aggregated over the runs
    that have it (``n`` says how many). Lists of the same length in every run are aggregated element by element.
    Any other leaf (strings, booleans, None, ragged lists) is kept as is when all runs agree, else as the list of
    the runs' values.

    Args:
        runs: one metrics dict (e.g. a run's metrics.json) per seed.
    """
    if not runs:
        raise ValueError("aggregate_metrics needs at least one run")
    if all(isinstance(r, dict) for r in runs):
        keys = list(dict.fromkeys(k for r in runs for k in r))
        return {k: aggregate_metrics([r[k] for r in runs if k in r]) for k in keys}
    if all(isinstance(r, list) for r in runs) and len({len(r) for r in runs}) == 1:
        return [aggregate_metrics([r[i] for r in runs]) for i in range(len(runs[0]))]
    if all(_is_number(r) for r in runs):
        mean, hw = mean_ci(runs)
        return {"mean": mean, "ci95": hw, "n": len(runs), "values": list(runs)}
    return runs[0] if all(r == runs[0] for r in runs) else list(runs)
