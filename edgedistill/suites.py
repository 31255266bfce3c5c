"""The evaluation stage and its suites: held-out metrics, common corruptions, the synthetic-to-real gap, the
spurious-cue probe and the linear probe of the student (``student_probe``). Every figure is on the held-out test
split unless its table says otherwise."""
import io

import numpy as np
import torch

from . import distributed
from .data.cache import FeatureCache
from .distill import distill, synth_split
from .evaluate import agreement, classification_metrics, gflops, params_used, plot_confusion
from .recipe import to_plain
from .report import fmt
from .run_folder import STAGE_VERSIONS, Run
from .stages import teacher_key, view_crop
from .student_probe import evaluate_student_probe
from .students import LogitsOnly, load_student
from .train import TeacherFeatures, predict
from .utils import atomic_write_bytes, fingerprint, read_json, write_json


def stage_evaluate(run: Run, split: dict, feats: dict, head, student: dict, baseline: dict | None, synth) -> dict:
    r = run.recipe
    key = fingerprint([student["key"], baseline and baseline["key"], run.keys["probe"], to_plain(r.eval)])
    path = run.dir / "stages" / "evaluate-metrics.json"  # the stage's own copy; RUN/metrics.json may combine seeds
    if distributed.is_main() and not path.exists():
        run.stage_file("evaluate").unlink(missing_ok=True)
    classes, test = split["classes"], split["test"]
    labels = torch.tensor([y for _, y in test])

    def compute():
        if not distributed.is_main():
            return {}
        # 1. Teacher, student and baseline on the held-out test split.
        n_eval = len(split["val"])
        t_feat = feats["caches"]["eval"].get(np.arange(n_eval, n_eval + len(test)))
        t_logits = head(t_feat)
        metrics = {"recipe": r.name, "classes": classes, "n_test": len(test),
                   "teacher": {**classification_metrics(t_logits, labels, classes, r.eval.top_k),
                               "gflops": feats["gflops"],
                               "params_m": feats["params_m"] + sum(p.numel() for p in head.parameters()) / 1e6,
                               **feats["info"]}}
        loaded = {name: load_student(run.dir, name) for name, stage in (("student", student), ("baseline", baseline))
                  if stage is not None}
        for name, (model, saved) in loaded.items():
            metrics[name] = student_metrics(run, model, saved, test, labels, t_feat, t_logits, name)
        for name, counts in image_counts(run, split, synth).items():
            if name in metrics:
                metrics[name]["images"] = counts
        metrics["gflops_ratio"] = metrics["student"]["gflops"] / max(metrics["teacher"]["gflops"], 1e-12)
        if split["val"]:
            metrics["validation"] = validation_metrics(run, split, feats["caches"]["eval"], head, loaded)
        # 2. The suites the recipe asks for.
        if r.eval.corruptions:
            metrics["robustness"] = evaluate_robustness(run, test, head, *loaded["student"])
        metrics["gap"] = evaluate_gap(run, split, head, synth, metrics, *loaded["student"])
        if r.eval.spurious:
            metrics["spurious"] = evaluate_spurious(run, split, feats, head, student["key"])
        if r.eval.student_probe:
            metrics["student_probe"] = evaluate_student_probe(run, split, synth, *loaded["student"])
        for name in ("teacher", "student", "baseline"):
            if name in metrics:
                plot_confusion(metrics[name]["confusion"], classes, run.dir / f"confusion-{name}.png",
                               f"{name}: top-1 {metrics[name]['top1']:.1f}%")
        write_json(path, metrics)
        return {"student_top1": metrics["student"]["top1"]}

    run.stage("evaluate", key, compute)
    distributed.barrier()
    return read_json(path)


def student_metrics(run: Run, model, saved: dict, test: list, labels, t_feat, t_logits, name: str) -> dict:
    r = run.recipe
    out = predict(model, test, saved["input"], saved["input"]["crop_pct"], r.train.batch_size, run.device,
                  r.data.num_workers, desc=f"evaluate {name}")
    logits = out["logits"]
    metrics = {**classification_metrics(logits, labels, saved["class_names"], r.eval.top_k),
               "gflops": gflops(LogitsOnly(model), saved["input"]["size"]),
               "params_m": params_used(LogitsOnly(model), saved["input"]["size"]) / 1e6,  # as exported
               "image_size": saved["input"]["size"], "model": r.student.name,
               "agreement_with_teacher": agreement(logits, t_logits)}
    if "embedding" in out and out["embedding"].shape[1] == t_feat.shape[1] and name == "student":
        metrics["feature_cosine"] = torch.nn.functional.cosine_similarity(out["embedding"], t_feat).mean().item()
    return metrics


