"""`python -m mlx_gemma3n.lora`: LoRA / QLoRA fine-tuning of Gemma 3n, written as a PEFT adapter.

    python -m mlx_gemma3n.lora --model google/gemma-3n-E2B-it --train --data DATA_DIR --iters 600

DATA_DIR holds train.jsonl (and optionally valid.jsonl, test.jsonl): lines of {"messages": [...]},
{"prompt": ..., "completion": ...} or {"text": ...}. The adapter (adapter_config.json +
adapter_model.safetensors) goes to --adapter-path, which PEFT's `PeftModel.from_pretrained` and our
`load(..., adapter_path=...)` read; checkpoints with the optimizer state go to its checkpoints/
folder. A quantized model folder (`python -m mlx_gemma3n.convert -q`) trains as QLoRA. `-c
config.yaml` takes the same keys as the flags (with underscores); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .command import command_parser
from .errors import Gemma3nError, run_command
from .tuner.adapter import DEFAULT_TARGETS
from .tuner.optimizers import OPTIMIZERS, SCHEDULES
from .tuner.trainer import TrainingArgs



def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("mlx_gemma3n.lora", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("-c", "--config", help="YAML file with any of these options (keys with underscores)")
    add("--model", help="base model: a Hugging Face or MLX folder (quantized: QLoRA), or a hub id")
    add("--train", action="store_true", help="train an adapter on DATA/train.jsonl")
    add("--test", action="store_true", help="report the loss and perplexity on DATA/test.jsonl")
    add("--data", help="folder with train.jsonl, optional valid.jsonl and test.jsonl")
    add("--adapter-path", help="output adapter folder (default: adapters); with --test alone, the adapter tested")
    add("--resume-adapter", help="start from this PEFT adapter's weights and config (a checkpoint: its optimizer state too)")
    add("--iters", type=int, help="optimizer updates (default 1000)")
    add("--batch-size", type=int, help="examples per micro-batch (default 4)")
    add("--grad-accumulation", type=int, help="micro-batches per update (default 1)")
    add("--learning-rate", type=float, help="peak learning rate (default 1e-5)")
    add("--optimizer", choices=OPTIMIZERS, help="adam (default), adamw or sgd, with torch's semantics")
    add("--weight-decay", type=float, help="adamw weight decay (default 0.01), or sgd's")
    add("--lr-schedule", choices=SCHEDULES, help="constant (default) or cosine decay to 0")
    add("--warmup", type=int, help="linear warmup updates (default 0)")
    add("--grad-clip", type=float, help="clip the gradient's global norm to this (default: no clipping)")
    add("--lora-rank", type=int, help="LoRA rank r (default 8)")
    add("--lora-alpha", type=float, help="LoRA alpha; scale = alpha / r (default 16)")
    add("--lora-dropout", type=float, help="dropout on the LoRA path (default 0)")
    add("--target-modules", nargs="+", help=f"Linear names to adapt, or all-linear (default {' '.join(DEFAULT_TARGETS)})")
    add("--lora-towers", action="store_true", default=None, help="let --target-modules match the vision/audio towers' Linears too")
    add("--max-seq-length", type=int, help="truncate longer examples to this many tokens (default 2048)")
    add("--mask-prompt", dest="mask_prompt", action="store_true", default=None,
        help="train on assistant turns / completions only (the default)")
    add("--no-mask-prompt", dest="mask_prompt", action="store_false", help="train on every token")
    add("--grad-checkpoint", action="store_true", default=None, help="recompute each decoder layer in the backward pass")
    add("--steps-per-report", type=int, help="print progress every N updates (default 1)")
    add("--steps-per-eval", type=int, help="validation loss every N updates (default 200)")
    add("--save-every", type=int, help="checkpoint every N updates (default 100; 0: only at the end)")
    add("--seed", type=int, help="seed of the data order, the LoRA initialisation and dropout (default 0)")
    add("--dtype", choices=["bfloat16", "float16", "float32"], help="cast a float base model to this dtype")
    return parser


DEFAULTS = {
    "adapter_path": "adapters", "iters": 1000, "batch_size": 4, "grad_accumulation": 1, "learning_rate": 1e-5,
    "optimizer": "adam", "lr_schedule": "constant", "warmup": 0, "lora_rank": 8, "lora_alpha": 16.0,
    "lora_dropout": None, "target_modules": None, "lora_towers": False, "max_seq_length": 2048, "mask_prompt": True,
    "grad_checkpoint": False, "steps_per_report": 1, "steps_per_eval": 200, "save_every": 100, "seed": 0,
}


def options(argv) -> argparse.Namespace:
    """Command-line flags over the YAML config over the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    merged = {**{action.dest: None for action in parser._actions}, **DEFAULTS}
    if args.config:
        merged.update(read_yaml(args.config, {action.dest for action in parser._actions}))
    merged.update({k: v for k, v in vars(args).items() if v is not None})
    return argparse.Namespace(**merged)


