"""Recordings longer than one clip: cut into consecutive clips the audio tower takes (Gemma 3n: 30 s,
188 soft tokens), each cut placed in a pause.

The pause measure is the signal's energy in 10 ms frames, averaged over a 300 ms window: the cut
goes to the centre of the quietest window in the second half of the clip's allowed span (the latest
of equally quiet ones), so a clip is never under half the limit unless it is the last, and speech
is not cut where a pause was available. Each cut looks only at the samples from the clip's start to
a little past the limit, so a recording read in blocks (`ClipSplitter`) is cut exactly where the
whole array is (`split_points`), and memory stays one clip's worth whatever the length.
"""

from __future__ import annotations

import numpy as np

FRAME_SECONDS = 0.010
WINDOW_SECONDS = 0.300
SILENCE_RMS = 1e-3  # about -60 dBFS: a clip quieter than this holds no speech


def frame_energy(samples: np.ndarray, frame: int, window: int) -> np.ndarray:
    """Mean square of each whole `frame`-sample frame, averaged over `window` frames."""
    frames = len(samples) // frame
    energy = np.square(samples[: frames * frame].astype(np.float64)).reshape(frames, frame).mean(axis=1)
    return np.convolve(energy, np.ones(window) / window, mode="same")


def is_silent(samples: np.ndarray) -> bool:
    return len(samples) == 0 or float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) < SILENCE_RMS


class ClipSplitter:
    """Cuts a recording that arrives in blocks into clips of at most `max_samples`: `push` each
    block, then `finish`; each returns the clips completed so far as (start, end, samples)."""

    def __init__(self, sampling_rate: int, max_samples: int):
        self.frame = max(1, round(FRAME_SECONDS * sampling_rate))
        self.window = max(1, round(WINDOW_SECONDS / FRAME_SECONDS))
        self.max_samples = max_samples
        self.lookahead = max_samples + (self.window // 2 + 1) * self.frame  # what one cut reads
        self.buffer = np.zeros(0, dtype=np.float32)
        self.start = 0  # the buffer's offset in the recording

    def push(self, block: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        self.buffer = np.concatenate([self.buffer, np.asarray(block, dtype=np.float32)])
        clips = []
        while len(self.buffer) > self.lookahead:
            clips.append(self.cut())
        return clips

    def finish(self) -> list[tuple[int, int, np.ndarray]]:
        clips = []
        while len(self.buffer) > self.max_samples:
            clips.append(self.cut())
        if len(self.buffer):
            clips.append((self.start, self.start + len(self.buffer), self.buffer))
            self.start, self.buffer = self.start + len(self.buffer), np.zeros(0, dtype=np.float32)
        return clips

    def cut(self) -> tuple[int, int, np.ndarray]:
        length = self.cut_length(self.buffer[: self.lookahead])
        clip = (self.start, self.start + length, self.buffer[:length])
        self.buffer, self.start = self.buffer[length:], self.start + length
        return clip

    def cut_length(self, samples: np.ndarray) -> int:
        """Where the clip starting at samples[0] ends: the quietest window's centre in the second half."""
        frame, limit = self.frame, self.max_samples
        first, last = (limit // 2) // frame + 1, limit // frame - 1  # frames whose centre fits
        if first > last:  # a limit of a few frames: no room to look for a pause
            return limit
        span = frame_energy(samples, frame, self.window)[first : last + 1]
        quietest = first + len(span) - 1 - int(np.argmin(span[::-1]))
        return min(quietest * frame + frame // 2, limit)


def split_points(samples: np.ndarray, sampling_rate: int, max_samples: int) -> list[tuple[int, int]]:
    """(start, end) sample offsets of consecutive clips covering `samples`, each at most `max_samples`."""
    splitter = ClipSplitter(sampling_rate, max_samples)
    return [(start, end) for start, end, _ in splitter.push(samples) + splitter.finish()]
