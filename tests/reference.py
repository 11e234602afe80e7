"""Torch / Hugging Face Transformers reference side of the mlx_gemma3n test-suite.

Everything here runs on CPU in float32 with tiny, fully randomised Gemma 3n
models built locally (no downloads).

Import it from tests as::

    from reference import build_checkpoint, TINY_TEXT_A  # noqa

``tests/conftest.py`` puts the ``tests/`` folder on ``sys.path`` (and the
``tests/sitecustomize`` folder on ``PYTHONPATH`` for subprocesses), so
``from reference import ...`` works in every test module; there is no
``tests/__init__.py``.

Public API
----------
define_torchvision_op_schemas()
    Work-around for the CPU torch + torchvision (--no-deps) install in this
    environment: torchvision's compiled ops do not load, so ``import
    torchvision`` (pulled in by ``timm`` and by ``transformers``' Gemma 3n,
    tokenizer and processor modules) fails with "operator torchvision::nms
    does not exist" unless the ``nms`` / ``qnms`` schemas are defined first.
    Idempotent; must run before anything imports torchvision.
TINY_TEXT_A, TINY_TEXT_B, TINY_TEXT_E4B_LIKE
    Tiny ``Gemma3nTextConfig`` kwargs (plain dicts).
TINY_VISION, TINY_AUDIO
    Tiny ``Gemma3nVisionConfig`` / ``Gemma3nAudioConfig`` kwargs.
SPECIAL_TOKENS, PAD_ID, EOS_ID, BOS_ID, UNK_ID, START_OF_TURN_ID,
END_OF_TURN_ID, BOI_ID, BOA_ID, EOI_ID, IMAGE_TOKEN_ID, EOA_ID, AUDIO_TOKEN_ID, EOS_IDS
    Ids of the tiny tokenizer's special / control tokens (same ids as real
    Gemma for pad/eos/bos/unk/turn markers; multimodal ones moved into the
    512-token vocab: boi 382, boa 383, eoi 384, image 385, eoa 448, audio 449).
build_checkpoint(path, text=TINY_TEXT_A, seed=0, multimodal=True,
                 torch_dtype=torch.float32, keep_shared_kv=False,
                 with_tokenizer=True, config_style="transformers") -> model
load_reference_model(path, torch_dtype=torch.float32) -> model
float64_throughout() -> context manager: a float64 model computes in float64 end to end
build_tokenizer(path) -> transformers tokenizer
make_config(text=TINY_TEXT_A, multimodal=True) -> Gemma3nConfig | Gemma3nTextConfig
randomize_parameters(model, seed=0) -> None
shared_kv_layers(text_config) -> list[int]
reference_logits(model, input_ids, **model_kwargs) -> np.ndarray [B, T, V]
reference_intermediates(model, input_ids, detail=False, **model_kwargs) -> dict[str, np.ndarray]
reference_greedy(model, input_ids, max_new_tokens, stop_at_eos=True, **generate_kwargs) -> list[int]

``input_ids`` may be a list, a numpy array or a tensor, 1-D or [1, T].
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any
from unittest import mock

# ---------------------------------------------------------------------------
# torchvision op-schema work-around (implementation lives in
# tests/sitecustomize/sitecustomize.py so subprocesses can use it too)
# ---------------------------------------------------------------------------

SITECUSTOMIZE_DIR = Path(__file__).resolve().parent / "sitecustomize"


def _load_sitecustomize():
    mod = sys.modules.get("sitecustomize")
    if mod is not None and hasattr(mod, "define_torchvision_op_schemas"):
        return mod
    mod = sys.modules.get("_gemma3n_tests_sitecustomize")
    if mod is None:
        spec = importlib.util.spec_from_file_location(
            "_gemma3n_tests_sitecustomize", SITECUSTOMIZE_DIR / "sitecustomize.py"
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod


_sitecustomize = _load_sitecustomize()
define_torchvision_op_schemas = _sitecustomize.define_torchvision_op_schemas
install_torchvision_schema_hook = _sitecustomize.install

define_torchvision_op_schemas()

import numpy as np  # noqa: E402
import torch  # noqa: E402

# ---------------------------------------------------------------------------
# Tiny configurations
# ---------------------------------------------------------------------------

_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}

_S, _F = "sliding_attention", "full_attention"

# 10 layers, real 4:1 pattern twice; layers 5..9 are KV-shared (both types):
# sliding layers 5-8 reuse layer 3's KV, full layer 9 reuses layer 4's KV.
TINY_TEXT_A: dict[str, Any] = dict(
    vocab_size=512,
    vocab_size_per_layer_input=384,
    hidden_size=64,
    hidden_size_per_layer_input=16,
    intermediate_size=[128, 160, 128, 192, 160, 128, 224, 160, 128, 192],
    num_hidden_layers=10,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    layer_types=[_S, _S, _S, _S, _F] * 2,
    num_kv_shared_layers=5,
    sliding_window=8,
    activation_sparsity_pattern=[0.95, 0.95, 0.95] + [0.0] * 7,
    laurel_rank=8,
    altup_num_inputs=4,
    altup_active_idx=0,
    altup_coef_clip=120.0,
    altup_correct_scale=True,
    max_position_embeddings=2048,
    rope_parameters=_ROPE,
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=[1, 106],
)

# 8 layers with a 3:1 pattern (2 full layers), a single MLP width, MQA with
# head_dim 32, 4 KV-shared layers (types S S S F; producers: layer 2 for
# sliding, layer 3 for full) and a different sparsity value on 2 layers.
TINY_TEXT_B: dict[str, Any] = dict(
    vocab_size=512,
    vocab_size_per_layer_input=384,
    hidden_size=64,
    hidden_size_per_layer_input=8,
    intermediate_size=96,
    num_hidden_layers=8,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    layer_types=[_S, _S, _S, _F] * 2,
    num_kv_shared_layers=4,
    sliding_window=16,
    activation_sparsity_pattern=[0.9, 0.9] + [0.0] * 6,
    laurel_rank=4,
    altup_num_inputs=4,
    altup_active_idx=0,
    altup_coef_clip=120.0,
    altup_correct_scale=True,
    max_position_embeddings=2048,
    rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 500_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 5_000.0},
    },
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=[1, 106],
)

# E4B's structure, small: 15 layers (4:1 pattern), the last 10 KV-shared (donors: layer 3 for
# sliding, 4 for full), every FFN width its own (multiples of 32), PLE blocks of 32 (whole
# quantization groups of 32). For MatFormer slices (tests/test_matformer.py). Deeper, or with more
# 0.95-sparse layers (5% of 128 units), float32 Transformers itself drifts past 1e-4 of float64.
TINY_TEXT_E4B_LIKE: dict[str, Any] = dict(
    TINY_TEXT_A,
    hidden_size_per_layer_input=32,
    intermediate_size=[128, 192, 160, 256, 224, 128, 160, 192, 256, 128, 224, 160, 192, 128, 256],
    num_hidden_layers=15,
    layer_types=[_S, _S, _S, _S, _F] * 3,
    num_kv_shared_layers=10,
    activation_sparsity_pattern=[0.95] * 3 + [0.0] * 12,
)

# Tiny MobileNetV5 encoder: the real timm architecture (same block list) with
# channel_multiplier 0.05; the MSFA head always outputs 2048 channels at
# 16x16 = 256 soft tokens (hidden_size must be 2048).
TINY_VISION: dict[str, Any] = dict(
    architecture="mobilenetv5_300m_enc",
    model_args={"channel_multiplier": 0.05},
    hidden_size=2048,
    vocab_offset=384,
    vocab_size=64,
    rms_norm_eps=1e-6,
    do_pooling=False,
)

TINY_AUDIO: dict[str, Any] = dict(
    hidden_size=32,
    input_feat_size=128,
    vocab_offset=448,
    vocab_size=64,
    conf_num_hidden_layers=1,
    conf_num_attention_heads=2,
    conf_attention_chunk_size=12,
    conf_attention_context_left=13,
    conf_attention_context_right=0,
    conf_attention_logit_cap=50.0,
    conf_conv_kernel_size=5,
    conf_reduction_factor=4,
    conf_residual_weight=0.5,
    sscp_conv_channel_size=[8, 8],
    sscp_conv_kernel_size=[[3, 3], [3, 3]],
    sscp_conv_stride_size=[[2, 2], [2, 2]],
    sscp_conv_group_norm_eps=1e-3,
    rms_norm_eps=1e-6,
)

# ---------------------------------------------------------------------------
# Tiny tokenizer layout (512 ids, same ids as real Gemma where they exist)
# ---------------------------------------------------------------------------

SPECIAL_TOKENS: dict[str, int] = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "[multimodal]": 5,
    "<start_of_turn>": 105,
    "<end_of_turn>": 106,
    "<start_of_image>": 382,  # boi (text range, < vocab_size_per_layer_input)
    "<start_of_audio>": 383,  # boa (text range)
    "<end_of_image>": 384,  # eoi = first vision id (vision vocab_offset)
    "<image_soft_token>": 385,
    "<end_of_audio>": 448,  # eoa = first audio id (audio vocab_offset)
    "<audio_soft_token>": 449,
}

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN_ID, END_OF_TURN_ID = 105, 106
BOI_ID, BOA_ID = 382, 383
EOI_ID, IMAGE_TOKEN_ID = 384, 385
EOA_ID, AUDIO_TOKEN_ID = 448, 449
EOS_IDS = [EOS_ID, END_OF_TURN_ID]

_N_UNUSED = 4  # <unused0>..<unused3> at ids 6..9 (real Gemma: 6..104)
_FIRST_BPE_A, _LAST_BPE_A = 6 + _N_UNUSED, 104  # ids 10..104
# ids 107..113: added whitespace / html tokens like the real 107..237 block
_ADDED_TEXT_TOKENS = ["\n", "\n\n", "\n\n\n", "▁▁", "▁▁▁", "<b>", "</b>"]
_BYTE_BASE = 107 + len(_ADDED_TEXT_TOKENS)  # <0x00> = 114 .. <0xFF> = 369
_FIRST_BPE_B, _LAST_BPE_B = _BYTE_BASE + 256, BOI_ID - 1  # ids 370..381
_VOCAB_SIZE = 512

_BPE_ALPHABET = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [".", ",", "?", "'"]

_BPE_CORPUS = """
You are a helpful assistant. The user asks a question and the model gives the answer.
Hello there, how are you today? I am fine, thank you. What is the weather like in
the city this morning? It is sunny and warm with a light wind from the west. Please
write a short story about a cat that lives in a small house near the river, and
tell me what the cat likes to eat. The quick brown fox jumps over the lazy dog.
Machine learning models turn text into tokens, and tokens into numbers; then the
network predicts the next token one at a time until it reaches the end of the turn.
Can you describe this image? Can you transcribe this audio? The picture shows a
person standing on the street in the rain, holding an umbrella. There is a tree
behind them and a red car parked on the other side of the road.
"""


def _train_bpe(corpus: str, alphabet: list[str], n_tokens: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Deterministic word-level BPE (SentencePiece style, "▁" word prefix).

    Returns (tokens, merges) where tokens = alphabet + one new token per merge.
    """
    alpha = set(alphabet)
    words: dict[tuple[str, ...], int] = {}
    for w in corpus.lower().split():
        sym = tuple(c for c in "▁" + w if c in alpha)
        if len(sym) > 1:
            words[sym] = words.get(sym, 0) + 1
    tokens = list(alphabet)
    merges: list[tuple[str, str]] = []
    while len(tokens) < n_tokens:
        pairs: dict[tuple[str, str], int] = {}
        for sym, cnt in words.items():
            for a, b in zip(sym, sym[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + cnt
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        merges.append(best)
        if merged not in tokens:
            tokens.append(merged)
        new_words: dict[tuple[str, ...], int] = {}
        for sym, cnt in words.items():
            out: list[str] = []
            i = 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + cnt
        words = new_words
    return tokens, merges


def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]], dict[int, dict[str, Any]]]:
    """(vocab token->id, BPE merges, added_tokens_decoder) of the tiny tokenizer."""
    slots = list(range(_FIRST_BPE_A, _LAST_BPE_A + 1)) + list(range(_FIRST_BPE_B, _LAST_BPE_B + 1))
    bpe_tokens, merges = _train_bpe(_BPE_CORPUS, _BPE_ALPHABET, len(slots))
    assert len(bpe_tokens) == len(slots), (len(bpe_tokens), len(slots))

    id_to_tok: dict[int, str] = {}
    added: dict[int, dict[str, Any]] = {}

    def add(i: int, tok: str, special: bool) -> None:
        assert i not in id_to_tok, i
        id_to_tok[i] = tok
        added[i] = dict(content=tok, lstrip=False, normalized=False, rstrip=False, single_word=False, special=special)

    for tok, i in SPECIAL_TOKENS.items():
        add(i, tok, special=tok not in ("<mask>", "[multimodal]"))
    for k in range(_N_UNUSED):
        add(6 + k, f"<unused{k}>", special=False)
    for k, tok in enumerate(_ADDED_TEXT_TOKENS):
        add(107 + k, tok, special=False)
    for k in range(EOI_ID + 2, EOA_ID):
        add(k, f"<unused_image{k - EOI_ID - 2}>", special=True)
    for k in range(EOA_ID + 2, _VOCAB_SIZE):
        add(k, f"<unused_audio{k - EOA_ID - 2}>", special=True)
    for b in range(256):
        id_to_tok[_BYTE_BASE + b] = f"<0x{b:02X}>"
    for i, tok in zip(slots, bpe_tokens):
        id_to_tok[i] = tok
    assert sorted(id_to_tok) == list(range(_VOCAB_SIZE)), "tiny vocab must fill 0..511 exactly"
    vocab = {tok: i for i, tok in id_to_tok.items()}
    assert len(vocab) == _VOCAB_SIZE, "duplicate token strings in tiny vocab"
    return vocab, merges, dict(sorted(added.items()))


