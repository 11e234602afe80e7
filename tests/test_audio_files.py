"""Audio files to samples: what libsndfile does not read (M4A / AAC, a browser's WebM / Opus recording
without a duration in its header, an MP4 video's sound track) is decoded by FFmpeg through PyAV, to the
sound that was encoded, the same whole or in blocks, from a path or an open file; a video's sound as an
audio part is its sound in the video part; decoding stops past a length cap; without PyAV, or without
a sound, a one-line error."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import soundfile

from mlx_gemma3n.errors import Gemma3nError
from mlx_gemma3n.inputs.audio_files import SoundTooLong, audio_duration, decode_audio, load_audio, read_audio_blocks
from mlx_gemma3n.inputs.video import load_video

from helpers import RATE
from videos import Unseekable, tone, write_sound, write_video

ON = [(1.0, 4.0), (6.0, 9.0)]  # when the tone sounds, seconds


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sound_files")
    sound = tone(12, 48000, ON)
    write_sound(folder / "memo.m4a", sound, 48000, "aac", "mp4")
    recorder = Unseekable()  # as a browser's MediaRecorder writes it: no duration in the header
    write_sound(recorder, sound, 48000, "libopus", "webm")
    (folder / "recording.webm").write_bytes(bytes(recorder.data))
    write_video(folder / "clip.mp4", 12, 1, tone(12, 44100, ON), channels=2)
    write_video(folder / "silent.mp4", 2, 2, None)
    soundfile.write(folder / "tone.flac", tone(12, 44100, ON), 44100)
    return folder


def loudness(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RMS of 50 ms windows, and the windows' middles in seconds."""
    window = RATE // 20
    rms = np.sqrt(np.mean(samples[: samples.size // window * window].reshape(-1, window) ** 2, axis=1))
    return rms, (np.arange(rms.size) + 0.5) / 20


@pytest.mark.parametrize("name", ["memo.m4a", "recording.webm", "clip.mp4"])
def test_ffmpegs_formats_decode_to_the_sound_encoded(files, name):
    path = files / name
    with pytest.raises(soundfile.LibsndfileError):  # these formats are FFmpeg's, not libsndfile's
        soundfile.info(path)
    samples = load_audio(path)
    assert samples.dtype == np.float32 and abs(samples.size - 12 * RATE) < 0.05 * RATE
    rms, middles = loudness(samples)
    on = np.any([(middles > a + 0.1) & (middles < b - 0.1) for a, b in ON], axis=0)
    off = ~np.any([(middles > a - 0.1) & (middles < b + 0.1) for a, b in ON], axis=0)
    assert np.all(np.abs(rms[on] - 0.5 / np.sqrt(2)) < 0.05), rms[on]  # the clip's two channels averaged, not summed
    assert np.all(rms[off] < 0.01), rms[off]
    blocks = list(read_audio_blocks(str(path), name, block_seconds=2.0))
    assert len(blocks) >= 6 and max(b.size for b in blocks) < 2.2 * RATE  # never the whole file at once
    np.testing.assert_array_equal(np.concatenate(blocks), samples)
    with path.open("rb") as file:  # an upload: an open file, left at its start
        assert abs(audio_duration(file, name) - 12) < 0.05
        np.testing.assert_array_equal(decode_audio(file, name), samples)


def test_a_videos_sound_as_audio_is_its_sound_in_the_video(files):
    np.testing.assert_array_equal(load_audio(files / "clip.mp4"), load_video(files / "clip.mp4").audio)


def test_decoding_stops_past_the_cap(files):
    for name in ("tone.flac", "recording.webm"):
        with pytest.raises(SoundTooLong, match="longer than 5 s"):
            decode_audio(str(files / name), name, max_seconds=5)
        assert decode_audio(str(files / name), name, max_seconds=13).size == load_audio(files / name).size


def test_one_line_errors(files, tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.m4a"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(range(256)) * 8)
    cases = [
        (files / "silent.mp4", f"cannot read audio file {files / 'silent.mp4'}: it holds no audio stream"),
        (garbage, f"cannot read audio file {garbage}: Invalid data found when processing input"),
    ]
    for path, message in cases:
        with pytest.raises(Gemma3nError) as error:
            load_audio(path)
        assert str(error.value) == message
    empty = io.BytesIO()
    soundfile.write(empty, np.zeros(0, dtype=np.float32), RATE, format="WAV")
    empty.seek(0)
    with pytest.raises(Gemma3nError, match="^the upload has no samples$"):
        decode_audio(empty, "the upload")
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed: libsndfile's formats still load
    assert load_audio(files / "tone.flac").size == 12 * RATE
    with pytest.raises(Gemma3nError) as error:
        load_audio(files / "memo.m4a")
    message = str(error.value)
    assert message.startswith(f"cannot read audio file {files / 'memo.m4a'}: ") and "\n" not in message
    assert message.endswith("(M4A, AAC, WebM and the sound of videos need PyAV: pip install 'mlx-gemma3n[video]')")

