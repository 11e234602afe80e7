"""Audio against Transformers' Gemma 3n: log-mel features, the conformer encoder, the soft-token
embedding, and decoding audio files.

Bar: features within 1e-5 of max |ref|, encoder and embeddings within 1e-4 of max |ref| (float32).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile
import torch
from helpers import relative_error
from mlx.utils import tree_flatten, tree_map
from reference import AUDIO_TOKEN_ID, BOA_ID, BOS_ID, EOA_ID, reference_intermediates

from mlx_gemma3n.architecture.audio import AudioEncoder
from mlx_gemma3n.architecture.config import EmbedderConfig
from mlx_gemma3n.architecture.multimodal import MultimodalEmbedder
from mlx_gemma3n.errors import Gemma3nError
from mlx_gemma3n.inputs.audio_features import GEMMA3N_AUDIO, MAX_SAMPLES, extract_features, num_frames
from mlx_gemma3n.inputs.audio_files import load_audio
from mlx_gemma3n.inputs.processor import soft_token_count

TOLERANCE = 1e-4
REAL = Path(__file__).resolve().parent / "data" / "gemma-3n-E2B-it"
SAMPLE_RATE = GEMMA3N_AUDIO.sampling_rate
ONE_SECOND, ODD = SAMPLE_RATE, 23_457


def speech_like(num_samples: int, rate: int = SAMPLE_RATE, seed: int = 0, noise: float = 0.02) -> np.ndarray:
    """Harmonics of a gliding pitch (all under 4 kHz), an amplitude envelope and a little noise."""
    t = np.arange(num_samples) / rate
    phase = 2 * np.pi * 140 * t - 40 / 0.7 * np.cos(2 * np.pi * 0.7 * t)  # pitch 140 +- 40 Hz
    voice = sum(np.sin(k * phase) / k for k in range(1, 20))
    hiss = np.random.default_rng(seed).standard_normal(num_samples) * noise
    return (0.3 * voice * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + hiss).astype(np.float32) * 0.5


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_extractor():
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

    return Gemma3nAudioFeatureExtractor()


@pytest.mark.parametrize("num_samples", [1, 300, 512, 513, 641, 1_001, ONE_SECOND, ODD, MAX_SAMPLES])
def test_features_match_transformers(hf_extractor, num_samples):
    audio = speech_like(num_samples)
    ref = hf_extractor(audio, return_tensors="np")
    features, mask = extract_features(audio)
    assert features.shape == ref["input_features"][0].shape == (num_frames(num_samples), 128)
    assert features.dtype == np.float32
    np.testing.assert_array_equal(mask, ref["input_features_mask"][0])
    if num_samples > 512:  # shorter clips give no frame at all
        assert relative_error(features, ref["input_features"][0]) <= 1e-5


def test_clips_over_30_s_are_refused_not_cut(hf_extractor):
    longer = speech_like(MAX_SAMPLES + 2_000)
    # Transformers silently keeps the first 30 s: that is the most the model takes.
    cut = hf_extractor(longer, return_tensors="np")["input_features"][0]
    np.testing.assert_array_equal(cut, hf_extractor(longer[:MAX_SAMPLES], return_tensors="np")["input_features"][0])
    with pytest.raises(Gemma3nError, match="at most 30 s"):
        extract_features(longer)


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


def with_prefix(weights: dict, prefix: str) -> dict:
    """The weights named `prefix...`, with the prefix stripped."""
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def tiny(tiny_ckpt_a):
    """(our encoder, our audio embedder, the torch model, raw config) from the tiny checkpoint's files."""
    path, model = tiny_ckpt_a
    config = json.loads((path / "config.json").read_text())
    weights = mx.load(str(path / "model.safetensors"))
    tower = with_prefix(weights, "model.audio_tower.")
    encoder = AudioEncoder(config["audio_config"])
    encoder.load_weights(list(AudioEncoder.sanitize(tower).items()), strict=True)
    embedder = MultimodalEmbedder(
        EmbedderConfig.from_dict(config["audio_config"], 0), config["text_config"]["hidden_size"]
    )
    embedder.load_weights(list(with_prefix(weights, "model.embed_audio.").items()), strict=True)
    return encoder, embedder, model, config


