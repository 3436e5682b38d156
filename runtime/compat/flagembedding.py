"""``FlagModel`` with FlagEmbedding's constructor and methods, backed by an exported artifact.

A script written against the BGE model card (``from FlagEmbedding import FlagModel``) changes that one import
to ``from runtime.compat import FlagModel`` and passes an artifact directory instead of a hub id. Behaviour
follows FlagEmbedding 1.x (``inference/embedder/encoder_only/base.py`` and ``abc/inference/AbsEmbedder.py``):

- ``encode_queries`` prepends ``query_instruction_for_retrieval`` (formatted by ``query_instruction_format``,
  default ``"{}{}"``) when one is given, and nothing otherwise (not the manifest's instruction: FlagModel's
  default is none); ``encode_corpus`` prepends ``passage_instruction_for_retrieval`` if given (a keyword
  argument, as in FlagEmbedding), else nothing; ``encode`` takes an explicit ``instruction``.
- ``batch_size`` 256, ``query_max_length`` / ``passage_max_length`` 512 (the per-call ``max_length``
  overrides), capped by the artifact's own max length; longer inputs are cut, as FlagEmbedding cuts them.
- Vectors are numpy float32 (also from the FP16 variant, whose graph returns float32), L2-normalised when
  ``normalize_embeddings`` (default True); a single ``str`` gives a 1-D vector, a list a 2-D array;
  ``convert_to_numpy=False`` gives a torch tensor (torch must then be installed).
- ``use_fp16`` (default True) picks the FP16 variant on CUDA; on CPU FlagEmbedding runs FP32 whatever
  ``use_fp16`` says, and so does this class unless ``precision=`` asks for another variant (e.g. ``"int8"``,
  faster on CPU, within 0.99 cosine of FP32).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..embedder import Embedder, TruncationWarning
from ..manifest import Manifest
from ..providers import resolve_device
from ..reranker import Reranker, sigmoid


class FlagModel:
    """FlagEmbedding's ``FlagModel`` over the ONNX runtime (see the module docstring for the behaviour)."""

    def __init__(
        self,
        model_name_or_path: str | Path,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        devices: str | int | list[str] | list[int] | None = None,
        pooling_method: str | None = None,
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        convert_to_numpy: bool = True,
        precision: str | None = None,
        **kwargs: Any,
    ) -> None:
        manifest = Manifest.load(Path(model_name_or_path))
        if pooling_method is not None and pooling_method != manifest.pooling:
            raise ValueError(
                f"pooling_method={pooling_method!r} but the artifact pools by {manifest.pooling!r} inside its "
                f"graph; drop the argument or re-export with `python -m export --pooling {pooling_method}`"
            )
        if not normalize_embeddings and manifest.normalize:
            raise ValueError(
                "normalize_embeddings=False but the artifact normalises inside its graph; re-export with "
                "`python -m export --no-normalize` to get unnormalised vectors"
            )
        device, device_id, precision = _placement(manifest, devices, use_fp16, precision)
        self.model = Embedder(model_name_or_path, device=device, precision=precision, device_id=device_id)
        self.model_name_or_path = str(model_name_or_path)
        self.normalize_embeddings = normalize_embeddings
        self.use_fp16 = use_fp16
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.query_instruction_format = query_instruction_format.replace("\\n", "\n")
        self.pooling_method = manifest.pooling
        self.batch_size = batch_size
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.convert_to_numpy = convert_to_numpy
        self.kwargs = kwargs
        for k, v in kwargs.items():  # FlagEmbedding keeps extra keyword arguments as attributes
            setattr(self, k, v)

    def encode_queries(
        self,
        queries: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Queries, with the retrieval instruction prepended when one was given."""
        return self.encode(
            queries, batch_size=batch_size, max_length=self.query_max_length if max_length is None else max_length,
            convert_to_numpy=convert_to_numpy, instruction=self.query_instruction_for_retrieval,
            instruction_format=self.query_instruction_format, **kwargs,
        )

    def encode_corpus(
        self,
        corpus: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Passages, with no instruction (unless ``passage_instruction_for_retrieval`` was given)."""
        return self.encode(
            corpus, batch_size=batch_size, max_length=max_length, convert_to_numpy=convert_to_numpy,
            instruction=self.kwargs.get("passage_instruction_for_retrieval"),
            instruction_format=self.kwargs.get("passage_instruction_format", "{}{}"), **kwargs,
        )

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        instruction: str | None = None,
        instruction_format: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Texts as they are (or formatted with ``instruction``); FlagEmbedding's tokenizer ``**kwargs``
        have no equivalent here and are ignored."""
        batch_size = self.batch_size if batch_size is None else batch_size
        max_length = self.passage_max_length if max_length is None else max_length
        convert_to_numpy = self.convert_to_numpy if convert_to_numpy is None else convert_to_numpy
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        if instruction is not None:
            fmt = instruction_format or "{}{}"
            texts = [fmt.format(instruction, t) for t in texts]
        vectors = self._embed(texts, batch_size, max_length)
        if self.normalize_embeddings and not self.model.manifest.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        out = vectors[0] if single else vectors
        if convert_to_numpy:
            return out
        try:
            import torch
        except ImportError as exc:
            raise ImportError("convert_to_numpy=False returns a torch tensor and torch is not installed; "
                              "keep convert_to_numpy=True (numpy float32) or install torch") from exc
        return torch.from_numpy(out)

    def _embed(self, texts: list[str], batch_size: int, max_length: int) -> np.ndarray:
        """As FlagEmbedding: cut at ``max_length`` tokens (special tokens included) without a fuss."""
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=TruncationWarning)  # FlagEmbedding cuts silently
            return self.model.encode(texts, batch_size=batch_size, max_length=min(max_length, self.model.max_length)).dense

    def __repr__(self) -> str:
        emb = self.model
        return f"FlagModel({self.model_name_or_path!r}, precision={emb.precision!r}, device={emb.device!r})"


def _placement(manifest: Manifest, devices: str | int | list[str] | list[int] | None, use_fp16: bool,
               precision: str | None) -> tuple[str, int, str]:
    """(device, device id, variant) as FlagEmbedding would run: FP16 on CUDA when ``use_fp16`` and the artifact
    has it, FP32 otherwise (FlagEmbedding runs FP32 on CPU whatever ``use_fp16`` says); ``precision`` wins."""
    device, device_id = _device(devices)
    if precision is None:
        on_cuda = resolve_device(device) == "cuda"
        precision = "fp16" if on_cuda and use_fp16 and "fp16" in manifest.variants else "fp32"
    return device, device_id, precision


def _device(devices: str | int | list[str] | list[int] | None) -> tuple[str, int]:
    """FlagEmbedding's ``devices`` as (device, device_id): one device; a list uses its first, with a warning
    (one process here; run one FlagModel per GPU for data parallelism)."""
    if devices is None:
        return "auto", 0
    if isinstance(devices, list):
        if not devices:
            raise ValueError("devices is an empty list; pass None, 'cpu', 'cuda:0' or a GPU index")
        if len(devices) > 1:
            warnings.warn(f"FlagModel here runs on one device; using {devices[0]!r} of {devices}", stacklevel=3)
        devices = devices[0]
    if isinstance(devices, int):
        return "cuda", devices
    name, _, index = devices.partition(":")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"devices={devices!r}: this runtime runs on 'cpu' or 'cuda[:N]' only")
    return name, int(index or 0)


class FlagReranker:
    """FlagEmbedding's ``FlagReranker`` over the ONNX runtime: ``from runtime.compat import FlagReranker``, an
    artifact directory of a cross-encoder in place of the hub id, the same calls. Behaviour follows
    FlagEmbedding 1.x (``inference/reranker/encoder_only/base.py``): ``compute_score(pairs)`` takes a list of
    (query, passage) pairs or one pair and returns a list of floats (raw logits; their sigmoid with
    ``normalize=True``); the query is cut to ``query_max_length`` (default 3/4 of ``max_length``), then the
    passage so the pair fits ``max_length`` (default 512, capped by the artifact's); optional query and passage
    instructions are put in front by their formats. FP32 on CPU (as FlagEmbedding), FP16 on CUDA with
    ``use_fp16``, or the variant ``precision=`` names (``"int8"``: faster on CPU, ranking-gated at export)."""

    def __init__(
        self,
        model_name_or_path: str | Path,
        use_fp16: bool = False,
        query_instruction_for_rerank: str | None = None,
        query_instruction_format: str = "{}{}",
        passage_instruction_for_rerank: str | None = None,
        passage_instruction_format: str = "{}{}",
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        devices: str | int | list[str] | list[int] | None = None,
        batch_size: int = 128,
        query_max_length: int | None = None,
        max_length: int = 512,
        normalize: bool = False,
        precision: str | None = None,
        **kwargs: Any,
    ) -> None:
        device, device_id, precision = _placement(Manifest.load(Path(model_name_or_path)), devices, use_fp16, precision)
        self.model = Reranker(model_name_or_path, device=device, precision=precision, device_id=device_id)
        self.model_name_or_path = str(model_name_or_path)
        self.use_fp16 = use_fp16
        self.query_instruction_for_rerank = query_instruction_for_rerank
        self.query_instruction_format = query_instruction_format.replace("\\n", "\n")
        self.passage_instruction_for_rerank = passage_instruction_for_rerank
        self.passage_instruction_format = passage_instruction_format.replace("\\n", "\n")
        self.batch_size = batch_size
        self.query_max_length = query_max_length
        self.max_length = max_length
        self.normalize = normalize

    def compute_score(
        self,
        sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
        batch_size: int | None = None,
        query_max_length: int | None = None,
        max_length: int | None = None,
        normalize: bool | None = None,
        **kwargs: Any,
    ) -> list[float]:
        if isinstance(sentence_pairs, (list, tuple)) and sentence_pairs and isinstance(sentence_pairs[0], str):
            sentence_pairs = [sentence_pairs]  # type: ignore[list-item]
        pairs = [(self._instruct(self.query_instruction_format, self.query_instruction_for_rerank, q),
                  self._instruct(self.passage_instruction_format, self.passage_instruction_for_rerank, p))
                 for q, p in sentence_pairs]  # type: ignore[misc]
        if not pairs:
            return []
        max_length = min(max_length or self.max_length, self.model.max_length)
        if query_max_length is None:
            query_max_length = self.query_max_length if self.query_max_length is not None else max_length * 3 // 4
        query_max_length = min(query_max_length, max_length - 4)
        enc = self.model.tokenize_pairs(pairs, max_length=max_length, query_max_length=query_max_length)
        logits = self.model.score_rows(enc, batch_size or self.batch_size)
        normalize = self.normalize if normalize is None else normalize
        scores = sigmoid(logits) if normalize else logits.astype(np.float64)
        return [float(s) for s in scores]

    @staticmethod
    def _instruct(fmt: str, instruction: str | None, text: str) -> str:
        return text if instruction is None else fmt.format(instruction, text)
