"""Find the checkpoint (hub id, local directory or random architecture) and read what the export
needs from it: pooling, normalisation, max length and query instruction."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .architectures import ARCHITECTURES, BGE_EN_INSTRUCTION, BGE_ZH_INSTRUCTION, materialise

MODEL_TYPES = ("bert", "xlm-roberta")
RERANKER_MAX_LENGTH = 512  # FlagReranker's compute_score default, whatever the model's positions
from .errors import SourceModelError

_HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "sentencepiece.bpe.model",  # XLM-R tokenizers without tokenizer.json
    "colbert_linear.pt",  # bge-m3's heads (state dicts, loaded with weights_only=True)
    "sparse_linear.pt",
]
M3_HEADS = ("colbert_linear.pt", "sparse_linear.pt")


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint on local disk and the embedding recipe that goes with it."""

    name: str
    path: Path
    revision: str | None
    local: bool
    random_weights: bool
    pooling: str
    normalize: bool
    max_length: int
    query_instruction: str
    config: dict[str, Any] = field(default_factory=dict)
    kind: str = "embedder"  # or "reranker": a cross-encoder (...ForSequenceClassification, one label)
    query_max_length: int = 0  # rerankers: the query's own tokens are cut to this (FlagReranker: 3/4 of max)
    m3: bool = False  # bge-m3: colbert_linear.pt and sparse_linear.pt beside the encoder become extra outputs

    @property
    def architecture(self) -> dict[str, Any]:
        c = self.config
        return {
            "model_type": c.get("model_type"),
            "layers": c.get("num_hidden_layers"),
            "hidden": c.get("hidden_size"),
            "heads": c.get("num_attention_heads"),
            "intermediate": c.get("intermediate_size"),
            "vocab_size": c.get("vocab_size"),
            "max_positions": c.get("max_position_embeddings"),
        }


