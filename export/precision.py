"""The reduced-precision variants: FP16 for CUDA, INT8 for CPUs."""

from __future__ import annotations

import logging
from pathlib import Path
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


def to_int8(src: Path, dst: Path, reduce_range: bool) -> dict[str, Any]:
    """Dynamic INT8: per-channel int8 weights for the encoder's matrix products (fused attention
    included), activations quantised per call. ``reduce_range`` uses 7-bit weights so the AVX2 u8s8
    kernel (vpmaddubsw, int16 pair sums) cannot saturate on CPUs without VNNI."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns about pre-processing on the root logger

    op_types = ["MatMul", "Attention"]
    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=op_types,
        per_channel=True,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8,
        extra_options={
            # shape inference cannot see through the fused contrib ops; this is the documented way past it
            "DefaultTensorType": onnx.TensorProto.FLOAT,
            "MatMulConstBOnly": True,
        },
    )
    return {
        "method": "onnxruntime quantize_dynamic",
        "op_types": op_types,
        "per_channel": True,
        "reduce_range": reduce_range,
        "weight_type": "int8",
        "activation_type": "uint8 (dynamic, per tensor)",
    }
