"""What a run prints and writes for people: the summary table and report.md."""
from pathlib import Path

from .evaluate import plot_confusion
from .run_folder import Run
from .utils import atomic_write_text


def mean_or_none(values: list):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt(v, digits=1):
    return "–" if v is None else f"{v:.{digits}f}"


MODELS = ("teacher", "student", "baseline")


def with_ci(m: dict, key: str) -> str:
    ci = f" ± {m[key + '_ci95']:.1f}" if key + "_ci95" in m else ""
    return f"{fmt(m.get(key))}{ci}"


def summary_header(metrics: dict) -> tuple:
    top_k = next((k for m in MODELS if m in metrics for k in metrics[m] if k.startswith("top") and k[3:].isdigit()
                  and k != "top1"), None)
    return ("model", "top-1 %", "balanced acc %", "macro-F1 %") + ((f"top-{top_k[3:]} %",) if top_k else ()) + (
        "GFLOPs", "params M", "agree %", "labelled", "unlabelled"), top_k


def summary_rows(metrics: dict) -> list[tuple]:
    _, top_k = summary_header(metrics)
    rows = []
    for name in MODELS:
        m = metrics.get(name)
        if m:
            images = m.get("images", {})
            rows.append((name, with_ci(m, "top1"), with_ci(m, "balanced_accuracy"), with_ci(m, "macro_f1"))
                        + ((with_ci(m, top_k),) if top_k else ())
                        + (fmt(m.get("gflops"), 3), fmt(m.get("params_m"), 2), fmt(m.get("agreement_with_teacher")),
                           str(images.get("labelled", "–")), str(images.get("unlabelled", "–"))))
    return rows


def recall_rows(metrics: dict, classes) -> list[tuple]:
    """Per class: each model's recall (the share of that class's test images it gets right), in percent."""
    return [(c, *(fmt(metrics[n]["per_class"].get(c)) for n in MODELS if n in metrics)) for c in classes]


def print_table(rows: list[tuple]):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def print_summary(out: Path, metrics: dict):
    print(f"\nOn the {metrics['n_test']} images of the held-out test split"
          + (f", mean ± 95% t-interval over {metrics['n_seeds']} seeds" if "n_seeds" in metrics else "") + ":")
    print_table([summary_header(metrics)[0]] + summary_rows(metrics))
    print("\nRecall % per class:")
    print_table([("class", *(n for n in MODELS if n in metrics))] + recall_rows(metrics, metrics["classes"]))
    print(f"\nRun folder: {out}  (metrics.json, report.md)")


def markdown_table(rows: list[tuple]) -> list[str]:
    return ["| " + " | ".join(map(str, rows[0])) + " |", "|" + "---|" * len(rows[0])] + [
        "| " + " | ".join(map(str, r)) + " |" for r in rows[1:]]


def write_report(run: Run, metrics: dict, split: dict):
    """RUN/report.md: the summary, seeds, per-class recall, confusion matrices, the suites and the stage times."""
    r = run.recipe
    lines = [f"# {r.name}", "", r.description, "",
             f"Teacher `{r.teacher.name}` ({metrics['teacher'].get('arch', '')}, "
             f"{metrics['teacher'].get('weights', '')}) → student `{r.student.name}`; "
             f"{len(split['classes'])} classes. "
             f"Every accuracy is on the {metrics['n_test']} images of the held-out test split unless its table says "
             "otherwise; balanced accuracy is the mean of the per-class recalls.", ""]
    lines += markdown_table([summary_header(metrics)[0]] + summary_rows(metrics))
    lines += ["", f"Student GFLOPs are {100 * metrics['gflops_ratio']:.0f}% of the teacher's.", ""]
    lines += seeds_section(metrics) + ["## Recall per class %", ""]
    lines += markdown_table([("class", *(n for n in MODELS if n in metrics))] + recall_rows(metrics, split["classes"]))
    lines += confusion_section(run, metrics, split["classes"])
    for extra in ("robustness", "synthetic", "spurious", "gap", "student_probe"):
        if extra in metrics and isinstance(metrics[extra], dict) and "markdown" in metrics[extra]:
            lines += ["", metrics[extra]["markdown"]]
    lines += stages_section(metrics.get("timings", {}))
    if split.get("skipped"):
        lines += ["", f"{len(split['skipped'])} unreadable images were skipped; see split.json."]
    atomic_write_text(run.dir / "report.md", "\n".join(lines) + "\n")


def seeds_section(metrics: dict) -> list[str]:
    if "seeds" not in metrics:
        return []
    lines = ["## Seeds", "", f"{metrics['n_seeds']} seeds; every figure above is the mean over seeds, confusion "
             f"matrices are summed over seeds. ± is the {metrics['seeds']['interval']}.", ""]
    rows = [("model", "metric", "mean", "± t-interval 95%", "values")]
    for name, group in metrics["seeds"].items():
        if not isinstance(group, dict):
            continue
        found = [(f"{name}", m, v) for m, v in group.items()]
        found += [(f"{name} {m}", k, x) for m, v in group.items() if isinstance(v, dict) and "mean" not in v
                  for k, x in v.items()]  # e.g. robustness -> student -> mpc
        rows += [(label, metric, f"{s['mean']:.2f}", f"{s['ci95']:.2f}", ", ".join(f"{v:.2f}" for v in s["values"]))
                 for label, metric, s in found if isinstance(s, dict) and "mean" in s]
    return lines + markdown_table(rows) + [""]


def confusion_section(run: Run, metrics: dict, classes) -> list[str]:
    seeds = "seeds" in metrics
    if seeds:  # single-seed plots are drawn by the evaluate stage; a seed mean needs the summed matrices
        for n in MODELS:
            if n in metrics:
                plot_confusion(metrics[n]["confusion"], classes, run.dir / f"confusion-{n}.png",
                               f"{n}: top-1 {metrics[n]['top1']:.1f}% (mean of {metrics['n_seeds']} seeds)")
    return ["", "## Confusion matrices" + (" (summed over seeds)" if seeds else ""), ""] + [
        f"![{n}](confusion-{n}.png)" for n in MODELS if n in metrics]


def stages_section(timings: dict) -> list[str]:
    rows = [("stage", "seconds", "this call")] + [
        (k, v, "reused" if k in timings.get("reused", []) else "computed")
        for k, v in timings.get("stages_seconds", {}).items()]
    rows.append(("total", timings.get("total_seconds", 0), f"{timings.get('this_run_seconds', 0)} s"))
    return ["", "## Stages", "", "Seconds each stage took when it was computed; a stage this call reused keeps its "
            "time.", ""] + markdown_table(rows)
