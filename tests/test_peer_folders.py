"""Folders written by mlx-vlm's and mlx-lm's converters (the mlx-community uploads) load and compute
as Transformers does; the gated default model's hub error says what to do.

The folders are made at test time by the peers' own converters (subprocesses), from one tiny
checkpoint shaped to what they can read: a uniform FFN width (mlx-vlm builds every MLP at
intermediate_size[0]), the real-width MobileNet v5 (mlx-vlm ignores `channel_multiplier`),
Google's config keys (both read `rope_theta` / `rope_local_base_freq`, not `rope_parameters`) and
k/v weights on the KV-shared layers (Google's layout; both load strictly). Audio hidden size 64 lets
mlx-vlm quantize `embed_audio` at group size 64, as in the real uploads.

The reference is Transformers: on the checkpoint for float32 folders; for quantized folders, running
the weights as the folder's own tool (mlx-vlm, mlx-lm) dequantizes them. Not the tools' own logits:
mlx-vlm 0.7.10's KV-shared layers rotate their queries at the cache offset after the owner layer's
update (its float32 folder's logits: 0.7 rel. error off Transformers; ours: 3e-6), and mlx-lm 0.32
computes in bf16 past an mxfp4/mxfp8/nvfp4 embedding (MLX dequantizes those modes to bf16).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import soundfile
import torch
from conftest import TinyCheckpoint
from helpers import prompt_ids, relative_error
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
from mlx.utils import tree_flatten
from PIL import Image
from reference import TINY_TEXT_B, build_checkpoint, reference_greedy, reference_logits

from mlx_gemma3n import Gemma3nError, load
from mlx_gemma3n.architecture.model import TOWERS
from mlx_gemma3n.decoding.sampling import SamplingParams
from mlx_gemma3n.generate import Session, prepare_prompt
from mlx_gemma3n.weights.loader import our_module_path
from mlx_gemma3n.weights.mapped import MappedEmbedding

TOLERANCE = 1e-4
QUANTIZED_TOLERANCE = 1e-3
TEXT_VOCAB = TINY_TEXT_B["vocab_size_per_layer_input"]  # ids a text-only model embeds like the full one
# folder: the converter's options (its `convert` function's, as its command line passes them). Float
# parts in float32: on these random tiny models bf16 rounding alone moves the logits by ~0.1.
CONVERSIONS = {
    "mlx_vlm": {"vlm_f32": {}, "vlm_4bit": {"quantize": True}},  # mlx-community's -4bit: affine, 4 bits, group 64
    "mlx_lm": {
        "lm_f32": {},
        "lm_mixed_3_6": {"quantize": True, "quant_predicate": "mixed_3_6"},
        "lm_mxfp4": {"quantize": True, "q_mode": "mxfp4"},
        "lm_mxfp8": {"quantize": True, "q_mode": "mxfp8"},
        "lm_nvfp4": {"quantize": True, "q_mode": "nvfp4"},
    },
}
# One interpreter a converter, its conversions in turn (imports take most of a conversion's time).
CONVERTER = (
    "import importlib, json, sys\n"
    "convert = importlib.import_module(sys.argv[1] + '.convert').convert\n"
    "for job in json.loads(sys.argv[2]):\n"
    "    convert(**job)\n"
)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> TinyCheckpoint:
    path = tmp_path_factory.mktemp("peer_source")
    model = build_checkpoint(
        path, text=TINY_TEXT_B, seed=5, keep_shared_kv=True, config_style="google",
        vision_overrides={"model_args": {}}, audio_overrides={"hidden_size": 64}, processor_image_size=256,
    )
    return TinyCheckpoint(path, model)


@pytest.fixture(scope="module")
def folders(source, tmp_path_factory) -> dict[str, Path]:
    """Every conversion of `source`; the two converters run side by side."""
    root = tmp_path_factory.mktemp("peer_folders")
    runs = {}
    for tool, conversions in CONVERSIONS.items():
        jobs = [dict(options, hf_path=str(source.path), mlx_path=str(root / name), dtype="float32") for name, options in conversions.items()]
        runs[tool] = subprocess.Popen(
            [sys.executable, "-c", CONVERTER, tool, json.dumps(jobs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    for tool, run in runs.items():
        output, _ = run.communicate(timeout=900)
        assert run.returncode == 0, f"{tool}: {output[-3000:]}"
    return {name: root / name for conversions in CONVERSIONS.values() for name in conversions}


@pytest.fixture(scope="module")
def ours_f32(folders):
    return load(folders["vlm_f32"])


@pytest.fixture(scope="module")
def hf_processor(source):
    from transformers import Gemma3nProcessor

    return Gemma3nProcessor.from_pretrained(str(source.path))


def media_prompt(kind: str, media: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": kind, kind: str(media[kind])}, {"type": "text", "text": "what is this?"}]}]


def reference_inputs(hf_processor, messages) -> dict:
    """Transformers' processor on the same messages, the media handed over decoded."""
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    part = messages[0]["content"][0]
    media = {"images": [Image.open(part["image"]).convert("RGB")]} if part["type"] == "image" else {
        "audio": [soundfile.read(part["audio"], dtype="float32")[0]]
    }
    return dict(hf_processor(text=text, return_tensors="pt", add_special_tokens=False, **media))


