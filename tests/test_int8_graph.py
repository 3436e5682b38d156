"""The INT8 graph's shape after export: fused integer products and scalar weight zero points, the two
rewrites that onnxruntime cannot do itself once activation scales are constants (see export/quantize.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from export.int8_graph import fuse_integer_matmuls, make_activations_static, scalar_weight_zero_points
from export.quantize import Int8Options


def test_int8_graph_has_fused_products_and_scalar_zero_points(tiny_artifact):
    model = onnx.load(str(tiny_artifact / "model_int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    build = json.loads((tiny_artifact / "manifest.json").read_text())["variants"]["int8"]["build"]
    layers = ops.count("QAttention") + sum(1 for n in build["float32_nodes"] if n.startswith("Attention"))
    # every quantised MatMul (3 per layer: attention output, FFN up, FFN down) is one fused node
    float_matmuls = sum(1 for n in build["float32_nodes"] if not n.startswith("Attention"))
    assert ops.count("MatMulIntegerToFloat") == 3 * layers - float_matmuls
    assert "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        pos = {"MatMulIntegerToFloat": 5, "QAttention": 7}.get(n.op_type)
        if pos is not None:
            assert numpy_helper.to_array(inits[n.input[pos]]).ndim == 0, n.name
    assert build["handback_history"][0]["float32_nodes"] == 0


def _integer_product(zero_point: np.ndarray) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(np.ones((4, 3), np.int8), "w"),
        numpy_helper.from_array(np.array(0.1, np.float32), "a_scale"),
        numpy_helper.from_array(np.full(3, 0.2, np.float32), "b_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "a_zp"),
        numpy_helper.from_array(zero_point, "b_zp"),
    ]
    nodes = [
        helper.make_node("MatMulInteger", ["x", "w", "a_zp", "b_zp"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["acc_f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["a_scale", "b_scale"], ["scale"]),
        helper.make_node("Mul", ["acc_f", "scale"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [2, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_rewrites_keep_the_arithmetic():
    import onnxruntime as ort

    x = np.arange(8, dtype=np.uint8).reshape(2, 4) * 30
    for zp in (np.zeros(3, np.int8), np.array([0, 1, -2], np.int8)):
        plain = _integer_product(zp)
        rewritten = _integer_product(zp)
        assert fuse_integer_matmuls(rewritten) == 1
        changed = scalar_weight_zero_points(rewritten)
        assert changed == (0 if zp.any() else 1)  # a real per-channel zero point is left alone
        assert [n.op_type for n in rewritten.graph.node] == ["MatMulIntegerToFloat"]
        run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
        np.testing.assert_allclose(run(rewritten), run(plain), rtol=1e-6)


def test_seven_bit_activations_never_code_past_127(tmp_path):
    """With 8-bit weights the activations get codes 0..127 (onnxruntime's AVX2 u8s8 kernel sums code pairs in
    int16): an input far past the calibrated range must still code at most 127, not QuantizeLinear's 255."""
    import onnxruntime as ort

    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "q_scale", "q_zp"], name="dq")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [6])],
        [helper.make_tensor_value_info("q", onnx.TensorProto.UINT8, [6])])
    path = tmp_path / "q.onnx"
    x = np.array([-50.0, -1.0, 0.0, 0.5, 2.0, 80.0], np.float32)
    for levels in (255, 127):
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        assert make_activations_static(path, {"x": (-1.0, 2.0)}, levels) == 1
        q = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert q.max() == levels and q.min() == 0  # clamped at the calibrated range's ends
        assert q[2] == round(levels / 3)  # zero point: 0.0 sits a third of the way up [-1, 2]


def test_eight_bit_weights_need_seven_bit_activations():
    with pytest.raises(ValueError, match="AVX2"):
        Int8Options(reduce_range=False)
    with pytest.raises(ValueError, match="static"):
        Int8Options(reduce_range=False, activation_levels=127, static_activations=False)
    assert Int8Options(reduce_range=False, activation_levels=127).activation_levels == 127


