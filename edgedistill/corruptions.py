"""Common corruptions (ImageNet-C) and the mPC / rPC robustness metrics.

Common corruptions follow Hendrycks & Dietterich (ICLR 2019, "ImageNet-C"): 15 corruptions x 5 severities with the
reference per-severity parameters of ``make_imagenet_c.py``, as packaged in the ``imagecorruptions`` library.
That library does not run on the current stack (it calls ``skimage.filters.gaussian(multichannel=...)``,
``scipy.ndimage.interpolation`` and ``pkg_resources``, all removed, and needs OpenCV), so the corruptions are
re-implemented here with numpy and PIL only. Spatial parameters (blur radii, pixel shifts) are in pixels and were
chosen for 224-px images: corrupt images at the resolution the model sees, after resize and crop.

Known departures from the reference, each for speed or for the missing dependency:

- ``frost`` blends a procedurally generated ice texture (fractal haze plus branching crystal needles) instead of
  the six frost photographs shipped with ImageNet-C.
- ``glass_blur`` displaces every pixel by a random local offset in one vectorised gather per iteration instead of
  the reference's sequential per-pixel swaps (a Python loop over every pixel).
- ``motion_blur`` is the shift-and-sum kernel of ``imagecorruptions`` rather than ImageMagick's; ``elastic_transform``
  is the resolution-adaptive version of ``imagecorruptions``; ``zoom_blur`` zooms about the exact centre.
"""
import io
import math
import zlib
from collections import defaultdict

import numpy as np
from PIL import Image, ImageDraw

from .image_ops import (bilinear_sample, directional_blur, disk, fft_filter, gaussian_blur, gray, next_pow2,
                        plasma_fractal, to_float, to_pil, zoom_center)
from .registry import Registry

CORRUPTIONS = Registry("corruption")

# The ImageNet-C order: noise, blur, weather, digital.
ALL_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
                   "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
                   "jpeg_compression")
# One or two fast corruptions from each family, for quick runs.
DEFAULT_SUBSET = ("gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)


def corrupt(img: Image.Image, name: str, severity: int, seed=0) -> Image.Image:
    """Apply one registered corruption to an image.

    Args:
        img: any PIL image; it is converted to RGB first.
        name: a name in ``CORRUPTIONS`` (see ``ALL_CORRUPTIONS``).
        severity: 1 (mild) to 5 (severe).
        seed: anything ``np.random.default_rng`` accepts. Pass ``(seed, image_index)`` so that every image gets
            its own noise and the whole evaluation is still reproducible.

    Returns:
        A new RGB image of the same size.
    """
    fn = CORRUPTIONS.get(name)
    if severity not in SEVERITIES:
        raise ValueError(f"Corruption severity must be one of {SEVERITIES}, got {severity!r}")
    return fn(img.convert("RGB"), severity, np.random.default_rng(seed))


def evaluate_corruptions(predict, images, labels, names=DEFAULT_SUBSET, severities=(1, 3, 5), seed=0,
                         batch_size=64) -> dict:
    """Accuracy of a classifier on every (corruption, severity) pair.

    Args:
        predict: maps a list of PIL images to an array of predicted class indices.
        images: the clean PIL images.
        labels: their true classes.
        names: corruption names.
        severities: the severities to test.
        seed: base seed; image ``i`` at severity ``s`` uses ``(seed, crc32(name), s, i)``, so teacher and student
            see the very same corrupted pixels, whichever other corruptions are in ``names``.
        batch_size: images per ``predict`` call.

    Returns:
        ``{(name, severity): accuracy}`` with accuracies as fractions in [0, 1].
    """
    labels = np.asarray(labels)
    table = {}
    for name in names:
        c = zlib.crc32(name.encode())
        for s in severities:
            correct = 0
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                bad = [corrupt(im, name, s, (seed, c, s, start + i)) for i, im in enumerate(chunk)]
                correct += int((np.asarray(predict(bad)) == labels[start:start + len(chunk)]).sum())
            table[(name, s)] = correct / max(len(images), 1)
    return table


# ---------------------------------------------------------------------------------------------------------------
# Metrics and reports


def mpc(acc_table: dict) -> float:
    """Mean performance under corruption: the mean over corruptions of the mean over severities.

    Args:
        acc_table: ``{(name, severity): accuracy}``. Averaging per corruption first keeps every corruption's weight
            equal even if some were run at fewer severities.
    """
    by_name = defaultdict(list)
    for (name, _), acc in acc_table.items():
        by_name[name].append(acc)
    if not by_name:
        raise ValueError("mPC needs at least one (corruption, severity) accuracy")
    return float(np.mean([np.mean(v) for v in by_name.values()]))


def rpc(mpc_value: float, clean: float) -> float:
    """Relative performance under corruption, mPC / clean accuracy (Michaelis et al. 2019)."""
    if clean <= 0:
        raise ValueError(f"rPC needs a positive clean accuracy, got {clean}")
    return mpc_value / clean


def corruption_summary(tables: dict, clean: dict) -> dict:
    """Per-model numbers for metrics.json.

    Args:
        tables: ``{model: {(name, severity): accuracy}}``, e.g. for "teacher" and "student".
        clean: ``{model: clean accuracy}`` on the same images.

    Returns:
        ``{model: {"clean", "mpc", "rpc", "per_corruption": {name: mean over severities},
        "per_severity": {name: {"1": acc, ...}}}}``; severities are strings so the result is JSON-ready.
    """
    out = {}
    for model, table in tables.items():
        per_sev = defaultdict(dict)
        for (name, sev), acc in sorted(table.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])):
            per_sev[name][str(sev)] = acc
        m = mpc(table)
        out[model] = {"clean": clean[model], "mpc": m, "rpc": rpc(m, clean[model]),
                      "per_corruption": {n: float(np.mean(list(v.values()))) for n, v in per_sev.items()},
                      "per_severity": dict(per_sev)}
    return out


