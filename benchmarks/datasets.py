"""Loaders for the evaluation data shipped in ``benchmarks/data`` (see its NOTICE)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Pairs:
    """Sentence pairs with a gold similarity score."""

    first: list[str]
    second: list[str]
    score: list[float]

    def __len__(self) -> int:
        return len(self.score)

    def split(self, fraction: float = 0.5) -> tuple["Pairs", "Pairs"]:
        """Deterministic split: even rows / odd rows when fraction is 0.5 (no ordering bias)."""
        step = round(1 / fraction)
        a = [i for i in range(len(self)) if i % step == 0]
        b = [i for i in range(len(self)) if i % step != 0]
        pick = lambda idx: Pairs([self.first[i] for i in idx], [self.second[i] for i in idx], [self.score[i] for i in idx])  # noqa: E731
        return pick(a), pick(b)


def _lines(name: str) -> list[str]:
    return [line.rstrip("\r\n") for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def sts_b_en() -> Pairs:
    rows = [line.split("\t") for line in _lines("sts-b-en.test.tsv")[1:]]
    return Pairs([r[6] for r in rows], [r[7] for r in rows], [float(r[5]) for r in rows])


def sts_b_zh() -> Pairs:
    rows = [line.split("\t") for line in _lines("sts-b-zh.test.tsv")]
    return Pairs([r[0] for r in rows], [r[1] for r in rows], [float(r[2]) for r in rows])


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in _lines(name)]


def sohu_long_documents() -> list[str]:
    """Long Chinese news documents (many past 512 tokens)."""
    return [r["sentence2"] for r in _jsonl("sohu-dc.part1.jsonl")]


def sohu_short_long() -> Pairs:
    """SOHU short text vs long news document pairs, labelled 0/3/5 (74% of the documents past 512 tokens)."""
    rows = _jsonl("sohu-dc.part1.jsonl")
    return Pairs([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [float(r["label"]) for r in rows])


def sohu_passages() -> list[str]:
    rows = _jsonl("sohu-dd.test.jsonl")
    return [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows]


def zh_queries() -> list[str]:
    return [r["query"] for r in _jsonl("zh-query-pos-neg.jsonl")]
