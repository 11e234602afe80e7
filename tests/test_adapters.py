"""PEFT LoRA adapters against Transformers + PEFT: unfused over float and int4 bases, switching,
fused into MLX folders and Transformers checkpoints, and bad adapter folders.

The adapters are made with the real `peft` package (get_peft_model + save_pretrained) on the tiny
random checkpoints; PEFT starts B at zero, so every LoRA matrix (and every tuned copy of a module
to save) is randomised before saving.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from helpers import greedy_ignoring_eos, prompt_ids, relative_error
from mlx.utils import tree_flatten
from reference import load_reference_model, reference_greedy, reference_logits
from test_convert import FLOORS, quality
from test_multimodal import hf_inputs, hf_processor, media, messages_with  # noqa: F401 (fixtures)

from mlx_gemma3n import Gemma3nError, load
from mlx_gemma3n.adapters import LoRALinear, TunedEmbedding
from mlx_gemma3n.convert import convert
from mlx_gemma3n.decoding.sampling import SamplingParams
from mlx_gemma3n.fuse import main as fuse_main
from mlx_gemma3n.generate import Session, prepare_prompt

TOLERANCE = 1e-4
# Attention, MLP, per-layer input gate/projection, LAuReL, the AltUp router, the audio tower's
# attention and FFW (q/k/v_proj, post, ffw_layer_1), both embedders' projections.
ADAPTER_ONE = dict(
    r=4, lora_alpha=8,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "per_layer_input_gate",
                    "per_layer_projection", "linear_left", "modality_router", "ffw_layer_1", "post", "embedding_projection"],
    rank_pattern={"down_proj": 2, "linear_left": 3}, alpha_pattern={"o_proj": 3.0},
)
# rslora, chosen layers only, AltUp coefficient matrices, a tuned token embedding (modules_to_save).
ADAPTER_TWO = dict(
    r=2, lora_alpha=5, use_rslora=True, layers_to_transform=[0, 2, 4, 7], layers_pattern="layers",
    target_modules=["q_proj", "v_proj", "up_proj", "linear_right", "prediction_coefs", "correction_coefs"],
    modules_to_save=["embed_tokens"],
)
# A regex string over the text-only model's names (`model.layers.N...`).
ADAPTER_TEXT_ONLY = dict(r=3, lora_alpha=6, target_modules=r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj|per_layer_projection)")


def make_adapter(base_path, folder, seed: int, **lora_config):
    """A PEFT LoRA adapter over the checkpoint at `base_path`, every matrix random, saved to `folder`;
    returns the reference model running it."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_reference_model(base_path), LoraConfig(**lora_config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(str(folder))
    # The Transformers model with PEFT's layers in place: `reference_greedy` sets its generation
    # config on the model it is given, which a PeftModel would keep to itself (and sample).
    return peft_model.eval().get_base_model()


@pytest.fixture(scope="module")
def adapters(tiny_ckpt_a, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: (root / name, make_adapter(tiny_ckpt_a.path, root / name, seed, **config))
        for seed, (name, config) in enumerate([("one", ADAPTER_ONE), ("two", ADAPTER_TWO)])
    }


@pytest.fixture(scope="module")
def quantized_base(tiny_ckpt_a, tmp_path_factory):
    return convert(str(tiny_ckpt_a.path), tmp_path_factory.mktemp("int4") / "out", quantize=True, q_group_size=32)


def ids(seed=0, length=40):
    return prompt_ids(seed, length)


def our_logits(model, seed=0) -> np.ndarray:
    return np.array(model(mx.array(ids(seed))))


@pytest.mark.parametrize("name", ["one", "two"])
def test_unfused_logits_equal_peft(tiny_ckpt_a, adapters, name):
    folder, peft_model = adapters[name]
    model, _ = load(tiny_ckpt_a.path, adapter_path=folder)
    expected = reference_logits(peft_model, ids())
    assert relative_error(our_logits(model), expected) <= TOLERANCE
    assert relative_error(reference_logits(tiny_ckpt_a.model, ids()), expected) > 0.05  # the adapter matters


