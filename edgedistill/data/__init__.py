"""Data: where images come from (DATASETS), how they are augmented (AUGMENTS), splits and the torch Dataset.

Every random choice per sample is seeded from (seed, epoch, item, view), so a resumed run, any number of
DDP ranks and the teacher-feature cache all see the same augmented view of the same image.
"""
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..registry import Registry
from ..runtime.preprocess import center_crop_box, preprocess, resize_normalize, to_rgb
from .remote import remote_name, remote_source
from .source import DataError, Source  # noqa: F401 (DataError: raised here, caught by name in cli)

log = logging.getLogger(__name__)
DATASETS = Registry("dataset")
AUGMENTS = Registry("augmentation preset")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def scan_image_folder(root) -> Source:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist (recipe key 'data.root')")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"Image folder {root} has no class sub-folders (expected ROOT/<class>/<image>)")
    items = [(str(p), label) for label, c in enumerate(classes) for p in sorted((root / c).rglob("*"))
             if p.suffix.lower() in IMAGE_EXTENSIONS]
    return Source(classes, items, [])


@DATASETS.register("imagefolder")
def image_folder(cfg) -> Source:
    """``data.root``/<class>/<image>; a ``train``/``test`` pair of such folders is used as given."""
    root = Path(cfg.root).expanduser()
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = scan_image_folder(root / "train"), scan_image_folder(root / "test")
        if train.classes != test.classes:
            raise DataError(f"{root}/train and {root}/test have different class folders: {train.classes} and "
                            f"{test.classes}")
        return Source(train.classes, train.train, test.train)
    return scan_image_folder(root)


@DATASETS.register("conformal-clip-data")
def conformal_clip_data(cfg) -> Source:
    """2,000 RGB JPEGs of *simulated* fabric texture (made with the spc4sts simulator, not photographs) in 3 classes:
    1,000 nominal, 500 local defect (small specks), 500 global defect; shipped on PyPI."""
    import conformal_clip_data

    return scan_image_folder(conformal_clip_data.textile_simulated_root())


@DATASETS.register("oxford-pets")
def oxford_pets(cfg) -> Source:
    """Oxford-IIIT Pets (37 breeds): torchvision/OxfordIIITPet, trainval / test."""
    return remote_source(cfg)


@DATASETS.register("flowers-102")
def flowers102(cfg) -> Source:
    """Oxford Flowers-102: torchvision/Flowers102, its train and val splits (10 + 10 images per class) trained on,
    test held out; the class names are the 102 flower names this package ships (torchvision has none)."""
    return remote_source(cfg)


def load_source(cfg) -> Source:
    """The dataset ``data.dataset`` names: a registered one, ``torchvision/<Class>`` or ``hf/<id>`` (data.remote)."""
    return remote_source(cfg) if remote_name(cfg.dataset) else DATASETS.get(cfg.dataset)(cfg)


def check_image(path: str) -> str | None:
    """None when the image decodes fully, else a short reason."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.width < 2 or img.height < 2:
                return "image is smaller than 2x2"
        return None
    except Exception as e:  # PIL raises many types for corrupt files
        return f"{type(e).__name__}: {e}"


def drop_unreadable(items: list, workers: int = 4) -> tuple[list, list]:
    """Decode every image once; report and skip those that fail."""
    with ThreadPoolExecutor(workers) as pool:
        reasons = list(pool.map(check_image, [p for p, _ in items]))
    kept = [it for it, r in zip(items, reasons) if r is None]
    skipped = [{"path": it[0], "reason": r} for it, r in zip(items, reasons) if r is not None]
    for s in skipped:
        log.warning("Skipping unreadable image %s (%s)", s["path"], s["reason"])
    return kept, skipped


def stratified_split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of each class: at least one image and never all of them when the class has two or more;
    a class of one image stays in the kept part."""
    rng = np.random.default_rng(seed)
    by_class: dict = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    keep, held = [], []
    for label in sorted(by_class):
        group = by_class[label]
        order = rng.permutation(len(group))
        n = int(round(len(group) * fraction))
        n = min(max(n, 1), len(group) - 1) if fraction > 0 and len(group) > 1 else 0  # never the whole class
        held += [group[i] for i in sorted(order[:n])]
        keep += [group[i] for i in sorted(order[n:])]
    return keep, held


