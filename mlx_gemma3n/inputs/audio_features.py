"""Gemma 3n's log-mel audio features (numpy only); audio_files.py decodes the files.

`extract_features` follows Transformers' `Gemma3nAudioFeatureExtractor` for one clip, with the
settings of `AudioFeatureSettings` (read from the checkpoint by `preprocessor_config`; the defaults
are those of the published checkpoints). With the defaults: the clip is padded to a multiple of 128
samples, cut into 513-sample windows every 160 samples (10 ms at 16 kHz), each window pre-emphasised
HTK-style to 512 samples, Hann-windowed, FFT'd with 1024 points, and its magnitude spectrum mapped to
128 mel bins (125-7600 Hz, HTK mel scale, no area normalisation), floored at 1e-5 and log'ed. There
is no per-bin mean/std normalisation and no dithering.

Transformers silently truncates clips to 480,000 samples (its call's `max_length`, 30 s at 16 kHz);
we refuse them instead: the processor gives every clip 188 soft tokens, which is what 30 s produce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import Gemma3nError

# Arguments of Transformers' extractor call, not settings of its config: the same for every checkpoint.
PAD_TO_MULTIPLE_OF = 128
MAX_SAMPLES = 480_000


@dataclass(frozen=True)
class AudioFeatureSettings:
    """Gemma3nAudioFeatureExtractor's settings, lengths in samples."""

    feature_size: int = 128  # mel bins
    sampling_rate: int = 16_000
    frame_length: int = 512  # 32 ms
    hop_length: int = 160  # 10 ms
    fft_length: int = 1024  # next power of two of the frame, doubled ("fft_overdrive")
    min_frequency: float = 125.0
    max_frequency: float = 7600.0
    preemphasis: float = 0.97
    preemphasis_htk_flavor: bool = True
    mel_floor: float = 1e-5
    input_scale_factor: float = 1.0
    padding_value: float = 0.0
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None


GEMMA3N_AUDIO = AudioFeatureSettings()


def checked_samples(audio: np.ndarray, sampling_rate: int) -> np.ndarray:
    if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
        raise Gemma3nError(
            f"an audio array must hold 1-D float samples (mono, {sampling_rate} Hz), "
            f"not {audio.dtype} of shape {audio.shape}"
        )
    if audio.size == 0:
        raise Gemma3nError("the audio array is empty")
    if not np.all(np.isfinite(audio)):
        raise Gemma3nError("the audio array holds non-finite samples")
    return np.ascontiguousarray(audio, dtype=np.float32)


def num_frames(num_samples: int, settings: AudioFeatureSettings = GEMMA3N_AUDIO) -> int:
    """How many feature frames `extract_features` gives for a clip of `num_samples` samples."""
    padded = math.ceil(num_samples / PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    return max(0, (padded - settings.frame_length - 1) // settings.hop_length + 1)


def mel_filter_bank(settings: AudioFeatureSettings = GEMMA3N_AUDIO) -> np.ndarray:
    """(fft_length // 2 + 1, feature_size) triangular filters on the HTK mel scale."""
    bin_freqs = np.arange(settings.fft_length // 2 + 1, dtype=np.float32) * (settings.sampling_rate / settings.fft_length)
    mel_lo, mel_hi = (2595.0 * math.log10(1.0 + f / 700.0) for f in (settings.min_frequency, settings.max_frequency))
    edges = 700.0 * (10 ** (np.linspace(mel_lo, mel_hi, settings.feature_size + 2) / 2595.0) - 1.0)
    widths = np.diff(edges)
    slopes = edges[None, :] - bin_freqs[:, None]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


@lru_cache(maxsize=4)
def _window_and_filters(settings: AudioFeatureSettings) -> tuple[np.ndarray, np.ndarray]:
    arange = np.arange(settings.frame_length, dtype=np.float32)
    window = (0.5 * (1 - np.cos(2 * np.pi * arange / settings.frame_length))).astype(np.float32)
    return window, mel_filter_bank(settings)


def extract_features(audio: np.ndarray, settings: AudioFeatureSettings = GEMMA3N_AUDIO) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features (T, feature_size) float32 and their mask (T,) bool, True = a frame that starts
    inside the clip (Transformers' `input_features_mask`; all True with the default settings).

    T = `num_frames(len(audio), settings)`: 0 for clips under one window (513 samples by default),
    as in Transformers.
    """
    audio = checked_samples(np.asarray(audio), settings.sampling_rate)
    if audio.size > MAX_SAMPLES:
        raise Gemma3nError(
            f"the audio clip is {audio.size / settings.sampling_rate:.2f} s long; Gemma 3n takes at most "
            f"{MAX_SAMPLES / settings.sampling_rate:g} s per clip: split it into several clips"
        )
    count = num_frames(audio.size, settings)
    if count == 0:
        return np.zeros((0, settings.feature_size), dtype=np.float32), np.zeros(0, dtype=bool)
    window_size = settings.frame_length + 1
    padded = np.full((count - 1) * settings.hop_length + window_size, settings.padding_value, dtype=np.float32)
    padded[: min(audio.size, padded.size)] = audio[: padded.size]
    if settings.input_scale_factor != 1.0:
        padded = padded * settings.input_scale_factor
    windows = np.lib.stride_tricks.sliding_window_view(padded, window_size)[:: settings.hop_length]
    frames = _preemphasised(windows, settings)
    window, mel_filters = _window_and_filters(settings)
    magnitudes = np.abs(np.fft.rfft(frames * window, n=settings.fft_length, axis=-1))
    log_mel = np.log(np.maximum(magnitudes @ mel_filters, np.float64(settings.mel_floor)))
    if settings.per_bin_mean is not None:
        log_mel = log_mel - np.array(settings.per_bin_mean)
    if settings.per_bin_stddev is not None:
        log_mel = log_mel / np.array(settings.per_bin_stddev)
    valid = np.arange(count) * settings.hop_length < audio.size
    return log_mel.astype(np.float32), valid


def _preemphasised(windows: np.ndarray, settings: AudioFeatureSettings) -> np.ndarray:
    """(frames, frame_length + 1) windows -> (frames, frame_length): y[i] = x[i] - a * x[i - 1] inside
    each window; HTK-style, the first sample becomes x[0] * (1 - a) and the window's last is dropped,
    otherwise the first is dropped. With a = 0, the window's last sample is dropped."""
    a = settings.preemphasis
    if a <= 0.0:
        return windows[:, :-1]
    if settings.preemphasis_htk_flavor:
        return np.concatenate([windows[:, :1] * (1.0 - a), windows[:, 1:-1] - a * windows[:, :-2]], axis=1)
    return windows[:, 1:] - a * windows[:, :-1]