def test_wrappers_keep_the_base_module(tiny_ckpt_a, adapters):
    model, _ = load(tiny_ckpt_a.path, adapter_path=adapters["two"][0])
    layer = model.language_model.layers[2]
    assert isinstance(layer.self_attn.q_proj, LoRALinear) and isinstance(layer.self_attn.q_proj.base, nn.Linear)
    assert not isinstance(model.language_model.layers[1].self_attn.q_proj, LoRALinear)  # layers_to_transform
    assert isinstance(model.language_model.embed_tokens, TunedEmbedding)
    trainable = {k for k, _ in tree_flatten(layer.self_attn.q_proj.trainable_parameters())}
    assert {"lora_a", "lora_b"} <= trainable and not any(k.startswith("base.") for k in trainable)


def test_greedy_64_tokens_equal_peft(tiny_ckpt_a, adapters):
    folder, peft_model = adapters["one"]
    model, processor = load(tiny_ckpt_a.path, adapter_path=folder)
    prompt = ids(3, 20)
    expected = reference_greedy(peft_model, prompt, 64, stop_at_eos=False)
    assert greedy_ignoring_eos(model, processor, list(map(int, prompt[0])), 64) == expected


def test_audio_prompt_greedy_equals_peft(tiny_ckpt_a, adapters, hf_processor, media):
    """Adapter one also targets the audio tower's linears and the audio embedder's projection."""
    folder, peft_model = adapters["one"]
    model, processor = load(tiny_ckpt_a.path, adapter_path=folder)
    messages = messages_with(media, image=False, audio=True)
    inputs = hf_inputs(hf_processor, messages)
    extra = {k: v for k, v in inputs.items() if k in ("input_features", "input_features_mask")}
    expected_logits = reference_logits(peft_model, inputs["input_ids"], **extra)
    prompt = prepare_prompt(processor, messages)
    prompt_ids_ = mx.array([prompt.ids])
    logits = model(prompt_ids_, embeddings=model.embed_with_media(prompt_ids_, prompt.images, prompt.audio))
    assert relative_error(logits, expected_logits) <= TOLERANCE
    expected = reference_greedy(peft_model, inputs["input_ids"], 64, stop_at_eos=False, **extra)
    assert greedy_ignoring_eos(model, processor, prompt, 64) == expected


def test_text_only_base_with_a_regex_target(tiny_ckpt_text_only, tmp_path):
    peft_model = make_adapter(tiny_ckpt_text_only.path, tmp_path / "adapter", 5, **ADAPTER_TEXT_ONLY)
    model, _ = load(tiny_ckpt_text_only.path, adapter_path=tmp_path / "adapter")
    assert relative_error(our_logits(model), reference_logits(peft_model, ids())) <= TOLERANCE


def test_switching_adapters_is_exact(tiny_ckpt_a, adapters):
    base, _ = load(tiny_ckpt_a.path)
    expected_base = our_logits(base)
    singles = {name: our_logits(load(tiny_ckpt_a.path, adapter_path=folder)[0]) for name, (folder, _) in adapters.items()}
    for name, (folder, _) in adapters.items():
        base.load_adapter(folder, name)
    fingerprints = set()
    for name in ["one", None, "two", "one", None]:
        base.set_adapter(name)
        fingerprints.add(base.fingerprint())
        assert np.array_equal(our_logits(base), expected_base if name is None else singles[name]), name
    assert len(fingerprints) == 3  # prompt-cache files made under one adapter do not fit another
    with pytest.raises(Gemma3nError, match="no adapter named 'three'"):
        base.set_adapter("three")


