"""Results -> benchmarks/results/latest.md (one table per shape/dtype: a row per figure, a column per
runtime with median (min-max), ratio columns ours/peer) and latest.json (every raw run)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


MEDIA_FIGURES = [
    ("image_encode_s", "image encode s ↓"), ("image_ttft_s", "image prompt: time to first token s ↓"),
    ("image_mlx_peak_gb", "image: MLX peak GB ↓"), ("audio_encode_s", "audio encode s ↓"),
    ("audio_ttft_s", "audio prompt: time to first token s ↓"), ("audio_mlx_peak_gb", "audio: MLX peak GB ↓"),
    ("load_s", "load s ↓"), ("max_rss_gb", "max RSS GB ↓"),
]


def figures(prompts: list[int], mode: str = "timing") -> list[tuple[str, str]]:
    """(result key, label) in table order; the label says which direction is better."""
    if mode == "media":
        return MEDIA_FIGURES
    rows = [(f"prefill_{n}_tps", f"prefill {n} tok/s ↑") for n in prompts]
    rows += [(f"ttft_{prompts[0]}_s", f"time to first token ({prompts[0]}) s ↓"), ("decode_tps", "decode tok/s ↑"),
             ("roofline_pct", "decode, % of bandwidth roofline ↑"), ("load_s", "load s ↓"),
             ("mlx_peak_gb", "MLX peak GB (after load) ↓"), ("mlx_peak_with_load_gb", "MLX peak GB (incl. load) ↓"),
             ("max_rss_gb", "max RSS GB ↓")]
    return rows


def summary(values: list[float]) -> tuple[float, str] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    median = statistics.median(values)
    digits = 1 if median >= 10 else 2 if median >= 0.1 else 3
    text = f"{median:.{digits}f}"
    return median, text + (f" ({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else "")


def table(case: dict) -> list[str]:
    runtimes = list(case["runs"])
    peers = [r for r in runtimes if r != "ours"] if "ours" in runtimes else []
    head = runtimes + [f"ours/{p}" for p in peers]
    lines = ["| figure | " + " | ".join(head) + " |", "| --- " * (len(head) + 1) + "|"]
    for key, label in figures(case["prompts"], case.get("mode", "timing")):
        cells = {r: summary([run.get(key) for run in case["runs"][r] if "error" not in run]) for r in runtimes}
        if not any(cells.values()):
            continue
        row = [cells[r][1] if cells[r] else "-" for r in runtimes]
        for peer in peers:
            ok = cells["ours"] and cells[peer] and cells[peer][0]
            row.append(f"{cells['ours'][0] / cells[peer][0]:.2f}x" if ok else "-")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    errors = {r: run["error"] for r in runtimes for run in case["runs"][r] if "error" in run}
    lines += [f"\n{r} failed: `{e}`" for r, e in errors.items()]
    return lines


WEIGHTS_NOTE = {
    "bf16": "random bf16 weights, the same checkpoint for both",
    "int4": "each runtime's own int4 (affine, group 64) conversion of the same random checkpoint, towers "
            "quantized too (ours: `--quantize-towers`, 8 bits; mlx-vlm: its converter's choice)",
}


def media_note(case: dict) -> str:
    runs = [run for runs in case["runs"].values() for run in runs if "error" not in run]
    tokens = {kind: sorted({run.get(f"{kind}_prompt_tokens") for run in runs}) for kind in ("image", "audio")}
    finite = all(run.get(f"{kind}_soft_tokens_finite", True) for run in runs for kind in ("image", "audio"))
    return ("`small` text decoder, the real MobileNet v5 vision tower on a 640 x 480 PNG resized to 256 x 256 "
            "(768 in the real model: ~9x the vision work), the real audio tower cut to 2 of its 12 conformer "
            f"layers on a 10 s 16 kHz clip; {WEIGHTS_NOTE[case['dtype']]}. After a 16-token "
            "text warm-up, per kind: the encode alone (tower + embedder on preprocessed input, its first call), "
            "then time to first token of a one-turn chat prompt with the media and `describe` (media "
            f"preprocessing included; prompt tokens: image {tokens['image']}, audio {tokens['audio']}); MLX peak "
            f"per kind (includes the resident weights). Soft tokens finite in every run: {finite}. "
            f"{case['runs_each']} run(s) each.")


def write(meta: dict, cases: list[dict], folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "latest.json").write_text(json.dumps({"meta": meta, "cases": cases}, indent=2))
    lines = [
        "# Benchmarks: mlx-gemma3n beside its peers", "",
        f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ", f"Machine: {meta['machine']}  ",
        f"Versions: {meta['versions']}  ",
        f"Measured memory bandwidth: {meta['bandwidth_gbps']:.1f} GB/s ({meta['bandwidth_method']})",
        f"Activations: {'every runtime in ' + meta['activations'] if meta.get('activations') else 'each runtime its own'}",
        "", "Random weights, same token ids for every runtime, greedy, end-of-sequence ignored. Each run is a fresh",
        "process; runtimes interleaved; median (min-max) over the runs. Ratios: ours / peer of the medians.", "",
        "Preparation, seconds (~0 when cached): "
        + ", ".join(f"{step} {seconds:.0f}" for step, seconds in meta["preparation_s"].items()), "",
    ]
    for case in cases:
        if case["mode"] == "media":
            lines += [f"## {case['shape']} {case['dtype']} (image and audio)", "", media_note(case), ""]
            lines += table(case) + [""]
            continue
        lines += [f"## {case['shape']} {case['dtype']} ({case['mode']})", "",
                  f"Prompts {case['prompts']} tokens, {case['decode']} decoded tokens (decode measured after the first "
                  f"prompt), {case['runs_each']} runs each. Weight bytes read per decoded token: "
                  f"{case['bytes_per_token'] / 1e6:.1f} MB; roofline {case['roofline_tps']:.1f} tok/s.", ""]
        lines += table(case) + [""]
    path = folder / "latest.md"
    path.write_text("\n".join(lines))
    return path
