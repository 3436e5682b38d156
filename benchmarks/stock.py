"""The stock INT8 recipes our quantiser is compared with, applied as their users would apply them.

Both start from the plain traced graph (no onnxruntime fusions), which is what optimum exports and what
sentence-transformers' ``export_dynamic_quantized_onnx_model`` quantises.

- ``default``: ``onnxruntime.quantization.quantize_dynamic(src, dst)`` with its defaults (per-tensor
  weights, every quantisable op).
- ``optimum_avx512_vnni``: optimum's ``AutoQuantizationConfig.avx512_vnni(is_static=False)``, the preset
  sentence-transformers uses: dynamic, QOperator/IntegerOps, per-channel symmetric int8 weights, asymmetric
  uint8 activations, full 8-bit range, every op in onnxruntime's IntegerOps registry. The arguments below
  are the ones optimum's ``ORTQuantizer.quantize`` passes to onnxruntime's ``ONNXQuantizer`` for that
  preset; optimum-onnx itself cannot be installed beside transformers 5 (it pins transformers<4.58).
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx


def quantize_default(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(src, dst)


def quantize_optimum_avx512_vnni(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantizationMode, QuantType
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    logging.getLogger().setLevel(logging.ERROR)
    model = onnx.load(str(src))
    quantizer = ONNXQuantizer(
        model=model,
        per_channel=True,
        reduce_range=False,
        mode=QuantizationMode.IntegerOps,
        static=False,
        weight_qType=QuantType.QInt8,
        activation_qType=QuantType.QUInt8,
        tensors_range=None,
        nodes_to_quantize=[],
        nodes_to_exclude=[],
        op_types_to_quantize=list(IntegerOpsRegistry.keys()),
        extra_options={
            "WeightSymmetric": True,
            "ActivationSymmetric": False,
            "EnableSubgraph": False,
            "ForceSymmetric": False,
            "AddQDQPairToWeight": False,
            "DedicatedQDQPair": False,
            "QDQOpTypePerChannelSupportToAxis": {},
        },
    )
    quantizer.quantize_model()
    quantizer.model.save_model_to_file(str(dst), False)


STOCK = {"ort quantize_dynamic default": quantize_default, "optimum avx512_vnni preset": quantize_optimum_avx512_vnni}
