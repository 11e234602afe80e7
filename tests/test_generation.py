"""The generation API and CLI: greedy parity with Transformers' `generate`, stop tokens, the chat
template and tokenizer against Transformers', streaming text, the cache plan, prompt caches, chat."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import prompt_ids
from reference import EOS_IDS, reference_greedy

from mlx_gemma3n import load
from mlx_gemma3n.architecture.cache import SlidingKVCache, kv_cache_bytes
from mlx_gemma3n.decoding.sampling import SamplingParams
from mlx_gemma3n.generate import ChatSession, Session, StreamingDetokenizer, generate, prepare_prompt, stream_generate

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a cat?"}],
    [
        {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
        {"role": "assistant", "content": "hello."},
        {"role": "user", "content": "  and you?  "},
    ],
]


@pytest.fixture(scope="module")
def loaded(tiny_ckpt_a):
    return load(tiny_ckpt_a.path)


def test_greedy_generate_equals_transformers_and_stops_on_eos(loaded, tiny_ckpt_a):
    """Token for token with Transformers' greedy `generate`, ending on the same stop token."""
    model, processor = loaded
    for seed in range(6):
        ids = prompt_ids(10 + seed, 30)
        expected = reference_greedy(tiny_ckpt_a.model, ids, 80)
        responses = list(stream_generate(model, processor, list(map(int, ids[0])), max_tokens=80, temperature=0.0))
        assert [r.token for r in responses] == expected
        if expected[-1] in EOS_IDS:
            assert responses[-1].finish_reason == "stop" and len(expected) < 80
            return
        assert responses[-1].finish_reason == "length"
    pytest.fail("no reference generation reached a stop token: the stop path went untested")


def test_response_fields(loaded):
    model, processor = loaded
    responses = list(stream_generate(model, processor, "hello", max_tokens=5, temperature=0.0))
    last = responses[-1]
    assert last.prompt_tokens == len(prepare_prompt(processor, "hello").ids)
    assert last.generation_tokens == len(responses) and last.finish_reason in ("stop", "length")
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    assert all(r.finish_reason is None for r in responses[:-1])


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_and_tokens_equal_transformers(loaded, tiny_tokenizer, messages):
    _, processor = loaded
    expected_text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert processor.apply_chat_template(messages) == expected_text
    expected_ids = tiny_tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    assert prepare_prompt(processor, messages).ids == expected_ids


def test_plain_text_encoding_equals_transformers(loaded, tiny_tokenizer):
    _, processor = loaded
    for text in ["the cat sat.", "héllo 日本 🙂", "  two  spaces\n\nnew lines"]:
        assert processor.encode(text) == tiny_tokenizer(text)["input_ids"]


