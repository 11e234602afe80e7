"""Sanity tests of the torch / transformers reference fixtures themselves.

Run: ``python -m pytest tests/test_fixtures.py -q``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import reference as R

CKPTS = ["tiny_ckpt_a", "tiny_ckpt_b", "tiny_ckpt_shared_kv"]
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]


@pytest.fixture(params=CKPTS)
def ckpt(request):
    return request.getfixturevalue(request.param)


def _load_file(path):
    out = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def _prompt(n=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, R.BOI_ID, size=n)  # plain text-range ids
    ids[0] = R.BOS_ID
    return ids


# --------------------------------------------------------------------------- files


def test_folder_contents(ckpt):
    path, model = ckpt
    for name in ["config.json", "model.safetensors", "generation_config.json", *TOKENIZER_FILES]:
        assert (path / name).is_file(), name
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "gemma3n"
    assert cfg["architectures"] == ["Gemma3nForConditionalGeneration"]
    tc = cfg["text_config"]
    assert tc["model_type"] == "gemma3n_text"
    rope = model.config.get_text_config().rope_parameters
    thetas = (rope["full_attention"]["rope_theta"], rope["sliding_attention"]["rope_theta"])
    assert thetas[0] != thetas[1]
    if path.name.startswith("tiny_shared_kv"):  # Google-style rope spelling
        assert "rope_parameters" not in tc and tc["rope_scaling"] is None
        assert (tc["rope_theta"], tc["rope_local_base_freq"]) == thetas == (1e6, 1e4)
    else:
        rp = tc["rope_parameters"]
        assert (rp["full_attention"]["rope_theta"], rp["sliding_attention"]["rope_theta"]) == thetas
    assert tc["vocab_size"] == 512 and tc["vocab_size_per_layer_input"] == 384
    assert cfg["vision_config"]["vocab_offset"] == 384 and cfg["vision_config"]["vocab_size"] == 64
    assert cfg["audio_config"]["vocab_offset"] == 448 and cfg["audio_config"]["vocab_size"] == 64
    for key, tok in [
        ("boi_token_id", "<start_of_image>"),
        ("eoi_token_id", "<end_of_image>"),
        ("image_token_id", "<image_soft_token>"),
        ("boa_token_id", "<start_of_audio>"),
        ("eoa_token_id", "<end_of_audio>"),
        ("audio_token_id", "<audio_soft_token>"),
    ]:
        assert cfg[key] == R.SPECIAL_TOKENS[tok], key
    assert cfg["eos_token_id"] == [1, 106]
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106] and gen["bos_token_id"] == 2 and gen["pad_token_id"] == 0
    assert gen["top_k"] == 64 and gen["top_p"] == 0.95
    assert (path / "chat_template.jinja").read_text() == R.CHAT_TEMPLATE_PATH.read_text()
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"}


def test_text_configs_valid():
    from transformers import Gemma3nTextConfig

    for text in (R.TINY_TEXT_A, R.TINY_TEXT_B):
        cfg = Gemma3nTextConfig(**text)
        modes = cfg.kv_sharing_modes
        shared = [i for i, m in enumerate(modes) if m == "reuse"]
        assert shared == R.shared_kv_layers(cfg)
        # KV-shared layers of BOTH attention types exist
        assert {cfg.layer_types[i] for i in shared} == {"sliding_attention", "full_attention"}
        assert cfg.sliding_window < 40
        assert cfg.rope_parameters["full_attention"]["rope_theta"] != cfg.rope_parameters["sliding_attention"]["rope_theta"]
    a = Gemma3nTextConfig(**R.TINY_TEXT_A)
    assert len(set(a.intermediate_size)) > 1
    assert a.activation_sparsity_pattern[:3] == [0.95] * 3 and not any(a.activation_sparsity_pattern[3:])
    assert a.layer_types == (["sliding_attention"] * 4 + ["full_attention"]) * 2


def test_safetensors_matches_model(ckpt, request):
    path, model = ckpt
    sd = _load_file(path)
    msd = model.state_dict()
    expected = {k for k in msd if k != "lm_head.weight"}  # tied to embed_tokens, not saved
    extra = set(sd) - expected
    if request.node.callspec.params["ckpt"] == "tiny_ckpt_shared_kv":
        assert extra and all(".self_attn.k_proj." in k or ".self_attn.v_proj." in k or ".self_attn.k_norm." in k for k in extra)
    else:
        assert not extra, sorted(extra)[:5]
    assert expected <= set(sd)
    for k in expected:
        assert torch.equal(sd[k], msd[k]), k
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_every_parameter_randomised(ckpt):
    path, model = ckpt
    sd = _load_file(path)
    for k, v in sd.items():
        v = v.float()
        if v.numel() > 1:
            assert float(v.std()) > 1e-3, f"{k} is constant"
        assert not torch.all(v == 0), f"{k} all zeros"
        assert not torch.all(v == 1), f"{k} all ones"
    norm_like = [k for k in sd if "norm" in k or k.endswith("correct_output_scale")]
    assert len(norm_like) > 100
    for k in norm_like:
        v = sd[k].float()
        assert 0.5 < float(v.mean()) < 1.5 and float(v.std()) > 0.03, k
    # timm layer-scale gammas (init 1e-5) and audio per_dim_scale (init 0) are randomised too
    gammas = [sd[k] for k in sd if k.endswith("layer_scale.gamma")]
    assert gammas and min(float(g.abs().mean()) for g in gammas) > 0.01
    pds = [sd[k] for k in sd if k.endswith("per_dim_scale")]
    assert pds and all(float(p.abs().max()) > 0.01 for p in pds)
    # every named parameter has made it into the file
    names = {n for n, _ in model.named_parameters()}
    assert names <= set(sd)
    for k, v in sd.items():
        if "altup.prediction_coefs" in k or "altup.correction_coefs" in k:
            assert float(v.abs().max()) < 120.0


def test_reload_matches_built_model(ckpt):
    path, model = ckpt
    reloaded = R.load_reference_model(path)
    ids = _prompt(24, seed=3)
    np.testing.assert_array_equal(R.reference_logits(reloaded, ids), R.reference_logits(model, ids))


# --------------------------------------------------------------------------- shared KV


def test_shared_kv_checkpoint_has_shared_layer_kv(tiny_ckpt_shared_kv, tiny_ckpt_a):
    cfg = tiny_ckpt_shared_kv.model.config.get_text_config()
    shared = R.shared_kv_layers(cfg)
    assert shared == [5, 6, 7, 8, 9]
    with safe_open(str(tiny_ckpt_shared_kv.path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for i in range(cfg.num_hidden_layers):
            base = f"model.language_model.layers.{i}.self_attn."
            assert base + "k_proj.weight" in keys, i
            assert base + "v_proj.weight" in keys, i
            assert base + "k_norm.weight" in keys, i
            assert base + "v_norm.weight" not in keys  # v_norm has no scale
            assert tuple(f.get_slice(base + "k_proj.weight").get_shape()) == (
                cfg.num_key_value_heads * cfg.head_dim,
                cfg.hidden_size,
            )
    with safe_open(str(tiny_ckpt_a.path / "model.safetensors"), framework="pt") as f:
        keys_a = set(f.keys())
    for i in shared:
        assert f"model.language_model.layers.{i}.self_attn.k_proj.weight" not in keys_a
    # transformers ignores the extra tensors: same outputs as the checkpoint without them
    ids = _prompt(20, seed=5)
    reloaded = R.load_reference_model(tiny_ckpt_shared_kv.path)
    np.testing.assert_array_equal(R.reference_logits(reloaded, ids), R.reference_logits(tiny_ckpt_a.model, ids))


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_loads_and_roundtrips(ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt.path))
    assert type(tok).__name__ in ("GemmaTokenizer", "GemmaTokenizerFast")
    assert len(tok) <= 512
    # transformers 5 drops add_bos_token when tokenizer.json exists; BOS comes from
    # tokenizer.json's post-processor (as with the real Gemma 3n tokenizer)
    assert json.loads((ckpt.path / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert tok("hi").input_ids[0] == R.BOS_ID and tok("hi", add_special_tokens=False).input_ids[0] != R.BOS_ID
    for name, i in R.SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(name) == i, name
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.image_token_id == R.IMAGE_TOKEN_ID and tok.audio_token_id == R.AUDIO_TOKEN_ID
    assert tok.boi_token == "<start_of_image>" and tok.eoa_token == "<end_of_audio>"
    for s in ["héllo 日本 🙂", "Hello there, how are you today?", "  two  spaces\n\nnew lines\t tab", "x"]:
        ids = tok(s).input_ids
        assert ids[0] == R.BOS_ID
        assert max(ids) < 512
        assert tok.decode(ids, skip_special_tokens=True) == s
    assert len(tok("the model gives the answer").input_ids) < len("the model gives the answer")  # real merges


def test_chat_template(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert ids[:2] == [R.BOS_ID, R.START_OF_TURN_ID]
    assert ids.count(R.START_OF_TURN_ID) == 2 and ids.count(R.END_OF_TURN_ID) == 1
    assert ids.count(R.BOS_ID) == 1
    mm = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "what?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    mm_ids = tiny_tokenizer(mm, add_special_tokens=False).input_ids
    assert R.IMAGE_TOKEN_ID in mm_ids and R.AUDIO_TOKEN_ID in mm_ids


def test_tokenizer_json_standalone_matches(tiny_ckpt_a, tiny_tokenizer):
    """tokenizer.json alone (tokenizers library) encodes like the transformers class."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tiny_ckpt_a.path / "tokenizer.json"))
    assert raw.get_vocab_size(with_added_tokens=True) == 512
    for s in [
        "héllo 日本 🙂",
        "<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n",
        "<start_of_image><image_soft_token><end_of_image> and <audio_soft_token>",
        "  leading spaces and trailing  ",
    ]:
        assert raw.encode(s).ids == tiny_tokenizer(s).input_ids, s
        assert raw.decode(raw.encode(s).ids, skip_special_tokens=False).replace("<bos>", "", 1) == s


