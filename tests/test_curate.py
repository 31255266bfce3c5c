"""Curation filters: each removes what it should, the report counts it, and filters run in a fixed order."""
import math

import torch

from edgedistill.data.curate import curate, near_duplicates, own_class_probability, top1_agrees
from edgedistill.recipe import SynthCfg


def unit(*v):
    return torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float32), dim=-1)


def axes(n: int, dim: int = 8) -> torch.Tensor:
    """n mutually orthogonal features (cosine 0 between any two)."""
    return torch.eye(dim)[:n]


def logits_for(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_leakage_drops_images_too_close_to_an_evaluation_image():
    features = axes(4)
    eval_features = torch.stack([features[1] * 3.0, unit(0, 0, 1, 0, 0.9, 0, 0, 0)])  # 1 again; 2 at cos 0.74
    keep, report, dropped = curate(features, None, [(0,)] * 4, eval_features, SynthCfg(curate_leakage=0.95))
    assert keep.tolist() == [0, 2, 3]
    assert report == {"generated": 4, "leakage": 1, "low_score": 0, "disagree": 0, "duplicate": 0, "kept": 3}
    assert dropped == [(1, "leakage", 1.0)]
    keep, report, _ = curate(features, None, [(0,)] * 4, eval_features, SynthCfg(curate_leakage=0.7))
    assert keep.tolist() == [0, 3] and report["leakage"] == 2


def test_low_score_drops_images_the_teacher_does_not_see_as_their_class():
    logits = logits_for([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    labels = [(0,), (0,), (1,), (1,)]
    assert torch.allclose(own_class_probability(logits, labels), torch.tensor([0.9, 0.3, 0.4, 0.8]))
    keep, report, _ = curate(axes(4), logits, labels, None, SynthCfg(curate_min_score=0.5))
    assert keep.tolist() == [0, 3] and report["low_score"] == 2 and report["kept"] == 2


def test_disagree_drops_images_whose_teacher_top1_is_another_class():
    logits = logits_for([[0.4, 0.35, 0.25], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    labels = [(0,), (0,), (2,), (1, 0)]  # the last is a mix of classes 1 and 0: top-1 0 is one of its own
    assert top1_agrees(logits, labels).tolist() == [True, False, True, True]
    keep, report, dropped = curate(axes(4), logits, labels, None, SynthCfg(curate_agree=True))
    assert keep.tolist() == [0, 2, 3] and report["disagree"] == 1 and dropped == [(1, "disagree", 1)]


def test_mixes_score_by_their_best_source_class():
    logits = logits_for([[0.45, 0.45, 0.1]])
    assert math.isclose(float(own_class_probability(logits, [(2, 1)])[0]), 0.45, rel_tol=1e-5)


def test_near_duplicates_keep_the_first_of_each_group():
    base = axes(3)
    features = torch.stack([base[0], base[1], base[0] * 2 + 0.01, base[2], base[1] + 0.001, base[0]])
    dups = near_duplicates(features, 0.99)
    assert [i for i, _ in dups] == [2, 4, 5]
    assert [i for i, _ in near_duplicates(features, 0.99, block=2)] == [2, 4, 5]  # blocking does not change it
    keep, report, _ = curate(features, None, [(0,)] * 6, None, SynthCfg(curate_dedup=0.99))
    assert keep.tolist() == [0, 1, 3] and report["duplicate"] == 3


def test_dedup_threshold_below_one_keeps_merely_similar_images():
    features = torch.stack([unit(1, 0), unit(1, 0.3)])  # cosine 0.958
    assert near_duplicates(features, 0.99) == []
    assert [i for i, _ in near_duplicates(features, 0.95)] == [1]


def test_filters_run_in_order_and_count_each_image_once():
    features = torch.stack([axes(3)[0], axes(3)[0], axes(3)[1], axes(3)[2]])  # 0 and 1 are duplicates
    eval_features = axes(3)[2:3]                                               # 3 leaks
    logits = logits_for([[0.1, 0.9], [0.8, 0.2], [0.9, 0.1], [0.1, 0.9]])     # 0 and 3 score low for class 0
    cfg = SynthCfg(curate_leakage=0.9, curate_min_score=0.5, curate_agree=True, curate_dedup=0.9)
    keep, report, dropped = curate(features, logits, [(0,)] * 4, eval_features, cfg)
    # 3 leaks (and would also score low: counted once, as leakage); 0 scores low, so 1 is no longer its duplicate
    assert keep.tolist() == [1, 2]
    assert report == {"generated": 4, "leakage": 1, "low_score": 1, "disagree": 0, "duplicate": 0, "kept": 2}
    assert [(i, f) for i, f, _ in dropped] == [(3, "leakage"), (0, "low_score")]


def test_all_filters_off_keeps_everything():
    keep, report, dropped = curate(axes(3), None, [(0,)] * 3, axes(3), SynthCfg())
    assert keep.tolist() == [0, 1, 2] and report["kept"] == 3 and dropped == []
