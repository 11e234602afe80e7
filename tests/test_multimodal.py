"""Image and audio prompts end to end against Transformers' Gemma3nForConditionalGeneration and its
Gemma3nProcessor: expanded prompt ids, merged embeddings, logits, greedy generations."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import soundfile
import torch
from helpers import relative_error
from PIL import Image
from reference import reference_greedy, reference_image_processor, reference_intermediates

from mlx_gemma3n import Gemma3nError, load
from mlx_gemma3n.decoding.sampling import SamplingParams
from mlx_gemma3n.generate import Session, prepare_prompt

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny_ckpt_a):
    return load(tiny_ckpt_a.path)


@pytest.fixture(scope="module")
def hf_processor(tiny_tokenizer, tiny_ckpt_a):
    from transformers import Gemma3nProcessor
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

    template = (tiny_ckpt_a.path / "chat_template.jinja").read_text()
    return Gemma3nProcessor(
        Gemma3nAudioFeatureExtractor(), reference_image_processor(), tiny_tokenizer, chat_template=template
    )


@pytest.fixture(scope="module")
def media(tiny_media):
    return tiny_media["image"], tiny_media["audio"]


def messages_with(media, image=True, audio=True):
    image_path, audio_path = media
    parts = ([{"type": "image", "image": str(image_path)}] if image else [])
    parts += ([{"type": "audio", "audio": str(audio_path)}] if audio else [])
    return [{"role": "user", "content": parts + [{"type": "text", "text": "what is this?"}]}]


def hf_inputs(hf_processor, messages):
    """Transformers' processor on the same messages; media handed over decoded (its own path
    loader needs torchvision's compiled image ops, which the CPU test stack lacks)."""
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    parts = messages[0]["content"]
    images = [Image.open(p["image"]).convert("RGB") for p in parts if p["type"] == "image"] or None
    audio = [soundfile.read(p["audio"], dtype="float32")[0] for p in parts if p["type"] == "audio"] or None
    return hf_processor(text=text, images=images, audio=audio, return_tensors="pt", add_special_tokens=False)


@pytest.mark.parametrize("image, audio", [(True, False), (False, True), (True, True)])
def test_prompt_ids_and_media_equal_transformers_processor(loaded, hf_processor, media, image, audio):
    _, processor = loaded
    messages = messages_with(media, image, audio)
    ours = prepare_prompt(processor, messages)
    theirs = hf_inputs(hf_processor, messages)
    assert ours.ids == theirs["input_ids"][0].tolist()
    if image:
        assert relative_error(ours.images[0], theirs["pixel_values"][0].numpy().transpose(1, 2, 0)) <= 1e-6
    if audio:
        features, valid = ours.audio[0]
        valid_ref = theirs["input_features_mask"][0].numpy()
        assert np.array_equal(valid, valid_ref)
        assert relative_error(features[valid], theirs["input_features"][0].numpy()[valid_ref]) <= 1e-5


@pytest.mark.parametrize("image, audio", [(False, True), (True, True)])
def test_media_prompt_logits_equal_transformers(loaded, hf_processor, tiny_ckpt_a, media, image, audio):
    model, processor = loaded
    messages = messages_with(media, image, audio)
    prompt = prepare_prompt(processor, messages)
    inputs = hf_inputs(hf_processor, messages)
    extra = {k: v for k, v in inputs.items() if k in ("pixel_values", "input_features", "input_features_mask")}
    ref = reference_intermediates(tiny_ckpt_a.model, inputs["input_ids"], **extra)
    ids = mx.array([prompt.ids])
    embeddings = model.embed_with_media(ids, prompt.images, prompt.audio)
    assert relative_error(embeddings, ref["embeddings"]) <= TOLERANCE
    assert relative_error(model(ids, embeddings=embeddings), ref["logits"]) <= TOLERANCE


