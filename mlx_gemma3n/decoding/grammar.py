"""Constrained decoding through llguidance: the tokenizer's token table (built once: ~1 s), grammars
(a JSON schema, a JSON object, the tool calls of decoding/tools.py), a matcher per sequence, and the
mask of tokens it allows at each step. Shared by the Python API, the CLI and the server.

JSON comes out compact: fixed separators (", " and ": ") and no free whitespace between tokens, so
an object ends in about the tokens its content needs, whatever the weights (llguidance's default
lets a model wander in newlines and tabs until max_tokens).
"""

from __future__ import annotations

import json
import re
import weakref

import mlx.core as mx
import numpy as np

from ..errors import Gemma3nError, ParameterError

COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
INSTALL_HINT = "constrained decoding (tools, response_format) needs llguidance: pip install llguidance"


def compact(schema: dict) -> dict:
    return {**schema, "x-guidance": {**COMPACT_JSON, **schema.get("x-guidance", {})}}


class VocabularyView:
    """The token table llguidance needs, from the tokenizer's own vocabulary: for tokenizer.json
    files llguidance's reader refuses (a `Metaspace` decoder). Pieces are SentencePiece's: "▁" is a
    space, <0xNN> one byte; special tokens and added `<...>` ones are marked as llguidance expects (a 0xFF byte
    first): the table is the one llguidance reads from the same vocabulary with a byte-fallback decoder."""

    def __init__(self, processor, vocab_size: int, eos_ids):
        pieces = {i: piece for piece, i in processor.tokenizer.get_vocab(with_added_tokens=True).items()}
        added = processor.tokenizer.get_added_tokens_decoder().items()
        special = set(processor.special_token_ids) | {i for i, t in added if t.content.startswith("<") and t.content.endswith(">")}
        self.tokens = []
        for i in range(vocab_size):
            piece = pieces.get(i, f"<unused_id_{i}>")
            byte = BYTE_PIECE.fullmatch(piece)
            if i in special or i not in pieces:
                special.add(i)
                self.tokens.append(b"\xff" + piece.encode())
            else:
                self.tokens.append(bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode())
        self.special_token_ids = sorted(special)
        self.eos_token_id = min(eos_ids)
        self.bos_token_id = processor.bos_token_id
        self.encode = processor.tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        return self.encode(text, add_special_tokens=False).ids


class Grammars:
    """llguidance's view of the tokenizer and the grammars of requests."""

    def __init__(self, processor, vocab_size: int, eos_ids):
        try:
            import llguidance
        except ImportError:
            raise Gemma3nError(INSTALL_HINT) from None
        self.llguidance = llguidance
        self.vocab_size = vocab_size
        eos = sorted(eos_ids)
        try:
            self.tokenizer = llguidance.LLTokenizer(processor.tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos)
        except ValueError:  # a tokenizer.json its reader does not take
            view = llguidance.TokenizerWrapper(VocabularyView(processor, vocab_size, eos_ids))
            self.tokenizer = llguidance.LLTokenizer(view, n_vocab=vocab_size, eos_token=eos)

    def json_object(self) -> str:
        return self.json_schema({"type": "object"}, "response_format")

    def json_schema(self, schema: dict, param: str) -> str:
        try:
            grammar = self.llguidance.LLMatcher.grammar_from_json_schema(json.dumps(compact(schema)))
        except (TypeError, ValueError) as exc:
            raise ParameterError(f"{param} is not a JSON schema llguidance takes: {exc}", param) from None
        return self.checked(grammar, param, "a JSON schema llguidance takes")

    def lark(self, source: str, param: str) -> str:
        """A grammar in llguidance's Lark dialect (`%json {...}` embeds a JSON schema)."""
        return self.checked(self.llguidance.grammar_from("lark", source), param, "schemas llguidance takes")

    def checked(self, grammar: str, param: str, what: str) -> str:
        message = self.llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if message:
            raise ParameterError(f"{param} must hold {what}: {message.splitlines()[0]}", param)
        return grammar

    def matcher(self, grammar: str) -> "GrammarMatcher":
        return GrammarMatcher(self.llguidance.LLMatcher(self.tokenizer, grammar, log_level=0), self.vocab_size)


BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # processor -> {(vocab, eos ids): Grammars}


def grammars_for(processor, vocab_size: int, eos_ids) -> Grammars:
    """The processor's Grammars for this vocabulary, built on first use and kept while it lives."""
    built = BUILT.setdefault(processor, {})
    key = (vocab_size, frozenset(eos_ids))
    if key not in built:
        built[key] = Grammars(processor, vocab_size, eos_ids)
    return built[key]


class GrammarMatcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def allowed(self) -> np.ndarray:
        """Boolean mask (vocab,) of the tokens the grammar allows next (EOS once it is complete)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def restrict(self, logits: mx.array) -> mx.array:
        """`logits` (1, V) with the tokens the grammar does not allow at -inf."""
        allowed = mx.array(self.allowed())
        return mx.where(allowed[: logits.shape[-1]], logits, float("-inf"))

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()
