"""Prompts -> model inputs: the tokenizer (tokenizer.json through the `tokenizers` library), the
model's own chat template (rendered the way Transformers' `apply_chat_template` renders it), and the
images and audio clips of chat messages, with their placeholders expanded as Transformers'
Gemma3nProcessor expands them.

Transformers is not imported at run time: it is heavy to import and not needed to tokenize.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .audio_features import extract_features, load_audio
from .errors import Gemma3nError
from .image import load_image, preprocess_image


@dataclass
class Prompt:
    """Token ids and the preprocessed media their placeholders stand for, in order."""

    ids: list[int]
    images: list[np.ndarray] = field(default_factory=list)  # (768, 768, 3) float32 each
    audio: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (features, valid mask)


def media_source(part: dict, kind: str):
    for key in (kind, "url", "path"):
        if part.get(key) is not None:
            return part[key]
    raise Gemma3nError(f"a {kind} content part needs an '{kind}', 'url' or 'path' entry")


def load_media(messages: list[dict]) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """The images and audio clips of HF-format chat messages, loaded and preprocessed, in order."""
    images, audio = [], []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                images.append(preprocess_image(load_image(media_source(part, "image"))))
            elif kind == "audio":
                features, valid = extract_features(load_audio(media_source(part, "audio")))
                if not valid.any():
                    raise Gemma3nError("an audio clip is too short: it must be longer than 512 samples (32 ms)")
                audio.append((features, valid))
    return images, audio


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
        self.media_sequences = {
            self.special_tokens[soft]: f"\n\n{self.special_tokens[start]}{self.special_tokens[soft] * count}{self.special_tokens[end]}\n\n"
            for soft, start, end, count in (
                ("image_token", "boi_token", "eoi_token", model_config.get("vision_soft_tokens_per_image", 256)),
                ("audio_token", "boa_token", "eoa_token", model_config.get("audio_soft_tokens_per_image", 188)),
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
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise Gemma3nError("this model folder has no chat template (chat_template.jinja or tokenizer_config.json)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except TemplateError as exc:
            raise Gemma3nError(f"cannot render the chat template: {exc}") from None

    def expand_media_placeholders(self, text: str) -> str:
        """Each image/audio placeholder -> start token, the soft-token run, end token (Gemma3nProcessor)."""
        for placeholder, sequence in self.media_sequences.items():
            text = text.replace(placeholder, sequence)
        return text

    def prepare(self, messages: list[dict]) -> Prompt:
        """Chat messages (content strings or parts: text, image, audio) -> Prompt, generation prompt included."""
        text = self.expand_media_placeholders(self.apply_chat_template(messages, add_generation_prompt=True))
        images, audio = load_media(messages)
        ids = self.encode(text, add_bos=False)
        for kind, placeholder, items in (("image", "image_token", images), ("audio", "audio_token", audio)):
            sequence = self.media_sequences.get(self.special_tokens.get(placeholder))
            found = text.count(sequence) if sequence else 0
            if found != len(items):
                raise Gemma3nError(f"the prompt has {found} {kind} placeholder(s) for {len(items)} {kind}(s)")
        return Prompt(ids, images, audio)