def test_kv_shared_targets_are_ignored(tiny_ckpt_shared_kv, adapters, tmp_path, capfd):
    """Adapters trained on Google's files may carry LoRA weights for the unused k/v projections of
    the KV-shared layers (5..9 here): loaded with a note, without effect."""
    folder, peft_model = adapters["one"]
    shutil.copytree(folder, tmp_path / "adapter")
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = dict(mx.load(str(file)))
    prefix = "base_model.model.model.language_model.layers"
    for kind in ("k_proj", "v_proj"):
        for part in ("lora_A", "lora_B"):
            tensors[f"{prefix}.7.self_attn.{kind}.{part}.weight"] = tensors[f"{prefix}.3.self_attn.{kind}.{part}.weight"]
    mx.save_safetensors(str(file), tensors)
    model, _ = load(tiny_ckpt_shared_kv.path, adapter_path=tmp_path / "adapter")
    assert "KV-shared" in capfd.readouterr().err
    assert relative_error(our_logits(model), reference_logits(peft_model, ids())) <= TOLERANCE


@pytest.fixture(scope="module")
def fused(tiny_ckpt_a, adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    for name, extra in (("mlx", []), ("hf", ["--hf-format"])):
        args = ["--model", str(tiny_ckpt_a.path), "--adapter-path", str(adapters["one"][0]), "--save-path", str(root / name)]
        assert fuse_main(args + extra) == 0
    return root


def test_fused_mlx_folder_equals_peft(adapters, fused):
    _, peft_model = adapters["one"]
    model, processor = load(fused / "mlx")
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert relative_error(our_logits(model), reference_logits(peft_model, ids())) <= TOLERANCE
    prompt = ids(3, 20)
    assert greedy_ignoring_eos(model, processor, list(map(int, prompt[0])), 64) == reference_greedy(peft_model, prompt, 64, stop_at_eos=False)


def test_hf_format_loads_in_transformers(adapters, fused):
    from transformers import Gemma3nForConditionalGeneration

    _, peft_model = adapters["one"]
    exported = Gemma3nForConditionalGeneration.from_pretrained(str(fused / "hf"), dtype=torch.float32).eval()
    expected = reference_logits(peft_model, ids())
    assert relative_error(reference_logits(exported, ids()), expected) <= TOLERANCE
    model, _ = load(fused / "hf")
    assert relative_error(our_logits(model), reference_logits(exported, ids())) <= TOLERANCE
    prompt = ids(3, 20)
    assert reference_greedy(exported, prompt, 64, stop_at_eos=False) == reference_greedy(peft_model, prompt, 64, stop_at_eos=False)
    names = set(json.loads((fused / "hf" / "model.safetensors.index.json").read_text())["weight_map"]) if (
        fused / "hf" / "model.safetensors.index.json").exists() else set(mx.load(str(fused / "hf" / "model.safetensors")))
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in names
    assert any(n.startswith("model.vision_tower.timm_model.") for n in names)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (fused / "hf" / file).is_file(), file


def test_quantized_model_exports_to_transformers(tiny_ckpt_a, quantized_base, tmp_path):
    """A plain int4 folder written back as float Transformers weights: its layers dequantized
    exactly, the towers in PyTorch layout; Transformers' logits on it are ours."""
    from transformers import Gemma3nForConditionalGeneration

    assert fuse_main(["--model", str(quantized_base), "--save-path", str(tmp_path / "hf"), "--hf-format", "--dtype", "float32"]) == 0
    exported = Gemma3nForConditionalGeneration.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert relative_error(our_logits(load(tmp_path / "hf")[0]), reference_logits(exported, ids())) <= TOLERANCE
    packed, floats = mx.load(str(quantized_base / "model.safetensors")), mx.load(str(tmp_path / "hf" / "model.safetensors"))
    for name in ("language_model.layers.0.self_attn.q_proj", "language_model.embed_tokens", "language_model.embed_tokens_per_layer"):
        weight = mx.dequantize(*(packed[f"{name}.{k}"] for k in ("weight", "scales", "biases")), group_size=32, bits=4)
        assert mx.array_equal(weight.astype(mx.float32), floats[f"model.{name}.weight"])
    assert "quantization" not in json.loads((tmp_path / "hf" / "config.json").read_text())


def test_int4_base_unfused_and_fused_within_int4_floors(adapters, quantized_base, tmp_path):
    folder, peft_model = adapters["one"]
    reference = mx.array(reference_logits(peft_model, ids()))
    min_agree, max_kl = FLOORS["uniform4"]
    unfused, _ = load(quantized_base, adapter_path=folder)
    q_proj = unfused.language_model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.base, nn.QuantizedLinear)  # the base stays packed
    assert fuse_main(["--model", str(quantized_base), "--adapter-path", str(folder), "--save-path", str(tmp_path / "fused")]) == 0
    fused_model, _ = load(tmp_path / "fused")
    assert isinstance(fused_model.language_model.layers[0].self_attn.q_proj, nn.QuantizedLinear)  # re-quantized
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["quantization"]["bits"] == 4
    for model in (unfused, fused_model):
        agree, kl = quality(reference, model(mx.array(ids())))
        assert agree >= min_agree and kl <= max_kl, (agree, kl)


