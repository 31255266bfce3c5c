"""Teacher-in-the-loop curation of synthetic images: each filter is a plain function returning what it drops.

Filters run in this order, each on what the previous ones kept, and the report counts what each removed:

1. ``leakage``: too close (teacher-embedding cosine) to any evaluation image, so test accuracy stays honest.
2. ``low_score``: the teacher's probability for the image's own class is below a threshold.
3. ``disagree``: the teacher's top-1 is not the image's class.
4. ``duplicate``: a near-copy (cosine above a threshold) of an earlier kept image.

An image made from several real images (a P1 mix) counts as "its own class" for any of its sources' classes.

``synth_stage`` is the pipeline stage around them: it generates the images (``generation.py``), runs the teacher once
over every one of them into a ``FeatureCache`` and curates them with these filters.
"""
import logging
from pathlib import Path

import numpy as np
import torch

from ..utils import fingerprint, write_json
from .generation import check_synth, generate

log = logging.getLogger(__name__)
FILTERS = ("leakage", "low_score", "disagree", "duplicate")


def normalized(x) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.as_tensor(x).float(), dim=-1)


def max_cosine(features, others, block: int = 4096) -> torch.Tensor:
    """For each row of ``features``, its highest cosine similarity to any row of ``others``."""
    a, b = normalized(features), normalized(others)
    if not len(b):
        return torch.full((len(a),), -1.0)
    return torch.cat([(a[k:k + block] @ b.t()).max(dim=1).values for k in range(0, len(a), block)])


def own_class_probability(logits, own_labels: list) -> torch.Tensor:
    """Softmax probability of each image's own class (the best of them for a mix of classes)."""
    p = torch.softmax(torch.as_tensor(logits).float(), dim=-1)
    return torch.stack([p[i, list(labels)].max() for i, labels in enumerate(own_labels)])


def top1_agrees(logits, own_labels: list) -> torch.Tensor:
    top = torch.as_tensor(logits).argmax(dim=-1).tolist()
    return torch.tensor([t in set(labels) for t, labels in zip(top, own_labels)])


def near_duplicates(features, threshold: float, block: int = 1024) -> list[tuple[int, float]]:
    """(index, cosine) of every image whose cosine to an earlier kept image is at least ``threshold``.

    Greedy in order: the first of a group of near-copies is kept, so results do not depend on batching.
    """
    f = normalized(features)
    kept, dropped = torch.zeros(len(f), dtype=torch.bool), []
    for start in range(0, len(f), block):
        blk = f[start:start + block]
        earlier = f[:start][kept[:start]]
        best = (blk @ earlier.t()).max(dim=1).values if len(earlier) else torch.full((len(blk),), -1.0)
        within = blk @ blk.t()
        for j in range(len(blk)):
            inside = within[j, :j][kept[start:start + j]]
            sim = max(float(best[j]), float(inside.max()) if len(inside) else -1.0)
            if sim >= threshold:
                dropped.append((start + j, sim))
            else:
                kept[start + j] = True
    return dropped


def curate(features, logits, own_labels: list, eval_features, cfg) -> tuple[np.ndarray, dict, list]:
    """Indices of the images to keep, the per-filter report, and (index, filter, value) for every dropped image."""
    n = len(features)
    alive = np.ones(n, bool)
    dropped = []

    def drop(filter_name, idx, values):
        for i, v in zip(idx, values):
            alive[i] = False
            dropped.append((int(i), filter_name, round(float(v), 4)))

    # 1. Leakage against the evaluation images
    if cfg.curate_leakage > 0 and eval_features is not None and len(eval_features):
        sims = max_cosine(features, eval_features).numpy()
        hit = np.flatnonzero(alive & (sims >= cfg.curate_leakage))
        drop("leakage", hit, sims[hit])
    # 2-3. Teacher scores
    if (cfg.curate_min_score > 0 or cfg.curate_agree) and logits is None:
        raise ValueError("Curation by teacher score needs teacher logits (a teacher head)")
    if cfg.curate_min_score > 0:
        prob = own_class_probability(logits, own_labels).numpy()
        hit = np.flatnonzero(alive & (prob < cfg.curate_min_score))
        drop("low_score", hit, prob[hit])
    if cfg.curate_agree:
        ok = top1_agrees(logits, own_labels).numpy()
        hit = np.flatnonzero(alive & ~ok)
        drop("disagree", hit, np.asarray(logits)[hit].argmax(-1) if len(hit) else [])
    # 4. Near-duplicates among the survivors
    if cfg.curate_dedup > 0:
        idx = np.flatnonzero(alive)
        dups = near_duplicates(torch.as_tensor(features)[idx], cfg.curate_dedup)
        drop("duplicate", [idx[k] for k, _ in dups], [v for _, v in dups])
    counts = {name: sum(1 for _, f, _ in dropped if f == name) for name in FILTERS}
    return np.flatnonzero(alive), {"generated": n, **counts, "kept": int(alive.sum())}, dropped


