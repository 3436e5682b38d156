"""``BGEM3FlagModel`` with FlagEmbedding's constructor and methods, backed by a bge-m3 artifact.

``from FlagEmbedding import BGEM3FlagModel`` becomes ``from runtime.compat import BGEM3FlagModel`` with an
artifact directory (exported from a bge-m3 checkpoint) in place of the hub id. Behaviour follows FlagEmbedding
1.x (``inference/embedder/encoder_only/m3.py``):

- ``encode`` / ``encode_queries`` / ``encode_corpus`` return ``{"dense_vecs", "lexical_weights",
  "colbert_vecs"}`` (an output not asked for is None); defaults ``return_dense=True``, sparse and ColBERT off,
  ``batch_size`` 256, ``query_max_length`` / ``passage_max_length`` 512 (``max_length`` per call overrides;
  longer texts are cut silently, as FlagEmbedding cuts them). A single ``str`` gives one text's outputs.
- ``lexical_weights``: per text ``{str(token id): weight}`` (float32 values), as FlagEmbedding keys them;
  ``convert_id_to_token`` names the ids. ``colbert_vecs``: per text float32 ``(tokens - 1, dim)``.
- ``compute_lexical_matching_score``, ``colbert_score`` (a float here, a 0-d torch tensor there) and
  ``compute_score`` (pairs -> ``{"colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"}`` lists,
  ``weights_for_different_modes`` = [dense, sparse, colbert], default equal).
- Device and precision as ``FlagModel``: FP32 on CPU (``precision="int8"`` for the quantised graph), FP16 on
  CUDA when ``use_fp16``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..embedder import Embedder, TruncationWarning
from ..errors import ArtifactError
from ..m3 import M3Output, colbert_score, hybrid_scores, lexical_score
from ..manifest import Manifest
from .flagembedding import _placement

class BGEM3FlagModel:
    """FlagEmbedding's ``BGEM3FlagModel`` over the ONNX runtime (see the module docstring)."""

    def __init__(
        self,
        model_name_or_path: str | Path,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        devices: str | int | list[str] | list[int] | None = None,
        pooling_method: str = "cls",
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        precision: str | None = None,
        **kwargs: Any,
    ) -> None:
        manifest = Manifest.load(Path(model_name_or_path))
        if manifest.m3 is None:
            raise ArtifactError(f"{model_name_or_path} has no sparse or ColBERT outputs: export a bge-m3 checkpoint "
                                "(with colbert_linear.pt and sparse_linear.pt); for dense-only models use FlagModel")
        if pooling_method != manifest.pooling:
            raise ValueError(f"pooling_method={pooling_method!r} but the artifact pools by {manifest.pooling!r} "
                             "inside its graph; drop the argument")
        if not normalize_embeddings:
            raise ValueError("normalize_embeddings=False: the artifact normalises its dense and ColBERT vectors "
                             "inside the graph, as bge-m3 is meant to be used")
        device, device_id, precision = _placement(manifest, devices, use_fp16, precision)
        self.model = Embedder(model_name_or_path, device=device, precision=precision, device_id=device_id)
        self.model_name_or_path = str(model_name_or_path)
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.query_instruction_format = query_instruction_format.replace("\\n", "\n")
        self.batch_size = batch_size
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.return_dense, self.return_sparse, self.return_colbert_vecs = return_dense, return_sparse, return_colbert_vecs
        self.kwargs = kwargs

    # -- encoding ------------------------------------------------------------------------------
    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The asked-for outputs of ``sentences``, keyed as FlagEmbedding keys them."""
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)  # type: ignore[list-item]
        out = self._encode(
            texts, self.batch_size if batch_size is None else batch_size,
            self.passage_max_length if max_length is None else max_length,
            self.return_dense if return_dense is None else return_dense,
            self.return_sparse if return_sparse is None else return_sparse,
            self.return_colbert_vecs if return_colbert_vecs is None else return_colbert_vecs,
        )
        result: dict[str, Any] = {
            "dense_vecs": out.dense,
            "lexical_weights": None if out.sparse is None else [_keyed(w) for w in out.sparse],
            "colbert_vecs": out.colbert,
        }
        if single:
            result = {k: (v[0] if v is not None else None) for k, v in result.items()}
        return result

    def encode_queries(self, queries: str | Sequence[str], batch_size: int | None = None,
                       max_length: int | None = None, **kwargs: Any) -> dict[str, Any]:
        """Queries (with the retrieval instruction, when one was given), cut at ``query_max_length``."""
        if self.query_instruction_for_retrieval is not None:
            fmt, ins = self.query_instruction_format, self.query_instruction_for_retrieval
            queries = fmt.format(ins, queries) if isinstance(queries, str) else [fmt.format(ins, q) for q in queries]
        return self.encode(queries, batch_size, self.query_max_length if max_length is None else max_length, **kwargs)

    def encode_corpus(self, corpus: str | Sequence[str], batch_size: int | None = None,
                      max_length: int | None = None, **kwargs: Any) -> dict[str, Any]:
        """Passages, cut at ``passage_max_length``."""
        return self.encode(corpus, batch_size, self.passage_max_length if max_length is None else max_length, **kwargs)

    def _encode(self, texts: list[str], batch_size: int, max_length: int, dense: bool, sparse: bool,
                colbert: bool) -> M3Output:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=TruncationWarning)  # FlagEmbedding cuts silently
            return self.model.encode(texts, batch_size=batch_size, dense=dense, sparse=sparse, colbert=colbert,
                                     max_length=min(max_length, self.model.max_length))

    # -- scoring -------------------------------------------------------------------------------
    def convert_id_to_token(self, lexical_weights: Mapping[str, float] | list[Mapping[str, float]]) -> Any:
        """Lexical weights keyed by token text (one dict in, one dict out; a list of one dict gives a dict, as
        FlagEmbedding does)."""
        items = [lexical_weights] if isinstance(lexical_weights, Mapping) else list(lexical_weights)
        named = [self.model.lexical_tokens({int(t): w for t, w in item.items()}) for item in items]
        return named[0] if len(named) == 1 else named

    @staticmethod
    def compute_lexical_matching_score(lexical_weights_1: Any, lexical_weights_2: Any) -> Any:
        """Two dicts: their score (float); two lists: the matrix of scores of every pair."""
        if isinstance(lexical_weights_1, Mapping) and isinstance(lexical_weights_2, Mapping):
            return lexical_score(lexical_weights_1, lexical_weights_2)
        if isinstance(lexical_weights_1, list) and isinstance(lexical_weights_2, list):
            return np.array([[lexical_score(a, b) for b in lexical_weights_2] for a in lexical_weights_1])
        raise ValueError("The input format of lexical_weights is not correct.")

    @staticmethod
    def colbert_score(q_reps: np.ndarray, p_reps: np.ndarray) -> float:
        return colbert_score(q_reps, p_reps)

    def compute_score(
        self,
        sentence_pairs: tuple[str, str] | list[tuple[str, str]],
        batch_size: int | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        weights_for_different_modes: list[float] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Each pair's dense, sparse and ColBERT scores and their weighted means (FlagEmbedding's keys)."""
        if isinstance(sentence_pairs, list) and not sentence_pairs:
            return {}  # type: ignore[return-value]
        one = isinstance(sentence_pairs[0], str)
        pairs = [sentence_pairs] if one else list(sentence_pairs)
        weights = weights_for_different_modes or [1.0, 1.0, 1.0]
        if len(weights) != 3:
            raise ValueError("weights_for_different_modes must be [dense, sparse, colbert]")
        batch_size = self.batch_size if batch_size is None else batch_size
        q = self._encode([p[0] for p in pairs], batch_size, max_query_length or self.query_max_length, True, True, True)
        p = self._encode([p[1] for p in pairs], batch_size, max_passage_length or self.passage_max_length, True, True, True)
        scores: dict[str, list[float]] = {k: [] for k in ("colbert", "sparse", "dense", "sparse+dense",
                                                          "colbert+sparse+dense")}
        for i in range(len(pairs)):
            one_p = M3Output(dense=p.dense[i : i + 1], sparse=p.sparse[i : i + 1], colbert=p.colbert[i : i + 1])  # type: ignore[index]
            for k, v in hybrid_scores(q, one_p, weights, query_index=i).items():
                scores[k].append(float(v[0]))
        return {k: v[0] for k, v in scores.items()} if one else scores

    def __repr__(self) -> str:
        return f"BGEM3FlagModel({self.model_name_or_path!r}, precision={self.model.precision!r}, device={self.model.device!r})"


def _keyed(weights: dict[int, float]) -> dict[str, np.float32]:
    """FlagEmbedding's lexical weights: string ids, float32 values."""
    return {str(t): np.float32(w) for t, w in weights.items()}
