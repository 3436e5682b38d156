"""The exported graphs, traced to ONNX: the encoder (BERT or XLM-RoBERTa) followed by pooling and L2
normalisation (embedders), or by the sequence-classification head (cross-encoder rerankers: one logit per pair).

XLM-RoBERTa's embedding is written BERT-style (``bert_style_embeddings``) so onnxruntime's BERT fusions apply to
it. The encoder's forward is written out here (attention with an explicit additive mask, as BERT was
originally written) instead of calling transformers' forward: recent transformers versions build the
attention mask with data-dependent shortcuts that tracing freezes for the example shape, and the
classic form is the one onnxruntime's transformer fusions recognise.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from .reference import pool

INPUT_NAMES = ("input_ids", "attention_mask")
PAIR_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")  # BERT cross-encoders read segments
OUTPUT_NAME = "embedding"
SCORE_NAME = "score"
SPARSE_NAME = "sparse_weights"  # bge-m3: relu(sparse_linear(h)) per token, [batch, sequence]
COLBERT_NAME = "colbert_vecs"  # bge-m3: normalise(colbert_linear(h[:, 1:]) * mask), [batch, sequence - 1, dim]
OPSET = 17
_SEQ_AXES = {0: "batch", 1: "sequence"}


def input_names(model: torch.nn.Module, kind: str) -> tuple[str, ...]:
    """The graph's inputs: segment ids only for a pair model whose table has more than one segment."""
    types = int(getattr(model.config, "type_vocab_size", 1) or 1)
    return PAIR_INPUT_NAMES if kind == "reranker" and types > 1 else INPUT_NAMES


def bert_style_embeddings(roberta_embeddings: torch.nn.Module, config) -> torch.nn.Module:
    """XLM-RoBERTa's embedding as a BertEmbeddings module with the same weights.

    RoBERTa numbers real tokens from ``padding_idx + 1``; with right padding that is ``arange + padding_idx +
    1`` for every real token, so slicing the position table past ``padding_idx`` and counting from 0 gives the
    same vectors for every real token (a padding token's differ, and the attention mask hides them). The
    single token-type row is kept as a one-row segment table, as a BERT graph without segment input has it.
    onnxruntime's EmbedLayerNormalization fusion recognises this form (its RoBERTa position matcher is off)."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertEmbeddings

    first = int(config.pad_token_id) + 1
    positions = roberta_embeddings.position_embeddings.weight.shape[0] - first
    cfg = BertConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                     max_position_embeddings=positions, type_vocab_size=config.type_vocab_size,
                     layer_norm_eps=config.layer_norm_eps, pad_token_id=config.pad_token_id)
    emb = BertEmbeddings(cfg).eval()
    with torch.no_grad():
        emb.word_embeddings.weight.copy_(roberta_embeddings.word_embeddings.weight)
        emb.position_embeddings.weight.copy_(roberta_embeddings.position_embeddings.weight[first:])
        emb.token_type_embeddings.weight.copy_(roberta_embeddings.token_type_embeddings.weight)
        emb.LayerNorm.weight.copy_(roberta_embeddings.LayerNorm.weight)
        emb.LayerNorm.bias.copy_(roberta_embeddings.LayerNorm.bias)
    return emb


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The encoder of an AutoModel (itself) or of a ...ForSequenceClassification (its .bert / .roberta)."""
    for name in ("bert", "roberta"):
        inner = getattr(model, name, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return model


class Encoder(torch.nn.Module):
    """The transformer layers written out (classic additive mask), shared by both graph kinds."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        body = backbone(model)
        self.layers = body.encoder.layer
        self.heads = body.config.num_attention_heads
        if body.config.model_type == "xlm-roberta":
            self.embeddings = bert_style_embeddings(body.embeddings, body.config)
        else:
            self.embeddings = body.embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        batch, seq, hidden = x.shape[0], x.shape[1], x.shape[2]
        head_dim = hidden // self.heads
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.heads, head_dim).permute(0, 2, 1, 3)

        for layer in self.layers:
            att = layer.attention.self
            q, k, v = split(att.query(x)), split(att.key(x)), split(att.value(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim) + additive
            context = torch.matmul(torch.softmax(scores, dim=-1), v)
            context = context.permute(0, 2, 1, 3).reshape(batch, seq, hidden)
            a = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + x)
            h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(a))
            x = layer.output.LayerNorm(layer.output.dense(h) + a)
        return x


class PooledEncoder(torch.nn.Module):
    """input_ids, attention_mask -> pooled (and normalised) embedding, float32 [batch, hidden]."""

    def __init__(self, model: torch.nn.Module, pooling: str, normalize: bool) -> None:
        super().__init__()
        self.encoder = Encoder(model)
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.encoder(input_ids, attention_mask)
        vec = pool(x, attention_mask, self.pooling)
        if self.normalize:
            vec = torch.nn.functional.normalize(vec, p=2, dim=1)
        return vec


class M3Encoder(torch.nn.Module):
    """bge-m3's three outputs from one pass, as FlagEmbedding's BGEM3FlagModel computes them: the pooled,
    normalised dense vector; each token's lexical weight relu(sparse_linear(h)) (the per-id max and the
    dropping of special tokens happen in the runtime, where the ids are); and the ColBERT vectors
    normalise(colbert_linear(h[:, 1:]) * mask[:, 1:]) (padding rows come out zero)."""

    def __init__(self, model: torch.nn.Module, pooling: str, normalize: bool,
                 colbert: torch.nn.Linear, sparse: torch.nn.Linear) -> None:
        super().__init__()
        self.encoder = Encoder(model)
        self.pooling, self.normalize = pooling, normalize
        self.colbert, self.sparse = colbert, sparse

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.encoder(input_ids, attention_mask)
        vec = pool(x, attention_mask, self.pooling)
        if self.normalize:
            vec = torch.nn.functional.normalize(vec, p=2, dim=1)
        weights = torch.relu(self.sparse(x))[..., 0]
        cols = self.colbert(x[:, 1:]) * attention_mask[:, 1:, None].to(x.dtype)
        return vec, weights, torch.nn.functional.normalize(cols, p=2, dim=-1)


class PairScorer(torch.nn.Module):
    """input_ids, attention_mask[, token_type_ids] -> relevance logit per pair, float32 [batch]: the encoder,
    then the checkpoint's own classification head on the first token (BERT: pooler dense + tanh, then the
    classifier; XLM-R: dense + tanh, then out_proj), as ...ForSequenceClassification computes it in eval."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = Encoder(model)
        if hasattr(model, "roberta"):
            self.dense, self.out = model.classifier.dense, model.classifier.out_proj
        else:
            pooler = model.bert.pooler
            if pooler is None:
                raise ValueError("this BERT cross-encoder has no pooler; its classification head cannot be exported")
            self.dense, self.out = pooler.dense, model.classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.encoder(input_ids, attention_mask, token_type_ids)
        return self.out(torch.tanh(self.dense(x[:, 0])))[:, 0]


