"""The training loop: batches in a seeded order, the summed loss and its gradients over
`grad_accumulation` micro-batches (one update is exactly the update of one batch that holds them
all: the loss is the mean over all their labelled tokens), optional gradient clipping, the
optimizer step, progress, validation, checkpoints, and a stop on a non-finite loss or gradient.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..adapters.writer import adapter_tensors
from ..errors import Gemma3nError
from .checkpoints import TrainerState, restore, save_checkpoint
from .datasets import IGNORE, Dataset
from .layer_checkpoints import checkpoint_layers
from .losses import CHUNK_TOKENS, batch_loss
from .optimizers import make_optimizer, schedule

LOG_FILE = "train_log.jsonl"


@dataclass
class TrainingArgs:
    adapter_path: Path = Path("adapters")
    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    optimizer: str = "adam"
    weight_decay: float | None = None  # adamw: 0.01 unless given
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"
    warmup: int = 0
    grad_accumulation: int = 1
    grad_clip: float | None = None
    grad_checkpoint: bool = False
    steps_per_report: int = 1
    steps_per_eval: int = 200
    save_every: int = 100
    seed: int = 0
    chunk_tokens: int = CHUNK_TOKENS

    def check(self) -> None:
        for name in ("iters", "batch_size", "grad_accumulation", "steps_per_report", "steps_per_eval", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise Gemma3nError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate < 0 or self.warmup < 0 or self.save_every < 0:
            raise Gemma3nError("--learning-rate, --warmup and --save-every must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise Gemma3nError(f"--grad-clip must be > 0, got {self.grad_clip}")


@dataclass
class StepReport:
    step: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    peak_memory_gb: float
    validation_loss: float | None = None


def batch_order(count: int, batch_size: int, seed: int):
    """Example indices, batch after batch: a fresh seeded shuffle each pass over the data, passes
    joined end to end (a batch may span two passes)."""
    rng = np.random.default_rng(seed)
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending.extend(rng.permutation(count).tolist())
        yield pending[:batch_size]
        pending = pending[batch_size:]


def collate(dataset: Dataset, indices: list[int], pad_id: int = 0):
    """(ids, labels, images, audio) of a right-padded batch (padding unlabelled: causal attention
    keeps it out of the real tokens' outputs)."""
    examples = [dataset.examples[i] for i in indices]
    length = max(len(e.ids) for e in examples)
    ids = np.full((len(examples), length), pad_id, dtype=np.int32)
    labels = np.full((len(examples), length), IGNORE, dtype=np.int64)
    for row, example in enumerate(examples):
        ids[row, : len(example.ids)] = example.ids
        labels[row, : len(example.labels)] = example.labels
    images = [image for e in examples for image in e.images]
    audio = [clip for e in examples for clip in e.audio]
    return ids, labels, images, audio


def labelled_count(labels: np.ndarray) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1, chunk_tokens: int = CHUNK_TOKENS) -> float:
    """Mean loss over every labelled token of `dataset`."""
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        ids, labels, images, audio = collate(dataset, list(range(start, min(start + batch_size, len(dataset)))))
        summed, _ = batch_loss(model, ids, labels, images, audio, chunk_tokens)
        total += summed.item()
        count += labelled_count(labels)
    return total / count


def global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)))


