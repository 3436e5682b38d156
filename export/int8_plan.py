"""What the INT8 pass does to each matrix product, measured on calibration text, and the float graph that
carries it out before onnxruntime's quantiser runs.

BERT activations carry a few outlier channels, and activations are quantised with one uint8 scale per
tensor, so those channels crush the resolution of all others. Two remedies, each where it is cheap:

- **SmoothQuant** (alpha 0.7): divide input channel j by s_j = amax_j^a / wmax_j^(1-a) and multiply weight
  row j by s_j, exact in float. Attention's QKV and FFN up-projections read a layer norm's output that also
  feeds the residual, so they pay an explicit ``Mul``; the attention-output product reads the attention's
  context, which is linear in V, so its scale is folded into V's weight columns and bias for free.
- **Outlier split** (LLM.int8-style, static): the k input channels with the largest calibrated magnitude
  are taken out of the int8 product (its weight rows are zero and the static range ignores them, so
  QuantizeLinear's saturation of those channels is harmless) and computed in float32 by a thin side product
  added to the output. FFN down-projections, fed by GELU's long tail, always get it and no smoothing; their
  outlier channels are first permuted to the end of the FFN (FFN-up columns, its bias, FFN-down rows: exact)
  so the side product reads a ``Slice``. FFN up-projections get it (with a ``Gather``) when the greedy pass
  in quantize.py asks for it.

Measured on all-MiniLM-L6-v2 (held-out STS-B en, min cosine to FP32): smoothing everywhere and 4 FFN
down-projections in float32, 0.9852; this plan with no float32 product, 0.989-0.992 and faster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import onnx_io
from .int8_graph import activation_qparams

QUANT_OPS = ("MatMul", "Attention")
QKV, ATTENTION_OUTPUT, FFN_UP, FFN_DOWN = "qkv", "attention_output", "ffn_up", "ffn_down"
_GELU_OPS = ("BiasGelu", "Gelu", "FastGelu")


def head_products(model: onnx.ModelProto) -> list[str]:
    """The products after the encoder's last layer norm (a cross-encoder's classification head): they stay
    float32. A handful of FLOPs per text, and the last layer's error should not be compounded by theirs."""
    from .precision import head_nodes

    head = set(head_nodes(model))
    names = [n.name for n in model.graph.node if n.name in head and n.op_type in QUANT_OPS]
    # onnxruntime's quantiser rewrites a Gemm as MatMul + Add (named "<gemm>_MatMul") before it quantises
    names += [f"{n.name}_MatMul" for n in model.graph.node if n.name in head and n.op_type == "Gemm"]
    return names