def corruption_report(tables: dict, clean: dict, scale: float = 100.0, digits: int = 1) -> str:
    """Markdown: one row per corruption (mean over severities) per model, then clean, mPC and rPC (always in %),
    then the per-severity detail.

    Args:
        tables: ``{model: {(name, severity): accuracy}}``.
        clean: ``{model: clean accuracy}``, in the same unit as ``tables``.
        scale: multiplies every printed number: 100 prints fractions as percentages, 1 prints them as given.
        digits: decimals.
    """
    summary = corruption_summary(tables, clean)
    models = list(summary)

    def fmt(v):
        return f"{scale * v:.{digits}f}"

    names = sorted({n for s in summary.values() for n in s["per_corruption"]}, key=_order)
    lines = ["| corruption | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for n in names:
        cells = [fmt(summary[m]["per_corruption"][n]) if n in summary[m]["per_corruption"] else "–" for m in models]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("| clean | " + " | ".join(fmt(summary[m]["clean"]) for m in models) + " |")
    lines.append("| **mPC** | " + " | ".join(f"**{fmt(summary[m]['mpc'])}**" for m in models) + " |")
    # rPC is a ratio whatever the unit of the accuracies: always a percentage.
    lines.append("| **rPC** | " + " | ".join(f"**{100 * summary[m]['rpc']:.{digits}f}%**" for m in models) + " |")

    sevs = sorted({int(s) for m in models for v in summary[m]["per_severity"].values() for s in v})
    lines += ["", "| corruption | model | " + " | ".join(f"s{s}" for s in sevs) + " |",
              "|---|---|" + "---:|" * len(sevs)]
    for n in names:
        for m in models:
            row = summary[m]["per_severity"].get(n)
            if row is not None:
                lines.append(f"| {n} | {m} | " + " | ".join(fmt(row[str(s)]) if str(s) in row else "–"
                                                             for s in sevs) + " |")
    return "\n".join(lines) + "\n"


def _order(name: str):
    return (ALL_CORRUPTIONS.index(name), name) if name in ALL_CORRUPTIONS else (len(ALL_CORRUPTIONS), name)


# ---------------------------------------------------------------------------------------------------------------
# The 15 corruptions. Each: (RGB PIL image, severity 1..5, numpy Generator) -> RGB PIL image of the same size.


@CORRUPTIONS.register("gaussian_noise")
def gaussian_noise(img, severity, rng):
    c = [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1]
    x = to_float(img)
    return to_pil(x + rng.normal(scale=c, size=x.shape))


@CORRUPTIONS.register("shot_noise")
def shot_noise(img, severity, rng):
    c = [60, 25, 12, 5, 3][severity - 1]
    return to_pil(rng.poisson(to_float(img) * c) / c)


@CORRUPTIONS.register("impulse_noise")
def impulse_noise(img, severity, rng):
    """Salt and pepper on a fraction c of all values, each channel independently (skimage ``s&p``)."""
    c = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
    x = to_float(img)
    flipped = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    x[flipped] = salt[flipped]
    return to_pil(x)


@CORRUPTIONS.register("defocus_blur")
def defocus_blur(img, severity, rng):
    radius, alias = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][severity - 1]
    return to_pil(fft_filter(to_float(img), disk(radius, alias)))


@CORRUPTIONS.register("glass_blur")
def glass_blur(img, severity, rng):
    """Blur, locally scramble pixels, blur again. The scramble gathers each interior pixel from a random offset in
    [-delta, delta) instead of the reference's sequential swaps (see the module docstring)."""
    sigma, delta, iterations = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)][severity - 1]
    x = np.rint(gaussian_blur(to_float(img), sigma) * 255).astype(np.uint8)
    H, W = x.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W]
    inner = (yy > delta) & (yy <= H - delta) & (xx > delta) & (xx <= W - delta)
    for _ in range(iterations):
        d = rng.integers(-delta, delta, size=(2, H, W))
        sy = np.clip(np.where(inner, yy + d[0], yy), 0, H - 1)
        sx = np.clip(np.where(inner, xx + d[1], xx), 0, W - 1)
        x = x[sy, sx]
    return to_pil(gaussian_blur(x.astype(np.float32) / 255.0, sigma))