def test_convert_fuses_while_converting(tiny_ckpt_a, adapters, tmp_path):
    folder, peft_model = adapters["one"]
    out = convert(str(tiny_ckpt_a.path), tmp_path / "out", dtype="float32", adapter_path=str(folder))
    assert relative_error(our_logits(load(out)[0]), reference_logits(peft_model, ids())) <= TOLERANCE


def test_cli_adapter_path(tiny_ckpt_a, adapters):
    folder, _ = adapters["one"]
    model, processor = load(tiny_ckpt_a.path, adapter_path=folder)
    result = subprocess.run(
        [sys.executable, "-m", "mlx_gemma3n.generate", "--model", str(tiny_ckpt_a.path), "--adapter-path", str(folder),
         "--prompt", "hello there", "-m", "8", "--temp", "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    prompt = prepare_prompt(processor, "hello there")
    expected = "".join(r.text for r in Session(model, processor).stream(prompt, SamplingParams(temperature=0.0), 8))
    assert result.stdout.rstrip("\n") == expected


def break_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


def truncate(folder):
    file = folder / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])


def add_unknown_tensor(folder):
    file = folder / "adapter_model.safetensors"
    mx.save_safetensors(str(file), dict(mx.load(str(file)), **{"base_model.model.model.extra.weight": mx.zeros((2,))}))


BAD_ADAPTERS = {
    "missing config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json"),
    "missing weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors"),
    "truncated weights": (truncate, "truncated"),
    "rank mismatch": (lambda f: break_config(f, rank_pattern={"down_proj": 3}), "rank"),
    "unsupported DoRA": (lambda f: break_config(f, use_dora=True), "use_dora"),
    "unsupported bias": (lambda f: break_config(f, bias="all"), "bias"),
    "targets nothing": (lambda f: break_config(f, target_modules=["c_attn"]), "match no layer"),
    "unknown tensor": (add_unknown_tensor, "extra.weight"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_is_one_line_and_changes_nothing(tiny_ckpt_a, adapters, tmp_path, case):
    breaks, message = BAD_ADAPTERS[case]
    shutil.copytree(adapters["one"][0], tmp_path / "adapter")
    breaks(tmp_path / "adapter")
    model, _ = load(tiny_ckpt_a.path)
    before = our_logits(model)
    with pytest.raises(Gemma3nError, match=message) as error:
        model.load_adapter(tmp_path / "adapter", "bad")
    assert "\n" not in str(error.value)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert np.array_equal(our_logits(model), before)
    with pytest.raises(Gemma3nError, match=message):
        convert(str(tiny_ckpt_a.path), tmp_path / "fused", adapter_path=str(tmp_path / "adapter"))
    assert not (tmp_path / "fused").exists() and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_adapter_for_another_base_model(tiny_ckpt_a, tiny_ckpt_b, tmp_path):
    make_adapter(tiny_ckpt_b.path, tmp_path / "adapter", 7, **ADAPTER_ONE)
    model, _ = load(tiny_ckpt_a.path)
    with pytest.raises(Gemma3nError, match="another base model"):
        model.load_adapter(tmp_path / "adapter")
    result = subprocess.run(
        [sys.executable, "-m", "mlx_gemma3n.fuse", "--model", str(tiny_ckpt_a.path), "--adapter-path", str(tmp_path / "adapter"),
         "--save-path", str(tmp_path / "fused")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1 and result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "fused").exists()
