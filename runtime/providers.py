"""Choose the execution provider and build the onnxruntime session; never fall back silently."""

from __future__ import annotations

import os

import onnxruntime as ort

from .errors import ProviderUnavailableError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    return CUDA in ort.get_available_providers()


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise ProviderUnavailableError(
            "device='cuda' was requested but this onnxruntime build has no CUDAExecutionProvider "
            f"(available: {ort.get_available_providers()}); install the GPU build with "
            "`pip install .[gpu]` (it replaces the CPU-only onnxruntime) or use device='cpu'"
        )
    return device


def session_options(threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # The graph was fused offline; ORT_ENABLE_ALL still adds layout/CPU-specific rewrites at load.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Shapes change from call to call (batch x length), so a memory pattern planned for one shape
    # would only be thrown away; off keeps the arena from caching one plan per shape.
    opts.enable_mem_pattern = False
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def create_session(
    model_path: str | os.PathLike[str], device: str, threads: int | None, device_id: int = 0
) -> ort.InferenceSession:
    opts = session_options(threads)
    if device == "cuda":
        providers: list = [
            (CUDA, {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested"}),
            CPU,
        ]
    else:
        providers = [CPU]
    session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
    got = session.get_providers()
    if device == "cuda" and (not got or got[0] != CUDA):
        raise ProviderUnavailableError(
            f"device='cuda' was requested but the session got {got} (available: "
            f"{ort.get_available_providers()}); check the CUDA/cuDNN libraries onnxruntime-gpu needs "
            "(`python -c \"import onnxruntime; onnxruntime.preload_dlls()\"`) or use device='cpu'"
        )
    return session
