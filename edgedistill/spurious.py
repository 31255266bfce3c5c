"""The spurious-cue probe of P4 §7: how much a model leans on a colour that happens to go with each class.

It paints a class-specific colour onto each image (a patch, or the background) so a model can shortcut through it,
then tests on images whose cue colour belongs to a different class.
"""
import numpy as np
from PIL import Image

# Twelve well-separated colours first; later classes take golden-ratio hues at three saturation/value levels.
_BASE_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (70, 240, 240),
                 (245, 130, 48), (240, 50, 230), (128, 128, 0), (0, 0, 128), (170, 110, 40), (128, 0, 0)]


def cue_palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class, (num_classes, 3) uint8. Class i's colour never depends on num_classes."""
    import colorsys

    colours = list(_BASE_PALETTE[:num_classes])
    levels = [(0.9, 0.95), (0.55, 0.9), (0.9, 0.6)]
    for i in range(len(colours), num_classes):
        s, v = levels[i % 3]
        r, g, b = colorsys.hsv_to_rgb((i * 0.6180339887) % 1.0, s, v)
        colours.append((round(255 * r), round(255 * g), round(255 * b)))
    return np.array(colours, dtype=np.uint8).reshape(-1, 3)


def add_cue(img: Image.Image, label: int, num_classes: int, kind: str = "patch", shuffle_rng=None, mask=None,
            size: float = 0.2, border: float = 0.12) -> Image.Image:
    """Paint the colour of class ``label`` onto a copy of ``img`` as a shortcut a model can learn.

    Args:
        img: the image; converted to RGB.
        label: the class whose colour to paint (the true class when training, a different class when testing).
        num_classes: number of classes.
        kind: ``"patch"``, a solid square in the top-left corner, side ``size`` of the short side (P4's coloured
            shapes); or ``"background"``, every pixel outside ``mask`` (P4's solid-colour backgrounds) or, with no
            mask, a frame ``border`` of the short side wide around the image.
        shuffle_rng: if given, paint the colour of a random class other than ``label`` instead (single-image
            shuffle; for a whole test set prefer ``shuffled_labels_for_cue``, which keeps the cue frequencies).
        mask: optional HxW boolean foreground mask for ``kind="background"``.
        size: patch side as a fraction of the short side.
        border: frame width as a fraction of the short side.
    """
    if not 0 <= label < num_classes:
        raise ValueError(f"Cue label {label} is outside [0, {num_classes})")
    if shuffle_rng is not None:
        if num_classes < 2:
            raise ValueError("Shuffling a cue needs at least two classes")
        label = int((label + shuffle_rng.integers(1, num_classes)) % num_classes)
    colour = cue_palette(num_classes)[label]
    x = np.array(img.convert("RGB"))
    H, W = x.shape[:2]
    short = min(H, W)
    if kind == "patch":
        side = max(2, round(size * short))
        margin = max(1, side // 4)
        x[margin:margin + side, margin:margin + side] = colour
    elif kind == "background":
        if mask is not None:
            x[~np.asarray(mask, dtype=bool)] = colour
        else:
            b = max(1, round(border * short))
            x[:b], x[-b:], x[:, :b], x[:, -b:] = colour, colour, colour, colour
    else:
        raise ValueError(f"Cue kind must be 'patch' or 'background', got {kind!r}")
    return Image.fromarray(x)


def shuffled_labels_for_cue(labels, rng: np.random.Generator) -> np.ndarray:
    """Cue classes for the shuffled test set: a permutation of ``labels`` in which no image keeps its own class.

    The cue frequencies stay those of the clean-cue set, so the accuracy drop measures reliance on the cue and not
    a change in how often each colour appears. If one class holds more than half the images no such permutation
    exists; the images that cannot be swapped then get a random other class.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError("Shuffling cues needs at least two classes among the labels")
    cue = labels[rng.permutation(len(labels))]
    for i in np.flatnonzero(cue == labels):
        # Swap with any j whose cue is not labels[i] and whose label is not cue[i]: both end up mismatched.
        ok = np.flatnonzero((cue != labels[i]) & (labels != cue[i]))
        if len(ok):
            j = rng.choice(ok)
            cue[i], cue[j] = cue[j], cue[i]
        else:
            cue[i] = rng.choice(classes[classes != labels[i]])
    return cue


def spurious_summary(cue_acc: dict, shuffled_acc: dict, clean_acc: dict | None = None) -> dict:
    """``{model: {"cue", "shuffled", "drop"[, "clean"]}}`` with drop = clean-cue accuracy - shuffled-cue accuracy."""
    out = {}
    for model, acc in cue_acc.items():
        out[model] = {"cue": acc, "shuffled": shuffled_acc[model], "drop": acc - shuffled_acc[model]}
        if clean_acc is not None and model in clean_acc:
            out[model]["clean"] = clean_acc[model]
    return out


def spurious_report(cue_acc: dict, shuffled_acc: dict, clean_acc: dict | None = None, scale: float = 100.0,
                    digits: int = 1) -> str:
    """Markdown table of the spurious-cue probe, one row per model; ``scale`` as in ``corruption_report``."""
    summary = spurious_summary(cue_acc, shuffled_acc, clean_acc)

    def fmt(v):
        return f"{scale * v:.{digits}f}"

    has_clean = clean_acc is not None
    head = "| model | " + ("no cue | " if has_clean else "") + "class cue | shuffled cue | drop |"
    lines = [head, "|---|" + "---:|" * (4 if has_clean else 3)]
    for model, s in summary.items():
        clean = (fmt(s["clean"]) if "clean" in s else "–") + " | " if has_clean else ""
        lines.append(f"| {model} | {clean}{fmt(s['cue'])} | {fmt(s['shuffled'])} | **{fmt(s['drop'])}** |")
    return "\n".join(lines) + "\n"
