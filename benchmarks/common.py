"""Small helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")


def cpu_flag_set() -> set[str]:
    """Every flag /proc/cpuinfo lists for this host (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_flags() -> str:
    """The instruction-set flags that change onnxruntime's CPU speed, as present on this host: every
    figure names them (hosts of the same VM type differ: some AVX-512 with VNNI, some AVX2 only)."""
    flags = cpu_flag_set()
    return ", ".join(f for f in SPEED_FLAGS if f in flags) or "none of " + ", ".join(SPEED_FLAGS)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Unlike getrusage's ru_maxrss, it is not inherited across
    fork + exec from a large parent, so a child started by a big benchmark process reports its own peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def save(out: Path, stem: str, result: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    (out / f"{stem}.md").write_text(markdown + "\n")


def run_threads(target: Callable[..., None], args: Sequence[tuple]) -> float:
    """Start one thread per argument tuple on ``target``, wait for all; the wall seconds they took."""
    threads = [threading.Thread(target=target, args=a) for a in args]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start
