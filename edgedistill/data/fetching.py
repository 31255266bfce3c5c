"""What the readers of datasets fetched by name share: the one sentence for a dataset that cannot be read, and
images held as arrays or encoded bytes written once as files (so that every loader reads paths)."""
from pathlib import Path

from ..utils import progress, read_json, write_json


def unavailable(what: str, where: str, error: Exception | None, downloads: bool = True):
    """The one sentence for a dataset that cannot be read, as the hub weights phrase theirs; ``error`` None: it is
    not on disk and HF_HUB_OFFLINE forbids the download."""
    from ..teachers.base import WeightsUnavailable

    how = ("it downloads on first use with internet and is cached under" if downloads else
           "it cannot be downloaded automatically: place it by hand under")
    if error is None:
        why = "not there, and HF_HUB_OFFLINE is set, so nothing is downloaded"
    else:
        why = f"{type(error).__name__}: {' '.join(str(error).split())[:160]}".rstrip(": ")
    return WeightsUnavailable(f"Recipe key 'data.dataset' needs {what}: {how} {where} (loading failed: {why}).")


def materialise(folder: Path, key: str, rows, total: int, desc: str) -> list:
    """(path, label) of each row's image, written as a file under ``folder`` once. ``rows`` yields (encoded bytes,
    suffix, label); ``folder/index.json``, written last, lists the files under ``key``, so a run killed half-way
    writes them again and a changed dataset (another key) rewrites them."""
    index = folder / "index.json"
    if index.is_file():
        saved = read_json(index)
        if saved.get("key") == key:
            return [(str(folder / name), label) for name, label in saved["items"]]
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (data, suffix, label) in enumerate(progress(rows, total=total, desc=desc)):
        name = f"{i:07d}{suffix}"
        (folder / name).write_bytes(data)  # no fsync per file: index.json, written atomically last, vouches for all
        items.append((name, int(label)))
    write_json(index, {"key": key, "items": items})
    return [(str(folder / name), label) for name, label in items]


SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


def image_suffix(data: bytes) -> str:
    """The file suffix of encoded image bytes (read from their header); ".bin" when PIL does not know them."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return SUFFIXES.get(img.format, f".{(img.format or 'bin').lower()}")
    except (UnidentifiedImageError, OSError, ValueError):
        return ".bin"  # kept: the split's decode check reports it and skips it


def png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def readable_name(*parts) -> str:
    """A folder name made of ``parts`` with anything but letters, digits, '.', '_' and '-' replaced."""
    import re

    return re.sub(r"[^A-Za-z0-9._=-]+", "-", "-".join(str(p) for p in parts if p != "")).strip("-") or "dataset"
