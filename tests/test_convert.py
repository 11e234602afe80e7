"""Conversion HF -> MLX folder: round trips per recipe, folder layout, sharding, atomicity, bad input.

Quality floors come from benchmarks/quant_quality.py (benchmarks/RESULTS.md), measured on these
tiny random checkpoints at group size 32 over 320 positions, float parts bf16 (the default): bf16 KL
0.013 (top-1 0.75); uniform8 KL 0.013 (top-1 0.79); mixed 0.26; uniform4 0.36; mixed3 0.44; and in
MLX's float modes uniform4 mxfp4 0.46, nvfp4 0.42, uniform8 mxfp8 0.14.
Random tiny models have small logit margins, so top-1 agreement is low even for small errors; KL
is the main measure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gemma3n import Gemma3nError, load
from mlx_gemma3n.convert import convert
from mlx_gemma3n.convert import shards as shards_module
from mlx_gemma3n.weights.mapped import MappedEmbedding
from mlx_gemma3n.weights.quantization import FLOAT_MODES

FLOORS = {  # recipe: (min top-1 agreement, max mean KL), float parts bf16
    None: (0.65, 0.03),  # not quantized
    "uniform8": (0.7, 0.025),
    "mixed": (0.15, 0.35),
    "uniform4": (0.06, 0.5),
    "mixed3": (0.05, 0.6),
}
MODE_MAX_KL = {"mxfp4": 0.6, "nvfp4": 0.55, "mxfp8": 0.2}


def positions() -> mx.array:
    ids = mx.random.randint(3, 512, (4, 80), key=mx.random.key(1))
    return mx.concatenate([mx.full((4, 1), 2, dtype=ids.dtype), ids[:, 1:]], axis=1)


def quality(reference_logits, logits) -> tuple[float, float]:
    ref = nn.log_softmax(reference_logits.astype(mx.float32), axis=-1)
    ours = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    kl = mx.mean(mx.sum(mx.exp(ref) * (ref - ours), axis=-1)).item()
    agree = mx.mean(mx.argmax(reference_logits, -1) == mx.argmax(logits, -1)).item()
    return agree, kl


@pytest.fixture(scope="module")
def float_logits(tiny_ckpt_a):
    model, _ = load(tiny_ckpt_a.path)
    return model(positions())


@pytest.mark.parametrize("recipe", list(FLOORS))
def test_round_trip_quality(tiny_ckpt_a, float_logits, tmp_path, recipe):
    out = convert(str(tiny_ckpt_a.path), tmp_path / "out", quantize=recipe is not None, quant_recipe=recipe, q_group_size=32)
    model, _ = load(out)
    agree, kl = quality(float_logits, model(positions()))
    min_agree, max_kl = FLOORS[recipe]
    assert agree >= min_agree and kl <= max_kl, (recipe, agree, kl)
    if recipe:
        assert isinstance(model.language_model.embed_tokens, nn.QuantizedEmbedding)
        assert model.language_model.embed_tokens_per_layer.bits in (4, 8)  # memory-mapped, quantized
        layer = model.language_model.layers[0]
        assert isinstance(layer.mlp.down_proj, nn.QuantizedLinear)
        assert isinstance(layer.altup.modality_router, nn.Linear) and not isinstance(layer.altup.modality_router, nn.QuantizedLinear)
        assert not isinstance(layer.laurel.linear_left, nn.QuantizedLinear)


def test_quantized_models_compute_in_float32_on_cpu(tiny_ckpt_a, tmp_path):
    """MLX's CPU quantized matmul is ~10x faster with float32 activations; weights stay packed."""
    out = convert(str(tiny_ckpt_a.path), tmp_path / "out", quantize=True, q_group_size=32)
    model, _ = load(out)
    assert model(positions()).dtype == (mx.float32 if mx.default_device().type == mx.DeviceType.cpu else mx.bfloat16)
    assert model.language_model.layers[0].mlp.up_proj.weight.dtype == mx.uint32
    assert load(out, dtype="bfloat16")[0](positions()).dtype == mx.bfloat16


