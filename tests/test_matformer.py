"""MatFormer slices (mlx_gemma3n/matformer.py) of a tiny E4B-like checkpoint (TINY_TEXT_E4B_LIKE).

The reference is Transformers' model of the slice: its config and weights made here, in torch, by
the MatFormer Lab notebook's rules (google-gemini/gemma-cookbook, [Gemma_3n]MatFormer_Lab.ipynb),
with the kept layers' own layer types and sparsity entries. Load-time slicing must equal
conversion-time slicing bit for bit, float and int4; the published E2B row cut from E4B's shape must
give E2B's config and shapes (tests/data/gemma-3n-E2B-it/config.json).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import prompt_ids, relative_error
from mlx.utils import tree_flatten
from reference import TINY_TEXT_E4B_LIKE, build_checkpoint, reference_greedy, reference_logits
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

from mlx_gemma3n import Gemma3nError, load
from mlx_gemma3n.architecture.config import ModelConfig, TextConfig
from mlx_gemma3n.architecture.model import Model
from mlx_gemma3n.convert import convert
from mlx_gemma3n.decoding.sampling import SamplingParams
from mlx_gemma3n.generate import Session
from mlx_gemma3n.weights.loader import load_model
from mlx_gemma3n.weights.mapped import MappedEmbedding, locate, read_header
from mlx_gemma3n.weights.matformer import Cut, Slicing, read_cut, resolve_spec, table
from mlx_gemma3n.weights.quantization import quantization_plan

E2B_CONFIG = Path(__file__).parent / "data" / "gemma-3n-E2B-it" / "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
WIDTHS = TINY_TEXT_E4B_LIKE["intermediate_size"]
# Layers 3 and 4 give their K/V to the KV-shared layers 5-14.
SLICES = {
    # E2B's recipe: the first KV-shared block skipped, every FFN halved.
    "e2b_like": {"layers_to_skip": [5, 6, 7, 8, 9], "ffn_hidden_dims": [w // 2 for w in WIDTHS[:5] + WIDTHS[10:]]},
    # A sparse layer, a full and a sliding KV-shared layer; widths cut or kept (multiples of 32, the
    # int4 group size below).
    "mixed": {"layers_to_skip": [1, 9, 12], "ffn_hidden_dims": [96, 160, 128, 224, 64, 128, 192, 160, 96, 160, 64, 224]},
}


@pytest.fixture(scope="module")
def e4b_like(tmp_path_factory):
    path = tmp_path_factory.mktemp("e4b_like")
    return path, build_checkpoint(path, text=TINY_TEXT_E4B_LIKE, seed=4, multimodal=False)


@pytest.fixture(scope="module")
def spec_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("specs")
    for name, spec in SLICES.items():
        (folder / f"{name}.json").write_text(json.dumps(spec))
    return {name: folder / f"{name}.json" for name in SLICES}


def notebook_slice(model: Gemma3nForCausalLM, spec: dict) -> Gemma3nForCausalLM:
    """Transformers' model of a slice: config and weights cut by the MatFormer Lab's rules, in torch."""
    config, skipped, widths = model.config, spec["layers_to_skip"], spec["ffn_hidden_dims"]
    n = config.num_hidden_layers
    kept = [i for i in range(n) if i not in skipped]
    first_shared = n - config.num_kv_shared_layers
    sliced_config = Gemma3nTextConfig(**dict(
        TINY_TEXT_E4B_LIKE,
        num_hidden_layers=len(kept),
        intermediate_size=widths,
        layer_types=[config.layer_types[i] for i in kept],
        num_kv_shared_layers=config.num_kv_shared_layers - sum(i >= first_shared for i in skipped),
        activation_sparsity_pattern=[config.activation_sparsity_pattern[i] for i in kept],
    ))
    state = {}
    for name, tensor in model.state_dict().items():
        match = re.search(r"\.layers\.(\d+)\.", name)
        if match:
            old = int(match.group(1))
            if old in skipped:
                continue
            new = kept.index(old)
            name = name.replace(f".layers.{old}.", f".layers.{new}.")
            if "mlp.gate_proj" in name or "mlp.up_proj" in name:
                tensor = tensor[: widths[new], :]
            elif "mlp.down_proj" in name:
                tensor = tensor[:, : widths[new]]
        elif "per_layer_model_projection" in name:
            tensor = tensor.reshape(n, -1, tensor.shape[1])[kept].reshape(-1, tensor.shape[1])
        elif "embed_tokens_per_layer" in name:
            tensor = tensor.reshape(tensor.shape[0], n, -1)[:, kept].reshape(tensor.shape[0], -1)
        state[name] = tensor.contiguous()
    sliced = Gemma3nForCausalLM(sliced_config)
    sliced.load_state_dict(state, strict=True)
    return sliced.eval()


@pytest.fixture(scope="module", params=list(SLICES))
def reference_slice(request, e4b_like, spec_files, tmp_path_factory):
    """(slice name, its spec file, Transformers' sliced model, the folder Transformers saved it to)."""
    path, model = e4b_like
    sliced = notebook_slice(model, SLICES[request.param])
    folder = tmp_path_factory.mktemp(f"hf_{request.param}")
    sliced.save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        shutil.copy(path / name, folder / name)
    return request.param, spec_files[request.param], sliced, folder


def greedy(model, processor, ids, max_tokens: int) -> list[int]:
    processor.eos_token_ids = set()
    model.config.eos_token_ids = []
    session = Session(model, processor)
    return [r.token for r in session.stream(list(map(int, ids[0])), SamplingParams(temperature=0.0), max_tokens, 16)]


def test_slice_equals_transformers(e4b_like, reference_slice):
    """A slice cut from the E4B-like folder as it loads equals Transformers' model of the slice."""
    _, spec, reference, _ = reference_slice
    model, processor = load(e4b_like[0], matformer=spec)
    ids = prompt_ids(5, 40)
    assert relative_error(model(mx.array(ids)), reference_logits(reference, ids)) <= 1e-4
    expected = reference_greedy(reference, ids, 32, stop_at_eos=False)
    assert greedy(model, processor, ids, 32) == expected
    assert len(set(expected)) > 6, "degenerate reference generation: the test would prove little"


def weights_of(model) -> dict[str, mx.array]:
    """Every parameter, and the rows of the (memory-mapped) PLE table."""
    weights = dict(tree_flatten(model.parameters()))
    weights["embed_tokens_per_layer rows"] = model.language_model.embed_tokens_per_layer(
        mx.arange(model.config.text.vocab_size_per_layer_input)
    )
    return weights


def assert_identical(ours, theirs) -> None:
    assert asdict(ours.config.text) == asdict(theirs.config.text)
    a, b = weights_of(ours), weights_of(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert mx.array_equal(a[name], b[name]).item(), name


def test_slice_written_by_transformers_loads_as_is(e4b_like, reference_slice):
    """The folder Transformers saves for a slice (per-layer intermediate_size list) loads, and is
    bit for bit the slice cut at load time from the full folder."""
    _, spec, _, folder = reference_slice
    raw = json.loads((folder / "config.json").read_text())
    assert isinstance(raw["intermediate_size"], list) and len(raw["intermediate_size"]) == raw["num_hidden_layers"]
    sliced = load_model(e4b_like[0], matformer=spec)
    assert isinstance(sliced.language_model.embed_tokens_per_layer, MappedEmbedding)  # still mapped, from E4B's file
    assert_identical(sliced, load_model(folder))


@pytest.mark.parametrize("name", list(SLICES))
def test_load_time_slice_equals_converted_slice(e4b_like, spec_files, tmp_path, name):
    out = convert(str(e4b_like[0]), tmp_path / "sliced", dtype="float32", matformer=spec_files[name])
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 15 - len(SLICES[name]["layers_to_skip"])
    assert_identical(load_model(e4b_like[0], matformer=spec_files[name]), load_model(out))


def test_int4_base_sliced_at_load_equals_converted(e4b_like, spec_files, tmp_path):
    """int4 E4B-like: sliced as it loads = converted sliced from it = sliced, then quantized (groups
    are cut whole, so cutting and quantizing commute)."""
    spec = spec_files["mixed"]
    base = convert(str(e4b_like[0]), tmp_path / "q4", quantize=True, q_group_size=32)
    at_load = load_model(base, matformer=spec)
    assert isinstance(at_load.language_model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert at_load.language_model.embed_tokens_per_layer.bits == 4
    assert_identical(at_load, load_model(convert(str(base), tmp_path / "from_q4", matformer=spec)))
    then_quantized = convert(str(e4b_like[0]), tmp_path / "then_q4", matformer=spec, quantize=True, q_group_size=32)
    assert_identical(at_load, load_model(then_quantized))
    with pytest.raises(Gemma3nError, match=r"ffn_hidden_dims\[2\] = 80 \(layer 2\) is not a multiple of 32"):
        load_model(base, matformer=spec_files["e2b_like"])


def e4b_raw_config() -> dict:
    return dict(Gemma3nTextConfig().to_dict(), model_type="gemma3n_text")


def parameter_shapes(config: ModelConfig, quantized: bool) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a model's parameters (lazy: nothing of real size is computed)."""
    model = Model(config)
    if quantized:
        plan, _ = quantization_plan(model, "uniform4", 64)  # what convert -q quantizes
        nn.quantize(model, 64, 4, class_predicate=lambda path, _: path in plan)
    return {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}


@pytest.mark.parametrize("quantized", [False, True])
def test_official_e2b_row_cuts_e4b_into_e2b(quantized):
    """The table's official-E2B row on E4B (Transformers' Gemma3nTextConfig defaults) gives E2B's
    config values and every parameter's name and shape, float and int4."""
    e4b = ModelConfig.from_dict(e4b_raw_config())
    shapes = parameter_shapes(e4b, quantized)
    slicing = Slicing.check(resolve_spec("Config for official E2B Model"), e4b.text, shapes)
    sliced = slicing.sliced_config(e4b_raw_config())
    e2b = dict(json.loads(E2B_CONFIG.read_text())["text_config"], model_type="gemma3n_text")
    for key in ("num_hidden_layers", "intermediate_size", "layer_types", "num_kv_shared_layers", "activation_sparsity_pattern"):
        assert sliced[key] == e2b[key], key
    assert asdict(ModelConfig.from_dict(sliced).text) == asdict(ModelConfig.from_dict(e2b).text)
    cut = {slicing.renamed(n): (c.shape if (c := slicing.cut(n, s)) else s) for n, s in shapes.items() if slicing.renamed(n)}
    assert cut == parameter_shapes(ModelConfig.from_dict(e2b), quantized)


def test_published_table():
    rows = table()
    assert len(rows) == 16 and len({row.name for row in rows}) == 16
    main, e2b = rows[0], resolve_spec("official e2b model")
    assert (main.name, main.ffn_hidden_dims, main.layers_to_skip) == ("Main model", (16384,) * 35, ())
    assert (e2b.ffn_hidden_dims, e2b.layers_to_skip, e2b.effective_params, e2b.mmlu) == (
        (8192,) * 30, (20, 21, 22, 23, 24), 1.91, "50.90%"
    )
    for row in rows:
        assert len(row.ffn_hidden_dims) + len(row.layers_to_skip) == 35, row.name
        Slicing.check(row, TextConfig(), {})


E4B_DOWN_SCALES = {"language_model.layers.0.mlp.down_proj.scales": (2048, 16384 // 64)}


@pytest.mark.parametrize("spec, shapes, message", [
    ({"ffn_hidden_dims": [8192] * 34}, {}, r"ffn_hidden_dims has 34 widths, expected 35 \(one per kept layer: 35 layers, 0 skipped\)"),
    ({"ffn_hidden_dims": [8192] * 34 + [20000]}, {}, r"ffn_hidden_dims\[34\] = 20000 \(layer 34\) must be between 1 and the layer's FFN width 16384"),
    ({"ffn_hidden_dims": [8192] * 34, "layers_to_skip": [19]}, {}, r"layers 18, 19 give their keys/values .* cannot be skipped \(layers_to_skip has \[19\]\)"),
    ({"ffn_hidden_dims": [8192] * 34, "layers_to_skip": [35]}, {}, r"layers_to_skip \[35\] outside the model's layers 0-34"),
    ({"ffn_hidden_dims": [8192] * 33, "layers_to_skip": [20, 20]}, {}, r"layers_to_skip lists a layer twice"),
    ({"ffn_hidden_dims": [8200] + [8192] * 34}, E4B_DOWN_SCALES, r"ffn_hidden_dims\[0\] = 8200 \(layer 0\) is not a multiple of 64"),
    ({"ffn_hidden_dims": [8192.0] * 35}, {}, r"ffn_hidden_dims must be a list of integers"),
    ({"ffn_hidden_dims": [8192] * 35, "layer_to_skip": []}, {}, r"unknown keys \['layer_to_skip'\]"),
])
def test_invalid_specs_are_one_line_errors(tmp_path, spec, shapes, message):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(Gemma3nError, match=message) as error:
        Slicing.check(resolve_spec(str(path)), TextConfig(), shapes)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("spec, message", [
    ("E9B", r"unknown MatFormer slice 'E9B': not a name from `python -m mlx_gemma3n.matformer --list`"),
    ("{bad json", None),
])
def test_unknown_names_and_bad_files_are_one_line_errors(tmp_path, spec, message):
    if message is None:
        path = tmp_path / "bad.json"
        path.write_text(spec)
        spec, message = str(path), r"bad.json is not a readable JSON file"
    with pytest.raises(Gemma3nError, match=message) as error:
        resolve_spec(spec)
    assert "\n" not in str(error.value)


def test_cut_reads_only_what_it_keeps(tmp_path):
    """read_cut maps the file and copies the kept values only; a lazily loaded tensor, sliced, is
    read whole (the measure can tell them apart)."""
    path = tmp_path / "big.safetensors"
    mx.save_safetensors(str(path), {"w": mx.random.normal((2048, 4096), key=mx.random.key(0))})  # 32 MB
    location = locate(path, "w", *read_header(path))
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    kept = read_cut(location, Cut((2048, 64), columns=slice(0, 64)))
    mx.eval(kept)
    assert mx.get_peak_memory() - before < 2 * kept.nbytes
    lazily = mx.load(str(path))["w"][:, :64]
    mx.eval(lazily)
    assert mx.get_peak_memory() - before > 32 * 2**20
    assert mx.array_equal(kept, lazily).item()


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_command_lines(e4b_like, spec_files, tmp_path):
    listed = run("mlx_gemma3n.matformer", "--list")
    assert listed.returncode == 0 and all(row.name in listed.stdout for row in table())
    path = str(e4b_like[0])
    converted = run("mlx_gemma3n.convert", "--hf-path", path, "--mlx-path", str(tmp_path / "out"), "--matformer", str(spec_files["mixed"]))
    assert converted.returncode == 0, converted.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 12
    generated = run("mlx_gemma3n.generate", "--model", path, "--matformer", str(spec_files["mixed"]), "--prompt", "hi", "-m", "3")
    assert generated.returncode == 0, generated.stderr
    failed = run("mlx_gemma3n.generate", "--model", path, "--matformer", "E9B", "--prompt", "hi")
    assert failed.returncode == 1 and failed.stderr.strip().splitlines() == [
        "error: unknown MatFormer slice 'E9B': not a name from `python -m mlx_gemma3n.matformer --list` nor a JSON file"
    ]
