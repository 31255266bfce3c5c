"""Hugging Face ``datasets`` by id (``data.dataset: hf/<id>``), an optional dependency: pip install 'edgedistill[hf]'.

``<id>`` is a Hub id (``tanganke/dtd``), a local folder ``load_dataset`` reads (parquet, an image folder), or a
folder written by ``save_to_disk``. ``data.hf_split`` is trained on (``data.val_fraction`` carved from it) and
``data.hf_test_split`` is the held-out split ('' holds out ``data.test_fraction`` of the training split instead);
``data.hf_config`` picks a configuration. The image column is ``data.hf_image_column``, else the dataset's one
``Image`` feature; the label column ``data.hf_label_column``, else its one ``ClassLabel`` feature, whose names are the
class names (a column of plain strings or integers gives its sorted values). Downloads go to ``data.root``, else to
the ``datasets`` cache (HF_HOME moves it); each split's images are written once, as their original encoded bytes,
under ``<cache>/edgedistill-images/``.
"""
from pathlib import Path

from ..utils import fingerprint, require
from .fetching import image_suffix, materialise, readable_name, unavailable
from .source import DataError, Source


def dataset_id(cfg) -> str:
    return cfg.dataset[len("hf/"):]


def saved_folder(ident: str) -> Path | None:
    """The folder when ``ident`` is one ``save_to_disk`` wrote (a DatasetDict or a single Dataset), else None."""
    path = Path(ident).expanduser()
    return path if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file() else None


def open_hf(cfg) -> dict:
    """split name -> Dataset, downloaded into the cache when absent and allowed (HF_HUB_OFFLINE: the cache only);
    one sentence (WeightsUnavailable) when it is neither cached nor downloadable."""
    datasets = require("datasets", "hf")
    ident = dataset_id(cfg)
    cache = cfg.root and str(Path(cfg.root).expanduser())
    try:
        local = saved_folder(ident)
        if local is not None:
            found = datasets.load_from_disk(str(local))
        else:
            found = datasets.load_dataset(ident, cfg.hf_config or None, cache_dir=cache or None)
    except Exception as e:  # noqa: BLE001 - hub, network and format errors come in many types: one sentence
        where = f"{cache} (data.root)" if cache else f"{datasets.config.HF_DATASETS_CACHE} (HF_HOME)"
        raise unavailable(f"the Hugging Face dataset {ident!r}", where, e) from e
    return dict(found) if isinstance(found, datasets.DatasetDict) else {"train": found}


def hf_source(cfg) -> Source:
    """Classes and (path, label) lists of ``hf/<id>``: the training split, and the test split unless it is ''."""
    datasets = require("datasets", "hf")
    parts = open_hf(cfg)
    train = pick_split(cfg, parts, "hf_split")
    test = pick_split(cfg, parts, "hf_test_split") if cfg.hf_test_split else None
    image_col = pick_column(cfg, train, "hf_image_column", datasets.Image, "Image")
    label_col = pick_column(cfg, train, "hf_label_column", datasets.ClassLabel, "ClassLabel")
    classes, to_index = label_mapping(cfg, train, label_col)
    root = Path(cfg.root).expanduser().resolve() if cfg.root else Path(datasets.config.HF_DATASETS_CACHE)
    base = root / "edgedistill-images" / readable_name(dataset_id(cfg), cfg.hf_config)
    items = {}
    for split, ds in ((cfg.hf_split, train), (cfg.hf_test_split, test)):
        if ds is None:
            continue
        for col in (image_col, label_col):
            if col not in ds.features:
                raise DataError(f"Dataset {cfg.dataset!r}: split {split!r} has no column {col!r} "
                                f"(it has {list(ds.features)})")
        items[split] = split_items(ds, image_col, label_col, to_index, base / readable_name(split),
                                   f"{cfg.dataset} [{split}]")
    if test is not None and not items[cfg.hf_test_split]:
        raise DataError(f"Recipe key 'data.hf_test_split': split {cfg.hf_test_split!r} of {cfg.dataset!r} has no "
                        "labelled image; set data.hf_test_split='' to hold out data.test_fraction of the train split")
    return Source(classes, items[cfg.hf_split], items.get(cfg.hf_test_split, []) if test is not None else [])


def pick_split(cfg, parts: dict, key: str):
    name = getattr(cfg, key)
    if name not in parts:
        raise DataError(f"Recipe key 'data.{key}' is {name!r}, but {cfg.dataset!r} has the splits {sorted(parts)}")
    return parts[name]


def pick_column(cfg, ds, key: str, kind, kind_name: str) -> str:
    """The column ``data.<key>`` names, else the dataset's one column of feature type ``kind``."""
    named = getattr(cfg, key)
    if named:
        if named not in ds.features:
            raise DataError(f"Recipe key 'data.{key}' is {named!r}, but {cfg.dataset!r} has the columns "
                            f"{list(ds.features)}")
        return named
    found = [c for c, f in ds.features.items() if isinstance(f, kind)]
    if len(found) == 1:
        return found[0]
    if kind_name == "ClassLabel" and "label" in ds.features:
        return "label"
    raise DataError(f"Dataset {cfg.dataset!r} has {len(found)} {kind_name} columns {found}: set data.{key} to the "
                    f"one to use (columns: {list(ds.features)})")


def label_mapping(cfg, ds, col: str):
    """(class names, label value -> class index or None): a ClassLabel's own names, else the column's sorted values."""
    import datasets

    feature = ds.features[col]
    if isinstance(feature, datasets.ClassLabel):
        names = [str(n) for n in feature.names]
        return names, lambda y: int(y) if y is not None and 0 <= int(y) < len(names) else None
    dtype = feature.dtype if isinstance(feature, datasets.Value) else ""
    if not (dtype in ("string", "large_string") or dtype.startswith(("int", "uint"))):
        raise DataError(f"Recipe key 'data.hf_label_column': column {col!r} of {cfg.dataset!r} is {feature}, not "
                        "class labels (a ClassLabel, strings or integers)")
    values = sorted({v for v in ds[col] if v is not None})
    index = {v: i for i, v in enumerate(values)}
    return [str(v) for v in values], index.get


def split_items(ds, image_col: str, label_col: str, to_index, folder: Path, desc: str) -> list:
    """(path, label) of every labelled row of ``ds``: its image bytes written as files under ``folder`` once."""
    import datasets

    if not isinstance(ds.features[image_col], datasets.Image):
        raise DataError(f"Recipe key 'data.hf_image_column': column {image_col!r} is {ds.features[image_col]}, "
                        "not an Image feature")
    raw = ds.select_columns([image_col, label_col]).cast_column(image_col, datasets.Image(decode=False))

    def rows():
        for batch in raw.iter(batch_size=256):
            for image, label in zip(batch[image_col], batch[label_col]):
                y = to_index(label)
                if y is not None and image is not None:
                    data = image.get("bytes") or Path(image["path"]).read_bytes()
                    yield data, image_suffix(data), y

    key = fingerprint([getattr(ds, "_fingerprint", None) or len(ds), image_col, label_col, str(folder)])
    return materialise(folder, key, rows(), len(ds), f"{desc}: images to files")
