"""Per-token cost of constrained decoding (`response_format` json_object / json_schema, llguidance)
on the server's path: the grammar's mask of allowed tokens, its application to the logits, and the
matcher's advance, beside the unconstrained pick.

    python -m benchmarks.grammar_cost [--tokens 256] [--runs 3]

The cost depends on the vocabulary (llguidance walks a trie of every token's bytes), so the
benchmark's word-list tokenizer will not do: this one trains a byte-level BPE of Gemma's vocabulary
size (262,144 pieces, multi-word ones included, as Gemma's has) on Python's standard library sources
(on every machine; ~2 minutes once, cached under benchmarks/cache/). Each walk follows a grammar for
up to --tokens tokens, taking at each step the allowed token with the highest seeded random logit,
through the server's own steps (grammar.GrammarMatcher, the mask applied as Decoder.penalized does);
the same number of unconstrained picks (argmax of fresh logits) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from mlx_gemma3n.server.grammar import Grammars

from .checkpoints import CACHE

VOCAB = 262_144
EOS = 1
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"]},
    },
    "required": ["name", "age", "tags"],
}


def bpe_tokenizer() -> Tokenizer:
    path = CACHE / "bpe-262k" / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [f for f in sorted(stdlib.rglob("*.py")) if "site-packages" not in f.parts]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([  # lines, not words: pieces may span spaces
        pre_tokenizers.Split(Regex("\n"), "merged_with_previous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, show_progress=False,
                                  special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((f.read_text(errors="replace") for f in sources), trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return tokenizer


def fresh_logits(key: mx.array, vocab: int) -> mx.array:
    logits = mx.random.normal((1, vocab), key=key)
    mx.eval(logits)
    return logits


def walk(grammars: Grammars, grammar: str, vocab: int, tokens: int, seed: int) -> dict[str, list[float]]:
    """Times (ms) of each constrained step's mask, masked pick and advance."""
    matcher = grammars.matcher(grammar)
    keys = mx.random.split(mx.random.key(seed), tokens)
    times = {"mask": [], "masked pick": [], "advance": []}
    for key in keys:
        logits = fresh_logits(key, vocab)
        start = time.perf_counter()
        allowed = matcher.allowed()
        masked = time.perf_counter()
        token = mx.argmax(mx.where(mx.array(allowed), logits, float("-inf")), axis=-1).item()
        picked = time.perf_counter()
        matcher.accept(token)
        advanced = time.perf_counter()
        for name, span in (("mask", masked - start), ("masked pick", picked - masked), ("advance", advanced - picked)):
            times[name].append(1000 * span)
        if token == EOS or matcher.finished:
            break
    return times


def plain_picks(vocab: int, count: int) -> list[float]:
    """Times (ms) of `count` unconstrained picks."""
    times = []
    for key in mx.random.split(mx.random.key(1234), count):
        logits = fresh_logits(key, vocab)
        start = time.perf_counter()
        mx.argmax(logits, axis=-1).item()
        times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="most tokens per walk")
    parser.add_argument("--runs", type=int, default=3, help="walks per grammar (seeds 0..runs-1)")
    args = parser.parse_args()
    tokenizer = bpe_tokenizer()
    vocab = tokenizer.get_vocab_size()
    started = time.perf_counter()
    grammars = Grammars(SimpleNamespace(tokenizer=tokenizer), vocab, {EOS})
    print(f"llguidance tokenizer view of {vocab} tokens built in {time.perf_counter() - started:.2f} s")
    cases = {"json_object": grammars.json_object(), "json_schema": grammars.json_schema(SCHEMA, "response_format")}
    print("ms per token; constrained = mask + masked pick + advance; extra = constrained - plain pick (means)")
    print(f"{'grammar':<12} {'tokens':>6} {'mask':>7} {'masked pick':>12} {'advance':>8} {'constrained':>12} "
          f"{'p95':>7} {'plain pick':>11} {'extra':>7}")
    for name, grammar in cases.items():
        times = {key: [] for key in ("mask", "masked pick", "advance")}
        for seed in range(args.runs):
            for key, values in walk(grammars, grammar, vocab, args.tokens, seed).items():
                times[key] += values
        times["plain pick"] = plain_picks(vocab, len(times["mask"]))
        constrained = [sum(step) for step in zip(times["mask"], times["masked pick"], times["advance"])]
        mean = {key: statistics.mean(values) for key, values in times.items()}
        print(f"{name:<12} {len(constrained):>6} {mean['mask']:>7.3f} {mean['masked pick']:>12.3f} {mean['advance']:>8.3f} "
              f"{statistics.mean(constrained):>12.3f} {statistics.quantiles(constrained, n=20)[-1]:>7.3f} "
              f"{mean['plain pick']:>11.3f} {statistics.mean(constrained) - mean['plain pick']:>7.3f}")
    print(json.dumps({"vocab": vocab, "tokens_per_walk": args.tokens, "runs": args.runs}))


if __name__ == "__main__":
    main()