def media_kwargs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k in ("pixel_values", "input_features", "input_features_mask")}


def greedy(model, processor, prompt, max_tokens: int) -> list[int]:
    """Our greedy tokens, eos ignored (as reference_greedy(..., stop_at_eos=False))."""
    eos, processor.eos_token_ids = processor.eos_token_ids, set()
    config_eos, model.config.eos_token_ids = model.config.eos_token_ids, []
    try:
        responses = Session(model, processor).stream(prompt, SamplingParams(temperature=0.0), max_tokens, prefill_step_size=64)
        return [r.token for r in responses]
    finally:
        processor.eos_token_ids, model.config.eos_token_ids = eos, config_eos


def quantized_modules(model, config=None) -> dict[str, tuple]:
    """{module path: (bits, group_size, mode)} of the quantized layers (and of a mapped PLE table);
    with `config`, a peer's model: its paths turned into ours, the layers we drop left out."""
    found = {
        path if config is None else our_module_path(path, config): (m.bits, m.group_size, m.mode)
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or (isinstance(m, MappedEmbedding) and m.bits)
    }
    found.pop(None, None)
    return found


def transformers_name(peer_name: str) -> str:
    """A peer's name of a text model or embedder tensor -> Transformers' (mlx-lm's are Transformers')."""
    if peer_name.startswith("language_model.model."):
        return "model.language_model." + peer_name[len("language_model.model.") :]
    return peer_name if peer_name.startswith("model.") else "model." + peer_name


# --- mlx-vlm, float32 ---


def test_float32_folder_logits_equal_transformers(ours_f32, source):
    model, _ = ours_f32
    ids = prompt_ids(0, 40)  # longer than the sliding window (16); text, PLE-less and multimodal hard ids
    assert relative_error(model(mx.array(ids)), reference_logits(source.model, ids)) <= TOLERANCE


def test_float32_folder_greedy_equals_transformers(ours_f32, source):
    model, processor = ours_f32
    ids = processor.encode("the quick brown fox")
    assert greedy(model, processor, ids, 16) == reference_greedy(source.model, ids, 16, stop_at_eos=False)


def test_float32_folder_holds_the_checkpoints_weights(ours_f32, source):
    """Every tower and embedder parameter (convolutions in MLX's layout there) equals the one loaded
    from the Transformers checkpoint, bit for bit."""
    theirs, _ = load(source.path)
    model, _ = ours_f32
    ours_params, source_params = dict(tree_flatten(model.parameters())), dict(tree_flatten(theirs.parameters()))
    assert ours_params.keys() == source_params.keys()
    assert any(k.startswith("vision_tower.") and v.ndim == 4 for k, v in ours_params.items())
    different = [k for k, v in ours_params.items() if not mx.array_equal(v, source_params[k]).item()]
    assert not different, different[:5]


