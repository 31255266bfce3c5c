"""``recipe run``: the stages of a recipe in order, per seed, then export and benchmark when asked.

The run folder and its stage cache are in ``run_folder``; the shared stages in ``stages``; the training stages in
``distill``; evaluation in ``suites``; what is printed and written for people in ``report``.
"""
import time
from pathlib import Path

import numpy as np

from . import distributed
from .card import write_run_cards
from .checks import check_combinations
from .distill import stage_baseline, stage_distill
from .finetune import stage_finetune
from .recipe import Recipe, dump_recipe, to_plain
from .report import mean_or_none, print_summary, write_report
from .run_folder import Run, stage_timings, with_seed
from .stages import stage_features, stage_head, stage_split, stage_synth, stage_views
from .suites import stage_evaluate
from .tensorboard_log import check_tensorboard
from .utils import atomic_write_text, fingerprint, write_json


def run_recipe(recipe: Recipe, out=None, seeds: int = 1, shared_dir=None) -> dict:
    """Run every stage of ``recipe`` into ``out`` (default ``runs/<name>``); returns metrics.json's content."""
    # 1. Folder, distributed setup, the resolved recipe.
    out = Path(out or Path("runs") / recipe.name)
    run = Run(out, recipe, shared_dir)
    distributed.init_from_env(run.device)
    check_combinations(recipe)
    check_tensorboard(recipe.train)  # an optional logger that is not installed fails before any work
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
    t0 = time.perf_counter()

    # 2. Shared stages: a dataset fetched by name (when it cannot be, every missing download in one message), the
    #    split (a bad data folder is reported before any weights load), then every hub weight at once, the
    #    fine-tuned teacher (when asked for), teacher features, teacher head, synthetic data.
    preflight_data(run)
    split = stage_split(run)
    preflight_weights(run)
    stage_finetune(run, split)
    feats = stage_features(run, split)
    head = stage_head(run, split, feats)
    synth = stage_synth(run, split, feats) if recipe.synthetic is not None else None

    # 3. Training stages, per seed (each seed its own augmented views, initialisation, order and dropout).
    results, seed_runs = [], []
    for k in range(seeds):
        seed_run = with_seed(run, k) if seeds > 1 else run
        seed_runs.append(seed_run)
        views = stage_views(seed_run, split, feats)
        student = stage_distill(seed_run, split, feats, views, head, synth)
        baseline = stage_baseline(seed_run, split, feats, synth) if recipe.baseline else None
        results.append(stage_evaluate(seed_run, split, feats, head, student, baseline, synth))
    metrics = combine_seeds(run, results) if seeds > 1 else results[0]

    # 4. Export and benchmark when the recipe asks for them: the first seed's student (its own run folder).
    first = seed_runs[0]
    if distributed.is_main() and recipe.export is not None:
        from .export import export_run

        first.stage("export", fingerprint([first.keys["evaluate"], to_plain(recipe.export)]),
                    lambda: {"bundles": [str(p) for p in export_run(first.dir, cfg=recipe.export) or []]})
    if distributed.is_main() and recipe.bench is not None:
        from .bench import bench_run

        first.stage("bench", fingerprint([first.keys.get("export"), first.keys["evaluate"], to_plain(recipe.bench)]),
                    lambda: {"rows": len(bench_run(first.dir, recipe.bench) or [])})
    if distributed.is_main():
        if seeds > 1 and (recipe.export is not None or recipe.bench is not None):
            metrics["exported_seed"] = str(first.dir)
        metrics["timings"] = stage_timings(seed_runs, time.perf_counter() - t0)
        write_json(out / "metrics.json", metrics)
        write_report(run, metrics, split)
        write_run_cards(out)  # README.md model cards: the run's and each bundle's, now with metrics and bench
        print_summary(out, metrics)
    distributed.barrier()
    return metrics

def preflight_data(run: Run):
    """A dataset fetched by name (torchvision/<Class>, hf/<id>) downloads now when absent; when it cannot, the one
    message names it and every missing weight (``preflight_weights``)."""
    from .data.remote import missing_downloads

    problems = missing_downloads(run.recipe.data) if distributed.is_main() else []
    if problems:
        preflight_weights(run, problems)


def preflight_weights(run: Run, problems=()):
    """Load hub weights before any data work, so a missing download is what gets reported, all at once (with
    ``problems``, the missing datasets); then record where every weight came from (``RUN/weights.json``)."""
    from .students import create_backbone
    from .teachers import WeightsUnavailable

    problems = list(problems)
    if not (run.shared / "stages" / "features.json").exists():
        try:
            run.teacher()
        except WeightsUnavailable as e:
            problems.append(str(e))
    student = run.recipe.student
    if (student.pretrained or student.weights) and not (run.dir / "stages" / "distill.json").exists():
        try:  # kept: the training stages start from copies of it instead of building their own
            run.pretrained_backbone = create_backbone(run.recipe.student)
        except WeightsUnavailable as e:
            problems.append(str(e))
    if problems:
        raise WeightsUnavailable("\n  ".join(problems))
    if distributed.is_main():
        from .weights import write_provenance

        write_provenance(run)  # RUN/weights.json: where each weight came from, and its sha256


def combine_seeds(run: Run, results: list[dict]) -> dict:
    """One metrics dict over seeds: every model's figures are means over seeds (per-class accuracy included), with
    Student-t intervals under ``seeds``; confusion matrices are summed over seeds."""
    from .stats import INTERVAL, aggregate_metrics

    models = [n for n in ("teacher", "student", "baseline") if n in results[0]]
    keep = [{n: {k: v for k, v in m[n].items() if k not in ("per_class", "confusion", "name", "arch", "weights",
                                                             "licence", "model")} for n in models} for m in results]
    metrics = dict(results[0])
    metrics["seeds"] = aggregate_metrics(keep)
    metrics["seeds"]["interval"] = INTERVAL
    metrics["n_seeds"] = len(results)
    for name in models:
        group = metrics["seeds"][name]
        merged = dict(results[0][name])
        for k, v in group.items():
            if isinstance(v, dict) and "mean" in v:
                merged[k], merged[f"{k}_ci95"] = v["mean"], v["ci95"]
        classes = results[0][name]["per_class"]
        merged["per_class"] = {c: mean_or_none([m[name]["per_class"][c] for m in results]) for c in classes}
        merged["confusion"] = np.sum([m[name]["confusion"] for m in results], axis=0).tolist()
        metrics[name] = merged
    for extra in ("robustness", "gap", "spurious", "student_probe"):  # per-seed suites: seed 0's, labelled so
        if isinstance(metrics.get(extra), dict) and "markdown" in metrics[extra]:
            title, _, rest = metrics[extra]["markdown"].partition("\n")
            metrics[extra] = {**metrics[extra], "seed": 0, "markdown": f"{title} (seed 0)\n{rest}"}
    if all("validation" in m for m in results):  # means over seeds, as for the test figures
        metrics["seeds"]["validation"] = aggregate_metrics([m["validation"] for m in results])
        metrics["validation"] = {k: ({n: mean_or_none([m["validation"][k][n] for m in results]) for n in v}
                                     if isinstance(v, dict) else v) for k, v in results[0]["validation"].items()}
    if all("robustness" in m for m in results):
        metrics["seeds"]["robustness"] = aggregate_metrics(
            [{n: {k: m["robustness"][n][k] for k in ("mpc", "rpc")} for n in ("teacher", "student")} for m in results])
    return metrics


