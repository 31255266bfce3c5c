"""Any torchvision classification dataset by name (``data.dataset: torchvision/<Class>``).

``TORCHVISION`` says, per dataset class, which of its splits are trained on and which one is the test split: the
constructors differ (``split=`` for most, ``train=`` for CIFAR and the MNISTs, ``version=`` for iNaturalist, none
for Caltech, EuroSAT and SUN397, whose ``data.test_fraction`` is then held out). Class names come from the dataset
(``classes``, ``categories``, ``class_to_idx``), Flowers-102's from the list this package ships (torchvision has
none); underscores read as spaces. File-backed datasets are read where torchvision keeps them; the others (arrays,
tensors, files built on the fly) are written once as PNG files beside them.
"""
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .fetching import materialise, png_bytes, readable_name, unavailable
from .source import DataError, Source

DEFAULT_ROOT = "~/.cache/edgedistill/datasets"


def splits(*train, test=None, key="split", **fixed):
    """Constructor arguments of the training splits and of the test split (None: hold out data.test_fraction)."""
    return [{key: s, **fixed} for s in train], ({key: test, **fixed} if test else None)


def flag(**fixed):
    """Datasets split by ``train=True/False``."""
    return [{"train": True, **fixed}], {"train": False, **fixed}


WHOLE = ([{}], None)  # one set, no split: data.test_fraction is held out (stratified)
TORCHVISION = {
    "Caltech101": WHOLE, "Caltech256": WHOLE, "EuroSAT": WHOLE, "SEMEION": WHOLE, "SUN397": WHOLE,
    "CIFAR10": flag(), "CIFAR100": flag(), "EMNIST": flag(split="balanced"), "FashionMNIST": flag(),
    "KMNIST": flag(), "MNIST": flag(), "QMNIST": flag(), "USPS": flag(),
    "CLEVRClassification": splits("train", test="val"),  # its test split carries no labels
    "Country211": splits("train", "valid", test="test"),
    "DTD": splits("train", "val", test="test"),
    "FER2013": splits("train", test="test"),
    "FGVCAircraft": splits("trainval", test="test"),
    "Flowers102": splits("train", "val", test="test"),  # 10 + 10 images per class trained on (P1)
    "Food101": splits("train", test="test"),
    "GTSRB": splits("train", test="test"),
    "ImageNet": splits("train", test="val"),
    "Imagenette": splits("train", test="val"),
    "INaturalist": splits("2021_train_mini", test="2021_valid", key="version"),
    "LFWPeople": splits("train", test="test"),
    "OxfordIIITPet": splits("trainval", test="test"),
    "PCAM": splits("train", "val", test="test"),
    "Places365": splits("train-standard", test="val", small=True),
    "RenderedSST2": splits("train", "val", test="test"),
    "StanfordCars": splits("train", test="test"),
    "STL10": splits("train", test="test"),
    "SVHN": splits("train", test="test"),
}
NO_DOWNLOAD = {"ImageNet", "StanfordCars"}  # torchvision cannot fetch these (licence terms; a dead URL)
FIXED_NAMES = {"SVHN": [str(d) for d in range(10)], "SEMEION": [str(d) for d in range(10)]}


def torchvision_root(cfg) -> Path:
    """Where torchvision datasets are downloaded and read: ``data.root``, else ~/.cache/edgedistill/datasets."""
    return Path(cfg.root or DEFAULT_ROOT).expanduser().resolve()


def open_splits(name: str, root: Path) -> tuple[list, object]:
    """(training split datasets, test split dataset or None), downloading into ``root`` when absent and allowed;
    one sentence (WeightsUnavailable) when the dataset is neither there nor downloadable."""
    import inspect

    import torchvision.datasets

    from ..local_weights import offline

    cls = getattr(torchvision.datasets, name)
    downloads = "download" in inspect.signature(cls).parameters and name not in NO_DOWNLOAD
    train_kw, test_kw = TORCHVISION[name]

    def make(kw):
        try:  # what is on disk first: download=True would check archive checksums on every run
            return cls(str(root), **kw, **({"download": False} if downloads else {}))
        except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError, OSError, ValueError, ImportError...
            if not downloads or offline():
                why = None if downloads else e  # offline: the download it would need is what is missing
                raise unavailable(f"the torchvision dataset {name!r}", f"{root} (data.root)", why, downloads) from e
        try:
            return cls(str(root), download=True, **kw)
        except Exception as e:  # noqa: BLE001 - no internet, a moved URL, a checksum mismatch: one sentence
            raise unavailable(f"the torchvision dataset {name!r}", f"{root} (data.root)", e) from e

    return [make(kw) for kw in train_kw], (make(test_kw) if test_kw else None)