class Trainer:
    def __init__(self, model: nn.Module, adapter_config: dict, args: TrainingArgs, report=None):
        args.check()
        self.model, self.config, self.args = model, adapter_config, args
        self.report = report or (lambda line: print(line, flush=True))
        self.rate = schedule(args.learning_rate, args.lr_schedule, args.warmup, args.iters)
        self.optimizer = make_optimizer(args.optimizer, self.rate, args.weight_decay, eps=args.adam_eps)
        self.state = TrainerState()
        self.last_checkpoint: Path | None = None
        if args.grad_checkpoint:
            checkpoint_layers(model)

    def resume(self, folder: str | Path) -> None:
        """Continue from a checkpoint's step and optimizer state (a plain adapter: from step 0)."""
        self.state = restore(Path(folder), self.optimizer, self.model.trainable_parameters())
        if self.state.step >= self.args.iters:
            raise Gemma3nError(f"{folder} is at step {self.state.step}; --iters {self.args.iters} leaves nothing to train")

    def save(self) -> Path:
        tensors = adapter_tensors(self.model)
        self.last_checkpoint = save_checkpoint(Path(self.args.adapter_path), self.config, tensors, self.optimizer, self.state)
        return self.last_checkpoint

    def step_gradients(self, loss_and_grad, batches, train_set: Dataset):
        """(mean loss, averaged gradients, tokens) of one update's micro-batches."""
        summed, grads, count, tokens = 0.0, None, 0, 0
        for _ in range(self.args.grad_accumulation):
            indices = next(batches)
            ids, labels, images, audio = collate(train_set, indices)
            loss, micro_grads = loss_and_grad(ids, labels, images, audio)
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            mx.eval(loss, grads)
            summed += loss.item()
            count += labelled_count(labels)
            tokens += sum(len(train_set.examples[i].ids) for i in indices)
        return summed / count, tree_map(lambda g: g / count, grads), tokens

    def stop_if_not_finite(self, loss: float, norm: float) -> None:
        if math.isfinite(loss) and math.isfinite(norm):
            return
        kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was saved yet"
        raise Gemma3nError(
            f"step {self.state.step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} "
            f"(loss {loss}, gradient norm {norm}); training stopped before the update, {kept}"
        )

    def train(self, train_set: Dataset, valid_set: Dataset | None = None) -> list[StepReport]:
        args, model = self.args, self.model
        mx.random.seed(args.seed)
        model.train()
        chunk = args.chunk_tokens

        def summed_loss(ids, labels, images, audio):
            return batch_loss(model, ids, labels, images, audio, chunk)[0]

        loss_and_grad = nn.value_and_grad(model, summed_loss)
        batches = batch_order(len(train_set), args.batch_size, args.seed)
        for _ in range(self.state.step * args.grad_accumulation):
            next(batches)
        Path(args.adapter_path).mkdir(parents=True, exist_ok=True)
        log = (Path(args.adapter_path) / LOG_FILE).open("a")
        reports = []
        try:
            while self.state.step < args.iters:
                started = time.perf_counter()
                loss, grads, tokens = self.step_gradients(loss_and_grad, batches, train_set)
                if args.grad_clip is not None:
                    grads, norm = optim.clip_grad_norm(grads, args.grad_clip)
                else:
                    norm = global_norm(grads)
                self.stop_if_not_finite(loss, norm.item())
                learning_rate = self.rate(self.state.step)
                self.optimizer.update(model, grads)
                mx.eval(model.trainable_parameters(), self.optimizer.state)
                self.state.step += 1
                report = StepReport(self.state.step, loss, learning_rate, tokens / (time.perf_counter() - started),
                                    mx.get_peak_memory() / 1e9)
                if valid_set is not None and (self.state.step % args.steps_per_eval == 0 or self.state.step == args.iters):
                    model.eval()
                    report.validation_loss = evaluate(model, valid_set, args.batch_size, chunk)
                    model.train()
                reports.append(report)
                log.write(json.dumps(report.__dict__) + "\n")
                log.flush()
                if self.state.step % args.steps_per_report == 0 or report.validation_loss is not None:
                    self.report(progress_line(report, args.iters))
                if (args.save_every and self.state.step % args.save_every == 0) or self.state.step == args.iters:
                    self.save()
        finally:
            log.close()
            model.eval()
        return reports


def progress_line(report: StepReport, iters: int) -> str:
    line = (f"step {report.step}/{iters}: loss {report.loss:.7g}, lr {report.learning_rate:.4g}, "
            f"{report.tokens_per_second:.1f} tok/s, peak {report.peak_memory_gb:.3f} GB")
    if report.validation_loss is not None:
        line += f", validation loss {report.validation_loss:.7g}"
    return line
