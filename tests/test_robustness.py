"""Untrusted input, shared use from many threads, batch composition and memory under load."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import Embedder, InvalidOutputError

from .helpers import chinese_text

NASTY = {
    "empty": "",
    "whitespace": " \t\n\r\u3000 ",
    "control": "a\x00b\x01\x1f\x7f\x85c",
    "zero-width": "\u200b\u200c\u200d\ufeff",
    "long": "数据" * 50_000,  # 100,000 characters
    "emoji": "😀🎉👍🏽👨‍👩‍👧" * 150,  # 600 emoji (some multi-codepoint)
    "mixed": "中文English日本語한국어العربيةРусский123１２３",
    "combining": "e\u0301\u0302\u0303" * 20,
    "rtl": "\u202eevil\u202c",
    "private-use": "\ue000\uf8ff\U000f0000",
}


@pytest.fixture(scope="module")
def embedders(tiny_artifact):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {p: Embedder(tiny_artifact, device="cpu", precision=p) for p in ("fp32", "fp16", "int8")}


def _assert_unit(vectors: np.ndarray) -> None:
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_nasty_strings_give_finite_unit_vectors(embedders, precision):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long inputs are truncated
        out = embedders[precision].embed(list(NASTY.values()))
    assert out.shape == (len(NASTY), 64)
    _assert_unit(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.characters(codec=None), max_size=300), max_size=6))
def test_any_unicode_is_a_vector_or_a_value_error(embedders, texts):
    has_surrogate = any(0xD800 <= ord(c) <= 0xDFFF for t in texts for c in t)
    emb = embedders["int8"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = emb.embed(texts)
    except ValueError as exc:
        assert has_surrogate, exc
        assert "input" in str(exc)
        return
    assert not has_surrogate
    assert out.shape == (len(texts), 64)
    if texts:
        _assert_unit(out)


def _poison(emb: Embedder, row: int, value: float) -> None:
    """Make the embedder's graph runs return one poisoned row (the runs themselves are real)."""
    real = emb._run

    def run(input_ids, attention_mask, token_type_ids=None):
        out = real(input_ids, attention_mask, token_type_ids)
        out[row] = value
        return out

    emb._run = run


@pytest.mark.parametrize("value, detail", [(np.nan, "NaN"), (np.inf, "NaN or inf"), (0.5, "norm")])
def test_non_finite_or_non_unit_output_is_refused_naming_the_input(tiny_artifact, value, detail):
    emb = Embedder(tiny_artifact, device="cpu", precision="fp32")
    _poison(emb, row=0, value=value)
    texts = ["短", "这是一个比较长的句子，排在批次的第一行", "中"]  # sorted longest first: row 0 is input 1
    with pytest.raises(InvalidOutputError, match="input 1") as info:
        emb.embed(texts)
    assert detail in str(info.value) and info.value.index == 1


def test_sixteen_threads_share_one_embedder(embedders):
    rng = np.random.default_rng(11)
    texts = [chinese_text(int(n), rng) for n in rng.integers(1, 200, size=40)]
    for precision in ("fp32", "int8"):
        emb = embedders[precision]
        expected = emb.embed(texts, batch_size=8)
        results: list[np.ndarray | BaseException] = [None] * 16  # type: ignore[list-item]

        def work(i: int) -> None:
            try:
                for _ in range(3):
                    results[i] = emb.embed(texts, batch_size=8)
            except BaseException as exc:  # recorded and re-raised below, in the main thread
                results[i] = exc

        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        for r in results:
            assert isinstance(r, np.ndarray), r
            assert np.abs(r - expected).max() <= 1e-6


@pytest.mark.parametrize("precision, bound", [("fp32", 1e-5), ("fp16", 2e-3), ("int8", 1e-5)])
def test_vectors_do_not_depend_on_batch_neighbours(embedders, precision, bound):
    rng = np.random.default_rng(13)
    texts = [chinese_text(int(n), rng) for n in (3, 120, 40, 500, 7, 64)]
    emb = embedders[precision]
    together = emb.embed(texts, batch_size=6)
    alone = np.concatenate([emb.embed([t]) for t in texts])
    assert np.abs(together - alone).max() <= bound


