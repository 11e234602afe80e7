"""The measurement every runner makes, the same for all runtimes.

A runner hands over `load(path)` and `stream(handle, ids, max_tokens)` (a generator yielding one item
per generated token, greedy, end-of-sequence ignored). Per process: load time; then, after a short
warm-up, for each prompt length a fresh generation from the same pseudo-random token ids: time to
first token and prefill tok/s (prompt tokens / time to first token); decode tok/s over the tokens after
the first, on the first prompt length only. Memory: MLX peak during generation (reset after load),
MLX peak including load, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

BOS = 2
# --equal-activations: the float dtype every runtime computes in (None: each runtime's own choice)
ACTIVATIONS = os.environ.get("BENCH_ACTIVATIONS") or None


def with_activations(model):
    """A peer's model with its float parameters (float layers, quantization scales and biases) cast to
    ACTIVATIONS, which its activations then follow (what `load(dtype=...)` does for ours)."""
    if ACTIVATIONS is None:
        return model
    import mlx.core as mx
    from mlx.utils import tree_map

    dtype = getattr(mx, ACTIVATIONS)
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
    mx.eval(model.parameters())
    return model


def prompt_ids(length: int) -> list[int]:
    """`length` ids: <bos> then ordinary-token ids (no special tokens), the same in every process."""
    rng = np.random.default_rng(length)
    return [BOS] + rng.integers(1000, 250000, length - 1).tolist()


def max_rss_bytes() -> int:
    """This process's peak resident set. Linux: VmHWM (ru_maxrss would carry the parent's peak across
    fork + exec); elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def timed(stream, handle, ids: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, seconds for the tokens after it, tokens generated)."""
    start = time.perf_counter()
    first = last = None
    count = 0
    for _ in stream(handle, ids, max_tokens):
        last = time.perf_counter()
        first = first or last
        count += 1
    return first - start, last - first, count


def measure_media(handle, stream, media, args, result: dict) -> None:
    """Image / audio figures: after a 16-token text warm-up (which also pages in lazily loaded weights),
    per kind: the encode alone (tower + embedder on preprocessed input, first call), then time to first
    token of a fresh one-turn chat prompt holding the media and a short text (preprocessing included).
    MLX peak per kind, reset before it."""
    import mlx.core as mx

    encoder, media_stream = media  # encoder -> a callable returning the soft tokens; media_stream
    # (handle, kind, source, max_tokens) -> a generator yielding, per new token, the prompt's length
    sources = {"image": args.image, "audio": args.audio}
    timed(stream, handle, prompt_ids(16), 2)
    for kind in args.media.split(","):
        mx.reset_peak_memory()
        encode = encoder(handle, kind, sources[kind])  # preprocessing here, untimed
        start = time.perf_counter()
        out = encode()
        mx.eval(out)
        result[f"{kind}_encode_s"] = time.perf_counter() - start
        result[f"{kind}_soft_tokens_finite"] = bool(mx.isfinite(out).all().item())
        result[f"{kind}_soft_tokens_shape"] = list(out.shape)
        start = time.perf_counter()
        tokens = next(iter(media_stream(handle, kind, sources[kind], 1)))
        result[f"{kind}_ttft_s"] = time.perf_counter() - start
        result[f"{kind}_prompt_tokens"] = tokens
        result[f"{kind}_mlx_peak_gb"] = mx.get_peak_memory() / 1e9
        del out


def run(load, stream, mlx: bool = True, media=None) -> None:
    """`media`: (encoder, media_stream) for `--media image,audio` runs (see `measure_media`)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", default="512", help="comma-separated prompt lengths")
    parser.add_argument("--decode", type=int, default=64, help="tokens generated after the first prompt")
    parser.add_argument("--warmup", type=int, default=16, help="warm-up prompt length (0: none)")
    parser.add_argument("--media", default="", help="image,audio: measure media instead of text prompts")
    parser.add_argument("--image", help="image file (--media)")
    parser.add_argument("--audio", help="16 kHz mono WAV file (--media)")
    args = parser.parse_args()
    if mlx:
        import mlx.core as mx

    start = time.perf_counter()
    handle = load(args.model)
    result = {"load_s": time.perf_counter() - start}
    if mlx:
        result["mlx_peak_with_load_gb"] = mx.get_peak_memory() / 1e9
        mx.reset_peak_memory()
    if args.media:
        measure_media(handle, stream, media, args, result)
        result["max_rss_gb"] = max_rss_bytes() / 1e9
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.warmup:
        timed(stream, handle, prompt_ids(args.warmup), 2)
    peak = 0.0
    for index, length in enumerate(int(n) for n in args.prompts.split(",")):
        ttft, rest, count = timed(stream, handle, prompt_ids(length), args.decode if index == 0 else 1)
        result[f"ttft_{length}_s"] = ttft
        result[f"prefill_{length}_tps"] = length / ttft
        if index == 0:
            result["decode_tps"] = (count - 1) / rest if count > 1 else None
            result["decode_tokens"] = count
            result["decode_context"] = length
        if mlx:
            peak = max(peak, mx.get_peak_memory() / 1e9)  # our runtime resets the peak per generation
    if mlx:
        result["mlx_peak_gb"] = peak
        result["mlx_peak_with_load_gb"] = max(result["mlx_peak_with_load_gb"], peak)
    result["max_rss_gb"] = max_rss_bytes() / 1e9
    print("RESULT " + json.dumps(result), flush=True)