@torch.no_grad()
def reference_tower(model, features: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Transformers' audio tower (mask inverted: it takes True = padding) with its intermediates."""
    tower, captured, hooks = model.model.audio_tower, {}, []

    def keep(name):
        return lambda module, args, out: captured.__setitem__(name, out.detach().clone())

    hooks.append(tower.subsample_conv_projection.register_forward_hook(keep("subsample")))
    for i, block in enumerate(tower.conformer):
        hooks.append(block.register_forward_hook(keep(f"conformer.{i}")))
    try:
        out = tower(torch.from_numpy(features), ~torch.from_numpy(mask))
    finally:
        for hook in hooks:
            hook.remove()
    captured["output"] = out.last_hidden_state
    captured["embeds"] = model.model.embed_audio(inputs_embeds=out.last_hidden_state)
    return {k: v.numpy() for k, v in captured.items()} | {"mask": ~out.audio_mel_mask.numpy()}


@pytest.mark.parametrize("num_samples", [513, ONE_SECOND, ODD, MAX_SAMPLES])
def test_encoder_matches_transformers(tiny, num_samples):
    encoder, embedder, model, config = tiny
    features, mask = extract_features(speech_like(num_samples))
    ref = reference_tower(model, features[None], mask[None])
    ours = {}
    ours["output"], ours["mask"] = encoder(mx.array(features)[None], mx.array(mask)[None], capture=ours)
    ours["embeds"] = embedder.embed_soft(ours["output"])
    for name in ["subsample", *(f"conformer.{i}" for i in range(len(encoder.conformer))), "output", "embeds"]:
        assert relative_error(ours[name], ref[name]) <= TOLERANCE, name
    np.testing.assert_array_equal(np.array(ours["mask"]), ref["mask"])
    assert ours["output"].shape[1] == soft_token_count(num_samples, config["audio_config"])


def test_30_s_fill_the_188_soft_tokens(tiny):
    _, _, _, config = tiny
    assert soft_token_count(MAX_SAMPLES, config["audio_config"]) == config["audio_soft_tokens_per_image"] == 188


def test_soft_tokens_merge_like_transformers(tiny):
    """The model's rule for integration: the clip's soft-token embeddings, then the embedding of
    the last audio vocabulary id up to 188 tokens, in place of the <audio_soft_token> run."""
    encoder, embedder, model, config = tiny
    features, mask = extract_features(speech_like(ONE_SECOND))
    ids = [BOS_ID, BOA_ID] + [AUDIO_TOKEN_ID] * config["audio_soft_tokens_per_image"] + [EOA_ID]
    ref = reference_intermediates(
        model,
        ids,
        input_features=torch.from_numpy(features)[None],
        input_features_mask=torch.from_numpy(mask)[None],
    )
    encodings, _ = encoder(mx.array(features)[None], mx.array(mask)[None])
    soft = embedder.embed_soft(encodings)[0]
    filler = embedder.hard_table()[embedder.vocab_size - 1]
    expected = mx.concatenate([soft, mx.broadcast_to(filler, (188 - soft.shape[0], filler.shape[0]))])
    assert relative_error(encodings, ref["audio_tower"]) <= TOLERANCE
    assert relative_error(expected, ref["embeddings"][0, 2:-1]) <= TOLERANCE


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_padded_batch_equals_single_clips(tiny, sign):
    """With sign -1 the padding changes the last valid step in Transformers' own tower (its
    subsampling convolves the padding); ours keeps every clip as it is alone."""
    encoder = tiny[0]
    clips = [(sign * f, m) for f, m in (extract_features(speech_like(n, seed=n)) for n in (ONE_SECOND, ODD))]
    longest = max(len(f) for f, _ in clips)
    features = np.stack([np.pad(f, [(0, longest - len(f)), (0, 0)]) for f, _ in clips])
    mask = np.stack([np.pad(m, (0, longest - len(m))) for _, m in clips])
    batch, batch_mask = encoder(mx.array(features), mx.array(mask))
    for row, (f, m) in enumerate(clips):
        single, single_mask = encoder(mx.array(f)[None], mx.array(m)[None])
        valid = single.shape[1]
        assert np.array(batch_mask[row]).tolist() == [True] * valid + [False] * (batch.shape[1] - valid)
        assert relative_error(batch[row, :valid], single[0]) <= TOLERANCE
        assert not np.any(np.array(batch[row, valid:]))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_weights(tiny, dtype):
    encoder, _, _, config = tiny
    features, mask = extract_features(speech_like(ODD))
    reference, _ = encoder(mx.array(features)[None])
    half = AudioEncoder(config["audio_config"])
    half.update(tree_map(lambda p: p.astype(dtype), encoder.parameters()))
    out, _ = half(mx.array(features)[None].astype(dtype), mx.array(mask)[None])
    assert out.dtype == mx.float32
    assert bool(mx.all(mx.isfinite(out)))
    assert relative_error(out, reference) <= 3e-2


def test_sanitize_converts_once(tiny_ckpt_a):
    tower = with_prefix(mx.load(str(tiny_ckpt_a.path / "model.safetensors")), "model.audio_tower.")
    converted = AudioEncoder.sanitize(tower)
    assert converted["subsample_conv_projection.conv_0.conv.weight"].shape == (8, 3, 3, 1)
    assert converted["conformer.0.lconv1d.depthwise_conv1d.weight"].shape == (32, 5, 1)
    again = AudioEncoder.sanitize(converted)
    assert all(np.array_equal(np.array(again[k]), np.array(converted[k])) for k in converted)


def test_too_short_for_the_encoder(tiny):
    features, mask = extract_features(speech_like(500))
    with pytest.raises(Gemma3nError, match="too short"):
        tiny[0](mx.array(features)[None], mx.array(mask)[None])


# ---------------------------------------------------------------------------------------------
# Real shapes
# ---------------------------------------------------------------------------------------------


def real_audio_config() -> dict:
    return json.loads((REAL / "config.json").read_text())["audio_config"]


def test_real_config_parameter_names():
    encoder = AudioEncoder(real_audio_config())  # parameters stay lazy: nothing is allocated
    index = json.loads((REAL / "model.safetensors.index.json").read_text())["weight_map"]
    expected = {k.removeprefix("model.audio_tower.") for k in index if k.startswith("model.audio_tower.")}
    assert len(expected) == 269
    assert {name for name, _ in tree_flatten(encoder.parameters())} == expected


def random_like_trained(p: mx.array) -> mx.array:
    """bfloat16 random weights of sensible scale: norms near 1, matrices scaled by 1/sqrt(fan-in)."""
    if p.ndim == 1:
        return (1 + 0.1 * mx.random.normal(p.shape)).astype(mx.bfloat16)
    return (mx.random.normal(p.shape) * p.shape[-1] ** -0.5).astype(mx.bfloat16)


@pytest.mark.slow
def test_real_shape_10_s_clip():
    encoder = AudioEncoder(real_audio_config())
    encoder.update(tree_map(random_like_trained, encoder.parameters()))
    mx.eval(encoder.parameters())
    features, mask = extract_features(speech_like(10 * SAMPLE_RATE))
    start = time.perf_counter()
    out, out_mask = encoder(mx.array(features)[None], mx.array(mask)[None])
    mx.eval(out)
    print(f"real-shape audio encoder, 10 s clip: {time.perf_counter() - start:.1f} s")
    assert out.shape == (1, soft_token_count(10 * SAMPLE_RATE, real_audio_config()), 1536)
    assert bool(mx.all(out_mask)) and bool(mx.all(mx.isfinite(out)))


# ---------------------------------------------------------------------------------------------
# Loading audio
# ---------------------------------------------------------------------------------------------

CD_RATE, SECONDS = 44_100, 1.5


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> dict[str, Path]:
    """One stereo 44.1 kHz clip in several containers / encodings."""
    folder = tmp_path_factory.mktemp("audio")
    left = speech_like(int(CD_RATE * SECONDS), rate=CD_RATE, noise=0.0)
    stereo = np.stack([left, 0.5 * left], axis=1)
    files = {
        "wav_float": ("clip_float.wav", "FLOAT"),
        "wav_int16": ("clip_int16.wav", "PCM_16"),
        "wav_int24": ("clip_int24.wav", "PCM_24"),
        "flac": ("clip.flac", "PCM_16"),
        "mp3": ("clip.mp3", "MPEG_LAYER_III"),
    }
    for name, subtype in files.values():
        soundfile.write(folder / name, stereo, CD_RATE, subtype=subtype)
    return {key: folder / name for key, (name, _) in files.items()}


def test_decoding_resamples_and_downmixes(encoded):
    audio = load_audio(encoded["wav_float"])
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - SECONDS * SAMPLE_RATE) <= 1
    # The mono mix is 0.75 x the clip; the clip drawn directly at 16 kHz must match it.
    direct = 0.75 * speech_like(audio.size, noise=0.0)
    assert np.corrcoef(audio, direct)[0, 1] > 0.999


