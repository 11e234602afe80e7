"""Gradient checkpointing per decoder layer: a layer keeps only its inputs for the backward pass and
recomputes its activations there.

A decoder layer is not a pure function of its inputs: a KV-owning layer records its keys/values in
`shared_kv` for the KV-shared layers after it, which read them. The checkpointed call makes that
flow explicit: a KV-shared layer takes its donor's keys/values as inputs, an owner returns its own as
outputs, so gradients reach the donor's LoRA weights from every layer that reads its keys/values.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..architecture.text import DecoderLayer


class CheckpointedDecoderLayer(DecoderLayer):
    def __call__(self, streams, per_layer_input, offset, shared_kv: dict, cache=None, mask=None):
        if cache is not None:
            return super().__call__(streams, per_layer_input, offset, shared_kv, cache, mask)
        owns_kv = self.self_attn.owns_kv
        donor = () if owns_kv else shared_kv[self.layer_type][:2]

        def run(params, streams, per_layer_input, *donor_kv):
            self.update(params)
            kv = {} if owns_kv else {self.layer_type: (*donor_kv, mask)}
            out = DecoderLayer.__call__(self, streams, per_layer_input, offset, kv, None, mask)
            return (out, *kv[self.layer_type][:2]) if owns_kv else (out,)

        outputs = mx.checkpoint(run)(self.trainable_parameters(), streams, per_layer_input, *donor)
        if owns_kv:
            shared_kv[self.layer_type] = (outputs[1], outputs[2], mask)
        return outputs[0]


def checkpoint_layers(model: nn.Module) -> None:
    """Checkpoint every decoder layer of `model` (the class changes in place, the state stays)."""
    for layer in model.language_model.layers:
        if type(layer) is DecoderLayer:
            layer.__class__ = CheckpointedDecoderLayer
