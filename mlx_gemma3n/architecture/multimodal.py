"""Multimodal embedders: image/audio tokens into the text model's embedding space.

Hard tokens (ids in an embedder's vocabulary range, e.g. <end_of_image>) go through the embedder's own
table; soft tokens (tower outputs) through its soft norm. Both are projected to the text width and
normed without scale (Transformers' `Gemma3nMultimodalEmbedder`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import EmbedderConfig
from .text import RMSNorm


class MultimodalEmbedder(nn.Module):
    def __init__(self, config: EmbedderConfig, text_hidden_size: int):
        super().__init__()
        self.vocab_offset = config.vocab_offset
        self.vocab_size = config.vocab_size
        self.eps = config.rms_norm_eps
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.hard_embedding_norm = RMSNorm(config.hidden_size, self.eps)
        self.soft_embedding_norm = RMSNorm(config.hidden_size, self.eps)
        self.embedding_projection = nn.Linear(config.hidden_size, text_hidden_size, bias=False)

    def project(self, normed: mx.array) -> mx.array:
        return mx.fast.rms_norm(self.embedding_projection(normed), None, self.eps)

    def hard_table(self) -> mx.array:
        """The embedding of every hard token id of this embedder, (vocab_size, text_hidden)."""
        return self.project(self.hard_embedding_norm(self.embedding(mx.arange(self.vocab_size))))

    def embed_soft(self, features: mx.array) -> mx.array:
        return self.project(self.soft_embedding_norm(features))
