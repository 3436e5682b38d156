"""Real trained weights: all-MiniLM-L6-v2 (mean pooling, normalised) against sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.datasets import sts_b_en, sts_b_zh
from runtime import Embedder

from .helpers import cosines


@pytest.fixture(scope="module")
def sentences():
    en, zh = sts_b_en(), sts_b_zh()
    return en.first[:200] + en.second[:200] + zh.first[:50]


@pytest.fixture(scope="module")
def st_vectors(minilm_path, sentences):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path), device="cpu")
    return model.encode(sentences, batch_size=32, convert_to_numpy=True)


def test_manifest_reads_the_checkpoint_recipe(minilm_artifact):
    emb = Embedder(minilm_artifact, device="cpu", precision="fp32")
    m = emb.manifest
    assert (m.pooling, m.normalize, m.max_length, m.dimension) == ("mean", True, 256, 384)
    assert m.query_instruction == "" and not m.source.random_weights


def test_fp32_matches_sentence_transformers(minilm_artifact, sentences, st_vectors):
    got = Embedder(minilm_artifact, device="cpu", precision="fp32").embed(sentences)
    assert cosines(got, st_vectors).min() >= 0.99999
    assert np.abs(got - st_vectors).max() <= 1e-5


def test_fp16_matches_sentence_transformers(minilm_artifact, sentences, st_vectors):
    with pytest.warns(UserWarning, match="fp16 variant on CPU"):
        emb = Embedder(minilm_artifact, device="cpu", precision="fp16")
    assert cosines(emb.embed(sentences), st_vectors).min() >= 0.999


def test_int8_keeps_quality_on_the_report_split(minilm_artifact):
    """Calibration uses the even STS-B rows; quality is judged on the odd ones."""
    from scipy.stats import spearmanr

    _, report = sts_b_en().split()
    fp32 = Embedder(minilm_artifact, device="cpu", precision="fp32")
    int8 = Embedder(minilm_artifact, device="cpu", precision="int8")
    a32, b32 = fp32.embed(report.first), fp32.embed(report.second)
    a8, b8 = int8.embed(report.first), int8.embed(report.second)
    assert min(cosines(a8, a32).min(), cosines(b8, b32).min()) >= 0.98
    rho32 = spearmanr((a32 * b32).sum(1), report.score).statistic
    rho8 = spearmanr((a8 * b8).sum(1), report.score).statistic
    assert rho8 >= 0.995 * rho32
    build = int8.manifest.variants["int8"].build
    assert build["reduce_range"] and build["per_channel"] and build["smoothquant_alpha"] > 0
    assert len(build["float32_nodes"]) <= 0.2 * len(build["sensitivity_rel_error"])


def test_int8_vector_does_not_depend_on_its_batch(minilm_artifact):
    """Static (calibrated) activation scales: a text alone and in a mixed batch give the same vector."""
    _, report = sts_b_en().split()
    texts = report.first[:120] + sts_b_zh().first[:30]
    int8 = Embedder(minilm_artifact, device="cpu", precision="int8")
    assert int8.manifest.variants["int8"].build["static_quantize_nodes"] > 0
    batched = int8.embed(texts, batch_size=32)
    alone = np.concatenate([int8.embed([t]) for t in texts])
    assert cosines(batched, alone).min() >= 0.99999
    assert np.abs(batched - alone).max() <= 1e-5


def test_fp16_is_finite_and_close_on_extreme_real_inputs(minilm_artifact):
    texts = ["the " * 300, "a" * 3000, "\U0001f600" * 300, "字" * 300, "!" * 300] + sts_b_zh().first[:100]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f16 = Embedder(minilm_artifact, device="cpu", precision="fp16").embed(texts)
        f32 = Embedder(minilm_artifact, device="cpu", precision="fp32").embed(texts)
    assert np.isfinite(f16).all()
    assert cosines(f16, f32).min() >= 0.999


def test_export_records_quality_on_the_labelled_set(minilm_artifact):
    m = Embedder(minilm_artifact, device="cpu", precision="fp32").manifest
    for name, v in m.variants.items():
        q = v.parity.quality
        assert q["dataset"] == "sts-b-en.test.tsv" and q["pairs"] == 1379
        assert 0.8 < q["reference_spearman"] < 0.9
        assert q["ratio"] >= q["gate_ratio"], name
    assert abs(m.variants["fp32"].parity.quality["ratio"] - 1) < 1e-4
