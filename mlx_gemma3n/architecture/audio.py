"""The Gemma 3n audio encoder (a USM conformer), following Transformers' `Gemma3nAudioEncoder`.

log-mel (B, T, 128) -> two stride-2 conv blocks (T/4) -> projection -> conformer blocks -> every
`conf_reduction_factor`-th step (T/16): one soft token per 160 ms of audio, 188 for 30 s.

Everything is computed in float32 whatever the weights' dtype (MLX promotes float16/bfloat16
weights in mixed products), so half-precision checkpoints cannot overflow here; the output is
float32.

One deliberate difference from Transformers: the subsampling convolutions see padded frames as
zeros, so a clip gives the same encodings alone or in a padded batch. Transformers convolves the
padding as is, which changes the last valid step of the shorter clips of a batch. For a single
clip (no padding) both are identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import Gemma3nError
from .text import RMSNorm


@dataclass(frozen=True)
class AudioConfig:
    """The `audio_config` of a Gemma 3n config.json (defaults: Transformers' `Gemma3nAudioConfig`)."""

    input_feat_size: int = 128
    hidden_size: int = 1536
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5
    conf_reduction_factor: int = 4
    conf_residual_weight: float = 0.5
    sscp_conv_channel_size: tuple = (128, 32)
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: tuple = ((3, 3), (3, 3))
    sscp_conv_stride_size: tuple = ((2, 2), (2, 2))

    @classmethod
    def from_dict(cls, raw: dict) -> "AudioConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: as_tuples(v) for k, v in raw.items() if k in known})


def as_tuples(value):
    """JSON lists (nested too) as tuples, so the config is hashable and immutable."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, list) else value


def clip(x: mx.array, limit: float) -> mx.array:
    return mx.clip(x, -limit, limit)


class CumulativeGroupNorm(nn.Module):
    """Normalises each step of (B, T, F, C) by the mean and variance of all F x C values of the
    steps up to it (causal), then scales per channel. The "variance" is Transformers': each step's
    squared deviations are taken from that step's running mean, then accumulated."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        steps, group = x.shape[1], x.shape[2] * x.shape[3]
        count = (mx.arange(1, steps + 1, dtype=mx.float32) * group)[:, None, None]
        mean = mx.cumsum(x.sum(axis=(2, 3), keepdims=True), axis=1) / count
        variance = mx.cumsum(mx.square(x - mean).sum(axis=(2, 3), keepdims=True), axis=1) / count
        return (x - mean) * mx.rsqrt(variance + self.eps) * self.weight


class SSCPConvBlock(nn.Module):
    """Conv2d over (time, frequency), padded (0, k-1) in time and (1, 1) in frequency, then the
    cumulative group norm and ReLU. Layout (B, T, F, C)."""

    def __init__(self, config: AudioConfig, idx: int):
        super().__init__()
        in_channels = 1 if idx == 0 else config.sscp_conv_channel_size[idx - 1]
        out_channels = config.sscp_conv_channel_size[idx]
        self.kernel = tuple(config.sscp_conv_kernel_size[idx])
        self.stride = tuple(config.sscp_conv_stride_size[idx])
        self.conv = nn.Conv2d(in_channels, out_channels, self.kernel, stride=self.stride, bias=False)
        self.norm = CumulativeGroupNorm(out_channels, config.sscp_conv_group_norm_eps)

    def __call__(self, x: mx.array, valid: mx.array) -> tuple[mx.array, mx.array]:
        x = mx.where(valid[:, :, None, None], x, 0.0)
        x = mx.pad(x, [(0, 0), (0, self.kernel[0] - 1), (1, 1), (0, 0)])
        x = nn.relu(self.norm(self.conv(x)))
        return x, valid[:, :: self.stride[0]]


class SubSampleConvProjection(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        self.conv_0 = SSCPConvBlock(config, 0)
        self.conv_1 = SSCPConvBlock(config, 1)
        freq = config.input_feat_size
        for (_, kernel_f), (_, stride_f) in zip(config.sscp_conv_kernel_size, config.sscp_conv_stride_size):
            freq = (freq + 2 - kernel_f) // stride_f + 1
        self.input_proj_linear = nn.Linear(freq * config.sscp_conv_channel_size[-1], config.hidden_size, bias=False)

    def __call__(self, features: mx.array, valid: mx.array) -> tuple[mx.array, mx.array]:
        x, valid = self.conv_0(features[..., None], valid)
        x, valid = self.conv_1(x, valid)
        batch, steps = x.shape[:2]
        return self.input_proj_linear(x.reshape(batch, steps, -1)), valid


class FeedForward(nn.Module):
    """Macaron half-step feed-forward: x + residual_weight * norm(W2 silu(W1 norm(x)))."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden = config.hidden_size
        self.clip_limit = config.gradient_clipping
        self.scale = config.conf_residual_weight
        self.pre_layer_norm = RMSNorm(hidden)
        self.ffw_layer_1 = nn.Linear(hidden, hidden * 4, bias=False)
        self.ffw_layer_2 = nn.Linear(hidden * 4, hidden, bias=False)
        self.post_layer_norm = RMSNorm(hidden)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.ffw_layer_1(self.pre_layer_norm(clip(x, self.clip_limit)))
        h = clip(self.ffw_layer_2(nn.silu(h)), self.clip_limit)
        return x + self.post_layer_norm(h) * self.scale


def timing_signal(positions: np.ndarray, channels: int) -> np.ndarray:
    """Sinusoidal embeddings (len(positions), channels): sines then cosines, timescales 1..1e4."""
    count = channels // 2
    increment = math.log(1.0e4) / max(count - 1, 1)
    inv_timescales = np.exp(np.arange(count, dtype=np.float32) * np.float32(-increment))
    scaled = positions.astype(np.float32)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=-1)


class RelativePositionEmbedding(nn.Module):
    def __init__(self, config: AudioConfig, max_back: int, max_forward: int):
        super().__init__()
        self.num_heads = config.conf_num_attention_heads
        self.pos_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        # Relative distances query - key, from max_back down to -max_forward.
        distances = np.arange(max_back, -max_forward - 1, -1)
        self._timing = mx.array(timing_signal(distances, config.hidden_size))

    def __call__(self, queries: mx.array, context: int) -> mx.array:
        """Query-position logits (B, N, U, W, context) for query blocks (B, N, U, W, H)."""
        batch, heads, blocks, width, head_dim = queries.shape
        span = self._timing.shape[0]
        embeddings = self.pos_proj(self._timing).reshape(span, heads, head_dim).transpose(1, 2, 0)
        logits = queries.reshape(batch, heads, blocks * width, head_dim) @ embeddings[None]
        logits = logits.reshape(batch, heads, blocks, width, span)
        # Relative shift: row w of the result holds the distance logits moved right by w, so that
        # entry (w, c) is the logit of distance index c - w (zero outside the span).
        logits = mx.pad(logits, [(0, 0)] * 4 + [(0, context + 1 - span)])
        logits = logits.reshape(batch, heads, blocks, width * (context + 1))[..., : width * context]
        return logits.reshape(batch, heads, blocks, width, context)


class Attention(nn.Module):
    """Chunked local self-attention: queries in blocks of `chunk` steps, each block attending to
    itself and the `context_left - 1` steps before it (and `context_right` after), with relative
    position logits, a learnt per-dimension query scale and a tanh logit soft-cap."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.conf_num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.chunk = config.conf_attention_chunk_size
        self.max_back = max(0, config.conf_attention_context_left - 1)
        self.max_forward = config.conf_attention_context_right
        self.context = self.chunk + self.max_back + self.max_forward
        self.logit_cap = config.conf_attention_logit_cap
        self.q_scale = self.head_dim**-0.5 / math.log(2.0)  # undoes softplus(0) of a zero per_dim_scale
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.per_dim_scale = mx.zeros((self.head_dim,))
        self.relative_position_embedding = RelativePositionEmbedding(config, self.max_back, self.max_forward)
        # Entry (w, c): may query w of a block see context step c (absolute key = start - max_back + c)?
        offset = np.arange(self.context)[None, :] - np.arange(self.chunk)[:, None]
        self._window = mx.array((offset >= 0) & (offset <= self.max_back + self.max_forward))

    def blocks_with_context(self, x: mx.array) -> mx.array:
        """(B, T, ...) -> (B, U, context, ...): for block u, steps u*chunk - max_back onwards,
        zero (or False) outside the sequence."""
        steps = x.shape[1]
        num_blocks = -(-steps // self.chunk)
        pad = [(0, 0), (self.max_back, self.max_forward + self.chunk - 1)] + [(0, 0)] * (x.ndim - 2)
        index = mx.arange(num_blocks)[:, None] * self.chunk + mx.arange(self.context)[None, :]
        return mx.take(mx.pad(x, pad), index, axis=1)

    def __call__(self, x: mx.array, valid: mx.array) -> mx.array:
        batch, steps, _ = x.shape
        num_blocks = -(-steps // self.chunk)
        shape = (batch, steps, self.num_heads, self.head_dim)
        queries = self.q_proj(x).reshape(shape) * (self.q_scale * nn.softplus(self.per_dim_scale))
        keys = self.blocks_with_context(self.k_proj(x).reshape(shape))
        values = self.blocks_with_context(self.v_proj(x).reshape(shape))

        queries = mx.pad(queries, [(0, 0), (0, num_blocks * self.chunk - steps), (0, 0), (0, 0)])
        queries = queries.reshape(batch, num_blocks, self.chunk, self.num_heads, self.head_dim).transpose(0, 3, 1, 2, 4)
        logits = queries @ keys.transpose(0, 3, 1, 4, 2)
        logits = logits + self.relative_position_embedding(queries, self.context)
        logits = mx.tanh(logits / self.logit_cap) * self.logit_cap

        allowed = self.blocks_with_context(valid)[:, None, :, None, :] & self._window
        logits = mx.where(allowed, logits, mx.finfo(logits.dtype).min)
        probabilities = mx.softmax(logits, axis=-1, precise=True)
        out = probabilities @ values.transpose(0, 3, 1, 2, 4)  # (B, N, U, W, H)
        out = out.transpose(0, 2, 3, 1, 4).reshape(batch, num_blocks * self.chunk, -1)
        return out[:, :steps]


class ConformerAttention(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        self.clip_limit = config.gradient_clipping
        self.pre_attn_norm = RMSNorm(config.hidden_size)
        self.attn = Attention(config)
        self.post = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.post_norm = RMSNorm(config.hidden_size)

    def __call__(self, x: mx.array, valid: mx.array) -> mx.array:
        h = self.attn(self.pre_attn_norm(clip(x, self.clip_limit)), valid)
        return x + self.post_norm(clip(self.post(h), self.clip_limit))


class LightConv1d(nn.Module):
    """GLU, causal depthwise conv over time, norm, SiLU, projection; residual."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.clip_limit = config.gradient_clipping
        self.kernel = config.conf_conv_kernel_size
        self.pre_layer_norm = RMSNorm(hidden, eps)
        self.linear_start = nn.Linear(hidden, hidden * 2, bias=False)
        self.depthwise_conv1d = nn.Conv1d(hidden, hidden, self.kernel, groups=hidden, bias=False)
        self.conv_norm = RMSNorm(hidden, eps)
        self.linear_end = nn.Linear(hidden, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = nn.glu(self.linear_start(self.pre_layer_norm(x)), axis=-1)
        h = self.depthwise_conv1d(mx.pad(h, [(0, 0), (self.kernel - 1, 0), (0, 0)]))
        h = nn.silu(self.conv_norm(clip(h, self.clip_limit)))
        return x + self.linear_end(h)


class ConformerBlock(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        self.clip_limit = config.gradient_clipping
        self.ffw_layer_start = FeedForward(config)
        self.attention = ConformerAttention(config)
        self.lconv1d = LightConv1d(config)
        self.ffw_layer_end = FeedForward(config)
        self.norm = RMSNorm(config.hidden_size)

    def __call__(self, x: mx.array, valid: mx.array) -> mx.array:
        x = self.attention(self.ffw_layer_start(x), valid)
        x = self.lconv1d(mx.where(valid[..., None], x, 0.0))
        return self.norm(clip(self.ffw_layer_end(x), self.clip_limit))


class AudioEncoder(nn.Module):
    def __init__(self, audio_config: dict):
        super().__init__()
        self.config = AudioConfig.from_dict(audio_config)
        self.subsample_conv_projection = SubSampleConvProjection(self.config)
        self.conformer = [ConformerBlock(self.config) for _ in range(self.config.conf_num_hidden_layers)]

    def __call__(self, features: mx.array, mask: mx.array | None = None, capture: dict | None = None):
        """Encode log-mel `features` (B, T, 128).

        `mask` (B, T) bool is True at real frames, False at padding (the polarity of
        `extract_features`' mask and of Transformers' `input_features_mask`; Transformers' tower
        itself takes the inverse). None: every frame is real.

        Returns (encodings (B, T', hidden) float32, zero at padding; mask (B, T') bool, True at
        real steps), T' = ceil(T / 16) for the published config. `capture`, if given, receives
        "subsample" and "conformer.{i}" (B, T/4, hidden).
        """
        if features.shape[1] == 0:
            raise Gemma3nError("the audio clip is too short: it needs at least 513 samples (32 ms at 16 kHz)")
        valid = mx.ones(features.shape[:2], dtype=mx.bool_) if mask is None else mask.astype(mx.bool_)
        x, valid = self.subsample_conv_projection(features.astype(mx.float32), valid)
        if capture is not None:
            capture["subsample"] = x
        for i, block in enumerate(self.conformer):
            x = block(x, valid)
            if capture is not None:
                capture[f"conformer.{i}"] = x
        step = self.config.conf_reduction_factor
        x, valid = x[:, ::step], valid[:, ::step]
        return mx.where(valid[..., None], x, 0.0), valid

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """PyTorch conv layouts to MLX: Conv2d (O, I, kH, kW) -> (O, kH, kW, I) and the depthwise
        Conv1d (C, 1, K) -> (C, K, 1). Weights already in MLX layout (a converted folder) are kept:
        an MLX Conv2d weight has its two (square) kernel sizes in the middle, a PyTorch one has the
        input channels there; a PyTorch depthwise weight has 1 in the middle."""
        out = {}
        for name, value in weights.items():
            if name.endswith(".conv.weight") and value.ndim == 4 and value.shape[1] != value.shape[2]:
                value = value.transpose(0, 2, 3, 1)
            elif name.endswith("depthwise_conv1d.weight") and value.ndim == 3 and value.shape[1] == 1:
                value = value.transpose(0, 2, 1)
            out[name] = value
        return out
