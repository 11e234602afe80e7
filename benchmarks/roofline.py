"""Decode's bandwidth roofline: weight bytes a decoded token reads, and the machine's memory bandwidth.

Bytes per token come from the model folder's safetensors headers (exact, quantization scales
included): every text weight is read once per token, except the PLE table (one row per token) and the
k/v weights of KV-shared layers (never used); the token embedding is read whole (it is the tied LM
head). Vision/audio weights are not read by text decode.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from pathlib import Path

import mlx.core as mx

BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4, "U8": 1, "I32": 4}
SHARED_KV = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm)\.")
NOT_READ = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")


def header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def weight_bytes_per_token(folder: Path) -> int:
    text = json.loads((folder / "config.json").read_text())["text_config"]
    first_shared = text["num_hidden_layers"] - text["num_kv_shared_layers"]
    total = 0
    for file in folder.glob("*.safetensors"):
        for name, info in header(file).items():
            if name == "__metadata__" or any(part in name for part in NOT_READ):
                continue
            shared = SHARED_KV.search(name)
            if shared and int(shared.group(1)) >= first_shared:
                continue
            nbytes = BYTES[info["dtype"]] * math.prod(info["shape"])
            total += nbytes // info["shape"][0] if "embed_tokens_per_layer" in name else nbytes
    return total


def bandwidth_parts() -> int:
    """Copies run in parallel: one per core on the CPU (a stream runs on one core there), one on a GPU."""
    return (os.cpu_count() or 1) if mx.default_device().type == mx.DeviceType.cpu else 1


def bandwidth_gbps(megabytes: int = 1024, repeats: int = 5) -> float:
    """Best of `repeats` copies (read + write) of a float32 array on MLX's default device, split into
    `bandwidth_parts()` slices, each on its own stream."""
    a = mx.ones((megabytes << 18,), dtype=mx.float32)
    mx.eval(a)
    parts = bandwidth_parts()
    bounds = [a.size * i // parts for i in range(parts + 1)]
    slices = [a[start:stop] for start, stop in zip(bounds, bounds[1:])]
    streams = [mx.new_stream(mx.default_device()) for _ in slices]
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval([mx.add(part, 1, stream=stream) for part, stream in zip(slices, streams)])
        best = min(best, time.perf_counter() - start)
    return 2 * a.nbytes / best / 1e9
