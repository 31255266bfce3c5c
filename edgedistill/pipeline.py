"""``recipe run``: the stages of a recipe in order, per seed, then export and benchmark when asked.

The run folder and its stage cache are in ``run_folder``; the shared stages in ``stages``; the training stages in
``distill``; evaluation in ``suites``; what is printed and written for people in ``report``.
"""
import logging
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
from .train import keep_freed_memory
from .utils import atomic_write_text, fingerprint, write_json

log = logging.getLogger(__name__)


def run_recipe(recipe: Recipe, out=None, seeds: int = 1, shared_dir=None) -> dict:
    """Run every stage of ``recipe`` into ``out`` (default ``runs/<name>``); returns metrics.json's content."""
    # 1. Folder, distributed setup, the resolved recipe.
    run = open_run(recipe, out, shared_dir)
    out = run.dir
    t0 = time.perf_counter()

    # 2. Shared stages: a dataset fetched by name (when it cannot be, every missing download in one message), the
    #    split (a bad data folder is reported before any weights load), then every hub weight at once, the
    #    fine-tuned teacher (when asked for), teacher features, teacher head, synthetic data.
    preflight_data(run)
    split = stage_split(run)
    preflight_weights(run)
    student_init(run)
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
        if run.student_init:
            metrics["student_init"] = run.student_init
        if seeds > 1 and (recipe.export is not None or recipe.bench is not None):
            metrics["exported_seed"] = str(first.dir)
        metrics["timings"] = stage_timings(seed_runs, time.perf_counter() - t0)
        write_json(out / "metrics.json", metrics)
        write_report(run, metrics, split)
        write_run_cards(out)  # README.md model cards: the run's and each bundle's, now with metrics and bench
        print_summary(out, metrics)
    distributed.barrier()
    return metrics


def open_run(recipe: Recipe, out, shared_dir) -> Run:
    """The run folder with the resolved recipe in it, distributed set up, the checks that need no data done; from
    here on the process keeps freed memory for reuse (every stage: a PyTorch teacher pass at 320 px ran 3.5x
    faster with it)."""
    run = Run(Path(out or Path("runs") / recipe.name), recipe, shared_dir)
    distributed.init_from_env(run.device)
    check_combinations(recipe)
    check_tensorboard(recipe.train)  # an optional logger that is not installed fails before any work
    if distributed.is_main():
        run.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.dir / "recipe.yaml", dump_recipe(recipe))
    keep_freed_memory()
    return run


def preflight_data(run: Run):
    """A dataset fetched by name (torchvision/<Class>, hf/<id>) downloads now when absent; when it cannot, the one
    message names it and every missing weight (``preflight_weights``)."""
    from .data.remote import missing_downloads

    problems = missing_downloads(run.recipe.data) if distributed.is_main() else []
    if problems:
        preflight_weights(run, problems)


def preflight_weights(run: Run, problems=()):
    """Load hub weights before any data work, so a missing download is what gets reported, all at once (with
    ``problems``, the missing datasets): the teacher's, the student's and the generator's (only looked up, or
    downloaded, here: the synthetic stage builds it); then record where every weight came from (``RUN/weights.json``).

    Offline, a teacher or student weight that is not in the hub cache is named without building its model: a ViT-g's
    random initialisation alone takes over a minute on a small CPU before its loader finds the file missing.
    """
    from .data.generation import is_complete
    from .local_weights import offline
    from .students import create_backbone
    from .teachers import WeightsUnavailable

    problems, recipe = list(problems), run.recipe
    uncached = uncached_weights(recipe) if offline() else {}

    def attempt(key: str, load) -> list[str]:
        """``load()``, or the sentence saying why it cannot: known absent from the cache already, or its failure."""
        if key in uncached:
            return [uncached[key]]
        try:
            load()
        except WeightsUnavailable as e:
            return [str(e)]
        return []

    def load_student():  # kept: the training stages start from copies of it instead of building their own
        run.pretrained_backbone = create_backbone(recipe.student)

    if not (run.shared / "stages" / "features.json").exists():
        problems += attempt("teacher.weights", run.teacher)
    if (recipe.student.pretrained or recipe.student.weights) and not (run.dir / "stages" / "distill.json").exists():
        problems += attempt("student.weights", load_student)
    if recipe.synthetic is not None and not is_complete(run.shared):  # every image made: no generator to load
        from .weights import missing_generator_downloads

        problems += missing_generator_downloads(recipe.synthetic)
    if offline():
        problems += init_recipe_downloads(run, problems)
    if problems:
        raise WeightsUnavailable("\n  ".join(problems))
    if distributed.is_main():
        from .weights import write_provenance

        write_provenance(run)  # RUN/weights.json: where each weight came from, and its sha256