def test_mixed_recipe_bits_and_ordering(tiny_ckpt_a, float_logits, tmp_path):
    mixed, _ = load(convert(str(tiny_ckpt_a.path), tmp_path / "mixed", quant_recipe="mixed", quantize=True, q_group_size=32))
    uniform, _ = load(convert(str(tiny_ckpt_a.path), tmp_path / "u4", quantize=True, q_group_size=32))
    lm = mixed.language_model
    assert lm.embed_tokens.bits == 8 and lm.layers[0].self_attn.q_proj.bits == 8
    assert lm.layers[0].mlp.up_proj.bits == 4
    assert isinstance(lm.embed_tokens_per_layer, MappedEmbedding) and lm.embed_tokens_per_layer.bits == 4
    assert quality(float_logits, mixed(positions()))[1] < quality(float_logits, uniform(positions()))[1]


@pytest.mark.parametrize("mode", list(FLOAT_MODES))
def test_float_modes(tiny_ckpt_a, float_logits, tmp_path, mode):
    """--q-mode mxfp4 / mxfp8 / nvfp4: each weight is MLX's quantization of the float32 source in
    that mode (uint8 scales, no biases), the PLE table stays mapped in it, and the quality holds its
    measured floor."""
    bits, group_size = FLOAT_MODES[mode]
    out = convert(str(tiny_ckpt_a.path), tmp_path / mode, quantize=True, q_mode=mode)
    block = json.loads((out / "config.json").read_text())["quantization"]
    assert (block["mode"], block["bits"], block["group_size"], block["recipe"]) == (mode, bits, group_size, f"uniform{bits}")
    assert f"--q-mode {mode}" in (out / "README.md").read_text()
    model, _ = load(out)
    source, _ = load(tiny_ckpt_a.path, dtype="float32")
    up, float_up = model.language_model.layers[0].mlp.up_proj, source.language_model.layers[0].mlp.up_proj
    weight, scales = mx.quantize(float_up.weight, group_size=group_size, bits=bits, mode=mode)
    assert up.mode == mode and "biases" not in up and up.scales.dtype == mx.uint8
    assert mx.array_equal(up.weight, weight) and mx.array_equal(up.scales, scales)
    assert model.language_model.embed_tokens_per_layer.mode == mode
    assert quality(float_logits, model(positions()))[1] <= MODE_MAX_KL[mode]


def test_mixed_recipes_across_modes_and_bits(tiny_ckpt_a, float_logits, tmp_path):
    """mixed in mxfp4: the 8-bit modules become per-module mxfp8 entries; mixed3 (affine): the MLP at 3 bits."""
    out = convert(str(tiny_ckpt_a.path), tmp_path / "mixed-mxfp4", quantize=True, q_mode="mxfp4", quant_recipe="mixed")
    block = json.loads((out / "config.json").read_text())["quantization"]
    assert block["language_model.embed_tokens"] == {"bits": 8, "group_size": 32, "mode": "mxfp8"}
    assert "language_model.layers.0.mlp.up_proj" not in block  # the folder's default: mxfp4
    lm = load(out)[0].language_model
    assert (lm.embed_tokens.mode, lm.layers[0].self_attn.q_proj.mode, lm.layers[0].mlp.up_proj.mode) == ("mxfp8", "mxfp8", "mxfp4")
    lean, _ = load(convert(str(tiny_ckpt_a.path), tmp_path / "mixed3", quantize=True, quant_recipe="mixed3", q_group_size=32))
    lm = lean.language_model
    assert (lm.layers[0].mlp.down_proj.bits, lm.layers[0].self_attn.o_proj.bits, lm.embed_tokens.bits) == (3, 4, 4)
    assert quality(float_logits, lean(positions()))[1] <= FLOORS["mixed3"][1]


