"""Token sampling: temperature, top-k, top-p, min-p and repetition penalty, on one row of logits.

Filters follow the usual definitions (the order Transformers applies them: repetition penalty, then
temperature, top-k, top-p, min-p). Temperature 0 is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..errors import Gemma3nError

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64

    def __post_init__(self):
        if self.temperature < 0:
            raise Gemma3nError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise Gemma3nError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise Gemma3nError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0:
            raise Gemma3nError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise Gemma3nError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: mx.array, recent_tokens: mx.array, penalty: float) -> mx.array:
    """CTRL-style penalty (Keskar et al. 2019): divide positive logits of seen tokens, multiply negative."""
    seen = logits[..., recent_tokens]
    seen = mx.where(seen > 0, seen / penalty, seen * penalty)
    logits[..., recent_tokens] = seen
    return logits


def filter_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Temperature-scaled logits (B, V) with the filtered-out tokens set to -inf."""
    logits = logits.astype(mx.float32) / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[..., -params.top_k][..., None]
        logits = mx.where(logits < kth, NEG_INF, logits)
    if params.top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        mass_before = mx.cumsum(probs, axis=-1) - probs
        sorted_logits = mx.where(mass_before >= params.top_p, NEG_INF, sorted_logits)
        logits = mx.put_along_axis(logits, order, sorted_logits, axis=-1)
    if params.min_p > 0.0:
        probs = mx.softmax(logits, axis=-1)
        threshold = params.min_p * mx.max(probs, axis=-1, keepdims=True)
        logits = mx.where(probs < threshold, NEG_INF, logits)
    return logits


def sample(logits: mx.array, params: SamplingParams, recent_tokens: mx.array | None = None, key: mx.array | None = None) -> mx.array:
    """Next token ids (B,) from last-position logits (B, V); `key` (mx.random.key) instead of the global
    random state."""
    if recent_tokens is not None and params.repetition_penalty != 1.0 and recent_tokens.size:
        logits = apply_repetition_penalty(logits, recent_tokens, params.repetition_penalty)
    if params.temperature == 0:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(filter_logits(logits, params), axis=-1, key=key)
