"""Small helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


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