def cap_per_class(items: list, cap: int, seed: int) -> list:
    if cap <= 0:
        return items
    rng = np.random.default_rng(seed + 1)
    out = []
    for label in sorted({y for _, y in items}):
        group = [it for it in items if it[1] == label]
        out += [group[i] for i in sorted(rng.permutation(len(group))[:cap])]
    return out


def labelled_subset(train: list, per_class: int, seed: int) -> list[int]:
    """Positions in ``train`` of ``per_class`` images of each class drawn at random (all of a smaller class), sorted:
    the images whose labels are used; 0 keeps every label."""
    if per_class <= 0:
        return list(range(len(train)))
    rng = np.random.default_rng([seed, 104729])
    by_class: dict = {}
    for i, (_, y) in enumerate(train):
        by_class.setdefault(y, []).append(i)
    return sorted(i for y in sorted(by_class) for i in rng.permutation(by_class[y])[:per_class].tolist())


def unlabelled_pool(root: str) -> tuple[list, list]:
    """(items, skipped): every readable image under ``root`` (any layout), as (path, -1), for distillation only."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Unlabelled image folder {folder} does not exist (recipe key 'data.unlabelled_root')")
    items = [(str(p), -1) for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    kept, skipped = drop_unreadable(items)
    if not kept:
        raise DataError(f"Unlabelled image folder {folder} holds no readable image (recipe key 'data.unlabelled_root')")
    return kept, skipped


def make_split(cfg) -> dict:
    """Train/val/test lists of (path, label) for a recipe's data section, unreadable images removed; ``labelled``:
    the positions in ``train`` whose labels are used (``data.labels_per_class``); ``unlabelled``: extra images.

    Raises DataError, before any model work, when fewer than two classes are left or a class has no readable
    training image; single unreadable images are reported and skipped.
    """
    # 1. The dataset's classes, narrowed to data.classes when the recipe names some.
    src = load_source(cfg)
    classes = list(cfg.classes) or src.classes
    if cfg.classes:
        unknown = [c for c in cfg.classes if c not in src.classes]
        if unknown:
            raise DataError(f"Recipe key 'data.classes' names classes the dataset lacks: {unknown}; "
                            f"it has {src.classes}")
        remap = {src.classes.index(c): i for i, c in enumerate(cfg.classes)}
        src = Source(classes, [(p, remap[y]) for p, y in src.train if y in remap],
                     [(p, remap[y]) for p, y in src.test if y in remap])
    check_classes(cfg, classes, src.train)
    # 2. Decode every image once; a class left with none fails here, naming it.
    sampled = cap_per_class(src.train, cfg.max_per_class, cfg.split_seed)
    train, skipped = drop_unreadable(sampled)
    check_readable(cfg, classes, sampled, train, skipped)
    test, skipped_test = drop_unreadable(src.test)
    # 3. Held-out splits, stratified by class.
    if not src.test:
        train, test = stratified_split(train, cfg.test_fraction, cfg.split_seed)
    val = []
    if cfg.val_fraction > 0:
        train, val = stratified_split(train, cfg.val_fraction, cfg.split_seed + 7)
    # 4. Scarce labels: which training images keep their label; any other folder of images is unlabelled.
    pool, skipped_pool = unlabelled_pool(cfg.unlabelled_root) if cfg.unlabelled_root else ([], [])
    return {"classes": classes, "train": train, "val": val, "test": test,
            "labelled": labelled_subset(train, cfg.labels_per_class, cfg.split_seed), "unlabelled": pool,
            "skipped": skipped + skipped_test + skipped_pool}


def describe_dataset(cfg) -> str:
    """How an error names the data: the folder for an image folder, else the dataset's name."""
    if cfg.dataset == "imagefolder":
        return f"Image folder {Path(cfg.root).expanduser()}"
    return f"Dataset {cfg.dataset!r}"


