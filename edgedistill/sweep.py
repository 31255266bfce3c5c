"""Run one recipe over a grid of overrides, then tabulate and plot accuracy against latency per backend.

``edgedistill recipe sweep pets-tinyvit student.name=a,b,c export.precision=fp32,int8`` expands to the cartesian
product of single ``key=value`` overrides. Every grid point runs through ``pipeline.run_recipe`` with the sweep
folder as the shared folder, so stages that do not depend on the varied keys (teacher features, synthetic images,
a trained student shared by two precisions) run once. Only commas outside brackets split values:
``export.formats=[onnx,openvino]`` is one value. ``loss=ce,kd,dkd`` sweeps named loss presets
(``losses/presets.py``); with ``seeds`` each point trains that many seeds and ``sweep.md`` gives each point's test
accuracy as a mean and its 95% Student-t interval.
"""
import itertools
import json
import re
from pathlib import Path

from .checks import load_checked
from .recipe import RecipeError
from .stats import INTERVAL, format_ci
from .utils import atomic_savefig, atomic_write_text

_OPEN, _CLOSE = "[{(", "]})"


def split_values(value: str) -> list[str]:
    """Split at commas that are outside brackets, braces, parentheses and quotes: ``a,[b,c]`` -> ``a``, ``[b,c]``."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if depth != 0 or quote:
        raise RecipeError(f"Unbalanced brackets or quotes in sweep value {value!r}")
    parts.append(cur.strip())
    if len(parts) > 1 and not all(parts):
        raise RecipeError(f"Empty value in sweep list {value!r}")
    return parts


def _parse(overrides: list[str]) -> list[tuple[str, list[str]]]:
    axes, seen = [], set()
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"Sweep override {item!r} must look like key=v1,v2, e.g. student.name=resnet18,resnet50")
        key, value = item.split("=", 1)
        key = key.strip()
        if key in seen:
            raise RecipeError(f"Sweep key {key!r} is given twice; put all its values in one list")
        seen.add(key)
        try:
            axes.append((key, split_values(value)))
        except RecipeError as e:
            raise RecipeError(f"Sweep key {key!r}: {e}") from e
    return axes


def expand_grid(overrides: list[str]) -> list[list[str]]:
    """Cartesian product of ``key=v1,v2`` overrides as lists of single ``key=value`` overrides.

    The first key varies slowest; single-valued keys appear in every point; no overrides give one empty point.
    """
    axes = _parse(overrides)
    return [[f"{k}={v}" for k, v in zip([k for k, _ in axes], combo)]
            for combo in itertools.product(*[vals for _, vals in axes])]


def varying_keys(overrides: list[str]) -> list[str]:
    """The keys that take more than one value: they name the grid points."""
    return [k for k, vals in _parse(overrides) if len(vals) > 1]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats, for lower latency and higher accuracy.

    Args:
        points: ``(latency, accuracy)`` pairs; pairs with a missing or NaN value are never on the front.

    Returns:
        Indices sorted by latency. Exact duplicates are both kept: neither beats the other.
    """
    ok = [i for i, (lat, acc) in enumerate(points) if lat is not None and acc is not None and lat == lat and acc == acc]
    front = []
    for i in ok:
        li, ai = points[i]
        beaten = any(points[j][0] <= li and points[j][1] >= ai and (points[j][0] < li or points[j][1] > ai)
                     for j in ok)
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def mark_pareto(rows: list[dict]):
    """Set ``row["pareto"]`` per (backend, batch) group, on ``p50_ms`` and ``top1``."""
    groups = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.get("backend"), r.get("batch")), []).append(i)
    for idx in groups.values():
        front = set(pareto_front([(rows[i].get("p50_ms"), rows[i].get("top1")) for i in idx]))
        for pos, i in enumerate(idx):
            rows[i]["pareto"] = pos in front


