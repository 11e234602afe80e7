"""Optimizers and learning-rate schedules, with PyTorch's semantics so a run can be replayed there.

adam / adamw are torch.optim.Adam / AdamW (bias-corrected moments, eps outside the square root,
AdamW's decoupled weight decay p <- p (1 - lr wd) before the step, default wd 0.01); sgd is plain
SGD. Schedules follow Transformers' `get_constant_schedule_with_warmup` and
`get_cosine_schedule_with_warmup`: update n (from 0) uses lr * n / warmup during the warmup, then
constant or lr * (1 + cos(pi * progress)) / 2 down to 0 at the last update.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim

from ..errors import Gemma3nError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")


def schedule(learning_rate: float, kind: str = "constant", warmup: int = 0, total: int = 1):
    """lr as a function of the number of updates made so far (what mlx optimizers call it with)."""
    if kind not in SCHEDULES:
        raise Gemma3nError(f"unknown --lr-schedule '{kind}' (choose from {', '.join(SCHEDULES)})")

    def rate(step: int) -> float:
        if step < warmup:
            return learning_rate * step / warmup
        if kind == "constant":
            return learning_rate
        progress = (step - warmup) / max(1, total - warmup)
        return learning_rate * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return rate


def make_optimizer(name: str, rate, weight_decay: float | None = None, betas=(0.9, 0.999), eps: float = 1e-8):
    """`rate` from `schedule`; it is evaluated on the host from the step count each update."""
    if name not in OPTIMIZERS:
        raise Gemma3nError(f"unknown --optimizer '{name}' (choose from {', '.join(OPTIMIZERS)})")
    learning_rate = lambda step: mx.array(rate(int(step)), dtype=mx.float32)  # noqa: E731
    if name == "sgd":
        return optim.SGD(learning_rate=learning_rate, weight_decay=weight_decay or 0.0)
    if name == "adam":
        if weight_decay:
            raise Gemma3nError("--weight-decay needs --optimizer adamw (Adam's L2 penalty is not supported)")
        return optim.Adam(learning_rate=learning_rate, betas=list(betas), eps=eps, bias_correction=True)
    return optim.AdamW(
        learning_rate=learning_rate, betas=list(betas), eps=eps, bias_correction=True,
        weight_decay=0.01 if weight_decay is None else weight_decay,
    )
