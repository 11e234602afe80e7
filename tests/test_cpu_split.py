"""Matmuls, convolutions and attention split over the CPU cores (`mlx_gemma3n.backends.cpu_split`): every row computed once,
by the same dot product as the whole matmul, in layers, in a loaded model and through generation."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import prompt_ids

from mlx_gemma3n import load
from mlx_gemma3n.architecture.cache import sliding_window_mask
from mlx_gemma3n.architecture.model import apply_whole
from mlx_gemma3n.architecture.vision import Conv2d
from mlx_gemma3n.backends import cpu_split
from mlx_gemma3n.decoding.sampling import SamplingParams
from mlx_gemma3n.generate import Session


@pytest.fixture
def three_streams(monkeypatch):
    """Three parts for any work, whatever the machine's core count."""
    monkeypatch.setattr(cpu_split._per_thread, "streams", [None, mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)], raising=False)
    monkeypatch.setattr(cpu_split, "MIN_PART_WORK", 1)


def test_each_thread_splits_on_streams_of_its_own(three_streams):
    """MLX streams belong to the thread that made them: a model used from a second thread (the
    server's worker loads it, a caller may run it elsewhere) gets that thread's streams."""
    import threading

    weight, x = mx.random.normal((64, 16)), mx.random.normal((3, 16))
    expected = x @ weight.T
    mx.eval(weight, x, expected)
    results = []
    worker = threading.Thread(target=lambda: results.append(mx.array_equal(cpu_split.split_dense_matmul(x, weight), expected).item()))
    worker.start()
    worker.join()
    assert results == [True]


def test_rows_are_shared_once_over_the_streams(three_streams):
    calls = []

    def matmul(rows, stream):
        calls.append((rows, stream))
        return mx.zeros((1, len(range(10)[rows])))

    out = cpu_split.split_rows(mx.zeros((1, 4)), 10, matmul)
    assert out.shape == (1, 10)
    assert [(rows.start, rows.stop) for rows, _ in calls] == [(0, 3), (3, 6), (6, 10)]
    assert len({id(stream) for _, stream in calls}) == 3


def test_small_work_stays_whole(monkeypatch):
    monkeypatch.setattr(cpu_split._per_thread, "streams", [None, mx.new_stream(mx.cpu)], raising=False)
    calls = []

    def matmul(rows, stream):
        calls.append((rows, stream))
        return mx.zeros((1, 64))

    cpu_split.split_rows(mx.zeros((1, 256)), 64, matmul)  # 64 x 256 multiply-adds: below one part's worth
    assert calls == [(slice(None), None)]


def mlx_layers():
    """One mlx layer of each class that gets split, with the method that does its matmul."""
    mx.random.seed(3)
    quantized = nn.QuantizedLinear.from_linear(nn.Linear(64, 70), group_size=32, bits=4)
    quantized_table = nn.QuantizedEmbedding.from_embedding(nn.Embedding(70, 64), group_size=32, bits=4)
    return [(nn.Linear(48, 70, bias=False), "__call__"), (nn.Linear(48, 70), "__call__"),
            (nn.Embedding(70, 48), "as_linear"), (quantized, "__call__"), (quantized_table, "as_linear")]


@pytest.mark.parametrize("tokens", [1, 9])
def test_split_layers_equal_mlx_layers(three_streams, tokens):
    for layer, method in mlx_layers():
        x = mx.random.normal((2, tokens, 48 if type(layer) in (nn.Linear, nn.Embedding) else 64))
        expected = getattr(layer, method)(x)
        cpu_split.split_over_cores(layer)
        assert type(layer) is cpu_split.SPLIT_CLASSES[type(layer).__mro__[1]]
        np.testing.assert_allclose(np.array(getattr(layer, method)(x)), np.array(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel, stride, depthwise", [(1, 1, False), (3, 2, False), (3, 1, True), (5, 2, True)])
def test_split_convolutions_equal_the_vision_convolution(three_streams, kernel, stride, depthwise):
    mx.random.seed(7)
    conv = Conv2d(12, 12 if depthwise else 10, kernel, stride, depthwise=depthwise, bias=True)
    conv.weight = mx.random.normal(conv.weight.shape)
    conv.bias = mx.random.normal(conv.bias.shape)
    x = mx.random.normal((2, 9, 11, 12))
    expected = conv(x)
    cpu_split.split_over_cores(conv)
    assert type(conv) is cpu_split.SplitConv2d
    np.testing.assert_allclose(np.array(conv(x)), np.array(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("queries_length, mask", [(7, None), (7, "causal"), (7, "sliding"), (1, None), (1, "sliding")])
def test_split_attention_is_float32_attention(three_streams, queries_length, mask):
    """6 query heads over 3 KV heads: one KV head (and its 2 query heads) per part. One query position
    (a decode step; `one_query_attention`) gives MLX's numbers too."""
    mx.random.seed(5)
    queries = mx.random.normal((1, 6, queries_length, 16)).astype(mx.bfloat16)
    keys, values = (mx.random.normal((1, 3, 7, 16)).astype(mx.bfloat16) for _ in range(2))
    if mask == "sliding":
        mask = sliding_window_mask(mx.arange(7 - queries_length, 7), mx.arange(7), 3)
    as_float32 = (a.astype(mx.float32) for a in (queries, keys, values))
    expected = mx.fast.scaled_dot_product_attention(*as_float32, scale=1.0, mask=mask)
    got = cpu_split.split_attention(queries, keys, values, mask)
    assert got.dtype == mx.bfloat16
    assert mx.array_equal(got, expected.astype(mx.bfloat16))


def test_loaded_model_splits_and_generates_the_same(tiny_ckpt_a, three_streams):
    if mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("matmuls are split on MLX's CPU backend only")
    split, processor = load(tiny_ckpt_a.path)
    whole, _ = load(tiny_ckpt_a.path)
    base_classes = {split_class: base for base, split_class in cpu_split.SPLIT_CLASSES.items()}
    split_layers = [m for _, m in whole.named_modules() if type(m) in base_classes]
    assert type(split.language_model.layers[0].mlp.down_proj) is cpu_split.SplitLinear
    assert type(split.language_model.embed_tokens) is cpu_split.SplitEmbedding
    assert type(split.language_model.layers[0].self_attn) is cpu_split.SplitAttention
    assert split.elementwise is cpu_split.split_elementwise
    for module in split_layers:
        module.__class__ = base_classes[type(module)]
    whole.elementwise = apply_whole

    ids = mx.array(prompt_ids(11, 12))
    np.testing.assert_allclose(np.array(split(ids)), np.array(whole(ids)), rtol=1e-5, atol=1e-5)
    processor.eos_token_ids = set()
    split.config.eos_token_ids = whole.config.eos_token_ids = []
    greedy = SamplingParams(temperature=0.0)
    tokens = [[r.token for r in Session(model, processor).stream(ids[0].tolist(), greedy, 12, prefill_step_size=5)]
              for model in (split, whole)]
    assert tokens[0] == tokens[1] and len(set(tokens[0])) > 3


def test_split_elementwise_is_the_function_whole(three_streams):
    """The logits' soft cap, a range of the vocabulary per stream: every element as computed whole."""
    mx.random.seed(11)
    logits = (30 * mx.random.normal((3, 1, 1001))).astype(mx.bfloat16)

    def soft_cap(x):
        return mx.tanh(x / 30.0) * 30.0

    got = cpu_split.split_elementwise(soft_cap, logits)
    assert got.shape == logits.shape and got.dtype == mx.bfloat16
    assert mx.array_equal(got, soft_cap(logits))
