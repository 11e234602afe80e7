"""The top-level Gemma 3n model: embeddings (text and multimodal), the decoder, the tied LM head."""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import mlx.core as mx
import numpy as np
import mlx.nn as nn

from .cache import make_cache
from .config import ModelConfig
from .multimodal import MultimodalEmbedder
from .text import TextModel


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = TextModel(config.text)
        if config.is_multimodal:
            hidden = config.text.hidden_size
            self.embed_vision = MultimodalEmbedder(config.vision, hidden)
            self.embed_audio = MultimodalEmbedder(config.audio, hidden)
        self._hard_tokens = None
        # dtype the activations are computed in; None follows the weights (see loader.activation_dtype)
        self.activation_dtype = None

    def make_cache(self) -> list:
        return make_cache(self.config.text)

    def fingerprint(self) -> str:
        """Identifies the model (architecture and weights) for files made with it, e.g. prompt caches."""
        lm = self.language_model
        digest = hashlib.sha256(repr(asdict(self.config.text)).encode())
        for weight in (lm.norm.weight, lm.layers[0].input_layernorm.weight, lm.layers[-1].altup.correct_output_scale):
            digest.update(np.array(weight.astype(mx.float32)).tobytes())
        return digest.hexdigest()[:32]

    def hard_token_embeddings(self):
        """(first multimodal id, table of every multimodal hard token's embedding), built once.

        Valid for the weights loaded at the first call: the loader finishes before any forward.
        """
        if self._hard_tokens is None:
            table = mx.concatenate([self.embed_vision.hard_table(), self.embed_audio.hard_table()])
            self.__dict__["_hard_tokens"] = (self.embed_vision.vocab_offset, table)
        return self._hard_tokens

    def embed(self, input_ids: mx.array) -> mx.array:
        """Token embeddings; ids in the vision/audio ranges come from the multimodal embedders."""
        embeddings = self.language_model.embed(input_ids)
        if not self.config.is_multimodal:
            return embeddings
        first_id, table = self.hard_token_embeddings()
        in_range = input_ids >= first_id
        rows = table[mx.clip(input_ids - first_id, 0, table.shape[0] - 1)]
        return mx.where(in_range[..., None], rows.astype(embeddings.dtype), embeddings)

    def __call__(self, input_ids: mx.array, cache=None, last_token_only=False, capture=None, prefill_shortcut=True):
        """Logits (B, T, vocab), or (B, 1, vocab) with `last_token_only`."""
        lm = self.language_model
        embeddings = self.embed(input_ids)
        per_layer_embeddings = lm.per_layer_embeddings(input_ids)
        if self.activation_dtype is not None:
            embeddings = embeddings.astype(self.activation_dtype)
            per_layer_embeddings = per_layer_embeddings.astype(self.activation_dtype)
        per_layer_inputs = lm.per_layer_inputs(embeddings, per_layer_embeddings)
        if capture is not None:
            capture.update(
                embeddings=embeddings, per_layer_embeddings=per_layer_embeddings, per_layer_inputs=per_layer_inputs
            )
        hidden = lm(embeddings, per_layer_inputs, cache, last_token_only, capture, prefill_shortcut)
        if capture is not None:
            capture["final_norm"] = hidden
        logits = lm.embed_tokens.as_linear(hidden)
        cap = self.config.text.final_logit_softcapping
        if cap:
            logits = mx.tanh(logits / cap) * cap
        return logits
