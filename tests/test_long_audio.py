"""Recordings longer than one 30 s clip: a several-minute recording made here (speech-like bursts with
pauses at known times) is cut only inside its pauses, into consecutive clips of at most 30 s that
cover it; a long audio part in a chat is exactly its clips given as separate parts (same prompt,
same features, same greedy reply); the longest clip gives exactly the model's 188 soft tokens."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_gemma3n import generate, load
from mlx_gemma3n.decoding.sampling import SamplingParams
from mlx_gemma3n.generate import ChatSession
from mlx_gemma3n.inputs.processor import soft_token_count

from helpers import RATE, recording


@pytest.fixture(scope="module")
def loaded(tiny_ckpt_256):
    return load(tiny_ckpt_256.path)


def test_the_longest_clip_gives_the_models_soft_tokens(loaded):
    _, processor = loaded
    limit = processor.max_clip_samples
    assert limit == 30 * RATE
    assert soft_token_count(limit, processor.audio_tower_config) == processor.audio_soft_tokens == 188


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_long_recording_is_cut_only_in_its_pauses(loaded, seed):
    _, processor = loaded
    samples, pauses = recording(300, seed)
    clips = processor.split_audio(samples)
    assert clips[0][0] == 0 and clips[-1][1] == len(samples)
    assert all(a[1] == b[0] for a, b in zip(clips, clips[1:]))  # consecutive: nothing lost, nothing twice
    assert all(0 < end - start <= processor.max_clip_samples for start, end in clips)
    assert len(clips) >= 10  # 300 s in clips of 15-30 s
    for start, _ in clips[1:]:
        assert any(low <= start < high for low, high in pauses), f"a cut at {start / RATE:.2f} s is in speech"


def test_a_recording_without_pauses_is_still_cut_to_the_limit(loaded):
    _, processor = loaded
    hum = (0.3 * np.sin(2 * np.pi * 150 * np.arange(95 * RATE) / RATE)).astype(np.float32)
    clips = processor.split_audio(hum)
    assert [end - start <= processor.max_clip_samples for start, end in clips] == [True] * 4
    assert clips[-1][1] == len(hum)
    assert processor.split_audio(hum[: 30 * RATE]) == [(0, 30 * RATE)]  # one clip's worth: not cut


def test_a_long_audio_part_is_its_clips_given_as_parts(loaded, tmp_path):
    import soundfile

    model, processor = loaded
    samples, _ = recording(70, 3)
    path = tmp_path / "long.wav"
    soundfile.write(path, samples, RATE, subtype="FLOAT")
    clips = processor.split_audio(samples)
    assert len(clips) == 3
    whole = [{"role": "user", "content": [{"type": "audio", "audio": str(path)}, {"type": "text", "text": "Summarize."}]}]
    parts = [{"role": "user", "content": [{"type": "audio", "audio": samples[a:b]} for a, b in clips]
              + [{"type": "text", "text": "Summarize."}]}]
    long_prompt, clip_prompt = processor.prepare(whole), processor.prepare(parts)
    assert long_prompt.ids == clip_prompt.ids and len(long_prompt.audio) == 3
    for (features, valid), (features_b, valid_b) in zip(long_prompt.audio, clip_prompt.audio):
        np.testing.assert_array_equal(features, features_b)
        np.testing.assert_array_equal(valid, valid_b)
    reply = generate(model, processor, whole, 8, temperature=0.0)
    assert reply == generate(model, processor, parts, 8, temperature=0.0)
    chat = ChatSession(model, processor)
    assert "".join(r.text for r in chat.ask(whole[0]["content"], SamplingParams(temperature=0.0), 8)) == reply
