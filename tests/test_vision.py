"""Vision side: the MobileNet v5 tower against timm / Transformers (tiny random towers), and image loading and
preprocessing against Transformers' Gemma 3n image processor."""

from __future__ import annotations

import functools
import http.server
import io
import json
import math
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import relative_error
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from PIL import Image
from reference import reference_image_processor

from mlx_gemma3n.architecture.config import EmbedderConfig
from mlx_gemma3n.architecture.multimodal import MultimodalEmbedder
from mlx_gemma3n.architecture.vision import VisionTower
from mlx_gemma3n.errors import Gemma3nError
from mlx_gemma3n.inputs.image import GEMMA3N_IMAGE, load_image, preprocess_image

REAL = Path(__file__).parent / "data" / "gemma-3n-E2B-it"
POINTS = ["stem", "stage0", "stage1", "stage2", "stage3", "msfa"]
BAR = 1e-4


def strip(weights: dict, prefix: str) -> dict:
    return {name[len(prefix) :]: w for name, w in weights.items() if name.startswith(prefix)}


@pytest.fixture(scope="module")
def tiny(tiny_ckpt_a):
    """(our tower, our vision embedder, the torch model), all from the tiny checkpoint's files."""
    config = json.loads((tiny_ckpt_a.path / "config.json").read_text())
    weights = mx.load(str(tiny_ckpt_a.path / "model.safetensors"))
    tower = VisionTower(config["vision_config"])
    tower.load_weights(list(VisionTower.sanitize(strip(weights, "model.vision_tower.")).items()), strict=True)
    embedder = MultimodalEmbedder(EmbedderConfig.from_dict(config["vision_config"], 0), config["text_config"]["hidden_size"])
    embedder.load_weights(list(strip(weights, "model.embed_vision.").items()), strict=True)
    return tower, embedder, tiny_ckpt_a.model


