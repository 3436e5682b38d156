"""The FP16 variant for CUDA (INT8 lives in quantize.py)."""

from __future__ import annotations

from typing import Any

import onnx

LAYER_OUTPUT_OPS = ("SkipLayerNormalization", "LayerNormalization")


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes after the encoder's last layer norm (pooling and normalisation) and of the
    constants only they read. These stay float32: a sum of squares over 1024 dimensions, or a mean over
    512 tokens, can exceed float16's 65504."""
    nodes = list(model.graph.node)
    last = max(i for i, n in enumerate(nodes) if n.op_type in LAYER_OUTPUT_OPS)
    live = set(nodes[last].output)
    head = []
    for n in nodes[last + 1 :]:
        if any(i in live for i in n.input):
            head.append(n.name)
            live.update(n.output)
    consumers: dict[str, list[str]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    chosen = set(head)
    for n in nodes:
        if n.op_type == "Constant" and all(c in chosen for o in n.output for c in consumers.get(o, [])):
            head.append(n.name)
    return head


def to_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Float16 weights and activations in the encoder, float32 inputs, outputs, pooling and norm."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    keep = head_nodes(model)
    om = OnnxModel(model)
    om.convert_float_to_float16(keep_io_types=True, node_block_list=keep, use_symbolic_shape_infer=True)
    return om.model, {"kept_float32_nodes": keep, "keep_io_types": True}
