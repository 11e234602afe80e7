"""Load on the OpenAI-compatible server: aggregate decode tokens/s with 1, 4 and 8 concurrent streams,
and time to first token under that load.

    python -m benchmarks.server_load --shape small --tokens 64 [--streams 1 4 8]

Starts `python -m mlx_gemma3n.server` on a random checkpoint of the shape (benchmarks/checkpoints.py)
on a free 127.0.0.1 port. For each concurrency level, that many streaming chat requests (distinct
prompts of ~60 tokens, greedy, `max_tokens` = --tokens) start together; aggregate decode tokens/s is
the tokens after each stream's first, over the span from the first first-token to the last token.
A warm-up round runs first (the decode traces compile once per batch size).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from .checkpoints import ensure_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, deadline_s: float = 1800) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit("the server did not come up")


def one_stream(url: str, index: int, tokens: int) -> dict:
    """Times of one streaming request: start, first token, end, and its completion tokens."""
    body = {
        "model": "bench", "max_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Request {index}: " + "tell me a long story about the sea " * 8}],
    }
    start = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content") is not None and len(chunk["choices"][0]["delta"]) == 1:
                first = time.perf_counter()
    return {"start": start, "first": first or time.perf_counter(), "end": time.perf_counter(), "tokens": completion}


def round_of(url: str, streams: int, tokens: int, offset: int) -> dict:
    with ThreadPoolExecutor(streams) as pool:
        runs = list(pool.map(lambda i: one_stream(url, offset + i, tokens), range(streams)))
    span = max(r["end"] for r in runs) - min(r["first"] for r in runs)
    decoded = sum(r["tokens"] - 1 for r in runs)
    ttft = [r["first"] - r["start"] for r in runs]
    return {"streams": streams, "decode_tps": decoded / span, "ttft_mean": statistics.mean(ttft), "ttft_max": max(ttft)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    folder = ensure_checkpoint(args.shape)
    port = free_port()
    command = [sys.executable, "-m", "mlx_gemma3n.server", "--model", str(folder), "--model-id", "bench",
               "--port", str(port), "--max-batch", str(max(args.streams)), "--prefix-cache-bytes", "0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        for streams in args.streams:  # warm-up: compile each batch size once
            round_of(url, streams, 4, 10_000 + 100 * streams)
        results = [round_of(url, streams, args.tokens, 100 * streams) for streams in args.streams]
    finally:
        process.terminate()
        process.wait(timeout=60)
    base = results[0]["decode_tps"]
    print(f"server load on `{args.shape}`, {args.tokens} tokens per stream")
    print(f"{'streams':>7} {'decode tok/s':>13} {'vs first':>9} {'TTFT mean s':>12} {'TTFT max s':>11}")
    for r in results:
        print(f"{r['streams']:>7} {r['decode_tps']:>13.1f} {r['decode_tps'] / base:>8.2f}x {r['ttft_mean']:>12.3f} {r['ttft_max']:>11.3f}")


if __name__ == "__main__":
    main()
