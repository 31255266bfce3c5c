"""The spurious-cue probe: a stable colour per class, cues painted where they should be, shuffles that move every
image to another class, and the drop it reports."""
import collections

import numpy as np
import pytest
from PIL import Image

from edgedistill.spurious import add_cue, cue_palette, shuffled_labels_for_cue, spurious_report, spurious_summary


def random_image(size=64):
    """Random pixels: the cue must land on any image, and the rest of the image must keep its own pixels."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_palette_gives_every_class_its_own_stable_colour():
    big = cue_palette(1000)
    assert len({tuple(c) for c in big}) == 1000
    assert np.array_equal(cue_palette(37), big[:37])


def nearest_class(rgb, num_classes):
    return int(np.argmin(np.abs(cue_palette(num_classes).astype(int) - np.asarray(rgb, int)).sum(1)))


@pytest.mark.parametrize("kind", ["patch", "background"])
def test_cue_colour_identifies_the_class(kind):
    img, k = random_image(), 10
    for label in range(k):
        x = np.asarray(add_cue(img, label, k, kind=kind))
        probe = x[8, 8] if kind == "patch" else x[0, 32]
        assert nearest_class(probe, k) == label and np.array_equal(probe, cue_palette(k)[label])
        assert np.array_equal(x[32, 32], np.asarray(img)[32, 32])  # the centre keeps the image
        assert np.array_equal(x, np.asarray(add_cue(img, label, k, kind=kind)))  # deterministic


def test_background_cue_follows_a_mask():
    img = random_image()
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    x = np.asarray(add_cue(img, 3, 5, kind="background", mask=mask))
    assert (x[~mask] == cue_palette(5)[3]).all()
    assert np.array_equal(x[mask], np.asarray(img)[mask])


def test_single_image_shuffle_paints_another_class():
    img, rng = random_image(), np.random.default_rng(0)
    for label in range(4):
        for _ in range(10):
            assert nearest_class(np.asarray(add_cue(img, label, 4, shuffle_rng=rng))[8, 8], 4) != label


@pytest.mark.parametrize("counts", [[25, 25, 25, 25], [40, 30, 20, 10, 1], [1, 1], [50, 50], [2, 1, 1]])
def test_shuffled_cues_move_every_image_to_another_class(counts):
    labels = np.repeat(np.arange(len(counts)), counts)
    for seed in range(5):
        cue = shuffled_labels_for_cue(labels, np.random.default_rng(seed))
        assert (cue != labels).all()
        assert collections.Counter(cue.tolist()) == collections.Counter(labels.tolist())  # same cue frequencies


def test_shuffled_cues_with_a_majority_class_still_never_match():
    labels = np.array([0] * 8 + [1, 2])  # no derangement keeps the frequencies here
    cue = shuffled_labels_for_cue(labels, np.random.default_rng(0))
    assert (cue != labels).all()
    with pytest.raises(ValueError):
        shuffled_labels_for_cue([3, 3, 3], np.random.default_rng(0))


def test_spurious_drop_is_cue_minus_shuffled():
    s = spurious_summary({"teacher": 0.92, "student": 0.88}, {"teacher": 0.90, "student": 0.61},
                         clean_acc={"teacher": 0.91})
    assert s["teacher"]["drop"] == pytest.approx(0.02) and s["student"]["drop"] == pytest.approx(0.27)
    assert s["teacher"]["clean"] == 0.91 and "clean" not in s["student"]
    md = spurious_report({"teacher": 0.92, "student": 0.88}, {"teacher": 0.90, "student": 0.61})
    assert "| student | 88.0 | 61.0 | **27.0** |" in md
