"""Each precision matches the PyTorch reference on a grid of batch sizes and lengths."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from export.validate import GATES
from runtime import Embedder

from .helpers import chinese_text, cosines

BATCHES = (1, 2, 3, 7, 33)
LENGTHS = (1, 2, 17, 128, 512)  # content tokens; 512 (and the 700 below) exceed max_length and are truncated
MAX_ABS = {"fp32": 1e-5, "fp16": 2e-3, "int8": 5e-2}


@pytest.fixture(scope="module")
def embedders(tiny_artifact):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {p: Embedder(tiny_artifact, device="cpu", precision=p) for p in ("fp32", "fp16", "int8")}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("batch", BATCHES)
def test_grid(embedders, tiny_reference, precision, batch, length):
    rng = np.random.default_rng(batch * 1000 + length)
    texts = [chinese_text(length, rng) for _ in range(batch)]
    ref = tiny_reference.embed(texts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = embedders[precision].embed(texts)
    assert got.shape == (batch, embedders[precision].dim) and got.dtype == np.float32
    assert cosines(got, ref).min() >= GATES[precision]
    assert np.abs(got - ref).max() <= MAX_ABS[precision]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_past_max_length_is_truncated_like_the_reference(embedders, tiny_reference, precision):
    rng = np.random.default_rng(7)
    texts = [chinese_text(700, rng), "短句", chinese_text(513, rng)]
    ref = tiny_reference.embed(texts)
    with pytest.warns(Warning):
        got = embedders[precision].embed(texts)
    assert cosines(got, ref).min() >= GATES[precision]


def test_mixed_batch_equals_each_alone_fp32(embedders):
    rng = np.random.default_rng(3)
    texts = [chinese_text(n, rng) for n in (1, 300, 5, 17, 64, 2, 128, 9)] + ["Hello, world!", ""]
    emb = embedders["fp32"]
    together = emb.embed(texts, batch_size=4)
    alone = np.concatenate([emb.embed([t]) for t in texts])
    assert np.abs(together - alone).max() <= 1e-5


def test_order_is_preserved_and_rows_are_unit_norm(embedders):
    rng = np.random.default_rng(5)
    texts = [chinese_text(n, rng) for n in (50, 3, 200, 1, 99)]
    emb = embedders["fp32"]
    full = emb.embed(texts, batch_size=2)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    for i, t in enumerate(texts):
        np.testing.assert_allclose(full[i], emb.embed([t])[0], atol=1e-5)


def test_manifest_records_parity_and_fusions(tiny_artifact):
    from export.optimize import expected_operators
    from runtime import Manifest

    m = Manifest.load(tiny_artifact)
    layers = m.source.architecture["layers"]
    for name, v in m.variants.items():
        assert v.parity.validated, name
        assert v.parity.min_cosine >= GATES[name]
        assert v.parity.n_texts > 10
        for op, n in expected_operators(layers).items():
            assert v.fused_operators[op] == n
    assert m.input_names == ("input_ids", "attention_mask") and m.output_name == "embedding"
    assert m.pooling == "cls" and m.normalize and m.max_length == 512