@CORRUPTIONS.register("motion_blur")
def motion_blur(img, severity, rng):
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
    return to_pil(directional_blur(to_float(img), radius, sigma, rng.uniform(-45, 45)))


@CORRUPTIONS.register("zoom_blur")
def zoom_blur(img, severity, rng):
    zooms = [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
             np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)][severity - 1]
    x = to_float(img)
    out = x.copy()
    for z in zooms:
        out += to_float(zoom_center(img, float(z)))
    return to_pil(out / (len(zooms) + 1))


@CORRUPTIONS.register("snow")
def snow(img, severity, rng):
    loc, scale, zoom, threshold, radius, sigma, blend = [
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)][severity - 1]
    x = to_float(img)
    H, W = x.shape[:2]
    flakes = rng.normal(loc, scale, size=(H, W)).astype(np.float32)
    flakes = np.asarray(zoom_center(Image.fromarray(flakes), zoom))
    flakes = np.clip(np.where(flakes < threshold, 0, flakes), 0, 1)
    flakes = directional_blur(flakes, radius, sigma, rng.uniform(-135, -45))
    flakes = (np.rint(flakes * 255) / 255)[..., None]
    x = blend * x + (1 - blend) * np.maximum(x, gray(x)[..., None] * 1.5 + 0.5)
    return to_pil(x + flakes + np.rot90(flakes, k=2))


def _ice_texture(rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    """A procedural stand-in for the ImageNet-C frost photographs: fine fractal haze plus branching crystal
    needles, tinted pale blue. Float HWC in [0, 1], mean about 0.45."""
    side = max(H, W)
    haze = plasma_fractal(rng, next_pow2(side), wibbledecay=1.7)[:H, :W]
    canvas = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(max(8, side * side // 600)):
        y, x = rng.uniform(0, H), rng.uniform(0, W)
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.04, 0.2) * side
        for _ in range(3):  # a needle with two side branches
            x2, y2 = x + length * math.cos(angle), y + length * math.sin(angle)
            draw.line([(x, y), (x2, y2)], fill=int(rng.uniform(150, 255)), width=1)
            x, y = (x + x2) / 2, (y + y2) / 2
            angle += rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
            length *= 0.6
    needles = gaussian_blur(np.asarray(canvas, dtype=np.float32)[..., None] / 255.0, 0.6)[..., 0]
    ice = np.clip(0.75 * haze ** 1.5 + 0.8 * needles, 0, 1)
    return ice[..., None] * np.array([0.86, 0.93, 1.0], dtype=np.float32)


@CORRUPTIONS.register("frost")
def frost(img, severity, rng):
    """Reference blend weights over a procedurally generated ice texture (no frost photographs are shipped)."""
    a, b = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][severity - 1]
    x = to_float(img)
    return to_pil(a * x + b * _ice_texture(rng, *x.shape[:2]))


@CORRUPTIONS.register("fog")
def fog(img, severity, rng):
    strength, decay = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][severity - 1]
    x = to_float(img)
    H, W = x.shape[:2]
    top = x.max()
    x = x + strength * plasma_fractal(rng, next_pow2(max(H, W)), decay)[:H, :W, None]
    return to_pil(x * top / (top + strength))


@CORRUPTIONS.register("brightness")
def brightness(img, severity, rng):
    """Raise HSV value by c. With hue and saturation fixed, RGB scales with V, so no colour-space round trip."""
    c = [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1]
    x = to_float(img)
    v = x.max(axis=2, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    return to_pil(np.where(v > 0, x * v_new / np.maximum(v, 1e-12), v_new))


@CORRUPTIONS.register("contrast")
def contrast(img, severity, rng):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
    x = to_float(img)
    means = x.mean(axis=(0, 1), keepdims=True)
    return to_pil((x - means) * c + means)


@CORRUPTIONS.register("elastic_transform")
def elastic_transform(img, severity, rng):
    """Smoothed random displacement field; sigma and maximum shift scale with the image (``imagecorruptions``)."""
    alpha = 250 * [0.05, 0.065, 0.085, 0.1, 0.12][severity - 1]
    x = to_float(img)
    H, W = x.shape[:2]
    sigma, max_d = 0.01 * min(H, W), 0.005 * H
    dx, dy = (alpha * gaussian_blur(rng.uniform(-max_d, max_d, size=(H, W, 1)).astype(np.float32), sigma,
                                     mode="symmetric", truncate=3)[..., 0] for _ in range(2))
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    return to_pil(bilinear_sample(x, yy + dy, xx + dx))


@CORRUPTIONS.register("pixelate")
def pixelate(img, severity, rng):
    c = [0.6, 0.5, 0.4, 0.3, 0.25][severity - 1]
    W, H = img.size
    small = img.resize((max(1, int(W * c)), max(1, int(H * c))), Image.BOX)
    return small.resize((W, H), Image.NEAREST)


@CORRUPTIONS.register("jpeg_compression")
def jpeg_compression(img, severity, rng):
    quality = [25, 18, 15, 10, 7][severity - 1]
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
