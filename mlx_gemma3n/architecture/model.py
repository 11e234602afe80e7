"""The top-level Gemma 3n model: embeddings (text and multimodal), the decoder, the tied LM head."""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import Gemma3nError
from .audio import AudioEncoder
from .cache import make_cache
from .config import ModelConfig
from .multimodal import MultimodalEmbedder
from .stacking import unstack_projections
from .text import TextModel
from .vision import VisionTower

TOWERS = ("vision_tower", "audio_tower")


def apply_whole(function, x: mx.array) -> mx.array:
    return function(x)


class Model(nn.Module):
    """Gemma 3n. `towers` names the encoders to build (a checkpoint may come without them)."""

    def __init__(self, config: ModelConfig, towers: tuple[str, ...] = TOWERS):
        super().__init__()
        self.config = config
        self.language_model = TextModel(config.text)
        if config.is_multimodal:
            hidden = config.text.hidden_size
            self.embed_vision = MultimodalEmbedder(config.vision, hidden)
            self.embed_audio = MultimodalEmbedder(config.audio, hidden)
            if "vision_tower" in towers:
                self.vision_tower = VisionTower(config.vision_tower)
            if "audio_tower" in towers:
                self.audio_tower = AudioEncoder(config.audio_tower)
        self._hard_tokens = None
        # dtype the activations are computed in; None follows the weights (see loader.adapt_to_cpu)
        self.activation_dtype = None
        # how an elementwise function meets the logits: whole, or over the CPU cores (cpu_split)
        self.elementwise = apply_whole

    def load_weights(self, *args, **kwargs):
        """nn.Module.load_weights, after dropping the stacked projections (stacking.py): they would
        keep the weights of before."""
        unstack_projections(self)
        return super().load_weights(*args, **kwargs)

    def make_cache(self) -> list:
        return make_cache(self.config.text)

    def fingerprint_parts(self) -> list[bytes]:
        """What identifies the model: its text config and a few of its weights."""
        lm = self.language_model
        weights = (lm.norm.weight, lm.layers[0].input_layernorm.weight, lm.layers[-1].altup.correct_output_scale)
        return [repr(asdict(self.config.text)).encode()] + [np.array(w.astype(mx.float32)).tobytes() for w in weights]

    def fingerprint(self) -> str:
        """Identifies the model (architecture and weights) for files made with it, e.g. prompt caches."""
        digest = hashlib.sha256()
        for part in self.fingerprint_parts():
            digest.update(part)
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
        embeddings = self.language_model.embed(input_ids, self.activation_dtype)
        if not self.config.is_multimodal:
            return embeddings
        first_id, table = self.hard_token_embeddings()
        in_range = input_ids >= first_id
        rows = table[mx.clip(input_ids - first_id, 0, table.shape[0] - 1)]
        return mx.where(in_range[..., None], rows.astype(embeddings.dtype), embeddings)

    def tower(self, name: str):
        if name not in self:
            raise Gemma3nError(f"this model has no {name.replace('_', ' ')}: its checkpoint carries no {name} weights")
        return self[name]

    def image_soft_tokens(self, pixel_values) -> mx.array:
        """Preprocessed images (N, H, W, 3) -> their soft-token embeddings (N * 256, hidden)."""
        tokens = self.embed_vision.embed_soft(self.tower("vision_tower")(mx.array(pixel_values)))
        return tokens.reshape(-1, tokens.shape[-1])

    def audio_soft_tokens(self, features, mask) -> mx.array:
        """One clip's log-mel features (T, 128) and valid mask -> its soft-token embeddings.

        As Transformers does, steps past the clip's end and the rest of the model's fixed
        `audio_soft_tokens_per_image` slots hold the embedding of the last audio vocabulary id.
        """
        encodings, valid = self.tower("audio_tower")(mx.array(features)[None], mx.array(mask)[None])
        tokens = self.embed_audio.embed_soft(encodings)[0]
        filler = self.embed_audio.hard_table()[-1]
        tokens = mx.where(valid[0][:, None], tokens, filler)
        missing = self.config.audio_soft_tokens - tokens.shape[0]
        return mx.concatenate([tokens, mx.broadcast_to(filler, (missing, tokens.shape[1]))]) if missing > 0 else tokens

    def embed_with_media(self, input_ids: mx.array, images=(), audio=()) -> mx.array:
        """Token embeddings with the image/audio soft tokens written over their placeholder ids."""
        embeddings = self.embed(input_ids)
        ids = np.array(input_ids).reshape(-1)
        flat = embeddings.reshape(-1, embeddings.shape[-1])
        for token_id, soft in (
            (self.config.image_token_id, [self.image_soft_tokens(np.stack(images))] if len(images) else []),
            (self.config.audio_token_id, [self.audio_soft_tokens(*clip) for clip in audio]),
        ):
            if not soft:
                continue
            soft = mx.concatenate(soft)
            positions = np.flatnonzero(ids == token_id)
            if len(positions) != soft.shape[0]:
                raise Gemma3nError(f"the prompt has {len(positions)} placeholder tokens for {soft.shape[0]} soft tokens")
            flat[mx.array(positions)] = soft.astype(flat.dtype)
        return flat.reshape(embeddings.shape)

    def __call__(self, input_ids, cache=None, last_token_only=False, capture=None, prefill_shortcut=True, embeddings=None):
        """Logits (B, T, vocab), or (B, 1, vocab) with `last_token_only`. `embeddings` (from
        `embed_with_media`) replaces the token embeddings of `input_ids`."""
        return self.logits(self.hidden_states(input_ids, cache, last_token_only, capture, prefill_shortcut, embeddings))

    def hidden_states(self, input_ids, cache=None, last_token_only=False, capture=None, prefill_shortcut=True, embeddings=None):
        """The final-normed hidden states the LM head reads (arguments as for `__call__`)."""
        lm = self.language_model
        if embeddings is None:
            embeddings = self.embed(input_ids)
        per_layer_embeddings = lm.per_layer_embeddings(input_ids, self.activation_dtype)
        if self.activation_dtype is not None:
            embeddings = embeddings.astype(self.activation_dtype)
        per_layer_inputs = lm.per_layer_inputs(embeddings, per_layer_embeddings)
        if capture is not None:
            capture.update(
                embeddings=embeddings, per_layer_embeddings=per_layer_embeddings, per_layer_inputs=per_layer_inputs
            )
        hidden = lm(embeddings, per_layer_inputs, cache, last_token_only, capture, prefill_shortcut)
        if capture is not None:
            capture["final_norm"] = hidden
        return hidden

    def logits(self, hidden: mx.array) -> mx.array:
        """The tied LM head over final hidden states, soft-capped."""
        logits = self.language_model.embed_tokens.as_linear(hidden)
        cap = self.config.text.final_logit_softcapping
        if cap:
            logits = self.elementwise(lambda x: mx.tanh(x / cap) * cap, logits)
        return logits
