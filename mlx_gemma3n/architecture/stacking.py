"""Projections that read the same input, run as one matmul of their stacked weights.

A decoder layer multiplies its normed input by q_proj, k_proj and v_proj (the KV-owning layers) and
by LAuReL's linear_left, and the MLP's input by gate_proj and up_proj. On a GPU each matmul is a
kernel launch per token; stacked, each group is one (E2B per decoded token: bf16 1470 -> 1370
launches, int4 1512 -> 1442, where LAuReL stays float). Each output is the same dot product as
before, so no number changes.

The parts keep their modules and names. Their arrays become row ranges (views) of the stacked ones,
so memory does not grow, and saving, adapters and export see the parts as before. A part wrapped
by an adapter (`adapters.layers.LoRALinear`) adds its own delta to its range. A group whose parts
were replaced after stacking (another module put in place, as `nn.quantize` does) runs part by part.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

QUANTIZATION = ("group_size", "bits", "mode")


class StackedLinears:
    """A decoder layer's stacked linears, a plain object: their arrays are not the model's parameters
    (the parts hold views of them). The layer's compiled functions take `modules` as inputs, so a trace
    reads the stacked arrays of the moment, never a copy kept from its first call."""

    def __init__(self):
        self.modules: list[nn.Module] = []


class StackedGroup:
    """Parts of one kind as one linear over their stacked rows; the parts' arrays become its views."""

    def __init__(self, parts: list[nn.Module]):
        first = parts[0]
        self.parts = parts
        self.linear = type(first).__new__(type(first))
        nn.Module.__init__(self.linear)
        for name in QUANTIZATION:
            if hasattr(first, name):
                setattr(self.linear, name, getattr(first, name))
        rows = [part.weight.shape[0] for part in parts]
        self.bounds = [(sum(rows[:i]), sum(rows[: i + 1])) for i in range(len(parts))]
        for key in array_keys(first):
            self.linear[key] = mx.concatenate([part[key] for part in parts])
            for part, (start, stop) in zip(parts, self.bounds):
                part[key] = self.linear[key][start:stop]
        mx.eval(self.linear.parameters(), [part.parameters() for part in parts])


class Plan:
    """How to run a list of parts: `steps`, in order, each a part's index (run alone) or a StackedGroup
    with the indices of its parts."""

    def __init__(self, steps: list):
        self.steps = steps

    @property
    def linears(self) -> list[nn.Module]:
        return [step[0].linear for step in self.steps if not isinstance(step, int)]


def array_keys(linear: nn.Module) -> list[str]:
    return [key for key, value in linear.items() if isinstance(value, mx.array)]


def kind(linear: nn.Module):
    """What parts must share to be stacked: class, input width, dtypes, quantization; no bias."""
    if not isinstance(linear, (nn.Linear, nn.QuantizedLinear)) or "bias" in linear:
        return None
    dtypes = tuple((key, linear[key].dtype) for key in array_keys(linear))
    return type(linear), linear.weight.shape[1], dtypes, tuple(getattr(linear, name, None) for name in QUANTIZATION)


def stack(parts: list[nn.Module]) -> Plan:
    """The parts in order, those of one kind (two or more) gathered into a StackedGroup."""
    kinds = [kind(part) for part in parts]
    steps: list = []
    for index, part_kind in enumerate(kinds):
        members = [i for i, other in enumerate(kinds) if part_kind is not None and other == part_kind]
        if len(members) < 2:
            steps.append(index)
        elif index == members[0]:
            steps.append((StackedGroup([parts[i] for i in members]), members))
    return Plan(steps)


def project(plan: Plan | None, parts: list[nn.Module], x: mx.array) -> list[mx.array]:
    """Each part applied to x (in the parts' order), through the stacked groups of `plan` (from
    `stack` over the same parts' modules; None: part by part)."""
    if plan is None:
        return [part(x) for part in parts]
    outputs = [None] * len(parts)
    for step in plan.steps:
        if isinstance(step, int):
            outputs[step] = parts[step](x)
            continue
        group, indices = step
        if any(base_module(parts[i]) is not original for i, original in zip(indices, group.parts)):
            for i in indices:  # a part was replaced since stacking
                outputs[i] = parts[i](x)
            continue
        stacked = group.linear(x)
        for i, (start, stop) in zip(indices, group.bounds):
            piece = stacked[..., start:stop]
            outputs[i] = parts[i].with_delta(piece, x) if "base" in parts[i] else piece
    return outputs


def base_module(part: nn.Module) -> nn.Module:
    """The linear an adapter wraps (`base`), or the part itself."""
    return part.base if "base" in part else part


def stack_projections(model: nn.Module) -> None:
    """Stack every decoder layer's input projections and its MLP's gate and up (see above)."""
    for layer in model.language_model.layers:
        layer.input_plan = stack(layer.input_projections())
        layer.mlp.input_plan = stack([layer.mlp.gate_proj, layer.mlp.up_proj])
        layer.stacked.modules[:] = layer.input_plan.linears + layer.mlp.input_plan.linears


def unstack_projections(model: nn.Module) -> None:
    """Back to part by part (the parts' views stay their weights)."""
    for layer in model.language_model.layers:
        layer.input_plan = layer.mlp.input_plan = None
        layer.stacked.modules.clear()
