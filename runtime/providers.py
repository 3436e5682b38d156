"""Choose the execution provider and build the onnxruntime session; never fall back silently."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

from .errors import ProviderUnavailableError

try:
    import onnxruntime as ort
except ImportError as exc:  # the build is an extra: [cpu] or [gpu], never both
    raise ImportError(
        "the runtime needs an onnxruntime build and none is installed; install exactly one: "
        "`pip install 'bge-onnx[cpu]'` (onnxruntime) or `pip install 'bge-onnx[gpu]'` (onnxruntime-gpu, CUDA)"
    ) from exc

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
# Distributions that all install the one `onnxruntime` module: two of them overwrite each other's files.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-training")


def installed_ort_distributions() -> list[str]:
    """Which onnxruntime builds pip has installed (more than one means a broken module)."""
    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def _cuda_hint() -> str:
    dists = installed_ort_distributions()
    if len(dists) > 1:
        return (
            f"several onnxruntime builds are installed ({', '.join(dists)}) and they overwrite one module; "
            "`pip uninstall -y " + " ".join(dists) + "` then `pip install 'bge-onnx[gpu]'`"
        )
    if dists == ["onnxruntime"]:
        return "the CPU-only build `onnxruntime` is installed; `pip uninstall -y onnxruntime` then `pip install 'bge-onnx[gpu]'`"
    return "install the GPU build with `pip install 'bge-onnx[gpu]'`"


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
            f"(available: {ort.get_available_providers()}); {_cuda_hint()}, or use device='cpu'"
        )
    return device


# onnxruntime graph rewrites the runtime switches off, per device. SkipLayerNormFusion: the exported graphs
# carry Add + LayerNormalization because onnxruntime's CPU kernel for the fused SkipLayerNormalization is
# 2-4x slower than the plain ops (export/optimize.py: split_skip_layer_norms); on CUDA the fused kernel is
# the fast one, so there onnxruntime is left to fuse them at load.
DISABLED_OPTIMIZERS = {"cpu": ("SkipLayerNormFusion",), "cuda": ()}


def disabled_optimizers(providers: list) -> list[str]:
    """The rewrites to switch off for a session whose first provider is ``providers[0]``."""
    first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    return list(DISABLED_OPTIMIZERS["cuda" if first == CUDA else "cpu"])


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def session_options(threads: int | None, spinning: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # Spinning keeps intra-op threads busy-waiting for the next parallel section: a little lower latency
    # for back-to-back runs, but the spinning threads take the cores from everything else in the process
    # (a server's event loop and tokenisation). The server turns it off.
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


def cuda_options(device_id: int) -> dict[str, object]:
    """CUDA provider options for an embedding service: shapes vary with every batch (batch x length).

    - kSameAsRequested: the arena grows by what a run asks for, not by doubling, so a service that has seen
      one long batch holds that batch's memory, not twice it; batches are capped by a token budget, which
      bounds the largest request.
    - cudnn_conv_algo_search DEFAULT: no per-shape exhaustive search (BERT has no convolutions; with
      EXHAUSTIVE every new shape would pay a benchmark).
    - do_copy_in_default_stream: input copies are ordered with the compute stream (no host sync per copy).
    """
    if device_id < 0:
        raise ValueError(f"device_id must be >= 0, got {device_id}")
    return {
        "device_id": device_id,
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "DEFAULT",
        "do_copy_in_default_stream": True,
    }


def create_session(
    model_path: str | os.PathLike[str], device: str, threads: int | None, device_id: int = 0,
    spinning: bool = True,
) -> ort.InferenceSession:
    opts = session_options(threads, spinning)
    if device == "cuda":
        # onnxruntime-gpu >= 1.21 finds CUDA and cuDNN from the nvidia-* pip packages only once they are
        # preloaded; without it, a machine with those packages (but no system CUDA) fails the session.
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            preload()
        providers: list = [(CUDA, cuda_options(device_id)), CPU]
    else:
        providers = [CPU]
    session = ort.InferenceSession(
        str(model_path), sess_options=opts, providers=providers, disabled_optimizers=disabled_optimizers(providers)
    )
    got = session.get_providers()
    if device == "cuda" and (not got or got[0] != CUDA):
        raise ProviderUnavailableError(
            f"device='cuda' was requested but the session got {got} (available: "
            f"{ort.get_available_providers()}); check the CUDA/cuDNN libraries onnxruntime-gpu needs "
            "(`python -c \"import onnxruntime; onnxruntime.preload_dlls()\"`) or use device='cpu'"
        )
    return session