@pytest.mark.parametrize("kind", ["wav_int16", "wav_int24", "flac", "mp3"])
def test_formats_decode_alike(encoded, kind):
    reference = load_audio(encoded["wav_float"])
    audio = load_audio(encoded[kind])
    length = min(audio.size, reference.size)
    assert abs(audio.size - reference.size) <= 0.01 * reference.size
    assert np.corrcoef(audio[:length], reference[:length])[0, 1] > 0.99


def test_16_khz_mono_file_is_read_as_is(tmp_path):
    clip = speech_like(5_000)
    soundfile.write(tmp_path / "mono.wav", clip, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "mono.wav"), clip)


def test_bad_files_are_named(tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not a RIFF file")
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    truncated = tmp_path / "truncated.flac"
    soundfile.write(truncated, speech_like(8_000), SAMPLE_RATE)
    truncated.write_bytes(truncated.read_bytes()[:30])
    for path in [tmp_path / "missing.wav", tmp_path, not_audio, empty, truncated]:
        with pytest.raises(Gemma3nError, match=path.name):
            load_audio(path)


@pytest.mark.parametrize(
    "array",
    [np.zeros((2, 100), np.float32), np.zeros(100, np.int16), np.zeros(0, np.float32), np.full(10, np.nan, np.float32)],
)
def test_bad_arrays(array):
    with pytest.raises(Gemma3nError):
        load_audio(array)


def test_arrays_are_float32_mono():
    clip = speech_like(1_000).astype(np.float64)
    audio = load_audio(clip)
    assert audio.dtype == np.float32
    np.testing.assert_array_equal(audio, clip.astype(np.float32))
