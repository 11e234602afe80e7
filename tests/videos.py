"""Videos and sound files made in the tests with PyAV: frame i a solid colour of PALETTE (so a decoded
frame tells which source frame it is), and tones at known times for the sound."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

WIDTH, HEIGHT = 64, 48
LEVELS = (32, 96, 160, 224)
# 64 colours at least 64 levels apart in some channel; frame i is PALETTE[i % 64] (neighbours differ a lot)
PALETTE = [np.array([LEVELS[k // 16], LEVELS[(k // 4) % 4], LEVELS[k % 4]], dtype=np.uint8) for k in ((i * 23) % 64 for i in range(64))]


def tone(seconds: float, rate: int, on: list[tuple[float, float]], frequency: float = 440.0) -> np.ndarray:
    """A 0.5-amplitude sine during each (start, end) of `on`, silence elsewhere."""
    t = np.arange(round(seconds * rate)) / rate
    gate = np.zeros(t.size, dtype=bool)
    for start, end in on:
        gate |= (t >= start) & (t < end)
    return (0.5 * np.sin(2 * np.pi * frequency * t) * gate).astype(np.float32)


def write_video(target, seconds: float, fps, sound: np.ndarray | None = None, *, rate: int = 44100, channels: int = 1,
                codec: str = "mpeg4", audio_codec: str = "aac", container: str = "mp4") -> None:
    """`seconds` of frames at `fps` (frame i all PALETTE[i % 64]) and, if given, `sound` (mono at `rate`,
    written on `channels` identical channels) into a path or a writable file object."""
    fps = Fraction(fps)
    with av.open(target, "w", format=container) as out:
        video = out.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        audio = out.add_stream(audio_codec, rate=rate, layout="mono" if channels == 1 else "stereo") if sound is not None else None
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((HEIGHT, WIDTH, 3), PALETTE[i % 64], dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, 1 / fps
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if audio is not None:
            mux_sound(out, audio, sound, rate, channels)


def mux_sound(out, stream, sound: np.ndarray, rate: int, channels: int = 1) -> None:
    """Mono `sound` at `rate` encoded into `stream` of `out`, on `channels` identical channels."""
    for start in range(0, sound.size, 1024):
        chunk = np.repeat(sound[start: start + 1024], channels)[None, :]
        frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono" if channels == 1 else "stereo")
        frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
        out.mux(stream.encode(frame))
    out.mux(stream.encode())


class Unseekable(io.RawIOBase):
    """A file a muxer can only append to, as a browser's recorder writes: it cannot go back to put the
    duration in the header."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, chunk):
        self.data += chunk
        return len(chunk)


def write_sound(target, sound: np.ndarray, rate: int, codec: str, container: str) -> None:
    """Mono `sound` at `rate`, encoded with `codec` into a sound-only `container` file (a path or a
    writable file object)."""
    with av.open(target, "w", format=container) as out:
        mux_sound(out, out.add_stream(codec, rate=rate, layout="mono"), sound, rate)
