"""Tokenisation with the Rust `tokenizers` library, batched, reporting truncation instead of hiding it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from .errors import ArtifactError

# Before tokenising, a text longer than this many characters per token of max_length is cut (see
# ``TextTokenizer.encode``): tokenising a 10 MB string whole takes seconds, its first max_length tokens need
# a few thousand characters. 256 covers any text but one drowned in whitespace: a WordPiece token spans at
# most a 100-character word plus its separator.
MAX_CHARS_PER_TOKEN = 256
_FIRST_CUT_CHARS_PER_TOKEN = 2  # first try: enough for CJK text (one token a character)
_CUT_GROWTH = 4  # then 8 (English: about 4.5 characters a token), 32, 128, 256

@dataclass(frozen=True)
class Encoded:
    """Token ids of a list of texts, unpadded, with the number of tokens each had before truncation."""

    ids: list[list[int]]
    truncated: list[int]  # indices of inputs that were cut to max_length

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


class TextTokenizer:
    """Wraps ``tokenizer.json``. Two instances of the Rust tokenizer: one truncating, one not (for
    reporting the real length of an over-long input). Neither is mutated after construction, so one
    ``TextTokenizer`` is safe to share between threads."""

    def __init__(self, path: Path, max_length: int) -> None:
        try:
            # one instance, untruncated: ``encode`` cuts the ids itself (a second, truncating instance of a
            # 250k-piece vocabulary such as bge-m3's held another ~0.2 GiB for nothing)
            self._full = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
            raise ArtifactError(f"cannot load tokenizer {path}: {exc}; re-export the artifact") from exc
        self.max_length = max_length
        self._full.no_padding()
        self._full.no_truncation()
        self.prefix, self.suffix = self._special_wrap()

    def _special_wrap(self) -> tuple[list[int], list[int]]:
        """The special ids the post-processor puts before and after a text's own tokens ([CLS] and [SEP] for
        BERT), found by encoding a probe with and without them: a chunk window is re-wrapped with these."""
        full = self._full.encode("a", add_special_tokens=True).ids
        bare = self._full.encode("a", add_special_tokens=False).ids
        for k in range(len(full) - len(bare) + 1):
            if full[k : k + len(bare)] == bare:
                return full[:k], full[k + len(bare) :]
        raise ArtifactError("the tokenizer's special tokens wrap a text in a way chunking cannot reproduce; "
                            "use long_text='truncate'")

    @property
    def max_chars(self) -> int:
        """Characters of a text that tokenisation ever looks at (the rest cannot reach the model)."""
        return self.max_length * MAX_CHARS_PER_TOKEN

    def encode(self, texts: list[str]) -> Encoded:
        """Ids truncated to ``max_length``, as the Rust tokenizer gives them for the whole text.

        A text longer than ``2 * max_length`` characters is tokenised from a prefix instead: cut at 2, 8, 32,
        128, then 256 characters per token of ``max_length`` until the words that end before the cut give more
        content tokens than fit. Tokens of a word depend only on that word (the normalisers and
        pre-tokenizers of BERT and SentencePiece models work within words), so those ids are exactly the
        whole text's first tokens; only the word the cut may split is left out of the count. A text whose
        first ``max_chars`` characters hold fewer tokens than fit (whitespace floods) keeps the tokens of
        those characters. Cost: a few milliseconds whatever the text's size, where a 10 MB text took seconds."""
        first_cut = self.max_length * _FIRST_CUT_CHARS_PER_TOKEN
        cut: set[int] = set()
        for i, t in enumerate(texts):
            if len(t) > first_cut:
                piece = self._cut(t, first_cut)
                if len(piece) < len(t):
                    if not cut:
                        texts = list(texts)
                    texts[i] = piece
                    cut.add(i)
        encodings = self._full.encode_batch(texts, add_special_tokens=True)
        # what the Rust tokenizer's own truncation gives (content cut to fit, then the special tokens)
        keep = self.max_length - len(self.suffix)
        ids = [e.ids if len(e.ids) <= self.max_length else e.ids[:keep] + self.suffix for e in encodings]
        truncated = [i for i, e in enumerate(encodings) if len(e.ids) > self.max_length or i in cut]
        return Encoded(ids=ids, truncated=truncated)

    def _cut(self, text: str, cut: int, budget: int | None = None) -> str:
        """The shortest prefix of ``text`` (on the growing cuts) whose complete words already give more
        content tokens than ``budget`` (default: what fits in ``max_length``); ``text[:max_chars]`` if none does."""
        limit = self.max_chars if budget is None else max(budget, 1) * MAX_CHARS_PER_TOKEN
        if budget is None:
            budget = self.max_length - len(self.prefix) - len(self.suffix)
        while cut < len(text):
            if cut >= limit:
                return text[:limit]
            piece = text[:cut]
            # encode_batch releases the GIL (encode does not): other threads keep running meanwhile
            words = self._full.encode_batch([piece], add_special_tokens=False)[0].word_ids
            last = words[-1] if words else None
            complete = next((k for k, w in enumerate(words) if w == last), 0)  # tokens before the last word
            if complete > budget:
                return piece
            cut *= _CUT_GROWTH
        return text

    def encode_capped(self, texts: list[str], max_tokens: int) -> tuple[list[Encoding], list[bool]]:
        """Encodings without special tokens of each text's first ``max_tokens`` tokens (exactly the whole
        text's first tokens; long texts are cut first as in ``encode``), and whether each text had more. The
        two sides of a cross-encoder's pair are made of these."""
        pieces, cut = list(texts), [False] * len(texts)
        first_cut = max_tokens * _FIRST_CUT_CHARS_PER_TOKEN
        for i, t in enumerate(texts):
            if len(t) > first_cut:
                piece = self._cut(t, first_cut, budget=max_tokens)
                if len(piece) < len(t):
                    pieces[i], cut[i] = piece, True
        encodings = self._full.encode_batch(pieces, add_special_tokens=False)
        more = []
        for i, e in enumerate(encodings):
            more.append(cut[i] or len(e.ids) > max_tokens)
            if len(e.ids) > max_tokens:
                e.truncate(max_tokens)
        return encodings, more

    def encode_content(self, texts: list[str]) -> list[Encoding]:
        """Untruncated encodings without special tokens (ids, character offsets, word ids): the material
        long texts are cut into windows from."""
        return self._full.encode_batch(texts, add_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._full.get_vocab_size(with_added_tokens=True)

    def count_tokens(self, text: str) -> int:
        """Length of ``text`` with special tokens and without truncation (``encode_batch``: it releases the GIL)."""
        return len(self._full.encode_batch([text], add_special_tokens=True)[0].ids)

    def decode_id(self, token_id: int) -> str:
        """The text of one token id, as ``tokenizer.decode([id])`` gives it (SentencePiece's word-start
        mark becomes nothing; a special token decodes to itself)."""
        return self._full.decode([int(token_id)], skip_special_tokens=False)
