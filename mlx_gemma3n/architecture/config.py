"""Model configuration read from Hugging Face `config.json` files.

Two key styles exist in the wild and both are read:
- Google's own files: `rope_theta` (full layers) and `rope_local_base_freq` (sliding layers).
- Files saved by Transformers 5: `rope_parameters` with one entry per layer type.
Missing keys take the values of Transformers' `Gemma3nTextConfig()` defaults, which are the E4B model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import Gemma3nError

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)


def _rope_theta(raw: dict, layer_type: str, legacy_key: str, default: float) -> float:
    params = (raw.get("rope_parameters") or {}).get(layer_type)
    if params:
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise Gemma3nError(f"unsupported rope_type '{rope_type}' for {layer_type} layers")
        return float(params.get("rope_theta", raw.get(legacy_key, default)))
    scaling = raw.get("rope_scaling")
    if layer_type == FULL and scaling and scaling.get("rope_type", "default") != "default":
        raise Gemma3nError(f"unsupported rope_scaling {scaling}")
    return float(raw.get(legacy_key, default))


@dataclass
class TextConfig:
    vocab_size: int = 262_400
    vocab_size_per_layer_input: int = 262_144
    hidden_size: int = 2048
    hidden_size_per_layer_input: int = 256
    intermediate_size: list[int] | int = 16_384
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 32_768
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: list[str] | None = None
    rope_theta_full: float = 1_000_000.0
    rope_theta_sliding: float = 10_000.0
    final_logit_softcapping: float | None = 30.0
    altup_active_idx: int = 0
    altup_coef_clip: float | None = 120.0
    altup_correct_scale: bool = True
    altup_num_inputs: int = 4
    num_kv_shared_layers: int = 15
    laurel_rank: int = 64
    activation_sparsity_pattern: list[float] | float | None = None

    def __post_init__(self):
        n = self.num_hidden_layers
        if isinstance(self.intermediate_size, int):
            self.intermediate_size = [self.intermediate_size] * n
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(n)]
        if self.activation_sparsity_pattern is None:
            sparse = 10 if n > 10 else 0
            self.activation_sparsity_pattern = [0.95] * sparse + [0.0] * (n - sparse)
        elif isinstance(self.activation_sparsity_pattern, (int, float)):
            self.activation_sparsity_pattern = [float(self.activation_sparsity_pattern)] * n
        for name in ("intermediate_size", "layer_types", "activation_sparsity_pattern"):
            if len(getattr(self, name)) != n:
                raise Gemma3nError(f"config {name} has {len(getattr(self, name))} entries, expected {n}")
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise Gemma3nError(f"config layer_types has unknown types {sorted(unknown)}")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu"):
            raise Gemma3nError(f"unsupported hidden_activation '{self.hidden_activation}'")
        owners = self.layer_types[: self.first_kv_shared_layer]
        if self.num_kv_shared_layers and set(owners) != set(self.layer_types):
            raise Gemma3nError("every layer type must appear among the layers before the KV-shared ones")

    @classmethod
    def from_dict(cls, raw: dict) -> "TextConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["rope_theta_full"] = _rope_theta(raw, FULL, "rope_theta", cls.rope_theta_full)
        values["rope_theta_sliding"] = _rope_theta(raw, SLIDING, "rope_local_base_freq", cls.rope_theta_sliding)
        return cls(**values)

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source(self, layer_idx: int) -> int:
        """Index of the layer whose keys/values `layer_idx` attends to.

        A KV-shared layer reads the last layer before the shared block that has its own type.
        """
        first_shared = self.first_kv_shared_layer
        if layer_idx < first_shared:
            return layer_idx
        layer_type = self.layer_types[layer_idx]
        return max(i for i in range(first_shared) if self.layer_types[i] == layer_type)


@dataclass
class EmbedderConfig:
    """A multimodal embedder: hard-token table plus soft-token projection into the text width."""

    hidden_size: int
    vocab_size: int = 128
    vocab_offset: int = 262_144
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, raw: dict, default_offset: int) -> "EmbedderConfig":
        return cls(
            hidden_size=raw.get("hidden_size", 2048),
            vocab_size=raw.get("vocab_size", 128),
            vocab_offset=raw.get("vocab_offset", default_offset),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        )


@dataclass
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: EmbedderConfig | None = None
    audio: EmbedderConfig | None = None
    vision_tower: dict = field(default_factory=dict)
    audio_tower: dict = field(default_factory=dict)
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    image_token_id: int | None = None
    audio_token_id: int | None = None
    image_soft_tokens: int = 256
    audio_soft_tokens: int = 188
    quantization: dict | None = None

    @property
    def is_multimodal(self) -> bool:
        return self.model_type == "gemma3n"

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type == "gemma3n":
            text_raw = raw.get("text_config") or {}
        elif model_type == "gemma3n_text":
            text_raw = raw
        else:
            raise Gemma3nError(
                f"not a Gemma 3n config: model_type is '{model_type}' (expected 'gemma3n' or 'gemma3n_text')"
            )
        text = TextConfig.from_dict(text_raw)
        eos = raw.get("eos_token_id", text_raw.get("eos_token_id", 1))
        config = cls(
            model_type=model_type,
            text=text,
            eos_token_ids=list(eos) if isinstance(eos, (list, tuple)) else [eos],
            image_token_id=raw.get("image_token_id"),
            audio_token_id=raw.get("audio_token_id"),
            image_soft_tokens=raw.get("vision_soft_tokens_per_image", 256),
            audio_soft_tokens=raw.get("audio_soft_tokens_per_image", 188),
            quantization=raw.get("quantization"),
        )
        if config.is_multimodal:
            vision_raw = raw.get("vision_config") or {}
            audio_raw = raw.get("audio_config") or {}
            config.vision = EmbedderConfig.from_dict(vision_raw, text.vocab_size_per_layer_input)
            config.audio = EmbedderConfig.from_dict(
                {"hidden_size": 1536, **audio_raw}, text.vocab_size_per_layer_input + 128
            )
            config.vision_tower, config.audio_tower = vision_raw, audio_raw
        return config


def read_config(model_dir: str | Path) -> dict:
    """The raw config.json of a model folder, with errors that name the file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise Gemma3nError(f"no config.json in {model_dir}: not a Hugging Face / MLX model folder")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Gemma3nError(f"{path} is not valid JSON: {exc}") from None


def load_config(model_dir: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(read_config(model_dir))
