"""Random Hugging Face-format Gemma 3n checkpoints (real E2B / E4B shapes, and `small`), built once
and cached under benchmarks/cache/.

No torch model is built (a real E2B in float32 torch needs ~20 GB): our model skeleton (lazy, nothing
allocated) gives the text decoder's names and shapes, mapped back to Hugging Face names, and each
tensor is generated directly in bfloat16 with MLX, shard by shard. Vision/audio tower weights are left
out of the text shapes; the media shape (`small-mm`) has them, in PyTorch layouts; the KV-shared layers carry k/v weights like Google's own checkpoints (mlx-lm
needs them; we and Transformers ignore them).

Values keep activations finite: 1-D biases N(0, 0.02), other 1-D scales (norms, AltUp's correct_output_scale) ~1 + N(0, 0.02),
AltUp coefficient matrices N(0, 0.01), everything else N(0, 0.02). A large tensor repeats a random
block of ~4M values along its first axis (generating billions of normals takes minutes on 2 cores;
for timing and memory only the shapes and dtypes matter).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma3n.architecture.config import ModelConfig
from mlx_gemma3n.architecture.model import Model

from .tokenizer import write_tokenizer

ROOT = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("BENCH_CACHE") or ROOT / "cache")
E2B = ROOT.parent / "tests" / "data" / "gemma-3n-E2B-it"
MAX_SHARD_BYTES = 4 << 30
BLOCK_VALUES = 1 << 22


def layer_types(layers: int) -> list[str]:
    """Gemma 3n's pattern: four sliding-window layers, then one full-attention layer."""
    return ["full_attention" if i % 5 == 4 else "sliding_attention" for i in range(layers)]


def e4b_text(text: dict) -> dict:
    """Transformers' Gemma3nTextConfig() defaults (the real E4B): 35 layers, FFN 16384, 15 KV-shared."""
    layers = 35
    return dict(
        text,
        num_hidden_layers=layers,
        intermediate_size=[16384] * layers,
        num_kv_shared_layers=15,
        layer_types=layer_types(layers),
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * (layers - 10),
    )


def tiny_text(text: dict) -> dict:
    """A CI-sized shape (~0.1 GB): 10 layers (the last 4 KV-shared, 2 sparse), hidden 64, FFN 256, PLE
    16 per layer; the real vocabularies, which the benchmark's tokenizer and prompt ids need."""
    layers = 10
    return dict(
        text,
        hidden_size=64,
        intermediate_size=[256] * layers,
        num_hidden_layers=layers,
        num_kv_shared_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        hidden_size_per_layer_input=16,
        laurel_rank=16,
        layer_types=layer_types(layers),
        activation_sparsity_pattern=[0.95] * 2 + [0.0] * (layers - 2),
    )


def small_text(text: dict) -> dict:
    """The E2B layer structure and vocabularies (PLE 262144 x 30 x 256) at reduced width."""
    return dict(
        text,
        hidden_size=256,
        intermediate_size=[1024] * text["num_hidden_layers"],
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
    )


SHAPES = {"tiny": tiny_text, "small": small_text, "e2b": lambda text: text, "e4b": e4b_text}
# Media checkpoints: a text shape plus vision / audio tower weights (image and audio benchmarks).
# `small-mm`: `small`'s text decoder, the real MobileNet v5 vision tower, the real audio tower with
# AUDIO_LAYERS of its 12 conformer layers (the shapes every runtime accepts: mlx-vlm's vision tower
# has its channel widths hard-coded, so the vision tower stays real and the image is made smaller).
MEDIA = {"small-mm": "small"}
AUDIO_LAYERS = 2
IMAGE_SIZE = 256  # the real 768 / 3 (the smallest size whose stage-3 map still covers MSFA's 16 x 16)
TOWERS = ("vision_tower.", "audio_tower.")


def hf_config(shape: str) -> dict:
    config = json.loads((E2B / "config.json").read_text())
    config["text_config"] = SHAPES[MEDIA.get(shape, shape)](config["text_config"])
    if shape in MEDIA:
        config["audio_config"]["conf_num_hidden_layers"] = AUDIO_LAYERS
    for part in (config, config["text_config"], config["vision_config"], config["audio_config"]):
        part["dtype"] = "bfloat16"
    return config


