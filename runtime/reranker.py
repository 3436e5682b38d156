"""The Reranker: (query, passage) pairs in, relevance scores out, from a cross-encoder artifact
(``kind: reranker``: bge-reranker, ms-marco cross-encoders). Shares the artifact, session and batching
with the Embedder (``runtime.session``); only pair tokenisation and the score are its own."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence

import numpy as np
from .batching import Batch
from .errors import ArtifactError
from .manifest import PairFormat
from .pairs import PairEncoded, PairTokenizer, segment_ids
from .session import ModelSession, check_texts


class PairTruncationWarning(UserWarning):
    """Some pairs were longer than the model's max length (or their query than the query cap) and were cut."""

    def __init__(self, count: int, indices: list[int], max_length: int, query_max_length: int) -> None:
        self.count = count
        self.indices = indices
        shown = ", ".join(map(str, indices[:10])) + (" ..." if count > 10 else "")
        super().__init__(
            f"{count} pair(s) were cut to fit (indices {shown}): the query to its first {query_max_length} tokens, "
            f"the passage to what fits in {max_length} tokens with it; pass truncate=False to refuse them instead"
        )


class Reranker(ModelSession):
    """Scores (query, passage) pairs with a cross-encoder exported by ``python -m export`` (its manifest says
    ``kind: reranker``). Pairs are tokenised as FlagEmbedding's FlagReranker does (the query cut to the
    manifest's ``query_max_length``, the passage cut so the pair fits ``max_length``), batched by length under
    a token budget, and each pair's score does not depend on what shares its batch. Thread-safe; the
    constructor's arguments are ``Embedder``'s.

    >>> rr = Reranker("artifacts/bge-reranker-base")
    >>> rr.rerank("what is panda?", ["hi", "The giant panda is a bear native to China."], top_n=1)
    [(1, <its score>)]
    """

    kind = "reranker"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        pair = self._manifest.pair
        if pair is None:  # Manifest.check refuses this; keeps the type checker and a hand-edited file honest
            raise ArtifactError("the manifest of a reranker has no pair format; re-export the artifact")
        self._pair: PairFormat = pair
        self._pairs = PairTokenizer(self._tokenizer_path, self.max_length, pair.query_max_length, pair.truncation,
                                    texts=self._tokenizer)
        self._other_lengths: dict[tuple[int, int], PairTokenizer] = {}
        self._lengths_lock = threading.Lock()

    @property
    def pair_format(self) -> PairFormat:
        return self._pair

    @property
    def query_max_length(self) -> int:
        return self._pair.query_max_length

    # -- tokenising ----------------------------------------------------------------------------
    def tokenize_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        truncate: bool = True,
        *,
        max_length: int | None = None,
        query_max_length: int | None = None,
    ) -> PairEncoded:
        """Token rows of ``pairs`` as ``score`` feeds them (``runtime.pairs``). With ``truncate=False`` a pair
        that would be cut raises ``InputTooLongError`` (its index, its token count). ``max_length`` (at most the
        manifest's) and ``query_max_length`` cut shorter than the manifest says, as FlagReranker's per-call
        arguments do. Thread-safe."""
        length = self.max_length if max_length is None else max_length
        q_length = self._pair.query_max_length if query_max_length is None else query_max_length
        if (length, q_length) == (self.max_length, self._pair.query_max_length):
            return self._pairs.encode(pairs, truncate)
        if not 2 <= length <= self.max_length or not 1 <= q_length < length:
            raise ValueError(f"need 1 <= query_max_length < max_length <= {self.max_length}, got {q_length} and {length}")
        with self._lengths_lock:
            tok = self._other_lengths.get((length, q_length))
            if tok is None:
                tok = PairTokenizer(self._tokenizer_path, length, q_length, self._pair.truncation, texts=self._tokenizer)
                self._other_lengths[(length, q_length)] = tok
        return tok.encode(pairs, truncate)

    # -- scoring -------------------------------------------------------------------------------
    def score(
        self,
        pairs: Sequence[tuple[str, str]],
        batch_size: int | None = None,
        *,
        normalize: bool = False,
        truncate: bool = True,
    ) -> np.ndarray:
        """Relevance of each (query, passage) pair: float32 ``(len(pairs),)`` in input order; raw logits, or
        their sigmoid with ``normalize=True`` (FlagReranker's ``compute_score(..., normalize=True)``).
        A pair that must be cut is cut with a ``PairTruncationWarning`` (``truncate=False``: refused with
        ``InputTooLongError``)."""
        if batch_size is None:
            batch_size = self._default_batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(pairs, (list, tuple)):
            raise TypeError(f"pairs must be a list or tuple of (query, passage) pairs, got {type(pairs).__name__}")
        if not pairs:
            return np.empty((0,), dtype=np.float32)
        enc = self.tokenize_pairs(pairs, truncate=truncate)
        if enc.truncated:
            warnings.warn(PairTruncationWarning(len(enc.truncated), enc.truncated, self.max_length,
                                                self._pair.query_max_length), stacklevel=2)
        logits = self.score_rows(enc, batch_size)
        return sigmoid(logits).astype(np.float32) if normalize else logits

    def score_rows(self, enc: PairEncoded, batch_size: int | None = None) -> np.ndarray:
        """Logits of already tokenised pairs (``tokenize_pairs``), in length-sorted batches."""
        lengths = enc.lengths
        out = np.empty((len(enc.ids),), dtype=np.float32)
        batches = self.batches(enc.ids, lengths, batch_size)
        def types(batch: Batch) -> np.ndarray:
            idx = batch.indices
            return segment_ids(lengths[idx], [enc.segment_start[i] for i in idx], batch.input_ids.shape)

        for batch, logits in self._run_batches(batches, types if self.reads_token_types else None):
            self._check_output(logits, batch.indices)
            out[batch.indices] = logits[:, 0]
        return out

    def rerank(
        self,
        query: str,
        passages: Sequence[str],
        top_n: int | None = None,
        *,
        normalize: bool = False,
        truncate: bool = True,
        batch_size: int | None = None,
    ) -> list[tuple[int, float]]:
        """``(index, score)`` of ``passages`` by relevance to ``query``, best first (ties: input order),
        the first ``top_n`` (all if None). Scores as ``score`` gives them."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        check_texts(passages, "passages")
        if not passages:
            raise ValueError("passages is empty: there is nothing to rank; skip the call when retrieval found nothing")
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            raise ValueError(f"top_n must be an int >= 1 or None, got {top_n!r}")
        scores = self.score([(query, p) for p in passages], batch_size, normalize=normalize, truncate=truncate)
        order = np.argsort(-scores, kind="stable")
        if top_n is not None:
            order = order[:top_n]
        return [(int(i), float(scores[i])) for i in order]

    def __repr__(self) -> str:
        return (
            f"Reranker({str(self._root)!r}, device={self._device!r}, precision={self._precision!r}, "
            f"max_length={self.max_length}, providers={self.providers})"
        )


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function in float64: FlagReranker's ``normalize=True``, and the score the rerank routes give."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))
