"""Datasets fetched by name: ``torchvision/<Class>`` (``torchvision_sets``) and ``hf/<id>`` (``hf_sets``), plus the
older names ``oxford-pets`` and ``flowers-102``.

Both download on first use with internet into a cache folder and are read from it afterwards: torchvision's into
``data.root`` (else ~/.cache/edgedistill/datasets), Hugging Face's into ``data.root`` (else the ``datasets`` cache,
which HF_HOME moves). With HF_HUB_OFFLINE set nothing is downloaded. A dataset that is neither on disk nor
downloadable is one sentence, raised as ``WeightsUnavailable`` so that the pipeline's preflight names it together
with every missing weight. Images a dataset holds as arrays or encoded bytes (CIFAR, MNIST, every Hugging Face
dataset) are written once as image files under the cache folder, so the split, the feature cache and every loader
read them as paths.
"""
import dataclasses
import difflib

from ..recipe import DataCfg, RecipeError
from .source import Source

PREFIXES = ("torchvision/", "hf/")
ALIASES = {"oxford-pets": "torchvision/OxfordIIITPet", "flowers-102": "torchvision/Flowers102"}
HF_KEYS = {f.name: f.default for f in dataclasses.fields(DataCfg) if f.name.startswith("hf_")}


def remote_name(dataset: str) -> str:
    """``torchvision/<Class>`` or ``hf/<id>`` for a dataset fetched by name (aliases resolved); "" for any other."""
    return ALIASES.get(dataset, dataset if dataset.startswith(PREFIXES) else "")


def remote_source(cfg) -> Source:
    """The classes and (path, label) lists of a dataset fetched by name, downloading it when absent and allowed."""
    name = remote_name(cfg.dataset)
    if name.startswith("hf/"):
        from .hf_sets import hf_source

        return hf_source(cfg)
    from .torchvision_sets import torchvision_source

    return torchvision_source(cfg, name[len("torchvision/"):])


def missing_downloads(cfg) -> list[str]:
    """One sentence for the dataset ``cfg`` names when it is neither on disk nor downloadable now (it downloads
    here when it can); [] for a dataset on disk, just downloaded, or not fetched by name."""
    from ..teachers.base import WeightsUnavailable

    name = remote_name(cfg.dataset)
    if not name:
        return []
    try:
        if name.startswith("hf/"):
            from .hf_sets import open_hf

            open_hf(cfg)
        else:
            from .torchvision_sets import open_splits, torchvision_root

            open_splits(name[len("torchvision/"):], torchvision_root(cfg))
    except WeightsUnavailable as e:
        return [str(e)]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Names and keys, checked before any work


def check_dataset(d, registry):
    """``data.dataset`` names a registered dataset, a torchvision classification dataset or an ``hf/<id>``, and the
    ``data.hf_*`` keys are set only for the latter (and make sense there); a RecipeError naming the key otherwise."""
    name = d.dataset
    if name.startswith("torchvision/"):
        from .torchvision_sets import TORCHVISION

        cls = name[len("torchvision/"):]
        if cls not in TORCHVISION:
            lower = {k.lower(): k for k in TORCHVISION}
            close = [lower[cls.lower()]] if cls.lower() in lower else difflib.get_close_matches(cls, TORCHVISION, n=3)
            hint = f" Did you mean {['torchvision/' + c for c in close]}?" if close else ""
            raise RecipeError(f"Recipe key 'data.dataset': {cls!r} is not a torchvision classification dataset "
                              f"edgedistill reads.{hint} Known: {sorted(TORCHVISION)}")
    elif name.startswith("hf/"):
        from ..utils import require

        if not name[len("hf/"):].strip():
            raise RecipeError("Recipe key 'data.dataset' is 'hf/' without a dataset id, e.g. hf/tanganke/dtd")
        require("datasets", "hf")  # an ImportError that says which pip install adds it
    elif name not in registry:
        raise RecipeError(f"Recipe key 'data.dataset': {registry.unknown_message(name)}, or torchvision/<Class> "
                          "(e.g. torchvision/DTD), or hf/<Hugging Face dataset id>")
    for key, default in HF_KEYS.items():
        if getattr(d, key) != default and not name.startswith("hf/"):
            raise RecipeError(f"Recipe key 'data.{key}' applies only to Hugging Face datasets (data.dataset: "
                              f"hf/<id>); data.dataset is {name!r}")
    if name.startswith("hf/"):
        if not d.hf_split.strip():
            raise RecipeError("Recipe key 'data.hf_split' is empty: name the split trained on, e.g. train")
        if d.hf_test_split == d.hf_split:
            raise RecipeError(f"Recipe key 'data.hf_test_split' is {d.hf_test_split!r}, the split trained on "
                              "(data.hf_split): name another split, or '' to hold out data.test_fraction of it")
