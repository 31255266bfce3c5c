"""Array operations behind the corruptions: float32 HWC images in [0, 1], numpy and PIL only.

Blurs, an FFT filter, a diamond-square fractal and bilinear resampling, written so that the corruptions in
``corruptions.py`` match the reference ``make_imagenet_c.py`` without scipy, skimage or OpenCV.
"""
import math

import numpy as np
from PIL import Image


def to_float(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 255.0


def to_pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8))


def _convolve_axis(x: np.ndarray, k: np.ndarray, axis: int, mode: str) -> np.ndarray:
    """1-D correlation along one axis as a sum of shifted slices (fast for short kernels)."""
    r = len(k) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode=mode)
    n = x.shape[axis]
    out = np.zeros_like(x)
    for i, w in enumerate(k):
        out += w * np.take(xp, np.arange(i, i + n), axis=axis)
    return out


def _gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: np.ndarray, sigma: float, mode: str = "edge", truncate: float = 4.0) -> np.ndarray:
    """Gaussian blur over the two spatial axes; ``mode="edge"`` matches skimage's default ``nearest``."""
    k = _gaussian_kernel(sigma, max(1, int(truncate * sigma + 0.5)))
    return _convolve_axis(_convolve_axis(x, k, 0, mode), k, 1, mode)


def fft_filter(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D correlation of every channel with ``kernel``, reflect-101 borders (OpenCV's default), via the FFT."""
    H, W = x.shape[:2]
    kh, kw = kernel.shape
    rh, rw = kh // 2, kw // 2
    mode = "reflect" if min(H, W) > max(rh, rw) else "symmetric"
    xp = np.pad(x, ((rh, rh), (rw, rw), (0, 0)), mode=mode)
    shape = xp.shape[:2]
    fx = np.fft.rfft2(xp, axes=(0, 1))
    fk = np.fft.rfft2(kernel[::-1, ::-1], s=shape)
    full = np.fft.irfft2(fx * fk[..., None], s=shape, axes=(0, 1))
    return full[kh - 1:kh - 1 + H, kw - 1:kw - 1 + W].astype(np.float32)


def disk(radius: float, alias_blur: float) -> np.ndarray:
    L = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    X, Y = np.meshgrid(L, L)
    d = ((X ** 2 + Y ** 2) <= radius ** 2).astype(np.float32)
    d /= d.sum()
    # Antialias the hard disk, like cv2.GaussianBlur(ksize=3 or 5) in the reference.
    k = _gaussian_kernel(alias_blur, 1 if radius <= 8 else 2)
    return _convolve_axis(_convolve_axis(d, k, 0, "reflect"), k, 1, "reflect")


def _shift(xp: np.ndarray, m: int, dx: int, dy: int, H: int, W: int) -> np.ndarray:
    """``x`` shifted by (dx, dy) with edge replication, read from ``xp`` = ``x`` edge-padded by ``m``."""
    return xp[m - dy:m - dy + H, m - dx:m - dx + W]


def directional_blur(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """Motion blur: shift-and-sum along ``angle`` with a half-Gaussian kernel of width 2r+1 (``imagecorruptions``)."""
    H, W = x.shape[:2]
    width = 2 * radius + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    m = width + 1
    xp = np.pad(x, ((m, m), (m, m)) + ((0, 0),) * (x.ndim - 2), mode="edge")
    out = np.zeros_like(x)
    for i in range(width):
        dy, dx = -math.ceil(i * sin - 0.5), -math.ceil(i * cos - 0.5)
        if abs(dy) >= H or abs(dx) >= W:  # the motion left the image
            break
        out += k[i] * _shift(xp, m, dx, dy, H, W)
    return out


def zoom_center(img: Image.Image, zoom: float) -> Image.Image:
    """Crop the central 1/zoom of the image and resize it back (bilinear): ``clipped_zoom`` of the reference."""
    W, H = img.size
    w, h = W / zoom, H / zoom
    box = ((W - w) / 2, (H - h) / 2, (W + w) / 2, (H + h) / 2)
    return img.resize((W, H), Image.BILINEAR, box=box)


def plasma_fractal(rng: np.random.Generator, mapsize: int = 256, wibbledecay: float = 3) -> np.ndarray:
    """Diamond-square height map in [0, 1], ``mapsize`` a power of two (the reference's fog texture)."""
    a = np.empty((mapsize, mapsize), dtype=np.float64)
    a[0, 0] = 0
    step, wibble = mapsize, 100.0
    while step >= 2:
        half = step // 2
        # Squares: the centre of each square is the mean of its corners plus noise.
        corners = a[0:mapsize:step, 0:mapsize:step]
        acc = corners + np.roll(corners, -1, axis=0)
        acc = acc + np.roll(acc, -1, axis=1)
        a[half:mapsize:step, half:mapsize:step] = acc / 4 + wibble * rng.uniform(-wibble, wibble, acc.shape)
        # Diamonds: each edge midpoint is the mean of its four neighbours plus noise.
        dr = a[half:mapsize:step, half:mapsize:step]
        ul = a[0:mapsize:step, 0:mapsize:step]
        s = dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1)
        a[0:mapsize:step, half:mapsize:step] = s / 4 + wibble * rng.uniform(-wibble, wibble, s.shape)
        s = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0)
        a[half:mapsize:step, 0:mapsize:step] = s / 4 + wibble * rng.uniform(-wibble, wibble, s.shape)
        step //= 2
        wibble /= wibbledecay
    a -= a.min()
    return (a / a.max()).astype(np.float32)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def bilinear_sample(x: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Sample HWC ``x`` at float coordinates with half-sample-symmetric borders (scipy's ``reflect``)."""
    H, W = x.shape[:2]

    def reflect(i, n):
        i = np.mod(i, 2 * n)
        return np.where(i >= n, 2 * n - 1 - i, i)

    y0, x0 = np.floor(yy).astype(np.int64), np.floor(xx).astype(np.int64)
    fy, fx = (yy - y0)[..., None], (xx - x0)[..., None]
    ya, yb, xa, xb = reflect(y0, H), reflect(y0 + 1, H), reflect(x0, W), reflect(x0 + 1, W)
    top = x[ya, xa] * (1 - fx) + x[ya, xb] * fx
    bottom = x[yb, xa] * (1 - fx) + x[yb, xb] * fx
    return top * (1 - fy) + bottom * fy


def gray(x: np.ndarray) -> np.ndarray:
    return x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
