"""The BGE architectures with seeded random weights: realistic sizes and speed with no hub access.

A random checkpoint is materialised as an ordinary Hugging Face directory (config, safetensors,
vocab, tokenizer) so the rest of the export runs exactly as for a downloaded model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BGE_ZH_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："
BGE_EN_INSTRUCTION = "Represent this sentence for searching relevant passages: "
CHINESE_VOCAB_SIZE = 21128


XLMR_VOCAB_SIZE = 250002


@dataclass(frozen=True)
class Architecture:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab_size: int = CHINESE_VOCAB_SIZE
    max_positions: int = 512
    family: str = "bert"  # or "xlm-roberta"
    kind: str = "embedder"  # or "reranker" (a sequence-classification head with one label)
    m3: bool = False  # bge-m3: an XLM-R embedder with its sparse and ColBERT heads (sparse_linear.pt, colbert_linear.pt)


def _xlmr_reranker(layers: int, hidden: int, heads: int, intermediate: int, positions: int = 514,
                   vocab: int = XLMR_VOCAB_SIZE) -> Architecture:
    return Architecture(layers, hidden, heads, intermediate, vocab_size=vocab, max_positions=positions,
                        family="xlm-roberta", kind="reranker")


def _m3(layers: int, hidden: int, heads: int, intermediate: int, positions: int = 8194,
        vocab: int = XLMR_VOCAB_SIZE) -> Architecture:
    return Architecture(layers, hidden, heads, intermediate, vocab_size=vocab, max_positions=positions,
                        family="xlm-roberta", m3=True)


ARCHITECTURES: dict[str, Architecture] = {
    "bge-large-zh": Architecture(layers=24, hidden=1024, heads=16, intermediate=4096),
    "bge-base-zh": Architecture(layers=12, hidden=768, heads=12, intermediate=3072),
    "bge-small-zh": Architecture(layers=4, hidden=512, heads=8, intermediate=2048),
    # the published cross-encoders (XLMRobertaForSequenceClassification, one label)
    "bge-reranker-base": _xlmr_reranker(12, 768, 12, 3072),
    "bge-reranker-large": _xlmr_reranker(24, 1024, 16, 4096),
    "bge-reranker-v2-m3": _xlmr_reranker(24, 1024, 16, 4096, positions=8194),
    # BAAI/bge-m3: XLM-R large, 8192 tokens, dense (CLS) + sparse + ColBERT heads
    "bge-m3": _m3(24, 1024, 16, 4096),
    # For the test-suite: a few seconds to export.
    "tiny-zh": Architecture(layers=2, hidden=64, heads=4, intermediate=128),
    "tiny-zh-reranker": Architecture(layers=2, hidden=64, heads=4, intermediate=128, kind="reranker"),
    "tiny-xlmr-reranker": _xlmr_reranker(2, 64, 4, 128, vocab=8002),
    "tiny-m3": _m3(2, 64, 4, 128, positions=1026, vocab=8002),
}


def chinese_vocab(size: int = CHINESE_VOCAB_SIZE) -> list[str]:
    """A bert-base-chinese-shaped vocabulary: the same special-token ids ([PAD]=0, [UNK]=100,
    [CLS]=101, [SEP]=102, [MASK]=103), ASCII, full-width punctuation, then CJK ideographs in code-point
    order (one token per character, as in the real vocabulary) and '##' continuation pieces."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [chr(c) for c in range(0x21, 0x7F) if not chr(c).isupper()]  # the tokenizer lowercases
    vocab += list("，。！？；：、“”‘’（）《》【】…—·～￥％")
    seen = set(vocab)
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    for c in range(0x4E00, 0x9FFF + 1):
        if len(vocab) + len(pieces) >= size:
            break
        ch = chr(c)
        if ch not in seen:
            vocab.append(ch)
    vocab += pieces
    vocab = vocab[:size]
    if len(vocab) != size:
        raise ValueError(f"could not build a vocabulary of {size} entries")
    return vocab


