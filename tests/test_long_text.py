"""Long texts: long_text="truncate"|"error"|"chunk", embed_chunks, the window plan, and the progress bar."""

from __future__ import annotations

import dataclasses
import random
import sys
import warnings

import numpy as np
import pytest

from benchmarks import datasets
from runtime import Chunks, Embedder, InputTooLongError, TruncationWarning
from runtime.chunking import plan_windows, pool_windows
from runtime.tokenizer import TextTokenizer

MAX_LENGTH = 64  # small windows: a few hundred characters make many of them


@pytest.fixture(scope="module")
def short_artifact(tiny_checkpoint, tmp_path_factory):
    """The tiny model exported with 64-token windows (and the BGE query instruction)."""
    from export.architectures import BGE_ZH_INSTRUCTION
    from export.cli import main

    out = tmp_path_factory.mktemp("art") / "tiny64"
    args = ["--model", str(tiny_checkpoint), "--out", str(out), "--precision", "fp32", "--max-length", str(MAX_LENGTH),
            "--query-instruction", BGE_ZH_INSTRUCTION]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def emb(short_artifact):
    return Embedder(short_artifact, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def zh_docs():
    return datasets.sohu_long_documents()[:4]


@pytest.fixture(scope="module")
def en_doc():
    pairs = datasets.sts_b_en()
    return " ".join(pairs.first[:40])


def _quiet_embed(emb, texts, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        return emb.embed(texts, **kw)


def test_texts_that_fit_are_bit_identical_to_todays_path(emb):
    texts = ["短句", "a short English sentence", "", "字" * 62]  # 62 + [CLS] + [SEP] = 64: fits exactly
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is cut, so nothing is said
        plain = emb.embed(texts)
        chunked = emb.embed(texts, long_text="chunk")
        chunks = emb.embed_chunks(texts)
    assert np.array_equal(plain, chunked)
    for i, (text, c) in enumerate(zip(texts, chunks)):
        assert c.spans == ((0, len(text)),) and len(c) == 1
        assert np.array_equal(c.vectors[0], plain[i])


def test_fitting_texts_beside_long_ones_keep_their_vectors(emb, zh_docs):
    texts = ["短句", zh_docs[0], "another short one", zh_docs[1]]
    mixed = emb.embed(texts, long_text="chunk")
    alone = emb.embed([texts[0], texts[2]])
    np.testing.assert_allclose(mixed[[0, 2]], alone, atol=1e-6)  # other batches, same vectors


def test_chinese_windows_embed_exactly_as_their_spans(emb, zh_docs):
    """One character is one token: every window's span re-tokenises to the window's ids, and (one window a
    batch, as embed([span]) runs it) the vectors are bit-identical."""
    chunks = emb.embed_chunks(zh_docs, batch_size=1, overlap=16)
    for doc, c in zip(zh_docs, chunks):
        assert len(c) > 1 and c.vectors.shape == (len(c), emb.dim) and c.vectors.dtype == np.float32
        spans = [doc[a:b] for a, b in c.spans]
        ids = emb.tokenize(spans).ids
        assert [len(x) for x in ids] == list(c.token_counts)
        assert max(c.token_counts) <= MAX_LENGTH
        assert np.array_equal(c.vectors, emb.embed(spans, batch_size=1))
        starts = [a for a, _ in c.spans]
        assert starts == sorted(starts) and c.spans[-1][1] == len(doc.rstrip())


def test_windows_in_shared_batches_match_their_spans_closely(emb, zh_docs, en_doc):
    texts = [*zh_docs, en_doc]
    for text, c in zip(texts, emb.embed_chunks(texts, overlap=8)):
        np.testing.assert_allclose(c.vectors, emb.embed([text[a:b] for a, b in c.spans]), atol=1e-5)


@pytest.mark.parametrize("which", ["tiny (Chinese vocab, English split into word pieces)", "all-MiniLM-L6-v2"])
def test_english_window_ids_equal_the_ids_of_their_span(which, tiny_artifact, minilm_path, en_doc):
    """Tolerance-free: the ids each window is fed are exactly the ids of its span tokenised on its own."""
    path = tiny_artifact / "tokenizer.json" if which.startswith("tiny") else minilm_path / "tokenizer.json"
    tok = TextTokenizer(path, max_length=48)
    enc = tok.encode_content([en_doc])[0]
    windows = plan_windows(enc.word_ids, enc.offsets, budget=48 - 2, overlap=12)
    assert len(windows) > 5 and all(w.exact for w in windows)
    for w in windows:
        window_ids = tok.prefix + enc.ids[w.start : w.end] + tok.suffix
        span_ids = tok.encode([en_doc[w.char_start : w.char_end]]).ids[0]
        assert span_ids == window_ids, (w, en_doc[w.char_start : w.char_end])


def test_chunk_is_the_token_weighted_mean_of_the_windows(emb, zh_docs, en_doc):
    texts = [*zh_docs, en_doc]
    pooled = emb.embed(texts, long_text="chunk", overlap=8)
    for i, c in enumerate(emb.embed_chunks(texts, overlap=8)):
        w = np.asarray(c.token_counts, np.float64)
        mean = (c.vectors * w[:, None]).sum(0) / w.sum()
        np.testing.assert_allclose(pooled[i], mean / np.linalg.norm(mean), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1, atol=1e-5)


def test_truncate_is_still_the_default_and_the_old_spelling_maps(emb, zh_docs):
    with pytest.warns(TruncationWarning, match="long_text='chunk'") as record:
        default = emb.embed(zh_docs)
    assert record[0].message.count == len(zh_docs)
    assert np.array_equal(default, _quiet_embed(emb, zh_docs, truncate=True))
    assert np.array_equal(default, _quiet_embed(emb, zh_docs, long_text="truncate"))
    for kw in ({"truncate": False}, {"long_text": "error"}):
        with pytest.raises(InputTooLongError, match="long_text='chunk'") as info:
            emb.embed(["短", zh_docs[1]], **kw)
        assert info.value.index == 1
    # truncate=False (never cut) agrees with chunking: allowed
    assert emb.embed(zh_docs[:1], truncate=False, long_text="chunk").shape == (1, emb.dim)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"long_text": "split"}, "long_text must be one of"),
        ({"truncate": True, "long_text": "chunk"}, "contradicts"),
        ({"truncate": False, "long_text": "truncate"}, "contradicts"),
        ({"long_text": "chunk", "overlap": 62}, "smaller than a window's 62"),
        ({"long_text": "chunk", "overlap": -1}, "overlap must be an int >= 0"),
    ],
)
def test_bad_long_text_arguments(emb, kw, match):
    with pytest.raises(ValueError, match=match):
        emb.embed(["短"], **kw)


