"""P4's probe of the student (``eval.student_probe``): a linear classifier on the student's frozen penultimate
features (its pooled backbone output), trained once on the real labelled training images and once on the synthetic
ones (when the run has any), each scored on the held-out test split.

The learning rate is chosen among ``eval.student_probe_lr`` on the validation split, or, in a run without one, on a
stratified fifth of the probe's own training images (``train-holdout``), the probe then retrained on all of them.
The number of full-batch Adam steps (``eval.student_probe_epochs``) is fixed up front. The test split is looked at
once, by the chosen probe: it never chooses anything.
"""
import torch

from .data import stratified_split
from .distill import synth_split
from .evaluate import classification_metrics
from .report import fmt
from .stages import labelled_items
from .train import predict

HOLDOUT = 0.2  # share of a probe's own training images it is chosen on when the run has no validation split


def evaluate_student_probe(run, split: dict, synth, model, saved: dict) -> dict:
    """metrics.json's ``student_probe``: test-split top-1 of the probe trained on real and on synthetic images."""
    r = run.recipe
    classes = split["classes"]

    def features(items, what):
        out = predict(model, items, saved["input"], saved["input"]["crop_pct"], r.train.batch_size, run.device,
                      r.data.num_workers, desc=f"student probe: {what} features")
        return out["features"].float(), torch.tensor([int(y) for _, y in items])

    sets = {"real": labelled_items(split)}
    if synth is not None and synth["items"]:
        sets["synthetic"] = [(synth["items"][i][0], synth["labels"][i]) for i in synth_split(run, synth)[0]]
    test = features(split["test"], "test")
    val = features(split["val"], "val") if split["val"] else None
    probes = {name: probe(*features(items, name), val, test, classes, r.eval, r.train.seed)
              for name, items in sets.items()}
    out = {"real": probes["real"]["top1"], "synthetic": probes["synthetic"]["top1"] if "synthetic" in probes else None,
           "probes": probes, "epochs": r.eval.student_probe_epochs, "feature_dim": int(test[0].shape[1]),
           "n_test": len(split["test"])}
    if "synthetic" not in probes:
        out["note"] = "the run has no synthetic images: only the probe on real images was trained"
    out["markdown"] = probe_markdown(out, r.eval.student_probe_lr)
    return out


def probe(x, y, val, test, classes, cfg, seed: int) -> dict:
    """Choose the learning rate on ``val`` (else a hold-out of x), fit on all of x, score once on ``test``."""
    if val is not None:
        fit_x, fit_y, sel_x, sel_y, where = x, y, val[0], val[1], "val"
    else:
        keep, held = stratified_split([(i, int(c)) for i, c in enumerate(y)], HOLDOUT, seed)
        keep, held = torch.tensor([i for i, _ in keep]), torch.tensor([i for i, _ in held], dtype=torch.long)
        fit_x, fit_y, sel_x, sel_y, where = x[keep], y[keep], x[held], y[held], "train-holdout"
    scores = {}
    if len(cfg.student_probe_lr) > 1 and len(sel_y):
        for lr in cfg.student_probe_lr:
            chosen = fit_linear(fit_x, fit_y, len(classes), lr, cfg.student_probe_epochs)
            scores[lr] = classification_metrics(chosen(sel_x), sel_y, classes)["top1"]
    best = max(cfg.student_probe_lr, key=lambda lr: scores.get(lr, 0.0)) if scores else cfg.student_probe_lr[0]
    final = fit_linear(x, y, len(classes), best, cfg.student_probe_epochs)
    m = classification_metrics(final(test[0]), test[1], classes)
    return {"top1": m["top1"], "balanced_accuracy": m["balanced_accuracy"], "images": len(y), "lr": best,
            "selection": {"split": where if scores else "none (one learning rate given)", "images": len(sel_y),
                          "top1_by_lr": {str(k): v for k, v in scores.items()}}}


def fit_linear(x, y, num_classes: int, lr: float, steps: int):
    """A linear softmax classifier on standardised features (the training set's mean and spread), zero-initialised
    and trained full-batch with Adam: deterministic, whatever ran before. Returns features -> logits."""
    mean, std = x.mean(0), x.std(0, unbiased=False) + 1e-6
    z = (x - mean) / std
    linear = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.Adam(linear.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(linear(z), y).backward()
            opt.step()

    @torch.no_grad()
    def logits(features):
        return linear((features.float() - mean) / std)
    return logits


def probe_markdown(out: dict, lrs) -> str:
    names = {"real": "real training images (labelled)", "synthetic": "synthetic images"}
    where = {p["selection"]["split"] for p in out["probes"].values()}
    lines = ["## Linear probe of the student (P4)", "",
             f"A linear classifier on the student's frozen penultimate features ({out['feature_dim']}-d), trained on "
             f"each set of images and scored on the {out['n_test']} images of the held-out test split. Learning rate "
             f"chosen among {list(lrs)} on: {', '.join(sorted(where))}; {out['epochs']} full-batch Adam steps, fixed "
             "up front. The test split chose nothing.", "",
             "| probe trained on | images | lr | top-1 % | balanced acc % |", "|---|---|---|---|---|"]
    lines += [f"| {names[k]} | {p['images']} | {p['lr']:g} | {fmt(p['top1'])} | {fmt(p['balanced_accuracy'])} |"
              for k, p in out["probes"].items()]
    if out.get("note"):
        lines += ["", f"Note: {out['note']}."]
    return "\n".join(lines)
