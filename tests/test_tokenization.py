"""Golden tests: the runtime's tokenizer gives the same ids and masks as transformers' tokenizer for the
same checkpoint, on every sentence of the Chinese and English sets and on hard cases."""

from __future__ import annotations

import numpy as np
import pytest

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