def validation_metrics(run: Run, split: dict, eval_cache, head, loaded: dict) -> dict:
    """Top-1, balanced accuracy and macro-F1 of every model on the validation split: the figures to choose on (a
    sweep point, a loss, a setting), so that the test split is only ever reported."""
    r, val = run.recipe, split["val"]
    labels = torch.tensor([y for _, y in val])
    keep = ("top1", "balanced_accuracy", "macro_f1")
    t_logits = head(eval_cache.get(np.arange(len(val))))  # the eval cache holds the validation images first
    out = {"n": len(val), "teacher": classification_metrics(t_logits, labels, split["classes"], r.eval.top_k)}
    for name, (model, saved) in loaded.items():
        logits = predict(model, val, saved["input"], saved["input"]["crop_pct"], r.train.batch_size, run.device,
                         r.data.num_workers, desc=f"validate {name}")["logits"]
        out[name] = classification_metrics(logits, labels, saved["class_names"], r.eval.top_k)
    return {k: ({m: v[m] for m in keep} if isinstance(v, dict) else v) for k, v in out.items()}


def image_counts(run: Run, split: dict, synth) -> dict:
    """How many labelled and unlabelled images each model learnt from (synthetic ones counted apart)."""
    r = run.recipe
    labelled = len(split["labelled"]) if r.data.real_train else 0
    unlabelled = len(split["train"]) + len(split["unlabelled"]) - labelled if r.data.real_train else 0
    n_synth = len(synth_split(run, synth)[0]) if synth is not None else 0
    taught = r.teacher.mode == "finetune" or r.teacher.head in ("linear", "mlp")
    return {"teacher": {"labelled": len(split["labelled"]) if taught else 0, "unlabelled": 0},
            "student": {"labelled": labelled, "unlabelled": unlabelled, "synthetic": n_synth},
            "baseline": {"labelled": len(split["labelled"]), "unlabelled": 0}}


