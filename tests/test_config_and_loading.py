"""Reading real config files, the weight-name map against the real E2B index, and loader errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from transformers import Gemma3nTextConfig

from mlx_gemma3n import Gemma3nError, load
from mlx_gemma3n.architecture.config import FULL, SLIDING, ModelConfig, TextConfig, load_config
from mlx_gemma3n.architecture.model import Model
from mlx_gemma3n.weights.files import our_name

E2B = Path(__file__).parent / "data" / "gemma-3n-E2B-it"


def test_google_e2b_config():
    config = load_config(E2B)
    text = config.text
    assert config.model_type == "gemma3n" and config.eos_token_ids == [1, 106]
    assert (text.num_hidden_layers, text.hidden_size, text.num_kv_shared_layers) == (30, 2048, 10)
    assert text.intermediate_size == [8192] * 30
    assert (text.rope_theta_full, text.rope_theta_sliding) == (1_000_000.0, 10_000.0)
    assert text.layer_types.count(FULL) == 6 and text.layer_types[4] == FULL
    assert text.activation_sparsity_pattern == [0.95] * 10 + [0.0] * 20
    assert (config.vision.vocab_offset, config.audio.vocab_offset, config.audio.hidden_size) == (262144, 262272, 1536)


def test_transformers5_config_with_rope_parameters(tiny_ckpt_b):
    raw = json.loads((tiny_ckpt_b.path / "config.json").read_text())
    assert "rope_parameters" in raw["text_config"], "fixture should be written in Transformers 5's key style"
    text = load_config(tiny_ckpt_b.path).text
    assert (text.rope_theta_full, text.rope_theta_sliding) == (500_000.0, 5_000.0)
    assert text.intermediate_size == [96] * 8


def test_e4b_is_transformers_defaults():
    """An empty text config is E4B, exactly as Transformers' Gemma3nTextConfig() defaults."""
    ours, theirs = TextConfig(), Gemma3nTextConfig()
    for name, value in asdict(ours).items():
        if name.startswith("rope_theta"):
            kind = FULL if name.endswith("full") else SLIDING
            assert value == theirs.rope_parameters[kind]["rope_theta"], name
        else:
            assert value == getattr(theirs, name), name
    assert (ours.num_hidden_layers, ours.intermediate_size[0], ours.num_kv_shared_layers) == (35, 16384, 15)


@pytest.mark.parametrize("config", [TextConfig(), load_config(E2B).text])
def test_kv_sharing_plan_matches_transformers(config):
    """Each KV-shared layer reads the last non-shared layer of its type (Transformers' 'store' layer)."""
    theirs = Gemma3nTextConfig(
        num_hidden_layers=config.num_hidden_layers,
        num_kv_shared_layers=config.num_kv_shared_layers,
        layer_types=config.layer_types,
        intermediate_size=config.intermediate_size,
    ).kv_sharing_modes
    stores = {config.layer_types[i]: i for i, mode in enumerate(theirs) if mode == "store"}
    for i in range(config.num_hidden_layers):
        expected = stores[config.layer_types[i]] if theirs[i] == "reuse" else i
        assert config.kv_source(i) == expected
    assert sum(mode != "reuse" for mode in theirs) == config.first_kv_shared_layer == 20


def test_other_model_type_is_refused():
    with pytest.raises(Gemma3nError, match="model_type is 'llama'"):
        ModelConfig.from_dict({"model_type": "llama"})


def test_parameter_names_equal_the_real_e2b_index():
    """All 1556 tensors of the real E2B checkpoint (language model, towers, embedders), built from the
    real config without allocating weights (MLX arrays stay lazy)."""
    config = load_config(E2B)
    ours = {name for name, _ in tree_flatten(Model(config).parameters())}
    index = json.loads((E2B / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(index) == 1556
    assert ours == {our_name(name, config) for name in index} - {None}
    dropped = [name for name in index if our_name(name, config) is None]
    assert len(dropped) == 30 and all(".self_attn.k_" in n or ".self_attn.v_" in n for n in dropped)


@pytest.fixture
def folder(tiny_ckpt_a, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_ckpt_a.path, target)
    return target


def test_sharded_checkpoint_loads(folder):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in halves.items():
        save_file({n: tensors[n] for n in shard_names}, folder / shard)
        weight_map.update({n: shard for n in shard_names})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = load(folder)
    assert model.language_model.norm.weight.shape == (64,)


def test_missing_shard_is_named(folder):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))
    with pytest.raises(Gemma3nError, match="model-00002.safetensors"):
        load(folder)


def test_truncated_shard_is_named(folder):
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(Gemma3nError, match="model.safetensors is truncated"):
        load(folder)


def test_garbage_shard_is_named(folder):
    (folder / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(Gemma3nError, match="not a readable safetensors"):
        load(folder)


def test_missing_and_unexpected_weights_are_listed(folder):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors.pop("model.language_model.norm.weight")
    tensors["model.language_model.extra.weight"] = tensors["model.language_model.per_layer_projection_norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(Gemma3nError, match=r"1 missing: language_model\.norm\.weight; 1 unexpected: language_model\.extra"):
        load(folder)


def test_pickle_only_folder_is_refused(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(Gemma3nError, match="only PyTorch pickle weights"):
        load(folder)


def test_missing_path_and_non_model_folder(tmp_path):
    with pytest.raises(Gemma3nError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(Gemma3nError, match="no config.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(Gemma3nError, match="model_type is 'bert'"):
        load(tmp_path)


def test_unreachable_hub_id_says_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Gemma3nError, match="cannot download 'google/not-a-model-xyz'"):
        load("google/not-a-model-xyz")


def test_dtype_override_and_checkpoint_dtype(tiny_ckpt_a):
    model, _ = load(tiny_ckpt_a.path)
    assert model.language_model.layers[0].mlp.up_proj.weight.dtype == mx.float32
    model, _ = load(tiny_ckpt_a.path, dtype="float16")
    assert model.language_model.layers[0].mlp.up_proj.weight.dtype == mx.float16
    with pytest.raises(Gemma3nError, match="unknown dtype 'int3'"):
        load(tiny_ckpt_a.path, dtype="int3")


def test_ple_table_and_towers_stay_out_of_memory_after_load(tiny_ckpt_a):
    """The PLE table is read from its file a row at a time; tower weights load on first use."""
    from mlx_gemma3n.weights.mapped import MappedEmbedding

    mx.clear_cache()
    before = mx.get_active_memory()
    model, _ = load(tiny_ckpt_a.path)
    resident = mx.get_active_memory() - before
    table = model.language_model.embed_tokens_per_layer
    assert isinstance(table, MappedEmbedding)
    text = model.config.text
    ple_bytes = text.vocab_size_per_layer_input * text.num_hidden_layers * text.hidden_size_per_layer_input * 4
    towers = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k.startswith(("vision_tower", "audio_tower")))
    others = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if not k.startswith(("vision_tower", "audio_tower")))
    assert towers > 0 and resident < others + ple_bytes // 2 and resident < others + towers // 2
    rows = table(mx.array([[5, 0]]))
    assert rows.shape == (1, 2, text.num_hidden_layers * text.hidden_size_per_layer_input)
