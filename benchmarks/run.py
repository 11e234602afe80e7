"""`python -m benchmarks`: mlx-gemma3n beside mlx-lm and Transformers, in one run, on the same random weights.

    python -m benchmarks [--device cpu|gpu] [--quick] [--only ours,mlx-lm] [--dtypes bf16] [--runs 3]
                         [--equal-activations [bfloat16|float32]]

CPU (default): timing on `small` (the real layer structure and vocabularies at reduced width; the
CPU backend takes minutes per prompt at real width), memory and load time on the real E2B and E4B
shapes (short prompt, few tokens); bf16 and int4 g64. GPU: real shapes, full token counts. `--quick`:
`small` only, shorter prompt and decode (CPU) / E2B only (GPU). `--shapes tiny`: a CI-sized shape
(checkpoints.tiny_text) on either device, for checking the harness end to end. Media (ours, mlx-vlm): image and audio
encode time, time to first token and MLX peak on `small-mm` (`small` text, real vision tower at a 256 x 256
image, 2-layer audio tower; see checkpoints.py), bf16 and int4 (towers quantized too: runtimes.py),
one run each with `--quick`. Checkpoints and conversions are
cached in benchmarks/cache/ ($BENCH_CACHE); tables go to benchmarks/results/latest.md and latest.json
(`--out`) and are printed.

`--equal-activations DTYPE`: every runtime computes in DTYPE (default bfloat16: ours loads with
`dtype=` and so leaves out its CPU choice of float32 activations for quantized models; float32: the
peers' float parameters, quantization scales and biases included, are cast to float32 after load, ours
loads with dtype float32). Without it each runtime runs as a user gets it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlx.core as mx

from . import report
from .checkpoints import MEDIA, ensure_checkpoint, ensure_media
from .roofline import bandwidth_gbps, bandwidth_parts, weight_bytes_per_token
from .runtimes import RUNTIMES, model_dir, run_once


@dataclass(frozen=True)
class Setting:
    prompts: tuple[int, ...]
    decode: int
    warmup: int


TIMING = Setting((512, 2048), 64, 16)
QUICK_TIMING = Setting((128,), 16, 16)
MEMORY = Setting((16,), 4, 0)
MEDIA_SETTING = Setting((), 1, 16)  # per kind: encode, then time to first token (1 token)


def plan(device: str, quick: bool) -> list[tuple[str, str, str, Setting]]:
    """(shape, dtype, mode, setting) of every table."""
    dtypes = ("bf16", "int4")
    timing = QUICK_TIMING if quick and device == "cpu" else TIMING
    tiny = [("tiny", d, "timing", timing) for d in dtypes]
    if device == "gpu":
        return [(s, d, "timing", TIMING) for s in (("e2b",) if quick else ("e2b", "e4b")) for d in dtypes] + tiny
    cases = tiny + [("small", d, "timing", timing) for d in dtypes]
    cases += [("small-mm", d, "media", MEDIA_SETTING) for d in dtypes]
    return cases + ([] if quick else [(s, d, "memory + load", MEMORY) for s in ("e2b", "e4b") for d in dtypes])


def log(message: str) -> None:
    print(f"[benchmarks {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(label: str, prepared: dict, function, *args):
    start = time.perf_counter()
    result = function(*args)
    prepared[label] = prepared.get(label, 0.0) + time.perf_counter() - start
    return result


def machine(device: str) -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB RAM"
    if device == "gpu":
        text += f", GPU: {mx.device_info().get('device_name', 'unknown')}"
    return text + f", MLX default device {mx.default_device()}"


def versions() -> str:
    found = []
    for package in ("mlx", "mlx-lm", "mlx-vlm", "transformers", "torch", "mlx-gemma3n"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def prepare(shape: str, dtype: str, runtimes: list, prepared: dict) -> dict:
    """Build / convert (cached) what the runtimes load; time each step into `prepared`."""
    log(f"preparing {shape} {dtype}")
    src = timed(f"build hf-{shape}", prepared, ensure_checkpoint, shape)
    folders = {r.name: timed(f"prepare {r.name} {shape} {dtype}", prepared, model_dir, r, shape, dtype, src)
               for r in runtimes}
    weights = folders.get("ours", folders[runtimes[0].name])
    return dict(shape=shape, dtype=dtype, bytes_per_token=weight_bytes_per_token(weights),
                folders={name: str(folder) for name, folder in folders.items()}, runs={r.name: [] for r in runtimes})


def measure_media(case: dict, runtimes: list, runs: int, device: str) -> None:
    """Image and audio rows: `runs` fresh-process runs of each runtime, interleaved."""
    media = {kind: str(path) for kind, path in ensure_media().items()}
    case["media"] = media
    for index in range(runs):
        for runtime in runtimes:
            log(f"{case['shape']} {case['dtype']} media: {runtime.name} run {index + 1}/{runs}")
            result = run_once(runtime, case["folders"][runtime.name], "16", 1, 16, device, media)
            log(f"  {result}")
            case["runs"][runtime.name].append(result)


def measure(case: dict, setting: Setting, runtimes: list, bandwidth: float, runs: int, device: str,
            activations: str | None = None) -> None:
    """`runs` fresh-process runs of each runtime, interleaved, into case["runs"]."""
    if case["mode"] == "media":
        return measure_media(case, runtimes, runs, device)
    case["roofline_tps"] = bandwidth * 1e9 / case["bytes_per_token"]
    prompts = ",".join(map(str, setting.prompts))
    for index in range(runs):
        for runtime in runtimes:
            log(f"{case['shape']} {case['dtype']}: {runtime.name} run {index + 1}/{runs}")
            folder = case["folders"][runtime.name]
            result = run_once(runtime, folder, prompts, setting.decode, setting.warmup, device,
                              activations=activations)
            if result.get("decode_tps"):
                result["roofline_pct"] = 100 * result["decode_tps"] / case["roofline_tps"]
            log(f"  {result}")
            case["runs"][runtime.name].append(result)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="small shape only (CPU), E2B only (GPU), fewer tokens")
    parser.add_argument("--only", default=",".join(RUNTIMES), help=f"comma-separated subset of {','.join(RUNTIMES)}")
    parser.add_argument("--shapes", default="small,small-mm,e2b,e4b",
                        help="comma-separated subset of tiny,small,small-mm (image / audio rows),e2b,e4b")
    parser.add_argument("--dtypes", default="bf16,int4", help="comma-separated subset of bf16,int4")
    parser.add_argument("--out", type=Path, default=report.RESULTS, help="folder for latest.md and latest.json")
    parser.add_argument("--runs", type=int, default=3, help="runs per runtime and table (interleaved)")
    parser.add_argument("--equal-activations", nargs="?", const="bfloat16", choices=["bfloat16", "float32"],
                        help="every runtime computes in this float dtype (default bfloat16)")
    parser.add_argument("--media-runs", type=int, help="runs per runtime of the image / audio rows "
                        "(default: --runs; 1 with --quick)")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(RUNTIMES)
    if unknown:
        parser.error(f"unknown runtimes: {', '.join(sorted(unknown))}")
    if set(args.dtypes.split(",")) - {"bf16", "int4"}:
        parser.error(f"--dtypes takes bf16 and/or int4, not {args.dtypes!r}")
    if args.device == "gpu" and not mx.is_available(mx.gpu):
        parser.error("MLX has no GPU on this machine")
    mx.set_default_device(getattr(mx, args.device))
    selected = [RUNTIMES[name] for name in args.only.split(",") if args.device in RUNTIMES[name].devices]

    prepared, cases = {}, []
    for shape, dtype, mode, setting in plan(args.device, args.quick):
        runtimes = [r for r in selected if dtype in r.dtypes and (r.media or mode != "media")
                    and (not r.needs_towers or shape in MEDIA or f"{shape}-mm" in MEDIA)]
        if shape in args.shapes.split(",") and dtype in args.dtypes.split(",") and runtimes:
            case = prepare(shape, dtype, runtimes, prepared)
            runs = args.runs
            if mode == "media":
                runs = args.media_runs or (1 if args.quick else args.runs)
            case.update(mode=mode, prompts=list(setting.prompts), decode=setting.decode, runs_each=runs)
            cases.append((case, setting, runtimes))
    bandwidth = bandwidth_gbps()
    for case, setting, runtimes in cases:
        measure(case, setting, runtimes, bandwidth, case["runs_each"], args.device, args.equal_activations)
    meta = dict(
        command="python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=machine(args.device),
        versions=versions(), bandwidth_gbps=bandwidth, preparation_s=prepared, activations=args.equal_activations,
        bandwidth_method=f"best of 5 MLX copies (a + 1) of 1 GiB of float32 on {mx.default_device()}, "
                         f"in {bandwidth_parts()} parallel slices (one stream each)",
    )
    path = report.write(meta, [case for case, _, _ in cases], args.out)
    log(f"wrote {path}")
    print(path.read_text(), flush=True)
