"""LoRA / QLoRA training against Transformers + PEFT + torch.optim, float32, tiny random checkpoints.

Both sides start from the same random adapter made by PEFT (every matrix random: B too), train on
the same lines, and are compared on the loss and on the adapter weights after the step(s) (one SGD
step's matrices also against the same reference run in float64, the exact step). The
labels on the torch side are built the way Transformers' recipes build them (the prompt's tokens
and the media soft tokens set to -100), from Transformers' own tokenizer and processor.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
import numpy as np
import pytest
import soundfile
import torch
from helpers import relative_error
from PIL import Image
from reference import AUDIO_TOKEN_ID, EOS_ID, IMAGE_TOKEN_ID, float64_throughout, load_reference_model, reference_logits
from test_adapters import ids as prompt_ids, make_adapter, our_logits, quantized_base  # noqa: F401 (fixture)
from test_multimodal import hf_processor, media  # noqa: F401 (fixtures)

from mlx_gemma3n import Gemma3nError, load
from mlx_gemma3n.adapters import LoRALinear
from mlx_gemma3n.tuner import Tokenizer, Trainer, TrainingArgs, load_dataset, new_adapter, resumed_adapter

TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5
# Adam's step lr * m / (sqrt(v) + eps) is close to lr * sign(g) where |g| is tiny, so float32-level
# differences in near-zero gradients move such weights by up to ~lr: the losses carry the check.
ADAM_WEIGHT_TOLERANCE = 2e-2
# Attention (k/v only in the KV-owning layers: the KV-shared ones read their donors'), MLP, the
# per-layer input gate and LAuReL, in the text decoder only.
START_ADAPTER = dict(
    r=4, lora_alpha=8,
    target_modules=r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj|per_layer_input_gate|laurel\.linear_left)",
)
SYSTEM = {"role": "system", "content": "You answer briefly."}
CHAT = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris, on the Seine."}]
TWO_TURNS = [
    {"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "one two three"},
    {"role": "user", "content": "And back?"}, {"role": "assistant", "content": "three two one"},
]
SMALL_SET = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"messages": CHAT},
    {"messages": TWO_TURNS},
    {"prompt": "Translate 'chat' to English:", "completion": "cat"},
]


@pytest.fixture(scope="module")
def start_adapter(tiny_ckpt_a, tmp_path_factory):
    folder = tmp_path_factory.mktemp("start") / "adapter"
    make_adapter(tiny_ckpt_a.path, folder, 11, **START_ADAPTER)
    return folder


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def media_messages(media, kind: str) -> list[dict]:
    image, audio = media
    part = {"type": "image", "image": str(image)} if kind == "image" else {"type": "audio", "audio": str(audio)}
    return [{"role": "user", "content": [part, {"type": "text", "text": "Describe it."}]},
            {"role": "assistant", "content": "A test pattern, nothing more."}]


# ---- the torch side -----------------------------------------------------------------------------


def hf_text_example(tokenizer, record) -> dict:
    """input_ids and labels as Transformers' causal-LM recipes make them."""
    if "text" in record:
        ids = tokenizer(record["text"])["input_ids"] + [EOS_ID]
        return {"input_ids": ids, "labels": list(ids)}
    messages = record.get("messages") or [
        {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}
    ]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = encode(tokenizer.apply_chat_template(messages, tokenize=False))
    labels = [-100] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(encode(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)))
            stop = len(encode(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)))
            labels[start:stop] = ids[start:stop]
    return {"input_ids": ids, "labels": labels}


def hf_media_inputs(hf_processor, messages) -> dict:  # noqa: F811
    def processed(turns, generation_prompt):
        text = hf_processor.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        parts = turns[0]["content"]
        images = [Image.open(p["image"]).convert("RGB") for p in parts if p["type"] == "image"] or None
        audio = [soundfile.read(p["audio"], dtype="float32")[0] for p in parts if p["type"] == "audio"] or None
        return hf_processor(text=text, images=images, audio=audio, return_tensors="pt", add_special_tokens=False)

    inputs = dict(processed(messages, False))
    prompt_length = processed(messages[:1], True)["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_length] = -100
    labels[(labels == IMAGE_TOKEN_ID) | (labels == AUDIO_TOKEN_ID)] = -100
    inputs.pop("token_type_ids", None)
    return {**inputs, "labels": labels}


def padded(examples: list[dict]) -> dict:
    length = max(len(e["input_ids"]) for e in examples)
    ids = [e["input_ids"] + [0] * (length - len(e["input_ids"])) for e in examples]
    labels = [e["labels"] + [-100] * (length - len(e["labels"])) for e in examples]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def torch_training(base_path, adapter, batch: dict, optimizer: str, lr: float, steps: int, eps: float = 1e-8, exact: bool = False):
    """(per-step losses, adapter tensors under PEFT's names) of Transformers + PEFT + torch.optim, in
    float32, or with `exact` in float64 throughout (`float64_throughout`)."""
    from peft import PeftModel, get_peft_model_state_dict

    dtype = torch.float64 if exact else torch.float32
    with float64_throughout() if exact else contextlib.nullcontext():
        model = PeftModel.from_pretrained(load_reference_model(base_path, dtype), str(adapter), is_trainable=True).to(dtype)
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr, eps=eps)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses, {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}


