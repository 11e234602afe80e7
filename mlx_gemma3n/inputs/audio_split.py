"""Recordings longer than one clip: cut into consecutive clips the audio tower takes (Gemma 3n: 30 s,
188 soft tokens), each cut placed in a pause.

The pause measure is the signal's energy in 10 ms frames, averaged over a 300 ms window: the cut
goes to the centre of the quietest window in the second half of the clip's allowed span (the latest
of equally quiet ones), so a clip is never under half the limit unless it is the last, and speech
is not cut where a pause was available.
"""

from __future__ import annotations

import numpy as np

FRAME_SECONDS = 0.010
WINDOW_SECONDS = 0.300


def frame_energy(samples: np.ndarray, frame: int) -> np.ndarray:
    """Mean square of each whole `frame`-sample frame, averaged over the pause window."""
    frames = len(samples) // frame
    energy = np.square(samples[: frames * frame].astype(np.float64)).reshape(frames, frame).mean(axis=1)
    window = max(1, round(WINDOW_SECONDS / FRAME_SECONDS))
    return np.convolve(energy, np.ones(window) / window, mode="same")


def split_points(samples: np.ndarray, sampling_rate: int, max_samples: int) -> list[tuple[int, int]]:
    """(start, end) sample offsets of consecutive clips covering `samples`, each at most `max_samples`."""
    total = len(samples)
    frame = max(1, round(FRAME_SECONDS * sampling_rate))
    energy = frame_energy(samples, frame) if total > max_samples else None
    clips, start = [], 0
    while total - start > max_samples:
        first, last = (start + max_samples // 2) // frame + 1, (start + max_samples) // frame - 1  # frames whose centre fits
        if first > last:  # a limit of a few frames: no room to look for a pause
            cut = start + max_samples
        else:
            span = energy[first : last + 1]
            quietest = first + len(span) - 1 - int(np.argmin(span[::-1]))
            cut = min(quietest * frame + frame // 2, start + max_samples)
        clips.append((start, cut))
        start = cut
    clips.append((start, total))
    return clips
