"""Accuracy-aware INT8 for BERT encoders.

Steps on the fused FP32 graph, all measured on calibration text (never on the probe or report sets):

1. Calibrate: run the FP32 graph and record, for the input of every weight matrix product, the
   per-channel min and max over real tokens, a few subsampled batches for step 3, and the FP32 vectors.
2. Smooth (SmoothQuant): BERT activations carry a few outlier channels, and activations are quantised
   with one uint8 scale per tensor, so those channels crush the resolution of all others. Divide each
   input channel j by s_j = amax_j^a / wmax_j^(1-a) (an explicit Mul) and multiply row j of the weight by
   s_j: exact in float, far friendlier to int8.
3. Sensitivity: simulate each product's int8 error on the calibration batches and rank them. Quantise
   all, and while the calibration texts' min cosine to FP32 is below target, hand the worst-ranked product
   back to float32 (typically FFN down-projections, fed by GELU's long tail), up to a cap. The choice is
   returned for the manifest.
4. Static activations: onnxruntime's quantize_dynamic output gets each DynamicQuantizeLinear replaced by
   a QuantizeLinear with the calibrated range, so a text's vector never depends on its batch neighbours.
   The word-embedding table is quantised too (QEmbedLayerNormalization).

Weights use the 7-bit range (reduce_range): onnxruntime's AVX2 u8s8 kernel sums pairs of u8*s8 products in
int16 (vpmaddubsw) and saturates with full 8-bit weights on CPUs without VNNI; measured here, full-range
weights after smoothing lost more than the extra bit gained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

CALIBRATION_FILE = Path(__file__).resolve().parent / "calibration.txt"
CALIBRATION_LONG_FILE = Path(__file__).resolve().parent / "calibration-long.txt"
QUANT_OPS = ("MatMul", "Attention")
EMBEDDING_OPS = ("EmbedLayerNormalization",)  # int8 word-embedding table: a quarter of its size


@dataclass(frozen=True)
class Int8Options:
    alpha: float = 0.7  # SmoothQuant migration strength, chosen on the calibration split
    calibration_texts: int = 256
    target_min_cosine: float = 0.992  # on the calibration texts, against the FP32 graph
    max_float_fraction: float = 0.2  # never keep more than this share of the products in float32
    reduce_range: bool = True
    static_activations: bool = True  # calibrated per-tensor scales: a text's vector never depends on its batch


def calibration_texts(n: int) -> list[str]:
    """``n`` calibration texts: short sentences (STS-B en/zh, even rows) and one in 16 a long news document
    (SOHU, past 512 tokens), so the activation ranges also cover full-length inputs."""

    def read(path: Path) -> list[str]:
        return [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]

    short, long = read(CALIBRATION_FILE), read(CALIBRATION_LONG_FILE)
    n_long = min(len(long), n // 16)
    n_short = n - n_long
    return short[:: max(1, len(short) // max(n_short, 1))][:n_short] + long[:n_long]


def _targets(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in QUANT_OPS and len(n.input) > 1 and n.input[1] in inits]


@dataclass
class Calibration:
    ch_min: dict[str, np.ndarray]  # per-channel min over real tokens, by tensor name
    ch_max: dict[str, np.ndarray]  # per-channel max over real tokens
    # per tensor, a few batches: (sampled rows, per-channel min, per-channel max over the whole batch)
    batches: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]
    reference: np.ndarray  # the FP32 graph's (normalised) vectors of the calibration texts

    @property
    def amax(self) -> dict[str, np.ndarray]:
        return {k: np.maximum(np.abs(self.ch_min[k]), np.abs(self.ch_max[k])) for k in self.ch_min}


def calibrate(
    model_path: Path, feeds: list[dict[str, np.ndarray]], keep_batches: int = 4, keep_rows: int = 512
) -> Calibration:
    """Run the FP32 graph with the input of every target product exposed as an extra output.

    For the sensitivity simulation a few batches are kept per tensor, subsampled to ``keep_rows`` rows,
    together with the batch's own min and max (the dynamic quantiser's scale comes from the whole batch,
    padding included)."""
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    output = model.graph.output[0].name
    names = sorted({n.input[0] for n in _targets(model)})
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe_path = model_path.with_name(model_path.name + ".calibration.onnx")
    onnx.save_model(model, str(probe_path))
    del model
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(probe_path), opts, providers=["CPUExecutionProvider"])
    finally:
        probe_path.unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    ch_min: dict[str, np.ndarray] = {}
    ch_max: dict[str, np.ndarray] = {}
    batches: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {n: [] for n in names}
    embeddings = []
    for b, feed in enumerate(feeds):
        embedding, *outs = sess.run([output, *names], feed)
        embeddings.append(embedding)
        valid = feed["attention_mask"].astype(bool)
        for name, value in zip(names, outs):
            rows = value[valid] if value.ndim == 3 else value.reshape(-1, value.shape[-1])
            lo, hi = rows.min(axis=0), rows.max(axis=0)
            ch_min[name] = lo if name not in ch_min else np.minimum(ch_min[name], lo)
            ch_max[name] = hi if name not in ch_max else np.maximum(ch_max[name], hi)
            if b < keep_batches:
                flat = value.reshape(-1, value.shape[-1])
                pick = rng.choice(len(flat), size=min(keep_rows, len(flat)), replace=False)
                batches[name].append((flat[pick].copy(), flat.min(axis=0), flat.max(axis=0)))
    vectors = np.concatenate(embeddings)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return Calibration(ch_min=ch_min, ch_max=ch_max, batches=batches, reference=vectors)


def smoothing_scales(model: onnx.ModelProto, cal: Calibration, alpha: float) -> dict[str, np.ndarray]:
    """Per-node SmoothQuant scales s_j = amax_j^a / wmax_j^(1-a), for products whose weight is theirs alone."""
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    scales = {}
    amax = cal.amax
    for n in _targets(model):
        if uses[n.input[1]] != 1:
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        a = amax[n.input[0]].astype(np.float64)
        s = np.maximum(a, 1e-5) ** alpha / np.maximum(np.abs(w).max(axis=1), 1e-5) ** (1 - alpha)
        scales[n.name] = np.clip(s, 1e-2, 1e2)
    return scales


def apply_smoothing(model: onnx.ModelProto, scales: dict[str, np.ndarray]) -> None:
    """Insert x * (1/s) before each product and multiply its weight rows by s: exact in float."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        s = scales.get(n.name)
        if s is not None:
            w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
            inits[n.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), n.input[1]))
            scale_name, out_name = f"{n.name}/smooth_inv_scale", f"{n.name}/smoothed_input"
            model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), scale_name))
            nodes.append(helper.make_node("Mul", [n.input[0], scale_name], [out_name], name=f"{n.name}/smooth"))
            n.input[0] = out_name
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 asymmetric scale and zero point covering [lo, hi] (and 0, as onnxruntime requires)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255.0
    return scale, int(np.clip(np.round(-lo / scale), 0, 255))


