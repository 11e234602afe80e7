"""Audio files (and arrays) to mono float32 samples at the feature extractor's rate: whole, or in
blocks for recordings of any length; libsndfile decodes them, soxr resamples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
import soxr

from ..errors import Gemma3nError
from .audio_features import GEMMA3N_AUDIO, checked_samples


def load_audio(source: str | Path | np.ndarray, sampling_rate: int = GEMMA3N_AUDIO.sampling_rate) -> np.ndarray:
    """A mono float32 signal at `sampling_rate`, from an audio file (anything libsndfile reads: WAV of
    any rate / depth / channel count, FLAC, MP3, OGG...) or from a 1-D float array already at that rate."""
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


def decode_audio(file, name: str, sampling_rate: int = GEMMA3N_AUDIO.sampling_rate) -> np.ndarray:
    """`load_audio` of an open file or a path (`name` says which in errors)."""
    try:
        data, rate = soundfile.read(file, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise Gemma3nError(f"cannot read {name}: {exc}") from None
    if data.shape[0] == 0:
        raise Gemma3nError(f"{name} has no samples")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != sampling_rate:
        mono = soxr.resample(mono, rate, sampling_rate, quality="HQ")
    if not np.all(np.isfinite(mono)):
        raise Gemma3nError(f"{name} holds non-finite samples")
    return np.ascontiguousarray(mono, dtype=np.float32)


def audio_duration(file, name: str) -> float:
    """Seconds of an audio file (a path or an open file, left at its start), from its header."""
    try:
        info = soundfile.info(file)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise Gemma3nError(f"cannot read {name}: {exc}") from None
    finally:
        if hasattr(file, "seek"):
            file.seek(0)
    return info.frames / info.samplerate


def read_audio_blocks(file, name: str, sampling_rate: int = GEMMA3N_AUDIO.sampling_rate, block_seconds: float = 10.0):
    """`decode_audio` in blocks of about `block_seconds`, for recordings of any length: yields mono
    float32 arrays at `sampling_rate`, resampled as a stream, so memory does not grow with the length."""
    try:
        audio = soundfile.SoundFile(file)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise Gemma3nError(f"cannot read {name}: {exc}") from None
    with audio:
        resampler = None if audio.samplerate == sampling_rate else soxr.ResampleStream(audio.samplerate, sampling_rate, 1, dtype="float32", quality="HQ")
        read = 0
        while True:
            try:
                data = audio.read(max(1, int(block_seconds * audio.samplerate)), dtype="float32", always_2d=True)
            except (soundfile.LibsndfileError, RuntimeError) as exc:
                raise Gemma3nError(f"cannot read {name}: {exc}") from None
            last = len(data) == 0
            mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
            if not np.all(np.isfinite(mono)):
                raise Gemma3nError(f"{name} holds non-finite samples")
            read += len(mono)
            if last and read == 0:
                raise Gemma3nError(f"{name} has no samples")
            block = mono if resampler is None else resampler.resample_chunk(mono, last=last)
            if len(block):
                yield np.ascontiguousarray(block, dtype=np.float32)
            if last:
                return
