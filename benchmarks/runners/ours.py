"""mlx-gemma3n through its public API: `load`, and a generation `Session` (what `stream_generate`
runs) with end-of-sequence ids cleared, greedy."""

from mlx_gemma3n import load as load_model
from mlx_gemma3n.generate import Session, sampling_params

from .measure import run


def load(path):
    return load_model(path)


def stream(handle, ids, max_tokens):
    model, processor = handle
    session = Session(model, processor)
    session.eos_ids = set()
    yield from session.stream(ids, sampling_params(processor, temperature=0.0), max_tokens)


if __name__ == "__main__":
    run(load, stream)
