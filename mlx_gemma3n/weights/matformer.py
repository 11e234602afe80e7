"""MatFormer mix-n-match: the Gemma 3n sizes nested in E4B, cut from its weights.

E4B was trained as a MatFormer: the first k units of each layer's FFN, and the model without some
layers, are models of their own. A slice names a width for every kept layer and the layers to skip.
The rules are those of Google's MatFormer Lab (google-gemini/gemma-cookbook,
`Gemma/[Gemma_3n]MatFormer_Lab.ipynb`):
- a kept layer of width k: `gate_proj` / `up_proj` keep their first k rows, `down_proj` its first k
  columns; skipped layers are dropped and the others renumbered;
- `embed_tokens_per_layer` (vocab x layers*256) keeps the kept layers' column blocks and
  `per_layer_model_projection` (layers*256 x hidden) their row blocks;
- the config: `num_hidden_layers`, per-layer `intermediate_size`, and `num_kv_shared_layers` less the
  skipped layers past the first KV-shared one; everything else (towers, AltUp, LAuReL, norms,
  embeddings) is unchanged.
Where the notebook hard-codes E4B, the code below says what it generalises.

Quantized weights are cut along whole groups: rows of gate/up are whole, down_proj's packed input
columns are cut at k*bits/32 words and its scales/biases at k/group_size (hence widths must be
multiples of the group size), and each PLE layer block holds whole groups. The rule for a tensor is
the same in every case: its share of the layer's width (or of the layer count) is kept.

The table of recommended slices is package data: data/matformer_configs.csv is `configs.csv` of the
Hugging Face dataset google/gemma3n-slicing-configs (the notebook reads it from there), copied byte
for byte from the copy in github.com/EricLBuehler/mistral.rs (`matformer_configs/gemma3n.csv`).
`python -m mlx_gemma3n.matformer --list` prints it.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..architecture.config import ModelConfig, TextConfig, read_config
from ..errors import Gemma3nError
from .files import our_name, weight_files
from .mapped import MappedRows, TensorLocation, locate, read_header
from .quantization import module_entries_renamed

TABLE_FILE = Path(__file__).resolve().parent.parent / "data" / "matformer_configs.csv"
TABLE_SOURCE = "Hugging Face dataset google/gemma3n-slicing-configs, configs.csv"
NAME_PREFIX = "Config for "  # every table name but "Main model" starts so; it may be left out
LAYER = re.compile(r"\.layers\.(\d+)\.")  # the notebook's pattern for a decoder layer's tensors
FFN_ROWS = ("mlp.gate_proj", "mlp.up_proj")  # hidden -> width: the first k rows
FFN_COLUMNS = "mlp.down_proj"  # width -> hidden: the first k columns
PLE_TABLE = "language_model.embed_tokens_per_layer"  # one column block per layer
PLE_PROJECTION = "language_model.per_layer_model_projection"  # one row block per layer
WIDTH = re.compile(r"\d[\d_]*(\s*\*\s*\d[\d_]*)*")  # the table writes widths as "2_048 * 8"
SPEC_KEYS = {"ffn_hidden_dims", "layers_to_skip"}


@dataclass(frozen=True)
class MatformerSpec:
    """A slice: the FFN width of every kept layer (in order) and the layers skipped."""

    ffn_hidden_dims: tuple[int, ...]
    layers_to_skip: tuple[int, ...] = ()
    name: str = "custom"
    effective_params: float | None = None  # billions, as the table gives them
    mmlu: str | None = None  # the table's "MMLU PT accuracy" (of the pre-trained checkpoint)


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """A table cell: "" (none) or "[2_048 * 4, 2_048 * 8, ...]" (products, no eval)."""
    body = text.strip()
    if not body:
        return ()
    if not (body.startswith("[") and body.endswith("]")):
        raise Gemma3nError(f"{TABLE_FILE}: {what} is not a list: {body[:40]}")
    terms = [term.strip() for term in body[1:-1].split(",") if term.strip()]
    if not all(WIDTH.fullmatch(term) for term in terms):
        raise Gemma3nError(f"{TABLE_FILE}: {what} has an entry that is not a product of integers")
    return tuple(math.prod(int(factor.replace("_", "")) for factor in term.split("*")) for term in terms)


@functools.cache
def table() -> tuple[MatformerSpec, ...]:
    with open(TABLE_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    return tuple(
        MatformerSpec(
            ffn_hidden_dims=parse_int_list(row["FFN Hidden Dims"], f"'{row['name']}' FFN Hidden Dims"),
            layers_to_skip=parse_int_list(row["Layers Skipped"] or "", f"'{row['name']}' Layers Skipped"),
            name=row["name"],
            effective_params=float(row["# Effective Params (B)"]),
            mmlu=row["MMLU PT accuracy"],
        )
        for row in rows
    )


def spec_from_dict(raw, name: str) -> MatformerSpec:
    if not isinstance(raw, dict) or "ffn_hidden_dims" not in raw:
        raise Gemma3nError(f"MatFormer spec {name} must be a JSON object with ffn_hidden_dims (and layers_to_skip)")
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise Gemma3nError(f"MatFormer spec {name} has unknown keys {unknown} (expected {sorted(SPEC_KEYS)})")
    lists = {key: raw.get(key, []) for key in SPEC_KEYS}
    for key, values in lists.items():
        if not isinstance(values, list) or not all(type(v) is int for v in values):
            raise Gemma3nError(f"MatFormer spec {name}: {key} must be a list of integers")
    return MatformerSpec(tuple(lists["ffn_hidden_dims"]), tuple(lists["layers_to_skip"]), name=name)


def spec_from_file(path: Path) -> MatformerSpec:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Gemma3nError(f"MatFormer spec {path} is not a readable JSON file ({exc})") from None
    return spec_from_dict(raw, str(path))


def resolve_spec(spec) -> MatformerSpec:
    """A MatformerSpec from a table name (with or without "Config for ", any case), a JSON file
    {"ffn_hidden_dims": [...], "layers_to_skip": [...]}, such a dict, or a MatformerSpec."""
    if isinstance(spec, MatformerSpec):
        return spec
    if isinstance(spec, dict):
        return spec_from_dict(spec, "(dict)")
    text = str(spec).strip()
    for row in table():
        if text.casefold() in (row.name.casefold(), row.name.removeprefix(NAME_PREFIX).casefold()):
            return row
    path = Path(text).expanduser()
    if path.is_file():
        return spec_from_file(path)
    raise Gemma3nError(
        f"unknown MatFormer slice '{text}': not a name from `python -m mlx_gemma3n.matformer --list` nor a JSON file"
    )


@dataclass(frozen=True)
class Cut:
    """A sub-matrix of a stored 2-D tensor: its first shape[0] rows (or the `rows` listed), then the
    `columns` given (a slice or a list; None: all)."""

    shape: tuple[int, ...]
    rows: np.ndarray | None = None
    columns: slice | np.ndarray | None = None

    def take(self, stored: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of the sub-matrix; on a memory-mapped array only they are read."""
        stop = self.shape[0] if stop is None else stop
        part = stored[start:stop] if self.rows is None else stored[self.rows[start:stop]]
        return part if self.columns is None else part[:, self.columns]