def _perturb(model) -> None:
    """HF initialises every LayerNorm to (1, 0) and every bias to 0; perturb them (from torch's seeded stream,
    right after the model's own initialisation) so the random model has no degenerate, shared tensors and the
    graph looks like a trained one to the optimizer."""
    import torch

    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("LayerNorm.weight"):
                p.add_(torch.randn_like(p) * 0.05)
            elif pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.02)


def _spread_head(model, tokenizer, seed: int) -> None:
    """Give a random cross-encoder a head whose logits spread over a few units between passages, as a trained
    reranker's do, so the ranking gate measures something. A random head reads the first token's state,
    which random layers make nearly the same for every input (logits within +-0.02 of each other); this head
    whitens that state's variation over the probe pairs first (seeded random mixing of its principal
    directions), then applies tanh and a random output row: still random weights, with a realistic spread."""
    import torch

    from .probes import PROBES

    pairs = [(q, p) for q in PROBES[2:6] for p in PROBES]
    enc = tokenizer(pairs, padding=True, truncation=True, max_length=128, return_tensors="pt")
    body = model.roberta if hasattr(model, "roberta") else model.bert
    args = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if int(getattr(model.config, "type_vocab_size", 1) or 1) == 1:
        args.pop("token_type_ids", None)
    with torch.no_grad():
        h = body(**args).last_hidden_state[:, 0].double()
        mu = h.mean(0)
        _, sv, vt = torch.linalg.svd(h - mu, full_matrices=False)
        k = min(16, int((sv > sv[0] * 0.05).sum()))  # well-conditioned directions only: noise stays noise
        g = torch.Generator().manual_seed(seed + 2)
        hidden = h.shape[1]
        whiten = vt[:k] / (sv[:k, None] / (len(h) ** 0.5))  # k x H: unit variance along each direction
        mix = torch.randn(hidden, k, generator=g, dtype=torch.float64) / k ** 0.5
        w = mix @ whiten
        if hasattr(model.classifier, "out_proj"):  # XLM-R: classifier.dense -> tanh -> classifier.out_proj
            dense, last = model.classifier.dense, model.classifier.out_proj
        else:  # BERT: pooler.dense -> tanh -> classifier
            dense, last = model.bert.pooler.dense, model.classifier
        dense.weight.copy_(w.float())
        dense.bias.copy_((-w @ mu).float())
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 3.0 / hidden ** 0.5)
        last.bias.zero_()


def _write_random_notice(directory: Path, name: str, seed: int) -> None:
    (directory / "RANDOM_WEIGHTS").write_text(
        f"architecture={name} seed={seed}: random weights, for speed and plumbing tests only\n", encoding="utf-8"
    )


def xlmr_pieces(size: int, seed: int = 0) -> list[tuple[str, float]]:
    """A SentencePiece-shaped unigram vocabulary of ``size`` entries for a random XLM-R: the special tokens at
    XLM-R's ids (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last), then single characters (ASCII, CJK, with and
    without the word-start mark), then seeded random Latin pieces; longer pieces score higher, so words split
    into few pieces as with a trained model."""
    import random

    rng = random.Random(seed)
    out: list[tuple[str, float]] = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in out} | {"<mask>"}

    def add(piece: str, score: float) -> None:
        if piece not in seen and len(out) < size - 1:
            seen.add(piece)
            out.append((piece, score))

    chars = [chr(c) for c in range(0x21, 0x7F)] + list("，。！？；：、“”‘’（）《》【】…—·～￥％")
    cjk = [chr(c) for c in range(0x4E00, 0x9FA6)]
    for c in chars:
        add("\u2581" + c, -9.0)
        add(c, -10.0)
    add("\u2581", -8.0)
    for c in cjk[: max(0, (size - len(out)) // 3)]:
        add(c, -10.0)
        add("\u2581" + c, -10.5)
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(out) < size - 1:
        n = rng.randint(2, 8)
        piece = "".join(rng.choice(letters) for _ in range(n))
        add(("\u2581" + piece) if rng.random() < 0.5 else piece, -10.0 + n)
    out.append(("<mask>", 0.0))
    return out


def _materialise_xlmr(name: str, arch: Architecture, directory: Path, seed: int) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaTokenizerFast

    pieces = xlmr_pieces(arch.vocab_size, seed)
    backend = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = XLMRobertaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                  cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                  model_max_length=arch.max_positions - 2)
    tok.save_pretrained(directory)
    config = XLMRobertaConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, intermediate_size=arch.intermediate,
        max_position_embeddings=arch.max_positions, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, layer_norm_eps=1e-5, num_labels=1, architectures=["XLMRobertaForSequenceClassification"],
    )
    torch.manual_seed(seed)
    if arch.m3:
        return _materialise_m3(name, arch, config, directory, seed)
    model = XLMRobertaForSequenceClassification(config).eval()
    _perturb(model)
    _spread_head(model, tok, seed)
    model.save_pretrained(directory, safe_serialization=True)
    _write_random_notice(directory, name, seed)
    return directory


