"""The public API as users of mlx-lm write it, and reply text as Transformers decodes it."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import numpy as np
import pytest

import mlx_gemma3n
from mlx_gemma3n.decoding.sampling import SamplingParams
from mlx_gemma3n.generate import Session, StreamingDetokenizer, prepare_prompt

GENERATE_CLI = [sys.executable, "-W", "error", "-m", "mlx_gemma3n.generate"]


@pytest.fixture(scope="module")
def loaded(tiny_ckpt_a):
    return mlx_gemma3n.load(tiny_ckpt_a.path)


def test_mlx_lm_import_habit(tiny_ckpt_a, loaded):
    code = (
        "import sys\n"
        "from mlx_gemma3n import load, generate, stream_generate\n"
        "model, processor = load(sys.argv[1])\n"
        "text = generate(model, processor, 'hello', max_tokens=6, temperature=0.0)\n"
        "streamed = ''.join(r.text for r in stream_generate(model, processor, 'hello', max_tokens=6, temperature=0.0))\n"
        "assert text == streamed, (text, streamed)\n"
        "print(text, end='')\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code, str(tiny_ckpt_a.path)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    model, processor = loaded
    expected = "".join(r.text for r in Session(model, processor).stream(
        prepare_prompt(processor, "hello"), SamplingParams(temperature=0.0), 6
    ))
    assert result.stdout == expected


def test_cli_module_runs_without_warnings(tiny_ckpt_a):
    """`python -m mlx_gemma3n.generate` next to the re-exported function: no runpy warning (-W error)."""
    result = subprocess.run(
        [*GENERATE_CLI, "--model", str(tiny_ckpt_a.path), "-p", "hi", "-m", "2", "--temp", "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_text_equals_transformers_decode(loaded, tiny_tokenizer, skip_special_tokens):
    """Random id streams (byte-fallback runs, special tokens inside them, invalid UTF-8) stream to
    exactly Transformers' `decode` of the whole."""
    _, processor = loaded
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = [int(i) for i in rng.integers(0, 512, 40)]
        detokenizer = StreamingDetokenizer(processor, max_segment=5, skip_special_tokens=skip_special_tokens)
        streamed = "".join(detokenizer.add(i) for i in ids) + detokenizer.flush()
        assert streamed == tiny_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids


def test_cli_show_special_tokens(tiny_ckpt_a, loaded, tiny_tokenizer):
    model, processor = loaded
    prompt = prepare_prompt(processor, "what is the weather like")
    responses = list(Session(model, processor).stream(prompt, SamplingParams(temperature=0.0), 24))
    tokens = [r.token for r in responses if r.finish_reason != "stop"]
    shown, hidden = (tiny_tokenizer.decode(tokens, skip_special_tokens=skip) for skip in (False, True))
    assert shown != hidden, "the reply holds no special token: the test would not tell"
    base = [*GENERATE_CLI, "--model", str(tiny_ckpt_a.path), "-p", "what is the weather like", "-m", "24", "--temp", "0"]
    for extra, expected in (([], hidden), (["--show-special-tokens"], shown)):
        result = subprocess.run(base + extra, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        assert result.stdout.rstrip("\n") == expected


def test_public_names(loaded):
    from mlx_gemma3n import Model, Processor, __version__

    model, processor = loaded
    assert isinstance(model, Model) and isinstance(processor, Processor)
    assert callable(model.load_adapter) and callable(model.set_adapter)
    assert __version__ == importlib.metadata.version("mlx-gemma3n")