def read_cut(location: TensorLocation, cut: Cut, start: int = 0, stop: int | None = None) -> mx.array:
    """Rows [start, stop) of a cut, read from its file through a memory map: the values left out are
    never read nor copied (slicing a lazy `mx.load` array would read the whole tensor)."""
    stored = MappedRows(location)
    return mx.array(np.ascontiguousarray(cut.take(stored.array, start, stop))).view(stored.view)


@dataclass(frozen=True)
class CutLocation:
    """A tensor in its file and the cut to read of it (what the converter streams in row chunks)."""

    location: TensorLocation
    cut: Cut

    @property
    def shape(self) -> tuple[int, ...]:
        return self.cut.shape

    def read(self, start: int, stop: int) -> mx.array:
        return read_cut(self.location, self.cut, start, stop)


def quantization_group(shapes: dict, module: str, in_features: int) -> int | None:
    """The group size of a quantized module (its input width over its scales' columns), or None."""
    scales = shapes.get(f"{module}.scales")
    return in_features // scales[-1] if scales else None


@dataclass(frozen=True)
class Slicing:
    """A spec checked against the checkpoint it cuts (`source`: its text config)."""

    spec: MatformerSpec
    source: TextConfig
    kept: tuple[int, ...]  # source indices of the kept layers, in order

    @classmethod
    def check(cls, spec: MatformerSpec, source: TextConfig, shapes: dict[str, tuple[int, ...]]) -> "Slicing":
        """Validate the spec against the config and the checkpoint's tensor shapes (our names)."""
        label, n, skipped = f"MatFormer slice '{spec.name}'", source.num_hidden_layers, spec.layers_to_skip
        outside = sorted({i for i in skipped if not 0 <= i < n})
        if outside:
            raise Gemma3nError(f"{label}: layers_to_skip {outside} outside the model's layers 0-{n - 1}")
        if len(set(skipped)) != len(skipped):
            raise Gemma3nError(f"{label}: layers_to_skip lists a layer twice: {list(skipped)}")
        kept = tuple(i for i in range(n) if i not in skipped)
        if not kept:
            raise Gemma3nError(f"{label} skips every layer")
        if len(spec.ffn_hidden_dims) != len(kept):
            raise Gemma3nError(
                f"{label}: ffn_hidden_dims has {len(spec.ffn_hidden_dims)} widths, expected {len(kept)} "
                f"(one per kept layer: {n} layers, {len(skipped)} skipped)"
            )
        # The notebook reserves layers num_kv_comp_layers - 2 and - 1 (18 and 19 in E4B); they are the
        # donors, the last layer of each type before the KV-shared ones. Computed here for any config.
        donors = sorted({source.kv_source(i) for i in range(source.first_kv_shared_layer, n)})
        if set(donors) & set(skipped):
            raise Gemma3nError(
                f"{label}: layers {', '.join(map(str, donors))} give their keys/values to the KV-shared layers "
                f"and cannot be skipped (layers_to_skip has {sorted(set(donors) & set(skipped))})"
            )
        for position, (layer, width) in enumerate(zip(kept, spec.ffn_hidden_dims)):
            full = source.intermediate_size[layer]
            if not 0 < width <= full:
                raise Gemma3nError(
                    f"{label}: ffn_hidden_dims[{position}] = {width} (layer {layer}) must be between 1 and "
                    f"the layer's FFN width {full}"
                )
            group = quantization_group(shapes, f"language_model.layers.{layer}.{FFN_COLUMNS}", full)
            if group and width % group:
                raise Gemma3nError(
                    f"{label}: ffn_hidden_dims[{position}] = {width} (layer {layer}) is not a multiple of "
                    f"{group}, the quantization group size of its down_proj (slice the float checkpoint instead)"
                )
        for name, shape in shapes.items():
            axis = 0 if name.startswith(f"{PLE_PROJECTION}.") else 1
            if name.startswith((f"{PLE_TABLE}.", f"{PLE_PROJECTION}.")) and shape[axis] % n:
                raise Gemma3nError(f"{label}: {name} {shape} is not {n} layer blocks of whole quantization groups")
        return cls(spec, source, kept)

    @functools.cached_property
    def new_index(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.kept)}

    def renamed(self, name: str) -> str | None:
        """A tensor's (or module's) name in the slice; None for a skipped layer's."""
        match = LAYER.search(name)
        if match is None:
            return name
        new = self.new_index.get(int(match.group(1)))
        return None if new is None else f"{name[: match.start()]}.layers.{new}.{name[match.end() :]}"

    def layer_blocks(self, size: int) -> np.ndarray:
        """Indices of the kept layers' blocks along an axis of `size` made of one block per layer."""
        block = size // self.source.num_hidden_layers
        return (np.array(self.kept)[:, None] * block + np.arange(block)).reshape(-1)

    def cut(self, name: str, shape: tuple[int, ...]) -> Cut | None:
        """What a kept tensor keeps (our names, source numbering), or None when it stays whole."""
        module = name.rpartition(".")[0]
        match = LAYER.search(name)
        if match:
            layer, part = int(match.group(1)), module[match.end() :]
            width, full = self.spec.ffn_hidden_dims[self.new_index[layer]], self.source.intermediate_size[layer]
            if width == full or part not in (*FFN_ROWS, FFN_COLUMNS):
                return None
            if part == FFN_COLUMNS:  # packed: shape[1] is full * bits/32 words, or full/group scales
                columns = width * shape[1] // full
                return Cut((shape[0], columns), columns=slice(0, columns))
            return Cut((width, *shape[1:]))
        if len(self.kept) == self.source.num_hidden_layers:
            return None
        if module == PLE_TABLE:
            columns = self.layer_blocks(shape[1])
            return Cut((shape[0], columns.size), columns=columns)
        if module == PLE_PROJECTION:
            rows = self.layer_blocks(shape[0])
            return Cut((rows.size, shape[1]), rows=rows)
        return None

    def apply(self, tensors: dict, cut_with: Callable) -> dict:
        """The slice's tensors by their new names: each kept tensor as is, or `cut_with(name, tensor,
        cut)`; a tensor is anything with a `.shape` (an array, a file location)."""
        sliced = {}
        for name, tensor in tensors.items():
            new = self.renamed(name)
            if new is not None:
                cut = self.cut(name, tuple(tensor.shape))
                sliced[new] = tensor if cut is None else cut_with(name, tensor, cut)
        return sliced

    def sliced_config(self, raw: dict) -> dict:
        """The slice's config.json from the source's (a quantization block's entries renumbered)."""
        config = copy.deepcopy(raw)
        text = config.setdefault("text_config", {}) if config.get("model_type") == "gemma3n" else config
        source, skipped = self.source, self.spec.layers_to_skip
        text.update(
            num_hidden_layers=len(self.kept),
            intermediate_size=list(self.spec.ffn_hidden_dims),
            # The notebook leaves layer_types as they are (Transformers 4.53 then read the first
            # entries; 5 refuses the longer list): the same as the kept layers' own when whole 4+1
            # blocks are skipped, as in the table. The kept layers keep their types here.
            layer_types=[source.layer_types[i] for i in self.kept],
            # The notebook counts skipped layers >= 20, E4B's first KV-shared layer.
            num_kv_shared_layers=source.num_kv_shared_layers - sum(i >= source.first_kv_shared_layer for i in skipped),
            # The notebook writes [0.95] * (10 - skipped layers <= 9) + [0] * the rest: E4B's pattern,
            # rebuilt; the kept layers' own entries are the same there and right for any pattern.
            activation_sparsity_pattern=[source.activation_sparsity_pattern[i] for i in self.kept],
        )
        if config.get("quantization"):
            config["quantization"] = module_entries_renamed(config["quantization"], self.renamed)
        return config


