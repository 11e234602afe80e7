"""Prompts -> token ids: the tokenizer (tokenizer.json through the `tokenizers` library) and the model's
own chat template, rendered the way Transformers' `apply_chat_template` renders it.

Transformers is not imported at run time: it is heavy to import and not needed to tokenize.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import Gemma3nError


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
