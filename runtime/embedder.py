"""The Embedder: text in, pooled and L2-normalised float32 vectors out, exactly as the manifest says."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .batching import make_batches
from .errors import ArtifactError, InputTooLongError, InvalidOutputError
from .integrity import check_external_data, verify_file
from .manifest import PRECISIONS, Manifest
from .providers import create_session, resolve_device
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
            "pass truncate=False to get an error instead"
        )


class Embedder:
    """Loads an artifact directory written by ``python -m export`` and embeds text with onnxruntime.

    One instance may be shared by threads: the tokenizer is never mutated after construction and
    ``InferenceSession.run`` is thread-safe; on CPU, runs are serialised (each already uses all intra-op
    threads), so many callers get the throughput of one instead of fighting over the cores.
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
    ) -> None:
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
        # On CPU one run already uses every intra-op thread; concurrent runs from many caller threads only
        # fight over the same cores (measured: 16 callers got half the throughput of one). Callers queue
        # here while tokenisation and batching still run in parallel. On CUDA, runs may overlap.
        self._run_lock: threading.Lock | contextlib.nullcontext = (
            threading.Lock() if self._device == "cpu" else contextlib.nullcontext()
        )

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
    def providers(self) -> list[str]:
        """What the onnxruntime session really got, in priority order."""
        return list(self._session.get_providers())

    # -- embedding -------------------------------------------------------------------------
    def embed(self, texts: Sequence[str], batch_size: int | None = None, truncate: bool = True) -> np.ndarray:
        """Embed ``texts``; float32 ``(len(texts), dim)`` in input order. ``batch_size`` defaults to 32 on
        CPU and 128 on CUDA; the token budget (``max_batch_tokens``) caps every batch either way."""
        _check_texts(texts)
        if batch_size is None:
            batch_size = self._default_batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encoded = self.tokenize(texts)
        if encoded.truncated:
            if not truncate:
                i = encoded.truncated[0]
                raise InputTooLongError(i, self.count_tokens(texts[i]), self.max_length)
            warnings.warn(TruncationWarning(len(encoded.truncated), encoded.truncated, self.max_length), stacklevel=2)
        for batch in make_batches(
            encoded.ids, encoded.lengths, self._manifest.pad_token_id, batch_size, self._max_batch_tokens,
            pad_multiple=self._pad_multiple, max_length=self.max_length,
        ):
            vectors = self._run(batch.input_ids, batch.attention_mask)
            self._check_output(vectors, batch.indices)
            out[batch.indices] = vectors
        return out

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
        with self._run_lock:
            self._session.run_with_iobinding(binding)
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` with special tokens and without truncation (to report how long it was)."""
        return self._tokenizer.count_tokens(text)

    def embed_queries(self, texts: Sequence[str], batch_size: int | None = None, truncate: bool = True) -> np.ndarray:
        """Embed search queries: the manifest's query instruction is prepended to each text."""
        _check_texts(texts)
        prefix = self._manifest.query_instruction
        return self.embed([prefix + t for t in texts], batch_size=batch_size, truncate=truncate)

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
