"""mlx-gemma3n through its public API: `load`, and a generation `Session` (what `stream_generate`
runs) with end-of-sequence ids cleared, greedy.

Media (`--media`): the image encode is `model.image_soft_tokens` on the preprocessed pixels, the audio
encode `model.audio_soft_tokens` on the clip's features; time to first token runs `prepare_prompt`
(media loading and preprocessing) and a fresh `Session`. Images are resized to the checkpoint
preprocessor's size (the benchmark's reduced 256 x 256), which our processor reads itself.
$BENCH_ACTIVATIONS (--equal-activations) loads with that dtype: no CPU float32-activation choice.
"""

import functools

import numpy as np
import soundfile

from mlx_gemma3n import load
from mlx_gemma3n.generate import Session, prepare_prompt, sampling_params

from .measure import ACTIVATIONS, run

MEDIA_TEXT = "describe"


def stream(handle, ids, max_tokens):
    model, processor = handle
    session = Session(model, processor)
    session.eos_ids = set()
    yield from session.stream(ids, sampling_params(processor, temperature=0.0), max_tokens)


@functools.lru_cache
def media_source(kind, source):
    """Audio as a float32 array, read once before any timing (mlx-vlm is given the same array)."""
    return soundfile.read(source, dtype="float32")[0] if kind == "audio" else source


def media_prompt(handle, kind, source):
    return prepare_prompt(handle[1], [{"role": "user", "content": [{"type": kind, kind: source},
                                                                   {"type": "text", "text": MEDIA_TEXT}]}])


def encoder(handle, kind, source):
    model = handle[0]
    prompt = media_prompt(handle, kind, media_source(kind, source))
    if kind == "image":
        return lambda: model.image_soft_tokens(np.stack(prompt.images))
    return lambda: model.audio_soft_tokens(*prompt.audio[0])


def media_stream(handle, kind, source, max_tokens):
    source = media_source(kind, source)
    prompt = media_prompt(handle, kind, source)
    for _ in stream(handle, prompt, max_tokens):
        yield len(prompt.ids)


if __name__ == "__main__":
    run(lambda path: load(path, dtype=ACTIVATIONS), stream, media=(encoder, media_stream))
