"""Writes tensors into safetensors shards of bounded size, with an index when there are several."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx


class ShardWriter:
    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []

    def add(self, name: str, tensor: mx.array) -> None:
        if self.pending and self.pending_bytes + tensor.nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += tensor.nbytes

    def flush(self) -> None:
        mx.save_safetensors(str(self.folder / f"shard-{len(self.shards)}.safetensors"), self.pending, metadata={"format": "mlx"})
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Final names: model.safetensors alone, or model-0000k-of-0000n.safetensors plus the index."""
        if self.pending or not self.shards:
            self.flush()
        count = len(self.shards)
        if count == 1:
            (self.folder / "shard-0.safetensors").rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for k, names in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{count:05d}.safetensors"
            (self.folder / f"shard-{k}.safetensors").rename(self.folder / final)
            weight_map.update({name: final for name in names})
        total = sum((self.folder / f).stat().st_size for f in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
