"""The fixed probe set every variant is checked on at export time: Chinese and English, short to past
the 512-token limit, with punctuation, digits, emoji and mixed scripts."""

from __future__ import annotations

_NEWS = (
    "国家统计局今天发布数据显示，今年前三季度国内生产总值同比增长百分之五点二，"
    "其中第三产业增加值增长较快，消费对经济增长的贡献率继续提高。专家表示，"
    "随着一系列稳增长政策落地见效，经济运行总体平稳，发展质量稳步提升。"
)

PROBES: tuple[str, ...] = (
    "",
    "好",
    "手机开不了机怎么办？",
    "今天天气很好，我们去公园散步吧。",
    "为这个句子生成表示以用于检索相关文章：如何提高睡眠质量",
    "北京是中华人民共和国的首都，也是全国的政治、文化中心。",
    "2024年第3季度营收为1,234.56亿元，同比增长12.5%。",
    "我爱自然语言处理 NLP 和 machine learning！😊👍",
    "ＡＢＣ全角字符，以及「引号」和《书名号》…",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Retrieval-augmented generation combines a retriever with a generator to answer questions.",
    "A man is playing a guitar on stage while the crowd sings along loudly.",
    "Tabs\tand\nnewlines  and   spaces",
    _NEWS,
    _NEWS * 3,
    # past 512 tokens: checks that truncation matches the reference
    _NEWS * 8,
    ("This sentence is repeated to build a long English passage. " * 60).strip(),
)

# Rerankers are checked per query: each query against every probe text as its passage (the empty text, short
# and long ones, past 512 tokens: the passage side is cut to fit), in both languages, and one query past the
# query cap.
RERANK_QUERIES: tuple[str, ...] = (
    "手机开不了机怎么办？",
    "北京是哪个国家的首都？",
    "What is the capital of France?",
    "how to improve sleep quality",
    "国家统计局发布的经济数据 " * 60,
)


def rerank_groups() -> list[list[tuple[str, str]]]:
    """One list of (query, passage) pairs per probe query."""
    return [[(q, p) for p in PROBES] for q in RERANK_QUERIES]