def targets(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The weight matrix products of the encoder the quantiser may quantise (constant weight as second input)."""
    inits = {i.name for i in model.graph.initializer}
    head = set(head_products(model))
    return [n for n in model.graph.node if n.op_type in QUANT_OPS and len(n.input) > 1 and n.input[1] in inits
            and n.name not in head]


def product_roles(model: onnx.ModelProto) -> dict[str, str]:
    """Each product's place in the encoder, from what produces its input."""
    producer = {o: n for n in model.graph.node for o in n.output}
    roles = {}
    for n in targets(model):
        src = producer.get(n.input[0])
        kind = src.op_type if src is not None else ""
        if n.op_type == "Attention":
            roles[n.name] = QKV
        elif kind == "Attention":
            roles[n.name] = ATTENTION_OUTPUT
        elif kind in _GELU_OPS:
            roles[n.name] = FFN_DOWN
        else:
            roles[n.name] = FFN_UP  # a layer norm's output (and anything else): smoothed with a Mul
    return roles


@dataclass
class Calibration:
    ch_min: dict[str, np.ndarray]  # per-channel min over real tokens, by tensor name
    ch_max: dict[str, np.ndarray]  # per-channel max over real tokens
    samples: dict[str, np.ndarray]  # a few thousand real-token rows per tensor, for the error simulation
    reference: np.ndarray  # the FP32 graph's outputs on the calibration inputs, one row per input

    def amax(self, name: str) -> np.ndarray:
        return np.maximum(np.abs(self.ch_min[name]), np.abs(self.ch_max[name]))


def calibrate(model_path: Path, feeds: list[dict[str, np.ndarray]], keep_batches: int = 4, keep_rows: int = 2048) -> Calibration:
    """Run the FP32 graph with the input of every target product exposed as an extra output; keep the
    per-channel range over real tokens (padding excluded) and a subsample of real-token rows."""
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    output = model.graph.output[0].name
    names = sorted({n.input[0] for n in targets(model)})
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe_path = model_path.with_name(model_path.name + ".calibration.onnx")
    probe_files = onnx_io.save(model, probe_path, keep=False)  # past 2 GiB (bge-m3 FP32): with external data
    del model
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(probe_path), opts, providers=["CPUExecutionProvider"])
    finally:
        for f in probe_files:
            f.unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    ch_min: dict[str, np.ndarray] = {}
    ch_max: dict[str, np.ndarray] = {}
    samples: dict[str, list[np.ndarray]] = {n: [] for n in names}
    embeddings = []
    per_batch = max(1, keep_rows // keep_batches)
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
                pick = rng.choice(len(rows), size=min(per_batch, len(rows)), replace=False)
                samples[name].append(rows[pick].copy())
    outputs = np.concatenate([e.reshape(len(e), -1) for e in embeddings])
    return Calibration(ch_min=ch_min, ch_max=ch_max, samples={k: np.concatenate(v) for k, v in samples.items()},
                       reference=outputs)


@dataclass
class Plan:
    """Per product (by node name): its SmoothQuant scale, the input channels computed in float32, and
    whether the whole product stays float32."""

    roles: dict[str, str]
    scales: dict[str, np.ndarray] = field(default_factory=dict)
    outliers: dict[str, np.ndarray] = field(default_factory=dict)
    float32: list[str] = field(default_factory=list)


def smoothing_scales(model: onnx.ModelProto, cal: Calibration, alpha: float, names: set[str]) -> dict[str, np.ndarray]:
    """SmoothQuant scales s_j = amax_j^a / wmax_j^(1-a) for the products in ``names`` whose weight is theirs alone."""
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    scales = {}
    for n in targets(model):
        if n.name not in names or uses[n.input[1]] != 1:
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        a = cal.amax(n.input[0]).astype(np.float64)
        s = np.maximum(a, 1e-5) ** alpha / np.maximum(np.abs(w).max(axis=1), 1e-5) ** (1 - alpha)
        scales[n.name] = np.clip(s, 1e-2, 1e2)
    return scales


def top_channels(amax: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` channels of largest calibrated magnitude, in ascending order."""
    return np.sort(np.argsort(-amax, kind="stable")[: min(k, len(amax) - 1)])


def simulated_error(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, w: np.ndarray, reduce_range: bool,
                    outliers: np.ndarray | None = None, activation_levels: int = 255) -> float:
    """Relative error of x @ w with static per-tensor uint8 activations over [lo, hi] (per channel, the
    calibrated range) and per-column symmetric int8 weights; ``outliers`` rows are computed in float."""
    keep = np.ones(len(lo), bool)
    if outliers is not None and len(outliers):
        keep[outliers] = False
    qmax = 63.0 if reduce_range else 127.0
    wk = w[keep]
    w_scale = np.maximum(np.abs(wk).max(axis=0), 1e-12) / qmax
    wq = np.round(wk / w_scale) * w_scale
    scale, zp = activation_qparams(float(lo[keep].min()), float(hi[keep].max()), activation_levels)
    xq = (np.clip(np.round(x[:, keep] / scale) + zp, 0, activation_levels) - zp) * scale
    y = x @ w
    approx = xq @ wq + x[:, ~keep] @ w[~keep]
    return float(np.sqrt(np.square(approx - y).sum() / max(float(np.square(y).sum()), 1e-30)))


def simulate(model: onnx.ModelProto, cal: Calibration, plan: Plan, name: str, reduce_range: bool,
             outliers: np.ndarray | None = None, activation_levels: int = 255) -> float:
    """``simulated_error`` of product ``name`` under its smoothing in ``plan`` and the given outliers."""
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == name)
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    x = cal.samples[node.input[0]].astype(np.float32)
    lo, hi = cal.ch_min[node.input[0]].astype(np.float32), cal.ch_max[node.input[0]].astype(np.float32)
    s = plan.scales.get(name)
    if s is not None:
        s = s.astype(np.float32)
        x, lo, hi, w = x / s, lo / s, hi / s, w * s[:, None]
    return simulated_error(x, lo, hi, w, reduce_range, outliers, activation_levels)


def smoothed_amax(cal: Calibration, plan: Plan, name: str, tensor: str) -> np.ndarray:
    s = plan.scales.get(name)
    return cal.amax(tensor) / s if s is not None else cal.amax(tensor)


# ---- carrying out the plan on the float graph ------------------------------------------------------------


def _set(inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> None:
    inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _get(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray:
    return numpy_helper.to_array(inits[name]).astype(np.float64)


def _move_outliers_last(producer: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto],
                        node: onnx.NodeProto, channels: np.ndarray) -> bool:
    """Permute the FFN's inner dimension so ``channels`` of the down-projection's input come last: the
    up-projection's weight columns, the GELU bias and the down-projection's weight rows, all exact. False
    (and nothing changed) when the FFN is not MatMul -> Gelu/BiasGelu -> MatMul with constant weights."""
    gelu = producer.get(node.input[0])
    up = producer.get(gelu.input[0]) if gelu is not None else None
    if gelu is None or up is None or up.op_type != "MatMul" or up.input[1] not in inits:
        return False
    bias = gelu.input[1] if len(gelu.input) > 1 and gelu.input[1] else None
    if bias is not None and (gelu.op_type != "BiasGelu" or bias not in inits):
        return False  # a bias we cannot permute: leave the order alone (checked before anything changes)
    inner = _get(inits, node.input[1]).shape[0]
    perm = np.concatenate([np.setdiff1d(np.arange(inner), channels), channels])
    _set(inits, up.input[1], _get(inits, up.input[1])[:, perm])
    if bias is not None:
        _set(inits, bias, _get(inits, bias)[perm])
    _set(inits, node.input[1], _get(inits, node.input[1])[perm])
    return True


def _fold_into_v(producer: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto],
                 node: onnx.NodeProto, s: np.ndarray) -> None:
    """Divide V's output columns (weight and bias) of the attention feeding ``node`` by ``s``: the context
    is a weighted sum of V rows, so its channel j is divided by s_j exactly."""
    att = producer[node.input[0]]
    w, b = _get(inits, att.input[1]), _get(inits, att.input[2])
    sizes = next((list(a.ints) for a in att.attribute if a.name == "qkv_hidden_sizes"), None)
    v0 = (sizes[0] + sizes[1]) if sizes else w.shape[1] * 2 // 3
    w[:, v0:] /= s
    b[v0:] /= s
    _set(inits, att.input[1], w)
    _set(inits, att.input[2], b)


def build(fp32_path: Path, cal: Calibration, plan: Plan) -> tuple[onnx.ModelProto, dict[str, tuple[float, float]], list[str]]:
    """The float graph with the plan carried out (exact in float), the calibrated range of every tensor a
    quantised product will read, and the names of the float side products (never to be quantised)."""
    model = onnx.load(str(fp32_path))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    trailing = {name for name, ch in plan.outliers.items()
                if plan.roles[name] == FFN_DOWN and name not in plan.scales
                and _move_outliers_last(producer, inits, by_name[name], ch)}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    ranges: dict[str, tuple[float, float]] = {}
    side: list[str] = []
    before: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to insert before it
    after: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to insert after it
    for n in targets(model):
        if n.name not in plan.roles:
            continue
        x = n.input[0]
        lo, hi = cal.ch_min[x].astype(np.float64), cal.ch_max[x].astype(np.float64)
        w = _get(inits, n.input[1])
        raw = w.copy()
        s = plan.scales.get(n.name)
        quantised_input = x
        if s is not None:
            w, lo, hi = w * s[:, None], lo / s, hi / s
            if plan.roles[n.name] == ATTENTION_OUTPUT:
                _fold_into_v(producer, inits, n, s)
            else:
                scale_name, quantised_input = f"{n.name}/smooth_inv_scale", f"{n.name}/smoothed_input"
                model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), scale_name))
                before.setdefault(n.name, []).append(
                    helper.make_node("Mul", [x, scale_name], [quantised_input], name=f"{n.name}/smooth"))
        channels = plan.outliers.get(n.name)
        keep = np.ones(len(lo), bool)
        if channels is not None and len(channels) and n.op_type == "MatMul":
            keep[channels] = False
            k = len(channels)
            rows = np.arange(len(lo) - k, len(lo)) if n.name in trailing else channels
            side_w = raw[rows]
            w[rows] = 0.0
            if n.name in trailing:
                consts = {"starts": [len(lo) - k], "ends": [len(lo)], "axes": [-1]}
                for key, v in consts.items():
                    model.graph.initializer.append(numpy_helper.from_array(np.array(v, np.int64), f"{n.name}/outlier_{key}"))
                pick = helper.make_node("Slice", [x] + [f"{n.name}/outlier_{key}" for key in consts],
                                        [f"{n.name}/outliers"], name=f"{n.name}/outlier_slice")
            else:
                model.graph.initializer.append(numpy_helper.from_array(channels.astype(np.int64), f"{n.name}/outlier_index"))
                pick = helper.make_node("Gather", [x, f"{n.name}/outlier_index"], [f"{n.name}/outliers"],
                                        name=f"{n.name}/outlier_gather", axis=-1)
            model.graph.initializer.append(numpy_helper.from_array(side_w.astype(np.float32), f"{n.name}/outlier_weight"))
            product = helper.make_node("MatMul", [f"{n.name}/outliers", f"{n.name}/outlier_weight"],
                                       [f"{n.name}/outlier_product"], name=f"{n.name}/outlier_matmul")
            before.setdefault(n.name, []).extend([pick, product])
            side.append(product.name)
            # add the side product after the product's bias Add, if any, so the bias can move into the
            # fused integer product later (int8_graph.fold_bias_into_products)
            anchor = n
            nxt = users.get(n.output[0], [])
            if len(nxt) == 1 and nxt[0].op_type == "Add" and any(
                i in inits and len(inits[i].dims) == 1 for i in nxt[0].input
            ):
                anchor = nxt[0]
            total = anchor.output[0]
            anchor.output[0] = f"{n.name}/without_outliers"
            after.setdefault(anchor.name, []).append(helper.make_node(
                "Add", [anchor.output[0], f"{n.name}/outlier_product"], [total], name=f"{n.name}/outlier_add"))
        _set(inits, n.input[1], w)
        n.input[0] = quantised_input
        ranges[quantised_input] = (float(lo[keep].min()), float(hi[keep].max()))
    nodes = []
    for n in model.graph.node:
        nodes.extend(before.get(n.name, []))
        nodes.append(n)
        nodes.extend(after.get(n.name, []))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model, ranges, side
