"""Where a batched decode step's time goes: one step of B sequences (B = 1, 4, 8) after a prompt each,
for ours in the single-stream layout (`generate`: on CPU a bf16 tied table held in float32) and in the
server's batched layout (the table kept in bf16), split into the decoder body and the LM head, beside
mlx-lm's whole step on its own conversion of the same checkpoint.

    python -m benchmarks.batched_step [--shape small] [--prompt 60] [--rows 1 4 8] [--steps 4]

Ours runs each row on its own cache, joined for the step (`cache.batched_cache`, as the server's
engine does); mlx-lm prefills the B prompts as one batch and steps its batched cache. bf16, greedy
inputs; ms per step, the median of --steps steps after one warm-up step. In one process, one after
another (the runtimes share no arrays).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from .checkpoints import ensure_checkpoint
from .runtimes import RUNTIMES, model_dir


def timed(step, steps: int) -> float:
    mx.eval(step())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        mx.eval(step())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def prompts(rows: int, length: int) -> list[list[int]]:
    """Distinct prompts, BOS then ordinary ids (every shape has the real 262k vocabulary)."""
    return [[2] + [1000 + (31 * row + 7 * i) % 100_000 for i in range(length - 1)] for row in range(rows)]


def ours_rows(folder, rows: list[int], length: int, steps: int, batched: bool) -> dict[int, tuple[float, float, float]]:
    from mlx_gemma3n.architecture.cache import batched_cache
    from mlx_gemma3n.weights.loader import load_model

    model = load_model(folder, batched=batched)
    results = {}
    for b in rows:
        caches = []
        for ids in prompts(b, length):
            cache = model.make_cache()
            mx.eval(model(mx.array([ids]), cache=cache, last_token_only=True), [c.state for c in cache])
            caches.append(cache)
        tokens = mx.array([[1000 + row] for row in range(b)])
        joint = batched_cache(caches)
        whole = timed(lambda: model(tokens, cache=joint), steps)
        body = timed(lambda: model.hidden_states(tokens, cache=joint), steps)
        hidden = model.hidden_states(tokens, cache=joint)
        mx.eval(hidden)
        head = timed(lambda: model.logits(hidden), steps)
        results[b] = (whole, body, head)
    return results


def mlx_lm_rows(folder, rows: list[int], length: int, steps: int) -> dict[int, float]:
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(folder))
    results = {}
    for b in rows:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array(prompts(b, length)), cache=cache), [c.state for c in cache])
        tokens = mx.array([[1000 + row] for row in range(b)])
        results[b] = timed(lambda: model(tokens, cache=cache), steps)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small")
    parser.add_argument("--prompt", type=int, default=60, help="prompt tokens per row")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    src = ensure_checkpoint(args.shape)
    ours = model_dir(RUNTIMES["ours"], args.shape, "bf16", src)
    single, batched = (ours_rows(ours, args.rows, args.prompt, args.steps, layout) for layout in (False, True))
    peer = mlx_lm_rows(model_dir(RUNTIMES["mlx-lm"], args.shape, "bf16", src), args.rows, args.prompt, args.steps)
    print(f"One decode step of `{args.shape}` bf16 after a {args.prompt}-token prompt per row, ms (median of {args.steps})\n")
    print("| | " + " | ".join(f"B = {b}" for b in args.rows) + " |")
    print("| --- |" + " --- |" * len(args.rows))
    for label, layout in (("single-stream layout (float32 table)", single), ("batched layout (bf16 table)", batched)):
        for part, name in enumerate(("whole step", "decoder body", "LM head")):
            print(f"| ours, {label}, {name} | " + " | ".join(f"{layout[b][part]:.0f}" for b in args.rows) + " |")
    print("| mlx-lm, whole step | " + " | ".join(f"{peer[b]:.0f}" for b in args.rows) + " |")
    print("| ours batched vs mlx-lm, whole step | " + " | ".join(f"{peer[b] / batched[b][0]:.2f}x" for b in args.rows) + " |")


if __name__ == "__main__":
    main()