_REAL_DATA = Path(__file__).resolve().parent / "data" / "gemma-3n-E2B-it"
CHAT_TEMPLATE_PATH = _REAL_DATA / "chat_template.jinja"

GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": BOS_ID,
    "do_sample": True,
    "eos_token_id": list(EOS_IDS),
    "pad_token_id": PAD_ID,
    "top_k": 64,
    "top_p": 0.95,
}


def build_tokenizer(path: str | os.PathLike):
    """Write a tiny Gemma tokenizer into ``path`` and return it (loaded back
    through ``AutoTokenizer``).

    Files: tokenizer.json (BPE with byte fallback, Gemma normalizer/decoder,
    ``<bos> $A`` post-processor), tokenizer_config.json (GemmaTokenizer,
    add_bos_token, added_tokens_decoder, multimodal extra special tokens),
    special_tokens_map.json and chat_template.jinja (the real template).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges, added = tiny_vocab()

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens(
        [
            AddedToken(a["content"], special=a["special"], normalized=False, lstrip=False, rstrip=False, single_word=False)
            for a in added.values()
        ]
    )
    for i, a in added.items():
        assert tok.token_to_id(a["content"]) == i, (a, tok.token_to_id(a["content"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0",
        pair="<bos>:0 $A:0 <bos>:1 $B:1",
        special_tokens=[("<bos>", BOS_ID)],
    )
    tok.save(str(path / "tokenizer.json"))

    mm = {
        "audio_token": "<audio_soft_token>",
        "boa_token": "<start_of_audio>",
        "boi_token": "<start_of_image>",
        "eoa_token": "<end_of_audio>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tok_cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): a for i, a in added.items()},
        **mm,
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "extra_special_tokens": dict(mm),
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "sp_model_kwargs": None,
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")

    def _st(content: str) -> dict[str, Any]:
        return dict(content=content, lstrip=False, normalized=False, rstrip=False, single_word=False)

    stm = {
        **mm,
        "bos_token": _st("<bos>"),
        "eos_token": _st("<eos>"),
        "pad_token": _st("<pad>"),
        "unk_token": _st("<unk>"),
    }
    (path / "special_tokens_map.json").write_text(json.dumps(stm, indent=2, ensure_ascii=False) + "\n")
    shutil.copyfile(CHAT_TEMPLATE_PATH, path / "chat_template.jinja")

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ---------------------------------------------------------------------------
# Checkpoint construction
# ---------------------------------------------------------------------------


def make_config(
    text: dict[str, Any] = TINY_TEXT_A,
    multimodal: bool = True,
    audio_overrides: dict[str, Any] | None = None,
    vision_overrides: dict[str, Any] | None = None,
):
    """Return a ``Gemma3nConfig`` (multimodal) or ``Gemma3nTextConfig``; ``audio_overrides`` /
    ``vision_overrides`` replace entries of TINY_AUDIO (e.g. ``input_feat_size``) / TINY_VISION
    (e.g. ``model_args={}``: the real-width MobileNet v5)."""
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nTextConfig, Gemma3nVisionConfig

    text_cfg = Gemma3nTextConfig(**copy.deepcopy(text))
    if not multimodal:
        text_cfg.architectures = ["Gemma3nForCausalLM"]
        return text_cfg
    vision = dict(TINY_VISION, **(vision_overrides or {}), vocab_offset=text["vocab_size_per_layer_input"])
    audio = dict(TINY_AUDIO, **(audio_overrides or {}), vocab_offset=vision["vocab_offset"] + vision["vocab_size"])
    assert audio["vocab_offset"] + audio["vocab_size"] == text["vocab_size"]
    cfg = Gemma3nConfig(
        text_config=text_cfg,
        vision_config=Gemma3nVisionConfig(**copy.deepcopy(vision)),
        audio_config=Gemma3nAudioConfig(**copy.deepcopy(audio)),
        audio_soft_tokens_per_image=188,
        vision_soft_tokens_per_image=256,
        boi_token_id=BOI_ID,
        eoi_token_id=EOI_ID,
        image_token_id=IMAGE_TOKEN_ID,
        boa_token_id=BOA_ID,
        eoa_token_id=EOA_ID,
        audio_token_id=AUDIO_TOKEN_ID,
        bos_token_id=BOS_ID,
        eos_token_id=list(EOS_IDS),
        pad_token_id=PAD_ID,
    )
    cfg.architectures = ["Gemma3nForConditionalGeneration"]
    return cfg


def _is_norm_module(mod: torch.nn.Module) -> bool:
    name = type(mod).__name__.lower()
    return "norm" in name


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite EVERY parameter with seeded random values.

    * norm scales, AltUp ``correct_output_scale``: N(1, 0.1)
    * norm biases: N(0, 0.05)
    * timm layer-scale gammas: |N(0.1, 0.03)|
    * scaled token embeddings (main and per-layer): N(0, 1/embed_scale) so the
      scaled lookups are O(1) (tied lm_head -> logits with std ~1)
    * multimodal embedder tables: N(0, 1/sqrt(dim))
    * AltUp modality router: N(0, sqrt(H)) (its inputs are scaled by 1/H)
    * AltUp prediction / correction coefficients: N(0, 0.1)
    * audio ``per_dim_scale``: N(0, 0.3)
    * other >=2-D weights (linear / conv): N(0, 1/sqrt(fan_in))
    * other 1-D params (biases): N(0, 0.05)
    """
    gen = torch.Generator().manual_seed(int(seed))
    owner: dict[str, torch.nn.Module] = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = mod

    for name, p in model.named_parameters():  # tied weights are listed once
        mod = owner[name]
        leaf = name.rsplit(".", 1)[-1]
        shape = tuple(p.shape)
        mean, std = 0.0, None
        if leaf == "correct_output_scale" or (_is_norm_module(mod) and leaf == "weight"):
            mean, std = 1.0, 0.1
        elif _is_norm_module(mod):
            std = 0.05
        elif leaf == "gamma":  # timm LayerScale / LayerScale2d
            mean, std = 0.1, 0.03
        elif hasattr(mod, "scalar_embed_scale"):  # Gemma3nTextScaledWordEmbedding
            std = 1.0 / float(mod.scalar_embed_scale)  # scaled lookups are O(1)
        elif isinstance(mod, torch.nn.Embedding):
            std = 1.0 / math.sqrt(shape[1])
        elif name.endswith("altup.modality_router.weight"):
            std = math.sqrt(shape[1])
        elif name.endswith(("altup.prediction_coefs.weight", "altup.correction_coefs.weight")):
            std = 0.1
        elif leaf == "per_dim_scale":
            std = 0.3
        elif p.dim() >= 2:
            fan_in = int(np.prod(shape[1:]))
            std = 1.0 / math.sqrt(fan_in)
        else:
            std = 0.05
        vals = torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean
        if leaf == "gamma":
            vals = vals.abs()
        p.copy_(vals.to(p.dtype))