def torchvision_source(cfg, name: str) -> Source:
    """Classes and (path, label) lists of ``torchvision/<name>``: its training splits together, its test split."""
    root = torchvision_root(cfg)
    train_parts, test_part = open_splits(name, root)
    parts = train_parts + ([test_part] if test_part is not None else [])
    names = [dataset_classes(ds, name) for ds in parts]
    classes = max(names, key=len)
    pairs = []
    for ds, own, kw in zip(parts, names, TORCHVISION[name][0] + [TORCHVISION[name][1]]):
        remap = {i: classes.index(c) for i, c in enumerate(own) if c in classes}
        folder = root / "edgedistill-images" / readable_name(name, *(f"{k}={v}" for k, v in (kw or {}).items()))
        pairs.append([(p, remap[y]) for p, y in dataset_items(ds, name, folder) if y in remap])
    train = [it for part in pairs[:len(train_parts)] for it in part]
    test = pairs[-1] if test_part is not None else []
    if test_part is not None and not test:
        raise DataError(f"Dataset 'torchvision/{name}': its test split has no labelled image")
    return Source(classes, train, test)


def dataset_items(ds, name: str, folder: Path) -> list:
    """(path, label) of every labelled image: the files torchvision reads, or PNG copies of what it holds in memory."""
    pairs = file_pairs(ds)
    if pairs is None:
        def rows():
            for i in range(len(ds)):
                img, y = ds[i]
                if not hasattr(img, "save"):  # a tensor or an array
                    from torchvision.transforms.functional import to_pil_image

                    img = to_pil_image(img)
                yield png_bytes(img), ".png", -1 if y is None else int(y)

        from ..utils import fingerprint

        pairs = materialise(folder, fingerprint([name, str(folder), len(ds)]), rows(), len(ds),
                            f"torchvision/{name}: images to files")
    return [(str(p), int(y)) for p, y in pairs if y is not None and int(y) >= 0]


def file_pairs(ds) -> list | None:
    """(file, label) pairs when the dataset keeps its images as files under attributes torchvision uses, else None."""
    for paths, labels in (("_image_files", "_labels"), ("_images", "_labels"), ("data", "targets")):
        if isinstance(getattr(ds, paths, None), list) and isinstance(getattr(ds, labels, None), list):
            found = list(zip(getattr(ds, paths), getattr(ds, labels)))
            if is_file_list(found):
                return found
    for attr in ("_samples", "samples", "imgs"):
        found = getattr(ds, attr, None)
        if isinstance(found, list) and all(isinstance(s, tuple) and len(s) == 2 for s in found[:8]):
            if is_file_list(found):
                return found
    return None


def is_file_list(pairs: list) -> bool:
    return bool(pairs) and all(isinstance(p, (str, Path)) and Path(p).is_file() for p, _ in pairs[:8])


def dataset_classes(ds, name: str) -> list[str]:
    """The dataset's class names in label order, underscores read as spaces (kept when that would merge two)."""
    names = None
    for attr in ("classes", "categories", "all_categories"):
        found = getattr(ds, attr, None)
        if isinstance(found, (list, tuple)) and found and all(isinstance(c, str) for c in found):
            names = list(found)
            break
    if names is None and isinstance(getattr(ds, "class_to_idx", None), dict) and ds.class_to_idx:
        names = [c for c, _ in sorted(ds.class_to_idx.items(), key=lambda kv: kv[1])]
    if names is None:
        labels = [int(y) for _, y in (file_pairs(ds) or [])] or [int(y) for y in labels_of(ds)]
        count = max(labels) + 1 if labels else 0
        shipped = flowers102_classes() if name == "Flowers102" else FIXED_NAMES.get(name)
        names = list(shipped[:count]) if shipped else [f"class {i}" for i in range(count)]
    spaced = [" ".join(c.replace("_", " ").split()) for c in names]
    return spaced if len(set(spaced)) == len(names) else names


def labels_of(ds) -> list:
    for attr in ("_labels", "targets", "labels", "y"):
        found = getattr(ds, attr, None)
        if found is not None and len(found):
            return [y for y in list(found) if y is not None and int(y) >= 0]
    return [y for _, y in (ds[i] for i in range(len(ds))) if y is not None and int(y) >= 0]


@lru_cache(maxsize=1)
def flowers102_classes() -> tuple[str, ...]:
    """The 102 Oxford Flowers names in label order, shipped with this package (torchvision gives none)."""
    text = resources.files("edgedistill.data").joinpath("flowers102_classes.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
