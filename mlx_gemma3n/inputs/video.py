"""Video input: a file (or its bytes) decoded with PyAV into timed frames and its audio track, or an array
of frames, and the content parts a video is shown to the model as.

Frames are sampled at times 0, s, 2s, ... before the end of the video, with s = max(1 / fps, duration /
max_frames): at most `fps` frames a second, and when that would give more than `max_frames`, exactly
`max_frames` spread evenly over the whole video. At each time the frame on screen then is taken (the last
one that starts at or before it); a frame on screen at several of those times is taken once.

The layout the model sees (Google's Gemma 3 video notebook and Hugging Face's Gemma 3n recipe: frames as
images, each after its time as text, then the sound as audio), for each frame

    {"type": "text", "text": "Frame at 0:03:"}, {"type": "image", "image": <the frame, a PIL image>}

then, when the video has sound, {"type": "audio", "audio": <its samples>} (cut into clips of at most 30 s
like any audio part).

PyAV (the `video` extra: it ships FFmpeg in its wheels; av_media.py) is imported only when a file is decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import Gemma3nError
from .audio_files import BLOCK_SECONDS, resampled
from .av_media import opened, packets_end, sound_blocks, stream_duration

SAME_TIME = 1e-3  # seconds: frame times closer than this are the same time (float rounding of time bases)


@dataclass
class Video:
    frames: list[tuple[float, Image.Image]]  # (seconds from the start, RGB frame), in order
    audio: np.ndarray | None  # mono float32 at the sampling rate asked for; None without a sound track

    def parts(self) -> list[dict]:
        """The content parts the model is shown (the module's docstring)."""
        parts = []
        for seconds, image in self.frames:
            parts += [{"type": "text", "text": f"Frame at {clock(seconds)}:"}, {"type": "image", "image": image}]
        return parts + ([{"type": "audio", "audio": self.audio}] if self.audio is not None else [])


def clock(seconds: float) -> str:
    """[h:]m:ss, with tenths when the time is not a whole second: 0:03, 1:02:05, 0:00.5."""
    tenths = round(seconds * 10)
    whole, tenth = divmod(tenths, 10)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
    return text + (f".{tenth}" if tenth else "")


def sample_times(duration: float, fps: float, max_frames: int) -> list[float]:
    """The times frames are taken at (the module's docstring); always at least 0."""
    step = max(1 / fps, duration / max_frames)
    return [k * step for k in range(max_frames) if k == 0 or k * step < duration - SAME_TIME]


def pick_frames(frames, times: list[float]) -> list[tuple[float, object]]:
    """From (time, frame) pairs in time order, the frame on screen at each of `times` (the first frame
    for times before it), each frame once. Stops reading `frames` once every time is served."""
    chosen, previous, pending = [], None, list(times)

    def take(entry):
        if not chosen or chosen[-1] is not entry:
            chosen.append(entry)

    for entry in frames:
        while pending and entry[0] > pending[0] + SAME_TIME:
            take(previous or entry)
            pending.pop(0)
        if not pending:
            return chosen
        previous = entry
    if previous is not None and pending:
        take(previous)
    return chosen


def load_video(source, fps: float = 1.0, max_frames: int = 8, sampling_rate: int = 16_000,
               max_pixels: int | None = None, max_sound_seconds: float | None = None) -> Video:
    """The frames (sampled as the module's docstring says) and the sound of a video: a file path, the
    file's bytes, or an array of frames (T, H, W, 3) uint8 taken `fps` times a second (no sound).
    `max_pixels` refuses larger frames before any is decoded; a sound longer than `max_sound_seconds`
    raises SoundTooLong once that much is decoded (a small file can hold hours of sound)."""
    if not fps > 0:
        raise Gemma3nError(f"the video frame rate must be > 0, got {fps}")
    if not (isinstance(max_frames, int) and max_frames >= 1):
        raise Gemma3nError(f"max_frames must be an integer >= 1, got {max_frames}")
    if isinstance(source, np.ndarray):
        return Video(frames_of_array(source, fps, max_frames), None)
    if isinstance(source, (bytes, bytearray, memoryview)):
        opener, name = lambda: io.BytesIO(source), "the video"
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        raise Gemma3nError(f"video URLs are not fetched ({source}): download the file and pass its path or its bytes")
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise Gemma3nError(f"video file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
        opener, name = lambda: str(path), f"video file {path}"
    else:
        raise Gemma3nError(f"cannot read a video from a {type(source).__name__} (pass a path, the file's bytes or an array of frames)")
    return Video(decode_frames(opener, name, fps, max_frames, max_pixels), decode_sound(opener, name, sampling_rate, max_sound_seconds))


def frames_of_array(frames: np.ndarray, fps: float, max_frames: int) -> list[tuple[float, Image.Image]]:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise Gemma3nError(f"a video array must be (frames, height, width, 3) uint8 with at least one frame, "
                           f"got {frames.dtype} of shape {frames.shape}")
    timed = [(k / fps, frame) for k, frame in enumerate(frames)]
    return [(seconds, Image.fromarray(frame)) for seconds, frame in pick_frames(timed, sample_times(len(frames) / fps, fps, max_frames))]


def decode_frames(opener, name: str, fps: float, max_frames: int, max_pixels: int | None) -> list[tuple[float, Image.Image]]:
    """Decodes the first video stream from its start until the last frame sampled; only the sampled
    frames are converted and kept."""
    with opened(opener, name) as container:
        if not container.streams.video:
            raise Gemma3nError(f"{name} has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if max_pixels is not None and width * height > max_pixels:
            raise Gemma3nError(f"{name}'s frames are {width} x {height} pixels, over the limit of {max_pixels}")
        duration = stream_duration(container, stream)
        if duration is None:
            with opened(opener, name) as scan:
                duration = packets_end(scan, scan.streams.video[0])
        stream.thread_type = "AUTO"
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        timed = ((frame.time - start, frame) for frame in container.decode(stream) if frame.time is not None)
        picked = pick_frames(timed, sample_times(duration, fps, max_frames))
        if not picked:
            raise Gemma3nError(f"{name} has no frames")
        return [(max(0.0, seconds), frame.to_image()) for seconds, frame in picked]


def decode_sound(opener, name: str, sampling_rate: int, max_seconds: float | None = None) -> np.ndarray | None:
    """The first audio stream at `sampling_rate`, as an audio file's sound is decoded (audio_files.py:
    channels averaged, resampled by soxr); None without one, or when it is empty."""
    with opened(opener, name) as container:
        if not container.streams.audio:
            return None
        blocks = list(resampled(sound_blocks(container, container.streams.audio[0], BLOCK_SECONDS), name, sampling_rate, max_seconds))
    return np.concatenate(blocks) if blocks else None