def _read_json(path: Path) -> dict[str, Any] | list[Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceModelError(f"cannot read {path}: {exc}; the checkpoint is damaged") from exc


def download(model_id: str, revision: str | None) -> tuple[Path, str | None]:
    """Fetch only the files the export reads (safetensors, configs, tokenizer) from the hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        path = Path(snapshot_download(repo_id=model_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceModelError(
            f"could not get '{model_id}' from the Hugging Face hub ({type(exc).__name__}: {first_line}). "
            "Either the id is wrong, the revision does not exist, or this machine has no network access to "
            "the hub. Download the checkpoint elsewhere and pass its directory with `--model PATH`, or use "
            "`--random-init bge-large-zh` for an offline model with random weights (speed tests only)."
        ) from exc
    # snapshot directories are named by the commit they hold
    return path, path.name


def detect_pooling(path: Path) -> tuple[str, bool]:
    """Pooling and normalisation from the sentence-transformers modules, CLS + normalise otherwise (BGE)."""
    modules = _read_json(path / "modules.json")
    if not isinstance(modules, list):
        return "cls", True
    pooling, normalize = "cls", False
    for m in modules:
        kind = str(m.get("type", ""))
        if kind.endswith("Pooling"):
            cfg = _read_json(path / m.get("path", "") / "config.json") or {}
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            else:
                modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
                raise SourceModelError(
                    f"{path} uses pooling {modes}, which this exporter does not support (cls, mean); "
                    "pass --pooling cls|mean to override if you know what the model expects"
                )
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize


def detect_max_length(path: Path, config: dict[str, Any]) -> int:
    positions = int(config.get("max_position_embeddings", 512))
    st = _read_json(path / "sentence_bert_config.json")
    if isinstance(st, dict) and st.get("max_seq_length"):
        return min(int(st["max_seq_length"]), positions)
    tok = _read_json(path / "tokenizer_config.json")
    if isinstance(tok, dict) and isinstance(tok.get("model_max_length"), int) and tok["model_max_length"] < 100_000:
        return min(int(tok["model_max_length"]), positions)
    return positions


def detect_kind(config: dict[str, Any], name: str) -> str:
    """A checkpoint whose architecture is ...ForSequenceClassification with one label is a cross-encoder."""
    archs = [str(a) for a in config.get("architectures") or []]
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        return "embedder"
    labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 1)
    if labels != 1:
        raise SourceModelError(
            f"{name} is a sequence classifier with {labels} labels; a reranker has one relevance logit. "
            "This exporter takes cross-encoders (bge-reranker, ms-marco cross-encoders) and embedders"
        )
    return "reranker"


def default_instruction(name: str, m3: bool = False) -> str:
    """BGE v1.5's query instruction for its language, read from the words of the model's own name (a hub id's
    or directory's last part: a parent directory such as ``benchmarks`` or ``/home/ben`` says nothing about the
    language); bge-m3 and non-BGE models take none."""
    words = set(re.split(r"[-_.\s]+", PurePosixPath(name.replace("\\", "/")).name.lower()))
    if m3 or "bge" not in words:
        return ""
    if "zh" in words:
        return BGE_ZH_INSTRUCTION
    if "en" in words:
        return BGE_EN_INSTRUCTION
    return ""


def resolve(
    model: str,
    *,
    revision: str | None = None,
    random_init: str | None = None,
    workdir: Path,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    query_instruction: str | None = None,
    seed: int = 0,
    query_max_length: int | None = None,
) -> ModelSpec:
    """Turn the CLI's description of a model into a local checkpoint plus its embedding recipe."""
    if random_init is not None:
        if random_init not in ARCHITECTURES:
            raise SourceModelError(f"--random-init must be one of {sorted(ARCHITECTURES)}, got {random_init!r}")
        path = materialise(random_init, workdir / "random-checkpoint", seed=seed)
        name, rev, local, random = random_init, None, True, True
        if query_instruction is None and ARCHITECTURES[random_init].kind == "embedder" and not ARCHITECTURES[random_init].m3:
            query_instruction = BGE_ZH_INSTRUCTION  # every built-in embedder architecture is a BGE zh one
    elif Path(model).expanduser().is_dir():
        path, name, rev, local = Path(model).expanduser().resolve(), model, None, True
        random = (path / "RANDOM_WEIGHTS").is_file()  # a checkpoint --random-init (or the tests) materialised
    elif Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        raise SourceModelError(f"--model {model} is not a directory; point it at a Hugging Face checkpoint directory")
    else:
        path, rev = download(model, revision)
        name, local, random = model, False, False

    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        raise SourceModelError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    if config.get("model_type") not in MODEL_TYPES:
        raise SourceModelError(
            f"{name} is a {config.get('model_type')!r} model; this exporter supports BERT encoders (the BGE zh/en "
            "v1.5 family, MiniLM, BERT cross-encoders) and XLM-RoBERTa (bge-m3, bge-reranker)"
        )
    kind = detect_kind(config, name)
    heads = [h for h in M3_HEADS if (path / h).is_file()]
    if heads and len(heads) != len(M3_HEADS):
        raise SourceModelError(f"{path} has {heads[0]} but not {set(M3_HEADS) - set(heads)}; a bge-m3 checkpoint "
                               "needs both heads (download them beside config.json)")
    m3 = bool(heads) and kind == "embedder"
    if not any(path.glob("*.safetensors")):
        raise SourceModelError(
            f"{path} has no .safetensors weights; this exporter loads safetensors only (pickled .bin files can run "
            "code). Convert the checkpoint with `transformers` save_pretrained(safe_serialization=True) first."
        )
    det_pooling, det_normalize = detect_pooling(path) if kind == "embedder" else ("cls", False)
    # XLM-RoBERTa numbers positions from pad_token_id + 1: 514 positions hold 512 tokens
    offset = int(config.get("pad_token_id", 1)) + 1 if config.get("model_type") == "xlm-roberta" else 0
    limit = int(config.get("max_position_embeddings", 512)) - offset
    if max_length is not None:
        length = max_length
    else:
        length = min(detect_max_length(path, config), limit)
        if kind == "reranker":
            length = min(length, RERANKER_MAX_LENGTH)
    if not 2 <= length <= limit:
        raise SourceModelError(f"--max-length must be between 2 and the model's {limit} positions, got {length}")
    q_length = 0
    if kind == "reranker":
        q_length = query_max_length if query_max_length is not None else length * 3 // 4
        if not 1 <= q_length <= length - 4:
            raise SourceModelError(f"--query-max-length must be between 1 and max length - 4 ({length - 4}), got {q_length}")
    elif query_max_length is not None:
        raise SourceModelError("--query-max-length applies to rerankers only; this checkpoint is an embedder")
    return ModelSpec(
        name=name,
        path=path,
        revision=rev,
        local=local,
        random_weights=random,
        pooling=pooling or det_pooling,
        normalize=det_normalize if normalize is None else normalize,
        max_length=length,
        query_instruction=("" if kind == "reranker" else default_instruction(name, m3)) if query_instruction is None
        else query_instruction,
        config=config,
        kind=kind,
        query_max_length=q_length,
        m3=m3,
    )
