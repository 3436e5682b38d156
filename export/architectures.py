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


@dataclass(frozen=True)
class Architecture:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab_size: int = CHINESE_VOCAB_SIZE
    max_positions: int = 512


ARCHITECTURES: dict[str, Architecture] = {
    "bge-large-zh": Architecture(layers=24, hidden=1024, heads=16, intermediate=4096),
    "bge-base-zh": Architecture(layers=12, hidden=768, heads=12, intermediate=3072),
    "bge-small-zh": Architecture(layers=4, hidden=512, heads=8, intermediate=2048),
    # For the test-suite: the same vocabulary and positions, a few seconds to export.
    "tiny-zh": Architecture(layers=2, hidden=64, heads=4, intermediate=128),
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


def materialise(name: str, directory: Path, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of architecture ``name`` into ``directory`` and return it."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    directory.mkdir(parents=True, exist_ok=True)
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
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        # HF initialises every LayerNorm to (1, 0) and every bias to 0; perturb them so the random model
        # has no degenerate, shared tensors and the graph looks like a trained one to the optimizer.
        for pname, p in model.named_parameters():
            if pname.endswith("LayerNorm.weight"):
                p.add_(torch.randn_like(p) * 0.05)
            elif pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.02)
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
    # sentence-transformers modules as in the BGE checkpoints: CLS pooling, then Normalize
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
        json.dumps({"max_seq_length": arch.max_positions, "do_lower_case": True}), encoding="utf-8"
    )
    (directory / "RANDOM_WEIGHTS").write_text(
        f"architecture={name} seed={seed}: random weights, for speed and plumbing tests only\n", encoding="utf-8"
    )
    return directory