# ---------------------------------------------------------------------------------------------------------------
# The pipeline stage: generate, cache the teacher's features of every image, curate


def synth_stage(recipe, run_dir, teacher, split: dict, device, ranks: bool = False, eval_features=None) -> dict:
    """Generate (resuming), cache teacher features of every image, curate; what distillation trains on.

    Returns ``items`` [(path, label)] kept, ``cache`` (FeatureCache over all generated images, ``data.views`` views),
    ``rows`` (each kept item's row in that cache), ``report`` (images each filter removed) and ``manifest``.
    ``ranks``: every torchrun rank calls this and generation is split between them (otherwise the caller does it
    all). ``eval_features``: the teacher's features of split val + test, if the caller has them cached.
    """
    cfg, synth_dir = recipe.synthetic, Path(run_dir) / "synth"
    check_synth(recipe, split)
    if (cfg.curate_min_score > 0 or cfg.curate_agree) and teacher.head is None:
        from ..recipe import RecipeError

        raise RecipeError("'synthetic.curate_min_score' and 'synthetic.curate_agree' score images with the teacher's "
                          "head, and this teacher has none (set teacher.head)")
    rows = generate(recipe, synth_dir, split, str(device), ranks=ranks)
    items = [(str(synth_dir / r["file"]), r["label"]) for r in rows]
    cache = feature_cache(synth_dir / "features", teacher, items, [r["sha256"] for r in rows], recipe, device, ranks)
    features = cache.get(np.arange(len(items)))
    logits = teacher_logits(teacher, features, device)
    if cfg.curate_leakage and eval_features is None:
        eval_features = eval_feature_matrix(synth_dir, teacher, split, recipe, device)
    keep, report, dropped = curate(features, logits, [r["source_labels"] for r in rows], eval_features, cfg)
    write_json(synth_dir / "curation.json", {"report": report, "dropped": [
        {"file": rows[k]["file"], "filter": why, "value": v} for k, why, v in dropped]})
    log.info("Synthetic images: %s", ", ".join(f"{k} {v}" for k, v in report.items()))
    return {"items": [items[k] for k in keep], "cache": cache, "rows": list(keep), "report": report,
            "manifest": rows}


def feature_cache(folder, teacher, items: list, identity: list, recipe, device, ranks=False, views=None):
    """A filled FeatureCache; its identity covers the teacher, its input, the views and ``identity`` (per-image
    hashes for generated images), so a changed image never reuses stale features."""
    from ..distributed import barrier, is_main
    from .cache import FeatureCache

    views = views or recipe.data.views
    crop = recipe.data.crop_pct or teacher.info.input.crop_pct
    meta = {"teacher": [teacher.info.name, teacher.info.arch, teacher.info.weights], "augment": recipe.data.augment,
            "input": teacher.info.input.to_dict(), "crop_pct": crop, "images": fingerprint(identity)}
    keys = [p for p, _ in items]
    if is_main() or not ranks:
        FeatureCache(folder, keys, views, teacher.feature_dim, meta).fill(
            teacher, items, recipe.data.augment, crop, recipe.teacher.batch_size, recipe.data.num_workers, device,
            desc=f"teacher features ({Path(folder).name})")
    if ranks:
        barrier()
    return FeatureCache(folder, keys, views, teacher.feature_dim, meta)


def teacher_logits(teacher, features, device, batch: int = 1024):
    if teacher.head is None:
        return None
    teacher.to(device)
    with torch.no_grad():
        return torch.cat([teacher.logits(features[k:k + batch].to(device)).float().cpu()
                          for k in range(0, len(features), batch)]) if len(features) else None


def eval_feature_matrix(synth_dir: Path, teacher, split: dict, recipe, device):
    """Teacher features (view 0) of the evaluation images, for the leakage filter."""
    items = list(split.get("test", [])) + list(split.get("val", []))
    if not items:
        return None
    cache = feature_cache(synth_dir / "eval-features", teacher, items, [p for p, _ in items], recipe, device,
                          views=1)
    return cache.get(np.arange(len(items)))
