"""MLX peak memory of each quantization recipe / mode on the real E2B and E4B shapes (random weights).

    python -m benchmarks.quant_memory [--shapes e2b,e4b] [--rows uniform4-g64,mixed3-g64,...]

Each row converts the shape's random bf16 checkpoint (checkpoints.py) with our converter (cached as
benchmarks/cache/ours-SHAPE-ROW), then measures it in a fresh process (runners/measure.py): MLX peak
memory including the load, and after a 16-token prompt and 4 decoded tokens; weight bytes resident
(the folder without the memory-mapped PLE table, which is read per token and never held). Quality of
each recipe: benchmarks/quant_quality.py.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from .checkpoints import CACHE, ensure_checkpoint
from .runtimes import REPO, RUNTIMES, environment, run_once

# name: converter options after -q
ROWS = {
    "uniform4-g64": ["--q-bits", "4", "--q-group-size", "64"],
    "uniform4-g128": ["--q-bits", "4", "--q-group-size", "128"],
    "mixed3-g64": ["--quant-recipe", "mixed3", "--q-group-size", "64"],
    "mixed3-g128": ["--quant-recipe", "mixed3", "--q-group-size", "128"],
    "mxfp4": ["--q-mode", "mxfp4"],
    "nvfp4": ["--q-mode", "nvfp4"],
}
PLE_TABLE = "language_model.embed_tokens_per_layer."


def converted(shape: str, row: str) -> Path:
    dst = CACHE / f"ours-{shape}-{row}"
    if row == "uniform4-g64":
        dst = CACHE / f"ours-{shape}-int4"  # the other benchmarks' int4 folder
    if (dst / "config.json").is_file():
        return dst
    tmp = CACHE / f".{dst.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    command = [sys.executable, "-m", "mlx_gemma3n.convert", "--hf-path", str(ensure_checkpoint(shape)),
               "--mlx-path", str(tmp), "--dtype", "bfloat16", "-q", *ROWS[row]]
    subprocess.run(command, check=True, env=environment(), cwd=REPO)
    tmp.rename(dst)
    return dst


def resident_weight_gb(folder: Path) -> float:
    """Bytes of the folder's tensors other than the PLE table's, from the safetensors headers."""
    from mlx_gemma3n.weights.mapped import read_header

    total = 0
    for file in folder.glob("*.safetensors"):
        _, header = read_header(file)
        total += sum(end - start for name, entry in header.items() if name != "__metadata__"
                     and not name.startswith(PLE_TABLE) for start, end in [entry["data_offsets"]])
    return total / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="e2b,e4b")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    args = parser.parse_args()
    print("| shape | recipe | resident weights GB | MLX peak incl. load GB | MLX peak after load GB | decode tok/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes.split(","):
        for row in args.rows.split(","):
            folder = converted(shape, row)
            result = run_once(RUNTIMES["ours"], folder, "16", 4, 0, "cpu")
            if "error" in result:
                print(f"| {shape} | {row} | {resident_weight_gb(folder):.2f} | {result['error'][:60]} | | |", flush=True)
                continue
            print(f"| {shape} | {row} | {resident_weight_gb(folder):.2f} | {result['mlx_peak_with_load_gb']:.2f} | "
                  f"{result['mlx_peak_gb']:.2f} | {result['decode_tps']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
