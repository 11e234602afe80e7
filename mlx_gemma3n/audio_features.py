"""Audio input: decoding files to 16 kHz mono, and Gemma 3n's log-mel features (numpy only).

`extract_features` follows Transformers' `Gemma3nAudioFeatureExtractor` for one clip with its
default settings (those of the published checkpoints): the clip is zero-padded to a multiple of
128 samples, cut into 513-sample windows every 160 samples (10 ms), each window pre-emphasised
HTK-style to 512 samples, Hann-windowed, FFT'd with 1024 points, and its magnitude spectrum
mapped to 128 mel bins (125-7600 Hz, HTK mel scale, no area normalisation), floored at 1e-5 and
log'ed. There is no per-bin mean/std normalisation and no dithering.

Transformers silently truncates clips to 30 s (480,000 samples); we refuse them instead: the
processor gives every clip 188 soft tokens, which is exactly what 30 s produce.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile
import soxr

from .errors import Gemma3nError

SAMPLE_RATE = 16_000
MAX_SAMPLES = 30 * SAMPLE_RATE
PAD_TO_MULTIPLE_OF = 128
FRAME_LENGTH = 512  # 32 ms
HOP_LENGTH = 160  # 10 ms
FFT_LENGTH = 1024  # next power of two of the frame, doubled ("fft_overdrive")
NUM_MEL_BINS = 128
MIN_FREQUENCY, MAX_FREQUENCY = 125.0, 7600.0
PREEMPHASIS = 0.97
MEL_FLOOR = 1e-5


def load_audio(source: str | Path | np.ndarray) -> np.ndarray:
    """A mono float32 signal at 16 kHz, from an audio file (anything libsndfile reads: WAV of any
    rate / depth / channel count, FLAC, MP3, OGG...) or from a 1-D float array already at 16 kHz."""
    if isinstance(source, np.ndarray):
        return _checked_array(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise Gemma3nError(f"audio file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise Gemma3nError(f"cannot read audio file {path}: {exc}") from None
    if data.shape[0] == 0:
        raise Gemma3nError(f"audio file {path} has no samples")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    if not np.all(np.isfinite(mono)):
        raise Gemma3nError(f"audio file {path} holds non-finite samples")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _checked_array(audio: np.ndarray) -> np.ndarray:
    if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
        raise Gemma3nError(
            f"an audio array must hold 1-D float samples (mono, {SAMPLE_RATE} Hz), "
            f"not {audio.dtype} of shape {audio.shape}"
        )
    if audio.size == 0:
        raise Gemma3nError("the audio array is empty")
    if not np.all(np.isfinite(audio)):
        raise Gemma3nError("the audio array holds non-finite samples")
    return np.ascontiguousarray(audio, dtype=np.float32)


def num_frames(num_samples: int) -> int:
    """How many feature frames `extract_features` gives for a clip of `num_samples` samples."""
    padded = math.ceil(num_samples / PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    return max(0, (padded - FRAME_LENGTH - 1) // HOP_LENGTH + 1)


def mel_filter_bank() -> np.ndarray:
    """(FFT_LENGTH // 2 + 1, NUM_MEL_BINS) triangular filters on the HTK mel scale."""
    bin_freqs = np.arange(FFT_LENGTH // 2 + 1, dtype=np.float32) * (SAMPLE_RATE / FFT_LENGTH)
    mel_lo, mel_hi = (2595.0 * math.log10(1.0 + f / 700.0) for f in (MIN_FREQUENCY, MAX_FREQUENCY))
    edges = 700.0 * (10 ** (np.linspace(mel_lo, mel_hi, NUM_MEL_BINS + 2) / 2595.0) - 1.0)
    widths = np.diff(edges)
    slopes = edges[None, :] - bin_freqs[:, None]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


_MEL_FILTERS = mel_filter_bank()
_WINDOW = (0.5 * (1 - np.cos(2 * np.pi * np.arange(FRAME_LENGTH, dtype=np.float32) / FRAME_LENGTH))).astype(np.float32)


def extract_features(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features (T, 128) float32 and their mask (T,) bool, True = a real frame.

    T = `num_frames(len(audio))`: 0 for clips under 513 samples, as in Transformers. For one clip
    every frame is real (the mask is all True); the mask is returned for the encoder's interface.
    """
    audio = _checked_array(np.asarray(audio))
    if audio.size > MAX_SAMPLES:
        raise Gemma3nError(
            f"the audio clip is {audio.size / SAMPLE_RATE:.2f} s long; Gemma 3n takes at most "
            f"{MAX_SAMPLES // SAMPLE_RATE} s per clip: split it into several clips"
        )
    count = num_frames(audio.size)
    if count == 0:
        return np.zeros((0, NUM_MEL_BINS), dtype=np.float32), np.zeros(0, dtype=bool)
    padded = np.zeros((count - 1) * HOP_LENGTH + FRAME_LENGTH + 1, dtype=np.float32)
    padded[: min(audio.size, padded.size)] = audio[: padded.size]
    windows = np.lib.stride_tricks.sliding_window_view(padded, FRAME_LENGTH + 1)[::HOP_LENGTH]
    # HTK pre-emphasis inside each 513-sample window: y[0] = x[0] * (1 - a), y[i] = x[i] - a * x[i - 1].
    frames = np.concatenate(
        [windows[:, :1] * (1.0 - PREEMPHASIS), windows[:, 1:-1] - PREEMPHASIS * windows[:, :-2]], axis=1
    )
    magnitudes = np.abs(np.fft.rfft(frames * _WINDOW, n=FFT_LENGTH, axis=-1))
    log_mel = np.log(np.maximum(magnitudes @ _MEL_FILTERS, MEL_FLOOR))
    return log_mel.astype(np.float32), np.ones(count, dtype=bool)