# ---- our side -----------------------------------------------------------------------------------


def our_training(base_path, adapter, data, out, **args):
    model, processor = load(base_path)
    config = resumed_adapter(model, adapter)
    trainable = [name for name, _ in tree_flatten(model.trainable_parameters())]
    assert trainable and all(name.endswith((".lora_a", ".lora_b")) for name in trainable)
    reports = Trainer(model, config, TrainingArgs(adapter_path=out, save_every=0, **args)).train(data)
    return [r.loss for r in reports], dict(mx.load(str(out / "adapter_model.safetensors")))


def dataset(base_path, path, **options):
    _, processor = load(base_path)
    return load_dataset(path, Tokenizer(processor, **options))


def assert_adapters_equal(ours: dict, theirs: dict, start: dict, exact: dict):
    """The issue's measure: the adapter after the step, and the step itself, each as one tensor, within
    TOLERANCE of torch's float32 run. Matrix by matrix, ours is held to the exact (float64) step instead:
    on this random model a float32 run lands up to ~6e-5 from it on some matrices (torch's own worst:
    6.1e-5, layer 0's q_proj on the audio line), so two float32 runs that are both right can differ by
    more than 1e-4 on one matrix."""
    assert set(ours) == set(theirs) == set(start) == set(exact)
    names = sorted(theirs)
    for name in names:
        assert relative_error(ours[name], exact[name]) <= TOLERANCE, name

    def whole(weights, minus=None):
        return np.concatenate([np.ravel(np.array(weights[n]) - (0.0 if minus is None else np.array(minus[n]))) for n in names])

    assert np.abs(whole(theirs, start)).max() > 1e-3  # the step moved the weights
    assert relative_error(whole(ours), whole(theirs)) <= TOLERANCE
    assert relative_error(whole(ours, start), whole(theirs, start)) <= TOLERANCE


# ---- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "chat", pytest.param("image", marks=pytest.mark.slow), "audio"])
def test_one_sgd_step_equals_peft(tiny_ckpt_a, tiny_tokenizer, hf_processor, media, start_adapter, tmp_path, kind):  # noqa: F811
    record = {"text": "A tiny model learns a tiny sentence."} if kind == "text" else {
        "messages": CHAT if kind == "chat" else media_messages(media, kind)}
    data = dataset(tiny_ckpt_a.path, write_jsonl(tmp_path / "data" / "train.jsonl", [record]))
    theirs = hf_text_example(tiny_tokenizer, record) if kind in ("text", "chat") else hf_media_inputs(hf_processor, record["messages"])
    ids, labels = np.ravel(theirs["input_ids"]).tolist(), np.ravel(theirs["labels"]).tolist()
    assert data.examples[0].ids == ids and data.examples[0].labels == labels
    assert 0 < sum(label != -100 for label in labels) < len(labels) - 1 or kind == "text"
    batch = padded([theirs]) if kind in ("text", "chat") else theirs
    start = dict(mx.load(str(start_adapter / "adapter_model.safetensors")))
    their_losses, their_weights = torch_training(tiny_ckpt_a.path, start_adapter, batch, "sgd", 0.5, 1)
    _, exact_weights = torch_training(tiny_ckpt_a.path, start_adapter, batch, "sgd", 0.5, 1, exact=True)
    our_losses, our_weights = our_training(tiny_ckpt_a.path, start_adapter, data, tmp_path / "out", optimizer="sgd",
                                           learning_rate=0.5, iters=1, batch_size=1, chunk_tokens=5)  # several LM-head chunks
    assert abs(our_losses[0] - their_losses[0]) <= LOSS_TOLERANCE * abs(their_losses[0])
    assert_adapters_equal(our_weights, their_weights, start, exact_weights)


