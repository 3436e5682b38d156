"""Golden tests: the runtime's tokenizer gives the same ids and masks as transformers' tokenizer for the
same checkpoint, on every sentence of the Chinese and English sets and on hard cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import datasets
from runtime.batching import make_batches
from runtime.tokenizer import TextTokenizer

HARD = [
    "",
    " ",
    "ＡＢＣ１２３，全角标点：“引号”、《书名》！？",
    "中文English混合123和数字4.56%",
    "emoji 😀👍🏽👨‍👩‍👧 and 🇨🇳 flags",
    "control\x00chars\x07and\x1b[31mescapes\x7f",
    "tabs\tnew\nlines\r\nand\u3000ideographic space",
    "Ünïcödé àccents and ß and ﬁ ligature",
    "e\u0301 combining, \u200b zero width, \ufeff bom",
    "日本語のテキストと한국어 텍스트",
    "字" * 600,  # truncated at max length
    "word " * 400,
]


def _sets() -> list[str]:
    en, zh = datasets.sts_b_en(), datasets.sts_b_zh()
    return en.first + en.second + zh.first + zh.second + HARD


def _hf_batch(hf_tokenizer, texts: list[str], max_length: int):
    enc = hf_tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("which", ["minilm", "tiny-zh"])
def test_ids_and_masks_equal_transformers(which, minilm_path, minilm_artifact, tiny_checkpoint, tiny_artifact):
    from transformers import AutoTokenizer

    ckpt, artifact, max_length = {
        "minilm": (minilm_path, minilm_artifact, 256),
        "tiny-zh": (tiny_checkpoint, tiny_artifact, 512),
    }[which]
    hf = AutoTokenizer.from_pretrained(ckpt)
    ours = TextTokenizer(artifact / "tokenizer.json", max_length)
    texts = _sets()
    enc = ours.encode(texts)
    mismatches = []
    for start in range(0, len(texts), 64):
        chunk = texts[start : start + 64]
        hf_ids, hf_mask = _hf_batch(hf, chunk, max_length)
        for row, text in enumerate(chunk):
            n = int(hf_mask[row].sum())
            if enc.ids[start + row] != hf_ids[row, :n].tolist():
                mismatches.append(text)
    assert not mismatches, mismatches[:5]
    # truncation: exactly max_length tokens, ending in [SEP]
    long = enc.ids[texts.index("字" * 600)]
    assert len(long) == max_length and long[-1] == hf.sep_token_id and long[0] == hf.cls_token_id
    assert texts.index("字" * 600) in enc.truncated


def test_padded_batches_equal_transformers_padding(tiny_checkpoint, tiny_artifact):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ours = TextTokenizer(tiny_artifact / "tokenizer.json", 512)
    texts = datasets.sts_b_zh().first[:50] + HARD
    enc = ours.encode(texts)
    for batch in make_batches(enc.ids, enc.lengths, hf.pad_token_id, batch_size=8, max_batch_tokens=4096):
        chunk = [texts[i] for i in batch.indices]
        hf_ids, hf_mask = _hf_batch(hf, chunk, 512)
        np.testing.assert_array_equal(batch.input_ids, hf_ids)
        np.testing.assert_array_equal(batch.attention_mask, hf_mask)


# -- long texts: the cut before tokenising gives the ids of the whole text ----------------------------------
PIECES = ["ab", " ", "中文", "é", "e\u0301", "😀", "\n\n", ",", "x" * 150, "http://example.com/" + "z" * 90,
          "Ünïcödé", "\u3000", "don't", "１２３", "\t", "ﬁ"]


def _long_texts() -> list[str]:
    """Long texts of every shape the cut must get right: prose, CJK, long words, marks split by a cut."""
    import random

    rng = random.Random(0)
    en, zh = datasets.sts_b_en(), datasets.sts_b_zh()
    words = " ".join(en.first).split()
    zh_text = "".join(zh.first)
    out = []
    for n in (300, 600, 1100, 2500, 5000, 20000, 70000):
        out.append(" ".join(rng.choices(words, k=n // 5)))
        start = rng.randrange(len(zh_text) - n) if len(zh_text) > n else 0
        out.append(zh_text[start : start + n])
        out.append("".join(rng.choice(PIECES) for _ in range(n // 4)))
        out.append(" " * n + "hello world " * 300)  # the tokens start far into the text
    return out


@pytest.mark.parametrize("which", ["minilm", "tiny-zh"])
def test_long_texts_cut_before_tokenising_give_the_whole_texts_ids(which, minilm_artifact, tiny_artifact):
    from tokenizers import Tokenizer

    artifact, max_length = {"minilm": (minilm_artifact, 256), "tiny-zh": (tiny_artifact, 512)}[which]
    ours = TextTokenizer(artifact / "tokenizer.json", max_length)
    whole = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    whole.enable_truncation(max_length=max_length)
    whole.no_padding()
    texts = _long_texts()
    enc = ours.encode(texts)
    for i, text in enumerate(texts):
        ref = whole.encode(text)
        assert enc.ids[i] == ref.ids, (i, len(text))
        assert (i in enc.truncated) == bool(ref.overflowing), (i, len(text))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.sampled_from(PIECES) | st.text(min_size=1, max_size=12), min_size=200, max_size=900))
def test_cut_equals_whole_tokenisation_on_arbitrary_text(pieces, tiny_artifact):
    from tokenizers import Tokenizer

    text = "".join(pieces)
    ours = TextTokenizer(tiny_artifact / "tokenizer.json", 64)  # a short max length: the cut happens often
    whole = Tokenizer.from_file(str(tiny_artifact / "tokenizer.json"))
    whole.enable_truncation(max_length=64)
    whole.no_padding()
    ref = whole.encode(text)
    enc = ours.encode([text])
    assert enc.ids[0] == ref.ids
    assert (0 in enc.truncated) == bool(ref.overflowing)


def test_a_huge_text_is_cut_not_tokenised_whole(tiny_artifact):
    """10 MB of text: the ids of its first tokens, flagged as truncated; past max_chars characters without
    enough tokens (a whitespace flood), the tokens of those characters."""
    ours = TextTokenizer(tiny_artifact / "tokenizer.json", 512)
    zh = "".join(datasets.sts_b_zh().first)
    huge = zh * (10_000_000 // len(zh) + 1)
    enc = ours.encode([huge, " " * 10_000_000 + "尾", "a" * 10_000_000])
    assert enc.ids[0] == ours.encode([huge[:2000]]).ids[0] and len(enc.ids[0]) == 512
    assert enc.ids[1] == ours.encode([""]).ids[0]  # nothing but spaces in the first max_chars characters
    assert len(enc.ids[2]) == 3  # one word over 100 characters: [UNK], as for the whole text
    assert enc.truncated == [0, 1, 2]
    assert ours.max_chars == 512 * 256