def test_streaming_never_splits_a_character(loaded):
    _, processor = loaded
    text = "héllo 日本 🙂 ünïcödé " * 3
    ids = processor.encode(text, add_bos=False)
    assert max(len(processor.decode([i])) for i in ids) >= 1
    pieces = []
    detokenizer = StreamingDetokenizer(processor, max_segment=5)
    for token in ids:
        piece = detokenizer.add(token)
        assert "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == text


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(loaded):
    model, processor = loaded
    first = generate(model, processor, "hello", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    second = generate(model, processor, "hello", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert first == second
    assert generate(model, processor, "hello", max_tokens=12, temperature=5.0, top_k=1, seed=3) == generate(
        model, processor, "hello", max_tokens=12, temperature=0.0
    )


def test_generation_defaults_come_from_generation_config(loaded):
    from mlx_gemma3n.generate import sampling_params

    _, processor = loaded
    params = sampling_params(processor)
    assert (params.top_k, params.top_p, params.temperature) == (64, 0.95, 1.0)
    assert sampling_params(processor, temperature=0.0).temperature == 0.0


def test_kv_cache_plan_and_bytes(loaded):
    """Only KV-owning layers get a cache; sliding ones hold exactly `sliding_window` positions."""
    model, processor = loaded
    text = model.config.text
    session = Session(model, processor)
    assert len(session.cache) == text.first_kv_shared_layer == 5
    params = SamplingParams(temperature=0.0)
    processor_eos, processor.eos_token_ids = processor.eos_token_ids, set()
    try:
        list(session.stream(list(map(int, prompt_ids(20, 30)[0])), params, 20, prefill_step_size=7))
    finally:
        processor.eos_token_ids = processor_eos
    held = len(session.history)
    for layer_cache in session.cache:
        if isinstance(layer_cache, SlidingKVCache):
            assert layer_cache.keys.shape[2] == text.sliding_window
    assert sum(c.nbytes for c in session.cache) == kv_cache_bytes(text, held, bytes_per_element=4)
    # E2B at 32k tokens in bf16: 4 full layers grow, 16 sliding layers stay at 512 positions.
    e2b = load_e2b_text_config()
    per_position = 2 * 2 * 256 * 2
    assert kv_cache_bytes(e2b, 32768) == per_position * (4 * 32768 + 16 * 512)


def load_e2b_text_config():
    from pathlib import Path

    from mlx_gemma3n.architecture.config import load_config

    return load_config(Path(__file__).parent / "data" / "gemma-3n-E2B-it").text


def cli(*args, stdin: str | None = None, timeout: int = 600):
    return subprocess.run(
        [sys.executable, "-m", "mlx_gemma3n.generate", *args],
        input=stdin, capture_output=True, text=True, timeout=timeout,
    )


def test_cli_streams_and_reports(tiny_ckpt_a, loaded):
    model, processor = loaded
    result = cli("--model", str(tiny_ckpt_a.path), "--prompt", "hello", "--max-tokens", "8", "--temp", "0", "--verbose")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == generate(model, processor, "hello", max_tokens=8, temperature=0.0)
    for line in ("Prompt:", "Generation:", "Peak memory:", "KV cache:"):
        assert line in result.stderr


def test_cli_prompt_from_stdin_and_system(tiny_ckpt_a, loaded):
    model, processor = loaded
    result = cli("--model", str(tiny_ckpt_a.path), "--prompt", "-", "--system", "be brief", "-m", "6", "--temp", "0", stdin="hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == generate(model, processor, "hello", system="be brief", max_tokens=6, temperature=0.0)


def test_prompt_cache_round_trip(tiny_ckpt_a, tmp_path):
    """A saved prompt cache gives the same continuation as a fresh prefill, and refuses other models."""
    path = tmp_path / "prompt.safetensors"
    args = ["--model", str(tiny_ckpt_a.path), "--prompt", "the cat sat on the mat. " * 6, "-m", "24", "--temp", "0"]
    fresh = cli(*args)
    first = cli(*args, "--prompt-cache-file", str(path))
    assert path.exists()
    reused = cli(*args, "--prompt-cache-file", str(path))
    assert fresh.returncode == first.returncode == reused.returncode == 0, reused.stderr
    assert fresh.stdout == first.stdout == reused.stdout
    assert "Prompt: 1 tokens" in reused.stderr  # only the last prompt token was fed


def test_prompt_cache_of_another_model_is_refused(tiny_ckpt_a, tiny_ckpt_b, tmp_path):
    path = tmp_path / "prompt.safetensors"
    assert cli("--model", str(tiny_ckpt_a.path), "-p", "hi", "-m", "2", "--prompt-cache-file", str(path)).returncode == 0
    result = cli("--model", str(tiny_ckpt_b.path), "-p", "hi", "-m", "2", "--prompt-cache-file", str(path))
    assert result.returncode == 1 and "made with another model" in result.stderr


def test_chat_keeps_the_cache_across_turns(tiny_ckpt_a, loaded):
    """Driven through stdin. Turn 2 feeds only its new tokens, and its reply equals a fresh prefill
    of the same token sequence (the cache carried over is the cache a fresh run would build)."""
    model, processor = loaded
    result = cli("--model", str(tiny_ckpt_a.path), "--chat", "-m", "10", "--temp", "0", stdin="hello\nand then?\n")
    assert result.returncode == 0, result.stderr
    greedy = SamplingParams(temperature=0.0)
    chat = ChatSession(model, processor)
    first = "".join(r.text for r in chat.ask("hello", greedy, 10))
    held = list(chat.session.history)
    second = "".join(r.text for r in chat.ask("and then?", greedy, 10))
    assert result.stdout.split("\n")[:2] == [first, second]
    new_tokens = chat.last_prompt_tokens
    assert 0 < len(new_tokens) < len(held)
    assert "<end_of_turn>\n<start_of_turn>user\nand then?<end_of_turn>" in processor.decode(new_tokens)
    fresh = "".join(r.text for r in Session(model, processor).stream(held + new_tokens, greedy, 10))
    assert fresh == second
    prompts = [int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("Prompt:")]
    assert prompts[1] == len(new_tokens)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/folder", "-p", "hi"], "does not exist"),
        (["--model", "{empty}", "-p", "hi"], "no config.json"),
        (["--model", "google/not-a-real-model-xyz", "-p", "hi"], "cannot download"),
        (["--model", "{model}", "-p", "   "], "prompt is empty"),
        (["--model", "{model}", "-p", "cat " * 2100], "over the model's context of 2048"),
        (["--model", "{model}", "-p", "hi", "--max-tokens", "0"], "--max-tokens must be > 0"),
        (["--model", "{model}", "-p", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--model", "{model}", "-p", "hi", "--temp", "-1"], "temperature must be >= 0"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tiny_ckpt_a, tmp_path, args, message):
    args = [a.format(model=tiny_ckpt_a.path, empty=tmp_path) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "mlx_gemma3n.generate", *args],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
