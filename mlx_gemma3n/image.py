"""Images -> the vision tower's pixel values, as Transformers' Gemma 3n image processor makes them.

Gemma 3n's preprocessor_config.json (a SiglipImageProcessor; the file is not in tests/data, these are the
values Google publishes with the model): convert to RGB, resize to 768 x 768 (resample 2 = bilinear,
antialiased), rescale by 1/255, no normalisation (do_normalize is false, so its mean/std of 0.5 are unused).

Transformers resizes with torchvision by default, on uint8 pixels in fixed point (int16 weights, like
Pillow-SIMD); Pillow's own resize keeps more weight bits and lands one level off on many pixels, so
`resize_bilinear` reproduces the torchvision arithmetic in numpy. Only numpy and Pillow are used here.
"""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import Gemma3nError

IMAGE_SIZE = 768
RESCALE_FACTOR = 1 / 255
URL_TIMEOUT = 30.0
MAX_WEIGHT_BITS = 15  # torch's int16 resampling weights


def load_image(source, timeout: float = URL_TIMEOUT) -> Image.Image:
    """An upright RGB image from a file path, an http(s) URL, a PIL image or a numpy array.

    Arrays are (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), uint8 or float in [0, 1]. The EXIF orientation
    is applied. Transparency is composited onto white, as the Transformers processor's RGB conversion does
    (Transformers' `load_image` helper drops the alpha channel instead).
    """
    if isinstance(source, Image.Image):
        image, name = source, f"PIL image ({source.mode} {source.width}x{source.height})"
    elif isinstance(source, np.ndarray):
        image, name = from_array(source), f"array of shape {source.shape}"
    elif isinstance(source, (str, Path)) and str(source).startswith(("http://", "https://")):
        image, name = open_image(io.BytesIO(fetch(str(source), timeout)), str(source)), str(source)
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise Gemma3nError(f"image file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
        image, name = open_image(path, str(path)), str(path)
    else:
        raise Gemma3nError(f"cannot read an image from a {type(source).__name__} (pass a path, URL, PIL image or array)")
    if image.width == 0 or image.height == 0:
        raise Gemma3nError(f"image {name} is empty ({image.width}x{image.height} pixels)")
    return to_rgb(ImageOps.exif_transpose(image))


def fetch(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Gemma3nError(f"cannot download image {url}: {reason}") from None


def open_image(file, name: str) -> Image.Image:
    """Open and fully decode, so that a truncated or corrupt file fails here, naming it."""
    try:
        image = Image.open(file)
        image.load()
    except UnidentifiedImageError:
        raise Gemma3nError(f"{name} is not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise Gemma3nError(f"cannot read image {name}: {exc}") from None
    return image


def from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise Gemma3nError(f"an image array must be (H, W) or (H, W, 1|3|4), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1):
            raise Gemma3nError(f"a float image array must hold values in [0, 1] (array of shape {array.shape})")
        array = np.round(np.nan_to_num(array) * 255)
    elif array.dtype != np.uint8:
        raise Gemma3nError(f"an image array must be uint8 or float, got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))


def to_rgb(image: Image.Image) -> Image.Image:
    """Transformers' `convert_to_rgb`: alpha or a transparent palette colour composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def resize_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's antialiased bilinear weights in fixed point: (first input index per output (out,),
    integer weights (out, taps), fractional bits)."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(np.ceil(support)) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.clip(np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - first, 0, taps)
    j = np.arange(taps)[None, :]
    weights = np.maximum(1.0 - np.abs(((j + first[:, None]) - center[:, None] + 0.5) * inv_scale), 0.0)
    weights[j >= count[:, None]] = 0.0
    total = np.zeros(out_size)
    for k in range(taps):  # in order, as torch sums them
        total = total + weights[:, k]
    weights = weights / total[:, None]
    bits = 0
    while bits < 22 and int(0.5 + weights.max() * (1 << (bits + 1))) < (1 << MAX_WEIGHT_BITS):
        bits += 1
    return first, np.floor(0.5 + weights * (1 << bits)).astype(np.int32), bits


def resample_axis(pixels: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    in_size = pixels.shape[axis]
    if in_size == out_size:
        return pixels
    first, weights, bits = resize_weights(in_size, out_size)
    shape = [1] * pixels.ndim
    shape[axis] = out_size
    total = np.int32(1 << (bits - 1))  # rounds the fixed-point sum
    for k in range(weights.shape[1]):
        taken = np.take(pixels, np.minimum(first + k, in_size - 1), axis=axis).astype(np.int32)
        total = total + taken * weights[:, k].reshape(shape)
    return np.clip(total >> bits, 0, 255).astype(np.uint8)


def resize_bilinear(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) uint8: torchvision's antialiased bilinear resize of uint8
    images (width pass first, each pass rounded to uint8)."""
    return resample_axis(resample_axis(pixels, width, 1), height, 0)


def preprocess_image(image, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anything `load_image` takes -> (size, size, 3) float32 pixel values in [0, 1], NHWC order
    (Transformers' pixel_values transposed from (3, H, W))."""
    pixels = resize_bilinear(np.asarray(load_image(image)), size, size)
    return pixels.astype(np.float32) * np.float32(RESCALE_FACTOR)