def read_yaml(path: str, known: set[str]) -> dict:
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise Gemma3nError(f"cannot read {path}: {exc}") from None
    if not isinstance(values, dict):
        raise Gemma3nError(f"{path}: expected a mapping of options")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known - {"config"})
    if unknown:
        raise Gemma3nError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return values


def data_file(args, name: str, required: bool) -> Path | None:
    if not args.data:
        raise Gemma3nError("--data is required (a folder with train.jsonl)")
    path = Path(args.data) / f"{name}.jsonl"
    if not path.is_file():
        if required:
            raise Gemma3nError(f"{path} not found")
        return None
    return path


def run(args: argparse.Namespace) -> None:
    from . import load
    from .tuner import Tokenizer, Trainer, evaluate, load_dataset, new_adapter, resumed_adapter

    if not (args.train or args.test):
        raise Gemma3nError("nothing to do: pass --train and/or --test")
    if not args.model:
        raise Gemma3nError("--model is required")
    training = TrainingArgs(**{k: getattr(args, k) for k in TrainingArgs.__dataclass_fields__ if getattr(args, k, None) is not None})
    training.adapter_path = Path(args.adapter_path)
    training.check()
    model, processor = load(args.model, dtype=args.dtype)
    tokenizer = Tokenizer(processor, mask_prompt=args.mask_prompt, max_seq_length=args.max_seq_length)
    sets = {}
    for name, wanted, required in (("train", args.train, True), ("valid", args.train, False), ("test", args.test, True)):
        path = data_file(args, name, required) if wanted else None
        if path is not None:
            sets[name] = load_dataset(path, tokenizer)
            truncated = f", {sets[name].truncated} truncated to {args.max_seq_length} tokens" if sets[name].truncated else ""
            print(f"[lora] {path}: {len(sets[name])} examples{truncated}", file=sys.stderr)
    if args.train:
        if args.resume_adapter:
            config = resumed_adapter(model, args.resume_adapter, args.lora_dropout)
        else:
            config = new_adapter(model, args.lora_rank, args.lora_alpha, args.lora_dropout or 0.0, args.target_modules,
                                 args.lora_towers, args.seed, base_model=str(args.model))
        trainer = Trainer(model, config, training)
        if args.resume_adapter:
            trainer.resume(args.resume_adapter)
        trainer.train(sets["train"], sets.get("valid"))
        print(f"[lora] adapter written to {training.adapter_path}", file=sys.stderr)
    elif args.test:
        model.load_adapter(training.adapter_path)
    if args.test:
        loss = evaluate(model, sets["test"], training.batch_size, training.chunk_tokens)
        print(f"test loss {loss:.7g}, perplexity {math.exp(loss):.7g}")


def main(argv=None) -> int:
    return run_command(lambda: run(options(argv)))


if __name__ == "__main__":
    sys.exit(main())
