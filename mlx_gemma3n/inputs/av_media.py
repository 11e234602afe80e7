"""FFmpeg through PyAV (the `video` extra: it ships FFmpeg in its wheels), imported only when a file
needs it: opening a container with its errors as one-line Gemma3nErrors, a stream's length, and a
sound stream decoded to mono blocks at its own rate."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from ..errors import Gemma3nError

AV_INSTALL = "pip install 'mlx-gemma3n[video]'"
INSTALL_HINT = f"video needs PyAV: {AV_INSTALL}"


def pyav():
    try:
        import av
    except ImportError:
        raise Gemma3nError(INSTALL_HINT) from None
    return av


@contextlib.contextmanager
def opened(opener, name: str):
    """The PyAV container of the source, its errors as one-line Gemma3nErrors."""
    av = pyav()
    try:
        with av.open(opener(), "r") as container:
            yield container
    except av.error.FFmpegError as exc:
        raise Gemma3nError(f"cannot read {name}: {exc.strerror or exc}") from None


def stream_duration(container, stream) -> float | None:
    """Seconds of a stream from the container's header: None when it says nothing."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def packets_end(container, stream) -> float:
    """Where the stream's last packet ends, read from the packets alone (nothing decoded): for files
    whose header gives no duration, such as a browser's WebM recordings."""
    start, end = stream.start_time or 0, 0
    for packet in container.demux(stream):
        if packet.pts is not None:
            end = max(end, packet.pts + (packet.duration or 0) - start)
    return float(end * stream.time_base)


def media_duration(container, stream) -> float:
    """Seconds of a stream, from the header or else its packets (which reads the container through)."""
    duration = stream_duration(container, stream)
    return packets_end(container, stream) if duration is None else duration


def sound_blocks(container, stream, block_seconds: float) -> Iterator[tuple[int, np.ndarray]]:
    """A sound stream decoded as (rate, mono float32 samples) blocks of about `block_seconds` at the
    stream's own rate, its channels averaged."""
    to_float = pyav().AudioResampler(format="fltp", rate=stream.rate or None)  # planar float, one rate throughout
    pending, count, rate = [], 0, None

    def frames():
        for frame in container.decode(stream):
            yield from to_float.resample(frame)
        yield from to_float.resample(None)

    for frame in frames():
        rate = rate or frame.sample_rate
        mono = frame.to_ndarray().mean(axis=0, dtype=np.float32)
        pending.append(mono)
        count += mono.size
        if count >= block_seconds * rate:
            yield rate, np.concatenate(pending)
            pending, count = [], 0
    if pending:
        yield rate, np.concatenate(pending)