def test_embed_queries_chunks_with_the_instruction(emb, zh_docs):
    instr = emb.manifest.query_instruction
    q = emb.embed_queries(zh_docs[:2], long_text="chunk", overlap=8)
    np.testing.assert_allclose(q, emb.embed([instr + d for d in zh_docs[:2]], long_text="chunk", overlap=8), atol=1e-6)


def test_chunks_is_a_frozen_record(emb, zh_docs):
    c = emb.embed_chunks(zh_docs[:1])[0]
    assert isinstance(c, Chunks)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.spans = ()
    assert emb.embed_chunks([]) == []


def _random_plan(rng: random.Random) -> tuple[list[int], list[tuple[int, int]], int, int]:
    word_ids, offsets, pos = [], [], 0
    for word in range(rng.randint(1, 120)):
        for _ in range(rng.choice([1, 1, 1, 2, 3, 9])):  # some words of many pieces
            word_ids.append(word)
            offsets.append((pos, pos + 2))
            pos += 2
        pos += 1  # a space between words
    budget = rng.randint(4, 30)
    return word_ids, offsets, budget, rng.randint(0, budget - 1)


def test_window_plan_properties():
    """Windows cover every token, fit the budget, overlap by at most ``overlap`` tokens, always advance, and
    start and end on word boundaries unless a single word is longer than a whole window."""
    rng = random.Random(0)
    for _ in range(500):
        word_ids, offsets, budget, overlap = _random_plan(rng)
        n = len(word_ids)
        windows = plan_windows(word_ids, offsets, budget, overlap)
        assert windows[0].start == 0 and windows[-1].end == n
        for prev, w in zip(windows, windows[1:]):
            assert prev.start < w.start <= prev.end and prev.end - w.start <= overlap
        for w in windows:
            assert 0 < w.end - w.start <= budget
            on_boundaries = (w.start == 0 or word_ids[w.start] != word_ids[w.start - 1]) and (
                w.end == n or word_ids[w.end] != word_ids[w.end - 1])
            assert w.exact == on_boundaries
            assert (w.char_start, w.char_end) == (offsets[w.start][0], offsets[w.end - 1][1])
            if not w.exact:  # only where a word outgrows a window
                assert max(np.bincount(word_ids)) > budget


def test_pool_windows_lead_decay_weights_the_first_window_more():
    v = np.eye(3, dtype=np.float32)[:2]
    even = pool_windows(v, [10, 10], normalize=True)
    lead = pool_windows(v, [10, 10], normalize=True, lead_decay=0.5)
    assert np.isclose(even[0], even[1]) and lead[0] > lead[1]
    with pytest.raises(ValueError, match="lead_decay"):
        pool_windows(v, [10, 10], normalize=True, lead_decay=0)


def test_show_progress_draws_a_bar_and_changes_nothing(emb, zh_docs, capsys):
    texts = ["短句", *zh_docs]
    plain = emb.embed(texts, long_text="chunk")
    shown = emb.embed(texts, long_text="chunk", show_progress=True)
    assert np.array_equal(plain, shown)
    err = capsys.readouterr().err
    assert "tok" in err and f"{len(texts)}/{len(texts)} texts" in err


def test_show_progress_without_tqdm_names_the_extra(emb, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match=r"bge-onnx\[progress\]"):
        emb.embed_queries(["短"], show_progress=True)
    assert emb.embed(["短"]).shape == (1, emb.dim)  # without the bar, no tqdm needed


def test_long_text_benchmark_runs_end_to_end(short_artifact):
    """The benchmark's own code path on the tiny model (the figures come from the script, not from here)."""
    from benchmarks.long_text import evaluate, markdown

    pairs = datasets.sohu_short_long()
    assert len(pairs) == 250 and set(pairs.score) == {0.0, 3.0, 5.0}
    result = {**evaluate(short_artifact, [16], threads=1), "model": "tiny"}
    methods = [r["method"] for r in result["rows"]]
    assert methods[0] == "truncate" and "chunk max over windows" in methods and len(methods) == 5
    assert result["rows"][1]["windows"] > result["rows"][0]["windows"] == 250
    assert "| truncate | - |" in markdown(result)
