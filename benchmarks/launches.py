"""`python -m benchmarks.launches`: the primitives in the graph of one decoded token, by kind, as a GPU
would run it: ours, mlx-lm and mlx-vlm on the real E2B and E4B shapes, bf16 and int4 (affine, 4 bits,
group size 64, each runtime's own choice of quantized modules). CPU-runnable, no files needed.

    python -m benchmarks.launches [--shapes e2b,e4b] [--dtypes bf16,int4] [--only ours,mlx-lm,mlx-vlm]

Method. Each runtime builds its model in memory with every parameter an evaluated zero-stride view of
one zero (real shapes, no memory), in its GPU layout (ours: no `loader.adapt_to_cpu`; its projections
stacked and the PLE table memory-mapped as `load` does, the table from a sparse file). A 1-token prompt fills its cache, then one decode
step is built lazily exactly as its generation loop builds it (model call, last position, greedy pick;
mlx-lm and mlx-vlm also normalise to log-probabilities) and written with `mx.export_to_dot`; the
primitive nodes of that graph are counted (inputs and constants are not nodes). MLX's CPU backend
spells every `mx.fast` kernel out as its fallback graph, which a GPU runs as one kernel, so here each
`mx.fast` call is replaced by one marker node (a `Depends` on the call's inputs) that counts once, as
`fast.<name>`; a compiled region (`mx.compile`) already is one `Compiled...` node.

"kernels" leaves out the primitives a GPU runs as views, without a launch (`VIEWS`); a `Reshape` of a
non-contiguous array does launch a copy there, so "kernels" is a lower bound and "primitives" an upper.
Each case runs in its own process; every count by kind goes to benchmarks/results/launches.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from .checkpoints import hf_config
from .runtimes import REPO, environment

RUNTIMES = ("ours", "mlx-lm", "mlx-vlm")
# Metadata-only primitives: a GPU evaluates them as views of their input, launching nothing.
VIEWS = {"Broadcast", "BroadcastAxes", "Reshape", "Transpose", "Slice", "ExpandDims", "Squeeze", "AsStrided",
         "StopGradient", "Split", "Flatten", "Unflatten", "Depends"}
# mx.fast kernel -> the primitive of the unary op (mx.<lower case>) marking its stand-in; no model uses them
MARKERS = {"rms_norm": "ErfInv", "layer_norm": "ArcSinh", "rope": "ArcTanh", "scaled_dot_product_attention": "ArcCosh"}
MARKER_OPS = {primitive: kernel for kernel, primitive in MARKERS.items()}
GROUP_SIZE, BITS = 64, 4
PROMPT = [2]


@contextmanager
def fast_kernels_marked():
    """Within it, each mx.fast kernel is its own call (for the output's shape and dtype; that graph is
    left unreachable) plus one marker node depending on the call's array arguments."""
    originals = {name: getattr(mx.fast, name) for name in MARKERS}
    for name, real in originals.items():

        def stand_in(*args, _real=real, _marker=getattr(mx, MARKERS[name].lower()), **kwargs):
            out = _real(*args, **kwargs)
            arrays = [a for a in (*args, *kwargs.values()) if isinstance(a, mx.array)]
            return mx.depends([_marker(mx.zeros(out.shape, out.dtype))], arrays)[0]

        setattr(mx.fast, name, stand_in)
    try:
        yield
    finally:
        for name, real in originals.items():
            setattr(mx.fast, name, real)


def weightless(module) -> None:
    """Every parameter becomes an evaluated zero-stride view of a single zero: real shapes, ~no memory."""
    from mlx.utils import tree_map

    module.update(tree_map(lambda p: mx.broadcast_to(mx.zeros((), p.dtype), p.shape), module.parameters()))
    mx.eval(module.parameters())


# --- the three runtimes: build (GPU layout), cache, one decode step -------------------------------------