def test_short_soak_memory_plateaus(tiny_artifact):
    """The short version of benchmarks/soak.py: 400 batches of 1-4 texts of 1-510 tokens."""
    from benchmarks.soak import soak

    r = soak(tiny_artifact, batches=400, precision="int8", progress=False)
    assert r.texts >= 400 and r.tokens > 400 * 100
    assert r.growth_after_warmup <= 0.10, r.samples


def test_fp16_never_overflows_on_extreme_inputs(embedders, tiny_artifact):
    """512 tokens of one repeated character, all-[UNK] input, long mixed text: finite and close to FP32."""
    from runtime.tokenizer import TextTokenizer

    unk = "\U0001f600" * 510  # emoji are not in the Chinese vocabulary: every token is [UNK]
    assert set(TextTokenizer(tiny_artifact / "tokenizer.json", 512).encode([unk]).ids[0][1:-1]) == {100}
    texts = ["字" * 510, "。" * 510, unk, "a" * 2000, "的" * 1 + "了" * 509]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f16 = embedders["fp16"].embed(texts)
        f32 = embedders["fp32"].embed(texts)
    _assert_unit(f16)
    assert float((f16.astype(np.float64) * f32).sum(1).min()) >= 0.999


def test_batches_keep_padding_under_half_of_each_row():
    from runtime.batching import plan_batches

    lengths = np.array([30, 512, 28, 31, 29, 27, 26, 25, 300, 200])
    batches = plan_batches(lengths, batch_size=8, max_batch_tokens=16384)
    assert sorted(int(i) for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert lengths[b].min() >= 0.5 * lengths[b].max()
        assert len(b) <= 8
    assert [len(b) for b in batches] == [2, 1, 7]  # [512, 300], [200], the seven short ones


def test_long_rows_of_a_flash_attention_graph_are_never_padded():
    """Past ``UNPADDED_PAST`` tokens a batch holds only rows of one length: a padded batch would take the fused
    attention kernel, whose scores grow with the square of the length (two padded 8,000-token texts in one
    16,384-token budget needed 8 GiB for them alone)."""
    from runtime.batching import UNPADDED_PAST, plan_batches

    lengths = np.array([8000, 7000, 7000, 100, 90, 700, 600])
    padded = plan_batches(lengths, batch_size=32, max_batch_tokens=16384)
    assert [sorted(lengths[b].tolist()) for b in padded] == [[7000, 8000], [7000], [600, 700], [90, 100]]
    plan = plan_batches(lengths, batch_size=32, max_batch_tokens=16384, unpadded_past=UNPADDED_PAST)
    assert [sorted(lengths[b].tolist()) for b in plan] == [[8000], [7000, 7000], [700], [600], [90, 100]]


def test_an_embedder_feeds_long_rows_unpadded(m3_artifact):
    """The runtime takes the rule from the artifact: its graph has flash attention (long-context model), so
    every run whose longest row passes UNPADDED_PAST tokens has no padding; short rows still batch as before."""
    from runtime import Embedder
    from runtime.batching import UNPADDED_PAST

    emb = Embedder(m3_artifact, precision="int8")
    assert emb.unpadded_past == UNPADDED_PAST
    masks = []
    real = emb._session.run

    def spy(names, feed, *args, **kwargs):
        masks.append(feed["attention_mask"].copy())
        return real(names, feed, *args, **kwargs)

    emb._session.run = spy
    texts = ["深度学习 " * n for n in (300, 260, 300, 220, 3, 5)]
    out = emb.encode(texts, sparse=True, colbert=True)
    long_runs = [m for m in masks if m.shape[1] > UNPADDED_PAST]
    assert long_runs and all(m.all() for m in long_runs)
    assert any(not m.all() for m in masks)  # the two short texts still share a padded run
    alone = [emb.encode([t], sparse=True, colbert=True) for t in texts]
    np.testing.assert_allclose(out.dense, np.concatenate([a.dense for a in alone]), atol=1e-5)
