"""Transformers (torch, CPU, bfloat16): `AutoModelForCausalLM` and `generate` (greedy, min_new_tokens
= max_new_tokens so end-of-sequence cannot stop it early); a streamer timestamps each new token."""

import os
import queue
import threading

import torch
from transformers import AutoModelForCausalLM

from .measure import run

torch.set_num_threads(os.cpu_count())


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


class TokenQueue:
    """A `generate` streamer: the first `put` is the prompt, each later one a new token."""

    def __init__(self):
        self.items, self.prompt_seen = queue.Queue(), False

    def put(self, value):
        if self.prompt_seen:
            self.items.put(value)
        self.prompt_seen = True

    def end(self):
        self.items.put(None)


def stream(model, ids, max_tokens):
    tokens = TokenQueue()
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, streamer=tokens)
    worker = threading.Thread(target=lambda: model.generate(torch.tensor([ids]), **kwargs))
    worker.start()
    while (token := tokens.items.get()) is not None:
        yield token
    worker.join()


if __name__ == "__main__":
    run(load, stream, mlx=False)
