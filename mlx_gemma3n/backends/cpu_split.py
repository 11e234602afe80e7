"""Matmuls, convolutions and attention split over the CPU cores.

MLX's CPU backend runs the ops of a stream on one thread, and its BLAS is single-threaded, so a matmul
uses one core. Split along the weight's output rows, each part on a stream of its own, one matmul
uses every core; each output element is the same dot product as before, so no number changes.
Measured on 2 cores: 2x for a decode matvec of 262400 x 256 (34 -> 18 ms) or 8192 x 2048 (11.6 ->
6.4 ms), and for a 512-token prefill GEMM of 1024 x 256 (43 -> 22 ms). Convolutions split over their
output channels (MobileNet v5 on a 256 x 256 image: 15.8 -> 9.0 s), attention over groups of KV
heads (with their query heads).
"""

import os
import threading
from contextlib import nullcontext

import mlx.core as mx
import mlx.nn as nn

from ..architecture.text import Attention
from ..architecture.vision import Conv2d

# Multiply-adds a part must have: below this the cross-stream scheduling costs more than the core
# saves (measured: a 64 x 256 matvec slows from 0.06 to 0.09 ms when split, 1024 x 256 speeds up).
MIN_PART_WORK = 1 << 18

_per_thread = threading.local()  # MLX streams belong to the thread that made them


def cpu_streams() -> list:
    """One stream per core this process may run on: the caller's (None), then new ones (created
    once per thread). Keeping the first part on the caller's stream measured faster than a new
    stream for it."""
    if not hasattr(_per_thread, "streams"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        _per_thread.streams = [None] + [mx.new_stream(mx.cpu) for _ in range(cores - 1)]
    return _per_thread.streams


def split_rows(x: mx.array, rows: int, matmul) -> mx.array:
    """`matmul(row_slice, stream)` over as many row ranges as there are cores, or whole when the
    work is too small to share; the parts are joined along the last axis."""
    return split_work(rows, x.size * rows, matmul, axis=-1)


def split_work(rows: int, work: int, compute, axis: int) -> mx.array:
    """`compute(row_slice, stream)` over up to one range of `rows` per core, each range with at
    least MIN_PART_WORK of the `work`; the parts are joined along `axis`."""
    streams = cpu_streams()
    parts = min(len(streams), rows, work // MIN_PART_WORK)
    if parts < 2:
        return compute(slice(None), None)
    bounds = [rows * i // parts for i in range(parts + 1)]
    pieces = [compute(slice(start, stop), stream) for start, stop, stream in zip(bounds, bounds[1:], streams)]
    return mx.concatenate(pieces, axis=axis)


def on_stream(stream):
    """The context of a part's stream: the caller's own (None) as it is."""
    return nullcontext() if stream is None else mx.stream(stream)


def split_elementwise(function, x: mx.array) -> mx.array:
    """`function` (elementwise) over ranges of x's last axis, a range per core. For the soft-capped
    logits of a batched decode step: MLX's CPU tanh costs ~18 ns an element (4 x 262400 logits:
    19 -> 10 ms on 2 cores)."""

    def apply(columns: slice, stream) -> mx.array:
        with on_stream(stream):
            return function(x[..., columns])

    return split_work(x.shape[-1], x.size, apply, axis=-1)


def split_dense_matmul(x: mx.array, weight: mx.array, bias=None) -> mx.array:
    if bias is None:
        return split_rows(x, weight.shape[0], lambda rows, stream: mx.matmul(x, weight[rows].T, stream=stream))
    return split_rows(x, weight.shape[0], lambda rows, stream: mx.addmm(bias[rows], x, weight[rows].T, stream=stream))


def split_quantized_matmul(module, x: mx.array) -> mx.array:
    biases = module.get("biases")
    return split_rows(x, module.weight.shape[0], lambda rows, stream: mx.quantized_matmul(
        x, module.weight[rows], scales=module.scales[rows], biases=None if biases is None else biases[rows],
        transpose=True, group_size=module.group_size, bits=module.bits, mode=module.mode, stream=stream))


class SplitLinear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        return split_dense_matmul(x, self.weight, self.get("bias"))


class SplitQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        out = split_quantized_matmul(self, x)
        return out + self.bias if "bias" in self else out


class SplitEmbedding(nn.Embedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return split_dense_matmul(x, self.weight)


class SplitQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return split_quantized_matmul(self, x)


def split_attention(queries: mx.array, keys: mx.array, values: mx.array, mask) -> mx.array:
    """Attention in float32, over groups of KV heads. MLX's CPU attention is a chain of matmuls and a
    softmax; in bf16 it is both slower and rounds the scores (measured for 8 query / 2 KV heads of
    32 over 512 positions: 89 ms bf16, 62 ms float32, 31 ms float32 on 2 cores)."""
    batch, heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads

    def attend(kv_rows: slice, stream) -> mx.array:
        q_rows = slice(None) if kv_rows.start is None else slice(kv_rows.start * group, kv_rows.stop * group)
        q, k, v = (a.astype(mx.float32) for a in (queries[:, q_rows], keys[:, kv_rows], values[:, kv_rows]))
        if length == 1:
            with on_stream(stream):
                return one_query_attention(q, k, v, mask)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask, stream=stream)

    work = batch * heads * length * keys.shape[2] * dim
    return split_work(kv_heads, work, attend, axis=1).astype(queries.dtype)


def one_query_attention(queries: mx.array, keys: mx.array, values: mx.array, mask) -> mx.array:
    """Attention of one query position per row, unscaled: the ops of MLX's CPU fallback for
    `mx.fast.scaled_dot_product_attention` (the same numbers) less its scale multiply and its
    repeats of the KV heads (a decode step runs it once per layer and row: 75 -> 52 us for 8 query /
    2 KV heads of 32 over 80 keys).
    `mask`: None or boolean (1, keys)."""
    batch, heads, _, dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = queries.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = grouped @ keys.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ values).reshape(batch, heads, 1, dim)


class SplitAttention(Attention):
    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, mask) -> mx.array:
        return split_attention(queries, keys, values, mask)


class SplitConv2d(Conv2d):
    """The vision tower's convolutions, split over output channels (for a depthwise one, over the
    channels of input and output alike)."""

    def convolve(self, x: mx.array, weight: mx.array) -> mx.array:
        if self.pointwise:
            return split_dense_matmul(x, weight.reshape(weight.shape[0], -1))
        padding, depthwise = self.padding(x), self.groups > 1

        def convolve_channels(channels: slice, stream) -> mx.array:
            inputs = x[..., channels] if depthwise else x
            groups = inputs.shape[-1] if depthwise else 1
            return mx.conv_general(inputs, weight[channels], stride=self.stride, padding=padding,
                                   groups=groups, stream=stream)

        positions = x.size // x.shape[-1] // self.stride**2
        return split_work(weight.shape[0], positions * weight.size, convolve_channels, axis=-1)


SPLIT_CLASSES = {
    Conv2d: SplitConv2d,
    Attention: SplitAttention,
    nn.Linear: SplitLinear,
    nn.QuantizedLinear: SplitQuantizedLinear,
    nn.Embedding: SplitEmbedding,
    nn.QuantizedEmbedding: SplitQuantizedEmbedding,
}


def split_over_cores(model: nn.Module) -> None:
    """Make every linear layer, tied embedding, vision convolution and decoder attention of `model`
    split its work over the cores. The split classes add no state, only the call, so the modules
    change class in place: parameters, names and the closures compiled over them stay as they are."""
    for _, module in model.named_modules():
        split_class = SPLIT_CLASSES.get(type(module))
        if split_class is not None:
            module.__class__ = split_class