def shared_kv_layers(text_config) -> list[int]:
    """Indices of the KV-shared ("reuse") decoder layers."""
    n = text_config.num_hidden_layers
    return list(range(n - text_config.num_kv_shared_layers, n))


def _add_shared_kv_tensors(path: Path, model, seed: int) -> list[str]:
    """Add random k_proj / v_proj / k_norm weights for the KV-shared layers to
    the saved safetensors (like Google's original checkpoints; transformers 5
    drops them on save and ignores them on load)."""
    from safetensors.torch import load_file, save_file

    tcfg = model.config.get_text_config()
    prefix = "model.language_model." if hasattr(model.model, "language_model") else "model."
    files = sorted(path.glob("*.safetensors"))
    assert len(files) == 1, files  # tiny models are never sharded
    sd = load_file(str(files[0]))
    dtype = next(iter(sd.values())).dtype
    gen = torch.Generator().manual_seed(10_000 + int(seed))
    kv = tcfg.num_key_value_heads * tcfg.head_dim
    added = []
    for i in shared_kv_layers(tcfg):
        base = f"{prefix}layers.{i}.self_attn."
        new = {
            base + "k_proj.weight": torch.randn(kv, tcfg.hidden_size, generator=gen) / math.sqrt(tcfg.hidden_size),
            base + "v_proj.weight": torch.randn(kv, tcfg.hidden_size, generator=gen) / math.sqrt(tcfg.hidden_size),
            base + "k_norm.weight": 1.0 + 0.1 * torch.randn(tcfg.head_dim, generator=gen),
        }
        for k, v in new.items():
            assert k not in sd, k
            sd[k] = v.to(dtype).contiguous()
            added.append(k)
    save_file(sd, str(files[0]), metadata={"format": "pt"})
    return added


