"""Audio files (and arrays) to mono float32 samples at the feature extractor's rate: whole, or in
blocks for recordings of any length (memory does not grow with the length).

libsndfile reads WAV (any rate, depth, channel count), FLAC, MP3 and OGG (Vorbis, Opus). What it does
not read (M4A / AAC, WebM, the sound of a video file...) goes to FFmpeg through PyAV when the `video`
extra is installed (av_media.py). Either way a file's channels are averaged and its rate converted by
soxr as a stream, so a file gives the same samples whole or in blocks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import soundfile
import soxr

from ..errors import Gemma3nError
from .audio_features import GEMMA3N_AUDIO, checked_samples
from .av_media import AV_INSTALL, media_duration, opened, pyav, sound_blocks

BLOCK_SECONDS = 10.0
LIBSNDFILE_ERRORS = (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError)


class SoundTooLong(Gemma3nError):
    """A recording is longer than the caller takes (found while decoding, which then stops)."""


def load_audio(source: str | Path | np.ndarray, sampling_rate: int = GEMMA3N_AUDIO.sampling_rate) -> np.ndarray:
    """A mono float32 signal at `sampling_rate`, from an audio file (the module's docstring says which)
    or from a 1-D float array already at that rate."""
    if isinstance(source, np.ndarray):
        return checked_samples(source, sampling_rate)
    path = audio_file(source)
    return decode_audio(str(path), f"audio file {path}", sampling_rate)


def audio_file(source: str | Path) -> Path:
    """The path of an audio file that exists (a one-line error otherwise)."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise Gemma3nError(f"audio file {path} does not exist" if not path.exists() else f"{path} is not a file")
    return path


def decode_audio(file, name: str, sampling_rate: int = GEMMA3N_AUDIO.sampling_rate, max_seconds: float | None = None) -> np.ndarray:
    """`load_audio` of an open file or a path (`name` says which in errors): its blocks, joined."""
    return np.concatenate(list(read_audio_blocks(file, name, sampling_rate, max_seconds=max_seconds)))


def read_audio_blocks(file, name: str, sampling_rate: int = GEMMA3N_AUDIO.sampling_rate, block_seconds: float = BLOCK_SECONDS,
                      max_seconds: float | None = None) -> Iterator[np.ndarray]:
    """An audio file (a path or an open file) as mono float32 blocks of about `block_seconds` at
    `sampling_rate`; past `max_seconds` of sound, SoundTooLong (a small file can hold hours)."""
    try:
        sound = soundfile.SoundFile(file)
    except LIBSNDFILE_ERRORS as exc:
        native = ffmpeg_blocks(file, name, block_seconds, str(exc))
    else:
        native = libsndfile_blocks(sound, name, block_seconds)
    blocks = resampled(native, name, sampling_rate, max_seconds)
    first = next(blocks, None)
    if first is None:
        raise Gemma3nError(f"{name} has no samples")
    yield first
    yield from blocks


def libsndfile_blocks(sound: soundfile.SoundFile, name: str, block_seconds: float) -> Iterator[tuple[int, np.ndarray]]:
    """(rate, mono samples) blocks of an open libsndfile file, closed once read."""
    with sound:
        while True:
            try:
                data = sound.read(max(1, int(block_seconds * sound.samplerate)), dtype="float32", always_2d=True)
            except LIBSNDFILE_ERRORS as exc:
                raise Gemma3nError(f"cannot read {name}: {exc}") from None
            if len(data) == 0:
                return
            yield sound.samplerate, data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]


@contextlib.contextmanager
def ffmpeg_sound(file, name: str, libsndfile_error: str):
    """The FFmpeg container of a file libsndfile does not read, and its first audio stream."""
    if hasattr(file, "seek"):
        file.seek(0)
    try:
        pyav()
    except Gemma3nError:
        raise Gemma3nError(f"cannot read {name}: {libsndfile_error} (M4A, AAC, WebM and the sound of videos need PyAV: "
                           f"{AV_INSTALL})") from None
    with opened(lambda: file, name) as container:
        if not container.streams.audio:
            raise Gemma3nError(f"cannot read {name}: it holds no audio stream")
        yield container, container.streams.audio[0]


def ffmpeg_blocks(file, name: str, block_seconds: float, libsndfile_error: str) -> Iterator[tuple[int, np.ndarray]]:
    """(rate, mono samples) blocks of a file libsndfile does not read, decoded by FFmpeg."""
    with ffmpeg_sound(file, name, libsndfile_error) as (container, stream):
        yield from sound_blocks(container, stream, block_seconds)


def resampled(native: Iterable[tuple[int, np.ndarray]], name: str, sampling_rate: int,
              max_seconds: float | None = None) -> Iterator[np.ndarray]:
    """(rate, mono samples) blocks as float32 blocks at `sampling_rate`, resampled as one stream."""
    stream, seconds = None, 0.0
    for rate, mono in native:
        if not np.all(np.isfinite(mono)):
            raise Gemma3nError(f"{name} holds non-finite samples")
        seconds += len(mono) / rate
        if max_seconds is not None and seconds > max_seconds:
            raise SoundTooLong(f"{name}'s sound is longer than {max_seconds:g} s")
        if rate != sampling_rate and stream is None:
            stream = soxr.ResampleStream(rate, sampling_rate, 1, dtype="float32", quality="HQ")
        block = mono if stream is None else stream.resample_chunk(mono)
        if len(block):
            yield np.ascontiguousarray(block, dtype=np.float32)
    if stream is not None:
        tail = stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        if len(tail):
            yield np.ascontiguousarray(tail, dtype=np.float32)


def audio_duration(file, name: str) -> float:
    """Seconds of an audio file (a path or an open file, left at its start), from its header (or,
    for FFmpeg's formats without one, its packets)."""
    try:
        info = soundfile.info(file)
        return info.frames / info.samplerate
    except LIBSNDFILE_ERRORS as exc:
        return ffmpeg_duration(file, name, str(exc))
    finally:
        if hasattr(file, "seek"):
            file.seek(0)


def ffmpeg_duration(file, name: str, libsndfile_error: str) -> float:
    with ffmpeg_sound(file, name, libsndfile_error) as (container, stream):
        return media_duration(container, stream)