@pytest.fixture(scope="module")
def adam_run(tiny_ckpt_a, tiny_tokenizer, start_adapter, tmp_path_factory):
    """Three Adam updates on SMALL_SET, each over all four lines (2 micro-batches of 2, accumulated)."""
    root = tmp_path_factory.mktemp("adam")
    data = dataset(tiny_ckpt_a.path, write_jsonl(root / "data" / "train.jsonl", SMALL_SET))
    batch = padded([hf_text_example(tiny_tokenizer, r) for r in SMALL_SET])
    theirs = torch_training(tiny_ckpt_a.path, start_adapter, batch, "adam", 1e-2, 3)
    ours = our_training(tiny_ckpt_a.path, start_adapter, data, root / "out", optimizer="adam", learning_rate=1e-2,
                        iters=3, batch_size=2, grad_accumulation=2, grad_checkpoint=True)
    return ours, theirs, root / "out"


def test_three_adam_steps_equal_torch(adam_run, start_adapter):
    (our_losses, our_weights), (their_losses, their_weights), _ = adam_run
    assert relative_error(our_losses, their_losses) <= TOLERANCE
    assert their_losses[2] < their_losses[0] - 0.5
    assert set(our_weights) == set(their_weights)
    for name, weight in their_weights.items():
        assert relative_error(our_weights[name], weight) <= ADAM_WEIGHT_TOLERANCE, name


def test_trained_adapter_gives_peft_logits(tiny_ckpt_a, adam_run):
    from peft import PeftModel

    out = adam_run[2]
    peft_model = PeftModel.from_pretrained(load_reference_model(tiny_ckpt_a.path), str(out)).eval().get_base_model()
    model, _ = load(tiny_ckpt_a.path, adapter_path=out)
    expected = reference_logits(peft_model, [[2, 17, 93, 301, 45, 8, 250, 77, 12]])
    assert relative_error(np.array(model(mx.array([[2, 17, 93, 301, 45, 8, 250, 77, 12]]))), expected) <= TOLERANCE
    assert relative_error(reference_logits(tiny_ckpt_a.model, [[2, 17, 93, 301, 45, 8, 250, 77, 12]]), expected) > 1e-3


def test_resume_continues_with_the_optimizer_state(tiny_ckpt_a, start_adapter, tmp_path):
    data = dataset(tiny_ckpt_a.path, write_jsonl(tmp_path / "data" / "train.jsonl", SMALL_SET))
    args = dict(optimizer="adamw", learning_rate=1e-2, batch_size=1, lr_schedule="cosine", warmup=1, iters=4)
    straight, straight_weights = our_training(tiny_ckpt_a.path, start_adapter, data, tmp_path / "straight", **args)

    model, _ = load(tiny_ckpt_a.path)
    first = Trainer(model, resumed_adapter(model, start_adapter), TrainingArgs(adapter_path=tmp_path / "resumed", save_every=2, **args))
    first.args.iters = 2
    first.train(data)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-0000002"
    model, _ = load(tiny_ckpt_a.path)
    second = Trainer(model, resumed_adapter(model, checkpoint), TrainingArgs(adapter_path=tmp_path / "resumed", save_every=2, **args))
    second.resume(checkpoint)
    reports = second.train(data)
    assert [r.step for r in reports] == [3, 4]
    assert relative_error([r.loss for r in reports], straight[2:]) <= 1e-6
    resumed_weights = mx.load(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    for name, weight in straight_weights.items():
        assert relative_error(resumed_weights[name], weight) <= 1e-6, name


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_ckpt_a, start_adapter, tmp_path):
    data = dataset(tiny_ckpt_a.path, write_jsonl(tmp_path / "data" / "train.jsonl", SMALL_SET))
    model, _ = load(tiny_ckpt_a.path)
    trainer = Trainer(model, resumed_adapter(model, start_adapter), TrainingArgs(adapter_path=tmp_path / "out", iters=1, save_every=1, batch_size=1))
    trainer.train(data)
    saved = dict(mx.load(str(tmp_path / "out" / "adapter_model.safetensors")))
    layer = model.language_model.layers[0].self_attn.q_proj
    layer.lora_b = mx.full(layer.lora_b.shape, float("inf"))
    trainer.args.iters = 2
    with pytest.raises(Gemma3nError, match=r"step 2: non-finite .*step-0000001") as error:
        trainer.train(data)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-0000001"]
    after = mx.load(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert all(mx.array_equal(after[k], v) for k, v in saved.items())


def test_qlora_trains_while_packed(tiny_ckpt_a, quantized_base, tmp_path):  # noqa: F811
    data = dataset(quantized_base, write_jsonl(tmp_path / "data" / "train.jsonl", SMALL_SET))
    model, _ = load(quantized_base)
    q_proj = model.language_model.layers[0].self_attn.q_proj
    packed = {k: mx.array(v) for k, v in q_proj.parameters().items()}
    config = new_adapter(model, rank=4, alpha=8, seed=3)
    wrapped = model.language_model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, LoRALinear) and isinstance(wrapped.base, nn.QuantizedLinear)
    reports = Trainer(model, config, TrainingArgs(adapter_path=tmp_path / "out", iters=6, batch_size=4, learning_rate=2e-2,
                                                  grad_checkpoint=True, save_every=0)).train(data)
    assert reports[-1].loss < reports[0].loss - 0.1, [r.loss for r in reports]
    assert all(mx.array_equal(wrapped.base[k], v) for k, v in packed.items())
    assert isinstance(wrapped.base, nn.QuantizedLinear)
    trained, _ = load(quantized_base, adapter_path=tmp_path / "out")
    assert relative_error(our_logits(trained), our_logits(load(quantized_base)[0])) > 1e-3


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_gemma3n.lora", *map(str, args)], capture_output=True, text=True, timeout=600)


