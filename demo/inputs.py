"""What a visitor sends the demo, checked: the uploaded file and the class names they typed.

Both raise ``InputError`` with one sentence the page can show as it is; nothing a visitor sends may stop the server.
"""
import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from edgedistill.runtime.preprocess import to_rgb

MAX_UPLOAD = "20mb"            # Gradio refuses larger uploads before they reach the app
MAX_PIXELS = 40_000_000        # a 20 MB PNG can still decode to gigabytes; refuse before decoding
MAX_CLASSES = 200              # each new class name costs a text-encoder pass
MAX_NAME_CHARS = 120


class InputError(ValueError):
    """Bad input from a visitor; the message is shown on the page."""


def upload_path(payload, upload_root: str) -> Path:
    """The file behind an image payload, which must lie in Gradio's upload folder.

    Gradio already refuses paths a visitor did not upload; checking again here keeps that true even if the app is
    wired differently later.
    """
    if payload is None:
        raise InputError("Upload an image first (or pick one of the examples).")
    path = payload.get("path") if isinstance(payload, dict) else None
    if not path:
        raise InputError("The upload did not arrive; try again.")
    path, root = Path(path).resolve(), Path(upload_root).resolve()
    if root not in path.parents:
        raise InputError("Only uploaded files can be classified.")
    return path


def read_image(path) -> Image.Image:
    """An uploaded file as an 8-bit RGB image, or InputError saying what is wrong with it."""
    # 1. Is it an image at all? Opening reads only the header.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"The image is too large: this demo takes at most {MAX_PIXELS / 1e6:.0f} megapixels.")
    except UnidentifiedImageError:
        raise InputError("That file is not an image this demo can read (use PNG, JPEG, WebP, BMP, TIFF or GIF).")
    except OSError as e:
        raise InputError("The file could not be opened as an image.") from e
    # 2. Is it small enough to decode? The size is known before any pixel is.
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise InputError(f"The image is {w}×{h} ({w * h / 1e6:.0f} megapixels); this demo takes at most "
                         f"{MAX_PIXELS / 1e6:.0f} megapixels. Downscale it first.")
    if w == 0 or h == 0:
        raise InputError("The image has no pixels.")
    # 3. Decode it (truncated and corrupt files fail here) and bring any mode to 8-bit RGB.
    try:
        img.load()
        rgb = to_rgb(img)
        return rgb.copy() if rgb is img else rgb  # the original is closed below
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError("The image file is damaged or truncated.") from e
    finally:
        img.close()


def parse_class_names(text) -> list[str]:
    """Class names typed one per line, or comma-separated on one line; empty and duplicated lists are refused."""
    text = text if isinstance(text, str) else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1:
        lines = [part.strip() for part in lines[0].split(",") if part.strip()]
    names = [re.sub(r"\s+", " ", name) for name in lines]
    if not names:
        raise InputError("The class list is empty: type at least one class name (one per line, or comma-separated).")
    if len(names) > MAX_CLASSES:
        raise InputError(f"{len(names)} class names is too many; this demo takes at most {MAX_CLASSES}.")
    long = [n for n in names if len(n) > MAX_NAME_CHARS]
    if long:
        raise InputError(f"Class name {long[0][:40]!r}... is longer than {MAX_NAME_CHARS} characters.")
    seen = {}
    for name in names:
        if name.casefold() in seen:
            raise InputError(f"The class list names {name!r} twice (as {seen[name.casefold()]!r} and {name!r}); "
                             "each class must appear once.")
        seen[name.casefold()] = name
    return names