def tensor_shapes(weights: dict, mapped: dict[str, TensorLocation]) -> dict[str, tuple[int, ...]]:
    """Shapes by our name of what the loader read: arrays, and the memory-mapped PLE table's parts."""
    shapes = {name: tuple(value.shape) for name, value in weights.items()}
    shapes.update({f"{PLE_TABLE}.{kind}": location.shape for kind, location in mapped.items()})
    return shapes


def locations_of(model_dir: Path, config: ModelConfig, names: set[str]) -> dict[str, TensorLocation]:
    """Where the tensors `names` (ours) lie in the folder's files."""
    found = {}
    for file in weight_files(model_dir):
        data_start, header = read_header(file)
        found.update({our_name(n, config): locate(file, n, data_start, header) for n in header if our_name(n, config) in names})
    unreadable = sorted(name for name in names if found.get(name) is None)
    if unreadable:
        raise Gemma3nError(f"cannot slice {', '.join(unreadable)}: not a float or packed tensor in {model_dir}")
    return found


def slice_at_load(spec, model_dir: Path, config: ModelConfig, weights: dict, mapped: dict[str, TensorLocation]):
    """(the slice's config, its weights, the PLE table's kept columns per part) from a full folder's
    config and lazily loaded weights: dropped tensors are never read, cut ones are read as cut."""
    slicing = Slicing.check(resolve_spec(spec), config.text, tensor_shapes(weights, mapped))
    cut_names = {name for name, value in weights.items() if slicing.renamed(name) and slicing.cut(name, value.shape)}
    locations = locations_of(model_dir, config, cut_names)
    sliced = slicing.apply(weights, lambda name, value, cut: read_cut(locations[name], cut))
    columns = {kind: slicing.cut(f"{PLE_TABLE}.{kind}", location.shape) for kind, location in mapped.items()}
    columns = {kind: cut.columns for kind, cut in columns.items() if cut is not None}
    return ModelConfig.from_dict(slicing.sliced_config(read_config(model_dir))), sliced, columns
