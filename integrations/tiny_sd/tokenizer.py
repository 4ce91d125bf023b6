"""An offline CLIP BPE tokenizer for the synthetic world's words: every word is one token, any other text
falls back to characters (so every string round-trips)."""

from __future__ import annotations

import json
import string
from pathlib import Path

from .world import BACKGROUNDS, COLOURS, SHAPES, SIZES

EXTRA_WORDS = ("a", "an", "the", "on", "background", "sks", "photo", "of", "picture", "shape")


def world_words() -> list[str]:
    return sorted(set(SHAPES) | set(COLOURS) | set(SIZES) | set(BACKGROUNDS) | set(EXTRA_WORDS))


def build_vocab_and_merges(words) -> tuple[dict[str, int], list[str]]:
    """Character tokens plus a left-to-right merge chain per word (every merge result is in the vocabulary)."""
    chars = list(string.ascii_lowercase + string.digits + ".,'!?-")
    tokens = chars + [c + "</w>" for c in chars]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = pieces[0]
        for piece in pieces[1:]:
            merge = f"{prefix} {piece}"
            prefix = prefix + piece
            if merge not in merges:
                merges.append(merge)
            if prefix not in tokens:
                tokens.append(prefix)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def save_tokenizer_files(directory) -> Path:
    """Writes vocab.json and merges.txt for :func:`world_words` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(world_words())
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def build_tokenizer(directory, max_length: int = 16):
    """A transformers CLIPTokenizer loaded from the files in ``directory`` (written first)."""
    from transformers import CLIPTokenizer

    save_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=max_length)
