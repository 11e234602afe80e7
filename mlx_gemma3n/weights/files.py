"""Checkpoint files: where a model folder comes from (a local folder or the Hugging Face Hub), which
files hold its weights, and what our name for each checkpoint tensor is.

The lowest module of weights/: it imports nothing of ours but errors and the safetensors header
reader (and the config type), so the loader, MatFormer slicing, conversion and the adapter reader all build on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..architecture.config import ModelConfig
from ..errors import Gemma3nError
from .mapped import read_header

# What a model folder needs; nothing else is downloaded (no pickles, no remote code).
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model"]
SHARED_KV_PARAMS = ("k_proj", "v_proj", "k_norm", "v_norm")
UNGATED_MODEL = "mlx-community/gemma-3n-E2B-it-4bit"  # mlx-vlm's 4-bit conversion of the gated default


def resolve_model_path(path_or_hub_id: str | Path, patterns=HUB_PATTERNS, what: str = "model") -> Path:
    """A local folder as is; otherwise a hub id, downloaded (only the files matching `patterns`:
    those a model needs, or an adapter's)."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise Gemma3nError(f"{what} path {path} is a file, expected a {what} folder")
        return path
    name = str(path_or_hub_id)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise Gemma3nError(f"{what} path {name} does not exist")
    return Path(download(name, patterns))


def access_denied(repo_id: str) -> Gemma3nError:
    return Gemma3nError(
        f"'{repo_id}' is gated on the Hugging Face Hub and this machine has no access to it: accept its licence "
        f"on https://huggingface.co/{repo_id} (signed in), then run `hf auth login` here with a token of that "
        f"account; or load the ungated MLX folder {UNGATED_MODEL} instead"
    )


def download(repo_id: str, patterns=HUB_PATTERNS) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except GatedRepoError:
        raise access_denied(repo_id) from None
    except RepositoryNotFoundError:
        raise Gemma3nError(f"'{repo_id}' is not a model on the Hugging Face Hub (or it is private)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        if getattr(getattr(exc, "response", None), "status_code", None) in (401, 403):
            raise access_denied(repo_id) from None
        raise Gemma3nError(
            f"cannot download '{repo_id}' from the Hugging Face Hub (offline? {type(exc).__name__}); "
            "pass a local model folder instead"
        ) from None


def safetensors_names(path: Path) -> list[str]:
    """Tensor names of a safetensors file, after checking that the file holds all the data its header
    promises (a truncated download fails here, naming the file)."""
    return list(read_header(path)[1])


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise Gemma3nError(f"{index} is not a valid safetensors index ({exc})") from None
        missing = [n for n in shard_names if not (model_dir / n).is_file()]
        if missing:
            raise Gemma3nError(f"shard(s) named in {index.name} are missing: {', '.join(missing)}")
        return [model_dir / n for n in shard_names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
            raise Gemma3nError(f"{model_dir} has only PyTorch pickle weights; convert them to safetensors first")
        raise Gemma3nError(f"no .safetensors weights in {model_dir}")
    return files


def our_name(hf_name: str, config: ModelConfig) -> str | None:
    """Our parameter name for a checkpoint tensor, or None for a tensor we do not use.

    Names tell the folder's layout: Transformers / Google (`model.language_model.`, `model.vision_tower.`,
    ...; text-only `model.`), mlx-lm (Transformers' names, text part only), mlx-vlm
    (`language_model.model.`, `vision_tower.`, ...) and ours (`language_model.`, `vision_tower.`, ...)."""
    for prefix, ours in (
        ("model.language_model.", "language_model."),
        ("language_model.model.", "language_model."),
        ("model.embed_vision.", "embed_vision."),
        ("model.embed_audio.", "embed_audio."),
        ("model.vision_tower.", "vision_tower."),
        ("model.audio_tower.", "audio_tower."),
        ("model.", "language_model."),
    ):
        if hf_name.startswith(prefix):
            name = ours + hf_name[len(prefix) :]
            break
    else:
        name = hf_name
    if name == "lm_head.weight":  # tied to the token embedding
        return None
    parts = name.split(".")
    if parts[:2] == ["language_model", "layers"] and parts[3:4] == ["self_attn"] and parts[4] in SHARED_KV_PARAMS:
        if int(parts[2]) >= config.text.first_kv_shared_layer:
            return None  # Google's checkpoints carry unused k/v weights on KV-shared layers
    return name
