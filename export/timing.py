"""Latency measurement shared by ``run.py bench`` on a device and ``edgedistill bench`` on the host: the same clock
and the same percentiles. numpy only."""
import time

import numpy as np


def time_calls(fn, warmup: int, iters: int) -> list:
    """Wall-clock milliseconds of ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def latency_stats(times_ms: list, batch: int) -> dict:
    t = np.asarray(times_ms)
    p50, p90, p99 = (float(v) for v in np.percentile(t, [50, 90, 99]))
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(t.mean()),
            "throughput_ips": batch * 1e3 / p50, "iters": len(t)}


def bench_bundle(bundle, batch: int, warmup: int, iters: int) -> dict:
    x = np.random.default_rng(0).standard_normal((batch, 3, bundle.spec["size"], bundle.spec["size"]),
                                                 dtype=np.float32)
    return latency_stats(time_calls(lambda: bundle.predict(x), warmup, iters), batch)
