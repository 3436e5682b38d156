"""What every model kind shares: the artifact (manifest, verified files, tokenizer), the onnxruntime session,
batched runs (with IO binding on GPUs), and the run slots that keep concurrent callers from oversubscribing the cores.

``Embedder`` and ``Reranker`` are rooms built on this; neither copies it."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .batching import UNPADDED_PAST, Batch, make_batches
from .errors import ArtifactError, InputTooLongError, InvalidOutputError
from .integrity import check_external_data, verify_file
from .manifest import PRECISIONS, Manifest
from .providers import create_session, resolve_device, usable_cores
from .tokenizer import Encoded, TextTokenizer

_AUTO_ORDER = {"cuda": ("fp16", "fp32", "int8"), "cpu": ("int8", "fp32", "fp16")}
# Per device: texts per batch, padded tokens per batch, and the multiple the padded length is rounded up
# to. On CPU the cost is linear in tokens, so batches stay moderate and padding minimal. A GPU wants wide
# batches to fill its cores, and lengths on a multiple of 8 (tensor-core tiles; fewer distinct shapes for
# the CUDA memory arena and kernel selection).
_BATCHING = {"cpu": (32, 16384, 1), "cuda": (128, 65536, 8)}
_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_LOADERS = {"embedder": "Embedder", "reranker": "Reranker"}


class ModelSession:
    """Loads an artifact directory written by ``python -m export`` whose manifest says ``kind``, and runs its
    graph on padded batches. Thread-safe: the tokenizer is never mutated after construction and
    ``InferenceSession.run`` may be called from several threads; on CPU at most ``workers`` runs are in flight."""

    kind = "embedder"

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
        if self._manifest.kind != self.kind:
            raise ArtifactError(
                f"{self._root} holds a {self._manifest.kind} ({self._manifest.source.model}); load it with "
                f"runtime.{_LOADERS[self._manifest.kind]}, not {type(self).__name__}"
            )
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
        # a graph with flash attention for unpadded batches: long rows are batched only with rows of equal length
        # (on CUDA, padded to the tile multiple, they take the fused kernel, which has its own flash path there)
        self._unpadded_past = (UNPADDED_PAST if variant.build.get("flash_attention_layers") and self._pad_multiple == 1
                               else None)
        if self._precision == "fp16" and self._device == "cpu":
            warnings.warn(
                "running the fp16 variant on CPU: it is correct but slow (onnxruntime has few fp16 CPU "
                "kernels); use precision='int8' or 'fp32' on CPU",
                stacklevel=3,
            )
        files = [verify_file(self._root, f) for f in variant.files]
        model_path = self._root / variant.model_file
        if len(files) > 1:
            check_external_data(self._root, model_path, {Path(f.path).as_posix() for f in variant.files})
        tok_path = verify_file(self._root, self._manifest.tokenizer)
        self._tokenizer_path = tok_path
        self._tokenizer = TextTokenizer(tok_path, self._manifest.max_length)
        if threads is None and workers > 1 and self._device == "cpu":
            threads = max(1, usable_cores() // workers)
        self._workers = workers
        self._threads = threads
        self._model_path = model_path
        self._session = create_session(model_path, self._device, threads, device_id, spinning=spinning)
        self._lone: Any = None  # open_lone_session
        self._lone_threads = 0
        self._input_names = [i.name for i in self._session.get_inputs()]
        unknown = set(self._input_names) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise ArtifactError(f"graph {variant.model_file} wants inputs {sorted(unknown)} this runtime cannot feed")
        self._output_name = self._manifest.output_name
        self._output_names = [self._output_name]
        self._io_binding = self._device != "cpu"  # see _run
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
        """Width of one output row: the vector's dimension (embedders), 1 (rerankers: the logit)."""
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
        """(default rows per batch, padded tokens per batch, pad multiple) that batching uses; the server forms
        its cross-request batches by the same numbers."""
        return self._default_batch_size, self._max_batch_tokens, self._pad_multiple

    def batches(self, rows: list[list[int]], lengths: np.ndarray, batch_size: int | None = None) -> Iterator[Batch]:
        """Padded batches of token rows by this model's rules: its pad id, token budget, pad multiple, max length,
        and for a flash-attention graph no padding past ``unpadded_past`` tokens (``runtime/batching.py``)."""
        return make_batches(rows, lengths, self._manifest.pad_token_id, batch_size or self._default_batch_size,
                            self._max_batch_tokens, pad_multiple=self._pad_multiple, max_length=self.max_length,
                            unpadded_past=self._unpadded_past)

    @property
    def unpadded_past(self) -> int | None:
        """Rows longer than this many tokens are batched only with rows of their own length (no padding: the
        graph's flash-attention path, memory linear in length); None: any batch may be padded."""
        return self._unpadded_past

    @property
    def workers(self) -> int:
        """Graph runs that may be in flight at once on CPU (the server runs this many inference threads)."""
        return self._workers

    @property
    def threads(self) -> int | None:
        """Intra-op threads each run uses (None: onnxruntime's default, one per core)."""
        return self._threads

    @property
    def lone_threads(self) -> int:
        """Intra-op threads of the lone session (``open_lone_session``); 0 when there is none."""
        return self._lone_threads

    def open_lone_session(self, threads: int) -> None:
        """Open a second session of the same graph on ``threads`` spinning intra-op threads, for callers that
        schedule runs themselves (the server runs a batch that finds it idle there: ``run_tokens(lone=True)``).

        Why a second session: a session's thread count is fixed when it is made, and the best layout under load
        (one thread per run, several runs at once) is the slowest for a query alone (bge-small-zh INT8: 2.7 ms
        on one thread, 1.5 ms on two spinning threads; bge-large-zh 54 vs 34 ms). Its threads spin for about
        35 ms after a run, then sleep, so it costs no CPU when idle. It costs the model's memory again
        (prepacked weights are per session: +36 MB for bge-small-zh INT8, +300 MB for bge-large-zh). The
        outputs are the main session's bit for bit (the kernels split rows and columns across threads, never a
        sum). CPU only."""
        if self._device != "cpu":
            raise ValueError(f"a lone session is for CPU runs; this model runs on {self._device}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 2:
            raise ValueError(f"a lone session needs at least 2 threads (one thread is what a worker has), got {threads!r}")
        self._lone = create_session(self._model_path, "cpu", threads, spinning=True)
        self._lone_threads = threads

    def _session_for(self, lone: bool) -> Any:
        if not lone:
            return self._session
        if self._lone is None:
            raise ValueError("lone=True needs open_lone_session() first")
        return self._lone

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

    # -- tokenising ----------------------------------------------------------------------------
    def tokenize(self, texts: list[str] | tuple[str, ...]) -> Encoded:
        """Token ids (special tokens included, cut to ``max_length``) of each text, and which texts were cut;
        for callers that batch themselves (the server). Thread-safe."""
        check_texts(texts)
        texts = list(texts)
        try:
            return self._tokenizer.encode(texts)
        except (UnicodeError, TypeError):  # tokenizers rejects unencodable str with a TypeError
            raise_unencodable(texts)
            raise

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` with special tokens and without truncation (to report how long it was)."""
        return self._tokenizer.count_tokens(text)

    # -- running -------------------------------------------------------------------------------
    def run_tokens(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None,
        *, lone: bool = False,
    ) -> np.ndarray:
        """One pre-tokenised, padded batch (int64 ``[n, length]`` ids and 0/1 mask, and segment ids for a
        pair model whose graph reads them; zeros if not given) as one run: float32 ``[n, dim]``, checked. No
        batching, sorting or truncation happens here, so the caller owns ``length <= max_length`` and the
        padding. ``lone``: on the session ``open_lone_session`` opened."""
        ids, mask = self._checked_batch(input_ids, attention_mask)
        if ids.shape[0] == 0:
            return np.empty((0, self.dim), np.float32)
        types = None
        if token_type_ids is not None:
            types = np.ascontiguousarray(token_type_ids, dtype=np.int64)
            if types.shape != ids.shape:
                raise ValueError(f"token_type_ids must have the shape of input_ids {ids.shape}, got {types.shape}")
        out = self._run(ids, mask, types, lone=lone)
        self._check_output(out, np.arange(len(ids)))
        return out

    def _checked_batch(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A caller's padded batch as contiguous int64 arrays, refused if the shapes disagree or it is longer
        than ``max_length``."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"input_ids and attention_mask must be 2-D and the same shape, got {ids.shape} and {mask.shape}")
        if ids.shape[1] > self.max_length:
            raise InputTooLongError(0, int(ids.shape[1]), self.max_length)
        return ids, mask

    @property
    def reads_token_types(self) -> bool:
        """Whether the graph has a ``token_type_ids`` input (BERT cross-encoders: the passage's segment)."""
        return "token_type_ids" in self._input_names

    def _run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None,
        lone: bool = False,
    ) -> np.ndarray:
        """One graph run. On CPU a plain ``run`` (the output is a few kB; building an IO binding per run
        costs more Python than the copy it saves: measured 30 us of a 0.3 ms small-model run). Elsewhere with
        IO binding: inputs are copied to the device once, and the output is written straight into a host
        array we own (no second host copy, no output allocation by onnxruntime)."""
        session = self._session_for(lone)
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self._input_names:
            feed["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        if not self._io_binding:
            with self._run_slots:
                (raw,) = session.run(self._output_names, feed)
            raw = raw.reshape(input_ids.shape[0], self.dim)
            return raw if raw.dtype == np.float32 else raw.astype(np.float32)
        out = np.empty((input_ids.shape[0], self.dim), dtype=self._output_dtype)
        binding = session.io_binding()
        for name in self._input_names:
            binding.bind_cpu_input(name, feed[name])
        shape = out.shape if not self._manifest.is_reranker else (out.shape[0],)  # the graph gives [batch] logits
        binding.bind_output(self._output_name, "cpu", 0, out.dtype, shape, out.ctypes.data)
        with self._run_slots:
            session.run_with_iobinding(binding)
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def _run_named(self, input_ids: np.ndarray, attention_mask: np.ndarray, names: tuple[str, ...],
                   lone: bool = False) -> list[np.ndarray]:
        """One graph run fetching the outputs ``names`` (bge-m3's dense, sparse and ColBERT outputs), float32.
        onnxruntime allocates them: their shapes depend on the batch's length."""
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        session = self._session_for(lone)
        with self._run_slots:
            outs = session.run(list(names), feed)
        return [o if o.dtype == np.float32 else o.astype(np.float32) for o in outs]

    def _run_batches(
        self, batches: Iterator[Batch], types: Callable[[Batch], np.ndarray | None] | None = None,
        outputs: tuple[str, ...] | None = None,
    ) -> Iterator[tuple[Batch, Any]]:
        """Each batch with its output, in order (``types`` gives a batch's segment ids, for pair models;
        ``outputs`` names several graph outputs to fetch, and each batch then comes with their list). With
        ``workers`` > 1 (CPU), up to ``workers`` batches run at once from a thread pool, and at most one more
        is padded ahead (memory stays a few batches)."""

        def run(batch: Batch) -> Any:
            if outputs is not None:
                return self._run_named(batch.input_ids, batch.attention_mask, outputs)
            return self._run(batch.input_ids, batch.attention_mask, types(batch) if types else None)

        if self._workers == 1 or self._device != "cpu":
            for batch in batches:
                yield batch, run(batch)
            return
        pool = self._pool()
        window: deque[tuple[Batch, Future]] = deque()
        for batch in batches:
            window.append((batch, pool.submit(run, batch)))
            if len(window) > self._workers:
                done, future = window.popleft()
                yield done, future.result()
        while window:
            done, future = window.popleft()
            yield done, future.result()

    def _pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._batch_pool is None:
                self._batch_pool = ThreadPoolExecutor(self._workers, thread_name_prefix="model-run")
            return self._batch_pool

    def _check_output(self, out: np.ndarray, indices: np.ndarray) -> None:
        """Raise ``InvalidOutputError`` naming the input of the first bad row; subclasses add their checks."""
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise InvalidOutputError(int(indices[bad]), "NaN or inf in the output", self._precision)


def check_texts(texts: object, what: str = "texts") -> None:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a list or tuple of str, got a single str; wrap it: [text]")
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"{what} must be a list or tuple of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, not str; convert or drop it first")


def raise_unencodable(texts: list[str]) -> None:
    """Name the first text that is not valid Unicode (a lone surrogate), if any."""
    for i, t in enumerate(texts):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"input {i} is not valid Unicode text ({exc.reason} at position {exc.start}, e.g. a "
                "lone surrogate); clean it first, e.g. text.encode('utf-8', 'replace').decode()"
            ) from exc