def export_onnx(model: torch.nn.Module, pooling: str, normalize: bool, path: Path, kind: str = "embedder",
                heads: tuple[torch.nn.Linear, torch.nn.Linear] | None = None) -> tuple[str, ...]:
    """Trace the embedder (``PooledEncoder``; with bge-m3's ``heads`` (colbert, sparse): ``M3Encoder``) or the
    reranker (``PairScorer``) to ``path`` with dynamic batch and sequence axes; returns the input names."""
    names = input_names(model, kind)
    axes: dict[str, dict[int, str]] = {}
    if kind == "reranker":
        wrapper: torch.nn.Module = PairScorer(model)
        outputs = [SCORE_NAME]
    elif heads is not None:
        wrapper = M3Encoder(model, pooling, normalize, *heads)
        outputs = [OUTPUT_NAME, SPARSE_NAME, COLBERT_NAME]
        axes = {SPARSE_NAME: _SEQ_AXES, COLBERT_NAME: {0: "batch", 1: "sequence_after_first"}}
    else:
        wrapper = PooledEncoder(model, pooling, normalize)
        outputs = [OUTPUT_NAME]
    wrapper.eval()
    ids = torch.full((2, 8), 5, dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    mask[1, 5:] = 0
    args: tuple[torch.Tensor, ...] = (ids, mask)
    if "token_type_ids" in names:
        types = torch.zeros((2, 8), dtype=torch.long)
        types[:, 4:] = 1
        args = (ids, mask, types)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python ints are expected
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            dynamo=False,  # the TorchScript exporter yields the node patterns ORT's BERT fusions match
            input_names=list(names),
            output_names=outputs,
            dynamic_axes={**{n: _SEQ_AXES for n in names}, outputs[0]: {0: "batch"}, **axes},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    model.eval()  # export restores the wrapper's original training flag on the shared submodules
    return names
