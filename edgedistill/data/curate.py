"""Teacher-in-the-loop curation of synthetic images: each filter is a plain function returning what it drops.

Filters run in this order, each on what the previous ones kept, and the report counts what each removed:

1. ``leakage``: too close (teacher-embedding cosine) to any evaluation image, so test accuracy stays honest.
2. ``low_score``: the teacher's probability for the image's own class is below a threshold.
3. ``disagree``: the teacher's top-1 is not the image's class.
4. ``duplicate``: a near-copy (cosine above a threshold) of an earlier kept image.

An image made from several real images (a P1 mix) counts as "its own class" for any of its sources' classes.
"""
import numpy as np
import torch

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
