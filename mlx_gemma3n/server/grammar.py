"""Constrained decoding for `response_format` json_object / json_schema, through llguidance: a grammar
per request, a matcher per sequence, and the mask of tokens the grammar allows at each step."""

from __future__ import annotations

import json

import numpy as np

from .errors import bad_request


class Grammars:
    """llguidance's view of the tokenizer (built once: ~1 s) and the grammars of requests."""

    def __init__(self, processor, vocab_size: int, eos_ids):
        import llguidance

        self.llguidance = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(
            processor.tokenizer.to_str(), n_vocab=vocab_size, eos_token=sorted(eos_ids)
        )

    def json_object(self) -> str:
        return self.llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})

    def json_schema(self, schema: dict, param: str) -> str:
        try:
            grammar = self.llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        except ValueError as exc:
            raise bad_request(f"{param} is not a JSON schema llguidance takes: {exc}", param) from None
        message = self.llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if message:
            raise bad_request(f"{param} is not a JSON schema llguidance takes: {message}", param)
        return grammar

    def matcher(self, grammar: str) -> "GrammarMatcher":
        return GrammarMatcher(self.llguidance.LLMatcher(self.tokenizer, grammar, log_level=0), self.vocab_size)


class GrammarMatcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def allowed(self) -> np.ndarray:
        """Boolean mask (vocab,) of the tokens the grammar allows next (EOS once it is complete)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()
