"""Prompts -> model inputs: the tokenizer (tokenizer.json through the `tokenizers` library), the
model's own chat template (rendered the way Transformers' `apply_chat_template` renders it), and the
images and audio clips of chat messages, with their placeholders expanded as Transformers'
Gemma3nProcessor expands them. A video part becomes the frames and sound it holds (video.py).

Transformers is not imported at run time: it is heavy to import and not needed to tokenize.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

import numpy as np
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..architecture.audio import AudioConfig
from ..errors import Gemma3nError
from .audio_features import GEMMA3N_AUDIO, AudioFeatureSettings, extract_features, num_frames
from .audio_files import load_audio
from .audio_split import split_points
from .image import preprocess_image
from .preprocessor_config import PREPROCESSOR_CONFIG, PROCESSOR_CONFIG, preprocessing_settings
from .video import load_video

BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
MAX_CLIP_SECONDS = 30


def soft_token_count(num_samples: int, audio_config: dict, settings: AudioFeatureSettings = GEMMA3N_AUDIO) -> int:
    """How many soft tokens the encoder gives for one clip of `num_samples` samples (all valid; the
    model pads them to `audio_soft_tokens_per_image`), its features made with `settings`."""
    config = AudioConfig.from_dict(audio_config)
    steps = num_frames(num_samples, settings)
    for stride_t, _ in config.sscp_conv_stride_size:
        steps = math.ceil(steps / stride_t)
    return math.ceil(steps / config.conf_reduction_factor)


@dataclass
class Prompt:
    """Token ids and the preprocessed media their placeholders stand for, in order."""

    ids: list[int]
    images: list[np.ndarray] = field(default_factory=list)  # (height, width, 3) float32 each
    audio: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (features, valid mask)


def media_source(part: dict, kind: str):
    for key in (kind, "url", "path"):
        if part.get(key) is not None:
            return part[key]
    raise Gemma3nError(f"a {kind} content part needs an '{kind}', 'url' or 'path' entry")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Gemma3nError(f"{path} is not valid JSON: {exc}") from None


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _raise_template_error(message: str):
    raise TemplateError(message)


class Processor:
    """Tokenizer + chat template of a model folder."""

    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise Gemma3nError(f"no tokenizer.json in {model_dir}")
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise Gemma3nError(f"cannot read {tokenizer_file}: {exc}") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        self.special_tokens = {
            key: _token_text(value)
            for key, value in {**_read_json(model_dir / "special_tokens_map.json"), **config}.items()
            if key.endswith("_token") and _token_text(value) is not None
        }
        self.add_bos_token = config.get("add_bos_token", True)
        self.bos_token_id = self.token_id(self.special_tokens.get("bos_token", "<bos>"))
        self.chat_template = self._read_chat_template(model_dir, config)
        model_config = _read_json(model_dir / "config.json")
        self.audio_settings, self.image_settings = preprocessing_settings(
            model_dir, _read_json(model_dir / PROCESSOR_CONFIG), _read_json(model_dir / PREPROCESSOR_CONFIG)
        )
        self.audio_tower_config = model_config.get("audio_config")
        self.audio_soft_tokens = model_config.get("audio_soft_tokens_per_image", 188)
        self.media_sequences = {
            self.special_tokens[soft]: f"\n\n{self.special_tokens[start]}{self.special_tokens[soft] * count}{self.special_tokens[end]}\n\n"
            for soft, start, end, count in (
                ("image_token", "boi_token", "eoi_token", model_config.get("vision_soft_tokens_per_image", 256)),
                ("audio_token", "boa_token", "eoa_token", self.audio_soft_tokens),
            )
            if all(key in self.special_tokens for key in (soft, start, end))
        }
        generation = _read_json(model_dir / "generation_config.json")
        eos = generation.get("eos_token_id", self.token_id(self.special_tokens.get("eos_token", "<eos>")))
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.generation_config = generation

    @staticmethod
    def _read_chat_template(model_dir: Path, config: dict) -> str | None:
        for name in ("chat_template.jinja", "chat_template.json"):
            path = model_dir / name
            if path.is_file():
                text = path.read_text()
                return json.loads(text)["chat_template"] if name.endswith(".json") else text
        template = config.get("chat_template")
        return template if isinstance(template, str) else None

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; `skip_special_tokens` leaves out the ids Transformers' Gemma tokenizer counts
        as special (see `special_token_ids`)."""
        kept = [i for i in ids if i not in self.special_token_ids] if skip_special_tokens else list(ids)
        return self.tokenizer.decode(kept, skip_special_tokens=False)

    @cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of the byte-fallback tokens `<0x00>`..`<0xFF>`: a run of them decodes as a whole (its
        bytes as UTF-8 when they are valid, else one U+FFFD per byte)."""
        return frozenset(i for token, i in self.tokenizer.get_vocab().items() if BYTE_TOKEN.fullmatch(token))

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        """The added tokens flagged special, and the tokens the tokenizer config names (bos, eos, pad,
        unk, the media tokens; `<mask>` unless it names another: GemmaTokenizer's default), as
        Transformers' tokenizer registers them."""
        flagged = {i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}
        named = [token for token in {"mask_token": "<mask>", **self.special_tokens}.values() if isinstance(token, str)]
        return frozenset(flagged | {i for i in map(self.token_id, named) if i is not None})

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The template's text; `tools` (OpenAI declarations) are handed to a template that takes them."""
        if not self.chat_template:
            raise Gemma3nError("this model folder has no chat template (chat_template.jinja or tokenizer_config.json)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **({"tools": tools} if tools else {}),
                **self.special_tokens,
            )
        except TemplateError as exc:
            raise Gemma3nError(f"cannot render the chat template: {exc}") from None

    def image_pixels(self, image) -> np.ndarray:
        """Anything `image.load_image` takes -> (height, width, 3) float32 pixel values, as the
        checkpoint's image processor makes them."""
        return preprocess_image(image, self.image_settings)

    def audio_features(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A mono float32 clip at the checkpoint's sampling rate -> (log-mel features (T, feature_size),
        valid mask (T,)), as the checkpoint's feature extractor makes them."""
        settings = self.audio_settings
        features, valid = extract_features(samples, settings)
        if not valid.any():
            raise Gemma3nError(
                f"an audio clip of {len(samples)} samples is too short: a feature frame takes "
                f"{settings.frame_length + 1} samples at {settings.sampling_rate} Hz"
            )
        if self.audio_tower_config is not None:
            tower = AudioConfig.from_dict(self.audio_tower_config)
            if tower.input_feat_size != settings.feature_size:
                raise Gemma3nError(
                    f"the audio tower takes {tower.input_feat_size} mel bins (config.json audio_config.input_feat_size) "
                    f"but its feature extractor makes {settings.feature_size} (feature_size, 128 without a {PREPROCESSOR_CONFIG})"
                )
            tokens = soft_token_count(len(samples), self.audio_tower_config, settings)
            if tokens > self.audio_soft_tokens:
                raise Gemma3nError(
                    f"the audio clip ({len(samples) / settings.sampling_rate:.2f} s) gives {tokens} soft tokens; this model "
                    f"takes at most {self.audio_soft_tokens} per clip: split it into several clips"
                )
        return features, valid

    @cached_property
    def max_clip_samples(self) -> int:
        """The longest clip the audio tower takes: 30 s, fewer samples if they would give more soft
        tokens than the model's `audio_soft_tokens_per_image`."""
        rate = self.audio_settings.sampling_rate
        low, high = 1, MAX_CLIP_SECONDS * rate
        if self.audio_tower_config is None:
            return high
        while low < high:  # the largest n whose soft tokens fit (the count grows with n)
            middle = (low + high + 1) // 2
            if soft_token_count(middle, self.audio_tower_config, self.audio_settings) <= self.audio_soft_tokens:
                low = middle
            else:
                high = middle - 1
        return low

    def split_audio(self, samples: np.ndarray) -> list[tuple[int, int]]:
        """(start, end) sample offsets of the clips a recording is cut into: consecutive, each at most
        `max_clip_samples`, each cut in a pause (audio_split.py)."""
        return split_points(samples, self.audio_settings.sampling_rate, self.max_clip_samples)

    def video_parts(self, source, fps: float = 1.0, max_frames: int = 8) -> list[dict]:
        """The content parts a video is shown as: each sampled frame as an image after its time as text
        ("Frame at 0:03:"), then its sound as an audio part when it has any (video.py says how frames
        are sampled). `source`: a file path, the file's bytes, or frames (T, H, W, 3) uint8 taken `fps`
        times a second."""
        return load_video(source, fps, max_frames, self.audio_settings.sampling_rate).parts()

    def expanded_parts(self, part) -> list[dict]:
        """A content part as the parts it stands for: a video part {"type": "video", "video": ...,
        optional "fps", "max_frames"} its `video_parts` (their audio expanded in turn), an audio part
        loaded and, when longer than a clip, cut into its clips; any other part as it is."""
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "video":
            options = {key: part[key] for key in ("fps", "max_frames") if part.get(key) is not None}
            parts = self.video_parts(media_source(part, "video"), **options)
            return [expanded for sub in parts for expanded in self.expanded_parts(sub)]
        if kind == "audio":
            samples = load_audio(media_source(part, "audio"), self.audio_settings.sampling_rate)
            return [{"type": "audio", "audio": samples[start:end]} for start, end in self.split_audio(samples)]
        return [part]

    def expand_parts(self, messages: list[dict]) -> list[dict]:
        """The messages with each content part expanded (`expanded_parts`): videos as frames and sound,
        audio in clips of at most 30 s."""
        return [
            {**message, "content": [p for part in message["content"] for p in self.expanded_parts(part)]}
            if isinstance(message.get("content"), list) else message
            for message in messages
        ]

    def load_media(self, messages: list[dict]) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
        """The images and audio clips of HF-format chat messages, loaded and preprocessed, in order."""
        images, audio = [], []
        for message in messages:
            content = message.get("content")
            for part in content if isinstance(content, list) else []:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    images.append(self.image_pixels(media_source(part, "image")))
                elif kind == "audio":
                    audio.append(self.audio_features(load_audio(media_source(part, "audio"), self.audio_settings.sampling_rate)))
        return images, audio

    def expand_media_placeholders(self, text: str) -> str:
        """Each image/audio placeholder -> start token, the soft-token run, end token (Gemma3nProcessor)."""
        for placeholder, sequence in self.media_sequences.items():
            text = text.replace(placeholder, sequence)
        return text

    def prepare(self, messages: list[dict], tools: list[dict] | None = None) -> Prompt:
        """Chat messages (content strings or parts: text, image, audio of any length, video) -> Prompt,
        generation prompt included."""
        messages = self.expand_parts(messages)
        text = self.expand_media_placeholders(self.apply_chat_template(messages, add_generation_prompt=True, tools=tools))
        images, audio = self.load_media(messages)
        ids = self.encode(text, add_bos=False)
        for kind, placeholder, items in (("image", "image_token", images), ("audio", "audio_token", audio)):
            sequence = self.media_sequences.get(self.special_tokens.get(placeholder))
            found = text.count(sequence) if sequence else 0
            if found != len(items):
                raise Gemma3nError(f"the prompt has {found} {kind} placeholder(s) for {len(items)} {kind}(s)")
        return Prompt(ids, images, audio)
