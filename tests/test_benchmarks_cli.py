"""The benchmark harness end to end on its CI-sized `tiny` shape (`python -m benchmarks --device cpu
--quick`), the batched-step split (`python -m benchmarks.batched_step`), and the launch counter
(`python -m benchmarks.launches`) on a graph whose kernels are known, and the server load
(`python -m benchmarks.server_load`) against our server and mlx-lm's, and the transcription benchmark
(`python -m benchmarks.transcription`, ours only: mlx-vlm does not load the tiny towers) on the tiny
multimodal checkpoint."""

import math
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

from benchmarks.launches import VIEWS, fast_kernels_marked, graph_counts

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600


def run_module(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_row(text: str, label: str) -> list[str]:
    row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in row.strip("|").split("|")][1:]


def test_quick_cpu_run_prints_each_runtime_row(tmp_path):
    out = run_module(["benchmarks", "--device", "cpu", "--quick", "--shapes", "tiny", "--only", "ours,mlx-lm",
                      "--runs", "1", "--out", str(tmp_path)])
    assert (tmp_path / "latest.md").read_text() in out
    for dtype in ("bf16", "int4"):
        section = out.split(f"## tiny {dtype} (timing)")[1].split("\n## ")[0]
        for label in ("prefill 128 tok/s ↑", "decode tok/s ↑", "decode, % of bandwidth roofline ↑", "MLX peak GB (after load) ↓"):
            ours, peer, ratio = table_row(section, label)
            assert float(ours) > 0 and float(peer) > 0 and re.fullmatch(r"\d+\.\d\dx", ratio), (label, ours, peer, ratio)
        assert "failed" not in section


def test_batched_step_splits_each_layout_and_times_the_peer():
    out = run_module(["benchmarks.batched_step", "--shape", "tiny", "--rows", "1", "2", "--steps", "1", "--prompt", "8"])
    for layout in ("single-stream layout (float32 table)", "batched layout (bf16 table)"):
        for part in ("whole step", "decoder body", "LM head"):
            assert all(float(ms) > 0 for ms in table_row(out, f"ours, {layout}, {part}")), (layout, part)
    assert all(float(ms) > 0 for ms in table_row(out, "mlx-lm, whole step"))


def test_server_load_times_each_server_at_each_concurrency():
    out = run_module(["benchmarks.server_load", "--shape", "tiny", "--tokens", "24", "--streams", "1", "2",
                      "--servers", "ours", "mlx-lm"])
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [(row[0], row[1]) for row in rows] == [("ours", "1"), ("ours", "2"), ("mlx-lm", "1"), ("mlx-lm", "2")], out
    for row in rows:
        decode, all_decoding, ttft_mean, ttft_max = (float(row[i]) for i in (2, 4, 6, 7))
        # "all decoding" has no span when one stream ends before the other's first token (a busy box)
        assert decode > 0 and (all_decoding > 0 or math.isnan(all_decoding)) and 0 < ttft_mean <= ttft_max, row


def test_a_fast_kernel_counts_once_and_a_compiled_region_once():
    weight = mx.ones((8,))
    x = mx.ones((1, 1, 8))
    mx.eval(weight, x)
    state = {"weight": weight}

    def layer(x):
        normed = mx.fast.rms_norm(mx.exp(x) * 2, state["weight"], 1e-6)
        return mx.fast.rope(normed.reshape(1, 1, 1, 8), 8, traditional=False, base=1e4, scale=1.0, offset=3) + 1

    original = mx.fast.rms_norm
    with fast_kernels_marked():
        counts = graph_counts(mx.compile(layer, inputs=state)(x))
    kernels = {kind: n for kind, n in counts.items() if kind not in VIEWS}
    # exp * 2 fuse, the norm and rope are one kernel each, the + 1 a second fused region
    assert kernels == {"Compiled": 2, "fast.rms_norm": 1, "fast.rope": 1}
    assert mx.fast.rms_norm is original  # restored after the block


def test_launch_table_has_a_row_per_runtime(tmp_path):
    out = run_module(["benchmarks.launches", "--shapes", "tiny", "--dtypes", "int4", "--only", "ours,mlx-lm",
                      "--out", str(tmp_path)])
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| tiny | int4 |")]
    cells = {row[2]: row for row in rows}
    assert set(cells) == {"ours", "mlx-lm"}, out
    assert cells["mlx-lm"][5] == "1.00"
    for row in cells.values():
        kernels, primitives = int(row[3]), int(row[4])
        assert 0 < kernels <= primitives and "fast.rms_norm" in row[6]


def test_transcription_benchmark_times_each_part_on_a_tiny_checkpoint(tiny_ckpt_256):
    out = run_module(["benchmarks.transcription", "--model", str(tiny_ckpt_256.path), "--only", "ours", "--runs", "1",
                      "--seconds", "40", "--tokens", "3", "--minutes", "0.5", "1", "--memory-tokens", "2"])
    for label in ("ours, batch 4", "ours, batch 1"):
        rtf, wall, cpu, clips, tokens = table_row(out, label)[:5]
        assert float(rtf) > 0 and float(wall) > 0 and float(cpu) > 0 and int(clips) >= 2 and tokens == "3", out
    for minutes in ("0.5 min", "1 min"):
        row = table_row(out, minutes)
        assert int(row[0]) >= 1 and all(float(value) > 0 for value in row[1:]), out
    for label in ("audio encoder s", "prefill s (mlx-vlm: derived)", "decode tok/s", "clip total s"):
        ours, peer, ratio = table_row(out, label)
        assert float(ours) > 0 and peer == "-" and ratio == "-", (label, out)
    row = out.split("| one padded pass s |")[1].split("\n")[2].strip("| ").split(" | ")
    assert len(row[0].split(" + ")) == 2 and float(row[1]) == 40 and float(row[2]) >= float(row[1]), out
    assert float(row[3]) > 0 and float(row[4]) > 0 and row[6] == "True", out
    assert "failed" not in out