def _int8_error(batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]], w: np.ndarray, reduce_range: bool) -> float:
    """Relative error of x @ w with per-tensor uint8 activations (each batch's own range) and per-channel
    symmetric int8 weights. Ranking by this per-batch error picked the same products as an end-to-end
    greedy search on all-MiniLM-L6-v2; ranking by the wider calibrated range did not."""
    qmax = 63.0 if reduce_range else 127.0
    w_scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / qmax  # per output channel, symmetric
    wq = np.round(w / w_scale) * w_scale
    err = ref = 0.0
    for x, ch_min, ch_max in batches:
        scale, zp = activation_qparams(float(ch_min.min()), float(ch_max.max()))
        xq = (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale
        y = x @ w
        err += float(np.square(xq @ wq - y).sum())
        ref += float(np.square(y).sum())
    return (err / max(ref, 1e-30)) ** 0.5


def sensitivity(
    model: onnx.ModelProto, cal: Calibration, scales: dict[str, np.ndarray], reduce_range: bool
) -> dict[str, float]:
    """Simulated relative int8 error of every product, after smoothing, on the calibration batches."""
    inits = {i.name: i for i in model.graph.initializer}
    errors = {}
    for n in _targets(model):
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        s = scales.get(n.name)
        batches = cal.batches[n.input[0]]
        if s is not None:
            # smoothing divides channel j by s_j (> 0): rows and per-channel extremes scale alike
            batches = [((x / s).astype(np.float32), a / s, b / s) for x, a, b in batches]
            w = (w * s[:, None]).astype(np.float32)
        errors[n.name] = _int8_error(batches, w, reduce_range)
    return errors


def activation_ranges(model: onnx.ModelProto, cal: Calibration, scales: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Calibrated [min, max] of every tensor a quantised product reads, after smoothing."""
    ranges = {}
    for n in model.graph.node:
        if n.op_type == "Mul" and n.name.endswith("/smooth"):
            owner = n.name[: -len("/smooth")]
            s = scales[owner]
            ranges[n.output[0]] = (float((cal.ch_min[n.input[0]] / s).min()), float((cal.ch_max[n.input[0]] / s).max()))
    for name in cal.ch_min:
        ranges.setdefault(name, (float(cal.ch_min[name].min()), float(cal.ch_max[name].max())))
    return ranges


def make_activations_static(path: Path, ranges: dict[str, tuple[float, float]]) -> int:
    """Replace each DynamicQuantizeLinear by a QuantizeLinear with the calibrated scale and zero point.

    Dynamic quantisation takes one scale per tensor, i.e. per batch, so a text's INT8 vector moved with
    its batch neighbours (cosine 0.9977 alone vs batched on STS-B with all-MiniLM-L6-v2). Fixed scales make
    every text's vector independent of the batch, and skip a min/max pass per product."""
    model = onnx.load(str(path))
    nodes, replaced = [], 0
    for n in model.graph.node:
        if n.op_type == "DynamicQuantizeLinear" and n.input[0] in ranges:
            scale, zp = activation_qparams(*ranges[n.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), n.output[1]))
            model.graph.initializer.append(numpy_helper.from_array(np.array(zp, np.uint8), n.output[2]))
            nodes.append(helper.make_node("QuantizeLinear", [n.input[0], n.output[1], n.output[2]], [n.output[0]], name=f"{n.name}/static"))
            replaced += 1
        else:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    fuse_integer_matmuls(model)
    fold_bias_into_products(model)
    scalar_weight_zero_points(model)
    onnx.save_model(model, str(path))
    return replaced


# operator -> position of the weight's zero point among its inputs
_WEIGHT_ZERO_POINT = {"MatMulIntegerToFloat": 5, "MatMulInteger": 3, "QAttention": 7}


def scalar_weight_zero_points(model: onnx.ModelProto) -> int:
    """Replace all-zero per-channel weight zero points (symmetric weights) by one scalar zero.

    The values are identical, but onnxruntime's u8s8 kernel takes a per-column zero-point path for a
    vector, which costs about 20% of the product (measured: 1280x384x1536 MatMulIntegerToFloat, 7.3 ms
    with a per-column zero point, 6.2 ms with a scalar one; per-column scales cost nothing)."""
    inits = {i.name: i for i in model.graph.initializer}
    zero = "weight_zero_point_scalar_int8"
    changed = 0
    for n in model.graph.node:
        pos = _WEIGHT_ZERO_POINT.get(n.op_type)
        if pos is None or len(n.input) <= pos or n.input[pos] not in inits:
            continue
        zp = numpy_helper.to_array(inits[n.input[pos]])
        if zp.ndim == 0 or zp.dtype != np.int8 or zp.any():
            continue
        n.input[pos] = zero
        changed += 1
    if changed:
        model.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int8), zero))
        used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return changed