EXAMPLE_DATA = Path(__file__).resolve().parent.parent / "examples" / "lora_data"


def test_cli_writes_a_peft_adapter(tiny_ckpt_a, tmp_path):
    from peft import PeftModel

    data = EXAMPLE_DATA  # the README's example: train, valid and test lines of every format
    (tmp_path / "config.yaml").write_text("lora_rank: 2\nlora_alpha: 4\ntarget_modules: [q_proj, v_proj]\nlearning_rate: 0.01\n")
    result = run_cli("-c", tmp_path / "config.yaml", "--model", tiny_ckpt_a.path, "--train", "--test", "--data", data,
                     "--adapter-path", tmp_path / "out", "--iters", 3, "--batch-size", 2, "--steps-per-eval", 2, "--seed", 1)
    assert result.returncode == 0, result.stderr
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and "validation loss" in result.stdout and "test loss" in result.stdout
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4
    names = set(mx.load(str(tmp_path / "out" / "adapter_model.safetensors")))
    assert "base_model.model.model.language_model.layers.7.self_attn.q_proj.lora_A.weight" in names
    assert not any("k_proj" in n or "audio_tower" in n for n in names)
    peft_model = PeftModel.from_pretrained(load_reference_model(tiny_ckpt_a.path), str(tmp_path / "out")).eval().get_base_model()
    model, _ = load(tiny_ckpt_a.path, adapter_path=tmp_path / "out")
    assert relative_error(our_logits(model), reference_logits(peft_model, prompt_ids())) <= TOLERANCE


BAD_LINES = ['{"text": "fine"}', "", "{not json", '{"messages": []}', '{"prompt": "p"}', '{"foo": 1}', '[1, 2]']


def test_bad_lines_are_rejected_with_their_numbers_before_training(tiny_ckpt_a, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(BAD_LINES) + "\n")
    result = run_cli("--model", tiny_ckpt_a.path, "--train", "--data", data, "--adapter-path", tmp_path / "out", "--iters", 1)
    assert result.returncode == 1
    error = result.stderr.strip()
    assert error.startswith("error:") and len(error.splitlines()) == 1
    for number in range(2, 8):
        assert f"line {number}:" in error, number
    assert "line 1:" not in error and not (tmp_path / "out").exists()


def test_written_adapter_with_tower_layers_loads_in_peft(tiny_ckpt_a, tmp_path):
    """Opt-in tower targets: the written config selects exactly the adapted layers under PEFT's
    rules (the text decoder's q_proj and the audio tower's, not the towers by default)."""
    from peft import PeftModel

    from mlx_gemma3n.adapters.writer import adapter_tensors, write_adapter

    default, _ = load(tiny_ckpt_a.path)
    new_adapter(default, targets=["q_proj"])
    assert adapter_tensors(default) and not any("tower" in n for n in adapter_tensors(default))
    model, _ = load(tiny_ckpt_a.path)
    config = new_adapter(model, rank=2, alpha=4, targets=["q_proj", "post"], towers=True)
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(5)) * 0.05
    write_adapter(tmp_path / "adapter", config, adapter_tensors(model))
    names = set(mx.load(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert any("audio_tower" in n and "q_proj" in n for n in names) and any("language_model" in n for n in names)
    peft_model = PeftModel.from_pretrained(load_reference_model(tiny_ckpt_a.path), str(tmp_path / "adapter")).eval().get_base_model()
    peft_names = {"base_model.model." + n.replace(".default.", ".") for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert peft_names == names
    ours, _ = load(tiny_ckpt_a.path, adapter_path=tmp_path / "adapter")
    assert relative_error(our_logits(ours), reference_logits(peft_model, prompt_ids())) <= TOLERANCE

