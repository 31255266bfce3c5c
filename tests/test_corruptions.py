import numpy as np
import pytest
from PIL import Image

from edgedistill.corruptions import (ALL_CORRUPTIONS, CORRUPTIONS, DEFAULT_SUBSET, SEVERITIES, corrupt,
                                     corruption_report, corruption_summary, evaluate_corruptions, mpc, rpc)


def textured_image(size=64):
    """Smooth random colour blobs, a dark band and a yellow disc: edges, texture and flat areas, not periodic."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 1, size=(size // 8, size // 8, 3))
    x = np.asarray(Image.fromarray(np.uint8(coarse * 255)).resize((size, size), Image.BICUBIC), float) / 255
    yy, xx = np.mgrid[0:size, 0:size] / size
    x[(xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.06] = (0.9, 0.8, 0.1)
    x[:, : size // 6] = 0.1
    return Image.fromarray(np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8))


def distance(a, b):
    return np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()


# ---------------------------------------------------------------------------------------------------------------
# Corruptions


def test_registry_holds_the_15_imagenet_c_corruptions():
    assert CORRUPTIONS.names() == sorted(ALL_CORRUPTIONS) and len(ALL_CORRUPTIONS) == 15
    assert set(DEFAULT_SUBSET) <= set(ALL_CORRUPTIONS) and len(DEFAULT_SUBSET) == 5


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_every_corruption_changes_the_image_at_every_severity(name):
    img = textured_image()
    for s in SEVERITIES:
        out = corrupt(img, name, s, seed=0)
        assert out.size == img.size and out.mode == "RGB"
        assert distance(out, img) > 1.0, f"{name} severity {s} barely changed the image"


def test_corruptions_keep_non_square_sizes_and_convert_other_modes():
    img = textured_image(96).crop((0, 0, 96, 40)).convert("L")
    for name in ALL_CORRUPTIONS:
        out = corrupt(img, name, 3, seed=1)
        assert out.size == (96, 40) and out.mode == "RGB", name


# Reference parameters that are not monotonic in pixel distance: glass_blur severity 2 uses one shuffle iteration
# against two at severity 1; snow severity 3 raises the flake threshold; frost lowers the image weight from 1.0 to
# 0.8 while the texture weight rises. Severity 5 still moves every one further than severity 1.
NOT_MONOTONIC = {"glass_blur", "snow", "frost"}


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_severity_moves_the_image_further_from_clean(name):
    img = textured_image()
    d = [np.mean([distance(corrupt(img, name, s, seed=k), img) for k in range(3)]) for s in SEVERITIES]
    assert d[-1] > d[0] * 1.15, d
    if name not in NOT_MONOTONIC:
        assert all(np.diff(d) > 0), d


def test_corrupt_is_reproducible_per_seed():
    img = textured_image()
    for name in ("gaussian_noise", "glass_blur", "fog", "frost", "snow", "elastic_transform"):
        a, b, c = (np.asarray(corrupt(img, name, 3, seed)) for seed in ((0, 1), (0, 1), (0, 2)))
        assert np.array_equal(a, b) and not np.array_equal(a, c), name


def test_unknown_corruption_and_bad_severity_are_refused():
    img = textured_image()
    with pytest.raises(KeyError, match="gaussian_noise"):
        corrupt(img, "gausian_noise", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(img, "contrast", 0)


def test_brightness_matches_an_hsv_round_trip():
    skimage = pytest.importorskip("skimage")
    img = textured_image()
    hsv = skimage.color.rgb2hsv(np.asarray(img) / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + 0.3, 0, 1)
    ref = skimage.color.hsv2rgb(hsv) * 255
    assert np.abs(np.asarray(corrupt(img, "brightness", 3)) - ref).max() <= 1.0


@pytest.fixture(scope="module")
def digits_model():
    """A ridge classifier on sklearn digits upsampled to 32x32 RGB: trains in about a second."""
    datasets = pytest.importorskip("sklearn.datasets")
    linear = pytest.importorskip("sklearn.linear_model")
    d = datasets.load_digits()
    images = [Image.fromarray(np.uint8(x / 16 * 255)).resize((32, 32), Image.BILINEAR).convert("RGB")
              for x in d.images]
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1000], order[1000:]

    def features(ims):
        return np.stack([np.asarray(im, np.float32).ravel() / 255 for im in ims])

    clf = linear.RidgeClassifier(alpha=1.0).fit(features([images[i] for i in train]), d.target[train])
    return (lambda ims: clf.predict(features(ims))), [images[i] for i in test], d.target[test]


def test_severity_5_hurts_a_trained_model_more_than_severity_1(digits_model):
    predict, images, labels = digits_model
    clean = float((predict(images) == labels).mean())
    assert clean > 0.9
    table = evaluate_corruptions(predict, images, labels, names=DEFAULT_SUBSET, severities=(1, 5), seed=0)
    for name in DEFAULT_SUBSET:
        assert table[(name, 5)] < table[(name, 1)], (name, table[(name, 1)], table[(name, 5)])
        assert table[(name, 5)] < clean
    assert 0 < rpc(mpc(table), clean) < 1


# ---------------------------------------------------------------------------------------------------------------
# mPC / rPC


def test_mpc_averages_severities_first_then_corruptions():
    table = {("gaussian_noise", 1): 0.8, ("gaussian_noise", 3): 0.6, ("fog", 1): 0.9}
    # per corruption: noise (0.8 + 0.6) / 2 = 0.7, fog 0.9; mPC = 0.8 (a flat mean would give 0.7667)
    assert mpc(table) == pytest.approx(0.8)
    assert rpc(0.8, 0.9) == pytest.approx(0.8 / 0.9)
    with pytest.raises(ValueError):
        rpc(0.5, 0.0)
    with pytest.raises(ValueError):
        mpc({})


def test_corruption_summary_and_report():
    tables = {"teacher": {("contrast", 1): 0.9, ("contrast", 5): 0.5, ("gaussian_noise", 1): 0.8,
                          ("gaussian_noise", 5): 0.4},
              "student": {("contrast", 1): 0.7, ("contrast", 5): 0.3, ("gaussian_noise", 1): 0.6,
                          ("gaussian_noise", 5): 0.2}}
    clean = {"teacher": 0.95, "student": 0.8}
    s = corruption_summary(tables, clean)
    assert s["teacher"]["mpc"] == pytest.approx(0.65) and s["student"]["mpc"] == pytest.approx(0.45)
    assert s["student"]["rpc"] == pytest.approx(0.45 / 0.8)
    assert s["teacher"]["per_corruption"] == pytest.approx({"contrast": 0.7, "gaussian_noise": 0.6})
    assert s["student"]["per_severity"]["contrast"] == {"1": 0.7, "5": 0.3}
    md = corruption_report(tables, clean)
    assert "| gaussian_noise | 60.0 | 40.0 |" in md  # ImageNet-C order: noise before contrast
    assert md.index("gaussian_noise") < md.index("contrast")
    assert "| **mPC** | **65.0** | **45.0** |" in md and "| **rPC** | **68.4%** | **56.2%** |" in md
    assert "| contrast | student | 70.0 | 30.0 |" in md
    in_percent = {m: {k: 100 * v for k, v in t.items()} for m, t in tables.items()}
    md = corruption_report(in_percent, {m: 100 * v for m, v in clean.items()}, scale=1)
    assert "| **mPC** | **65.0** | **45.0** |" in md and "| **rPC** | **68.4%** | **56.2%** |" in md
