"""The MatFormer size/speed curve: each published slice of E4B (mlx_gemma3n/weights/matformer.py's table),
int4, run two ways: cut as it loads from the full E4B folder, and converted into a folder of its own.

    python -m benchmarks.matformer_curve [--rows 0,1,9] [--prompt 16] [--decode 8] [--warmup 4]

The real E4B shape with random weights (checkpoints.py), converted once to int4 g64 by our converter
(cached as benchmarks/cache/ours-e4b-int4). Every measurement is a fresh process (runners/measure.py):
load time, MLX peak memory including the load, decode tok/s after a short prompt (a warm-up
generation first compiles the decode step). Row by row, the
converted slice's folder is written (its conversion timed), measured and deleted. Prints a markdown
table; `--rows` takes table indices (0 = "Main model", the whole E4B).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from mlx_gemma3n.weights.matformer import table

from .checkpoints import CACHE, ensure_checkpoint
from .runtimes import REPO, RUNTIMES, Runtime, environment, model_dir, run_once

AT_LOAD = Runtime("ours, sliced at load", "ours_matformer")
COLUMNS = ("load s", "MLX peak GB", "decode tok/s")


def figures(result: dict) -> list[str]:
    if "error" in result:
        return [result["error"][:40], "", ""]
    decode = result.get("decode_tps")
    return [f"{result['load_s']:.1f}", f"{result['mlx_peak_with_load_gb']:.2f}", f"{decode:.2f}" if decode else "-"]


def folder_gb(folder) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 1e9


def converted_slice(base, name: str, index: int):
    """(folder, seconds): the slice converted from the int4 base into a cache folder."""
    folder = CACHE / f"matformer-e4b-int4-{index}"
    command = [sys.executable, "-m", "mlx_gemma3n.convert", "--hf-path", str(base), "--mlx-path", str(folder),
               "--matformer", name, "--force"]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=environment(), cwd=REPO, capture_output=True)
    return folder, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.matformer_curve")
    parser.add_argument("--rows", help="comma-separated table indices (default: every row)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=8, help="tokens generated")
    parser.add_argument("--warmup", type=int, default=4, help="warm-up prompt tokens (0: none)")
    args = parser.parse_args()
    rows = list(enumerate(table()))
    if args.rows:
        rows = [rows[int(i)] for i in args.rows.split(",")]
    base = model_dir(RUNTIMES["ours"], "e4b", "int4", ensure_checkpoint("e4b"))
    header = ["#", "slice", "layers", "eff. params B", "MMLU PT"]
    header += [f"at load: {c}" for c in COLUMNS] + ["convert s", "folder GB"] + [f"converted: {c}" for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for index, spec in rows:
        os.environ["BENCH_MATFORMER"] = spec.name  # read by runners/ours_matformer.py
        at_load = run_once(AT_LOAD, base, str(args.prompt), args.decode, args.warmup, "cpu")
        folder, seconds = converted_slice(base, spec.name, index)
        converted = run_once(RUNTIMES["ours"], folder, str(args.prompt), args.decode, args.warmup, "cpu")
        size = folder_gb(folder)
        shutil.rmtree(folder)
        cells = [str(index), spec.name, str(len(spec.ffn_hidden_dims)), f"{spec.effective_params:.2f}", spec.mmlu]
        cells += figures(at_load) + [f"{seconds:.0f}", f"{size:.2f}"] + figures(converted)
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    print(f"E4B shape, random weights, int4 g64 (affine), CPU; prompt {args.prompt} tokens, {args.decode} generated")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
