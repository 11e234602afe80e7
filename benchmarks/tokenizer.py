"""A tokenizer of Gemma's real vocabulary size (262400) with its special tokens at their real ids.

A `tokenizers` WordLevel model: the special tokens of the real E2B tokenizer_config.json (<pad> 0,
<eos> 1, <bos> 2, <start_of_turn> 105, <end_of_turn> 106, the image/audio tokens at 255999, 256000,
262144, 262145, 262272, 262273, ...) at their ids, filler words `t<id>` everywhere else. Transformers'
AutoTokenizer (the peers) and our Processor both read it; benchmarks feed token ids anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

VOCAB_SIZE = 262400
E2B = Path(__file__).resolve().parent.parent / "tests" / "data" / "gemma-3n-E2B-it"
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "image_token", "audio_token",
                "boi_token", "eoi_token", "boa_token", "eoa_token")


def special_tokens() -> dict[int, str]:
    decoder = json.loads((E2B / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return {int(i): token["content"] for i, token in decoder.items() if token["special"]}


def write_tokenizer(folder: Path) -> None:
    special = special_tokens()
    vocab = {special.get(i, f"t{i}"): i for i in range(VOCAB_SIZE)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in special.values()])
    tokenizer.save(str(folder / "tokenizer.json"))
    real = json.loads((E2B / "tokenizer_config.json").read_text())
    config = {key: real[key] for key in SPECIAL_KEYS}
    config.update(
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens=real["extra_special_tokens"],
        model_max_length=32768,
        tokenizer_class="PreTrainedTokenizerFast",
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text((E2B / "special_tokens_map.json").read_text())
