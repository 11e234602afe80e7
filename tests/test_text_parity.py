"""The text decoder against Transformers' Gemma 3n, float32, at every block boundary and in every regime.

Bar: max |ours - ref| <= 1e-4 * max |ref| everywhere. Prompts are several times longer than the
sliding window (8 for config A, 16 for config B) and draw ids from the whole vocabulary, so ids past
the PLE table and multimodal hard-token ids are exercised.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import prompt_ids, relative_error, streams_as_reference
from reference import reference_greedy, reference_intermediates, reference_logits

from mlx_gemma3n import load
from mlx_gemma3n.decoding.sampling import SamplingParams
from mlx_gemma3n.generate import Session

TOLERANCE = 1e-4
PROMPT_LENGTH = 40


@pytest.fixture(scope="module", params=["tiny_ckpt_a", "tiny_ckpt_b", "tiny_ckpt_text_only"])
def pair(request):
    """(our model, reference torch model) for each tiny checkpoint."""
    checkpoint = request.getfixturevalue(request.param)
    model, _ = load(checkpoint.path)
    return model, checkpoint.model


def test_every_block_boundary_without_cache(pair):
    model, reference = pair
    ids = prompt_ids(0, PROMPT_LENGTH, batch=2)
    ref = reference_intermediates(reference, ids)
    ours = {}
    logits = model(mx.array(ids), capture=ours)
    ours["logits"] = logits
    checked = ["embeddings", "per_layer_embeddings", "per_layer_inputs", "final_norm", "logits"]
    for name in checked:
        assert relative_error(ours[name], ref[name]) <= TOLERANCE, name
    streams = ["altup_streams"] + [f"layer.{i}" for i in range(model.config.text.num_hidden_layers)]
    for name in streams:
        assert relative_error(streams_as_reference(ours[name]), ref[name]) <= TOLERANCE, name


@pytest.mark.parametrize("chunk", [5, 13])
def test_chunked_prefill(pair, chunk):
    model, reference = pair
    ids = prompt_ids(1, PROMPT_LENGTH)
    ref = reference_logits(reference, ids)
    cache = model.make_cache()
    ours = [model(mx.array(ids[:, s : s + chunk]), cache=cache) for s in range(0, PROMPT_LENGTH, chunk)]
    assert relative_error(mx.concatenate(ours, axis=1), ref) <= TOLERANCE


def test_token_by_token_decode_past_the_window(pair):
    """Prefill 12 tokens, then decode one at a time: the sliding caches wrap several times."""
    model, reference = pair
    ids = prompt_ids(2, PROMPT_LENGTH)
    ref = reference_logits(reference, ids)
    cache = model.make_cache()
    ours = [model(mx.array(ids[:, :12]), cache=cache)]
    ours += [model(mx.array(ids[:, t : t + 1]), cache=cache) for t in range(12, PROMPT_LENGTH)]
    assert relative_error(mx.concatenate(ours, axis=1), ref) <= TOLERANCE


def test_prefill_shortcut_gives_the_full_computation(pair):
    """KV-shared layers run on the last position only: its logits are unchanged."""
    model, reference = pair
    ids = prompt_ids(3, PROMPT_LENGTH)
    ref = reference_logits(reference, ids)[:, -1:]
    assert relative_error(model(mx.array(ids), cache=model.make_cache(), last_token_only=True), ref) <= TOLERANCE
    assert relative_error(model(mx.array(ids), last_token_only=True), ref) <= TOLERANCE


def greedy(model, processor, ids, max_tokens, **kwargs) -> list[int]:
    session = Session(model, processor)
    params = SamplingParams(temperature=0.0)
    return [r.token for r in session.stream(list(map(int, ids[0])), params, max_tokens, **kwargs)]


@pytest.mark.parametrize("checkpoint", ["tiny_ckpt_a", "tiny_ckpt_b"])
def test_greedy_generation_equals_transformers(request, checkpoint):
    """64 greedy tokens after a prompt 3-4x the sliding window; decode runs far past the window."""
    path, reference = request.getfixturevalue(checkpoint)
    model, processor = load(path)
    ids = prompt_ids(4, 50)
    expected = reference_greedy(reference, ids, 64, stop_at_eos=False)
    processor.eos_token_ids = set()
    model.config.eos_token_ids = []
    assert greedy(model, processor, ids, 64, prefill_step_size=16) == expected
    assert len(set(expected)) > 8, "degenerate reference generation: the test would prove little"


def test_google_checkpoint_with_unused_shared_kv_weights(tiny_ckpt_shared_kv, tiny_ckpt_a):
    """Google's files carry k/v weights on KV-shared layers; they load and change nothing."""
    with_kv, _ = load(tiny_ckpt_shared_kv.path)
    without, _ = load(tiny_ckpt_a.path)
    ids = mx.array(prompt_ids(5, 24))
    assert np.array_equal(np.array(with_kv(ids)), np.array(without(ids)))