def _label(row: dict) -> str:
    point = row.get("point", {})
    text = "/".join(str(v) for v in point.values()) or "default"
    if "precision" in row and not any(str(row["precision"]) == str(v) for v in point.values()):
        text += f" {row['precision']}"
    return text


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def sweep_table_md(rows: list[dict]) -> str:
    """Markdown: one line per (grid point, backend, precision, batch), sorted by backend, batch and latency;
    Pareto-optimal lines (within their backend and batch) are marked."""
    keys = list(dict.fromkeys(k for r in rows for k in r.get("point", {})))
    head = keys + ["backend", "precision", "batch", "top-1 %", "p50 ms", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(keys) + "---|---|---:|---:|---:|:---:|"]
    order = sorted(rows, key=lambda r: (str(r.get("backend")), r.get("batch") or 0,
                                        r.get("p50_ms") if r.get("p50_ms") is not None else float("inf")))
    for r in order:
        cells = [str(r.get("point", {}).get(k, "")) for k in keys]
        cells += [str(r.get("backend", "–")), str(r.get("precision", "–")), _fmt(r.get("batch"), "d"),
                  _fmt(r.get("top1"), ".4g"), _fmt(r.get("p50_ms"), ".3g"), "★" if r.get("pareto") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_row(run_dir, point: dict) -> dict:
    """The student's test-split balanced accuracy and top-1 (percent) of a finished run: ``(mean, half-width)``
    each, the half-width of the 95% Student-t interval over its seeds (None with one seed), and ``n`` seeds."""
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    seeds, row = metrics.get("seeds", {}), {"point": dict(point)}
    for model in ("student", "baseline", "teacher"):
        if model in metrics:
            row[model] = _mean_ci(seeds.get(model, {}), metrics[model], "balanced_accuracy")
    row["balanced_accuracy"], row["top1"] = row["student"], _mean_ci(seeds.get("student", {}), metrics["student"], "top1")
    if "validation" in metrics:
        row["val_balanced_accuracy"] = _mean_ci(seeds.get("validation", {}).get("student", {}),
                                                metrics["validation"]["student"], "balanced_accuracy")
    row["n"] = metrics.get("n_seeds", 1)
    return row


def _mean_ci(over_seeds: dict, one: dict, key: str) -> tuple:
    """(mean, 95% half-width) over seeds, or (the one value, None)."""
    agg = over_seeds.get(key)
    return (agg["mean"], agg["ci95"]) if isinstance(agg, dict) else (one[key], None)


def accuracy_table_md(rows: list[dict]) -> str:
    """Markdown: one line per grid point (its preset name, for ``loss=``), mean ± 95% t-interval, P1 Table I style."""
    keys = list(dict.fromkeys(k for r in rows for k in r["point"]))
    n = sorted({r["n"] for r in rows})
    spread = f"mean ± {INTERVAL}" if n[-1] > 1 else "one seed each, so no interval (use --seeds N)"
    val = all("val_balanced_accuracy" in r for r in rows)
    cols = ["val_balanced_accuracy"] * val + ["balanced_accuracy", "top1"] + \
        [m for m in ("baseline", "teacher") if all(m in r for r in rows)]
    names = {"val_balanced_accuracy": "val balanced acc %", "balanced_accuracy": "test balanced acc %",
             "top1": "test top-1 %", "baseline": "baseline test balanced acc %",
             "teacher": "teacher test balanced acc %"}
    choose = ("choose a point on the validation column, then read its test columns once" if val else
              "the recipe has no validation split (data.val_fraction), so no point should be chosen from this table")
    lines = ["## Student accuracy per grid point", "",
             f"Test figures are on the held-out test split, where nothing (epoch, learning rate, preset) was chosen; "
             f"{choose}. The baseline is the same student trained on the labelled images alone, at the same budget. "
             f"Seeds per point: {', '.join(map(str, n))}; {spread}.", "",
             "| " + " | ".join((keys or ["point"]) + ["seeds"] + [names[c] for c in cols]) + " |",
             "|" + "---|" * max(1, len(keys)) + "---:|" * (1 + len(cols))]
    for r in rows:
        cells = [str(r["point"].get(k, "")) for k in keys] or ["default"]
        cells += [str(r["n"])] + [format_ci(*r[c]) if r[c][1] is not None else f"{r[c][0]:.2f}" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_pareto(rows: list[dict], path, batch: int | None = None):
    """Accuracy vs p50 latency, one panel per backend, with the Pareto front drawn and labelled points.

    Args:
        rows: sweep rows with ``backend``, ``batch``, ``p50_ms``, ``top1`` and ``point``.
        path: PNG to write.
        batch: the batch size to plot; by default each backend's smallest.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's global state alone

    backends = sorted({str(r.get("backend")) for r in rows if r.get("p50_ms") is not None})
    fig = Figure(figsize=(5.5 * max(1, len(backends)), 4.5), layout="constrained")
    axes = fig.subplots(1, max(1, len(backends)), squeeze=False)[0]
    for ax, backend in zip(axes, backends):
        sel = [r for r in rows if str(r.get("backend")) == backend and r.get("p50_ms") is not None]
        b = batch if batch is not None else min((r.get("batch") or 0) for r in sel)
        sel = [r for r in sel if (r.get("batch") or 0) == b]
        pts = [(r["p50_ms"], r["top1"]) for r in sel]
        front = pareto_front(pts)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:gray", label="grid point")
        if front:
            ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="tab:red")
            ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], color="tab:red", zorder=3,
                       label="Pareto front")
        for r, (x, y) in zip(sel, pts):
            ax.annotate(_label(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(title=f"{backend} (batch {b})", xlabel="p50 latency (ms)", ylabel="top-1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if not backends:
        axes[0].text(0.5, 0.5, "no benchmark rows", ha="center", va="center")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=120)


def point_dirname(point: dict) -> str:
    """A folder name for a grid point: ``student.name=resnet18__export.precision=int8``."""
    text = "__".join(f"{k}={v}" for k, v in point.items()) or "default"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def collect_rows(run_dir, point: dict) -> list[dict]:
    """One row per benchmark row of a finished run: its bench.json fields plus the point, run folder and top-1.

    The accuracy is the row's own ``top1`` when the benchmark measured the exported artifact, else the run's
    ``metrics.json["student"]["top1"]`` (its mean when several seeds were aggregated).
    """
    run_dir = Path(run_dir)
    top1 = json.loads((run_dir / "metrics.json").read_text())["student"]["top1"]
    if isinstance(top1, dict):
        top1 = top1["mean"]
    # With --seeds, seed 0's student is the one exported and benchmarked, from its own folder.
    bench_path = next((p for p in (run_dir / "bench.json", run_dir / "seed-0" / "bench.json") if p.exists()), None)
    bench = json.loads(bench_path.read_text()) if bench_path else [{}]
    return [{**b, "point": dict(point), "run_dir": str(run_dir), "top1": top1 if b.get("top1") is None else 100.0 * b["top1"]}
            for b in bench]  # bench.json holds fractions, metrics.json percent: rows are in percent


def run_sweep(name, overrides, out=None, seeds: int = 1) -> list[dict]:
    """Run recipe ``name`` at every grid point, then write ``sweep.md``, ``sweep.json`` and ``pareto.png``.

    Args:
        name: built-in recipe name or YAML path.
        overrides: ``key=v1,v2`` items (single values are fixed overrides applied at every point).
        out: sweep folder, shared by every point (default ``runs/<recipe name>-sweep``).
        seeds: seeds trained per point (``run_recipe``'s); accuracy is reported as their mean and 95% t-interval.

    Returns:
        The table rows.
    """
    try:
        from .pipeline import run_recipe
    except ImportError as e:
        raise ImportError("recipe sweep needs edgedistill.pipeline.run_recipe, which failed to import") from e

    # 1. Expand the grid and validate every point before any work starts.
    if seeds < 1:
        raise RecipeError(f"--seeds must be at least 1, got {seeds}")
    overrides = list(overrides)
    points, keys = expand_grid(overrides), varying_keys(overrides)
    first = load_checked(name, points[0])
    # Every point is exported and benchmarked, so latency sits beside accuracy even for recipes without those sections.
    extra = ([] if first.export is not None else ["export.formats=[onnx]"]) + \
        ([] if first.bench is not None else ["bench.iters=30"])
    points = [p + extra for p in points]
    recipes = [load_checked(name, p) for p in points]
    out = Path(out) if out else Path("runs") / f"{recipes[0].name}-sweep"

    # 2. Run each point; run_recipe reuses stages already in the shared folder.
    rows, accuracy = [], []
    for point, recipe in zip(points, recipes):
        label = {k: v for k, v in (o.split("=", 1) for o in point) if k in keys}
        run_dir = out / "points" / point_dirname(label)
        run_recipe(recipe, run_dir, seeds=seeds, shared_dir=out)
        rows += collect_rows(run_dir, label)
        accuracy.append(accuracy_row(run_dir, label))

    # 3. Table, JSON and plot.
    mark_pareto(rows)
    title = f"# Sweep of {recipes[0].name}: {' '.join(overrides)}\n\n"
    atomic_write_text(out / "sweep.md", title + accuracy_table_md(accuracy) + "\n## Accuracy and latency per "
                      "backend\n\n" + sweep_table_md(rows))
    atomic_write_text(out / "sweep.json", json.dumps({"recipe": str(name), "overrides": overrides, "seeds": seeds,
                                                      "accuracy": accuracy, "rows": rows}, indent=2, default=str))
    plot_pareto(rows, out / "pareto.png")
    return rows