def init_recipe_downloads(run: Run, known=()) -> list[str]:
    """Offline: what the recipe of ``student.init_from: recipe:NAME`` lacks (its dataset, teacher, student and
    generator) and ``known`` does not say already, unless it has finished, so one message names the downloads of
    both stages; each sentence says which recipe it is for."""
    from .checks import init_recipe
    from .data.remote import missing_downloads
    from .students import INIT_RECIPE
    from .weights import missing_generator_downloads

    if not run.recipe.student.init_from.startswith(INIT_RECIPE):
        return []
    earlier = init_recipe(run.recipe)
    if (run.shared / "init" / earlier.name / "metrics.json").exists():
        return []
    found = missing_downloads(earlier.data) + list(uncached_weights(earlier).values())
    if earlier.synthetic is not None:
        found += missing_generator_downloads(earlier.synthetic)
    found = [f"{earlier.name} (student.init_from, run first): {p}" for p in found if p not in known]
    return found + init_recipe_downloads(Run(run.shared / "init" / earlier.name, earlier), [*known, *found])


def uncached_weights(recipe: Recipe) -> dict[str, str]:
    """Recipe key -> one sentence, for each hub weight of the teacher and the student that the Hugging Face cache
    lacks, found by looking (``weights.teacher_need``/``student_need``, as ``weights fetch`` looks), not by loading."""
    from .local_weights import hub_cache
    from .weights import student_need, teacher_need

    who = {"teacher.weights": f"Teacher {recipe.teacher.name!r}", "student.weights": f"Student {recipe.student.name!r}"}
    out = {}
    for need in (teacher_need(recipe.teacher), student_need(recipe.student)):
        if need is None or need.path or need.locate(False):
            continue
        kind, _, name = need.source.partition(":")  # timm:<model>, open_clip:<arch>/<tag>
        out[need.key] = (f"{who[need.key]} needs the {kind} weights {name!r}: they download on first use with "
                         f"internet and are cached under {hub_cache()} (loading failed: not there, and HF_HUB_OFFLINE "
                         "is set, so nothing is downloaded).")
    return out


def student_init(run: Run):
    """``student.init_from``: the trained student the training stages start from. ``recipe:NAME`` runs that recipe
    first, reusing whatever of it has finished, into ``SHARED/init/<its name>`` (so one command runs both of P4's
    stages and a sweep's points share the first); a run folder or model.pt is taken as it is. Recorded in
    RUN/weights.json, and in metrics.json once the run ends."""
    from .checks import init_recipe
    from .students import INIT_RECIPE, init_file

    source = run.recipe.student.init_from
    if not source:
        return
    if source.startswith(INIT_RECIPE):
        earlier = init_recipe(run.recipe)
        folder = run.shared / "init" / earlier.name
        log.info("student.init_from %s: its run is %s", source, folder)
        done = run_recipe(earlier, folder)
        log.info("student.init_from %s: finished; stages reused: %s", source, ", ".join(done["timings"]["reused"])
                 or "none")
        path = init_file(str(folder))
    else:
        path = init_file(source)
    run.use_student_init(source, path)
    log.info("student starts from %s (sha256 %s)", path, run.student_init["sha256"][:16])
    if distributed.is_main():
        from .weights import write_provenance

        write_provenance(run)  # now with the student it starts from


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