# --------------------------------------------------------------------------- subprocess / env


def test_subprocess_sitecustomize(tiny_ckpt_a):
    """Subprocesses inherit PYTHONPATH with tests/sitecustomize: transformers'
    Gemma 3n / tokenizer classes, timm and torchvision import fine."""
    env = dict(os.environ)
    assert str(R.SITECUSTOMIZE_DIR) in env["PYTHONPATH"].split(os.pathsep)
    code = (
        "import sys; from transformers import Gemma3nConfig, AutoTokenizer, AutoConfig; import timm, torchvision; "
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); c = AutoConfig.from_pretrained(sys.argv[1]); "
        "print(t('hi').input_ids, c.image_token_id)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tiny_ckpt_a.path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == f"[2, 18, 19] {R.IMAGE_TOKEN_ID}"
    # the start-up hook does not import torch in processes that never need it
    r = subprocess.run(
        [sys.executable, "-c", "import sys; assert 'torch' not in sys.modules, 'torch imported'"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]


# --------------------------------------------------------------------------- reference helpers


@pytest.mark.parametrize("name", ["tiny_ckpt_a", "tiny_ckpt_b"])
def test_greedy_not_degenerate_and_cache_consistent(name, request):
    path, model = request.getfixturevalue(name)
    ids = _prompt(40, seed=0)
    new = R.reference_greedy(model, ids, 64, stop_at_eos=False)
    assert len(new) == 64
    assert len(set(new)) >= 8, new
    # HF's cached greedy path (sliding window << prompt) == argmax of full no-cache forwards
    seq = list(ids)
    for t in new:
        logits = R.reference_logits(model, seq)[0, -1]
        assert int(np.argmax(logits)) == t
        seq.append(t)
    # logits are O(1), not saturated by the 30.0 soft-cap
    lg = R.reference_logits(model, ids)
    assert 0.3 < float(lg.std()) < 5.0 and float(np.abs(lg).max()) < 20.0


def test_intermediates(tiny_ckpt_a):
    model = tiny_ckpt_a.model
    cfg = model.config.get_text_config()
    ids = _prompt(30, seed=1)
    ids[5], ids[6], ids[7] = 400, 460, R.BOI_ID  # vision / audio hard tokens, boi
    inter = R.reference_intermediates(model, ids, detail=True)
    L, H, P = cfg.num_hidden_layers, cfg.hidden_size, cfg.hidden_size_per_layer_input
    for i in range(L):
        for part in ("attn", "laurel", "mlp"):
            assert inter[f"layer.{i}.{part}"].shape == (1, 30, H)
    # activation sparsity 0.95 really zeroes ~95% of the gate pre-activations on layers 0-2
    gate_in = {}
    hooks = [
        layer.mlp.act_fn.register_forward_hook(lambda m, a, o, i=i: gate_in.__setitem__(i, a[0].clone()))
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        R.reference_logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    zero_frac = [float((gate_in[i] == 0).float().mean()) for i in range(L)]
    assert all(0.85 < z < 0.999 for z in zero_frac[:3]), zero_frac
    assert all(z < 0.05 for z in zero_frac[3:]), zero_frac
    assert inter["embeddings"].shape == (1, 30, H)
    assert inter["per_layer_embeddings"].shape == (1, 30, L, P)
    assert inter["per_layer_inputs"].shape == (1, 30, L, P)
    assert inter["altup_streams"].shape == (4, 1, 30, H)
    for i in range(L):
        assert inter[f"layer.{i}"].shape == (4, 1, 30, H)
        assert np.isfinite(inter[f"layer.{i}"]).all()
    assert inter["final_norm"].shape == (1, 30, H)
    np.testing.assert_array_equal(inter["logits"], R.reference_logits(model, ids))
    np.testing.assert_array_equal(inter["embeddings"], inter["altup_streams"][0])
    # ids >= vocab_size_per_layer_input use PLE row 0 (same as <pad>)
    ple0 = R.reference_intermediates(model, [0])["per_layer_embeddings"][0, 0]
    np.testing.assert_array_equal(inter["per_layer_embeddings"][0, 5], ple0)
    np.testing.assert_array_equal(inter["per_layer_embeddings"][0, 6], ple0)
    assert not np.array_equal(inter["per_layer_embeddings"][0, 7], ple0)
    # multimodal hard tokens are embedded by the multimodal embedders (not scaled text rows)
    te = model.model.language_model.embed_tokens.weight.detach().numpy() * np.sqrt(H)
    np.testing.assert_allclose(inter["embeddings"][0, 7], te[R.BOI_ID], rtol=1e-6, atol=1e-6)
    assert not np.allclose(inter["embeddings"][0, 5], te[400], atol=1e-3)
    # streams have sane magnitudes
    assert float(np.sqrt((inter[f"layer.{L - 1}"] ** 2).mean())) < 50


def test_intermediates_multimodal_inputs(tiny_ckpt_a):
    model = tiny_ckpt_a.model
    n_img = model.config.vision_soft_tokens_per_image
    n_aud = model.config.audio_soft_tokens_per_image
    ids = (
        [R.BOS_ID, R.START_OF_TURN_ID, 31, R.BOI_ID]
        + [R.IMAGE_TOKEN_ID] * n_img
        + [R.EOI_ID, R.BOA_ID]
        + [R.AUDIO_TOKEN_ID] * n_aud
        + [R.EOA_ID, R.END_OF_TURN_ID]
    )
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.rand(1, 3, 256, 256, generator=g)  # 256px -> 16x16 MSFA grid
    feats = torch.randn(1, 160, 128, generator=g)
    mask = torch.ones(1, 160, dtype=torch.bool)
    inter = R.reference_intermediates(
        model, ids, pixel_values=pixel_values, input_features=feats, input_features_mask=mask
    )
    assert inter["vision_tower"].shape == (1, 2048, 16, 16)
    assert inter["image_embeds"].shape == (1, n_img, 64)
    assert inter["audio_tower"].shape == (1, 10, 32)  # 160 frames / 4 (sscp) / 4 (reduction)
    assert inter["audio_embeds"].shape == (1, 10, 64)
    for k in ["vision_tower", "image_embeds", "audio_tower", "embeddings", "logits"]:
        assert np.isfinite(inter[k]).all(), k
    assert 0.3 < float(np.sqrt((inter["vision_tower"] ** 2).mean())) < 3.0
    img_pos = np.array(ids) == R.IMAGE_TOKEN_ID
    np.testing.assert_allclose(inter["embeddings"][0, img_pos], inter["image_embeds"][0], atol=1e-6)


def test_bf16_build(tmp_path):
    model = R.build_checkpoint(tmp_path / "bf16", text=R.TINY_TEXT_B, seed=3, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert np.isfinite(R.reference_logits(model, _prompt(12))).all()


def test_text_only_checkpoint(tiny_ckpt_text_only):
    path, model = tiny_ckpt_text_only
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "gemma3n_text"
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "model.layers.0.self_attn.q_proj.weight" in keys
    reloaded = R.load_reference_model(path)
    ids = _prompt(16, seed=7)
    np.testing.assert_array_equal(R.reference_logits(reloaded, ids), R.reference_logits(model, ids))
    inter = R.reference_intermediates(model, ids, detail=True)
    L = model.config.num_hidden_layers
    assert inter[f"layer.{L - 1}"].shape == (4, 1, 16, 64) and inter["layer.0.mlp"].shape == (1, 16, 64)
    assert "vision_tower" not in inter
    np.testing.assert_array_equal(inter["logits"], R.reference_logits(model, ids))
