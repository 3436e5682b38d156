"""The artifact manifest: one JSON file beside the .onnx files, loaded into frozen dataclasses.

The runtime takes every model fact (pooling, normalisation, max length, names, hashes) from here and
never guesses. The export stage writes it through :func:`Manifest.to_dict`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
POOLINGS = ("cls", "mean")
KINDS = ("embedder", "reranker")
TRUNCATIONS = ("only_second",)


@dataclass(frozen=True)
class FileEntry:
    """One file of the artifact, relative to the artifact directory."""

    path: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Parity:
    """Agreement of a variant with the PyTorch reference, measured at export time."""

    validated: bool
    min_cosine: float | None = None
    mean_cosine: float | None = None
    max_abs_diff: float | None = None
    n_texts: int = 0
    gate_min_cosine: float | None = None
    device: str | None = None
    note: str = ""
    # with --validate-with: Spearman on the labelled pairs, the reference's, their ratio and the gate
    quality: Mapping[str, Any] = field(default_factory=dict)
    # rerankers: agreement of the ranking of each probe query's passages with the reference's (Kendall tau,
    # top-k overlap), the sigmoid score error and the gates (cosine does not apply to a scalar score)
    ranking: Mapping[str, Any] = field(default_factory=dict)
    # bge-m3: agreement of the sparse and ColBERT outputs (lexical and ColBERT scores between the probe texts,
    # top-10 token overlap, ColBERT vector cosine) and their gates
    m3: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    """One ONNX graph of the artifact (fp32, fp16 or int8) and how it was built and checked."""

    precision: str
    model_file: str
    files: tuple[FileEntry, ...]
    execution_provider: str
    parity: Parity
    fused_operators: Mapping[str, int] = field(default_factory=dict)
    build: Mapping[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)


@dataclass(frozen=True)
class Source:
    """Where the weights came from."""

    model: str
    revision: str | None
    local_path: bool
    random_weights: bool
    architecture: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairFormat:
    """How a cross-encoder (``kind == "reranker"``) reads a (query, passage) pair, as FlagEmbedding's
    FlagReranker tokenises it: the query's own tokens are cut to ``query_max_length``, then the pair is
    wrapped by the tokenizer's pair template (BERT: ``[CLS] q [SEP] p [SEP]``; XLM-R: ``<s> q </s></s> p
    </s>``) and only the passage is cut to fit ``max_length`` (``truncation``). ``token_type_ids``: the graph
    reads segment ids (BERT: 0 up to the first separator, 1 after). The graph's output is the raw relevance
    logit; ``activation`` is what ``normalize=True`` applies (FlagReranker's ``compute_score(...,
    normalize=True)``)."""

    query_max_length: int
    truncation: str = "only_second"
    token_type_ids: bool = False
    activation: str = "sigmoid"


@dataclass(frozen=True)
class M3Heads:
    """bge-m3's two extra graph outputs beside the dense vector (FlagEmbedding's BGEM3FlagModel formulas).
    ``sparse_output``: float32 ``[batch, sequence]``, each token's lexical weight relu(sparse_linear(h)); a
    text's lexical weights are the max per token id over its real tokens, ``skip_token_ids`` (cls, eos, pad,
    unk) and weights <= 0 dropped. ``colbert_output``: float32 ``[batch, sequence - 1, colbert_dim]``, the
    normalised ColBERT vector of every token after the first; a text of n tokens keeps the first n - 1 rows."""

    sparse_output: str
    colbert_output: str
    colbert_dim: int
    skip_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    source: Source
    pooling: str
    normalize: bool
    max_length: int
    query_instruction: str
    dimension: int
    input_names: tuple[str, ...]
    output_name: str
    opset: int
    tokenizer: FileEntry
    pad_token_id: int
    variants: Mapping[str, Variant]
    versions: Mapping[str, str] = field(default_factory=dict)
    created_at: str = ""
    # "embedder": the output is the pooled (normalised) vector; "reranker": the output is one relevance
    # logit per (query, passage) pair, read as ``pair`` says. Manifests written before rerankers existed
    # have no kind and are embedders.
    kind: str = "embedder"
    pair: PairFormat | None = None
    # bge-m3: the sparse (lexical) and ColBERT outputs of the same graph; None for every other model
    m3: M3Heads | None = None

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_names"] = list(self.input_names)
        for v in d["variants"].values():
            v["files"] = list(v["files"])
        if d["pair"] is None:
            del d["pair"]
        if d["m3"] is None:
            del d["m3"]
        else:
            d["m3"]["skip_token_ids"] = list(self.m3.skip_token_ids)  # type: ignore[union-attr]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        try:
            version = d["schema_version"]
            if version != SCHEMA_VERSION:
                raise ArtifactError(
                    f"manifest schema version {version} is not supported by this runtime (expects "
                    f"{SCHEMA_VERSION}); re-export the model with the matching `python -m export`"
                )
            variants = {
                name: Variant(
                    precision=v["precision"],
                    model_file=v["model_file"],
                    files=tuple(FileEntry(**f) for f in v["files"]),
                    execution_provider=v["execution_provider"],
                    parity=Parity(**v["parity"]),
                    fused_operators=dict(v.get("fused_operators", {})),
                    build=dict(v.get("build", {})),
                )
                for name, v in d["variants"].items()
            }
            m = cls(
                schema_version=version,
                source=Source(**d["source"]),
                pooling=d["pooling"],
                normalize=bool(d["normalize"]),
                max_length=int(d["max_length"]),
                query_instruction=d["query_instruction"],
                dimension=int(d["dimension"]),
                input_names=tuple(d["input_names"]),
                output_name=d["output_name"],
                opset=int(d["opset"]),
                tokenizer=FileEntry(**d["tokenizer"]),
                pad_token_id=int(d["pad_token_id"]),
                variants=variants,
                versions=dict(d.get("versions", {})),
                created_at=d.get("created_at", ""),
                kind=d.get("kind", "embedder"),
                pair=_pair(d.get("pair")),
                m3=_m3(d.get("m3")),
            )
        except (KeyError, TypeError) as exc:
            raise ArtifactError(
                f"manifest is missing or has a malformed field ({exc!r}); re-export the artifact"
            ) from exc
        m.check()
        return m

    def check(self) -> None:
        """Reject values the runtime cannot honour, so a bad manifest fails at load, not mid-run."""
        if self.kind not in KINDS:
            raise ArtifactError(f"manifest kind {self.kind!r} is not one of {KINDS}; upgrade the runtime or re-export")
        if self.kind == "reranker":
            if self.pair is None:
                raise ArtifactError("manifest of a reranker has no 'pair' format; re-export the artifact")
            if self.pair.truncation not in TRUNCATIONS or self.pair.activation != "sigmoid":
                raise ArtifactError(f"manifest pair format {self.pair} is not supported by this runtime")
            if not 1 <= self.pair.query_max_length < self.max_length:
                raise ArtifactError("manifest pair query_max_length must be between 1 and max_length - 1")
        if self.m3 is not None and (self.kind != "embedder" or self.m3.colbert_dim < 1):
            raise ArtifactError("manifest m3 heads belong to an embedder with a colbert_dim >= 1; re-export the artifact")
        if self.pooling not in POOLINGS:
            raise ArtifactError(f"manifest pooling {self.pooling!r} is not one of {POOLINGS}")
        if self.max_length < 2 or self.dimension < 1:
            raise ArtifactError("manifest max_length must be >= 2 and dimension >= 1")
        for name, v in self.variants.items():
            if name not in PRECISIONS or v.precision != name:
                raise ArtifactError(f"manifest variant {name!r} is not one of {PRECISIONS}")
        if not self.variants:
            raise ArtifactError("manifest lists no variants: the export wrote none that passed its gate")

    @property
    def is_reranker(self) -> bool:
        return self.kind == "reranker"

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ArtifactError(
                f"no {MANIFEST_NAME} in {directory}: point Embedder at a directory written by "
                "`python -m export --out DIR`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"cannot read {path}: {exc}; re-export the artifact") from exc
        if not isinstance(data, dict):
            raise ArtifactError(f"{path} is not a JSON object; re-export the artifact")
        return cls.from_dict(data)


def _m3(d: Mapping[str, Any] | None) -> M3Heads | None:
    if d is None:
        return None
    return M3Heads(sparse_output=d["sparse_output"], colbert_output=d["colbert_output"],
                   colbert_dim=int(d["colbert_dim"]), skip_token_ids=tuple(int(i) for i in d["skip_token_ids"]))


def _pair(d: Mapping[str, Any] | None) -> PairFormat | None:
    if d is None:
        return None
    return PairFormat(**d)
