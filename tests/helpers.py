"""MLX-side helpers shared by the test modules."""

from __future__ import annotations

import numpy as np


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the parity measure of the whole suite (bar: 1e-4)."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def streams_as_reference(streams) -> np.ndarray:
    """Our AltUp streams (B, T, n, H) in the reference layout (n, B, T, H)."""
    return np.asarray(streams).transpose(2, 0, 1, 3)


def prompt_ids(seed: int, length: int, vocab_size: int = 512, batch: int = 1) -> np.ndarray:
    """Random ids over the whole vocabulary: text ids, ids past the PLE table, multimodal hard ids."""
    ids = np.random.default_rng(seed).integers(3, vocab_size, size=(batch, length))
    ids[:, 0] = 2  # <bos>
    return ids


def greedy_ignoring_eos(model, processor, prompt, max_tokens: int, prefill_step_size: int = 100) -> list[int]:
    """Our greedy tokens with the stop tokens switched off (as reference.reference_greedy with
    stop_at_eos=False): exactly `max_tokens` of them."""
    from mlx_gemma3n.decoding.sampling import SamplingParams
    from mlx_gemma3n.generate import Session

    eos, processor.eos_token_ids = processor.eos_token_ids, set()
    config_eos, model.config.eos_token_ids = model.config.eos_token_ids, []
    try:
        responses = Session(model, processor).stream(prompt, SamplingParams(temperature=0.0), max_tokens, prefill_step_size=prefill_step_size)
        return [r.token for r in responses]
    finally:
        processor.eos_token_ids, model.config.eos_token_ids = eos, config_eos
