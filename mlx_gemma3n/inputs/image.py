"""Images -> the vision tower's pixel values, as Transformers' Gemma 3n image processor makes them.

Gemma 3n's preprocessor_config.json (a SiglipImageProcessor; the values Google publishes with the model,
the defaults of `ImageSettings`): convert to RGB, resize to 768 x 768 (resample 2 = bilinear,
antialiased), rescale by 1/255, no normalisation (do_normalize is false, so its mean/std of 0.5 are unused).
A checkpoint's own values are read by `preprocessor_config`.

Transformers resizes with torchvision by default, on uint8 pixels in fixed point (int16 weights, like
Pillow-SIMD); Pillow's own resize keeps more weight bits and lands one level off on many pixels, so
`resize` reproduces the torchvision arithmetic in numpy: antialiased bilinear, bicubic and Lanczos-3
filters, and nearest-exact for resample 0. Only numpy and Pillow are used here.
"""

from __future__ import annotations

import io
import math
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import Gemma3nError

URL_TIMEOUT = 30.0
MAX_WEIGHT_BITS = 15  # torch's int16 resampling weights
NEAREST, LANCZOS, BILINEAR, BICUBIC = 0, 1, 2, 3  # Pillow's resample codes, as preprocessor configs give them


@dataclass(frozen=True)
class ImageSettings:
    """The image processor's settings (SiglipImageProcessor, torchvision backend)."""

    height: int = 768
    width: int = 768
    resample: int = BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True


GEMMA3N_IMAGE = ImageSettings()


def load_image(source, timeout: float = URL_TIMEOUT, convert_rgb: bool = True) -> Image.Image:
    """An upright RGB image from a file path, an http(s) URL, a PIL image or a numpy array.

    Arrays are (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), uint8 or float in [0, 1]. The EXIF orientation
    is applied. Transparency is composited onto white, as the Transformers processor's RGB conversion does
    (Transformers' `load_image` helper drops the alpha channel instead). `convert_rgb=False` (an image
    processor's do_convert_rgb false) takes RGB images only: the vision tower needs three channels.
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
    image = ImageOps.exif_transpose(image)
    if convert_rgb:
        return to_rgb(image)
    if image.mode != "RGB":
        raise Gemma3nError(f"image {name} is {image.mode}, not RGB, and the checkpoint's image processor sets do_convert_rgb false")
    return image


def fetch(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Gemma3nError(f"cannot download image {url}: {reason}") from None


def open_image(file, name: str, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode, so that a truncated or corrupt file fails here, naming it. An image over
    `max_pixels` is refused from its header, before any pixel is decoded (a small compressed file can
    hold billions of pixels)."""
    try:
        image = Image.open(file)
        too_large = max_pixels is not None and image.width * image.height > max_pixels
        if not too_large:
            image.load()
    except UnidentifiedImageError:
        raise Gemma3nError(f"{name} is not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise Gemma3nError(f"cannot read image {name}: {exc}") from None
    if too_large:
        raise Gemma3nError(f"{name} is {image.width} x {image.height} pixels, over the limit of {max_pixels}")
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


def bilinear_filter(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


def bicubic_filter(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (torch's and Pillow's)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def lanczos_filter(x: np.ndarray, lobes: float = 3.0) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < lobes, np.sinc(x) * np.sinc(x / lobes), 0.0)


# resample code -> (filter, half its support at scale 1), as torch's antialiased resampling defines them
FILTERS = {BILINEAR: (bilinear_filter, 1.0), BICUBIC: (bicubic_filter, 2.0), LANCZOS: (lanczos_filter, 3.0)}
RESAMPLE_MODES = {NEAREST: "nearest", LANCZOS: "lanczos", BILINEAR: "bilinear", BICUBIC: "bicubic"}


def resize_weights(in_size: int, out_size: int, resample: int = BILINEAR) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's antialiased weights of a filter in fixed point: (first input index per output (out,),
    integer weights (out, taps), fractional bits)."""
    kernel, half_support = FILTERS[resample]
    scale = in_size / out_size
    support = half_support * scale if scale >= 1.0 else half_support
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.clip(np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - first, 0, taps)
    j = np.arange(taps)[None, :]
    weights = kernel(((j + first[:, None]) - center[:, None] + 0.5) * inv_scale)
    weights[j >= count[:, None]] = 0.0
    total = np.zeros(out_size)
    for k in range(taps):  # in order, as torch sums them
        total = total + weights[:, k]
    weights = weights / total[:, None]
    bits = 0
    while bits < 22 and int(0.5 + weights.max() * (1 << (bits + 1))) < (1 << MAX_WEIGHT_BITS):
        bits += 1
    scaled = weights * (1 << bits)
    rounded = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5))  # half away from zero
    return first, rounded.astype(np.int32), bits


def resample_axis(pixels: np.ndarray, out_size: int, axis: int, resample: int = BILINEAR) -> np.ndarray:
    in_size = pixels.shape[axis]
    if in_size == out_size:
        return pixels
    if resample == NEAREST:
        # nearest-exact: source index floor((i + 0.5) * in / out), the scale in float32 as torch has it
        scale = np.float32(in_size) / np.float32(out_size)
        source = np.floor((np.arange(out_size) + 0.5).astype(np.float32) * scale).astype(np.int64)
        return np.take(pixels, np.minimum(source, in_size - 1), axis=axis)
    first, weights, bits = resize_weights(in_size, out_size, resample)
    shape = [1] * pixels.ndim
    shape[axis] = out_size
    total = np.int32(1 << (bits - 1))  # rounds the fixed-point sum
    for k in range(weights.shape[1]):
        taken = np.take(pixels, np.minimum(first + k, in_size - 1), axis=axis).astype(np.int32)
        total = total + taken * weights[:, k].reshape(shape)
    return np.clip(total >> bits, 0, 255).astype(np.uint8)


def resize(pixels: np.ndarray, height: int, width: int, resample: int = BILINEAR) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) uint8: torchvision's resize of uint8 images on the CPU
    (antialiased, width pass first, each pass rounded and clamped to uint8)."""
    return resample_axis(resample_axis(pixels, width, 1, resample), height, 0, resample)


def rescale_and_normalize(pixels: np.ndarray, settings: ImageSettings) -> np.ndarray:
    """uint8 pixels -> float32 values, in Transformers' torchvision arithmetic: rescaling and
    normalising together divide by std / rescale_factor after subtracting mean / rescale_factor."""
    values = pixels.astype(np.float32)
    if settings.do_normalize:
        mean, std = np.float32(settings.image_mean), np.float32(settings.image_std)
        if settings.do_rescale:
            inverse = np.float32(1.0 / settings.rescale_factor)
            mean, std = mean * inverse, std * inverse
        return (values - mean) / std
    if settings.do_rescale:
        return values * np.float32(settings.rescale_factor)
    return values


def preprocess_image(image, settings: ImageSettings = GEMMA3N_IMAGE) -> np.ndarray:
    """Anything `load_image` takes -> (height, width, 3) float32 pixel values (in [0, 1] with the
    defaults), NHWC order (Transformers' pixel_values transposed from (3, H, W))."""
    pixels = np.asarray(load_image(image, convert_rgb=settings.do_convert_rgb))
    return rescale_and_normalize(resize(pixels, settings.height, settings.width, settings.resample), settings)
