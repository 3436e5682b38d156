"""The CPU form of the layer norms: the exported graph carries Add + LayerNormalization (onnxruntime's CPU
SkipLayerNormalization kernel is 2-4x slower, export/optimize.py), and the runtime's CPU sessions keep it
that way while CUDA sessions let onnxruntime fuse it back."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.optimize import split_skip_layer_norms


def _skip_layer_norm(with_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    h = 8
    inits = [numpy_helper.from_array(rng.standard_normal(h).astype(np.float32), n) for n in ("gamma", "beta", "bias")]
    inputs = ["x", "skip", "gamma", "beta"] + (["bias"] if with_bias else [])
    node = helper.make_node("SkipLayerNormalization", inputs, ["y"], domain="com.microsoft", epsilon=1e-12)
    vi = lambda n: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2, 3, h])  # noqa: E731
    graph = helper.make_graph([node], "g", [vi("x"), vi("skip")], [vi("y")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_split_keeps_the_arithmetic():
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32) * 3, "skip": rng.standard_normal((2, 3, 8)).astype(np.float32)}
    for with_bias in (True, False):
        fused = _skip_layer_norm(with_bias)
        split = _skip_layer_norm(with_bias)
        assert split_skip_layer_norms(split) == 1
        ops = [n.op_type for n in split.graph.node]
        assert ops == (["Add"] if with_bias else []) + ["Add", "LayerNormalization"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        run = lambda m: ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
        np.testing.assert_allclose(run(split), run(fused), atol=1e-5)


def _optimized_ops(model_path, tmp_path, disabled: list[str]) -> Counter:
    import onnxruntime as ort

    from runtime.providers import session_options

    opts = session_options(1)
    out = tmp_path / f"optimized-{len(disabled)}.onnx"
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    return Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def test_cpu_sessions_keep_the_layer_norms_unfused(tiny_artifact, tmp_path):
    from runtime.providers import CPU, CUDA, disabled_optimizers

    norms = 2 * Counter(n.op_type for n in onnx.load(str(tiny_artifact / "model.onnx")).graph.node)["Attention"]
    assert disabled_optimizers([CPU]) == ["SkipLayerNormFusion"]
    assert disabled_optimizers([(CUDA, {}), CPU]) == []
    as_runtime = _optimized_ops(tiny_artifact / "model.onnx", tmp_path, disabled_optimizers([CPU]))
    assert as_runtime["SkipLayerNormalization"] == 0 and as_runtime["LayerNormalization"] == norms
    # what the switch prevents: onnxruntime's own fusion at load, back to the slow CPU kernel
    defaults = _optimized_ops(tiny_artifact / "model.onnx", tmp_path, [])
    assert defaults["SkipLayerNormalization"] == norms
