"""Huge texts next to one-line queries: does one client's 5 MB request hold up everyone else's?

    python -m benchmarks.hostile                          # bge-small-zh architecture, ours
    python -m benchmarks.hostile --baseline-rev aec1f66   # and the server of an older commit, same run

For each server (started alone on 127.0.0.1, INT8, its default worker layout; an older commit's with
``--threads``): its capacity for one-query requests
(closed loop, 8 clients, 10 s), then open-loop Poisson one-query requests at 20% of that capacity for
``--duration`` seconds twice: alone, and while ``--flooders`` other clients keep sending 5 MB texts (each
sends the next when its answer arrives; each in a process of its own; OpenAI route, default truncation). Reported: p50/p99 of the query
requests in both phases (latency from the scheduled send time), the ratio p99 with / p99 alone (target <= 2),
and the flood requests' statuses and latencies. With ``--baseline-rev`` the older server runs from a git
worktree at the same offered rate, so the figures sit side by side. Writes
``benchmarks/results/hostile-<arch>.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import datasets
from .common import cpu_flags, save
from .serve import (MODEL_NAME, ROOT, ServerProcess, ServerSpec, Unavailable, base_env, body, machine,
                    open_loop, percentile_ms, prepare_files, say, schedule, send, wait_ready)

RESULTS = Path(__file__).resolve().parent / "results"


def server_spec(name: str, artifact: Path, threads: int, cwd: Path, extra: Sequence[str] = ()) -> ServerSpec:
    """``threads``: the cores the server may use (its environment's OMP_NUM_THREADS); ``extra``: options."""
    def command(port: int) -> tuple[list[str], dict[str, str], Path]:
        argv = [sys.executable, "-m", "runtime.serve", "--model", f"{MODEL_NAME}={artifact}", "--host", "127.0.0.1",
                "--port", str(port), "--cache-size", "0", "--log-level", "warning", *extra]
        env = base_env(threads)
        env["PYTHONPATH"] = str(cwd)  # an older commit's worktree: its runtime, not the installed one
        return argv, env, cwd

    return ServerSpec(name, command)


async def capacity(session, url: str, payloads: list[bytes], clients: int, seconds: float) -> float:
    """One-query requests per second with ``clients`` back-to-back senders (closed loop)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    done = 0

    async def client(k: int) -> None:
        nonlocal done
        i = k
        while loop.time() < end:
            o = await send(session, url, payloads[i % len(payloads)], loop.time(), 30.0)
            done += o.status == 200
            i += clients

    t0 = loop.time()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return done / (loop.time() - t0)


def flood_client(url: str, payload_path: str, seconds: float, results: Any) -> None:
    """One flooding client, in a process of its own (other clients are other processes): send the payload,
    wait for the answer, send it again, for ``seconds``; put [(status, latency_s)] on ``results``."""
    import httpx

    payload = Path(payload_path).read_bytes()
    out: list[tuple[int | None, float]] = []
    end = time.monotonic() + seconds
    with httpx.Client(timeout=120) as client:
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                status: int | None = client.post(url, content=payload,
                                                 headers={"Content-Type": "application/json"}).status_code
            except httpx.HTTPError:
                status = None
            out.append((status, time.monotonic() - t0))
    results.put(out)


async def phase(session, url: str, payloads: list[bytes], rate: float, seconds: float, seed: int,
                flood_payload: Path | None, flooders: int) -> dict:
    import multiprocessing

    n = max(int(rate * seconds), 20)
    offsets = schedule(rate, n, seed)
    flood_out: list[tuple[int | None, float]] = []
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=flood_client, args=(url, str(flood_payload), seconds + 1.5, results))
             for _ in range(flooders if flood_payload is not None else 0)]
    for p in procs:
        p.start()
    if procs:
        await asyncio.sleep(1.5)  # the floods are under way before the first query
    outcomes, lags = await open_loop(session, url, payloads[:n], offsets, 30.0)
    for _ in procs:
        flood_out += await asyncio.get_running_loop().run_in_executor(None, results.get)
    for p in procs:
        p.join(30)
    ok = [o.latency_s for o in outcomes if o.status == 200]
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    row = {"offered_rps": rate, "requests": n, "statuses": statuses, "p50_ms": percentile_ms(ok, 50),
           "p90_ms": percentile_ms(ok, 90), "p99_ms": percentile_ms(ok, 99), "max_ms": percentile_ms(ok, 100),
           "send_lag_p99_ms": percentile_ms(lags, 99)}
    if flood_payload is not None:
        fs: dict[str, int] = {}
        for status, _ in flood_out:
            fs[str(status)] = fs.get(str(status), 0) + 1
        lat = [x for s, x in flood_out if s == 200]
        row["flood"] = {"requests": len(flood_out), "statuses": fs, "p50_ms": percentile_ms(lat, 50),
                        "max_ms": percentile_ms(lat, 100), "mb_per_request": flood_payload.stat().st_size / 1e6}
    return row


async def bench(spec: ServerSpec, log: Path, args: argparse.Namespace, rate: float | None) -> dict:
    import aiohttp

    queries = datasets.zh_queries()
    payloads = [body([q], True, None) for q in queries]
    rng = np.random.default_rng(args.seed)
    payloads = [payloads[int(i)] for i in rng.integers(len(payloads), size=20000)]
    passages = "".join(datasets.sohu_passages())
    huge = (passages * (args.flood_mb * 1_000_000 // len(passages.encode()) + 1))
    huge = huge[: len(huge) * args.flood_mb * 1_000_000 // len(huge.encode())]
    flood_payload = Path(tempfile.mkdtemp(prefix="hostile-flood-")) / "flood.json"
    flood_payload.write_bytes(body([huge], False, None))
    row: dict = {"server": spec.name}
    server = ServerProcess.start(spec, log)
    try:
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=connector) as session:
            url = server.url + "/v1/embeddings"
            await wait_ready(server, session, 180, payloads[0])
            await capacity(session, url, payloads, 8, 3.0)  # warm-up
            row["capacity_rps"] = await capacity(session, url, payloads, 8, args.capacity_s)
            row["rate_rps"] = rate if rate is not None else args.load * row["capacity_rps"]
            say(f"[{spec.name}] capacity {row['capacity_rps']:.1f} req/s; offering {row['rate_rps']:.1f}")
            row["alone"] = await phase(session, url, payloads, row["rate_rps"], args.duration, args.seed, None, 0)
            say(f"[{spec.name}] alone: {row['alone']}")
            row["with_flood"] = await phase(session, url, payloads, row["rate_rps"], args.duration, args.seed,
                                            flood_payload, args.flooders)
            say(f"[{spec.name}] with flood: {row['with_flood']}")
    except Unavailable as exc:
        row["unavailable"] = str(exc)
    finally:
        row["exit_code"] = server.stop()
    a, f = row.get("alone", {}).get("p99_ms"), row.get("with_flood", {}).get("p99_ms")
    row["p99_ratio"] = f / a if a and f else None
    return row


def report(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Huge texts beside one-line queries ({result['arch']}, INT8)", "",
             f"{m['date']}, {m['cpu']}, {m['cores']} cores, flags {result['cpu_flags']}, onnxruntime "
             f"{m['onnxruntime']}, commit {m['git_commit'][:7]}{' (dirty)' if m['git_dirty'] else ''}. Each server "
             f"alone on the machine with the load generator; one-query requests (open loop, Poisson) at "
             f"{result['load']:.0%} of the first server's closed-loop capacity for {result['duration_s']:g} s, "
             f"alone and while {result['flooders']} other clients (processes) keep sending "
             f"{result['flood_mb']} MB texts (OpenAI route, default truncation).", "",
             "| server | capacity (req/s) | offered (req/s) | alone p50 / p99 (ms) | with floods p50 / p99 (ms) | "
             "p99 ratio (target <= 2) | query statuses with floods | flood requests: statuses, p50 / max (ms) |",
             "|---|---:|---:|---|---|---:|---|---|"]
    for r in result["servers"]:
        if "unavailable" in r:
            lines.append(f"| {r['server']} | unavailable: {r['unavailable']} |||||||")
            continue
        a, f = r["alone"], r["with_flood"]
        fl = f["flood"]
        ratio = f"{r['p99_ratio']:.2f}" if r["p99_ratio"] else "-"
        lines.append(f"| {r['server']} | {r['capacity_rps']:.1f} | {r['rate_rps']:.1f} | {a['p50_ms']:.1f} / "
                     f"{a['p99_ms']:.1f} | {f['p50_ms']:.1f} / {f['p99_ms']:.1f} | {ratio} | {f['statuses']} | "
                     f"{fl['requests']}: {fl['statuses']}, {fl['p50_ms'] or 0:.0f} / {fl['max_ms'] or 0:.0f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-arch", default="bge-small-zh", choices=["bge-small-zh", "bge-large-zh", "tiny-zh"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    p.add_argument("--capacity-s", type=float, default=10.0)
    p.add_argument("--load", type=float, default=0.2, help="offered rate as a fraction of capacity")
    p.add_argument("--flooders", type=int, default=2)
    p.add_argument("--flood-mb", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-rev", default=None, help="also run the server of this git revision (a worktree)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    files = prepare_files(args.model_arch)
    result: dict = {"arch": args.model_arch, "machine": machine(), "cpu_flags": cpu_flags(), "load": args.load,
                    "duration_s": args.duration, "flooders": args.flooders, "flood_mb": args.flood_mb,
                    "servers": []}
    logs = Path(tempfile.mkdtemp(prefix="hostile-"))
    ours = await bench(server_spec("ours", files["artifact"], args.threads, ROOT), logs / "ours.log", args, None)
    result["servers"].append(ours)
    if args.baseline_rev:
        tree = logs / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline_rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            # an older server ran one worker of --threads intra-op threads
            spec = server_spec(f"ours at {args.baseline_rev}", files["artifact"], args.threads, tree,
                               ["--threads", str(args.threads)])
            result["servers"].append(await bench(spec, logs / "baseline.log", args, ours.get("rate_rps")))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    text = report(result)
    save(args.out, f"hostile-{args.model_arch}", result, text)
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