def test_float_plan_is_exact_before_quantisation(tiny_artifact, tmp_path):
    """Smoothing (Mul, or folded into V), the FFN permutation and the outlier side products change no
    vector in float: all the INT8 error comes from rounding, none from the rewrite."""
    import onnxruntime as ort

    from export import int8_plan as ip
    from export.pipeline import calibration_feeds

    fp32 = tiny_artifact / "model.onnx"
    feeds = calibration_feeds(tiny_artifact / "tokenizer.json", 64, 0, 16)
    cal = ip.calibrate(fp32, feeds)
    model = onnx.load(str(fp32))
    roles = ip.product_roles(model)
    assert set(roles.values()) == {ip.QKV, ip.ATTENTION_OUTPUT, ip.FFN_UP, ip.FFN_DOWN}
    plan = ip.Plan(roles=roles)
    plan.scales = ip.smoothing_scales(model, cal, 0.7, {n for n, r in roles.items() if r != ip.FFN_DOWN})
    inputs = {n.name: n.input[0] for n in ip.targets(model)}
    for name, role in roles.items():
        if role in (ip.FFN_DOWN, ip.FFN_UP):
            plan.outliers[name] = ip.top_channels(cal.amax(inputs[name]), 3)
    built, ranges, side = ip.build(fp32, cal, plan)
    ops = [n.op_type for n in built.graph.node]
    downs = sum(1 for r in roles.values() if r == ip.FFN_DOWN)
    ups = sum(1 for r in roles.values() if r == ip.FFN_UP)
    assert ops.count("Slice") >= downs and ops.count("Gather") >= ups  # downs permuted, ups gathered
    assert len(side) == downs + ups and len(ranges) == len(roles)
    path = tmp_path / "built.onnx"
    onnx.save_model(built, str(path))
    run = lambda p: np.concatenate([ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, f)[0] for f in feeds])  # noqa: E731
    np.testing.assert_allclose(run(path), run(fp32), atol=2e-5)


def test_manifest_records_the_plan(tiny_artifact):
    build = json.loads((tiny_artifact / "manifest.json").read_text())["variants"]["int8"]["build"]
    model = onnx.load(str(tiny_artifact / "model_int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    # every FFN down-projection computes its outlier channels in float32 through a Slice (permuted FFN)
    assert len(build["outlier_channels"]) >= ops.count("Slice") - 1 > 0
    assert all(len(ch) > 0 for ch in build["outlier_channels"].values())
    assert build["handback_history"][-1]["calibration_min_cosine"] == build["calibration_min_cosine_vs_fp32"]
    # biases live inside the fused products: no Add reads a product's output and a 1-D constant
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    fused_out = {n.output[0] for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"}
    for n in model.graph.node:
        if n.op_type == "Add" and fused_out & set(n.input):
            assert not any(i in inits and inits[i].ndim == 1 for i in n.input), n.name


def test_ffn_permutation_changes_nothing_when_it_cannot_apply():
    """A GELU whose bias is not a constant cannot be permuted: the up-projection must be left as it was
    too, never half-permuted."""
    from export.int8_plan import _move_outliers_last

    rng = np.random.default_rng(0)
    w_up, w_down = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w_up"], ["h"], name="up"),
        helper.make_node("FastGelu", ["h", "b"], ["g"], name="gelu", domain="com.microsoft"),
        helper.make_node("MatMul", ["g", "w_down"], ["y"], name="down"),
    ]
    graph = helper.make_graph(nodes, "ffn", [], [], [numpy_helper.from_array(w_up, "w_up"), numpy_helper.from_array(w_down, "w_down")])
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    assert not _move_outliers_last(producer, inits, graph.node[2], np.array([1, 3]))
    np.testing.assert_array_equal(numpy_helper.to_array(inits["w_up"]), w_up)
    np.testing.assert_array_equal(numpy_helper.to_array(inits["w_down"]), w_down)
