"""Accuracy-aware INT8 for BERT encoders: per-channel int8 weights, static uint8 activations, and a plan
per matrix product measured on calibration text (never on the probe or report sets).

1. Calibrate: run the FP32 graph, record the per-channel range of every product's input over real tokens,
   a sample of rows, and the FP32 vectors (int8_plan.calibrate).
2. Plan (int8_plan): SmoothQuant for attention and FFN-up inputs (folded into V for the attention output),
   the outlier split for FFN down-projections.
3. Greedy, on the calibration texts' min cosine to FP32: quantise; while below target, first give the FFN
   up-projection whose simulated error the split cuts most its outlier split, then, as a last resort, hand
   the worst-simulated product back to float32 (at most a fifth of them). Every step is recorded.
4. onnxruntime's quantize_dynamic writes the int8 weights; its DynamicQuantizeLinear nodes become static
   QuantizeLinear nodes with the calibrated ranges (a text's vector never depends on its batch), and the
   products become fused MatMulIntegerToFloat nodes with their bias (int8_graph). The word-embedding table
   is quantised too (QEmbedLayerNormalization).

Bits: onnxruntime's AVX2 u8s8 kernel (CPUs without VNNI) sums pairs of u8*s8 products in int16 (vpmaddubsw),
so a code pair must stay within 32767: 255 x 127 x 2 does not (full 8-bit weights and activations saturated on
an AVX2 host here), 255 x 63 x 2 and 127 x 127 x 2 do. The artifact must be right on both kinds of host, so
one of the two gives a bit: by default the weights (7-bit, reduce_range, what BERT embedders were measured
with); for bge-m3 the activations (7-bit codes, clipped to the calibrated range; 8-bit weights), because its
sparse and ColBERT outputs read every token's state and the weight bit is what they need: on the bge-m3
architecture the lexical score error went 0.133 -> 0.029 of the largest score and the dense min cosine
0.9964 -> 0.9979 at the same speed (per-token activation scales instead gave 0.052).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import int8_plan as plan_
from . import onnx_io
from .int8_graph import make_activations_static

CALIBRATION_FILE = Path(__file__).resolve().parent / "calibration.txt"
CALIBRATION_LONG_FILE = Path(__file__).resolve().parent / "calibration-long.txt"
EMBEDDING_OPS = ("EmbedLayerNormalization",)  # int8 word-embedding table: a quarter of its size


@dataclass(frozen=True)
class Int8Options:
    alpha: float = 0.7  # SmoothQuant migration strength, chosen on the calibration split
    calibration_texts: int = 256
    target_min_cosine: float = 0.99  # on the calibration texts, against the FP32 graph: the export gate
    agreement: str = "min_cosine"  # what the target is on: AGREEMENT's min_cosine (embedders), score_pearson (rerankers)
    down_outliers: int = 32  # FFN down-projection input channels computed in float32 (always)
    up_outliers: int = 4  # FFN up-projection input channels computed in float32 (when the greedy asks)
    max_float_fraction: float = 0.2  # never keep more than this share of the products in float32
    reduce_range: bool = True  # 7-bit weights
    activation_levels: int = 255  # activation codes 0..255 (8-bit) or 0..127 (7-bit: with 8-bit weights)
    static_activations: bool = True  # calibrated per-tensor scales: a text's vector never depends on its batch
    greedy: bool = True  # False: quantise once with the plan, no hand-backs (see pipeline: random-weight rerankers)

    def __post_init__(self) -> None:
        if self.activation_levels not in (127, 255):
            raise ValueError(f"activation_levels must be 255 (8-bit) or 127 (7-bit), got {self.activation_levels}")
        if not self.reduce_range and self.activation_levels > 127:
            raise ValueError("8-bit weights with 8-bit activations saturate onnxruntime's AVX2 u8s8 kernel on CPUs "
                             "without VNNI; keep reduce_range=True or set activation_levels=127")
        if self.activation_levels < 255 and not self.static_activations:
            raise ValueError("7-bit activation codes need static activations (dynamic quantisation codes 0..255)")


def calibration_texts(n: int) -> list[str]:
    """``n`` calibration texts: the empty text, short sentences (STS-B en/zh, even rows) and one in 16 a
    long news document (SOHU, past 512 tokens), so the ranges and the greedy's target cover both ends.

    The empty text is [CLS] [SEP] alone, the tokens that carry BERT's largest activations, with no other
    token to average their error out: with the FFN outlier split it was the worst input of the probe set
    (all-MiniLM-L6-v2: cosine 0.9885 while every sentence stayed above 0.99) until calibration saw it."""

    def read(path: Path) -> list[str]:
        return [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]

    short, long = read(CALIBRATION_FILE), read(CALIBRATION_LONG_FILE)
    n_long = min(len(long), n // 16)
    n_short = n - n_long - 1
    return [""] + short[:: max(1, len(short) // max(n_short, 1))][:n_short] + long[:n_long]


def _outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([o.reshape(len(o), -1) for o in (sess.run(None, f)[0] for f in feeds)])


def min_cosine(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Embedders: the worst text's cosine to the FP32 vector."""
    a, b = candidate.astype(np.float64), reference.astype(np.float64)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(((a * b).sum(axis=1) / den).min())


