"""Projections of one input as one matmul (`mlx_gemma3n.architecture.stacking`): stacked at load, the same numbers as
part by part (prefill and compiled decode, float and int4, with an adapter), the same parameter names
and memory, and part by part again when the parts' weights or modules are replaced."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import prompt_ids
from mlx.utils import tree_flatten

from mlx_gemma3n import load
from mlx_gemma3n.architecture.stacking import unstack_projections
from mlx_gemma3n.convert import convert


def loaded_pair(path):
    """The model as `load` gives it (stacked) and the same model part by part."""
    stacked, _ = load(path)
    alone, _ = load(path)
    unstack_projections(alone)
    return stacked, alone


def groups(plan) -> list[list[nn.Module]]:
    return [step[0].parts for step in plan.steps if not isinstance(step, int)]


def prefill_and_decode(model, steps: int = 6) -> list[np.ndarray]:
    """Logits of a prompt, then of greedy decode steps (the compiled decode path)."""
    cache = model.make_cache()
    logits = model(mx.array(prompt_ids(3, 20)), cache=cache)
    out = [np.array(logits)]
    for _ in range(steps):
        logits = model(mx.argmax(logits[:, -1], axis=-1)[:, None], cache=cache)
        out.append(np.array(logits))
    return out


def assert_same_logits(a, b):
    for x, y in zip(prefill_and_decode(a), prefill_and_decode(b)):
        np.testing.assert_array_equal(x, y)


def test_float_model_stacks_each_layers_input_and_mlp_and_changes_no_number(tiny_ckpt_a):
    stacked, alone = loaded_pair(tiny_ckpt_a.path)
    for layer in stacked.language_model.layers:
        attention = layer.self_attn
        assert groups(layer.input_plan) == [[*attention.projections(), layer.laurel.linear_left]]
        assert groups(layer.mlp.input_plan) == [[layer.mlp.gate_proj, layer.mlp.up_proj]]
    assert any(not layer.self_attn.owns_kv for layer in stacked.language_model.layers)
    assert_same_logits(stacked, alone)


def test_parts_keep_their_names_and_the_memory_does_not_grow(tiny_ckpt_a, monkeypatch):
    import mlx_gemma3n.weights.loader as loader

    def memory_of_a_load():
        before = mx.get_active_memory()
        model, _ = load(tiny_ckpt_a.path)
        return model, mx.get_active_memory() - before

    stacked, stacked_bytes = memory_of_a_load()
    monkeypatch.setattr(loader, "stack_projections", lambda model: None)
    alone, alone_bytes = memory_of_a_load()
    assert [k for k, _ in tree_flatten(stacked.parameters())] == [k for k, _ in tree_flatten(alone.parameters())]
    # the stacked parts are ~1.1 MB of the ~3.2 MB loaded (the towers stay in their files): a copy of
    # them would add ~35%; the buffers' sizes round differently
    assert alone_bytes * 0.98 <= stacked_bytes <= alone_bytes * 1.02


def test_int4_model_stacks_its_quantized_parts_and_leaves_laurel_alone(tiny_ckpt_a, tmp_path):
    folder = convert(str(tiny_ckpt_a.path), tmp_path / "int4", quantize=True, q_group_size=32)
    stacked, alone = loaded_pair(folder)
    layer = stacked.language_model.layers[0]
    (attention_group,) = groups(layer.input_plan)
    assert attention_group == layer.self_attn.projections()
    assert all(isinstance(part, nn.QuantizedLinear) for part in attention_group)
    assert layer.input_plan.steps[-1] == len(attention_group)  # LAuReL's float left map, alone
    assert_same_logits(stacked, alone)


def test_an_adapter_adds_its_delta_to_its_rows(tiny_ckpt_a, tmp_path):
    from test_adapters import ADAPTER_ONE, make_adapter

    make_adapter(tiny_ckpt_a.path, tmp_path / "adapter", 0, **ADAPTER_ONE)
    stacked, alone = loaded_pair(tiny_ckpt_a.path)
    for model in (stacked, alone):
        model.load_adapter(str(tmp_path / "adapter"))
    assert groups(stacked.language_model.layers[0].input_plan)
    assert_same_logits(stacked, alone)


@pytest.mark.parametrize("replacement", ["load_weights", "quantize"])
def test_replaced_parts_run_part_by_part(tiny_ckpt_a, replacement):
    stacked, alone = loaded_pair(tiny_ckpt_a.path)
    layer = "language_model.layers.0"
    for model in (stacked, alone):
        if replacement == "load_weights":
            q_proj = model.language_model.layers[0].self_attn.q_proj
            model.load_weights([(f"{layer}.self_attn.q_proj.weight", mx.ones_like(q_proj.weight))], strict=False)
        else:
            nn.quantize(model, group_size=32, bits=8, class_predicate=lambda path, module: path.startswith(f"{layer}.mlp."))
    assert_same_logits(stacked, alone)
