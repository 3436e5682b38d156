"""The PyTorch reference: transformers' model, pooled and normalised as the model card prescribes.

Every exported variant is measured against this, and the tests and benchmarks use it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .source import ModelSpec


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    raise ValueError(f"unknown pooling {pooling!r}")


def load_model(spec: ModelSpec, attn_implementation: str = "sdpa"):
    """The encoder (embedders: BertModel / XLMRobertaModel without pooler) or the sequence classifier
    (rerankers), in eval mode, from safetensors only, never with remote code."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    kwargs = dict(use_safetensors=True, trust_remote_code=False, attn_implementation=attn_implementation,
                  dtype=torch.float32)
    if spec.kind == "reranker":
        model = AutoModelForSequenceClassification.from_pretrained(spec.path, **kwargs)
    else:
        model = AutoModel.from_pretrained(spec.path, add_pooling_layer=False, **kwargs)
    return model.eval()


def load_m3_heads(spec: ModelSpec) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """bge-m3's (colbert_linear, sparse_linear) as FlagEmbedding loads them: state dicts read with
    ``weights_only=True`` (no pickled code runs), shapes taken from the tensors."""
    heads = []
    for name in ("colbert_linear.pt", "sparse_linear.pt"):
        state = torch.load(spec.path / name, map_location="cpu", weights_only=True)
        out_dim, in_dim = state["weight"].shape
        layer = torch.nn.Linear(in_dim, out_dim)
        layer.load_state_dict(state)
        heads.append(layer.eval())
    return heads[0], heads[1]


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.path, use_fast=True, trust_remote_code=False)


class ReferenceEmbedder:
    """transformers AutoModel + the manifest's pooling and normalisation, fp32."""

    def __init__(self, spec: ModelSpec, model=None, tokenizer=None) -> None:
        self.spec = spec
        self.model = model if model is not None else load_model(spec)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 8) -> np.ndarray:
        """Vectors of ``texts`` on whatever device the model's weights are (CPU here, a GPU in the device
        script); tokenisation happens on the host."""
        self.model.eval()  # torch.onnx.export restores the training flag of the module it traced
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.spec.max_length,
                return_tensors="pt",
            )
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            vec = pool(hidden, mask, self.spec.pooling)
            if self.spec.normalize:
                vec = torch.nn.functional.normalize(vec, p=2, dim=1)
            out.append(vec.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)


class ReferenceM3:
    """bge-m3 as FlagEmbedding's BGEM3FlagModel computes it (transformers' encoder + the two heads): per text
    the dense vector, the lexical weights {token id: max weight} without cls/eos/pad/unk and weights <= 0,
    and the ColBERT matrix (the first ``tokens - 1`` rows)."""

    def __init__(self, spec: ModelSpec, model=None, tokenizer=None, heads=None) -> None:
        self.spec = spec
        self.model = model if model is not None else load_model(spec)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
        self.colbert, self.sparse = heads if heads is not None else load_m3_heads(spec)
        t = self.tokenizer
        self.skip = {t.convert_tokens_to_ids(getattr(t, k)) for k in ("cls_token", "eos_token", "pad_token", "unk_token")
                     if getattr(t, k, None) is not None}

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None
               ) -> tuple[np.ndarray, list[dict[int, float]], list[np.ndarray]]:
        self.model.eval()
        dense, lexical, colbert = [], [], []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                                 max_length=max_length or self.spec.max_length, return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            vec = pool(hidden, mask, self.spec.pooling)
            if self.spec.normalize:
                vec = torch.nn.functional.normalize(vec, p=2, dim=1)
            dense.append(vec.numpy())
            weights = torch.relu(self.sparse(hidden))[..., 0].numpy()
            cols = self.colbert(hidden[:, 1:]) * mask[:, 1:, None].float()
            cols = torch.nn.functional.normalize(cols, dim=-1).numpy()
            for row in range(len(ids)):
                n = int(mask[row].sum())
                lw: dict[int, float] = {}
                for tok, w in zip(ids[row, :n].tolist(), weights[row, :n].tolist()):
                    if tok not in self.skip and w > 0 and w > lw.get(tok, 0.0):
                        lw[tok] = w
                lexical.append(lw)
                colbert.append(cols[row, : n - 1])
        return np.concatenate(dense), lexical, colbert


def pair_template(tokenizer) -> tuple[list[int], list[int], list[int], list[int]]:
    """The special ids the tokenizer puts before, between and after the two sides of a pair, and the segment id
    of the prefix, first side + middle, and second side + suffix, read off its encoding of a probe pair."""
    a = tokenizer("a", add_special_tokens=False)["input_ids"]
    b = tokenizer("b", add_special_tokens=False)["input_ids"]
    both = tokenizer("a", "b", return_token_type_ids=True)
    ids, types = both["input_ids"], both["token_type_ids"]
    i = next(k for k in range(len(ids)) if ids[k : k + len(a)] == a)
    j = next(k for k in range(i + len(a), len(ids)) if ids[k : k + len(b)] == b)
    segments = [types[0] if i > 0 else 0, types[i], types[j]]
    return ids[:i], ids[i + len(a) : j], ids[j + len(b) :], segments


def pair_features(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int, query_max_length: int) -> list[dict]:
    """Each pair tokenised as FlagEmbedding's FlagReranker does it (transformers 4's ``prepare_for_model`` with
    ``only_second``; transformers 5 has no such call on fast tokenizers, so the pair is put together here from
    the tokenizer's own template): the query's tokens cut to ``query_max_length``, the passage's to
    ``max_length``, then the passage cut so the pair fits ``max_length``."""
    prefix, middle, suffix, (t0, t1, t2) = pair_template(tokenizer)
    specials = len(prefix) + len(middle) + len(suffix)
    queries = tokenizer([q for q, _ in pairs], add_special_tokens=False, truncation=True,
                        max_length=query_max_length)["input_ids"]
    passages = tokenizer([p for _, p in pairs], add_special_tokens=False, truncation=True,
                         max_length=max_length)["input_ids"]
    out = []
    for q, p in zip(queries, passages):
        p = p[: max(0, max_length - specials - len(q))]
        ids = prefix + q + middle + p + suffix
        types = [t0] * len(prefix) + [t1] * (len(q) + len(middle)) + [t2] * (len(p) + len(suffix))
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "token_type_ids": types})
    return out


class ReferenceReranker:
    """transformers' ...ForSequenceClassification on pairs tokenised as FlagReranker does; raw logits, fp32."""

    def __init__(self, spec: ModelSpec, model=None, tokenizer=None) -> None:
        self.spec = spec
        self.model = model if model is not None else load_model(spec)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)

    @torch.inference_mode()
    def score(self, pairs: Sequence[tuple[str, str]], batch_size: int = 8) -> np.ndarray:
        self.model.eval()
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(pairs), batch_size):
            feats = pair_features(self.tokenizer, pairs[start : start + batch_size], self.spec.max_length,
                                  self.spec.query_max_length)
            enc = self.tokenizer.pad(feats, padding=True, return_tensors="pt")
            args = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            if int(getattr(self.model.config, "type_vocab_size", 1) or 1) == 1:
                args.pop("token_type_ids", None)
            logits = self.model(**args).logits
            out.append(logits[:, 0].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0,), np.float32)