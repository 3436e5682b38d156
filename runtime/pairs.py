"""Tokenising (query, passage) pairs as FlagEmbedding's FlagReranker does: the query's own tokens cut to
``query_max_length``, the passage's to ``max_length``, the tokenizer's pair template around both, and only the
passage cut further so the pair fits ``max_length`` (``only_second``). Shared by the Reranker, the server and
the export's calibration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import ArtifactError, InputTooLongError
from .session import raise_unencodable
from .tokenizer import TextTokenizer


@dataclass(frozen=True)
class PairEncoded:
    """Token rows of (query, passage) pairs as the graph reads them, unpadded: ``ids`` (special tokens and
    the pair template included), ``segment_start`` (where segment 1, the passage side, begins in each row;
    used when the graph reads ``token_type_ids``), and which pairs were cut."""

    ids: list[list[int]]
    segment_start: list[int]
    truncated: list[int]

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


def segment_ids(lengths: Sequence[int], starts: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """int64 ``token_type_ids`` for a padded batch: 1 from each row's segment start to the end of the row,
    0 before it and on padding (which the attention mask hides anyway)."""
    types = np.zeros(shape, dtype=np.int64)
    cols = np.arange(shape[1])
    end = np.asarray(lengths, dtype=np.int64)[:, None]
    start = np.asarray(starts, dtype=np.int64)[:, None]
    types[(cols >= start) & (cols < end)] = 1
    return types


def split_pairs(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    if isinstance(pairs, str) or not isinstance(pairs, (list, tuple)):
        raise TypeError(f"pairs must be a list of (query, passage) pairs, got {type(pairs).__name__}")
    queries, passages = [], []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TypeError(f"pairs[{i}] must be a (query, passage) pair of two str, got {pair!r:.80}")
        q, p = pair
        if not isinstance(q, str) or not isinstance(p, str):
            raise TypeError(f"pairs[{i}] holds {type(q).__name__} and {type(p).__name__}; both must be str")
        queries.append(q)
        passages.append(p)
    return queries, passages


class PairTokenizer:
    """``tokenizer.json`` read for pairs. Thread-safe: nothing is mutated after construction."""

    def __init__(self, path: Path, max_length: int, query_max_length: int, truncation: str = "only_second",
                 texts: TextTokenizer | None = None) -> None:
        """``texts``: a ``TextTokenizer`` of the same file to share (a Reranker's own), else one is loaded; its
        max length does not matter here (each side is capped by the lengths given)."""
        self.max_length = max_length
        self.query_max_length = query_max_length
        self.texts = texts if texts is not None else TextTokenizer(path, max_length)
        try:
            self._pair = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
            raise ArtifactError(f"cannot load tokenizer {path}: {exc}; re-export the artifact") from exc
        self._pair.no_padding()
        self._pair.enable_truncation(max_length=max_length, strategy=truncation)
        probe = self._pair.post_process(self._pair.encode("a", add_special_tokens=False),
                                        self._pair.encode("b", add_special_tokens=False), add_special_tokens=True)
        self.specials = len(probe.ids) - 2
        if self.specials < 0 or self.specials >= query_max_length or query_max_length >= max_length:
            raise ArtifactError("the tokenizer's pair template and lengths are not ones a cross-encoder reads; "
                                "re-export the artifact")

    def encode(self, pairs: Sequence[tuple[str, str]], truncate: bool = True) -> PairEncoded:
        """Token rows of ``pairs``. With ``truncate=False`` a pair that would be cut raises
        ``InputTooLongError`` (its index and token count)."""
        queries, passages = split_pairs(pairs)
        unique = list(dict.fromkeys(queries))
        try:
            q_enc, q_more = self.texts.encode_capped(unique, self.query_max_length)
            p_enc, p_more = self.texts.encode_capped(passages, self.max_length)
        except (UnicodeError, TypeError):
            raise_unencodable(unique + passages)
            raise
        by_query = {q: (e, more) for q, e, more in zip(unique, q_enc, q_more)}
        ids: list[list[int]] = []
        starts: list[int] = []
        truncated: list[int] = []
        post = self._pair.post_process
        for i, (q, p_e) in enumerate(zip(queries, p_enc)):
            q_e, q_cut = by_query[q]
            enc = post(q_e, p_e, add_special_tokens=True)
            row = enc.ids
            if q_cut or p_more[i] or len(q_e.ids) + len(p_e.ids) + self.specials > len(row):
                if not truncate:
                    raise InputTooLongError(i, self.pair_length(q, passages[i]), self.max_length)
                truncated.append(i)
            ids.append(row)
            starts.append(next((k for k, t in enumerate(enc.type_ids) if t == 1), len(row)))
        return PairEncoded(ids=ids, segment_start=starts, truncated=truncated)

    def pair_length(self, query: str, passage: str) -> int:
        """Tokens of the pair uncut (special tokens included), for error messages."""
        wrap = len(self.texts.prefix) + len(self.texts.suffix)
        return self.texts.count_tokens(query) + self.texts.count_tokens(passage) - 2 * wrap + self.specials
