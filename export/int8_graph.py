"""Rewrites of the quantised graph that onnxruntime cannot do itself once activation scales are constants:
static QuantizeLinear nodes, fused integer products with their bias, scalar weight zero points."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import onnx_io


def activation_qparams(lo: float, hi: float, levels: int = 255) -> tuple[float, int]:
    """uint8 asymmetric scale and zero point covering [lo, hi] (and 0, as onnxruntime requires) in codes
    0..``levels`` (127: 7-bit activations, see ``make_activations_static``)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / levels
    return scale, int(np.clip(np.round(-lo / scale), 0, levels))


def make_activations_static(path: Path, ranges: dict[str, tuple[float, float]], levels: int = 255) -> int:
    """Replace each DynamicQuantizeLinear by a QuantizeLinear with the calibrated scale and zero point.

    Dynamic quantisation takes one scale per tensor, i.e. per batch, so a text's INT8 vector moved with
    its batch neighbours (cosine 0.9977 alone vs batched on STS-B with all-MiniLM-L6-v2). Fixed scales make
    every text's vector independent of the batch, and skip a min/max pass per product.

    ``levels`` < 255 (7-bit activations, codes 0..127, for full-range 8-bit weights): a Clip to the
    calibrated range goes before each QuantizeLinear, because QuantizeLinear itself saturates only at 255
    and an input past the calibrated range would give codes above 127 (see quantize.Int8Options)."""
    model = onnx.load(str(path))
    nodes, replaced = [], 0
    for n in model.graph.node:
        if n.op_type == "DynamicQuantizeLinear" and n.input[0] in ranges:
            scale, zp = activation_qparams(*ranges[n.input[0]], levels=levels)
            model.graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), n.output[1]))
            model.graph.initializer.append(numpy_helper.from_array(np.array(zp, np.uint8), n.output[2]))
            x = n.input[0]
            if levels < 255:
                bounds = [f"{n.name}/clip_min", f"{n.name}/clip_max"]
                for name, code in zip(bounds, (0, levels)):
                    model.graph.initializer.append(numpy_helper.from_array(np.array((code - zp) * scale, np.float32), name))
                nodes.append(helper.make_node("Clip", [x, *bounds], [f"{n.name}/clipped"], name=f"{n.name}/clip"))
                x = f"{n.name}/clipped"
            nodes.append(helper.make_node("QuantizeLinear", [x, n.output[1], n.output[2]], [n.output[0]], name=f"{n.name}/static"))
            replaced += 1
        else:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    fuse_integer_matmuls(model)
    fold_bias_into_products(model)
    scalar_weight_zero_points(model)
    onnx_io.save(model, path, keep=False)  # past 256 MiB of weights: external data (export/onnx_io.py)
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