def evaluate_robustness(run: Run, test: list, head, student, saved: dict) -> dict:
    """Common corruptions (P4 §7): teacher and student see the very same corrupted pixels; mPC and rPC per model."""
    from . import corruptions
    from .data import view_image
    from .runtime.preprocess import resize_normalize

    r = run.recipe
    names = {"default": corruptions.DEFAULT_SUBSET, "all": corruptions.ALL_CORRUPTIONS}.get(
        r.eval.corruptions[0], r.eval.corruptions) if len(r.eval.corruptions) == 1 else r.eval.corruptions
    items = test[:: max(1, len(test) // max(1, r.eval.corruption_images))][: r.eval.corruption_images]
    labels = [y for _, y in items]
    teacher, sspec = run.teacher(), saved["input"]
    tspec = teacher.info.input.to_dict()
    crop = view_crop(run, tspec)
    # The un-augmented view once, at 224 px; corruptions act on what both models then resize.
    images = [view_image(path, "none", None, crop).resize((224, 224)) for path, _ in items]

    def predictor(fn, spec):
        def predict(batch):
            x = torch.from_numpy(np.stack([resize_normalize(im, spec) for im in batch])).to(run.device)
            with torch.no_grad():
                return fn(x).argmax(1).cpu().numpy()
        return predict

    models = {"teacher": predictor(lambda x: head.to(run.device)(teacher.encode(x)), tspec),
              "student": predictor(lambda x: student.to(run.device)(x)["logits"], sspec)}
    tables, clean = {}, {}
    for name, fn in models.items():
        clean[name] = float((fn(images) == np.asarray(labels)).mean())
        tables[name] = corruptions.evaluate_corruptions(fn, images, labels, names, r.eval.severities,
                                                       seed=r.train.seed)
    summary = corruptions.corruption_summary(tables, clean)
    markdown = (f"## Common corruptions\n\n{len(items)} held-out images, severities "
                f"{list(r.eval.severities)}; accuracy in %. mPC: mean over corruptions of the mean over severities; "
                f"rPC = mPC / clean.\n\n" + corruptions.corruption_report(tables, clean))
    return {**summary, "images": len(items), "markdown": markdown}


def evaluate_gap(run: Run, split: dict, head, synth, metrics: dict, model, saved: dict) -> dict:
    """Synthetic-to-real gap (P4): held-out synthetic vs real test accuracy, and train vs test accuracy."""
    r = run.recipe

    def student_acc(items):
        out = predict(model, items, saved["input"], saved["input"]["crop_pct"], r.train.batch_size, run.device,
                      desc="evaluate gap")
        return 100.0 * (out["logits"].argmax(1) == torch.tensor([y for _, y in items])).float().mean().item()

    # Training accuracy on (up to 500 of) the images the student was trained on: real if any, else synthetic.
    train_pool = split["train"] if r.data.real_train else (synth["items"] if synth else [])
    labels = [y for _, y in split["train"]] if r.data.real_train else (synth["labels"] if synth else [])
    sample = [(p, y) for (p, _), y in list(zip(train_pool, labels))[:: max(1, len(train_pool) // 500)]]
    rows = {"real test": {"student": metrics["student"]["top1"], "teacher": metrics["teacher"]["top1"]}}
    if sample:
        rows["train (sample)"] = {"student": student_acc(sample)}
    _, held = synth_split(run, synth)
    if held:
        items = [(synth["items"][i][0], synth["labels"][i]) for i in held]
        t_logits = head(synth["cache"].get([synth["rows"][i] for i in held]))
        rows["synthetic held-out"] = {"student": student_acc(items), "teacher": 100.0 * (
            t_logits.argmax(1) == torch.tensor([y for _, y in items])).float().mean().item()}
    lines = ["## Synthetic-to-real gap", "", "Top-1 % on each set; a large train-test or synthetic-real difference "
             "means the student fits its training images (or the generator's style) more than the task.", "",
             "| images | student | teacher |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(v.get('student'))} | {fmt(v.get('teacher'))} |" for k, v in rows.items()]
    return {"rows": rows, "markdown": "\n".join(lines)}


def evaluate_spurious(run: Run, split: dict, feats: dict, head, distill_key: str) -> dict:
    """P4's spurious-feature probe: distil a second student on images whose class is also painted as a colour cue,
    then test teacher and student with the cue on the right class and on a shuffled one."""
    from . import spurious
    from .data import load_rgb

    r, K = run.recipe, len(split["classes"])
    folder = run.dir / "spurious"
    rng = np.random.default_rng(r.train.seed)
    test_labels = [y for _, y in split["test"]]
    sets = {"train": (split["train"], [y for _, y in split["train"]]), "cue": (split["test"], test_labels),
            "shuffled": (split["test"], list(spurious.shuffled_labels_for_cue(test_labels, rng)))}
    paths = {}
    for name, (items, cues) in sets.items():  # 1. cued copies, each named by what it depicts, written atomically
        paths[name] = []
        for (path, y), cue in zip(items, cues):
            out = folder / "images" / f"{fingerprint([path, int(cue), K, r.eval.spurious])}.png"
            if not out.exists():
                buf = io.BytesIO()
                spurious.add_cue(load_rgb(path), int(cue), K, kind=r.eval.spurious).save(buf, format="PNG")
                atomic_write_bytes(out, buf.getvalue())
            paths[name].append((str(out), y))
    # 2. Teacher features of the cued images (augmented views under the seed, as the student draws them), then a
    #    student distilled on the cued training images.
    teacher, crop = run.teacher(), feats["crop_pct"]
    caches = {}
    for name, items in paths.items():
        views = r.data.views if name == "train" else 1
        meta = {"teacher": teacher_key(run), "spurious": r.eval.spurious, "augment": r.data.augment, "crop_pct": crop,
                "seed": r.train.seed, "keys": fingerprint(items), "version": STAGE_VERSIONS["features"]}
        caches[name] = FeatureCache(folder / "cache" / name, [p for p, _ in items], views, teacher.feature_dim, meta)
        caches[name].fill(teacher, items, r.data.augment, crop, r.teacher.batch_size, device=run.device,
                          desc=f"teacher features (cued {name})", salt=r.train.seed)
    teacher_features = TeacherFeatures()
    teacher_features.add(caches["train"], np.arange(len(paths["train"])))
    model, spec, _ = distill(run, split, feats, head, paths["train"], teacher_features, len(paths["train"]),
                             folder / "student", fingerprint([distill_key, r.eval.spurious]))
    # 3. Accuracy with the cue on the true class and on a shuffled one.
    acc = {"cue": {}, "shuffled": {}}
    labels = torch.tensor(test_labels)
    for name in ("cue", "shuffled"):
        out = predict(model, paths[name], spec.to_dict(), spec.crop_pct, r.train.batch_size, run.device)
        acc[name]["student"] = (out["logits"].argmax(1) == labels).float().mean().item()
        t_logits = head(caches[name].get(np.arange(len(paths[name]))))
        acc[name]["teacher"] = (t_logits.argmax(1) == labels).float().mean().item()
    markdown = (f"## Spurious-feature probe ({r.eval.spurious})\n\nA student distilled on training images carrying a "
                "class-coloured cue, tested with the cue on the true class and on a shuffled one; the teacher is "
                "unchanged. Accuracy in %.\n\n" + spurious.spurious_report(acc["cue"], acc["shuffled"]))
    return {**spurious.spurious_summary(acc["cue"], acc["shuffled"]), "markdown": markdown}

