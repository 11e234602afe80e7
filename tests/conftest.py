"""Shared pytest setup for the mlx_gemma3n tests (torch / transformers side).

* ``tests/`` is put on ``sys.path`` so test modules can ``from reference import ...``.
* ``tests/sitecustomize`` is prepended to ``PYTHONPATH`` in ``os.environ`` so
  every subprocess started by a test (e.g. ``python -m mlx_gemma3n.generate``)
  gets the torchvision op-schema work-around (see that module's docstring).
* The same work-around is applied to the pytest process itself.

Session-scoped fixtures (built once per session under ``tmp_path_factory``;
each returns ``TinyCheckpoint(path, model)``, a NamedTuple that unpacks as
``path, model = tiny_ckpt_a``). The torch models are shared: do not mutate them.

  tiny_ckpt_a          TINY_TEXT_A, multimodal (Gemma3nForConditionalGeneration), seed 0
  tiny_ckpt_b          TINY_TEXT_B, multimodal, seed 1
  tiny_ckpt_shared_kv  "Google-original style": TINY_TEXT_A, multimodal, seed 0,
                       keep_shared_kv=True, config_style="google" -- same weights
                       as tiny_ckpt_a plus random k_proj/v_proj/k_norm tensors for
                       the KV-shared layers 5..9 (transformers ignores them), and
                       config.json text_config spelled with rope_theta /
                       rope_local_base_freq / rope_scaling instead of rope_parameters
  tiny_ckpt_256        tiny_ckpt_a's weights, its processor files resizing images to 256 x 256
  tiny_ckpt_text_only  TINY_TEXT_B, Gemma3nForCausalLM (keys "model.layers..."), seed 2
  tiny_tokenizer       transformers tokenizer loaded from tiny_ckpt_a's folder
  tiny_media           {"image": PNG path, "audio": WAV path} for media prompts

All folders are float32 and contain config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json,
special_tokens_map.json and chat_template.jinja.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

TESTS_DIR = Path(__file__).resolve().parent
SITECUSTOMIZE_DIR = TESTS_DIR / "sitecustomize"

if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

_pp = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if str(SITECUSTOMIZE_DIR) not in _pp:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SITECUSTOMIZE_DIR)] + _pp)


import reference  # noqa: E402,F401  (defines the torchvision op schemas for this process on import)


class TinyCheckpoint(NamedTuple):
    path: Path
    model: Any  # the torch model (eval mode, float32)


#: seconds spent building each session fixture (filled lazily)
BUILD_TIMES: dict[str, float] = {}


def _build(tmp_path_factory, name: str, **kwargs) -> TinyCheckpoint:
    from reference import build_checkpoint

    path = tmp_path_factory.mktemp(name)
    t0 = time.perf_counter()
    model = build_checkpoint(path, **kwargs)
    BUILD_TIMES[name] = time.perf_counter() - t0
    return TinyCheckpoint(Path(path), model)


@pytest.fixture(scope="session")
def tiny_ckpt_a(tmp_path_factory) -> TinyCheckpoint:
    from reference import TINY_TEXT_A

    return _build(tmp_path_factory, "tiny_a", text=TINY_TEXT_A, seed=0, multimodal=True)


@pytest.fixture(scope="session")
def tiny_ckpt_b(tmp_path_factory) -> TinyCheckpoint:
    from reference import TINY_TEXT_B

    return _build(tmp_path_factory, "tiny_b", text=TINY_TEXT_B, seed=1, multimodal=True)


@pytest.fixture(scope="session")
def tiny_ckpt_shared_kv(tmp_path_factory) -> TinyCheckpoint:
    from reference import TINY_TEXT_A

    return _build(
        tmp_path_factory,
        "tiny_shared_kv",
        text=TINY_TEXT_A,
        seed=0,
        multimodal=True,
        keep_shared_kv=True,
        config_style="google",
    )


@pytest.fixture(scope="session")
def tiny_ckpt_256(tmp_path_factory) -> TinyCheckpoint:
    """tiny_ckpt_a's weights with its processor files resizing images to 256 x 256 (not 768): the
    vision tower runs in seconds, not minutes, for tests that run it end to end in subprocesses."""
    from reference import TINY_TEXT_A

    return _build(tmp_path_factory, "tiny_256", text=TINY_TEXT_A, seed=0, multimodal=True, processor_image_size=256)


@pytest.fixture(scope="session")
def tiny_256_loaded(tiny_ckpt_256):
    """Our model and processor of tiny_ckpt_256, loaded once for the modules that only read them."""
    from mlx_gemma3n import load

    return load(tiny_ckpt_256.path)


@pytest.fixture(scope="session")
def tiny_ckpt_text_only(tmp_path_factory) -> TinyCheckpoint:
    from reference import TINY_TEXT_B

    return _build(tmp_path_factory, "tiny_text_only", text=TINY_TEXT_B, seed=2, multimodal=False)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_ckpt_a):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_ckpt_a.path))


@pytest.fixture(scope="session")
def tiny_media(tmp_path_factory) -> dict[str, Path]:
    """{"image": a random 300 x 420 PNG, "audio": a 2 s 16 kHz WAV (a 220 Hz tone and noise)}."""
    import numpy as np
    import soundfile
    from PIL import Image

    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)).save(folder / "picture.png")
    t = np.arange(16000 * 2) / 16000
    clip = (0.4 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    soundfile.write(folder / "clip.wav", clip, 16000)
    return {"image": folder / "picture.png", "audio": folder / "clip.wav"}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if BUILD_TIMES:
        times = ", ".join(f"{k} {v:.2f}s" for k, v in BUILD_TIMES.items())
        terminalreporter.write_line(f"tiny checkpoint build times: {times}")