def _materialise_m3(name: str, arch: Architecture, config, directory: Path, seed: int) -> Path:
    """bge-m3's layout: an XLMRobertaModel, its two heads as the state dicts FlagEmbedding loads
    (``colbert_linear.pt``: Linear H->H, ``sparse_linear.pt``: Linear H->1), and sentence-transformers
    modules for the dense vector (CLS, normalised), as the published checkpoint has them."""
    import torch
    from transformers import XLMRobertaModel

    config.architectures = ["XLMRobertaModel"]
    model = XLMRobertaModel(config, add_pooling_layer=False).eval()
    _perturb(model)
    model.save_pretrained(directory, safe_serialization=True)
    g = torch.Generator().manual_seed(seed + 3)
    h = arch.hidden
    colbert = {"weight": torch.randn(h, h, generator=g) / h ** 0.5, "bias": torch.randn(h, generator=g) * 0.02}
    # a relu'd projection: the bias keeps about two tokens in three above zero, as the trained head does
    sparse = {"weight": torch.randn(1, h, generator=g) / h ** 0.5, "bias": torch.full((1,), 0.4)}
    torch.save(colbert, directory / "colbert_linear.pt")
    torch.save(sparse, directory / "sparse_linear.pt")
    _write_st_modules(directory, arch, arch.max_positions - 2)
    _write_random_notice(directory, name, seed)
    return directory


def _write_st_modules(directory: Path, arch: Architecture, max_seq_length: int) -> None:
    """sentence-transformers modules as in the BGE checkpoints: CLS pooling, then Normalize."""
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2), encoding="utf-8")
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": arch.hidden,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2), encoding="utf-8")
    (directory / "2_Normalize").mkdir(exist_ok=True)
    (directory / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": arch.family == "bert"}), encoding="utf-8"
    )


def materialise(name: str, directory: Path, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of architecture ``name`` into ``directory`` and return it."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    directory.mkdir(parents=True, exist_ok=True)
    if arch.family == "xlm-roberta":
        return _materialise_xlmr(name, arch, directory, seed)
    vocab = chinese_vocab(arch.vocab_size)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = BertConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        intermediate_size=arch.intermediate,
        max_position_embeddings=arch.max_positions,
        type_vocab_size=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    if arch.kind == "reranker":
        config.num_labels = 1
        config.architectures = ["BertForSequenceClassification"]
        model = BertForSequenceClassification(config).eval()
    else:
        model = BertModel(config, add_pooling_layer=False).eval()
    _perturb(model)
    model.save_pretrained(directory, safe_serialization=True)
    backend = BertWordPieceTokenizer(
        {t: i for i, t in enumerate(vocab)}, lowercase=True, handle_chinese_chars=True, strip_accents=None
    )
    tok = BertTokenizerFast(
        tokenizer_object=backend._tokenizer,
        vocab_file=str(directory / "vocab.txt"),
        do_lower_case=True,
        model_max_length=arch.max_positions,
    )
    tok.save_pretrained(directory)
    if arch.kind == "reranker":
        _spread_head(model, tok, seed)
        model.save_pretrained(directory, safe_serialization=True)
        _write_random_notice(directory, name, seed)
        return directory
    _write_st_modules(directory, arch, arch.max_positions)
    _write_random_notice(directory, name, seed)
    return directory