def check_classes(cfg, classes: list, items: list):
    """At least two classes, each with at least one training image."""
    if len(classes) < 2:
        where = ("Recipe key 'data.classes' selects" if cfg.classes else f"{describe_dataset(cfg)} has")
        hint = " (expected ROOT/<class>/<image>, one folder per class)" if cfg.dataset == "imagefolder" else ""
        raise DataError(f"{where} {len(classes)} class {classes}; a classifier needs at least two{hint}")
    counts = np.bincount([y for _, y in items], minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise DataError(f"{describe_dataset(cfg)}: class(es) {empty} have no training images "
                        f"(extensions read: {' '.join(sorted(IMAGE_EXTENSIONS))})")


def check_readable(cfg, classes: list, before: list, kept: list, skipped: list):
    """Every class keeps at least one image after the unreadable ones are dropped."""
    left = {y for _, y in kept}
    reasons = {s["path"]: s["reason"] for s in skipped}
    dead = [(c, [p for p, y in before if y == label]) for label, c in enumerate(classes) if label not in left]
    if dead:
        detail = "; ".join(f"class {c!r} has no readable image (all {len(paths)} fail to decode, e.g. {paths[0]}: "
                           f"{reasons[paths[0]]})" for c, paths in dead)
        raise DataError(f"{describe_dataset(cfg)}: {detail}; replace the files or remove the class")


# ---------------------------------------------------------------------------------------------------------------
# Augmentation presets: each maps (PIL image, numpy Generator) -> PIL image, before per-model resizing.


def random_resized_crop_box(w, h, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round((target * aspect) ** 0.5)), int(round((target / aspect) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            return (left, top, left + cw, top + ch)
    return center_crop_box(w, h, 1.0)


def color_jitter(img, rng, strength: float):
    from PIL import ImageEnhance

    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return img


@AUGMENTS.register("none")
def augment_none(img, rng, crop_pct):
    return img.crop(center_crop_box(img.width, img.height, crop_pct))


@AUGMENTS.register("light")
def augment_light(img, rng, crop_pct):
    """Flip and a mild random crop (scale 0.6-1): safe for small data and frozen-teacher caches."""
    img = img.crop(random_resized_crop_box(img.width, img.height, rng, scale=(0.6, 1.0)))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


@AUGMENTS.register("flip_rotate")
def augment_flip_rotate(img, rng, crop_pct):
    """A random one of the 8 flips and right-angle rotations, nothing cropped: for images with no up or down
    (textures, surfaces, aerial and microscope views) where a crop could cut away the very thing the label is about."""
    img = img.crop(center_crop_box(img.width, img.height, crop_pct))
    img = img.rotate(90 * int(rng.integers(4)), expand=True)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


@AUGMENTS.register("crop_flip_jitter")
def augment_crop_flip_jitter(img, rng, crop_pct):
    """RandomResizedCrop (scale 0.08-1), flip 0.5, ColorJitter 0.4 on brightness, contrast and saturation.

    P1's recipe (Marrie et al., App. A.3); its Mixup is the batch-level setting ``data.mixup``.
    """
    img = img.crop(random_resized_crop_box(img.width, img.height, rng, scale=(0.08, 1.0)))
    img = color_jitter(img, rng, 0.4)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


@AUGMENTS.register("crop_flip_randaugment")
def augment_crop_flip_randaugment(img, rng, crop_pct):
    """RandomResizedCrop (scale 0.08-1), flip 0.5, then timm's RandAugment ``rand-m7-mstd0.5``.

    P3's strong augmentation (Hao et al., after timm's ResNet Strikes Back A2); its Mixup/CutMix are the batch-level
    settings ``data.mixup`` / ``data.cutmix``.
    """
    import random

    from timm.data.auto_augment import rand_augment_transform

    img = img.crop(random_resized_crop_box(img.width, img.height, rng, scale=(0.08, 1.0)))
    img = img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img
    # timm's RandAugment draws ops from numpy's global RNG and magnitudes from `random`: seed both, then restore.
    seed = int(rng.integers(1 << 31))
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        return rand_augment_transform("rand-m7-mstd0.5", {"translate_const": 100})(img)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def load_rgb(path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        rgb = to_rgb(img)
        return rgb.copy() if rgb is img else rgb  # the file closes when the block ends


def view_image(path, augment: str, view_seed: int | None, crop_pct: float) -> Image.Image:
    """View 0 (``view_seed`` None) is the un-augmented centre crop; any other seed gives one augmented view."""
    img = load_rgb(path)
    if view_seed is None:
        return augment_none(img, None, crop_pct)
    return AUGMENTS.get(augment)(img, np.random.default_rng(view_seed), crop_pct)


__all__ = ["preprocess", "resize_normalize", "view_image", "make_split", "DATASETS", "AUGMENTS"]
