"""The target runtime, as the library imports it. Its code is not in this folder: it lives in the top-level
``export/`` folder (``export/preprocess.py``, ``export/run.py``, ``export/timing.py``, ``export/build_engine.py``).

``export/`` is what a user copies to a device, where it runs with numpy, pillow and one runtime and without
edgedistill, so it cannot sit inside this package. The library still runs that very code (the preprocessing a
student trains and is evaluated with is the one the device applies): this package's ``__path__`` is that folder,
so its files are this package's submodules, with their own names and file paths in tracebacks:

    from edgedistill.runtime.preprocess import preprocess       # export/preprocess.py
    from edgedistill.runtime.run import load_bundle             # export/run.py
    from edgedistill.runtime.build_engine import build_engine   # export/build_engine.py

The folder is the copy a wheel installs as ``edgedistill/_target/`` (``[tool.setuptools]`` in pyproject.toml), else
the checkout's ``export/`` beside the ``edgedistill/`` folder (a plain checkout on ``sys.path``, or an editable
install). Nothing here imports the rest of edgedistill, so any module may import the runtime without a circle.
"""
from pathlib import Path


def target_folder() -> Path:
    """The folder holding ``run.py`` and ``preprocess.py``: the wheel's copy, else the checkout's ``export/``."""
    package = Path(__file__).resolve().parents[1]  # the edgedistill/ folder
    candidates = (package / "_target", package.parent / "export")
    for folder in candidates:
        if (folder / "run.py").is_file() and (folder / "preprocess.py").is_file():
            return folder
    raise ImportError(f"edgedistill's target runtime is missing: none of {[str(c) for c in candidates]} holds "
                      "run.py and preprocess.py (reinstall edgedistill, or restore export/ in the checkout)")


# In place, so __spec__.submodule_search_locations (the same list) agrees with __path__.
__path__[:] = [str(target_folder())]
