"""mlx-vlm: `mlx_vlm.load` (the Hugging Face checkpoint, towers included) and `mlx_vlm.stream_generate`
(greedy), with the tokenizer's end-of-sequence ids cleared.

Text: `stream_generate` takes a string; with the benchmark's WordLevel tokenizer the space-joined token
strings encode to the same ids (checked). Media (`--media`): the image encode is
`Model.get_image_features` (vision tower + embedder) on the processor's pixel values, the audio encode
`Model.get_audio_features` on its features; time to first token is `stream_generate` on the chat-
templated prompt with the image path / audio array (preprocessing included). Audio is given as a
float32 array: mlx-vlm reads audio files with mlx-audio, which is not installed here.
"""

import functools
import itertools

import soundfile
from mlx_vlm import load as load_model
from mlx_vlm import stream_generate
from mlx_vlm.prompt_utils import apply_chat_template
from mlx_vlm.utils import prepare_inputs

from .measure import run, with_activations

MEDIA_TEXT = "describe"


def load(path):
    model, processor = load_model(path)
    tokenizer = processor.tokenizer
    tokenizer.stopping_criteria.eos_token_ids = []
    tokenizer.stopping_criteria.additional_eos_token_ids = []
    return with_activations(model), processor, None


def prompt_text(processor, ids):
    tokenizer = processor.tokenizer
    text = " ".join(tokenizer.convert_ids_to_tokens(ids))
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    if encoded != ids:
        raise RuntimeError("the prompt text does not encode to the benchmark's token ids")
    return text


def stream(handle, ids, max_tokens):
    model, processor, _ = handle
    kwargs = dict(max_tokens=max_tokens, temperature=0.0)
    responses = stream_generate(model, processor, prompt_text(processor, ids), **kwargs)
    for response in itertools.islice(responses, max_tokens):  # not its closing summary item
        yield response.token


@functools.lru_cache
def media_source(kind, source):
    """Audio as a float32 array, read once before any timing (ours is given the same array)."""
    return soundfile.read(source, dtype="float32")[0] if kind == "audio" else source


def media_prompt(handle, kind):
    model, processor, _ = handle
    count = {"num_images": 1} if kind == "image" else {"num_audios": 1}
    return apply_chat_template(processor, model.config, MEDIA_TEXT, **count)


def encoder(handle, kind, source):
    model, processor, _ = handle
    source = media_source(kind, source)
    media = {"images": [source]} if kind == "image" else {"audio": [source]}
    inputs = prepare_inputs(processor, prompts=media_prompt(handle, kind),
                            image_token_index=model.config.image_token_index, **media)
    if kind == "image":
        return lambda: model.get_image_features(inputs["pixel_values"], model.vision_tower, model.config,
                                                model.embed_vision)
    return lambda: model.get_audio_features(inputs["input_features"], ~inputs["input_features_mask"])[0]


def media_stream(handle, kind, source, max_tokens):
    model, processor, _ = handle
    source = media_source(kind, source)
    media = {"image": [source]} if kind == "image" else {"audio": [source]}
    for response in stream_generate(model, processor, media_prompt(handle, kind), max_tokens=max_tokens,
                                    temperature=0.0, **media):
        yield response.prompt_tokens


if __name__ == "__main__":
    run(load, stream, media=(encoder, media_stream))
