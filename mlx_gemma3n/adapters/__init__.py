"""PEFT LoRA adapters over a Gemma 3n model: read exactly as PEFT wrote them, run unfused (over float
or quantized bases), switched without reloading the base, and fused into the weights (`fuse`).

`load` builds a `ModelWithAdapters`: `model.load_adapter(path_or_hub_id, name)` reads an adapter and
makes it the active one; `model.set_adapter(name)` switches, `model.set_adapter(None)` returns to the
base model.
"""

from .layers import LoRALinear, TunedEmbedding
from .reader import Adapter, Lora, read_adapter
from .switch import ModelWithAdapters

__all__ = ["Adapter", "Lora", "LoRALinear", "ModelWithAdapters", "TunedEmbedding", "read_adapter"]
