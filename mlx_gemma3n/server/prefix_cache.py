"""Caches of recent prompts, for reuse by later prompts that extend them (a chat resending its history).

An entry holds the KV cache right at the end of a prompt and the logits of its last token. A later
prompt whose ids start with the entry's ids, with the same media in that part (compared by hashes of
the preprocessed images and clips) and the same adapter, starts from a copy of it and prefills only
the rest; the very same prompt needs no prefill at all. The sliding-window layers' rings hold the
`window` positions before the entry's end, which are exactly those the continuation's first tokens
see, so a ring is reused as it is however far it has wrapped: reuse never rewinds a cache, which a
ring could not do. Least recently used entries go first once the bytes held pass the cap.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx


@dataclass
class CachedPrompt:
    adapter: str | None
    ids: tuple[int, ...]
    media: tuple[tuple[str, ...], tuple[str, ...]]  # (image digests, audio digests)
    states: list[tuple[mx.array, mx.array]]
    logits: mx.array
    nbytes: int

    def is_prefix_of(self, adapter, ids: list[int], media) -> bool:
        images, audio = self.media
        return (
            adapter == self.adapter
            and len(self.ids) <= len(ids)
            and tuple(ids[: len(self.ids)]) == self.ids
            and media[0][: len(images)] == images
            and media[1][: len(audio)] == audio
        )


    def restore(self, make_cache) -> list:
        """A fresh cache (from `make_cache`) holding this prefix: the entry stays as it is."""
        cache = make_cache()
        for layer, (keys, values) in zip(cache, self.states):
            layer.state = (keys[...], values[...])
            layer.offset = len(self.ids)
        return cache


def copied_states(cache: list) -> list[tuple[mx.array, mx.array]]:
    """New array objects for each layer's keys and values: a cache writes into its arrays in place."""
    return [(keys[...], values[...]) for keys, values in (layer.state for layer in cache)]


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, CachedPrompt] = OrderedDict()
        self.nbytes = 0

    def lookup(self, adapter, ids: list[int], media) -> CachedPrompt | None:
        """The entry of the longest cached prefix of the prompt, if any."""
        best = max(
            (entry for entry in self.entries.values() if entry.is_prefix_of(adapter, ids, media)),
            key=lambda entry: len(entry.ids),
            default=None,
        )
        if best is not None:
            self.entries.move_to_end((best.adapter, best.ids, best.media))
        return best

    def store(self, adapter, ids: list[int], media, cache: list, logits: mx.array) -> None:
        key = (adapter, tuple(ids), media)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        states = copied_states(cache)
        nbytes = sum(keys.nbytes + values.nbytes for keys, values in states) + logits.nbytes
        if nbytes > self.max_bytes:
            return
        self.entries[key] = CachedPrompt(adapter, key[1], media, states, logits, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
