"""The Embedder: text in, pooled and L2-normalised float32 vectors out, exactly as the manifest says."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .batching import Batch, make_batches
from .chunking import DEFAULT_OVERLAP, LONG_TEXT_MODES, Chunks, check_overlap, plan_windows, pool_windows
from .errors import ArtifactError, InputTooLongError, InvalidOutputError
from .integrity import check_external_data, verify_file
from .manifest import PRECISIONS, Manifest
from .progress import Progress
from .providers import create_session, resolve_device, usable_cores
from .tokenizer import Encoded, TextTokenizer

_AUTO_ORDER = {"cuda": ("fp16", "fp32", "int8"), "cpu": ("int8", "fp32", "fp16")}
_NORM_TOLERANCE = 1e-3
# Per device: texts per batch, padded tokens per batch, and the multiple the padded length is rounded up
# to. On CPU the cost is linear in tokens, so batches stay moderate and padding minimal. A GPU wants wide
# batches to fill its cores, and lengths on a multiple of 8 (tensor-core tiles; fewer distinct shapes for
# the CUDA memory arena and kernel selection).
_BATCHING = {"cpu": (32, 16384, 1), "cuda": (128, 65536, 8)}
_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class TruncationWarning(UserWarning):
    """Some inputs were longer than the model's max length and were cut; ``count`` and ``indices`` say which."""

    def __init__(self, count: int, indices: list[int], max_length: int) -> None:
        self.count = count
        self.indices = indices
        shown = ", ".join(map(str, indices[:10])) + (" ..." if count > 10 else "")
        super().__init__(
            f"{count} input(s) exceeded {max_length} tokens and were truncated (indices {shown}); "
            "pass long_text='chunk' to embed all of each text as overlapping windows, or long_text='error' "
            "to refuse them"
        )


@dataclass(frozen=True)
class RowPlan:
    """What one ``embed`` call runs: token rows, the text each came from, each text's first row (text i
    owns rows ``first_row[i]:first_row[i + 1]``), and each row's character span and token count."""

    rows: list[list[int]]
    owners: np.ndarray
    first_row: np.ndarray
    spans: list[tuple[int, int]]
    token_counts: list[int]