def test_bfloat16_runs_and_agrees_like_transformers_bf16(tiny_ckpt_a, capsys):
    """bf16 end to end: finite logits, argmax agreement with float32 in the league of Transformers'
    own bf16 (random tiny models are far more precision-sensitive than trained ones); the greedy
    agreement is reported."""
    path, reference = tiny_ckpt_a
    model32, processor = load(path)
    model16, _ = load(path, dtype="bfloat16")
    assert model16.language_model.layers[0].mlp.gate_proj.weight.dtype == mx.bfloat16
    ids = prompt_ids(6, PROMPT_LENGTH, batch=2)
    capture = {}
    logits = model16(mx.array(ids), capture=capture)
    assert capture["final_norm"].dtype == mx.bfloat16 and bool(mx.all(mx.isfinite(logits)))
    ref32 = reference_logits(reference, ids).argmax(-1)
    ref16 = reference_logits(copy.deepcopy(reference).to(torch.bfloat16), ids).argmax(-1)
    ours16 = np.array(logits.astype(mx.float32)).argmax(-1)
    theirs_agree, ours_agree = (ref16 == ref32).mean(), (ours16 == ref32).mean()

    processor.eos_token_ids = set()
    model32.config.eos_token_ids = model16.config.eos_token_ids = []
    tokens32, tokens16 = greedy(model32, processor, ids[:1], 64), greedy(model16, processor, ids[:1], 64)
    same = next((i for i, (a, b) in enumerate(zip(tokens32, tokens16)) if a != b), 64)
    with capsys.disabled():
        print(
            f"\n[bf16] argmax agreement with float32: ours {ours_agree:.2f}, Transformers bf16 {theirs_agree:.2f}; "
            f"first {same}/64 greedy tokens equal float32 (tiny config A)"
        )
    assert ours_agree >= theirs_agree - 0.15


def test_cpu_float32_tied_embedding_changes_no_decoder_number(tiny_ckpt_a):
    """On MLX's CPU backend a bf16 tied embedding is held in float32 for a faster LM head
    (`loader.adapt_to_cpu`): the decoder computes exactly what it computes with the bf16 table, and
    the logits are the float32 product of the same values."""
    if mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("the float32 table is a CPU-backend layout")
    widened, _ = load(tiny_ckpt_a.path, dtype="bfloat16")
    table = widened.language_model.embed_tokens.weight
    assert table.dtype == mx.float32 and mx.array_equal(table, table.astype(mx.bfloat16).astype(mx.float32))
    plain, _ = load(tiny_ckpt_a.path, dtype="bfloat16")
    plain.language_model.embed_tokens.weight = table.astype(mx.bfloat16)
    plain.activation_dtype = None
    ids = mx.array(prompt_ids(7, PROMPT_LENGTH))
    widened_capture, plain_capture = {}, {}
    logits = widened(ids, capture=widened_capture)
    plain(ids, capture=plain_capture)
    hidden = widened_capture["final_norm"]
    assert hidden.dtype == mx.bfloat16 and mx.array_equal(hidden, plain_capture["final_norm"])
    cap = widened.config.text.final_logit_softcapping
    expected = mx.tanh((hidden.astype(mx.float32) @ table.T) / cap) * cap
    np.testing.assert_allclose(np.array(logits), np.array(expected), rtol=1e-5, atol=1e-5)
