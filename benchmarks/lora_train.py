"""QLoRA training speed and memory: ours (`python -m mlx_gemma3n.lora`) beside mlx-lm's `lora`, each
on its own int4 conversion of the same random checkpoint.

    python -m benchmarks.lora_train --shape small --steps 3 [--runtimes ours mlx-lm]

Batch 1, sequences of `--tokens` (512) tokens (random words truncated by each tool's
--max-seq-length), gradient checkpointing, rank-8 LoRA; learning rate 1e-5, so the loss stays
finite on random weights. Ours adapts q/k/v/o and the MLP projections of every layer; mlx-lm adapts
every Linear of the layers it tunes (`--num-layers -1`: all), its default. Each tool's own progress
lines are parsed: tokens/s of each step and its peak MLX memory (both count the whole process, the
load included). The first step includes one-time work (tracing, the PLE table's first reads) and
is reported apart. A failing tool is recorded with the last line of its error.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .checkpoints import ensure_checkpoint
from .runtimes import REPO, RUNTIMES, environment, model_dir

WORDS = "the a river stone light under over quiet morning city field learns carries small window".split()


def write_data(folder: Path, tokens: int) -> None:
    """train/valid jsonl with one long line each, well over `tokens` tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    text = " ".join(WORDS[(i * 7 + i // 3) % len(WORDS)] for i in range(tokens * 2))
    for name in ("train", "valid"):
        (folder / f"{name}.jsonl").write_text(json.dumps({"text": text}) + "\n")


def command(runtime: str, folder: Path, data: Path, out: Path, steps: int, tokens: int) -> list[str]:
    common = ["--model", str(folder), "--train", "--data", str(data), "--adapter-path", str(out), "--iters", str(steps),
              "--batch-size", "1", "--max-seq-length", str(tokens), "--grad-checkpoint", "--learning-rate", "1e-5"]
    if runtime == "ours":
        return [sys.executable, "-m", "mlx_gemma3n.lora", *common, "--lora-rank", "8", "--save-every", "0",
                "--steps-per-eval", str(steps + 1)]
    return [sys.executable, "-m", "mlx_lm", "lora", *common, "--num-layers", "-1", "--steps-per-report", "1",
            "--steps-per-eval", str(steps + 1), "--val-batches", "1", "--save-every", str(steps + 1)]


STEP_PATTERNS = {
    "ours": re.compile(r"step (\d+)/\d+: loss ([\d.e+-]+|nan|inf).*?([\d.]+) tok/s, peak ([\d.]+) GB"),
    # mlx-lm >= 0.29 prints a table (iter, train loss, tok/s, tokens) and the peak memory apart
    "mlx-lm": re.compile(r"^\s*(\d+)\s+([\d.]+|nan|inf)\s+([\d.]+)\s+\d+\s*$", re.MULTILINE),
}
PEAK = re.compile(r"[Pp]eak mem\w*\s*:?\s*([\d.]+)\s*GB")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def step_rows(runtime: str, output: str) -> list[dict]:
    rows = []
    for match in STEP_PATTERNS[runtime].finditer(output):
        step, loss, tps = match.groups()[:3]
        peak = match.group(4) if runtime == "ours" else next(iter(PEAK.findall(output[match.end():])), None)
        rows.append({"step": int(step), "loss": float(loss), "tokens_per_second": float(tps),
                     "peak_gb": None if peak is None else float(peak)})
    return rows


def measure(runtime: str, shape: str, steps: int, tokens: int, timeout: int) -> dict:
    src = ensure_checkpoint(shape)
    folder = model_dir(RUNTIMES[runtime], shape, "int4", src)
    with tempfile.TemporaryDirectory() as tmp:
        write_data(Path(tmp) / "data", tokens)
        args = command(runtime, folder, Path(tmp) / "data", Path(tmp) / "adapter", steps, tokens)
        started = time.perf_counter()
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=environment(), cwd=REPO)
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            result = subprocess.CompletedProcess(args, returncode=None, stdout=output, stderr=f"timed out after {timeout} s")
    output = ANSI.sub("", result.stdout + "\n" + result.stderr)
    record = {
        "runtime": runtime, "shape": shape, "tokens": tokens, "folder": str(folder), "command": " ".join(args),
        "seconds": round(time.perf_counter() - started, 1), "returncode": result.returncode,
        "steps": step_rows(runtime, output),
    }
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        record["error"] = lines[-1] if lines else "no output"
    later = record["steps"][1:]
    if later:
        record["tokens_per_second_after_first"] = round(sum(s["tokens_per_second"] for s in later) / len(later), 2)
    peaks = [s["peak_gb"] for s in record["steps"] if s["peak_gb"] is not None]
    if peaks:
        record["peak_gb"] = max(peaks)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["small", "e2b"], default="small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--runtimes", nargs="+", choices=["ours", "mlx-lm"], default=["ours", "mlx-lm"])
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per tool")
    args = parser.parse_args()
    for runtime in args.runtimes:
        print(json.dumps(measure(runtime, args.shape, args.steps, args.tokens, args.timeout)), flush=True)


if __name__ == "__main__":
    main()
