"""Tokenisation with the Rust `tokenizers` library, batched, reporting truncation instead of hiding it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

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
        self.prefix, self.suffix = self._special_wrap()

    def _special_wrap(self) -> tuple[list[int], list[int]]:
        """The special ids the post-processor puts before and after a text's own tokens ([CLS] and [SEP] for
        BERT), found by encoding a probe with and without them: a chunk window is re-wrapped with these."""
        full = self._full.encode("a", add_special_tokens=True).ids
        bare = self._full.encode("a", add_special_tokens=False).ids
        for k in range(len(full) - len(bare) + 1):
            if full[k : k + len(bare)] == bare:
                return full[:k], full[k + len(bare) :]
        raise ArtifactError("the tokenizer's special tokens wrap a text in a way chunking cannot reproduce; "
                            "use long_text='truncate'")

    def encode(self, texts: list[str]) -> Encoded:
        encodings = self._truncating.encode_batch(texts, add_special_tokens=True)
        ids = [e.ids for e in encodings]
        truncated = [i for i, e in enumerate(encodings) if e.overflowing]
        return Encoded(ids=ids, truncated=truncated)

    def encode_content(self, texts: list[str]) -> list[Encoding]:
        """Untruncated encodings without special tokens (ids, character offsets, word ids): the material
        long texts are cut into windows from."""
        return self._full.encode_batch(texts, add_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._truncating.get_vocab_size(with_added_tokens=True)

    def count_tokens(self, text: str) -> int:
        """Length of ``text`` with special tokens and without truncation."""
        return len(self._full.encode(text, add_special_tokens=True).ids)