class Embedder:
    """Loads an artifact directory written by ``python -m export`` and embeds text with onnxruntime.

    One instance may be shared by threads: the tokenizer is never mutated after construction and
    ``InferenceSession.run`` is thread-safe. On CPU, at most ``workers`` graph runs are in flight at once
    (default 1: each run uses every intra-op thread), so many callers get the machine's throughput instead
    of fighting over the cores. ``workers=K`` runs K batches at once on one session (the weights are loaded
    once), each with ``threads`` intra-op threads (default: the cores divided by K): on small batches that
    gets more of a multi-core CPU than one run on every core (``benchmarks/layout.py``), and ``embed`` then
    runs its batches K at a time.
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        device_id: int = 0,
        max_batch_tokens: int | None = None,
        spinning: bool = True,
        workers: int = 1,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        self._root = Path(path)
        self._manifest = Manifest.load(self._root)
        self._device = resolve_device(device)
        self._precision = self._pick_precision(precision)
        self._default_batch_size, default_tokens, self._pad_multiple = _BATCHING[self._device]
        if max_batch_tokens is None:
            max_batch_tokens = default_tokens
        if max_batch_tokens < self._manifest.max_length:
            raise ValueError(
                f"max_batch_tokens ({max_batch_tokens}) must be at least max_length "
                f"({self._manifest.max_length}) so that one full-length text fits"
            )
        self._max_batch_tokens = max_batch_tokens
        variant = self._manifest.variants[self._precision]
        if self._precision == "fp16" and self._device == "cpu":
            warnings.warn(
                "running the fp16 variant on CPU: it is correct but slow (onnxruntime has few fp16 CPU "
                "kernels); use precision='int8' or 'fp32' on CPU",
                stacklevel=2,
            )
        files = [verify_file(self._root, f) for f in variant.files]
        model_path = self._root / variant.model_file
        if len(files) > 1:
            check_external_data(self._root, model_path, {Path(f.path).as_posix() for f in variant.files})
        tok_path = verify_file(self._root, self._manifest.tokenizer)
        self._tokenizer = TextTokenizer(tok_path, self._manifest.max_length)
        if threads is None and workers > 1 and self._device == "cpu":
            threads = max(1, usable_cores() // workers)
        self._workers = workers
        self._threads = threads
        self._session = create_session(model_path, self._device, threads, device_id, spinning=spinning)
        self._input_names = [i.name for i in self._session.get_inputs()]
        unknown = set(self._input_names) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise ArtifactError(f"graph {variant.model_file} wants inputs {sorted(unknown)} this runtime cannot feed")
        self._output_name = self._manifest.output_name
        outputs = {o.name: o for o in self._session.get_outputs()}
        if self._output_name not in outputs:
            raise ArtifactError(
                f"graph {variant.model_file} has no output {self._output_name!r} (it has {sorted(outputs)}); "
                "the manifest and graph disagree: re-export the artifact"
            )
        self._output_dtype = _ORT_TO_NUMPY.get(outputs[self._output_name].type)
        if self._output_dtype is None:
            raise ArtifactError(f"output {self._output_name!r} has type {outputs[self._output_name].type}, not float")
        # On CPU at most `workers` runs are in flight: more concurrent runs than that only fight over the
        # same cores (measured: 16 callers of a one-run Embedder got half the throughput of one). Callers
        # queue here while tokenisation and batching still run in parallel. On CUDA, runs may overlap.
        self._run_slots: threading.Semaphore | contextlib.nullcontext = (
            threading.BoundedSemaphore(workers) if self._device == "cpu" else contextlib.nullcontext()
        )
        self._batch_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- choosing what to load ---------------------------------------------------------------
    def _pick_precision(self, precision: str) -> str:
        available = self._manifest.variants
        if precision == "auto":
            for p in _AUTO_ORDER[self._device]:
                if p in available:
                    return p
        if precision not in PRECISIONS and precision != "auto":
            raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}, got {precision!r}")
        if precision not in available:
            raise ArtifactError(
                f"the artifact has no {precision} variant (it has {sorted(available)}); re-export with "
                f"`python -m export --precision {precision}` or pick one of those"
            )
        return precision

    # -- properties ------------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def dim(self) -> int:
        return self._manifest.dimension

    @property
    def max_length(self) -> int:
        return self._manifest.max_length

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def device(self) -> str:
        return self._device

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer (and so the embedding table) knows: valid ids are below it."""
        return self._tokenizer.vocab_size

    @property
    def batch_limits(self) -> tuple[int, int, int]:
        """(default texts per batch, padded tokens per batch, pad multiple) that ``embed`` batches by; the
        server forms its cross-request batches by the same numbers."""
        return self._default_batch_size, self._max_batch_tokens, self._pad_multiple

    @property
    def workers(self) -> int:
        """Graph runs that may be in flight at once on CPU (the server runs this many inference threads)."""
        return self._workers

    @property
    def threads(self) -> int | None:
        """Intra-op threads each run uses (None: onnxruntime's default, one per core)."""
        return self._threads

    @property
    def special_ids(self) -> tuple[list[int], list[int]]:
        """The special ids the tokenizer puts before and after every text ([CLS] and [SEP] for BERT): a
        token-id input that does not start and end with them was not made by this model's tokenizer."""
        return list(self._tokenizer.prefix), list(self._tokenizer.suffix)

    @property
    def max_text_chars(self) -> int:
        """Characters of a text that truncation ever looks at: past them a text is cut before tokenising
        (``max_length`` x 256; see ``TextTokenizer.encode``)."""
        return self._tokenizer.max_chars

    @property
    def providers(self) -> list[str]:
        """What the onnxruntime session really got, in priority order."""
        return list(self._session.get_providers())

    # -- embedding -------------------------------------------------------------------------
    def embed(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        truncate: bool | None = None,
        *,
        long_text: str | None = None,
        overlap: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Embed ``texts``; float32 ``(len(texts), dim)`` in input order. ``batch_size`` defaults to 32 on
        CPU and 128 on CUDA; the token budget (``max_batch_tokens``) caps every batch either way.

        A text longer than ``max_length`` tokens, by ``long_text``: ``"truncate"`` (default; keeps its first
        tokens, with a ``TruncationWarning``), ``"error"`` (``InputTooLongError``) or ``"chunk"`` (windows of
        ``max_length`` tokens sharing ``overlap`` tokens (None: 64, at most half a window), embedded in the
        same batches as the other texts, pooled as their token-weighted mean, normalised as the model's
        vectors are). ``truncate=True`` is ``long_text="truncate"`` and ``truncate=False`` is
        ``long_text="error"`` (the older spelling, kept). Texts that fit are embedded exactly as without
        chunking. ``show_progress`` draws a tqdm bar (tokens and texts; needs the ``progress`` extra).
        """
        mode = _resolve_long_text(truncate, long_text)
        batch_size = self._check_call(texts, batch_size)
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        plan = self.plan_rows(texts, mode, overlap)
        vectors = self._embed_rows(plan.rows, plan.owners, len(texts), batch_size, show_progress)
        if len(plan.rows) == len(texts):  # nothing was chunked: one row per text, in input order
            return vectors
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i in range(len(texts)):
            a, b = int(plan.first_row[i]), int(plan.first_row[i + 1])
            if b - a == 1:
                out[i] = vectors[a]
            else:
                out[i] = pool_windows(vectors[a:b], plan.token_counts[a:b], self._manifest.normalize)
                self._check_output(out[i : i + 1], np.array([i]))
        return out

    def embed_chunks(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        *,
        overlap: int | None = None,
        show_progress: bool = False,
    ) -> list[Chunks]:
        """Per text, its window vectors, character spans and token counts (a ``Chunks``), for indexes that
        store chunks rather than documents. A text that fits is one window spanning all of it (its vector is
        ``embed``'s); a longer one is cut as ``embed(..., long_text="chunk")`` cuts it, and each window's
        vector is the vector of ``text[a:b]`` for its span ``(a, b)``."""
        batch_size = self._check_call(texts, batch_size)
        if not texts:
            return []
        plan = self.plan_rows(texts, "chunk", overlap)
        vectors = self._embed_rows(plan.rows, plan.owners, len(texts), batch_size, show_progress)
        result = []
        for i in range(len(texts)):
            a, b = int(plan.first_row[i]), int(plan.first_row[i + 1])
            result.append(Chunks(vectors[a:b], tuple(plan.spans[a:b]), tuple(plan.token_counts[a:b])))
        return result

    def _check_call(self, texts: Sequence[str], batch_size: int | None) -> int:
        _check_texts(texts)
        if batch_size is None:
            batch_size = self._default_batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return batch_size

    def plan_rows(self, texts: Sequence[str], mode: str, overlap: int | None = None) -> RowPlan:
        """The token rows to embed: one per text that fits (or is truncated), and for ``mode="chunk"`` one
        per window of each text that does not fit, with the text each row belongs to. Public for callers
        that batch rows themselves (the server); ``embed`` is this plus batching and pooling."""
        budget = self.max_length - len(self._tokenizer.prefix) - len(self._tokenizer.suffix)
        if overlap is None:  # 64 tokens, or half a window for models with short windows
            overlap = min(DEFAULT_OVERLAP, budget // 2)
        if mode == "chunk":
            check_overlap(overlap, budget)
        encoded = self.tokenize(texts)
        long = encoded.truncated
        spans = [(0, len(t)) for t in texts]
        counts = [len(r) for r in encoded.ids]
        if long and mode == "error":
            i = long[0]
            if len(texts[i]) > self._tokenizer.max_chars:  # counting all of a huge text takes seconds
                raise InputTooLongError(i, self.max_length + 1, self.max_length, at_least=True)
            raise InputTooLongError(i, self.count_tokens(texts[i]), self.max_length)
        if long and mode == "truncate":
            warnings.warn(TruncationWarning(len(long), long, self.max_length), stacklevel=3)
        if mode != "chunk" or not long:
            n = len(texts)
            return RowPlan(encoded.ids, np.arange(n), np.arange(n + 1), spans, counts)
        content = dict(zip(long, self._tokenizer.encode_content([texts[i] for i in long])))
        prefix, suffix = self._tokenizer.prefix, self._tokenizer.suffix
        rows: list[list[int]] = []
        owners: list[int] = []
        first_row = [0]
        row_spans: list[tuple[int, int]] = []
        for i in range(len(texts)):
            enc = content.get(i)
            if enc is None:
                rows.append(encoded.ids[i])
                owners.append(i)
                row_spans.append(spans[i])
            else:
                for w in plan_windows(enc.word_ids, enc.offsets, budget, overlap):
                    rows.append(prefix + enc.ids[w.start : w.end] + suffix)
                    owners.append(i)
                    row_spans.append((w.char_start, w.char_end))
            first_row.append(len(rows))
        return RowPlan(rows, np.array(owners), np.array(first_row), row_spans, [len(r) for r in rows])

    def _embed_rows(
        self, rows: list[list[int]], owners: np.ndarray, n_texts: int, batch_size: int, show_progress: bool
    ) -> np.ndarray:
        """Embed token rows (special tokens included, at most ``max_length``) in length-sorted batches;
        float32 ``(len(rows), dim)`` in row order. Errors name the text (``owners``) a bad row came from."""
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        progress = Progress(int(lengths.sum()), n_texts, owners) if show_progress else None
        batches = make_batches(
            rows, lengths, self._manifest.pad_token_id, batch_size, self._max_batch_tokens,
            pad_multiple=self._pad_multiple, max_length=self.max_length,
        )
        try:
            for batch, vectors in self._run_batches(batches):
                self._check_output(vectors, owners[batch.indices])
                out[batch.indices] = vectors
                if progress is not None:
                    progress.update(batch.indices, int(lengths[batch.indices].sum()))
        finally:
            if progress is not None:
                progress.close()
        return out

    def _run_batches(self, batches: Iterator[Batch]) -> Iterator[tuple[Batch, np.ndarray]]:
        """Each batch with its vectors, in order. With ``workers`` > 1 (CPU), up to ``workers`` batches run at
        once from a thread pool, and at most one more is padded ahead (memory stays a few batches)."""
        if self._workers == 1 or self._device != "cpu":
            for batch in batches:
                yield batch, self._run(batch.input_ids, batch.attention_mask)
            return
        pool = self._pool()
        window: deque[tuple[Batch, Future]] = deque()
        for batch in batches:
            window.append((batch, pool.submit(self._run, batch.input_ids, batch.attention_mask)))
            if len(window) > self._workers:
                done, future = window.popleft()
                yield done, future.result()
        while window:
            done, future = window.popleft()
            yield done, future.result()

    def _pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._batch_pool is None:
                self._batch_pool = ThreadPoolExecutor(self._workers, thread_name_prefix="embed-run")
            return self._batch_pool

    def embed_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Embed one pre-tokenised, padded batch (int64 ``[n, length]`` ids and 0/1 mask), as one run.

        For callers that tokenise themselves (or benchmark the graph alone); no batching, sorting or
        truncation happens here, so the caller owns ``length <= max_length`` and the padding."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"input_ids and attention_mask must be 2-D and the same shape, got {ids.shape} and {mask.shape}")
        if ids.shape[1] > self.max_length:
            raise InputTooLongError(0, int(ids.shape[1]), self.max_length)
        if ids.shape[0] == 0:
            return np.empty((0, self.dim), np.float32)
        vectors = self._run(ids, mask)
        self._check_output(vectors, np.arange(len(ids)))
        return vectors

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One graph run with IO binding: inputs are copied to the device once, and the output is written
        straight into a host array we own (no second host copy, no output allocation by onnxruntime)."""
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self._input_names:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        out = np.empty((input_ids.shape[0], self.dim), dtype=self._output_dtype)
        binding = self._session.io_binding()
        for name in self._input_names:
            binding.bind_cpu_input(name, feed[name])
        binding.bind_output(self._output_name, "cpu", 0, out.dtype, out.shape, out.ctypes.data)
        with self._run_slots:
            self._session.run_with_iobinding(binding)
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` with special tokens and without truncation (to report how long it was)."""
        return self._tokenizer.count_tokens(text)

    def embed_queries(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        truncate: bool | None = None,
        *,
        long_text: str | None = None,
        overlap: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Embed search queries: the manifest's query instruction is prepended to each text; the other
        arguments are ``embed``'s."""
        _check_texts(texts)
        prefix = self._manifest.query_instruction
        return self.embed(
            [prefix + t for t in texts], batch_size=batch_size, truncate=truncate, long_text=long_text,
            overlap=overlap, show_progress=show_progress,
        )

    def tokenize(self, texts: Sequence[str]) -> Encoded:
        """Token ids (special tokens included, cut to ``max_length``) of each text as ``embed`` feeds them,
        and which texts were cut; for callers that batch themselves (the server). Thread-safe."""
        _check_texts(texts)
        texts = list(texts)
        try:
            return self._tokenizer.encode(texts)
        except (UnicodeError, TypeError):  # tokenizers rejects unencodable str with a TypeError
            for i, t in enumerate(texts):
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ValueError(
                        f"input {i} is not valid Unicode text ({exc.reason} at position {exc.start}, e.g. a "
                        "lone surrogate); clean it first, e.g. text.encode('utf-8', 'replace').decode()"
                    ) from exc
            raise

    def _check_output(self, vectors: np.ndarray, indices: np.ndarray) -> None:
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise InvalidOutputError(int(indices[bad]), "NaN or inf in the vector", self._precision)
        if self._manifest.normalize:
            norms = np.linalg.norm(vectors, axis=1)
            off = np.abs(norms - 1.0) > _NORM_TOLERANCE
            if off.any():
                bad = int(np.flatnonzero(off)[0])
                raise InvalidOutputError(int(indices[bad]), f"norm {norms[bad]:.6f}, expected 1", self._precision)

    def __repr__(self) -> str:
        return (
            f"Embedder({str(self._root)!r}, device={self._device!r}, precision={self._precision!r}, "
            f"dim={self.dim}, providers={self.providers})"
        )


def _check_texts(texts: object) -> None:
    if isinstance(texts, str):
        raise TypeError("texts must be a list or tuple of str, got a single str; wrap it: embed([text])")
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a list or tuple of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, not str; convert or drop it before embedding")


def _resolve_long_text(truncate: bool | None, long_text: str | None) -> str:
    """One mode from the two spellings: ``truncate=True`` is ``"truncate"``, ``truncate=False`` is
    ``"error"``; both given must agree."""
    if long_text is None:
        return "error" if truncate is False else "truncate"
    if long_text not in LONG_TEXT_MODES:
        raise ValueError(f"long_text must be one of {LONG_TEXT_MODES}, got {long_text!r}")
    if truncate is not None and (long_text == "truncate") != bool(truncate):
        raise ValueError(
            f"truncate={truncate} contradicts long_text={long_text!r}; pass long_text alone "
            "(truncate=True is long_text='truncate', truncate=False is long_text='error')"
        )
    return long_text
