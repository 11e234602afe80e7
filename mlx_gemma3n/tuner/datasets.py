"""Training data: jsonl files of chat (`{"messages": [...]}`, HF chat format, content parts may be
images and audio by path), prompt/completion (`{"prompt": ..., "completion": ...}`) or plain text
(`{"text": ...}`) lines, checked whole before training starts and tokenized with label masks.

Labels follow Transformers' causal-LM convention: a label per token, -100 where no loss is taken.
Chat lines are rendered by the model's chat template and, with `mask_prompt` (the default), train on
the assistant turns only (each turn's text and its end-of-turn marker); prompt/completion lines are
rendered as a user turn and an assistant turn and train on the completion; text lines train on every
token (bos + text + eos). Image and audio soft tokens are never labelled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import Gemma3nError
from ..inputs.processor import Processor

IGNORE = -100
FORMATS = "'messages', 'prompt' and 'completion', or 'text'"
ROLES = ("system", "user", "assistant", "model")
SHOWN_ERRORS = 10


@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    line: int
    images: list[np.ndarray] = field(default_factory=list)
    audio: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def labelled(self) -> int:
        """Tokens the loss is taken on (the first token predicts nothing)."""
        return sum(label != IGNORE for label in self.labels[1:])


@dataclass
class Dataset:
    path: Path
    examples: list[Example]
    truncated: int = 0  # examples cut to max_seq_length

    def __len__(self) -> int:
        return len(self.examples)


def problem(record) -> str | None:
    """What is wrong with one parsed line, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                return f"each message needs a 'role' among {', '.join(ROLES)}"
            if not isinstance(message.get("content"), (str, list)):
                return "each message needs a 'content' string or list of parts"
        return None
    if "prompt" in record or "completion" in record:
        if not all(isinstance(record.get(key), str) for key in ("prompt", "completion")):
            return "'prompt' and 'completion' must both be strings"
        return None if record["completion"] else "empty 'completion'"
    if "text" in record:
        return None if isinstance(record["text"], str) and record["text"] else "'text' must be a non-empty string"
    return f"expected {FORMATS}"


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of every line, or a Gemma3nError naming all bad lines."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise Gemma3nError(f"cannot read {path}: {exc}") from None
    records, errors = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            errors.append((number, "empty line"))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append((number, f"not JSON ({exc.msg})"))
            continue
        issue = problem(record)
        if issue:
            errors.append((number, issue))
        else:
            records.append((number, record))
    raise_errors(path, errors)
    if not records:
        raise Gemma3nError(f"{path} has no examples")
    return records


def raise_errors(path: Path, errors: list[tuple[int, str]]) -> None:
    if errors:
        shown = "; ".join(f"line {number}: {issue}" for number, issue in errors[:SHOWN_ERRORS])
        more = f" (and {len(errors) - SHOWN_ERRORS} more)" if len(errors) > SHOWN_ERRORS else ""
        raise Gemma3nError(f"{path}: {len(errors)} bad line(s), nothing trained: {shown}{more}")


class Tokenizer:
    """Records -> Examples for one model folder's processor."""

    def __init__(self, processor: Processor, mask_prompt: bool = True, max_seq_length: int | None = None):
        self.processor = processor
        self.mask_prompt = mask_prompt
        self.max_seq_length = max_seq_length
        tokens = processor.special_tokens
        self.media_ids = {processor.token_id(tokens[k]) for k in ("image_token", "audio_token") if k in tokens} - {None}
        eos = processor.token_id(tokens.get("eos_token", "<eos>"))
        self.eos = [] if eos is None else [eos]

    def rendered(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.processor.expand_media_placeholders(text)

    def chat(self, messages: list[dict], mask_prompt: bool) -> tuple[list[int], list[int]]:
        """Ids and labels of a conversation: each assistant turn's characters are found as the
        difference of two renderings (up to the turn's generation prompt, up to its end)."""
        text = self.rendered(messages, add_generation_prompt=False)
        encoding = self.processor.tokenizer.encode(text, add_special_tokens=False)
        if not mask_prompt:
            return encoding.ids, list(encoding.ids)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] not in ("assistant", "model"):
                continue
            before, through = self.rendered(messages[:i], True), self.rendered(messages[: i + 1], False)
            if not (through.startswith(before) and text.startswith(through)):
                raise Gemma3nError("the chat template does not render earlier turns as a prefix; use --no-mask-prompt")
            spans.append((len(before), len(through)))
        labels = [
            token if any(start <= begin < stop for start, stop in spans) else IGNORE
            for token, (begin, _) in zip(encoding.ids, encoding.offsets)
        ]
        return encoding.ids, labels

    def example(self, number: int, record: dict) -> Example:
        if "text" in record:
            ids = self.processor.encode(record["text"], add_bos=True) + self.eos
            example = Example(ids, list(ids), number)
        else:
            messages = self.processor.expand_parts(record.get("messages") or [
                {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}
            ])  # videos as their frames and sound, long audio as clips: what generation shows the model
            ids, labels = self.chat(messages, self.mask_prompt)
            images, audio = self.processor.load_media(messages)
            example = Example(ids, labels, number, images, audio)
        example.labels = [IGNORE if token in self.media_ids else label for token, label in zip(example.ids, example.labels)]
        return example

    def truncated(self, example: Example) -> Example:
        limit = self.max_seq_length
        if (example.images or example.audio) and any(t in self.media_ids for t in example.ids[limit:]):
            raise Gemma3nError(f"longer than --max-seq-length {limit} with image/audio tokens past the limit")
        return Example(example.ids[:limit], example.labels[:limit], example.line, example.images, example.audio)


def load_dataset(path: str | Path, tokenizer: Tokenizer) -> Dataset:
    """Every line of a jsonl file checked and tokenized; all bad lines reported at once."""
    path = Path(path)
    dataset, errors = Dataset(path, []), []
    for number, record in read_records(path):
        try:
            example = tokenizer.example(number, record)
            if tokenizer.max_seq_length and len(example.ids) > tokenizer.max_seq_length:
                example = tokenizer.truncated(example)
                dataset.truncated += 1
        except Gemma3nError as exc:
            errors.append((number, str(exc)))
            continue
        if example.labelled == 0:
            errors.append((number, "no token to train on (no assistant turn, or all masked)"))
        else:
            dataset.examples.append(example)
    raise_errors(path, errors)
    return dataset
