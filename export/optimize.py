"""onnxruntime's transformer fusions, a check that every layer was fused, and the CPU form of the
layer norms."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import onnx
from onnx import helper

from .errors import FusionError


def expected_fusions(layers: int) -> dict[str, int]:
    """What onnxruntime's transformer optimizer must make of a BERT encoder of ``layers`` layers."""
    return {
        "EmbedLayerNormalization": 1,
        "Attention": layers,
        "SkipLayerNormalization": 2 * layers,
        "BiasGelu": layers,
    }


def expected_operators(layers: int) -> dict[str, int]:
    """What the shipped graph contains: the fusions, with each SkipLayerNormalization split back into
    Add + LayerNormalization (see ``split_skip_layer_norms``)."""
    return {
        "EmbedLayerNormalization": 1,
        "Attention": layers,
        "LayerNormalization": 2 * layers,
        "SkipLayerNormalization": 0,
        "BiasGelu": layers,
    }


def operator_counts(model: onnx.ModelProto, ops) -> dict[str, int]:
    found = Counter(n.op_type for n in model.graph.node)
    return {op: found.get(op, 0) for op in ops}


def split_skip_layer_norms(model: onnx.ModelProto) -> int:
    """Rewrite every SkipLayerNormalization(x, skip, gamma, beta, bias) as Add(x, bias) -> Add(., skip)
    -> LayerNormalization(gamma, beta), in place; returns how many were split.

    Same arithmetic (max difference 2e-6), but onnxruntime's CPU kernel for the fused op is the slow one:
    measured with onnxruntime 1.32 on 2 threads, 32 x 128 x 384 floats, SkipLayerNormalization with bias
    4.8 ms against 1.3 ms for the three plain ops (2-4x across shapes up to hidden 1536); in the INT8
    all-MiniLM-L6-v2 graph the 12 fused nodes took 10% of node time. CUDA sessions fuse the plain ops back
    at load (onnxruntime's SkipLayerNormFusion runs for the CPU and CUDA providers alike); the runtime's
    CPU sessions switch that fusion off (``runtime.providers``)."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    nodes, split = [], 0
    for n in model.graph.node:
        extra_outputs = [o for o in n.output[1:] if o and o in used]
        if n.op_type != "SkipLayerNormalization" or extra_outputs:
            nodes.append(n)
            continue
        x, skip, gamma, beta = n.input[:4]
        bias = n.input[4] if len(n.input) > 4 else ""
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-12)
        if bias:
            nodes.append(helper.make_node("Add", [x, bias], [f"{n.name}/biased"], name=f"{n.name}/bias_add"))
            x = f"{n.name}/biased"
        nodes.append(helper.make_node("Add", [x, skip], [f"{n.name}/sum"], name=f"{n.name}/skip_add"))
        nodes.append(helper.make_node(
            "LayerNormalization", [f"{n.name}/sum", gamma, beta], [n.output[0]], name=f"{n.name}/layer_norm",
            axis=-1, epsilon=eps,
        ))
        split += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return split


def _mismatch(counts: dict[str, int], want: dict[str, int]) -> str:
    return ", ".join(f"{k}: {counts.get(k, 0)} (expected {n})" for k, n in want.items() if counts.get(k, 0) != n)


def fuse(path: Path, heads: int, hidden: int, layers: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Fuse the traced graph at ``path`` and split its skip layer norms; raise if any layer is left
    unfused. Returns the model and its operator counts (``expected_operators``)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    options = FusionOptions("bert")
    options.enable_gelu_approximation = False  # keep exact erf GELU: parity before speed
    opt = optimize_model(
        str(path),
        model_type="bert",
        num_heads=heads,
        hidden_size=hidden,
        optimization_options=options,
        opt_level=0,  # graph fusions in Python only; ORT applies its own at session load
    )
    counts = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    missing = _mismatch(counts, expected_fusions(layers))
    if missing:
        raise FusionError(
            f"onnxruntime's transformer optimizer fused the graph only partly ({missing}); the exported "
            "pattern no longer matches its fusions, usually after a torch or onnxruntime upgrade: pin the "
            "versions in pyproject.toml or report it"
        )
    opt.topological_sort()
    model = opt.model
    split_skip_layer_norms(model)
    want = expected_operators(layers)
    shipped = operator_counts(model, want)
    wrong = _mismatch(shipped, want)
    if wrong:
        raise FusionError(f"splitting the skip layer norms left an unexpected graph ({wrong}); report it")
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model, shipped
