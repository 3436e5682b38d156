"""Tokenisation with the Rust `tokenizers` library, batched, reporting truncation instead of hiding it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import ArtifactError


@dataclass(frozen=True)
class Encoded:
    """Token ids of a list of texts, unpadded, with the number of tokens each had before truncation."""

    ids: list[list[int]]
    truncated: list[int]  # indices of inputs that were cut to max_length

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


class TextTokenizer:
    """Wraps ``tokenizer.json``. Two instances of the Rust tokenizer: one truncating, one not (for
    reporting the real length of an over-long input). Neither is mutated after construction, so one
    ``TextTokenizer`` is safe to share between threads."""

    def __init__(self, path: Path, max_length: int) -> None:
        try:
            self._truncating = Tokenizer.from_file(str(path))
            self._full = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
            raise ArtifactError(f"cannot load tokenizer {path}: {exc}; re-export the artifact") from exc
        self.max_length = max_length
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_length=max_length)
        self._full.no_padding()
        self._full.no_truncation()

    def encode(self, texts: list[str]) -> Encoded:
        encodings = self._truncating.encode_batch(texts, add_special_tokens=True)
        ids = [e.ids for e in encodings]
        truncated = [i for i, e in enumerate(encodings) if e.overflowing]
        return Encoded(ids=ids, truncated=truncated)

    @property
    def vocab_size(self) -> int:
        return self._truncating.get_vocab_size(with_added_tokens=True)

    def count_tokens(self, text: str) -> int:
        """Length of ``text`` with special tokens and without truncation."""
        return len(self._full.encode(text, add_special_tokens=True).ids)
