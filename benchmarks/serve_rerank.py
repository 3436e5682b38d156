"""Rerank serving, side by side in one run: ``runtime.serve``'s ``/rerank`` against a naive FastAPI server over
sentence-transformers' ``CrossEncoder`` (torch) and one over our ``Reranker`` (the same model files, INT8), each
on the same cores, the load generator beside them (open loop, Poisson arrivals, latency from the scheduled send
time). One request: 1 query x 20 passages from ``benchmarks/data/zh-query-pos-neg.jsonl`` (TEI's ``/rerank``).

    python -m benchmarks.serve_rerank --arch bge-reranker-base [--duration 30] [--slo-ms 1000]

Prints and writes ``benchmarks/results/serve-rerank-<arch>.{json,md}``: per server the max sustainable rate
(every request 200 and p99 within the SLO) and the steps of its ladder.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np
import orjson

from .common import cpu_flags, cpu_name, save
from .rerank import CACHE, RESULTS, _artifacts, query_groups
from .serve import (
    ServerProcess,
    ServerSpec,
    base_env,
    drain,
    next_rate,
    open_loop,
    rate_rng,
    say,
    schedule,
    step_stats,
    sustains,
)

ROOT = Path(__file__).resolve().parents[1]
PASSAGES = 20


def specs(checkpoint: Path, artifact: Path, threads: int) -> list[ServerSpec]:
    def naive(backend: str, model: Path):
        def command(port: int):
            return ([sys.executable, "-m", "benchmarks.naive_server", "--backend", backend, "--model", str(model),
                     "--port", str(port), "--threads", str(threads)], base_env(threads), ROOT)
        return command

    def ours(port: int):
        return ([sys.executable, "-m", "runtime.serve", "--model", f"rerank={artifact}", "--host", "127.0.0.1",
                 "--port", str(port), "--cache-size", "0"], base_env(threads), ROOT)

    def infinity(port: int):
        from . import infinity_peer as peer

        model_dir = peer.prepare_cross_encoder(checkpoint, CACHE / "infinity-rerank")
        argv, env, cwd = peer.server_command(model_dir, port, threads, rerank=True)
        return list(argv), dict(env), Path(cwd)

    return [ServerSpec("naive-st-cross-torch", naive("st-cross-torch", checkpoint), note="CrossEncoder, torch fp32"),
            ServerSpec("naive-ours", naive("ours-rerank", artifact), note="FastAPI over runtime.Reranker int8"),
            ServerSpec("ours", ours, note="runtime.serve, default layout, cache off"),
            ServerSpec("infinity", infinity, note="infinity-emb 0.0.78 optimum engine, optimum avx512_vnni INT8 "
                       "of the plain graph, POST /v1/rerank")]


def payload(name: str, query: str, texts: list[str]) -> bytes:
    if name == "infinity":  # its Cohere-shaped route
        return orjson.dumps({"model": "bge", "query": query, "documents": texts})
    return orjson.dumps({"query": query, "texts": texts})


async def wait_ready(server: ServerProcess, session, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.spec.name} exited: {server.log_tail()}")
        for path in ("/health", "/v1/health"):  # infinity serves its routes under --url-prefix /v1
            try:
                async with session.get(server.url + path) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - not listening yet
                pass
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{server.spec.name} not ready in {timeout_s} s")


async def run_server(spec: ServerSpec, groups, args, log_dir: Path) -> dict:
    import aiohttp

    server = ServerProcess.start(spec, log_dir / f"{spec.name}.log")
    steps: list[dict] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            ready = await wait_ready(server, session, 600)
            probe = await open_loop(session, server.url + ("/v1/rerank" if spec.name == "infinity" else "/rerank"),
                                    [payload(spec.name, *groups[0])], np.zeros(1), 120)
            if probe[0][0].status != 200:
                raise RuntimeError(f"{spec.name} answered {probe[0][0].status} to a rerank request: {server.log_tail()}")
            url = server.url + ("/v1/rerank" if spec.name == "infinity" else "/rerank")
            warm = [payload(spec.name, q, t) for q, t in groups[:4]]
            await open_loop(session, url, warm, np.arange(len(warm)) * 0.5, 120)
            history: list[tuple[float, bool]] = []
            while len(steps) < args.max_steps:
                rate = next_rate(history, args.start_rps, args.start_rps / 8, args.max_rps)
                if rate is None:
                    break
                n = max(int(round(rate * args.duration)), 20)
                offsets = schedule(rate, n, 0)
                rng = rate_rng(0, 2, rate)
                picks = [groups[int(rng.integers(len(groups)))] for _ in range(n)]
                payloads = [payload(spec.name, q, t) for q, t in picks]
                c0, w0 = server.cpu_seconds(), time.monotonic()
                outcomes, lags = await open_loop(session, url, payloads, offsets, args.timeout)
                wall = time.monotonic() - w0
                s = step_stats(rate, n / rate, outcomes, lags, n * PASSAGES, args.slo_ms)
                s["server_cpu_share"] = (server.cpu_seconds() - c0) / wall
                s["sustained"] = sustains(s, args.slo_ms)
                p99 = f"{s['p99_ms']:.0f}" if s["p99_ms"] is not None else "-"
                say(f"[{spec.name}] {rate:g} req/s: goodput {s['goodput_rps']:.2f}/s, p50 {s['p50_ms'] or 0:.0f} ms, "
                    f"p99 {p99} ms, failures {s['failures_total']}, server CPU {s['server_cpu_share']:.2f} -> "
                    f"{'ok' if s['sustained'] else 'FAIL'}")
                steps.append(s)
                history.append((rate, s["sustained"]))
                await drain(server, 1.0, 60.0)
    finally:
        server.stop()
    good = [s["offered_rps"] for s in steps if s["sustained"]]
    return {"name": spec.name, "note": spec.note, "ready_s": ready, "max_sustainable_rps": max(good) if good else 0.0,
            "steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_rerank", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="bge-reranker-base")
    p.add_argument("--threads", type=int, default=2, help="cores of every server")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per rate step")
    p.add_argument("--slo-ms", type=float, default=1000.0, help="p99 SLO of one 1 x 20 request")
    p.add_argument("--start-rps", type=float, default=1.0)
    p.add_argument("--max-rps", type=float, default=64.0)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--servers", default="naive-st-cross-torch,naive-ours,ours,infinity")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    ckpt, art = _artifacts(args.arch)
    groups = query_groups(200, PASSAGES)
    wanted = args.servers.split(",")
    log_dir = CACHE / "serve-rerank-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = [asyncio.run(run_server(s, groups, args, log_dir)) for s in specs(ckpt, art, args.threads)
            if s.name in wanted]
    machine = {"cpu": cpu_name(), "flags": cpu_flags(), "date": time.strftime("%Y-%m-%d")}
    md = [f"# Rerank serving, {args.arch} INT8, 1 query x {PASSAGES} passages per request ({machine['cpu']}; "
          f"{machine['flags']}; {args.threads} cores per server, load generator on the same cores; {machine['date']})",
          "", f"Open loop, Poisson arrivals, {args.duration:g} s steps, p99 SLO {args.slo_ms:g} ms.", "",
          "| server | max sustainable req/s | pairs/s | note |", "|---|---:|---:|---|"]
    for r in rows:
        md.append(f"| {r['name']} | {r['max_sustainable_rps']:.2f} | {r['max_sustainable_rps'] * PASSAGES:.0f} | {r['note']} |")
    by = {r["name"]: r["max_sustainable_rps"] for r in rows}
    if by.get("ours") and by.get("infinity"):
        md += ["", f"ours / infinity-emb: {by['ours'] / by['infinity']:.2f}x (target >= 1x)"]
    if by.get("ours") and by.get("naive-st-cross-torch") == 0.0:
        md += ["", "The naive CrossEncoder server held no rate within the SLO."]
    if by.get("ours") and by.get("naive-st-cross-torch"):
        md += ["", f"ours / naive CrossEncoder server: {by['ours'] / by['naive-st-cross-torch']:.2f}x (target 2x)"
               + (f"; ours / naive server over our Reranker: {by['ours'] / by['naive-ours']:.2f}x" if by.get("naive-ours") else "")]
    save(args.out, f"serve-rerank-{args.arch}", {"machine": machine, "args": vars(args) | {"out": str(args.out)},
                                                 "rows": rows}, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
