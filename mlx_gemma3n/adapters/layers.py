"""The adapter layers: LoRA over a Linear (float, quantized or split over the CPU cores) and a tuned
copy of the token embedding / LM head (PEFT's `modules_to_save`).

Each wraps the model's own module as `base` and leaves it untouched, so an adapter comes and goes
without reloading the model. The adapter's arrays are this module's parameters while it is active
and absent otherwise: the decode functions compiled over a layer's parameters (`text.compiled_for_decode`)
see them as inputs, so switching adapters never reuses a trace made for another one.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..backends.cpu_split import split_over_cores

LORA_KEYS = ("lora_a", "lora_b", "scale")


class LoRALinear(nn.Module):
    """y = base(x) + scale * B (A x), as PEFT's `lora.Linear`: A (r, in), B (out, r), in the
    activation dtype; the base (frozen) may stay quantized. While training, `dropout` (PEFT's
    lora_dropout) drops entries of x on the LoRA path only."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.base.freeze()
        self.dropout = 0.0

    def set_lora(self, lora_a: mx.array | None = None, lora_b: mx.array | None = None, scale: mx.array | None = None):
        for key in LORA_KEYS:
            self.pop(key, None)
        if lora_a is not None:
            self.lora_a, self.lora_b, self.scale = lora_a, lora_b, scale

    def __call__(self, x: mx.array) -> mx.array:
        return self.with_delta(self.base(x), x)

    def with_delta(self, out: mx.array, x: mx.array) -> mx.array:
        """`out`, the base's output for x (from it or from its rows of a stacked matmul, see
        stacking.py), plus the adapter's delta while one is active."""
        if "lora_a" not in self:
            return out
        a, b, scale = (w.astype(x.dtype) for w in (self.lora_a, self.lora_b, self.scale))
        if self.training and self.dropout > 0:
            keep = mx.random.bernoulli(1.0 - self.dropout, x.shape)
            x = mx.where(keep, x / (1.0 - self.dropout), mx.zeros_like(x))
        return out + ((x @ a.T) @ b.T * scale).astype(out.dtype)


class TunedEmbedding(nn.Module):
    """The tied token embedding / LM head with PEFT's tuned copies: `input_table` replaces the
    embedding lookup (modules_to_save embed_tokens), `head_table` the LM head (modules_to_save
    lm_head); as in Transformers, tuning one side leaves the other on the base table."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.base.freeze()

    def set_tables(self, input_table: mx.array | None = None, head_table: mx.array | None = None) -> None:
        for key, table in (("input_table", input_table), ("head_table", head_table)):
            self.pop(key, None)
            if table is not None:
                self[key] = nn.Embedding(*table.shape)
                self[key].weight = table
        if mx.default_device().type == mx.DeviceType.cpu:
            split_over_cores(self)

    def __call__(self, ids: mx.array) -> mx.array:
        return (self["input_table"] if "input_table" in self else self.base)(ids)

    def as_linear(self, x: mx.array) -> mx.array:
        return (self["head_table"] if "head_table" in self else self.base).as_linear(x)