def test_quantized_towers(tiny_ckpt_a, tmp_path):
    """--quantize-towers: the audio Linears and the vision tower's pointwise convolutions (input
    width dividing by the group) become quantized matmuls; at 8 bits the towers' outputs stay within
    the measured error of float towers (benchmarks/tower_quality.py: vision 0.023, audio 0.005 rel.
    L2); a dequantizing export gives the convolutions their 4-D shape back."""
    kwargs = dict(quantize=True, q_bits=8, q_group_size=32)
    float_towers, _ = load(convert(str(tiny_ckpt_a.path), tmp_path / "float-towers", **kwargs))
    packed = convert(str(tiny_ckpt_a.path), tmp_path / "packed-towers", q_tower_bits=8, **kwargs)
    model, _ = load(packed)
    vision = [m for p, m in model.named_modules() if p.startswith("vision_tower.")]
    audio = [m for p, m in model.named_modules() if p.startswith("audio_tower.")]
    assert sum(isinstance(m, nn.QuantizedLinear) for m in vision) > 10
    assert all(not isinstance(m, nn.Linear) or isinstance(m, nn.QuantizedLinear) for m in audio)
    pixels = mx.random.uniform(shape=(1, 768, 768, 3), key=mx.random.key(0))
    features = mx.random.normal((1, 96, 128), key=mx.random.key(1))

    def relative(a, b):
        return (mx.linalg.norm(a.astype(mx.float32) - b.astype(mx.float32)) / mx.linalg.norm(a.astype(mx.float32))).item()

    assert relative(float_towers.vision_tower(pixels), model.vision_tower(pixels)) <= 0.05
    assert relative(float_towers.audio_tower(features)[0], model.audio_tower(features)[0]) <= 0.02
    unpacked, _ = load(convert(str(packed), tmp_path / "dequantized", dequantize=True))
    conv = unpacked.vision_tower.timm_model.conv_stem.conv  # a 3x3 one, never packed
    assert conv.weight.ndim == 4
    assert relative(model.vision_tower(pixels), unpacked.vision_tower(pixels)) <= 0.03  # bf16 rounding of the float parts
    with pytest.raises(Gemma3nError, match="--quantize-towers quantizes the towers along with the decoder"):
        convert(str(tiny_ckpt_a.path), tmp_path / "x", q_tower_bits=8)


def tower_settings(model) -> set:
    return {(m.bits, m.mode) for p, m in model.named_modules()
            if p.startswith(("vision_tower.", "audio_tower.")) and isinstance(m, nn.QuantizedLinear)}


