"""Latency and throughput of a run's student (PyTorch eager, ``torch.compile``) and of its exported bundles.

Bundles are timed through ``export/run.py``'s ``load_bundle``, the very code a target runs. Backends are timed in
interleaved rounds, so a burst of load from another process on a shared machine hits all of them alike; ratios
between backends compare medians of the same rounds (``same_round_speedup``), never each backend's luckiest round.
PyTorch runs in the memory layout training used. Each row records the threads, execution providers and layout
it actually ran with. Writes ``RUN/bench.json`` (a list of rows), ``RUN/bench.md`` and ``RUN/bench.png``
(accuracy against latency).
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .utils import atomic_savefig, atomic_write_text, read_json, write_json

log = logging.getLogger(__name__)
BENCH_BACKENDS = ("pytorch", "torch-compile", "onnxruntime", "openvino", "tensorrt")
NOT_REPORTED = {"runtime_threads": None, "providers": None, "memory_format": None}  # every row has these keys


@dataclass(eq=False)
class Timed:
    """Something to time: ``make(batch)`` returns a no-argument call running one batch.

    ``settings`` is how it runs, as the runtime reports it: ``runtime_threads``, ``providers``, ``memory_format``.
    """

    backend: str
    precision: str
    make: object
    top1: float | None = None
    bundle: str | None = None
    settings: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# What to time


def is_run_dir(path: Path) -> bool:
    return (path / "student" / "model.pt").is_file()


def output_dir(path: Path) -> Path:
    """Where results go: the run folder for a run or one of its bundles, else the bundle folder itself."""
    if path.name and path.parent.name == "export" and is_run_dir(path.parent.parent):
        return path.parent.parent
    return path


def timed_in_run(run_dir: Path, threads: int, backends) -> list:
    bundles = sorted(p.parent for p in (run_dir / "export").glob("*/manifest.json"))
    manifests = [read_json(b / "manifest.json") for b in bundles]
    top1 = next((m["accuracy"]["pytorch_top1"] for m in manifests if (m.get("accuracy") or {}).get("pytorch_top1")
                 is not None), None)
    if top1 is None and (run_dir / "metrics.json").is_file():
        top1 = (read_json(run_dir / "metrics.json").get("student") or {}).get("top1")
        top1 = top1 / 100 if top1 is not None and top1 > 1 else top1  # metrics.json records percent
    timed = []
    if {"pytorch", "torch-compile"} & set(backends):
        timed += timed_pytorch(run_dir, top1, backends)
    return timed + [t for b in bundles if (t := timed_bundle(b, threads, backends))]


def timed_pytorch(run_dir: Path, top1, backends) -> list:
    import torch

    from .students import LogitsOnly, load_student

    student, saved = load_student(run_dir)
    # Time the layout training ran in (channels_last unless the recipe turned it off): that is how this student
    # runs in PyTorch, and a contiguous-NCHW baseline can take slower oneDNN paths, inflating every "x eager".
    channels_last = (saved["recipe"].get("train") or {}).get("channels_last", True)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model, size = LogitsOnly(student).eval().to(memory_format=layout), int(saved["input"]["size"])

    def inputs(batch):
        return torch.randn(batch, 3, size, size).contiguous(memory_format=layout)

    def eager(batch):
        x = inputs(batch)
        return lambda: torch_call(model, x)

    def compiled(batch):
        x, fn = inputs(batch), torch.compile(model)
        torch_call(fn, x)  # compile now: failures surface here, not inside the timing loop
        return lambda: torch_call(fn, x)

    settings = {"runtime_threads": torch.get_num_threads(), "providers": None,
                "memory_format": str(layout).removeprefix("torch.")}
    pairs = (("pytorch", eager), ("torch-compile", compiled))
    return [Timed(name, "fp32", make, top1, settings=settings) for name, make in pairs if name in backends]


def torch_call(fn, x):
    import torch

    with torch.inference_mode():
        return fn(x)


def timed_bundle(folder: Path, threads: int, backends) -> Timed | None:
    from .runtime.run import load_bundle, read_manifest

    manifest = read_manifest(folder)
    if manifest["runtime"]["name"] not in backends:
        return None
    try:
        bundle = load_bundle(folder, threads=threads)
    except ImportError as e:
        log.warning("Skipping %s: %s", folder, e)
        return None
    size = int(bundle.spec["size"])

    def make(batch):
        x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
        return lambda: bundle.predict(x)

    return Timed(manifest["runtime"]["name"], manifest["precision"], make,
                  (manifest.get("accuracy") or {}).get("top1"), str(folder), bundle.settings)


# ---------------------------------------------------------------------------------------------------------------
# Timing


def measure_interleaved(calls: dict, warmup: int, iters: int, rounds: int = 5) -> dict:
    """Milliseconds per call for each entry of ``calls``, as a list of rounds; the entries take turns each round."""
    from .runtime.timing import time_calls

    rounds = max(1, min(rounds, iters))
    samples = {key: [] for key in calls}
    for r in range(rounds):
        n = iters // rounds + (1 if r < iters % rounds else 0)
        for key, fn in calls.items():
            samples[key].append(time_calls(fn, warmup if r == 0 else min(2, warmup), n))
    return samples


def same_round_speedup(baseline: list, candidate: list) -> float:
    """How many times faster ``candidate`` runs than ``baseline``: the median over rounds of the per-round ratio.

    Both are per-round timings from the same ``measure_interleaved`` call (each round a list of milliseconds, or
    that round's median). Comparing each backend's best round instead would set one backend's quietest moment
    against another's, and on a shared machine reward whichever happened to dodge the load.
    """
    if len(baseline) != len(candidate) or not baseline:
        raise ValueError(f"needs the same, non-zero number of rounds, got {len(baseline)} and {len(candidate)}")
    base, cand = (np.array([np.median(r) for r in x]) for x in (baseline, candidate))
    return float(np.median(base / cand))


def prepare_calls(timed: list, batches) -> tuple[dict, dict]:
    """(target, batch) -> call, skipping those that fail to build (``torch.compile`` without a compiler...)."""
    calls, skipped = {}, {}
    for t in timed:
        for b in batches:
            try:
                calls[(t, b)] = t.make(b)
            except Exception as e:  # noqa: BLE001 - any backend failure means "not available here", stated below
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                skipped[(t.backend, t.precision)] = reason
                log.warning("%s %s does not work here, skipped (%s)", t.backend, t.precision, reason)
                break
    return calls, skipped


def host_info() -> dict:
    """``host.host_profile`` plus the keys bench.md prints (cpu, cpu_count, gpu)."""
    from .host import host_profile

    profile = host_profile()
    return {**profile, "cpu_count": profile["cores"], "gpu": profile["gpus"][0] if profile["gpus"] else None}


def rows_for(samples: dict, threads: int, warmup: int) -> list:
    from .export.bundle import library_versions
    from .runtime.timing import latency_stats

    host, versions = host_info(), library_versions()
    rows = []
    for (t, batch), rounds in samples.items():
        flat = [ms for r in rounds for ms in r]
        rows.append({"backend": t.backend, "precision": t.precision, "batch": batch, **latency_stats(flat, batch),
                     "round_p50_ms": [float(np.median(r)) for r in rounds], "warmup": warmup, "threads": threads,
                     **NOT_REPORTED, **t.settings, "top1": t.top1, "bundle": t.bundle, "host": host,
                     "versions": versions})
    for r in rows:
        eager = find_row(rows, "pytorch", "fp32", r["batch"])
        r["x_eager"] = same_round_speedup(eager["round_p50_ms"], r["round_p50_ms"]) if eager else None
    return rows


def find_row(rows: list, backend: str, precision: str, batch: int) -> dict | None:
    return next((r for r in rows if (r["backend"], r["precision"], r["batch"]) == (backend, precision, batch)), None)


# ---------------------------------------------------------------------------------------------------------------
# Reports


def markdown(rows: list, skipped: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    host = rows[0]["host"] if rows else host_info()
    lines = [f"Host: {host['cpu']}, {host['cpu_count']} CPUs ({', '.join(host.get('isa') or []) or 'ISA unknown'}), "
             f"GPU: {host['gpu'] or 'none'}", "",
             "| backend | precision | batch | p50 ms | p90 ms | p99 ms | images/s | x eager | threads | runs with "
             "| top-1 % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        runs_with = ", ".join(r.get("providers") or []) or r.get("memory_format") or "-"
        lines.append(f"| {r['backend']} | {r['precision']} | {r['batch']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['throughput_ips']:.1f} | {num(r.get('x_eager'), '.2f')} | "
                     f"{num(r.get('runtime_threads'), 'd')} | {runs_with} | {pct(r['top1'])} |")
    lines += int8_lines(rows)
    if rows:
        lines += ["", f"Ratios (x eager, INT8 vs FP32) are the median over the {len(rows[0]['round_p50_ms'])} "
                      "interleaved rounds of the per-round ratio of p50s; threads 0 is ONNX Runtime's default."]
    lines += [f"\n{backend} {precision}: not measured ({reason})" for (backend, precision), reason in skipped.items()]
    return "\n".join(lines) + "\n"


def int8_lines(rows: list) -> list:
    """One line per backend and batch timed at both FP32 and INT8: the INT8 speed-up from the same rounds."""
    lines = []
    for r in rows:
        fp32 = find_row(rows, r["backend"], "fp32", r["batch"]) if r["precision"] == "int8" else None
        if fp32:
            speedup = same_round_speedup(fp32["round_p50_ms"], r["round_p50_ms"])
            lines.append(f"{r['backend']} INT8 vs FP32 at batch {r['batch']}: {speedup:.2f}x")
    return [""] + lines if lines else []


def plot(rows: list, path: Path):
    """Top-1 against p50 latency at the smallest batch, one labelled point per backend and precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = min((r["batch"] for r in rows), default=1)
    points = [r for r in rows if r["batch"] == batch and r["top1"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in points:
        ax.scatter(r["p50_ms"], 100 * r["top1"])
        ax.annotate(f"{r['backend']} {r['precision']}", (r["p50_ms"], 100 * r["top1"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    if not points:
        ax.text(0.5, 0.5, "no accuracy recorded (export the run to measure it)", ha="center", transform=ax.transAxes)
    ax.set_xlabel(f"p50 latency at batch {batch} (ms)")
    ax.set_ylabel("top-1 accuracy on held-out images (%)")
    ax.set_title("Accuracy against latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def write_reports(out: Path, rows: list, skipped: dict):
    write_json(out / "bench.json", rows)
    atomic_write_text(out / "bench.md", markdown(rows, skipped))
    plot(rows, out / "bench.png")
    log.info("Benchmark of %s:\n%s", out, markdown(rows, skipped))


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def check_bench_backends(backends) -> tuple:
    from .recipe import RecipeError

    backends = tuple(backends or BENCH_BACKENDS)
    unknown = [b for b in backends if b not in BENCH_BACKENDS]
    if unknown:
        raise RecipeError(f"Unknown benchmark backend(s) {unknown}; choose from {list(BENCH_BACKENDS)}")
    return backends


def group_timed(paths, threads: int, backends) -> dict:
    """Output folder -> timed, each bundle once even when named both directly and through its run."""
    groups, seen = {}, set()
    for path in map(Path, paths):
        if is_run_dir(path):
            timed = timed_in_run(path, threads, backends)
        elif (path / "manifest.json").is_file():
            timed = [t for t in [timed_bundle(path, threads, backends)] if t]
        else:
            raise FileNotFoundError(f"{path} is neither a run folder (student/model.pt) nor a bundle (manifest.json)")
        fresh = [t for t in timed if t.bundle is None or t.bundle not in seen]
        seen.update(t.bundle for t in fresh if t.bundle)
        groups.setdefault(output_dir(path), []).extend(fresh)
    return groups


def bench_paths(paths, batches=(1,), threads: int = 0, warmup: int = 10, iters: int = 50, backends=(),
                rounds: int = 5) -> list:
    """Time every backend of each run or bundle in ``paths``; returns all rows and writes the reports.

    Args:
        paths: run folders and/or bundle folders.
        batches: batch sizes to time.
        threads: CPU threads for every backend (0: each runtime's default).
        warmup: untimed calls before timing each (target, batch).
        iters: timed calls per (target, batch), spread over ``rounds`` interleaved rounds.
        backends: names from ``BENCH_BACKENDS`` to time; empty: all that are present.
    """
    import torch

    backends = check_bench_backends(backends)
    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        all_rows = []
        for out, timed in group_timed(paths, threads, backends).items():
            calls, skipped = prepare_calls(timed, [int(b) for b in batches])
            rows = rows_for(measure_interleaved(calls, warmup, iters, rounds), threads, warmup)
            write_reports(out, rows, skipped)
            all_rows += rows
        return all_rows
    finally:
        torch.set_num_threads(default_threads)


def bench_run(run_dir, cfg) -> list:
    """What ``recipe run`` calls when the recipe has a ``bench`` section (a ``recipe.BenchCfg``)."""
    return bench_paths([run_dir], batches=cfg.batch, threads=cfg.threads, warmup=cfg.warmup, iters=cfg.iters,
                       backends=cfg.backends)
