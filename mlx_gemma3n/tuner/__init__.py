"""Fine-tuning Gemma 3n with LoRA / QLoRA (`python -m mlx_gemma3n.lora`), exact: the model's own
no-cache forward (KV-shared layers read their donors' keys/values) and Transformers' causal-LM loss.

    model, processor = load("google/gemma-3n-E2B-it")
    config = new_adapter(model, rank=8, alpha=16)
    data = load_dataset("data/train.jsonl", Tokenizer(processor))
    Trainer(model, config, TrainingArgs(adapter_path=Path("adapters"), iters=100)).train(data)
"""

from .adapter import new_adapter, resumed_adapter
from .datasets import Dataset, Example, Tokenizer, load_dataset
from .trainer import StepReport, Trainer, TrainingArgs, evaluate

__all__ = [
    "Dataset", "Example", "StepReport", "Tokenizer", "Trainer", "TrainingArgs", "evaluate", "load_dataset",
    "new_adapter", "resumed_adapter",
]
