"""Per-token cost of constrained decoding (`response_format` json_object / json_schema, and tool
calls under `tool_choice` "required" for 1 and 16 tools; llguidance) on the decoding path the API and
the server share: the grammar's mask of allowed tokens, its application to the logits, and the
matcher's advance, beside the unconstrained pick; the cost a mixed batch of 8 rows adds to one engine
step; and the time to build a request's tool grammar for 1, 16 and 128 tools.

    python -m benchmarks.grammar_cost [--tokens 256] [--runs 3] [--step-shape small|none]

The shares are against our own decode step of --step-shape (bf16, batched layout, as the server
runs it), measured in the same run at 1 and 8 rows (benchmarks.batched_step's timing).

The cost depends on the vocabulary (llguidance walks a trie of every token's bytes), so the
benchmark's word-list tokenizer will not do: this one trains a byte-level BPE of Gemma's vocabulary
size (262,144 pieces, multi-word ones included, as Gemma's has) on Python's standard library sources
(on every machine; ~2 minutes once, cached under benchmarks/cache/). Each walk follows a grammar for
up to --tokens tokens, taking at each step the allowed token with the highest seeded random logit,
through the shared steps (GrammarMatcher.allowed / restrict / accept, as Decoder.penalized and
Session.stream call them); the same number of unconstrained picks (argmax of fresh logits) is timed
apart.
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

from mlx_gemma3n.decoding.grammar import Grammars
from mlx_gemma3n.decoding.tools import ToolChoice, read_tools, tool_grammar

from .batched_step import ours_rows
from .checkpoints import CACHE, ensure_checkpoint

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


MIXED_BATCH = {"tools (16)": 3, "json_schema": 3, "free": 2}  # rows of each kind in one step of 8


def tools(count: int) -> list[dict]:
    """`count` distinct functions of the shape real ones have (enums, bounds, nesting, a $ref)."""
    return [{"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Does task number {i} for the user",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 64},
            "mode": {"enum": ["fast", "exact", f"custom_{i}"]},
            "limit": {"type": "integer", "minimum": 1, "maximum": 100 + i},
            "where": {"$ref": "#/$defs/place"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        }, "required": ["query", "mode"], "$defs": {"place": {"type": "object", "properties": {
            "city": {"type": "string"}, "country": {"type": "string"}}, "required": ["city"]}}},
    }} for i in range(count)]


def build_times(grammars: Grammars, count: int, runs: int) -> tuple[float, float]:
    """Best ms of (reading the tools and building their grammar, making its first matcher)."""
    build, matcher = [], []
    for _ in range(runs):
        start = time.perf_counter()
        grammar = tool_grammar(grammars, read_tools(tools(count)), ToolChoice("required"))
        built = time.perf_counter()
        grammars.matcher(grammar)
        build.append(1000 * (built - start))
        matcher.append(1000 * (time.perf_counter() - built))
    return min(build), min(matcher)


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
        token = mx.argmax(mx.where(mx.array(allowed), logits, float("-inf")), axis=-1).item()  # restrict(), its mask given
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
    parser.add_argument("--step-shape", default="small", help="the model whose decode step the costs are compared to ('none': skip)")
    args = parser.parse_args()
    tokenizer = bpe_tokenizer()
    vocab = tokenizer.get_vocab_size()
    started = time.perf_counter()
    grammars = Grammars(SimpleNamespace(tokenizer=tokenizer), vocab, {EOS})
    print(f"llguidance tokenizer view of {vocab} tokens built in {time.perf_counter() - started:.2f} s")
    cases = {
        "json_object": grammars.json_object(), "json_schema": grammars.json_schema(SCHEMA, "response_format"),
        "tools (1)": tool_grammar(grammars, read_tools(tools(1)), ToolChoice("required")),
        "tools (16)": tool_grammar(grammars, read_tools(tools(16)), ToolChoice("required")),
    }
    extra = {"free": 0.0}
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
        extra[name] = statistics.mean(constrained) - mean["plain pick"]
    step = sum(extra[kind] * rows for kind, rows in MIXED_BATCH.items())
    print(f"mixed batch of {sum(MIXED_BATCH.values())} rows ({', '.join(f'{n} {k}' for k, n in MIXED_BATCH.items())}): "
          f"{step:.3f} ms added per engine step (the rows' masks run one after another)")
    if args.step_shape != "none":
        steps = {rows: whole for rows, (whole, _, _) in ours_rows(ensure_checkpoint(args.step_shape), [1, 8], 60, 4, True).items()}
        print(f"{args.step_shape} decode step: {steps[1]:.1f} ms at 1 row, {steps[8]:.1f} ms at 8 rows")
        for name in cases:
            print(f"  {name:<12} extra per token: {100 * extra[name] / steps[1]:.2f}% of a 1-row step")
        print(f"  mixed batch: {100 * step / steps[8]:.2f}% of an 8-row step")
    print("tool grammar build (read_tools + tool_grammar) and first matcher, best of 3, ms:")
    for count in (1, 16, 128):
        build, matcher = build_times(grammars, count, 3)
        print(f"  {count:>3} tools: build {build:8.1f}   matcher {matcher:8.1f}")
    print(json.dumps({"vocab": vocab, "tokens_per_walk": args.tokens, "runs": args.runs}))


if __name__ == "__main__":
    main()
