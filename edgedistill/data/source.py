"""What every dataset reader returns (``Source``) and the error for data that cannot train a classifier.

A leaf of ``edgedistill.data``: the registered readers in ``data/__init__.py`` and the readers of datasets fetched by
name (``remote``, ``torchvision_sets``, ``hf_sets``) all build on it without importing one another.
"""
from dataclasses import dataclass


class DataError(ValueError):
    """The data a recipe points at cannot train a classifier as given: fewer than two classes, a class with no
    (readable) images. The message names the dataset and the classes concerned."""


@dataclass
class Source:
    """What a dataset provides: class names and (path, label) lists; ``test`` is empty when it has no test split."""

    classes: list
    train: list
    test: list