def score_pearson(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Rerankers: Pearson correlation of the pairs' logits with the FP32 logits (a scalar per pair has no
    cosine; what ranking needs is that scores move together)."""
    a, b = candidate[:, 0].astype(np.float64), reference[:, 0].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / max(np.sqrt((a * a).sum() * (b * b).sum()), 1e-30))


AGREEMENT = {"min_cosine": min_cosine, "score_pearson": score_pearson}


def quantize_int8(
    fp32_path: Path, dst: Path, feeds: list[dict[str, np.ndarray]], options: Int8Options = Int8Options()
) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns about pre-processing on the root logger
    cal = plan_.calibrate(fp32_path, feeds)
    model = onnx.load(str(fp32_path))
    roles = plan_.product_roles(model)
    smoothed = {n for n, r in roles.items() if r != plan_.FFN_DOWN}
    plan = plan_.Plan(roles=roles)
    if options.alpha > 0:
        plan.scales = plan_.smoothing_scales(model, cal, options.alpha, smoothed)
    inputs = {n.name: n.input[0] for n in plan_.targets(model)}
    for name, role in roles.items():
        if role == plan_.FFN_DOWN and options.down_outliers > 0:
            plan.outliers[name] = plan_.top_channels(cal.amax(inputs[name]), options.down_outliers)
    levels = options.activation_levels
    errors = {name: plan_.simulate(model, cal, plan, name, options.reduce_range, plan.outliers.get(name), levels)
              for name in roles}
    # FFN up-projections (not split yet), by how much the split cuts their simulated error: the greedy's
    # first remedy
    up_gain, up_channels = {}, {}
    for name, role in roles.items():
        if role == plan_.FFN_UP and options.up_outliers > 0:
            ch = plan_.top_channels(plan_.smoothed_amax(cal, plan, name, inputs[name]), options.up_outliers)
            up_channels[name] = ch
            up_gain[name] = errors[name] - plan_.simulate(model, cal, plan, name, options.reduce_range, ch, levels)
    up_order = sorted(up_gain, key=up_gain.get, reverse=True)
    del model
    ranked = sorted(errors, key=errors.get, reverse=True)
    limit = int(len(ranked) * options.max_float_fraction)
    reference, prepared = cal.reference, dst.with_name(dst.name + ".prepared.onnx")
    agreement = AGREEMENT[options.agreement]
    head = plan_.head_products(onnx.load(str(fp32_path), load_external_data=False))
    history: list[dict[str, Any]] = []
    split_up: list[str] = []
    try:
        while True:
            model, ranges, side = plan_.build(fp32_path, cal, plan)
            onnx_io.save(model, prepared, keep=False)
            del model
            quantize_dynamic(
                prepared,
                dst,
                op_types_to_quantize=list(plan_.QUANT_OPS + EMBEDDING_OPS),
                per_channel=True,
                reduce_range=options.reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=plan.float32 + side + head,
                extra_options={
                    # shape inference cannot see through the fused contrib ops; the documented way past it
                    "DefaultTensorType": onnx.TensorProto.FLOAT,
                    "MatMulConstBOnly": True,
                },
            )
            static = make_activations_static(dst, ranges, levels) if options.static_activations else 0
            cal_min = agreement(_outputs(dst, feeds), reference)
            history.append({"split_ffn_up": len(split_up), "float32_nodes": len(plan.float32),
                            "calibration_min_cosine": round(cal_min, 6)})
            if cal_min >= options.target_min_cosine or not options.greedy:
                break
            if len(split_up) < len(up_order):
                name = up_order[len(split_up)]
                split_up.append(name)
                plan.outliers[name] = up_channels[name]
            elif len(plan.float32) < limit:
                plan.float32.append(next(n for n in ranked if n not in plan.float32))
            else:
                break
    finally:
        for f in (prepared, prepared.with_name(prepared.name + ".data")):
            f.unlink(missing_ok=True)
    median = float(np.median(list(errors.values())))
    count = lambda role: sum(1 for r in roles.values() if r == role)  # noqa: E731
    return {
        "method": "smoothquant + outlier split + int8 (onnxruntime quantize_dynamic, activations made static), "
                  "greedy on calibration min cosine",
        "op_types": list(plan_.QUANT_OPS + EMBEDDING_OPS),
        "per_channel": True,
        "reduce_range": options.reduce_range,
        "weight_type": "int8",
        "weight_bits": 7 if options.reduce_range else 8,
        "activation_bits": 8 if levels == 255 else 7,
        "activation_type": ("uint8, static per tensor (calibrated)" if options.static_activations else "uint8, dynamic per tensor")
                           + ("" if levels == 255 else ", codes 0..127, clipped to the calibrated range"),
        "static_quantize_nodes": static,
        "smoothquant_alpha": options.alpha,
        "smoothed_nodes": {plan_.QKV: count(plan_.QKV), plan_.FFN_UP: count(plan_.FFN_UP),
                           "attention_output (folded into V)": count(plan_.ATTENTION_OUTPUT)},
        "outlier_channels": {name: [int(c) for c in ch] for name, ch in plan.outliers.items()},
        "split_ffn_up_nodes": split_up,
        "calibration_texts": options.calibration_texts,
        "calibration_source": "export/calibration.txt (STS-B en/zh even rows) + export/calibration-long.txt",
        "float32_nodes": plan.float32,
        "float32_head_nodes": head,
        "agreement": options.agreement,
        "handback_history": history,
        "greedy": options.greedy,
        "calibration_min_cosine_vs_fp32": round(cal_min, 6),
        "target_min_cosine": options.target_min_cosine,
        "quantized_nodes": len(errors) - len(plan.float32),
        "sensitivity_median_rel_error": round(median, 5),
        "sensitivity_rel_error": {k: round(v, 5) for k, v in sorted(errors.items(), key=lambda kv: -kv[1])},
    }
