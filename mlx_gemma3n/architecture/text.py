"""The Gemma 3n text decoder, following Transformers' `modeling_gemma3n.py` step by step.

Layout: the AltUp streams are kept as one array of shape (B, T, altup_num_inputs, hidden), stream 0
being the active one that runs through attention and the MLP.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import mlx.core as mx
import mlx.nn as nn

from .cache import sliding_window_mask
from .config import FULL, SLIDING, TextConfig
from .stacking import StackedLinears, project


class RMSNorm(nn.Module):
    """x * (mean(x^2) + eps)^-1/2 * weight: Gemma 3n scales by `weight`, not `1 + weight`."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


ACTIVATIONS = {"gelu_pytorch_tanh": nn.gelu_approx, "gelu": nn.gelu}  # gelu_approx is the tanh form


def magnitude_matched(x: mx.array, target_rms: mx.array) -> mx.array:
    """Rescale `x` to the root-mean-square `target_rms` (AltUp's stream (un)embedding)."""
    rms = mx.sqrt(mx.maximum(mx.mean(x * x, axis=-1, keepdims=True), 1e-5))
    return x * (target_rms / rms)


def root_mean_square(x: mx.array) -> mx.array:
    return mx.sqrt(mx.mean(x * x, axis=-1, keepdims=True))


def compiled_for_decode(function, module: nn.Module, stacked: StackedLinears | None = None):
    """`function(x, ...)`, x of shape (B, T, ...), compiled by mx.compile for decode (T == 1), which
    fuses its chain of small ops into fewer kernels, and run as it is for prefill: prefill's ops are
    large, and each new prompt length would cost a fresh trace. The module's parameters (and the
    linears `stacked` holds, see stacking.py) are compile inputs, so weights loaded, quantized or
    stacked after the first call are seen."""
    compiled = mx.compile(function, inputs=module.state if stacked is None else [module.state, stacked.modules])
    return lambda x, *args: (compiled if x.shape[1] == 1 else function)(x, *args)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.layer_type = config.layer_types[layer_idx]
        self.rope_base = config.rope_theta_sliding if self.layer_type == SLIDING else config.rope_theta_full
        self.owns_kv = layer_idx < config.first_kv_shared_layer
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        if self.owns_kv:
            self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
            self.k_norm = RMSNorm(self.head_dim, eps)
        self.v_norm_eps = eps
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)

        # `offset` is an array, so one decode trace serves every position.
        self.compute_queries = compiled_for_decode(self.queries, self)
        if self.owns_kv:
            self.compute_keys_values = compiled_for_decode(self.keys_values, self)

    def rope(self, x: mx.array, offset) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)

    def projections(self) -> list[nn.Module]:
        """The projections of the layer's normed input: q, and k and v for a KV-owning layer."""
        return [self.q_proj, self.k_proj, self.v_proj] if self.owns_kv else [self.q_proj]

    def queries(self, projected: mx.array, offset) -> mx.array:
        batch, length, _ = projected.shape
        queries = projected.reshape(batch, length, self.n_heads, self.head_dim)
        return self.rope(self.q_norm(queries).transpose(0, 2, 1, 3), offset)

    def keys_values(self, projected_keys: mx.array, projected_values: mx.array, offset):
        batch, length, _ = projected_keys.shape
        keys = projected_keys.reshape(batch, length, self.n_kv_heads, self.head_dim)
        values = projected_values.reshape(batch, length, self.n_kv_heads, self.head_dim)
        keys = self.rope(self.k_norm(keys).transpose(0, 2, 1, 3), offset)
        values = mx.fast.rms_norm(values, None, self.v_norm_eps).transpose(0, 2, 1, 3)  # v_norm: no scale
        return keys, values

    def __call__(self, projected: list[mx.array], offset: mx.array, shared_kv: dict, cache=None, mask=None) -> mx.array:
        """Attend over this layer's keys/values, or over those of the last KV-owning layer of the
        same type (`shared_kv[layer_type]`) for a KV-shared layer. Owners record theirs there, with
        the mask to use (their cache's, or `mask` without a cache). `projected`: the outputs of
        `projections()` (computed by the decoder layer, which may stack them with LAuReL's)."""
        batch, length, _ = projected[0].shape
        queries = self.compute_queries(projected[0], offset)
        if self.owns_kv:
            keys, values = self.compute_keys_values(*projected[1:], offset)
            shared_kv[self.layer_type] = (keys, values, mask) if cache is None else cache.update(keys, values)
        out = self.attend_rows(queries, *shared_kv[self.layer_type])
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))

    def attend_rows(self, queries: mx.array, keys, values, mask) -> mx.array:
        """`attend`, or for a batch of sequences with one (keys, values, mask) per row (lists, from
        cache.RowCaches) `attend` row by row."""
        if isinstance(keys, list):
            return mx.concatenate([self.attend(*row) for row in zip(mx.split(queries, len(keys)), keys, values, mask)])
        return self.attend(queries, keys, values, mask)

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, mask) -> mx.array:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)