def _rewrite_config_google_style(path: Path) -> None:
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    tc = cfg["text_config"] if "text_config" in cfg else cfg
    rope = tc.pop("rope_parameters")
    assert all(r["rope_type"] == "default" for r in rope.values()), rope
    tc["rope_theta"] = rope["full_attention"]["rope_theta"]
    tc["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    tc["rope_scaling"] = None
    if "text_config" in cfg:
        cfg["text_config"] = dict(sorted(tc.items()))
    else:
        cfg = dict(sorted(tc.items()))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_checkpoint(
    path: str | os.PathLike,
    text: dict[str, Any] = TINY_TEXT_A,
    seed: int = 0,
    multimodal: bool = True,
    torch_dtype: torch.dtype = torch.float32,
    keep_shared_kv: bool = False,
    with_tokenizer: bool = True,
    config_style: str = "transformers",
    audio_overrides: dict[str, Any] | None = None,
    vision_overrides: dict[str, Any] | None = None,
    processor_image_size: int | None = None,
):
    """Build a tiny, fully randomised Gemma 3n checkpoint folder at ``path``.

    ``multimodal=True``: ``Gemma3nForConditionalGeneration`` (tiny MobileNetV5
    vision tower, tiny conformer audio tower, multimodal embedders);
    ``multimodal=False``: ``Gemma3nForCausalLM``.

    Writes config.json, model.safetensors (tied lm_head omitted, as
    transformers does), generation_config.json and (``with_tokenizer``) the
    tiny tokenizer files. ``keep_shared_kv=True`` additionally stores random
    k_proj / v_proj / k_norm weights for the KV-shared layers (ignored by
    transformers on load, present in Google's original checkpoints).

    ``config_style="google"`` rewrites config.json's text config the way
    Google's published checkpoints spell it (``rope_theta`` +
    ``rope_local_base_freq`` + ``rope_scaling: null`` instead of transformers
    5's ``rope_parameters``); transformers loads both identically.

    ``audio_overrides`` / ``vision_overrides`` replace entries of the tiny audio / vision tower's
    config (multimodal only).

    ``processor_image_size=N`` also saves Transformers' ``Gemma3nProcessor`` (Gemma 3n's published
    audio and image preprocessing settings, images resized to N x N instead of 768 x 768; the tiny
    tokenizer, the chat template), as Google's folders carry one: mlx-vlm's converter needs it.

    Returns the torch model (eval mode, ``torch_dtype``).
    """
    from transformers import Gemma3nForCausalLM, Gemma3nForConditionalGeneration, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = make_config(text, multimodal=multimodal, audio_overrides=audio_overrides, vision_overrides=vision_overrides)
    cls = Gemma3nForConditionalGeneration if multimodal else Gemma3nForCausalLM
    torch.manual_seed(int(seed))
    model = cls(cfg)
    randomize_parameters(model, seed=seed)
    model = model.to(torch_dtype).eval()
    model.generation_config = GenerationConfig(**GENERATION_CONFIG)
    model.save_pretrained(str(path))
    if keep_shared_kv:
        _add_shared_kv_tensors(path, model, seed)
    if config_style == "google":
        _rewrite_config_google_style(path)
    elif config_style != "transformers":
        raise ValueError(f"config_style must be 'transformers' or 'google', not {config_style!r}")
    if with_tokenizer:
        tokenizer = build_tokenizer(path)
        if processor_image_size is not None:
            save_processor(path, tokenizer, processor_image_size)
    return model


def save_processor(path: Path, tokenizer, image_size: int = 768) -> None:
    """Transformers' Gemma3nProcessor for ``tokenizer``, saved into ``path`` (processor_config.json;
    the tokenizer files are rewritten in Transformers 5's format)."""
    from transformers import Gemma3nProcessor
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

    images = reference_image_processor()
    images.size = {"height": image_size, "width": image_size}
    template = (path / "chat_template.jinja").read_text()
    Gemma3nProcessor(Gemma3nAudioFeatureExtractor(), images, tokenizer, chat_template=template).save_pretrained(str(path))


def load_reference_model(path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32):
    """Load a checkpoint folder back with transformers (eval mode)."""
    from transformers import AutoConfig, Gemma3nForCausalLM, Gemma3nForConditionalGeneration

    cfg = AutoConfig.from_pretrained(str(path))
    cls = Gemma3nForConditionalGeneration if cfg.model_type == "gemma3n" else Gemma3nForCausalLM
    return cls.from_pretrained(str(path), dtype=torch_dtype).eval()


@contextlib.contextmanager
def float64_throughout():
    """Transformers' Gemma 3n upcasts to float32 in its norms, rotary angles, softmaxes and loss
    (`.float()`, `softmax(dtype=torch.float32)`): a float64 model still rounds to float32 there. Within
    this context those upcasts leave float64 tensors as they are, so a float64 model computes the exact
    result that float32 runs (ours and torch's) are measured against."""
    upcast, softmax = torch.Tensor.float, torch.nn.functional.softmax

    def keep_float64(tensor, *args, **kwargs):
        return tensor if tensor.dtype == torch.float64 else upcast(tensor, *args, **kwargs)

    def softmax_keeping_float64(x, *args, dtype=None, **kwargs):
        return softmax(x, *args, dtype=None if x.dtype == torch.float64 else dtype, **kwargs)

    with mock.patch.object(torch.Tensor, "float", keep_float64), mock.patch.object(torch.nn.functional, "softmax", softmax_keeping_float64):
        yield


# ---------------------------------------------------------------------------
# Reference computations
# ---------------------------------------------------------------------------


def _as_ids(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    return ids


def _to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _text_model(model):
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner


@torch.no_grad()
def reference_logits(model, input_ids, **model_kwargs) -> np.ndarray:
    """Full-sequence forward (no cache): float32 logits [B, T, vocab]."""
    ids = _as_ids(input_ids)
    out = model(input_ids=ids, use_cache=False, **model_kwargs)
    return _to_np(out.logits)


@torch.no_grad()
def reference_intermediates(model, input_ids, detail: bool = False, **model_kwargs) -> dict[str, np.ndarray]:
    """Forward once (no cache) and capture block-boundary values (float32).

    Keys:
      "embeddings"           [B, T, H]   inputs_embeds entering the decoder (scaled
                                         text embeddings, multimodal hard-token
                                         embeddings and soft tokens merged)
      "per_layer_embeddings" [B, T, L, P] embed_tokens_per_layer lookup (ids >=
                                         vocab_size_per_layer_input -> row 0), scaled
      "per_layer_inputs"     [B, T, L, P] after project_per_layer_inputs
      "altup_streams"        [4, B, T, H] stacked AltUp streams entering layer 0
      "layer.{i}"            [4, B, T, H] output of decoder layer i
      "final_norm"           [B, T, H]   output of the final RMSNorm
      "logits"               [B, T, V]   soft-capped logits
    and, for multimodal inputs (pixel_values / input_features passed through
    ``model_kwargs``): "vision_tower" [B, 2048, 16, 16], "image_embeds"
    [B, 256, H], "audio_tower" [B, T_a, H_a], "audio_embeds" [B, T_a, H].
    With ``detail=True`` also, per layer i (all [B, T, H]):
      "layer.{i}.attn"   self-attention output (after o_proj, before post norm)
      "layer.{i}.laurel" LAuReL block output (normed input + laurel residual)
      "layer.{i}.mlp"    MLP output (after down_proj, before post norm)
    """
    ids = _as_ids(input_ids)
    tm = _text_model(model)
    cap: dict[str, Any] = {}
    per_layer: list[torch.Tensor] = [None] * len(tm.layers)  # type: ignore[list-item]
    hooks = []

    # Everything is cloned when captured: e.g. get_image_features scales the
    # tower output in place afterwards.
    def fwd_hook(name, fn=lambda out: out):
        def h(mod, args, out):
            cap[name] = fn(out).detach().clone()

        return h

    def emb_hook(mod, args, out):
        cap["embeddings"] = args[0].detach().clone()

    hooks.append(tm.altup_projections[0].register_forward_hook(emb_hook))
    n_layers, p_dim = tm.config.num_hidden_layers, tm.config.hidden_size_per_layer_input
    hooks.append(
        tm.embed_tokens_per_layer.register_forward_hook(
            fwd_hook("per_layer_embeddings", lambda o: o.reshape(*o.shape[:-1], n_layers, p_dim))
        )
    )
    for i, layer in enumerate(tm.layers):

        def pre(mod, args, kwargs, i=i):
            if i == 0:
                cap["altup_streams"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            per_layer[i] = (args[2] if len(args) > 2 else kwargs["per_layer_input"]).detach().clone()

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.register_forward_hook(fwd_hook(f"layer.{i}")))
        if detail:
            hooks.append(layer.self_attn.register_forward_hook(fwd_hook(f"layer.{i}.attn", lambda o: o[0])))
            hooks.append(layer.laurel.register_forward_hook(fwd_hook(f"layer.{i}.laurel")))
            hooks.append(layer.mlp.register_forward_hook(fwd_hook(f"layer.{i}.mlp")))
    hooks.append(tm.norm.register_forward_hook(fwd_hook("final_norm")))

    inner = model.model
    if hasattr(inner, "vision_tower"):
        hooks.append(inner.vision_tower.register_forward_hook(fwd_hook("vision_tower", lambda o: o.last_hidden_state)))
        hooks.append(inner.audio_tower.register_forward_hook(fwd_hook("audio_tower", lambda o: o.last_hidden_state)))

        def mm_hook(name):
            def h(mod, args, kwargs, out):
                if kwargs.get("inputs_embeds") is not None:
                    cap[name] = out.detach().clone()

            return h

        hooks.append(inner.embed_vision.register_forward_hook(mm_hook("image_embeds"), with_kwargs=True))
        hooks.append(inner.embed_audio.register_forward_hook(mm_hook("audio_embeds"), with_kwargs=True))
    try:
        out = model(input_ids=ids, use_cache=False, **model_kwargs)
    finally:
        for h in hooks:
            h.remove()
    cap["per_layer_inputs"] = torch.stack(per_layer, dim=2)
    cap["logits"] = out.logits
    return {k: _to_np(v) for k, v in cap.items()}


@torch.no_grad()
def reference_greedy(model, input_ids, max_new_tokens: int, stop_at_eos: bool = True, **generate_kwargs) -> list[int]:
    """Transformers greedy decoding (``generate`` with do_sample=False, KV cache on).

    Returns the new token ids (batch of one) as a list. With ``stop_at_eos``
    the list ends at (and includes) the first eos (1 or 106); otherwise exactly
    ``max_new_tokens`` ids are produced (no eos handling at all, logits
    untouched). The model's sampling defaults (top_k/top_p) are not used.
    """
    from transformers import GenerationConfig

    ids = _as_ids(input_ids)
    assert ids.shape[0] == 1, "reference_greedy takes a single sequence"
    gc = GenerationConfig(
        do_sample=False,
        bos_token_id=BOS_ID,
        pad_token_id=PAD_ID,
        eos_token_id=list(EOS_IDS) if stop_at_eos else None,
    )
    saved = model.generation_config
    model.generation_config = gc  # so unset fields do not fall back to eos / top_k / top_p defaults
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=int(max_new_tokens),
            **generate_kwargs,
        )
    finally:
        model.generation_config = saved
    new = out[0, ids.shape[1] :].tolist()
    if not stop_at_eos:
        assert len(new) == int(max_new_tokens), len(new)
    return new


def reference_image_processor():
    """Transformers' image processor with Gemma 3n's published preprocessor_config.json values
    (768x768, bilinear, rescale 1/255, no normalisation)."""
    from transformers.models.siglip.image_processing_siglip import SiglipImageProcessor

    return SiglipImageProcessor(
        size={"height": 768, "width": 768}, resample=2, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=False, do_convert_rgb=True,
    )