def test_towers_stay_out_of_memory_and_the_ple_table_is_mapped(folders):
    mx.clear_cache()
    before = mx.get_active_memory()
    model, _ = load(folders["vlm_f32"])
    resident = mx.get_active_memory() - before
    assert isinstance(model.language_model.embed_tokens_per_layer, MappedEmbedding)
    towers = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k.startswith(TOWERS))
    others = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if not k.startswith(TOWERS))
    assert towers > 10**9 and resident < others + towers // 100


def check_media_prompt(kind: str, loaded, source, hf_processor, media: dict) -> None:
    """The folder's processor makes Transformers' prompt ids, and greedy replies are equal."""
    model, processor = loaded
    messages = media_prompt(kind, media)
    inputs = reference_inputs(hf_processor, messages)
    prompt = prepare_prompt(processor, messages)
    assert prompt.ids == inputs["input_ids"][0].tolist()
    expected = reference_greedy(source.model, inputs["input_ids"], 8, stop_at_eos=False, **media_kwargs(inputs))
    assert greedy(model, processor, prompt, 8) == expected


def test_audio_prompt_from_float32_folder_equals_transformers(ours_f32, source, hf_processor, tiny_media):
    check_media_prompt("audio", ours_f32, source, hf_processor, tiny_media)


@pytest.mark.slow
def test_image_prompt_from_float32_folder_equals_transformers(ours_f32, source, hf_processor, tiny_media):
    """The real-width vision tower (on 256 x 256 images: the source's processor says so) takes
    about a minute on 2 CPU cores."""
    check_media_prompt("image", ours_f32, source, hf_processor, tiny_media)


# --- quantized folders ---


def transformers_on_weights_of(peer, source: TinyCheckpoint):
    """Transformers' model with the text model and embedders of `peer` (a peer's model of a quantized
    folder) as the peer dequantizes them. (The towers stay float in these folders.)"""
    weights = dict(tree_flatten(peer.parameters()))
    for path, module in peer.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            del weights[f"{path}.scales"]
            weights.pop(f"{path}.biases", None)
            weights[f"{path}.weight"] = mx.dequantize(
                module.weight, module.scales, module.get("biases"), module.group_size, module.bits, module.mode
            )
    vision = source.model.model.vision_tower  # shared, not copied: its weights are not replaced
    reference = copy.deepcopy(source.model, {id(vision): vision})
    targets = reference.state_dict()
    state = {
        transformers_name(name): torch.from_numpy(np.array(value.astype(mx.float32)))
        for name, value in weights.items()
        if not name.startswith(TOWERS)
    }
    left_out = [name for name in state if name not in targets]
    assert all(".self_attn.k_" in n or ".self_attn.v_" in n for n in left_out), left_out  # KV-shared layers
    reference.load_state_dict({k: v for k, v in state.items() if k in targets}, strict=False)
    return reference


@pytest.fixture(scope="module")
def vlm_4bit(folders):
    from mlx_vlm.utils import load_model

    return load_model(folders["vlm_4bit"], lazy=True)


def test_4bit_folder_quantizes_what_mlx_vlm_quantizes(folders, vlm_4bit):
    model, _ = load(folders["vlm_4bit"])
    expected = quantized_modules(vlm_4bit, model.config)
    assert expected and quantized_modules(model) == expected
    assert "embed_audio.embedding" in expected and "language_model.embed_tokens_per_layer" in expected


def test_4bit_folder_equals_transformers_on_its_weights(folders, vlm_4bit, source, hf_processor, tiny_media):
    """Text ids of every kind, and an audio prompt (embed_audio is quantized)."""
    model, processor = load(folders["vlm_4bit"])
    reference = transformers_on_weights_of(vlm_4bit, source)
    ids = prompt_ids(1, 40)
    assert relative_error(model(mx.array(ids)), reference_logits(reference, ids)) <= TOLERANCE
    messages = media_prompt("audio", tiny_media)
    inputs = reference_inputs(hf_processor, messages)
    prompt = prepare_prompt(processor, messages)
    ids = mx.array([prompt.ids])
    logits = model(ids, embeddings=model.embed_with_media(ids, prompt.images, prompt.audio))
    expected = reference_logits(reference, inputs["input_ids"], **media_kwargs(inputs))
    assert relative_error(logits, expected) <= TOLERANCE


