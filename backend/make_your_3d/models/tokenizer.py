"""A tiny CLIP BPE tokenizer written in the published file format (vocab.json + merges.txt).

Real SD folders ship CLIP's 49k-token vocabulary; the tiny model set needs the same *format* so the
same `CLIPTokenizer.from_pretrained` code path runs, but a vocabulary small enough for toy models.
"""

from __future__ import annotations

import json
from pathlib import Path

# A handful of merges so multi-character tokens exist (and the BPE path is exercised).
_MERGES = ("t h", "th e</w>", "i n", "o n", "e r", "a n", "r e", "v i", "e w</w>", "o f</w>")


def _byte_alphabet() -> list[str]:
    """CLIP's reversible byte -> printable unicode mapping (GPT-2 style), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_clip_tokenizer(folder: Path, model_max_length: int = 77) -> int:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json; returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)
