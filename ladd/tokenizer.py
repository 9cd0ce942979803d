"""A CLIP BPE tokenizer whose files the project writes itself (no hub download).

Vocabulary: every printable ASCII character in its plain and word-final (`</w>`) form, plus one
merge chain per known word so frequent prompt words become single tokens; any other text still
tokenizes, character by character.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_CHARS = [c for c in string.printable if not c.isspace()]


def _merge_chain(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build `word</w>` from its characters."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, current = [], symbols[0]
    for nxt in symbols[1:]:
        merges.append((current, nxt))
        current += nxt
    return merges


def write_clip_tokenizer(out_dir: Path, words: list[str], model_max_length: int) -> CLIPTokenizer:
    """Write vocab.json / merges.txt for `words` and return the loaded tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab: list[str] = []
    merges: list[tuple[str, str]] = []
    for c in _CHARS:
        vocab += [c, c + "</w>"]
    for word in sorted({w.lower() for w in words if len(w) > 1}):
        for a, b in _merge_chain(word):
            if (a, b) not in merges:
                merges.append((a, b))
                if a + b not in vocab:
                    vocab.append(a + b)
    vocab += [BOS, EOS]
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(
        str(out_dir / "vocab.json"),
        str(out_dir / "merges.txt"),
        model_max_length=model_max_length,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
    )
