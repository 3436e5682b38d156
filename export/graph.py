"""The exported graph: the BERT encoder followed by pooling and L2 normalisation, traced to ONNX.

The encoder's forward is written out here (attention with an explicit additive mask, as BERT was
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
OUTPUT_NAME = "embedding"
OPSET = 17
DYNAMIC_AXES = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    OUTPUT_NAME: {0: "batch"},
}


class PooledEncoder(torch.nn.Module):
    """input_ids, attention_mask -> pooled (and normalised) embedding, float32 [batch, hidden]."""

    def __init__(self, bert: torch.nn.Module, pooling: str, normalize: bool) -> None:
        super().__init__()
        self.bert = bert
        self.pooling = pooling
        self.normalize = normalize
        self.heads = bert.config.num_attention_heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.bert.embeddings(input_ids=input_ids)
        batch, seq, hidden = x.shape[0], x.shape[1], x.shape[2]
        head_dim = hidden // self.heads
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.heads, head_dim).permute(0, 2, 1, 3)

        for layer in self.bert.encoder.layer:
            att = layer.attention.self
            q, k, v = split(att.query(x)), split(att.key(x)), split(att.value(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim) + additive
            context = torch.matmul(torch.softmax(scores, dim=-1), v)
            context = context.permute(0, 2, 1, 3).reshape(batch, seq, hidden)
            a = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + x)
            h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(a))
            x = layer.output.LayerNorm(layer.output.dense(h) + a)
        vec = pool(x, attention_mask, self.pooling)
        if self.normalize:
            vec = torch.nn.functional.normalize(vec, p=2, dim=1)
        return vec


def export_onnx(bert: torch.nn.Module, pooling: str, normalize: bool, path: Path) -> None:
    """Trace ``PooledEncoder`` to ``path`` with dynamic batch and sequence axes."""
    wrapper = PooledEncoder(bert, pooling, normalize).eval()
    ids = torch.full((2, 8), 101, dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    mask[1, 5:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python ints are expected
        torch.onnx.export(
            wrapper,
            (ids, mask),
            str(path),
            dynamo=False,  # the TorchScript exporter yields the node patterns ORT's BERT fusions match
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=DYNAMIC_AXES,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    bert.eval()  # export restores the wrapper's original training flag on the shared submodules
