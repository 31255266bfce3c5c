"""Statistics over repeated runs: mean and 95% Student-t confidence interval of the mean over seeds.

The half-width is t(0.975, n - 1) * s / sqrt(n), with ``s`` the *sample* standard deviation (``ddof=1``). With the
handful of seeds a training run affords, the normal approximation (1.96) is far too narrow: for n = 3, t = 4.303.
"""
import math
import numbers

# t(0.975, df) for df = 1..30 (two-sided 95%); larger df use a series expansion around the normal quantile.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.959964
INTERVAL = "95% Student-t interval of the mean over seeds (t(0.975, n-1)·s/√n, sample s)"


def t_quantile(df: int) -> float:
    """t(0.975, df), the two-sided 95% critical value of Student's t distribution."""
    if df < 1:
        raise ValueError("Student's t needs at least 1 degree of freedom")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975  # Cornish-Fisher expansion: accurate to ~1e-4 beyond df = 30
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values) -> tuple[float, float]:
    """Mean and 95% t-interval half-width t(0.975, n-1) * s / sqrt(n). One value gives half-width 0."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(xs) / n
    if n == 1:
        return mean, 0.0
    s = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t_quantile(n - 1) * s / math.sqrt(n)


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
