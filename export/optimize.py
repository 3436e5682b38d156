"""onnxruntime's transformer fusions, and a check that every layer was fused."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from .errors import FusionError


def expected_fusions(layers: int) -> dict[str, int]:
    """What a fully fused BERT encoder of ``layers`` layers contains."""
    return {
        "EmbedLayerNormalization": 1,
        "Attention": layers,
        "SkipLayerNormalization": 2 * layers,
        "BiasGelu": layers,
    }


def fuse(path: Path, heads: int, hidden: int, layers: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Fuse the traced graph at ``path``; raise if any layer is left unfused."""
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
    want = expected_fusions(layers)
    missing = {k: (counts.get(k, 0), n) for k, n in want.items() if counts.get(k, 0) != n}
    if missing:
        detail = ", ".join(f"{k}: {got} (expected {n})" for k, (got, n) in missing.items())
        raise FusionError(
            f"onnxruntime's transformer optimizer fused the graph only partly ({detail}); the exported "
            "pattern no longer matches its fusions, usually after a torch or onnxruntime upgrade: pin the "
            "versions in pyproject.toml or report it"
        )
    opt.topological_sort()
    model = opt.model
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model, counts