def sparse_table(model, folder: Path) -> dict:
    """Locations of the PLE table's parts in one sparse file of zeros (no disk used), as `read_weights`
    would find them in a checkpoint."""
    from mlx_gemma3n.weights.mapped import TensorLocation

    dtypes = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32", mx.uint8: "U8"}
    table = model.language_model.embed_tokens_per_layer
    path, offset, parts = folder / "ple.bin", 0, {}
    for kind, value in table.parameters().items():
        parts[kind] = TensorLocation(path, dtypes[value.dtype], tuple(value.shape), offset)
        offset += value.nbytes
    with open(path, "wb") as f:
        f.truncate(offset)
    return parts


def build_ours(config: dict, int4: bool, folder: Path):
    from mlx_gemma3n.architecture.config import ModelConfig
    from mlx_gemma3n.architecture.model import Model
    from mlx_gemma3n.architecture.stacking import stack_projections
    from mlx_gemma3n.decoding.sampling import SamplingParams, sample
    from mlx_gemma3n.weights.loader import map_table
    from mlx_gemma3n.weights.quantization import config_block, quantization_plan, quantize_like_checkpoint

    model = Model(ModelConfig.from_dict(config), towers=())
    if int4:
        plan, left_float = quantization_plan(model, "uniform4", GROUP_SIZE)
        block = config_block(plan, left_float, "uniform4", {"bits": BITS, "group_size": GROUP_SIZE})
        quantize_like_checkpoint(model, block, {f"{path}.scales" for path in plan})
    parts = sparse_table(model, folder)
    map_table(model, parts, None)
    stack_projections(model)  # as `load` does
    weightless(model)
    for layer in model.language_model.layers:
        for stacked in layer.stacked.modules:
            weightless(stacked)
    model.eval()
    cache = model.make_cache()
    greedy = SamplingParams(temperature=0.0)

    def step(token):
        return sample(model(mx.array([[token]]), cache=cache)[:, -1], greedy)

    mx.eval(model(mx.array([PROMPT]), cache=cache, last_token_only=True), [c.state for c in cache])
    return step


def build_mlx_lm(config: dict, int4: bool, folder: Path):
    from mlx_lm.models.gemma3n import Model, ModelArgs
    from mlx_lm.utils import quantize_model

    model = Model(ModelArgs.from_dict(config))
    if int4:
        quantize_model(model, config, GROUP_SIZE, BITS)
    weightless(model)
    model.eval()
    cache = model.make_cache()

    def step(token):  # mlx_lm.generate.generate_step's _step, greedy sampler
        logits = model(mx.array([[token]]), cache=cache)[:, -1, :]
        return mx.argmax(logits - mx.logsumexp(logits, keepdims=True), axis=-1)

    model(mx.array([PROMPT]), cache=cache)
    mx.eval([c.state for c in cache])
    return step


def build_mlx_vlm(config: dict, int4: bool, folder: Path):
    from mlx_vlm.models import gemma3n
    from mlx_vlm.quant_utils import quantize_model
    from mlx_vlm.utils import update_module_configs

    model_config = update_module_configs(gemma3n.ModelConfig.from_dict(config), gemma3n, config,
                                         ["text", "vision", "audio"])
    model = gemma3n.Model(model_config)
    if int4:
        quantize_model(model, config, GROUP_SIZE, BITS)
    weightless(model)
    model.eval()
    cache = model.language_model.make_cache()

    def step(token):  # mlx_vlm.generate.ar.generate_step's _step, greedy sampler
        logits = model.language_model(mx.array([[token]]), cache=cache, logits_to_keep=1).logits[:, -1, :]
        return mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)

    model.language_model(mx.array([PROMPT]), cache=cache)
    mx.eval([c.state for c in cache])
    return step


BUILDERS = {"ours": build_ours, "mlx-lm": build_mlx_lm, "mlx-vlm": build_mlx_vlm}


# --- counting -----------------------------------------------------------------------------------------

NODE = re.compile(r'\{ (\d+) \[label ="([^"]+)"')
EDGE_IN = re.compile(r'^"([^"]+)" -> (\d+)$')
EDGE_OUT = re.compile(r'^(\d+) -> "([^"]+)"$')