def reference_tower(model, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """timm's values at our capture points (NHWC) and Transformers' image features, for NHWC pixels."""
    import torch

    timm_model = model.model.vision_tower.timm_model
    modules = {"stem": timm_model.conv_stem, "msfa": timm_model.msfa}
    modules.update({f"stage{i}": stage for i, stage in enumerate(timm_model.blocks)})
    values = {}

    def keep(name):
        # a copy: get_image_features scales the MSFA output in place
        return lambda module, args, out: values.__setitem__(name, out.permute(0, 2, 3, 1).numpy().copy())

    hooks = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            nchw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
            values["embeds"] = model.model.get_image_features(nchw).pooler_output.numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return values


def picture(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: both the anti-aliasing and the rounding matter."""
    y, x = np.mgrid[0:height, 0:width]
    smooth = [(x * 255 / max(width - 1, 1)), (y * 255 / max(height - 1, 1)), (x + y) % 256, (x * y) % 256]
    noise = np.random.default_rng(seed).normal(0, 25, (height, width, channels))
    return np.clip(np.stack(smooth[:channels], -1) + noise, 0, 255).astype(np.uint8)


def check_tower(tiny, pixels: np.ndarray) -> dict[str, float]:
    tower, embedder, model = tiny
    reference = reference_tower(model, pixels)
    capture = {}
    embeds = embedder.embed_soft(tower(mx.array(pixels), capture))
    errors = {point: relative_error(capture[point], reference[point]) for point in POINTS}
    errors["embeds"] = relative_error(embeds, reference["embeds"])
    assert max(errors.values()) <= BAR, errors
    return errors


def test_tower_parity_256_batch(tiny):
    pixels = np.random.default_rng(0).random((2, 256, 256, 3), dtype=np.float32)
    print(check_tower(tiny, pixels))


def test_tower_parity_768(tiny):
    pixels = preprocess_image(picture(300, 400, seed=1))[None]
    start = time.perf_counter()
    errors = check_tower(tiny, pixels)
    print(errors, f"{time.perf_counter() - start:.1f}s")


def test_soft_tokens_layout(tiny):
    """(B, 256, 2048): the 16 x 16 map in row-major order, times sqrt(2048)."""
    tower = tiny[0]
    capture = {}
    tokens = tower(mx.array(np.random.default_rng(2).random((1, 256, 256, 3), dtype=np.float32)), capture)
    assert tokens.shape == (1, 256, 2048)
    np.testing.assert_allclose(
        np.asarray(tokens)[0, 17], np.asarray(capture["msfa"])[0, 1, 1] * math.sqrt(2048), rtol=1e-6
    )


def test_sanitize_keeps_mlx_layout(tiny_ckpt_a):
    raw = strip(mx.load(str(tiny_ckpt_a.path / "model.safetensors")), "model.vision_tower.")
    converted = VisionTower.sanitize(raw)
    stem = "timm_model.conv_stem.conv.weight"  # (64, 3, 3, 3) either way: must follow the other convs
    assert np.array_equal(converted[stem], np.asarray(raw[stem]).transpose(0, 2, 3, 1))
    again = VisionTower.sanitize(converted)
    assert all(np.array_equal(again[name], converted[name]) for name in converted)


def test_float16_weights_stay_finite(tiny):
    tower = tiny[0]
    pixels = mx.array(np.random.default_rng(3).random((1, 256, 256, 3), dtype=np.float32))
    reference = tower(pixels)
    half = VisionTower({"model_args": {"channel_multiplier": 0.05}})
    half.update(tree_map(lambda w: w.astype(mx.float16), tower.parameters()))
    tokens = half(pixels)
    assert tokens.dtype == mx.float32 and bool(mx.isfinite(tokens).all())
    assert relative_error(tokens, reference) < 1e-2


def test_tower_rejects_bad_configs_and_sizes(tiny):
    with pytest.raises(Gemma3nError, match="mobilenetv5_base"):
        VisionTower({"architecture": "mobilenetv5_base"})
    with pytest.raises(Gemma3nError, match="depth_multiplier"):
        VisionTower({"model_args": {"depth_multiplier": 0.5}})
    with pytest.raises(Gemma3nError, match="multiples of 256"):
        tiny[0](mx.zeros((1, 200, 200, 3)))


def real_tower() -> VisionTower:
    return VisionTower(json.loads((REAL / "config.json").read_text())["vision_config"])


def test_real_config_parameter_names():
    """Every model.vision_tower.* name of the real E2B index, and no other (shapes stay lazy)."""
    index = json.loads((REAL / "model.safetensors.index.json").read_text())["weight_map"]
    expected = set(strip(index, "model.vision_tower."))
    assert len(expected) == 548
    assert {name for name, _ in tree_flatten(real_tower().parameters())} == expected


@pytest.mark.slow
def test_real_tower_runs_768():
    tower = real_tower()

    def random(path, w):
        if path.endswith("gamma"):
            return mx.full(w.shape, 0.1)
        if w.ndim == 1:
            return 1 + 0.1 * mx.random.normal(w.shape)
        return mx.random.normal(w.shape) / math.sqrt(w[0].size)

    mx.random.seed(0)
    tower.update(tree_map_with_path(random, tower.parameters()))
    tokens = tower(mx.random.uniform(shape=(1, GEMMA3N_IMAGE.height, GEMMA3N_IMAGE.width, 3)))
    assert tokens.shape == (1, 256, 2048) and bool(mx.isfinite(tokens).all())


# --- images ---


@pytest.fixture(scope="module")
def hf_processor():
    return reference_image_processor()


def reference_pixels(processor, image) -> np.ndarray:
    return processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def assert_pixel_parity(processor, ours_from, reference_from):
    ours = preprocess_image(ours_from)
    assert ours.shape == (GEMMA3N_IMAGE.height, GEMMA3N_IMAGE.width, 3) and ours.dtype == np.float32
    assert np.abs(ours - reference_pixels(processor, reference_from)).max() <= 1e-6


@pytest.mark.parametrize(
    "mode, height, width",
    [
        ("RGB", 480, 640),
        ("RGB", 768, 768),
        ("RGB", 2000, 300),
        ("RGB", 37, 1200),
        ("RGB", 1, 1),
        ("L", 300, 200),
        ("RGBA", 123, 457),
        ("LA", 400, 400),
        ("P", 200, 300),
        ("CMYK", 1024, 1000),
        ("I;16", 64, 96),
    ],
)
def test_preprocess_matches_transformers(hf_processor, mode, height, width):
    image = Image.fromarray(picture(height, width, 4 if mode in ("RGBA", "LA") else 3))
    image = image.convert(mode)
    assert_pixel_parity(hf_processor, image, image)


def test_palette_transparency_composited_on_white(hf_processor):
    image = Image.fromarray(picture(90, 120)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    image.info["transparency"] = 2
    assert_pixel_parity(hf_processor, image, image)
    assert np.asarray(load_image(image))[np.asarray(image) == 2].min() == 255


def test_exif_orientation_applied(hf_processor, tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    raw = Image.fromarray(picture(300, 500))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.png"
    raw.save(path, exif=exif)
    assert load_image(path).size == (300, 500)
    assert_pixel_parity(hf_processor, path, hf_load_image(str(path)))


def test_jpeg_file_and_arrays(hf_processor, tmp_path):
    pixels = picture(333, 444)
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    assert_pixel_parity(hf_processor, str(path), Image.open(path))
    assert_pixel_parity(hf_processor, pixels, Image.fromarray(pixels))
    np.testing.assert_array_equal(preprocess_image(pixels.astype(np.float32) / 255), preprocess_image(pixels))
    np.testing.assert_array_equal(preprocess_image(pixels[..., :1]), preprocess_image(Image.fromarray(pixels[..., 0])))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_folder(tmp_path):
    """(folder, base URL) of a throw-away local HTTP server."""
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_url(http_folder):
    folder, base = http_folder
    Image.fromarray(picture(100, 80)).save(folder / "small.png")
    np.testing.assert_array_equal(preprocess_image(f"{base}/small.png"), preprocess_image(folder / "small.png"))


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture(64, 64)).save(buffer, "PNG")
    return buffer.getvalue()[:2000]


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("missing.png", None, "does not exist"),
        ("folder", "folder", "is a folder"),
        ("notes.png", b"just some text", "not an image file"),
        ("empty.jpg", b"", "not an image file"),
        ("cut.png", truncated_png(), "truncated"),
    ],
)
def test_bad_files(tmp_path, name, make, message):
    path = tmp_path / name
    if make == "folder":
        path.mkdir()
    elif make is not None:
        path.write_bytes(make)
    with pytest.raises(Gemma3nError, match=message) as error:
        preprocess_image(path)
    assert str(path) in str(error.value)


def test_bad_urls(http_folder):
    _, base = http_folder
    for url in (f"{base}/nothing-here.png", "http://127.0.0.1:9/x.png"):
        with pytest.raises(Gemma3nError, match="cannot download") as error:
            load_image(url, timeout=5)
        assert url in str(error.value)


@pytest.mark.parametrize(
    "source, message",
    [
        (Image.new("RGB", (0, 0)), r"PIL image \(RGB 0x0\) is empty"),
        (np.zeros((0, 5, 3), np.uint8), r"array of shape \(0, 5, 3\) is empty"),
        (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\)"),
        (np.full((4, 4, 3), 2.0), r"\[0, 1\]"),
        (12, "int"),
    ],
)
def test_bad_in_memory_images(source, message):
    with pytest.raises(Gemma3nError, match=message):
        load_image(source)
