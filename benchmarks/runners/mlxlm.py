"""mlx-lm: `mlx_lm.load` and `mlx_lm.stream_generate` (its default greedy sampler and prefill step),
with the tokenizer's end-of-sequence ids cleared; float parameters cast to $BENCH_ACTIVATIONS when set."""

from mlx_lm import load as load_model
from mlx_lm import stream_generate

from .measure import run, with_activations


def load(path):
    model, tokenizer = load_model(path)
    tokenizer.eos_token_ids = set()
    return with_activations(model), tokenizer


def stream(handle, ids, max_tokens):
    model, tokenizer = handle
    yield from stream_generate(model, tokenizer, ids, max_tokens=max_tokens)


if __name__ == "__main__":
    run(load, stream)