def count_primitives(dot: str) -> Counter:
    """Primitive nodes of an `mx.export_to_dot` graph by kind; each marked mx.fast call (a `Depends` on
    a marker op of a constant) counts once as `fast.<name>`, its marker chain not at all."""
    labels, inputs, producer = {}, {}, {}
    for line in dot.splitlines():
        line = line.strip()
        if node := NODE.search(line):
            labels[node.group(1)] = node.group(2)
        elif edge := EDGE_IN.match(line):
            inputs.setdefault(edge.group(2), []).append(edge.group(1))
        elif edge := EDGE_OUT.match(line):
            producer[edge.group(2)] = edge.group(1)
    dropped, fast = set(), {}
    for node, label in labels.items():
        if label != "Depends":
            continue
        marker = producer.get(inputs[node][0])
        if marker is None or labels[marker] not in MARKER_OPS:
            continue
        fast[node] = f"fast.{MARKER_OPS[labels[marker]]}"
        chain = [marker]
        while chain:  # the marker and the constant it is computed from
            current = chain.pop()
            dropped.add(current)
            chain += [producer[a] for a in inputs.get(current, []) if a in producer]
    counts = Counter()
    for node, label in labels.items():
        if node not in dropped:
            counts[fast.get(node, "Compiled" if label.startswith("Compiled") else label)] += 1
    return counts


def graph_counts(*outputs: mx.array) -> Counter:
    with tempfile.TemporaryDirectory() as tmp:
        dot = Path(tmp) / "graph.dot"
        mx.export_to_dot(str(dot), *outputs)
        return count_primitives(dot.read_text())


def measure_one(runtime: str, shape: str, dtype: str) -> dict:
    with fast_kernels_marked(), tempfile.TemporaryDirectory() as tmp:
        step = BUILDERS[runtime](hf_config(shape), dtype == "int4", Path(tmp))
        counts = graph_counts(step(PROMPT[-1]))
    kernels = sum(n for kind, n in counts.items() if kind not in VIEWS)
    return dict(runtime=runtime, shape=shape, dtype=dtype, primitives=sum(counts.values()), kernels=kernels,
                by_kind=dict(counts.most_common()))


def run_case(runtime: str, shape: str, dtype: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.launches", "--case", f"{runtime},{shape},{dtype}"]
    done = subprocess.run(command, env=environment(), cwd=REPO, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return dict(runtime=runtime, shape=shape, dtype=dtype, error=tail)


def table(results: list[dict]) -> list[str]:
    """One row per (shape, dtype, runtime): totals, ratio to mlx-lm, the largest kinds."""
    lines = ["| shape | dtype | runtime | kernels | primitives | kernels / mlx-lm's | largest kinds (count) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    peer = {(r["shape"], r["dtype"]): r["kernels"] for r in results if r["runtime"] == "mlx-lm" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['runtime']} | - | - | - | failed: `{r['error']}` |")
            continue
        ratio = peer.get((r["shape"], r["dtype"]))
        kinds = ", ".join(f"{k} {n}" for k, n in list(r["by_kind"].items())[:8])
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['runtime']} | {r['kernels']} | {r['primitives']} | "
                     f"{r['kernels'] / ratio:.2f} | {kinds} |" if ratio else
                     f"| {r['shape']} | {r['dtype']} | {r['runtime']} | {r['kernels']} | {r['primitives']} | - | {kinds} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.launches", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="e2b,e4b", help="comma-separated subset of tiny,small,e2b,e4b")
    parser.add_argument("--dtypes", default="bf16,int4")
    parser.add_argument("--only", default=",".join(RUNTIMES))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for launches.json (every count by kind)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # runtime,shape,dtype: one case, in this process
    args = parser.parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(measure_one(*args.case.split(","))), flush=True)
        return
    results = []
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            for runtime in args.only.split(","):
                results.append(run_case(runtime, shape, dtype))
                print(f"[launches] {shape} {dtype} {runtime}: "
                      f"{results[-1].get('kernels', results[-1].get('error'))}", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "launches.json").write_text(json.dumps(results, indent=2))
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