def fuse_integer_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite MatMulInteger -> Cast -> Mul(scale_a x scale_b) as one com.microsoft MatMulIntegerToFloat.

    onnxruntime fuses this pattern itself only while scale_a comes from a DynamicQuantizeLinear: once the
    activation scale is a calibrated constant, constant folding turns the scale product into an
    initializer first and the fusion no longer matches, leaving an int32 tensor, a Cast and a Mul per
    product (measured on bge-small-zh: 10% of the node time). Returns the number of products fused."""
    prod = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    drop: set[int] = set()
    replace: dict[int, onnx.NodeProto] = {}
    for mul in model.graph.node:
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        cast, scales = prod.get(mul.input[0]), prod.get(mul.input[1])
        if cast is None or cast.op_type != "Cast" or scales is None or scales.op_type != "Mul":
            continue
        mmi = prod.get(cast.input[0])
        if mmi is None or mmi.op_type != "MatMulInteger":
            continue
        if any(users.get(t, 0) != 1 for t in (mmi.output[0], cast.output[0], scales.output[0])):
            continue
        a, b = list(mmi.input[:2])
        a_zp = mmi.input[2] if len(mmi.input) > 2 else ""
        b_zp = mmi.input[3] if len(mmi.input) > 3 else ""
        fused = helper.make_node(
            "MatMulIntegerToFloat", [a, b, scales.input[0], scales.input[1], a_zp, b_zp], [mul.output[0]],
            name=f"{mmi.name}/to_float", domain="com.microsoft",
        )
        drop.update(id(x) for x in (mmi, cast, scales))
        replace[id(mul)] = fused
    nodes = [replace.get(id(n), n) for n in model.graph.node if id(n) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(replace)


def fold_bias_into_products(model: onnx.ModelProto) -> int:
    """Move the bias ``Add`` that follows a MatMulIntegerToFloat into the product's own bias input.

    The graph's layer norms are plain Add + LayerNormalization (export/optimize.py), so each attention
    output and FFN down-projection is followed by Add(bias); the fused kernel adds the bias while it
    writes its output instead of another pass over the tensor. Returns the number of biases moved."""
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    drop: set[int] = set()
    for n in model.graph.node:
        if n.op_type != "MatMulIntegerToFloat" or len(n.input) > 6 or len(users.get(n.output[0], [])) != 1:
            continue
        add = users[n.output[0]][0]
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        bias = add.input[1] if add.input[0] == n.output[0] else add.input[0]
        weight = inits.get(n.input[1])
        if bias not in inits or weight is None or list(inits[bias].dims) != [weight.dims[-1]]:
            continue
        while len(n.input) < 6:
            n.input.append("")
        n.input.append(bias)
        n.output[0] = add.output[0]
        drop.add(id(add))
    nodes = [n for n in model.graph.node if id(n) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(drop)


def _embed(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(None, f)[0] for f in feeds])
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def quantize_int8(
    fp32_path: Path, dst: Path, feeds: list[dict[str, np.ndarray]], options: Int8Options = Int8Options()
) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns about pre-processing on the root logger
    cal = calibrate(fp32_path, feeds)
    model = onnx.load(str(fp32_path))
    scales = smoothing_scales(model, cal, options.alpha) if options.alpha > 0 else {}
    errors = sensitivity(model, cal, scales, options.reduce_range)
    apply_smoothing(model, scales)
    ranges = activation_ranges(model, cal, scales)
    smoothed = dst.with_name(dst.name + ".smoothed.onnx")
    onnx.save_model(model, str(smoothed))
    reference = cal.reference
    del model, cal
    ranked = sorted(errors, key=errors.get, reverse=True)
    limit = int(len(ranked) * options.max_float_fraction)
    keep_float: list[str] = []
    history: list[dict[str, Any]] = []
    try:
        # Greedy: quantise everything, then hand back to float32 the product with the largest simulated
        # error, one at a time, until the calibration texts agree with FP32 (or the cap is reached).
        while True:
            quantize_dynamic(
                smoothed,
                dst,
                op_types_to_quantize=list(QUANT_OPS + EMBEDDING_OPS),
                per_channel=True,
                reduce_range=options.reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=keep_float,
                extra_options={
                    # shape inference cannot see through the fused contrib ops; the documented way past it
                    "DefaultTensorType": onnx.TensorProto.FLOAT,
                    "MatMulConstBOnly": True,
                },
            )
            static = make_activations_static(dst, ranges) if options.static_activations else 0
            cal_min = float((_embed(dst, feeds) * reference).sum(axis=1).min())
            history.append({"float32_nodes": len(keep_float), "calibration_min_cosine": round(cal_min, 6)})
            if cal_min >= options.target_min_cosine or len(keep_float) >= limit:
                break
            keep_float.append(ranked[len(keep_float)])
    finally:
        smoothed.unlink(missing_ok=True)
    median = float(np.median(list(errors.values())))
    return {
        "method": "smoothquant + int8 (onnxruntime quantize_dynamic, activations made static), sensitivity-selected float32 nodes",
        "op_types": list(QUANT_OPS + EMBEDDING_OPS),
        "per_channel": True,
        "reduce_range": options.reduce_range,
        "weight_type": "int8",
        "activation_type": "uint8, static per tensor (calibrated)" if options.static_activations else "uint8, dynamic per tensor",
        "static_quantize_nodes": static,
        "smoothquant_alpha": options.alpha,
        "calibration_texts": options.calibration_texts,
        "calibration_source": "export/calibration.txt (STS-B en/zh even rows)",
        "float32_nodes": keep_float,
        "handback_history": history,
        "calibration_min_cosine_vs_fp32": round(cal_min, 6),
        "target_min_cosine": options.target_min_cosine,
        "quantized_nodes": len(errors) - len(keep_float),
        "sensitivity_median_rel_error": round(median, 5),
        "sensitivity_rel_error": {k: round(v, 5) for k, v in sorted(errors.items(), key=lambda kv: -kv[1])},
    }
