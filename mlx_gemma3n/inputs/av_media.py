"""FFmpeg through PyAV (the `video` extra: it ships FFmpeg in its wheels), imported only when a file
needs it: opening a container with its errors as one-line Gemma3nErrors, and what a stream's packets
tell without decoding."""

from __future__ import annotations

import contextlib

from ..errors import Gemma3nError

INSTALL_HINT = "video needs PyAV: pip install 'mlx-gemma3n[video]'"


class SoundTooLong(Gemma3nError):
    """A video's sound is longer than the caller takes (found while decoding, which then stops)."""


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


def packets_end(container, stream) -> float:
    """Where the stream's last packet ends, read from the packets alone (nothing decoded): for files
    whose header gives no duration, such as a browser's WebM recordings."""
    start, end = stream.start_time or 0, 0
    for packet in container.demux(stream):
        if packet.pts is not None:
            end = max(end, packet.pts + (packet.duration or 0) - start)
    return float(end * stream.time_base)