class MLP(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        hidden, width = config.hidden_size, config.intermediate_size[layer_idx]
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act = ACTIVATIONS[config.hidden_activation]
        sparsity = config.activation_sparsity_pattern[layer_idx]
        # Gaussian top-k: keep the activations above the `sparsity` quantile of a normal fitted to
        # each row (population std), i.e. cutoff = mean + std * Phi^-1(sparsity).
        self.std_multiplier = NormalDist().inv_cdf(sparsity) if sparsity > 0.0 else None
        self.input_plan = None  # gate and up stacked (stacking.py), or None

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = project(self.input_plan, [self.gate_proj, self.up_proj], x)
        if self.std_multiplier is not None:
            mean = mx.mean(gate, axis=-1, keepdims=True)
            std = mx.sqrt(mx.mean(mx.square(gate - mean), axis=-1, keepdims=True))
            gate = nn.relu(gate - (mean + std * self.std_multiplier))
        return self.down_proj(self.act(gate) * up)


class Laurel(nn.Module):
    """Learned augmented residual layer: x + norm(W_right W_left x), a rank-r side path."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.linear_left = nn.Linear(config.hidden_size, config.laurel_rank, bias=False)
        self.linear_right = nn.Linear(config.laurel_rank, config.hidden_size, bias=False)
        self.post_laurel_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, x: mx.array, left: mx.array) -> mx.array:
        """x plus the side path, from `left` = linear_left(x) (which the decoder layer may stack)."""
        return x + self.post_laurel_norm(self.linear_right(left))


class AltUp(nn.Module):
    """Alternating updates (Baykal et al., NeurIPS 2023): only stream 0 runs through the layer; a
    router-conditioned linear map predicts all streams before it and corrects them after it."""

    def __init__(self, config: TextConfig):
        super().__init__()
        n, hidden = config.altup_num_inputs, config.hidden_size
        self.num_inputs = n
        self.active = config.altup_active_idx
        self.correct_output_scale = mx.zeros((hidden,))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(hidden, n, bias=False)
        self.router_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.router_input_scale = 1.0 / hidden

    def router_modalities(self, x: mx.array) -> mx.array:
        routed = self.modality_router(self.router_norm(x) * self.router_input_scale)
        return mx.tanh(routed.astype(mx.float32)).astype(x.dtype)

    def predict(self, streams: mx.array) -> mx.array:
        """streams (B, T, n, H) -> predictions_i = streams_i + sum_j C_ij streams_j."""
        modalities = self.router_modalities(streams[:, :, self.active])
        coefs = self.prediction_coefs(modalities).reshape(*modalities.shape[:-1], self.num_inputs, self.num_inputs)
        return streams + coefs @ streams

    def correct(self, predictions: mx.array, activated: mx.array) -> mx.array:
        """corrected_i = predictions_i + (1 + c_i) * (activated - predictions_active)."""
        modalities = self.router_modalities(activated)
        coefs = self.correction_coefs(modalities) + 1.0
        innovation = activated - predictions[:, :, self.active]
        return predictions + coefs[..., None] * innovation[:, :, None, :]


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = config.layer_types[layer_idx]
        self.active = config.altup_active_idx
        self.correct_scale = config.altup_correct_scale
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config, layer_idx)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)
        self.altup = AltUp(config)
        self.laurel = Laurel(config)
        self.per_layer_input_gate = nn.Linear(hidden, config.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = nn.Linear(config.hidden_size_per_layer_input, hidden, bias=False)
        self.post_per_layer_input_norm = RMSNorm(hidden, eps)
        self.act = ACTIVATIONS[config.hidden_activation]
        self.input_plan = None  # the input projections stacked (stacking.py), or None
        self.stacked = StackedLinears()
        # Around attention (whose cache and position change every step) the layer is a fixed chain of
        # small ops: compiled for decode.
        self.compute_before_attention = compiled_for_decode(self.before_attention, self, self.stacked)
        self.compute_after_attention = compiled_for_decode(self.after_attention, self, self.stacked)

    def __call__(self, streams, per_layer_input, offset, shared_kv: dict, cache=None, mask=None) -> mx.array:
        predictions, laurel, *projected = self.compute_before_attention(streams)
        attn = self.self_attn(projected, offset, shared_kv, cache, mask)
        return self.compute_after_attention(predictions, laurel, attn, per_layer_input)

    def input_projections(self) -> list[nn.Module]:
        """Every projection of the normed input: attention's, then LAuReL's left."""
        return [*self.self_attn.projections(), self.laurel.linear_left]

    def before_attention(self, streams: mx.array):
        predictions = self.altup.predict(streams)
        normed = self.input_layernorm(predictions[:, :, self.active])
        *projected, left = project(self.input_plan, self.input_projections(), normed)
        return predictions, self.laurel(normed, left), *projected

    def after_attention(self, predictions, laurel, attn, per_layer_input) -> mx.array:
        attn = predictions[:, :, self.active] + self.post_attention_layernorm(attn)
        attn_laurel = (attn + laurel) * (1.0 / math.sqrt(2.0))
        ffw = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(attn_laurel)))
        corrected = self.altup.correct(predictions, attn_laurel + ffw)

        first = corrected[:, :, self.active]
        if self.correct_scale:
            first = first * self.altup.correct_output_scale
        gated = self.act(self.per_layer_input_gate(first)) * per_layer_input
        injected = self.post_per_layer_input_norm(self.per_layer_projection(gated))
        # Streams 1.. get the injection, stream 0 does not: a 0/1 mask (exact: x + 0 * y == x for a finite
        # y) instead of a slice and a concatenation, so the whole update is one elementwise kernel.
        streams = corrected.shape[2]
        injected_streams = mx.array([0.0] + [1.0] * (streams - 1), dtype=corrected.dtype)[:, None]
        return corrected + injected[:, :, None] * injected_streams


class TextModel(nn.Module):
    """Embeddings in, final-normed hidden states out (the LM head lives on the top-level model)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        hidden, n_layers, ple = config.hidden_size, config.num_hidden_layers, config.hidden_size_per_layer_input
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.embed_tokens_per_layer = nn.Embedding(config.vocab_size_per_layer_input, n_layers * ple)
        self.per_layer_model_projection = nn.Linear(hidden, n_layers * ple, bias=False)
        self.per_layer_projection_norm = RMSNorm(ple, config.rms_norm_eps)
        n_extra = config.altup_num_inputs - 1
        self.altup_projections = [nn.Linear(hidden, hidden, bias=False) for _ in range(n_extra)]
        self.altup_unembed_projections = [nn.Linear(hidden, hidden, bias=False) for _ in range(n_extra)]
        self.layers = [DecoderLayer(config, i) for i in range(n_layers)]
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.embed_scale = math.sqrt(hidden)
        self.per_layer_embed_scale = math.sqrt(ple)

    def embed(self, input_ids: mx.array, dtype=None) -> mx.array:
        """Scaled token embeddings, in `dtype` (default: the table's)."""
        rows = self.embed_tokens(input_ids)
        rows = rows if dtype is None else rows.astype(dtype)
        # A Python scalar takes the array's dtype: the scale is rounded to it first, as in the reference.
        return rows * self.embed_scale

    def per_layer_embeddings(self, input_ids: mx.array, dtype=None) -> mx.array:
        """Scaled PLE table rows (B, T, layers, ple), in `dtype` (default: the table's); ids outside the
        table (multimodal ids) use row 0."""
        cfg = self.config
        in_table = (input_ids >= 0) & (input_ids < cfg.vocab_size_per_layer_input)
        rows = self.embed_tokens_per_layer(mx.where(in_table, input_ids, 0))
        rows = rows if dtype is None else rows.astype(dtype)
        rows = rows * self.per_layer_embed_scale
        return rows.reshape(*input_ids.shape, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)

    def per_layer_inputs(self, embeddings: mx.array, per_layer_embeddings: mx.array) -> mx.array:
        """(projection of the embeddings, normed, + the PLE rows) / sqrt(2)."""
        cfg = self.config
        projected = self.per_layer_model_projection(embeddings) * (cfg.hidden_size**-0.5)
        projected = projected.reshape(*embeddings.shape[:-1], cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)
        projected = self.per_layer_projection_norm(projected)
        return (projected + per_layer_embeddings) * (1.0 / math.sqrt(2.0))

    def expand_streams(self, embeddings: mx.array) -> mx.array:
        target = root_mean_square(embeddings)
        extra = [magnitude_matched(proj(embeddings), target) for proj in self.altup_projections]
        return mx.stack([embeddings, *extra], axis=2)

    def collapse_streams(self, streams: mx.array) -> mx.array:
        first = streams[:, :, 0]
        target = root_mean_square(first)
        extra = [magnitude_matched(proj(streams[:, :, i + 1]), target) for i, proj in enumerate(self.altup_unembed_projections)]
        return self.norm(mx.mean(mx.stack([first, *extra], axis=2), axis=2))

    def __call__(self, embeddings, per_layer_inputs, cache=None, last_token_only=False, capture=None, prefill_shortcut=True):
        """Run the decoder.

        cache: None (one full forward; KV-shared layers still share) or `make_cache(config)`.
        last_token_only: return only the last position. The KV-shared layers, which produce no cache,
            then run on that position alone (the prefill shortcut) unless `prefill_shortcut` is False
            (which only exists to measure it).
        capture: optional dict filled with the streams after each layer (for parity tests).
        """
        cfg = self.config
        length = embeddings.shape[1]
        offset = mx.array(cache[0].offset if cache else 0)
        masks = {FULL: None, SLIDING: None} if cache else self.no_cache_masks(length)
        streams = self.expand_streams(embeddings)
        if capture is not None:
            capture["altup_streams"] = streams
        shared_kv = {}
        for i, layer in enumerate(self.layers):
            if last_token_only and prefill_shortcut and i == cfg.first_kv_shared_layer and streams.shape[1] > 1:
                streams, per_layer_inputs = streams[:, -1:], per_layer_inputs[:, -1:]
                shared_kv = {kind: last_query_only(kv) for kind, kv in shared_kv.items()}
                offset = offset + length - 1
            layer_cache = cache[i] if cache and i < len(cache) else None
            streams = layer(streams, per_layer_inputs[:, :, i], offset, shared_kv, layer_cache, masks[layer.layer_type])
            if capture is not None:
                capture[f"layer.{i}"] = streams
        if last_token_only:
            streams = streams[:, -1:]
        return self.collapse_streams(streams)

    def no_cache_masks(self, length: int) -> dict:
        positions = mx.arange(length)
        sliding = sliding_window_mask(positions, positions, self.config.sliding_window) if length > 1 else None
        return {FULL: "causal" if length > 1 else None, SLIDING: sliding}


def last_query_only(kv: tuple) -> tuple:
    """The (keys, values, mask) seen by the last query alone."""
    keys, values, mask = kv
    if isinstance(mask, mx.array):
        mask = mask[-1:]
    else:
        mask = None
    return keys, values, mask