@pytest.mark.parametrize("image, audio", [(True, False), (False, True)])
def test_greedy_generation_from_media_prompt_equals_transformers(loaded, hf_processor, tiny_ckpt_a, media, image, audio):
    model, processor = loaded
    messages = messages_with(media, image, audio)
    inputs = hf_inputs(hf_processor, messages)
    extra = {k: v for k, v in inputs.items() if k in ("pixel_values", "input_features", "input_features_mask")}
    expected = reference_greedy(tiny_ckpt_a.model, inputs["input_ids"], 32, stop_at_eos=False, **extra)
    eos, processor.eos_token_ids = processor.eos_token_ids, set()
    config_eos, model.config.eos_token_ids = model.config.eos_token_ids, []
    try:
        prompt = prepare_prompt(processor, messages)
        tokens = [r.token for r in Session(model, processor).stream(prompt, SamplingParams(temperature=0.0), 32, prefill_step_size=100)]
    finally:
        processor.eos_token_ids, model.config.eos_token_ids = eos, config_eos
    assert tokens == expected


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_reply_text_decodes_like_transformers(loaded, hf_processor, media, skip_special_tokens):
    """The text of an image prompt's greedy reply is Transformers' `decode` of the same ids: control
    tokens left out by default (what Gemma's examples print), kept on request."""
    model, processor = loaded
    prompt = prepare_prompt(processor, messages_with(media, image=True, audio=False))
    eos, processor.eos_token_ids = processor.eos_token_ids, set()
    config_eos, model.config.eos_token_ids = model.config.eos_token_ids, []
    try:
        params = SamplingParams(temperature=0.0)
        responses = list(Session(model, processor).stream(prompt, params, 48, skip_special_tokens=skip_special_tokens))
    finally:
        processor.eos_token_ids, model.config.eos_token_ids = eos, config_eos
    tokens = [r.token for r in responses]
    special = set(hf_processor.tokenizer.all_special_ids) | {
        i for i, t in hf_processor.tokenizer.added_tokens_decoder.items() if t.special
    }
    assert special & set(tokens), "the reply holds no special token: the test would not tell"
    expected = hf_processor.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)
    assert "".join(r.text for r in responses) == expected


def test_placeholder_text_without_media_is_refused(loaded):
    _, processor = loaded
    with pytest.raises(Gemma3nError, match="image placeholder"):
        prepare_prompt(processor, "describe <image_soft_token> please")


def test_text_only_checkpoint_has_no_towers(tiny_ckpt_text_only, media):
    model, processor = load(tiny_ckpt_text_only.path)
    assert "vision_tower" not in model and "audio_tower" not in model


def test_cli_image_and_audio(tiny_ckpt_a, loaded, media):
    model, processor = loaded
    image_path, audio_path = media
    result = subprocess.run(
        [sys.executable, "-m", "mlx_gemma3n.generate", "--model", str(tiny_ckpt_a.path), "--image", str(image_path),
         "--audio", str(audio_path), "--prompt", "what is this?", "-m", "6", "--temp", "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    prompt = prepare_prompt(processor, messages_with(media))
    expected = "".join(r.text for r in Session(model, processor).stream(prompt, SamplingParams(temperature=0.0), 6))
    assert result.stdout.rstrip("\n") == expected


@pytest.mark.parametrize("flag, name, content", [
    ("--image", "missing.png", None),
    ("--image", "fake.png", b"not an image"),
    ("--audio", "fake.wav", b"RIFF....garbage"),
])
def test_cli_bad_media_is_one_clear_line(tiny_ckpt_a, tmp_path, flag, name, content):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    result = subprocess.run(
        [sys.executable, "-m", "mlx_gemma3n.generate", "--model", str(tiny_ckpt_a.path), flag, str(tmp_path / name), "-p", "hi"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert name in result.stderr.strip().splitlines()[-1]


def test_torch_is_not_imported_by_the_runtime():
    code = "import sys, mlx_gemma3n.generate, mlx_gemma3n.convert; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False False"
    assert torch  # the reference side does use it