def test_towers_take_their_own_bits(tiny_ckpt_a, tmp_path):
    """`--quantize-towers` alone puts the towers at 8 bits beside a 4-bit decoder (8 is near-lossless
    on the towers where 4 is not); `--quantize-towers 4` at 4; in a float mode 8 bits is mxfp8."""
    run = [sys.executable, "-m", "mlx_gemma3n.convert", "--hf-path", str(tiny_ckpt_a.path), "-q", "--q-group-size", "32"]
    done = subprocess.run(run + ["--mlx-path", str(tmp_path / "t8"), "--quantize-towers"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model, _ = load(tmp_path / "t8")
    assert model.language_model.layers[0].mlp.up_proj.bits == 4 and tower_settings(model) == {(8, "affine")}
    model, _ = load(convert(str(tiny_ckpt_a.path), tmp_path / "t4", quantize=True, q_group_size=32, q_tower_bits=4))
    assert tower_settings(model) == {(4, "affine")}
    model, _ = load(convert(str(tiny_ckpt_a.path), tmp_path / "fp", quantize=True, q_mode="mxfp4", q_tower_bits=8))
    assert model.language_model.layers[0].mlp.up_proj.mode == "mxfp4" and tower_settings(model) == {(8, "mxfp8")}


def test_output_folder_layout(tiny_ckpt_a, tmp_path):
    out = convert(str(tiny_ckpt_a.path), tmp_path / "out", quantize=True, q_bits=8, q_group_size=32)
    names = {p.name for p in out.iterdir()}
    for expected in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "chat_template.jinja", "generation_config.json", "README.md"):
        assert expected in names
    config = json.loads((out / "config.json").read_text())
    block = config["quantization"]
    assert (block["bits"], block["group_size"], block["recipe"]) == (8, 32, "uniform8")
    assert block["language_model.layers.0.per_layer_projection"] is False  # 16 wide: does not divide by 32
    assert config["dtype"] == "bfloat16" and config["model_type"] == "gemma3n"
    card = (out / "README.md").read_text()
    assert str(tiny_ckpt_a.path) in card and "--q-group-size 32" in card
    assert not list(tmp_path.glob(".*partial*"))


def test_sharded_output_loads_like_a_single_file(tiny_ckpt_a, tmp_path):
    single, _ = load(convert(str(tiny_ckpt_a.path), tmp_path / "single"))
    out = convert(str(tiny_ckpt_a.path), tmp_path / "sharded", max_shard_bytes=2_000_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and (out / "model.safetensors.index.json").is_file()
    sharded, _ = load(out)
    ids = positions()
    assert mx.array_equal(single(ids), sharded(ids))


def test_dtype_override_of_a_converted_folder(tiny_ckpt_a, tmp_path):
    out = convert(str(tiny_ckpt_a.path), tmp_path / "out", quantize=True, q_group_size=32)
    model, _ = load(out, dtype="float32")
    assert model.language_model.norm.weight.dtype == mx.float32
    assert model.language_model.layers[0].mlp.up_proj.scales.dtype == mx.float32


def test_float16_gives_finite_logits(tiny_ckpt_a, tiny_ckpt_b, tmp_path):
    for checkpoint in (tiny_ckpt_a, tiny_ckpt_b):
        model, _ = load(convert(str(checkpoint.path), tmp_path / checkpoint.path.name, dtype="float16"))
        capture = {}
        logits = model(positions(), capture=capture)
        # The decoder computes in float16 (on CPU the LM head may widen the logits to float32).
        assert capture["final_norm"].dtype == mx.float16 and bool(mx.all(mx.isfinite(logits)))


def test_interrupted_conversion_leaves_nothing_loadable(tiny_ckpt_a, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = shards_module.ShardWriter.add

    def failing_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        original(self, name, tensor)

    monkeypatch.setattr(shards_module.ShardWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        convert(str(tiny_ckpt_a.path), tmp_path / "out", max_shard_bytes=100_000)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def source(tiny_ckpt_a, tmp_path) -> Path:
    target = tmp_path / "src"
    shutil.copytree(tiny_ckpt_a.path, target)
    return target


def assert_refused(src, dst, match, **kwargs):
    with pytest.raises(Gemma3nError, match=match):
        convert(str(src), dst, **kwargs)
    assert not dst.exists() or not any(dst.iterdir())
    assert not list(dst.parent.glob(f".{dst.name}.partial*"))


def test_bad_sources_are_refused_before_writing(source, tmp_path):
    dst = tmp_path / "out"
    assert_refused(tmp_path / "missing", dst, "does not exist")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    assert_refused(source, dst, "model_type is 'qwen2'")
    (source / "config.json").write_text(json.dumps(config))
    shard = source / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5000])
    assert_refused(source, dst, "model.safetensors is truncated")
    shard.unlink()
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    assert_refused(source, dst, "model-00001-of-00002.safetensors")
    (source / "model.safetensors.index.json").unlink()
    (source / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert_refused(source, dst, "only PyTorch pickle weights")


def test_bad_options_are_refused(tiny_ckpt_a, tmp_path):
    dst = tmp_path / "out"
    assert_refused(tiny_ckpt_a.path, dst, "--q-bits must be one of 2, 3, 4, 5, 6, 8, got 7", quantize=True, q_bits=7)
    assert_refused(tiny_ckpt_a.path, dst, "--q-group-size must be", quantize=True, q_group_size=48)
    assert_refused(tiny_ckpt_a.path, dst, "unknown --q-mode 'fp4'", quantize=True, q_mode="fp4")
    assert_refused(tiny_ckpt_a.path, dst, "--q-mode mxfp4 has 4 bits in groups of 32", quantize=True, q_mode="mxfp4", q_bits=8)
    assert_refused(tiny_ckpt_a.path, dst, "--q-mode nvfp4 has 4 bits in groups of 16", quantize=True, q_mode="nvfp4", q_group_size=64)
    assert_refused(tiny_ckpt_a.path, dst, "recipe mixed3 puts .* at 3 bits, which no float mode has", quantize=True,
                   q_mode="mxfp4", quant_recipe="mixed3")
    assert_refused(tiny_ckpt_a.path, dst, "unknown quantization recipe 'fancy'", quantize=True, quant_recipe="fancy")
    assert_refused(tiny_ckpt_a.path, dst, "--quantize-towers takes bits in 2, 3, 4, 5, 6, 8, got 7", quantize=True, q_tower_bits=7)
    assert_refused(tiny_ckpt_a.path, dst, "unknown dtype", dtype="int8")


def test_non_empty_destination_needs_force(tiny_ckpt_a, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(Gemma3nError, match="pass --force"):
        convert(str(tiny_ckpt_a.path), dst)
    assert (dst / "keep.txt").read_text() == "mine"
    convert(str(tiny_ckpt_a.path), dst, force=True)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()


def test_cli(tiny_ckpt_a, tmp_path):
    run = [sys.executable, "-m", "mlx_gemma3n.convert", "--hf-path", str(tiny_ckpt_a.path)]
    ok = subprocess.run(run + ["--mlx-path", str(tmp_path / "q"), "-q", "--q-group-size", "32"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "stays float" in ok.stderr and load(tmp_path / "q")
    bad = subprocess.run(run + ["--mlx-path", str(tmp_path / "x"), "-q", "--q-bits", "7"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --q-bits must be one of 2, 3, 4, 5, 6, 8, got 7"
    assert not (tmp_path / "x").exists()


def test_failed_upload_keeps_the_folder_and_says_why(tiny_ckpt_a, tmp_path):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mlx_gemma3n.convert", "--hf-path", str(tiny_ckpt_a.path), "--mlx-path",
         str(tmp_path / "out"), "--upload-repo", "someone/gemma-3n-test"],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "upload to 'someone/gemma-3n-test' failed" in result.stderr
    assert load(tmp_path / "out")


def test_converted_folder_keeps_working_towers(tiny_ckpt_a, tmp_path):
    """Tower weights pass through conversion (float, PyTorch layout) and the towers give the same
    outputs (the embedders' projections after them are quantized like any Linear)."""
    original, _ = load(tiny_ckpt_a.path)
    converted, _ = load(convert(str(tiny_ckpt_a.path), tmp_path / "out", dtype="float32", quantize=True, q_group_size=32))
    rng = np.random.default_rng(0)
    pixels = rng.random((1, 256, 256, 3), dtype=np.float32)
    features, valid = rng.standard_normal((40, 128)).astype(np.float32), np.ones(40, dtype=bool)
    assert mx.array_equal(original.vision_tower(mx.array(pixels)), converted.vision_tower(mx.array(pixels)))
    audio_in = (mx.array(features)[None], mx.array(valid)[None])
    assert mx.array_equal(original.audio_tower(*audio_in)[0], converted.audio_tower(*audio_in)[0])
    assert isinstance(converted.embed_vision.embedding_projection, nn.QuantizedLinear)
