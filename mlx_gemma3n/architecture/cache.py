"""Key/value caches and which layer owns which.

Only the layers before the KV-shared block own a cache; each KV-shared layer attends to the keys and
values its source layer (`TextConfig.kv_source`) produced in the same step, so it needs no cache.

Every `update(keys, values)` returns the keys and values the new queries attend to and the mask
between them: `None` (every key visible), `"causal"` (bottom-right aligned, MLX's convention) or a
boolean array of shape (T_new, T_keys).
"""

from __future__ import annotations

import json

import mlx.core as mx

from ..errors import Gemma3nError
from .config import SLIDING, TextConfig


def sliding_window_mask(query_positions: mx.array, key_positions: mx.array, window: int) -> mx.array:
    """Query at position i sees key j iff i - window < j <= i (Transformers' sliding-window rule)."""
    q = query_positions[:, None]
    k = key_positions[None, :]
    return (k <= q) & (k > q - window)


class FullKVCache:
    """Keys and values of every position, in a buffer grown in steps to avoid a copy per token."""

    step = 256

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def update(self, keys: mx.array, values: mx.array):
        batch, heads, new, dim = keys.shape
        end = self.offset + new
        if self.keys is None or end > self.keys.shape[2]:
            grow = ((end - self.offset + self.step - 1) // self.step) * self.step
            shape = (batch, heads, grow, dim)
            extra_k, extra_v = mx.zeros(shape, keys.dtype), mx.zeros(shape, values.dtype)
            if self.keys is None:
                self.keys, self.values = extra_k, extra_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], extra_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], extra_v], axis=2)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :], None if new == 1 else "causal"

    @property
    def state(self):
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, kv):
        self.keys, self.values = kv
        self.offset = self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the positions held (the buffer grows in steps of `step` positions)."""
        return 0 if self.keys is None else sum(a.nbytes for a in self.state)


class SlidingKVCache:
    """A ring buffer of exactly `window` positions; position p lives in slot p % window."""

    def __init__(self, window: int):
        self.window = window
        self.keys = self.values = None
        self.offset = 0

    def update(self, keys: mx.array, values: mx.array):
        batch, heads, new, dim = keys.shape
        window, start = self.window, self.offset
        if self.keys is None:
            self.keys = mx.zeros((batch, heads, window, dim), keys.dtype)
            self.values = mx.zeros((batch, heads, window, dim), values.dtype)
        if new == 1:
            slot = start % window
            self.keys[..., slot : slot + 1, :] = keys
            self.values[..., slot : slot + 1, :] = values
            self.offset += 1
            # Once full, the ring holds exactly the `window` positions the new query may see; before
            # that, slots 0..offset-1 hold positions 0..offset-1. Attention ignores key order.
            visible = min(self.offset, window)
            return self.keys[..., :visible, :], self.values[..., :visible, :], None

        # Several new queries: the earliest one still sees the `window - 1` positions before it.
        kept = min(start, window - 1)
        kept_slots = mx.arange(start - kept, start) % window
        all_keys = mx.concatenate([self.keys[..., kept_slots, :], keys], axis=2)
        all_values = mx.concatenate([self.values[..., kept_slots, :], values], axis=2)
        stored = min(new, window)
        stored_slots = mx.arange(start + new - stored, start + new) % window
        self.keys[..., stored_slots, :] = keys[..., new - stored :, :]
        self.values[..., stored_slots, :] = values[..., new - stored :, :]
        self.offset += new
        mask = sliding_window_mask(mx.arange(start, start + new), mx.arange(start - kept, start + new), window)
        return all_keys, all_values, mask

    @property
    def state(self):
        return self.keys, self.values

    @state.setter
    def state(self, kv):
        self.keys, self.values = kv

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class RowCaches:
    """One layer's caches of a batch of sequences, one cache per row: a batched decode step updates
    each row's own cache, and each row attends to its own keys (see `Attention.attend`), so a row's
    result is the one it gets alone."""

    def __init__(self, rows: list):
        self.rows = rows

    @property
    def offset(self) -> mx.array:
        return mx.array([row.offset for row in self.rows])

    def update(self, keys: mx.array, values: mx.array):
        rows = len(self.rows)
        updated = [row.update(k, v) for row, k, v in zip(self.rows, mx.split(keys, rows), mx.split(values, rows))]
        return tuple(list(column) for column in zip(*updated))


def batched_cache(caches: list[list]) -> list[RowCaches]:
    """The per-sequence caches (each from `make_cache`) as one cache of a batch, a row per sequence."""
    return [RowCaches(list(rows)) for rows in zip(*caches)]


def make_cache(config: TextConfig) -> list:
    """One cache per KV-owning layer (the first `num_hidden_layers - num_kv_shared_layers`)."""
    return [
        SlidingKVCache(config.sliding_window) if config.layer_types[i] == SLIDING else FullKVCache()
        for i in range(config.first_kv_shared_layer)
    ]


def kv_cache_bytes(config: TextConfig, context_length: int, bytes_per_element: int = 2) -> int:
    """Bytes the cache holds at `context_length` tokens (sliding layers cap at the window)."""
    per_position = 2 * config.num_key_value_heads * config.head_dim * bytes_per_element
    return sum(
        per_position * (min(context_length, config.sliding_window) if config.layer_types[i] == SLIDING else context_length)
        for i in range(config.first_kv_shared_layer)
    )


def save_prompt_cache(path: str, cache: list, tokens: list[int], fingerprint: str) -> None:
    """Write the cache state, the tokens it holds and the model's fingerprint to a safetensors file."""
    arrays = {}
    for i, layer_cache in enumerate(cache):
        arrays[f"{i}.keys"], arrays[f"{i}.values"] = layer_cache.state
    metadata = {"format": "mlx_gemma3n.prompt_cache.v1", "model": fingerprint, "tokens": json.dumps(tokens)}
    mx.save_safetensors(path, arrays, metadata=metadata)


def load_prompt_cache(path: str, config: TextConfig, fingerprint: str) -> tuple[list, list[int]]:
    """The cache and its tokens from `save_prompt_cache`, after checking that they fit this model."""
    try:
        arrays, metadata = mx.load(path, return_metadata=True)
        tokens = json.loads(metadata.get("tokens", "null"))
    except Exception as exc:  # mx.load raises a bare RuntimeError on a foreign or corrupt file
        raise Gemma3nError(f"{path} is not a readable prompt cache ({exc})") from None
    if metadata.get("format") != "mlx_gemma3n.prompt_cache.v1" or not isinstance(tokens, list):
        raise Gemma3nError(f"{path} is not an mlx_gemma3n prompt cache")
    if metadata.get("model") != fingerprint:
        raise Gemma3nError(f"{path} was made with another model; delete it or pass another --prompt-cache-file")
    cache = make_cache(config)
    if set(arrays) != {f"{i}.{kind}" for i in range(len(cache)) for kind in ("keys", "values")}:
        raise Gemma3nError(f"{path} does not hold one cache per KV-owning layer of this model")
    length = len(tokens)
    for i, layer_cache in enumerate(cache):
        keys, values = arrays[f"{i}.keys"], arrays[f"{i}.values"]
        positions = config.sliding_window if isinstance(layer_cache, SlidingKVCache) else length
        expected = (1, config.num_key_value_heads, positions, config.head_dim)
        if keys.shape != expected or values.shape != expected:
            raise Gemma3nError(f"{path}: layer {i} cache has shape {keys.shape}, expected {expected}")
        layer_cache.state = (keys, values)
        layer_cache.offset = length
    return cache, tokens
