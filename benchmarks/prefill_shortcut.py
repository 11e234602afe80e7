"""Prefill with and without the KV-shared-layer shortcut, on random weights of a Gemma 3n shape.

    python benchmarks/prefill_shortcut.py --shape small --prompt-tokens 512 --runs 3

`e2b` is the real E2B shape (30 layers, 10 KV-shared, hidden 2048, FFN 8192); `small` keeps its
layer structure, vocabularies and PLE table at reduced width, for timing on a CPU. Both variants
produce the last position's logits through a KV cache (what generation needs) and run interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx

from mlx_gemma3n.architecture.config import load_config
from mlx_gemma3n.architecture.model import Model

E2B_CONFIG = Path(__file__).resolve().parent.parent / "tests" / "data" / "gemma-3n-E2B-it"
SMALL = dict(hidden_size=256, intermediate_size=[1024] * 30, num_attention_heads=8, num_key_value_heads=2, head_dim=32)


def build(shape: str, dtype) -> Model:
    config = load_config(E2B_CONFIG)
    if shape == "small":
        for key, value in SMALL.items():
            setattr(config.text, key, value)
    model = Model(config)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def prefill_seconds(model: Model, ids: mx.array, shortcut: bool) -> float:
    start = time.perf_counter()
    logits = model(ids, cache=model.make_cache(), last_token_only=True, prefill_shortcut=shortcut)
    mx.eval(logits)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=["small", "e2b"], default="small")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    model = build(args.shape, getattr(mx, args.dtype))
    ids = mx.random.randint(0, 262144, (1, args.prompt_tokens))
    prefill_seconds(model, ids[:, :16], True)  # warm-up
    times = {True: [], False: []}
    for _ in range(args.runs):
        for shortcut in (False, True):
            times[shortcut].append(prefill_seconds(model, ids, shortcut))
    tps = {k: [args.prompt_tokens / t for t in v] for k, v in times.items()}
    print(f"shape={args.shape} dtype={args.dtype} prompt={args.prompt_tokens} runs={args.runs} device={mx.default_device()}")
    for shortcut, label in ((False, "all layers on every position"), (True, "prefill shortcut")):
        v = tps[shortcut]
        print(f"  {label:30s} {statistics.median(v):8.1f} tok/s (min {min(v):.1f}, max {max(v):.1f})")
    print(f"  speed-up (median): {statistics.median(tps[True]) / statistics.median(tps[False]):.2f}x")


if __name__ == "__main__":
    main()