def test_hub_id_of_an_mlx_community_folder_loads(folders, monkeypatch, tmp_path):
    """`load("mlx-community/gemma-3n-E2B-it-4bit")` fetches what such a folder holds, the README
    aside, and runs."""
    import huggingface_hub

    folder, fetched = folders["vlm_4bit"], tmp_path / "snapshot"

    def snapshot_download(repo_id, allow_patterns):
        fetched.mkdir()
        for file in folder.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                os.symlink(file, fetched / file.name)
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model, processor = load("mlx-community/gemma-3n-E2B-it-4bit")
    assert sorted(p.name for p in folder.iterdir() if p.name not in {p.name for p in fetched.iterdir()}) == ["README.md"]
    assert isinstance(model.language_model.embed_tokens_per_layer, MappedEmbedding)
    assert len(greedy(model, processor, processor.encode("hello"), 4)) == 4


def test_mlx_lm_float32_folder_is_the_text_model(folders, source):
    model, _ = load(folders["lm_f32"])
    assert not any(k.startswith(TOWERS + ("embed_vision", "embed_audio")) for k, _ in tree_flatten(model.parameters()))
    ids = prompt_ids(2, 40, vocab_size=TEXT_VOCAB)
    assert relative_error(model(mx.array(ids)), reference_logits(source.model, ids)) <= TOLERANCE


@pytest.mark.parametrize("name", ["lm_mixed_3_6", "lm_mxfp4", "lm_mxfp8", "lm_nvfp4"])
def test_mlx_lm_quantized_folder_equals_transformers_on_its_weights(folders, source, name):
    """Per-module entries (mixed_3_6: 3 and 6 bits) and every MLX quantization mode, the mapped PLE
    table's included. (mlx-lm's own logits are no reference for the mx/nv modes: they dequantize to
    bf16, and mlx-lm computes on in bf16.)"""
    from mlx_lm.utils import load_model

    peer, _ = load_model(folders[name], lazy=True)
    model, _ = load(folders[name])
    assert quantized_modules(model) == quantized_modules(peer, model.config)
    assert isinstance(model.language_model.embed_tokens_per_layer, MappedEmbedding)
    ids = prompt_ids(3, 40, vocab_size=TEXT_VOCAB)
    logits = model(mx.array(ids))
    assert relative_error(logits, reference_logits(transformers_on_weights_of(peer, source), ids)) <= TOLERANCE
    if name == "lm_mixed_3_6":  # affine with float32 scales: mlx-lm computes in float32
        assert relative_error(logits, peer(mx.array(ids), cache=peer.make_cache())) <= QUANTIZED_TOLERANCE


def test_unknown_quantization_mode_is_named(folders, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for file in folders["lm_mxfp4"].iterdir():
        os.symlink(file, folder / file.name)
    config = json.loads((folder / "config.json").read_text())
    config["quantization"]["mode"] = "fp3"
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Gemma3nError, match="quantization mode 'fp3' is not one of MLX's"):
        load(folder)


# --- the gated default ---


@pytest.mark.parametrize("status, error", [(401, GatedRepoError), (403, GatedRepoError), (403, HfHubHTTPError)])
def test_gated_model_says_how_to_get_access(monkeypatch, status, error):
    import huggingface_hub

    def snapshot_download(repo_id, allow_patterns):
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}/revision/main")
        raise error(f"Access to model {repo_id} is restricted.", response=httpx2.Response(status, request=request))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(Gemma3nError) as raised:
        load("google/gemma-3n-E2B-it")
    message = str(raised.value)
    assert "\n" not in message
    for step in ("accept its licence", "https://huggingface.co/google/gemma-3n-E2B-it", "hf auth login",
                 "mlx-community/gemma-3n-E2B-it-4bit"):
        assert step in message