def pytorch_layout(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our (MLX) tower parameter shape -> the Hugging Face (PyTorch) one: Conv2d (O, kH, kW, I) ->
    (O, I, kH, kW), the audio depthwise Conv1d (C, K, 1) -> (C, 1, K) (see the towers' `sanitize`)."""
    if len(shape) == 4:
        return (shape[0], shape[3], shape[1], shape[2])
    if len(shape) == 3 and name.endswith("depthwise_conv1d.weight"):
        return (shape[0], shape[2], shape[1])
    return shape


def hf_tensor_shapes(config: dict, towers: bool = False) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every text-benchmark tensor (and the towers' with `towers`)."""
    ours = tree_flatten(Model(ModelConfig.from_dict(config)).parameters())
    prefixes = ("language_model.", "embed_vision.", "embed_audio.") + (TOWERS if towers else ())
    shapes = {
        f"model.{name}": pytorch_layout(name, tuple(value.shape)) if name.startswith(TOWERS) else tuple(value.shape)
        for name, value in ours
        if name.startswith(prefixes)
    }
    text = config["text_config"]
    attention = "model.language_model.layers.{}.self_attn.{}.weight"
    for layer in range(text["num_hidden_layers"] - text["num_kv_shared_layers"], text["num_hidden_layers"]):
        for part in ("k_proj", "v_proj", "k_norm"):
            shapes.setdefault(attention.format(layer, part), shapes[attention.format(0, part)])
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], key: mx.array) -> mx.array:
    if len(shape) == 1 and name.endswith(".bias"):
        return 0.02 * mx.random.normal(shape, key=key)
    if len(shape) == 1:
        return 1.0 + 0.02 * mx.random.normal(shape, key=key)
    std = 0.01 if "altup" in name and "coefs" in name else 0.02
    block_rows = max(1, min(shape[0], BLOCK_VALUES // math.prod(shape[1:])))
    block = std * mx.random.normal((block_rows, *shape[1:]), dtype=mx.bfloat16, key=key)
    repeats = -(-shape[0] // block_rows)
    return mx.tile(block, (repeats,) + (1,) * (len(shape) - 1))[: shape[0]]


def shard_plan(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_weights(folder: Path, config: dict, towers: bool = False) -> None:
    shapes = hf_tensor_shapes(config, towers)
    shards = shard_plan(shapes)
    weight_map, total = {}, 0
    key = mx.random.key(0)
    for index, names in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            key, sub = mx.random.split(key)
            tensors[name] = random_tensor(name, shapes[name], sub).astype(mx.bfloat16)
            mx.eval(tensors[name])
            total += tensors[name].nbytes
            weight_map[name] = file
        mx.save_safetensors(str(folder / file), tensors, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def ensure_media() -> dict[str, Path]:
    """The benchmark's media, generated once into cache/media/: a 640 x 480 RGB PNG (smooth colour
    gradients plus noise) and a 10 s 16 kHz mono 16-bit WAV (a chirp plus noise)."""
    import wave

    import numpy as np
    from PIL import Image

    folder = CACHE / "media"
    files = {"image": folder / "image-640x480.png", "audio": folder / "audio-10s-16k.wav"}
    if all(f.is_file() for f in files.values()):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640] / np.array([480.0, 640.0])[:, None, None]
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(8 * (x + y))], -1) * 200 + rng.integers(0, 56, (480, 640, 3))
    Image.fromarray(rgb.astype(np.uint8)).save(files["image"])
    t = np.arange(10 * 16000) / 16000
    signal = 0.3 * np.sin(2 * np.pi * (200 + 150 * t) * t) + 0.05 * rng.standard_normal(t.size)
    with wave.open(str(files["audio"]), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())
    return files


def write_processor_config(folder: Path) -> None:
    """Gemma3nProcessor's configs (Google's values, images resized to IMAGE_SIZE): what mlx-vlm's and
    Transformers' AutoProcessor load, and our processor too."""
    image = dict(image_processor_type="SiglipImageProcessor", size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                 resample=2, do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=False,
                 image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=None, image_seq_length=256)
    audio = dict(feature_extractor_type="Gemma3nAudioFeatureExtractor", feature_size=128, sampling_rate=16000,
                 padding_value=0.0, return_attention_mask=True, frame_length=512, hop_length=160,
                 min_frequency=125.0, max_frequency=7600.0, preemphasis=0.97, preemphasis_htk_flavor=True,
                 fft_overdrive=True, dither=0.0, input_scale_factor=1.0, mel_floor=1e-05, per_bin_mean=None,
                 per_bin_stddev=None, fft_length=1024, padding_side="right")
    config = dict(image, **audio, processor_class="Gemma3nProcessor")
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    processor = dict(processor_class="Gemma3nProcessor", image_seq_length=256, audio_seq_length=188)
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))


def ensure_checkpoint(shape: str) -> Path:
    """The cached random checkpoint of `shape` (built on first use, atomically)."""
    folder = CACHE / f"hf-{shape}"
    if (folder / "config.json").is_file():
        return folder
    tmp = CACHE / f".hf-{shape}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = hf_config(shape)
    write_weights(tmp, config, towers=shape in MEDIA)
    write_tokenizer(tmp)
    if shape in MEDIA:
        write_processor_config(tmp)
    for name in ("chat_template.jinja", "generation_config.json"):
        shutil.copyfile(E2B / name, tmp / name)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))  # last: marks the folder complete
    tmp.rename(folder)
    return folder
