"""Bounded activations for long inputs: everything of a layer after its attention (output projection, residual,
layer norm, FFN up, GELU, FFN down, residual, layer norm) works on each token's row alone, so it can run over
windows of ``ROWS`` rows of the flattened batch in a ``Loop`` and give the same numbers. Without it, an
8,192-token text holds its ``8,192 x 4,096`` FFN intermediates (128 MiB in FP32, several at once); with it, one
window's (8 MiB). Applied, like flash attention, only to long-context models (``long_attention.APPLIES_PAST``).

Each layer's tail is found in the graph, not assumed: the nodes after the layer's attention up to its second
layer norm, which may read only the attention's output, one residual input, and constants. Every op in it must
be row-wise (``ROW_WISE``); an INT8 tail's activations are quantised with calibrated static scales, so a window
is quantised exactly as the whole tensor is. A dynamically quantised node (per-tensor scale from the data)
would make a row's numbers depend on its window: such a tail is left as it was, and the count returned says so.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROWS = 512  # rows per window: 512 x 4096 FFN intermediates are 8 MiB in FP32
# Ops whose output row r depends only on input row r (for the shapes a layer tail gives them); a Slice only when
# it cuts the last axis (the INT8 graph's outlier channels), checked in ``_row_wise``.
ROW_WISE = {"MatMul", "Add", "Mul", "Sub", "Div", "LayerNormalization", "SkipLayerNormalization", "BiasGelu",
            "FastGelu", "Gelu", "Erf", "Relu", "Cast", "QuantizeLinear", "DequantizeLinear", "MatMulIntegerToFloat",
            "MatMulInteger", "Slice", "Identity", "Clip"}


def _row_wise(n: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    if n.op_type not in ROW_WISE:
        return False
    if n.op_type != "Slice":
        return True
    axes = initializers.get(n.input[3]) if len(n.input) > 3 and n.input[3] else None
    return axes is not None and set(numpy_helper.to_array(axes).tolist()) <= {-1, 2}


def _tail(model: onnx.ModelProto, start: int, constants: set[str],
          initializers: dict[str, onnx.TensorProto]) -> tuple[list[int], str, str, str] | None:
    """Indices of the tail after the attention node at ``start``, its attention input, residual input and
    output; None when the span is not a row-wise tail with exactly those inputs."""
    nodes = model.graph.node
    attention_out = nodes[start].output[0]
    span, norms = [], 0
    for i in range(start + 1, len(nodes)):
        n = nodes[i]
        if n.op_type in ("If", "Attention", "QAttention"):
            return None
        span.append(i)
        if n.op_type == "LayerNormalization":
            norms += 1
            if norms == 2:
                break
    else:
        return None
    produced = {o for i in span for o in nodes[i].output}
    outside = {x for i in span for x in nodes[i].input if x and x not in produced and x not in constants}
    if attention_out not in outside or len(outside) != 2:
        return None
    residual = (outside - {attention_out}).pop()
    if not all(_row_wise(nodes[i], initializers) for i in span):
        return None
    end = nodes[span[-1]].output[0]
    used_after = {x for n in list(nodes)[span[-1] + 1:] for x in _inputs(n)} | {o.name for o in model.graph.output}
    if (produced - {end}) & used_after:
        return None
    return span, attention_out, residual, end


def _inputs(n: onnx.NodeProto) -> set[str]:
    """What a node reads, its subgraphs' references to outer values included (an If branch reads the hidden
    state of the layer it belongs to)."""
    out = set(n.input)
    for a in n.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for m in g.node:
                out |= _inputs(m)
    return out


def windowed_tails(model: onnx.ModelProto, rows: int | None = None) -> tuple[int, int]:
    """Rewrite ``model`` in place; returns (tails windowed, layers whose tail could not be)."""
    rows = ROWS if rows is None else rows
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    nodes = list(model.graph.node)
    initializers = {t.name: t for t in model.graph.initializer}
    constants = set(initializers) | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    attention = [i for i, n in enumerate(nodes) if n.op_type in ("If", "Attention", "QAttention")]
    tails = {}
    for a in attention:
        found = _tail(model, a, constants, initializers)
        if found is not None:
            tails[found[0][0]] = found
    if not tails:
        return 0, len(attention)
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array(rows, np.int64), "row_windows/rows"),
        numpy_helper.from_array(np.array(rows - 1, np.int64), "row_windows/rows_minus_one"),
        numpy_helper.from_array(np.array([1], np.int64), "row_windows/axis"),
        numpy_helper.from_array(np.array([0], np.int64), "row_windows/zero"),
        numpy_helper.from_array(np.array([1, -1, 0], np.int64), "row_windows/flat"),
        numpy_helper.from_array(np.array(True), "row_windows/true"),
    ])
    skip = {j for span, *_ in tails.values() for j in span}
    out: list[onnx.NodeProto] = []
    done = 0
    for i, n in enumerate(nodes):
        if i in tails:
            span, att, res, end = tails[i]
            out += _loop(f"row_windows/layer_{done}", [nodes[j] for j in span], att, res, end)
            done += 1
        if i not in skip:
            out.append(n)
    del model.graph.node[:]
    model.graph.node.extend(out)
    return done, len(attention) - done


def _loop(p: str, span: list[onnx.NodeProto], att: str, res: str, end: str) -> list[onnx.NodeProto]:
    """The nodes that replace ``span``: flatten to [1, rows, hidden], Loop over windows, concatenate, reshape."""
    att3, res3 = f"{p}/attention_rows", f"{p}/residual_rows"
    outer = [
        helper.make_node("Reshape", [att, "row_windows/flat"], [att3], name=f"{p}/flat_attention"),
        helper.make_node("Reshape", [res, "row_windows/flat"], [res3], name=f"{p}/flat_residual"),
        helper.make_node("Shape", [att3], [f"{p}/shape"], start=1, end=2, name=f"{p}/shape"),
        helper.make_node("Squeeze", [f"{p}/shape", "row_windows/zero"], [f"{p}/n"], name=f"{p}/n"),
        helper.make_node("Add", [f"{p}/n", "row_windows/rows_minus_one"], [f"{p}/n_up"], name=f"{p}/n_up"),
        helper.make_node("Div", [f"{p}/n_up", "row_windows/rows"], [f"{p}/trips"], name=f"{p}/trips"),
        helper.make_node("SequenceEmpty", [], [f"{p}/empty"], dtype=TensorProto.FLOAT, name=f"{p}/empty"),
    ]
    # body(i, cond, windows) -> (cond, windows + [this window's output])
    rename = {att: f"{p}/attention_window", res: f"{p}/residual_window"}
    body = [
        helper.make_node("Mul", [f"{p}/i", "row_windows/rows"], [f"{p}/start0"], name=f"{p}/start0"),
        helper.make_node("Unsqueeze", [f"{p}/start0", "row_windows/zero"], [f"{p}/start"], name=f"{p}/start"),
        helper.make_node("Add", [f"{p}/start", "row_windows/rows"], [f"{p}/stop"], name=f"{p}/stop"),
        helper.make_node("Slice", [att3, f"{p}/start", f"{p}/stop", "row_windows/axis"], [rename[att]],
                         name=f"{p}/slice_attention"),
        helper.make_node("Slice", [res3, f"{p}/start", f"{p}/stop", "row_windows/axis"], [rename[res]],
                         name=f"{p}/slice_residual"),
    ]
    for n in span:
        for o in n.output:
            rename.setdefault(o, f"{o}/window")
    for k, n in enumerate(span):
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = f"{n.name or f'{p}/{n.op_type}_{k}'}/window"
        for j, x in enumerate(c.input):
            c.input[j] = rename.get(x, x)
        for j, x in enumerate(c.output):
            c.output[j] = rename[x]
        body.append(c)
    body += [
        helper.make_node("SequenceInsert", [f"{p}/windows_in", rename[end]], [f"{p}/windows_out"], name=f"{p}/insert"),
        helper.make_node("Identity", [f"{p}/cond_in"], [f"{p}/cond_out"], name=f"{p}/cond"),
    ]
    graph = helper.make_graph(
        body, f"{p}_body",
        [helper.make_tensor_value_info(f"{p}/i", TensorProto.INT64, []),
         helper.make_tensor_value_info(f"{p}/cond_in", TensorProto.BOOL, []),
         helper.make_tensor_sequence_value_info(f"{p}/windows_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(f"{p}/cond_out", TensorProto.BOOL, []),
         helper.make_tensor_sequence_value_info(f"{p}/windows_out", TensorProto.FLOAT, None)],
    )
    outer += [
        helper.make_node("Loop", [f"{p}/trips", "row_windows/true", f"{p}/empty"], [f"{p}/windows"], body=graph,
                         name=f"{p}/loop"),
        helper.make_node("ConcatFromSequence", [f"{p}/windows"], [f"{p}/rows_out"], axis=1, name=f"{p}/concat"),
        helper.make_node("Shape", [res], [f"{p}/res_shape"], name=f"{p}/res_shape"),
        helper.make_node("Reshape", [f"{p}/rows_out", f"{p}/res_shape"], [end], name=f"{p}/unflat"),
    ]
    return outer
