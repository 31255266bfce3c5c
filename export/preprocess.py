"""Image -> model input: the one implementation that training, evaluation, export and the target runtime share.

RGB (alpha composited on white), the centred square of ``crop_pct`` of the shorter side, resize to ``size`` with the
recorded PIL interpolation, ``/255``, ``(x - mean) / std``, CHW float32. ``spec`` is the dict a bundle's manifest
records under ``preprocess`` (``size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``).

numpy and pillow only: this file goes to the device with ``run.py``, where neither torch nor edgedistill is
installed, and the library imports it from here (through ``edgedistill.runtime``), so an exported model sees
exactly the tensor the PyTorch student saw.
"""
import numpy as np
from PIL import Image

RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) to 8-bit RGB; alpha is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def center_crop_box(w: int, h: int, crop_pct: float) -> tuple:
    """The centred square that resizing the shorter side to size/crop_pct and cropping size keeps."""
    side = min(w, h) * crop_pct
    left, top = (w - side) / 2, (h - side) / 2
    return (left, top, left + side, top + side)


def center_crop(img: Image.Image, spec: dict) -> Image.Image:
    """RGB, then the centred square of ``crop_pct`` of the shorter side."""
    img = to_rgb(img)
    return img.crop(center_crop_box(img.width, img.height, float(spec.get("crop_pct", 1.0))))


def resize_to(img: Image.Image, spec: dict) -> Image.Image:
    size = int(spec["size"])
    return img.resize((size, size), RESAMPLE[spec.get("interpolation", "bicubic")])


def resize_normalize(img: Image.Image, spec: dict) -> np.ndarray:
    """An already-cropped RGB image -> float32 CHW array at ``spec['size']``, normalised with mean/std."""
    return normalize(np.asarray(resize_to(img, spec)), spec)


def preprocess(img: Image.Image, spec: dict) -> np.ndarray:
    """Evaluation preprocessing: RGB, centre square crop of crop_pct of the shorter side, resize, normalise."""
    return resize_normalize(center_crop(img, spec), spec)


def input_pixels(img: Image.Image, spec: dict) -> np.ndarray:
    """The uint8 HWC pixels ``preprocess`` normalises: ``preprocess(img) == normalize(input_pixels(img))``."""
    return np.asarray(resize_to(center_crop(img, spec), spec))


def normalize(pixels: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 HWC RGB pixels (already cropped and resized) -> float32 CHW array normalised with mean/std."""
    x = np.asarray(pixels, dtype=np.float32) / 255.0
    x = (x - np.asarray(spec["mean"], dtype=np.float32)) / np.asarray(spec["std"], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_image(path) -> Image.Image:
    """An image file as 8-bit RGB (no EXIF rotation: training and evaluation do not apply it either)."""
    with Image.open(path) as img:
        img.load()
        rgb = to_rgb(img)
        return rgb.copy() if rgb is img else rgb
