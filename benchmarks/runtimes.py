"""The runtimes compared, how each gets its model folder (its own converter, cached), and how a runner
process is started.

bf16 rows: on `small` (and `tiny`) each MLX runtime converts with its own tool; on the real shapes every runtime
loads the random bf16 Hugging Face checkpoint directly (a bf16 conversion only renames tensors, and
three 9-14 GB copies per shape would not fit the disk). int4 rows: each runtime's own converter,
affine 4 bits, group size 64 (mlx-lm's defaults). Transformers runs bf16 only.

mlx-vlm loads only checkpoints with tower weights: its text rows load the media checkpoint
(`hf-small-mm`: the same `small` text shapes, other random values), bf16 directly, int4 converted by
its own converter. Media rows (ours, mlx-vlm): bf16 load `hf-small-mm` directly; int4 each runtime's
converter with the towers quantized as well (ours `--quantize-towers`: 8 bits beside the 4-bit
decoder; mlx-vlm: its own choice of modules, all at 4 bits).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoints import CACHE, MEDIA, ROOT, ensure_checkpoint

REPO = ROOT.parent
QUANT = ["-q", "--q-bits", "4", "--q-group-size", "64"]
OWN_BF16 = ("tiny", "small")  # reduced shapes: each MLX runtime converts its bf16 folder too


def environment() -> dict:
    """Peers import Transformers' Gemma 3n tokenizer/processor, which needs the test suite's
    torchvision op-schema hook (tests/sitecustomize); the repo root makes `benchmarks` importable."""
    paths = [str(REPO / "tests" / "sitecustomize"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


def ours_convert(src: Path, dst: Path, dtype: str, towers: bool = False) -> list[str]:
    args = [sys.executable, "-m", "mlx_gemma3n.convert", "--hf-path", str(src), "--mlx-path", str(dst)]
    return args + ["--dtype", "bfloat16"] + (QUANT + (["--quantize-towers"] if towers else []) if dtype == "int4" else [])


def peer_convert(module: str) -> Callable[[Path, Path, str, bool], list[str]]:
    """A peer's `python -m MODULE convert` (the towers are quantized by the peer's own choice)."""
    def command(src: Path, dst: Path, dtype: str, towers: bool = False) -> list[str]:
        args = [sys.executable, "-m", module, "convert", "--hf-path", str(src), "--mlx-path", str(dst)]
        return args + ["--dtype", "bfloat16"] + (QUANT if dtype == "int4" else [])
    return command


@dataclass(frozen=True)
class Runtime:
    name: str
    runner: str  # module under benchmarks.runners
    convert: Callable[[Path, Path, str, bool], list[str]] | None = None  # (src, dst, dtype, towers)
    dtypes: tuple[str, ...] = ("bf16", "int4")
    devices: tuple[str, ...] = ("cpu", "gpu")
    media: bool = False  # has image / audio rows
    needs_towers: bool = False  # loads only checkpoints with tower weights


RUNTIMES = {
    "ours": Runtime("ours", "ours", ours_convert, media=True),
    "mlx-lm": Runtime("mlx-lm", "mlxlm", peer_convert("mlx_lm")),
    "mlx-vlm": Runtime("mlx-vlm", "mlxvlm", peer_convert("mlx_vlm"), media=True, needs_towers=True),
    "transformers": Runtime("transformers", "hf", dtypes=("bf16",), devices=("cpu",)),
}


def model_dir(runtime: Runtime, shape: str, dtype: str, src: Path) -> Path:
    """The folder `runtime` loads for (shape, dtype), converting once into the cache."""
    if runtime.needs_towers and shape not in MEDIA:
        shape = f"{shape}-mm"
        src = ensure_checkpoint(shape)
    if runtime.convert is None or (dtype == "bf16" and shape not in OWN_BF16):
        return src
    dst = CACHE / f"{runtime.name}-{shape}-{dtype}"
    if (dst / "config.json").is_file():
        return dst
    tmp = CACHE / f".{dst.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(runtime.convert(src, tmp, dtype, shape in MEDIA), check=True, env=environment(), cwd=REPO)
    tmp.rename(dst)
    return dst


def run_once(runtime: Runtime, folder: Path, prompts: str, decode: int, warmup: int, device: str,
             media: dict | None = None, activations: str | None = None) -> dict:
    """One measurement in a fresh process; the runner's RESULT line as a dict (or its error).
    `media` ({"image": path, "audio": path}): the image / audio measurement instead of text prompts.
    `activations` (bfloat16, float32): the float dtype every runtime computes in (runners/measure.py)."""
    command = [sys.executable, "-m", f"benchmarks.runners.{runtime.runner}", "--model", str(folder),
               "--prompts", prompts, "--decode", str(decode), "--warmup", str(warmup)]
    if media:
        command += ["--media", ",".join(media)] + [a for kind, path in media.items() for a in (f"--{kind}", str(path))]
    env = dict(environment(), BENCH_DEVICE=device, BENCH_ACTIVATIONS=activations or "")
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
