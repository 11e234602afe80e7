"""Load on OpenAI-compatible servers: aggregate decode tokens/s with 1, 4 and 8 concurrent streams,
and time to first token under that load, for ours, mlx-lm's and mlx-vlm's servers.

    python -m benchmarks.server_load --shape small --tokens 64 [--streams 1 4 8] [--servers ours mlx-lm mlx-vlm]

Each server runs on a free 127.0.0.1 port, on a random checkpoint of the shape
(benchmarks/checkpoints.py) in the folder its runtime loads (benchmarks/runtimes.py: mlx-lm its own
bf16 conversion, mlx-vlm the checkpoint with towers), bf16, batching as wide as the most streams.
For each concurrency level, that many streaming chat requests (prompts of ~60 tokens, distinct after
the chat template's first tokens, so no server's prompt cache can serve one from another; greedy,
`max_tokens` = --tokens) start together. Aggregate decode tokens/s is the tokens after each stream's
first, over the span from the first first-token to the last token (prefills that run inside it count
against it); "all decoding" is the token rate while every stream decodes (from the last first-token
to the first end), the batched step's own rate. A warm-up round runs first (decode traces compile
once per batch size). A server that fails is recorded with its error.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

from .checkpoints import MEDIA, ensure_checkpoint
from .runtimes import REPO, RUNTIMES, environment, model_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, log: Path, deadline_s: float = 1800) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"exited: {last_line(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise ServerFailed(f"did not come up within {deadline_s:.0f} s")


class ServerFailed(Exception):
    pass


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


@dataclass(frozen=True)
class Server:
    """How to start a runtime's server on `folder` and what its requests name as `model`."""

    runtime: str
    command: Callable[[Path, int, int], list[str]]  # (folder, port, batch) -> argv
    model_field: Callable[[Path], str]


SERVERS = {
    "ours": Server("ours", lambda folder, port, batch: [
        sys.executable, "-m", "mlx_gemma3n.server", "--model", str(folder), "--model-id", "bench",
        "--port", str(port), "--max-batch", str(batch), "--prefix-cache-bytes", "0"], lambda folder: "bench"),
    "mlx-lm": Server("mlx-lm", lambda folder, port, batch: [
        sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--port", str(port),
        "--decode-concurrency", str(batch), "--prompt-concurrency", str(batch)], lambda folder: "default_model"),
    "mlx-vlm": Server("mlx-vlm", lambda folder, port, batch: [
        sys.executable, "-m", "mlx_vlm.server", "--model", str(folder), "--host", "127.0.0.1", "--port", str(port),
        "--max-num-seqs", str(batch)], str),
}


def prompt_text(index: int, words: int = 56) -> str:
    """Words of the benchmark tokenizer's vocabulary (`t<id>`, one token each; any other word is one
    and the same <unk>), a different sequence for each index."""
    return " ".join(f"t{1000 + (7919 * index + 31 * i) % 200_000}" for i in range(words))


def one_stream(url: str, model: str, index: int, tokens: int) -> dict:
    """Times of one streaming request: start, each content chunk, end, and its completion tokens (the
    usage chunk's count, or the content chunks where a server sends no usage)."""
    body = {
        "model": model, "max_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": prompt_text(index)}],
    }
    start = time.perf_counter()
    usage = None
    chunks = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as response:
        if response.status_code != 200:
            raise ServerFailed(f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                chunks.append(time.perf_counter())
    end = time.perf_counter()
    return {"start": start, "first": chunks[0] if chunks else end, "chunks": chunks, "end": end, "tokens": usage or len(chunks)}


def round_of(url: str, model: str, streams: int, tokens: int, offset: int) -> dict:
    with ThreadPoolExecutor(streams) as pool:
        runs = list(pool.map(lambda i: one_stream(url, model, offset + i, tokens), range(streams)))
    span = max(r["end"] for r in runs) - min(r["first"] for r in runs)
    decoded = sum(r["tokens"] - 1 for r in runs)
    ttft = [r["first"] - r["start"] for r in runs]
    return {"streams": streams, "decode_tps": decoded / span, "all_decoding_tps": all_decoding_rate(runs),
            "ttft_mean": statistics.mean(ttft), "ttft_max": max(ttft)}


def all_decoding_rate(runs: list[dict]) -> float:
    """Content chunks per second across streams while every stream has begun and none has ended."""
    begin, stop = max(r["first"] for r in runs), min(r["chunks"][-1] for r in runs if r["chunks"])
    if stop <= begin:
        return float("nan")
    return sum(begin < t <= stop for r in runs for t in r["chunks"]) / (stop - begin)


def folder_for(runtime: str, shape: str) -> Path:
    if RUNTIMES[runtime].needs_towers and f"{shape}-mm" not in MEDIA:
        raise ServerFailed(f"loads only checkpoints with towers, which exist for {', '.join(set(MEDIA.values()))}")
    return model_dir(RUNTIMES[runtime], shape, "bf16", ensure_checkpoint(shape))


def measure(server: Server, shape: str, streams: list[int], tokens: int, logs: Path) -> list[dict]:
    """One server's rows, one per concurrency level; raises ServerFailed with the reason."""
    folder = folder_for(server.runtime, shape)
    port = free_port()
    log = logs / f"{server.runtime}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(server.command(folder, port, max(streams)), stdout=sink, stderr=subprocess.STDOUT,
                                   env=environment(), cwd=REPO)
    url, model = f"http://127.0.0.1:{port}", server.model_field(folder)
    try:
        wait_ready(url, process, log)
        for count in streams:  # warm-up: compile each batch size once
            round_of(url, model, count, 4, 10_000 + 100 * count)
        return [round_of(url, model, count, tokens, 100 * count) for count in streams]
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        raise ServerFailed(f"{type(exc).__name__}: {exc}; server log: {last_line(log)}") from None
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--servers", nargs="+", choices=list(SERVERS), default=list(SERVERS))
    args = parser.parse_args()
    print(f"server load on `{args.shape}` (bf16), {args.tokens} tokens per stream")
    print(f"{'server':>8} {'streams':>7} {'decode tok/s':>13} {'vs first':>9} {'all decoding':>13} {'vs first':>9} "
          f"{'TTFT mean s':>12} {'TTFT max s':>11}")
    with tempfile.TemporaryDirectory() as logs:
        for name in args.servers:
            try:
                rows = measure(SERVERS[name], args.shape, args.streams, args.tokens, Path(logs))
            except ServerFailed as exc:
                print(f"{name:>8} failed: {exc}", flush=True)
                continue
            base, steady = rows[0]["decode_tps"], rows[0]["all_decoding_tps"]
            for r in rows:
                print(f"{name:>8} {r['streams']:>7} {r['decode_tps']:>13.1f} {r['decode_tps'] / base:>8.2f}x "
                      f"{r['all_decoding_tps']:>13.1f} {r['all_decoding_tps'] / steady:>8.2f}x "
                      f"{r['ttft_mean']:>12.3f} {r['ttft_max']:>11.3f}", flush=True)


if __name__ == "__main__":
    main()
