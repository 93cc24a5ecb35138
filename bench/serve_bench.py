"""lmstack serve under concurrent streaming clients: continuous batching vs the same server one request at a time.

Starts `lmstack serve` twice in subprocesses (--max-batch 16, and --max-batch 1 = batching off) and runs 1, 4
and 16 concurrent streaming clients against each, alternating between them (SmolLM2, 64-token prompts as token ids, 64 new tokens):
total tokens/s, p50/p95 time to first token, p50/p95 latency. Then a load test on the batched server: 32
clients for 60 s with a bounded number of requests each; it counts errors and compares the server's RSS
before and after the load.

    python bench/serve_bench.py [--threads 2] [--load-seconds 60] [--model M]

--model serves any checkpoint `lmstack serve` loads, e.g. the int4 model kept from the GGUF:
    python -m lmstack convert smollm2-135m-instruct runs/bench/smollm2-native-keep --quant keep --dtype bfloat16
    python bench/serve_bench.py --model runs/bench/smollm2-native-keep --clients 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402
from lmstack.runconfig import data_root  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"  # what is served (--model); requests name it as /v1/models lists it
SERVED = {"name": MODEL}
NOTES = sorted((data_root() / "course-notes").glob("*.txt"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_batch: int, threads: int, port: int, model: str = MODEL) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "lmstack", "serve", "--model", model, "--port", str(port),
                             "--max-batch", str(max_batch), "--embedding-model", "", "--context", "256",
                             "--max-tokens", "128"], env=env)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]
                SERVED["name"] = models[0]["id"]
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not become healthy")


def prompts(count: int, length: int, model: str = MODEL) -> list[list[int]]:
    """`count` different prompts of exactly `length` SmolLM2 tokens, from the course notes."""
    from lmstack.checkpoints import load_model
    tokenizer = load_model(model).tokenizer
    ids = tokenizer.encode(" ".join(p.read_text() for p in NOTES[:3]), add_special_tokens=False)
    return [ids[i * length:(i + 1) * length] for i in range(count)]


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], new_tokens: int) -> dict:
    body = {"model": SERVED["name"], "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens, error = None, 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"error": error, "ttft": (first or end) - start, "latency": end - start, "tokens": tokens}


async def run_clients(url: str, clients: int, rounds: int, pool: list[list[int]], new_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(w: int) -> list[dict]:
            return [await one_request(client, url, pool[(w * rounds + r) % len(pool)], new_tokens)
                    for r in range(rounds)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    errors = [r["error"] for r in results if r["error"]]
    ok = [r for r in results if not r["error"]]
    ttft, lat = sorted(r["ttft"] for r in ok), sorted(r["latency"] for r in ok)
    q = lambda xs, p: xs[min(len(xs) - 1, round(p * (len(xs) - 1)))] if xs else float("nan")  # noqa: E731
    return {"requests": len(results), "errors": len(errors), "tokens": sum(r["tokens"] for r in ok), "wall": wall,
            "tok_s": sum(r["tokens"] for r in ok) / wall, "ttft_p50": q(ttft, 0.5), "ttft_p95": q(ttft, 0.95),
            "lat_p50": q(lat, 0.5), "lat_p95": q(lat, 0.95)}


async def load_test(url: str, clients: int, seconds: float, per_client: int, pool: list[list[int]]) -> dict:
    """`clients` loop short streaming requests until `seconds` pass or each made `per_client`."""
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(w: int) -> list[dict]:
            out = []
            while time.perf_counter() < deadline and len(out) < per_client:
                out.append(await one_request(client, url, pool[(w + len(out)) % len(pool)][:32], 16))
            return out

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    return {"requests": len(results), "errors": sum(1 for r in results if r["error"]), "wall": wall,
            "tokens": sum(r.get("tokens", 0) for r in results)}


def server_gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith(("lmstack_queue_depth", "lmstack_running_sequences"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="requests per client, one after another")
    parser.add_argument("--load-clients", type=int, default=32)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--load-requests", type=int, default=6, help="the most requests per load-test client")
    parser.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--model", default=MODEL, help="what to serve: a registry name or a checkpoint path")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    pool = prompts(max(counts) * args.rounds + args.load_clients, args.prompt_tokens, args.model)

    # Both servers are up for the whole run (the idle one costs no CPU) and each concurrency level runs on one
    # and then the other, so both see the same machine load (this machine is shared and noisy).
    modes = {"batched": max(counts), "one at a time": 1}
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    table: dict[tuple[str, int], dict] = {}
    load: dict = {}
    try:
        for mode, max_batch in modes.items():
            port = free_port()
            servers[mode] = (start_server(max_batch, args.threads, port, args.model), f"http://127.0.0.1:{port}")
            asyncio.run(run_clients(servers[mode][1], 1, 1, pool, 4))  # warm-up
        for c in counts:
            for mode in modes:
                table[mode, c] = res = asyncio.run(run_clients(servers[mode][1], c, args.rounds, pool,
                                                               args.new_tokens))
                print(f"{mode:>14} clients={c:<3} {res['tok_s']:7.1f} tok/s  ttft p50 {res['ttft_p50']:.2f} "
                      f"p95 {res['ttft_p95']:.2f}  latency p50 {res['lat_p50']:.2f} p95 {res['lat_p95']:.2f}  "
                      f"errors {res['errors']}", flush=True)
        if args.load_seconds > 0:
            proc, url = servers["batched"]
            rss = psutil.Process(proc.pid)
            before = rss.memory_info().rss
            load = asyncio.run(load_test(url, args.load_clients, args.load_seconds, args.load_requests, pool))
            peak = rss.memory_info().rss
            time.sleep(3)
            asyncio.run(run_clients(url, 1, 1, pool, 4))  # the steady state: one small request again
            after = rss.memory_info().rss
            load.update(rss_before=before / 2**20, rss_peak=peak / 2**20, rss_after=after / 2**20,
                        gauges=server_gauges(url))
            print(f"load test: {load}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)

    lines = ["| clients | mode | tokens/s | TTFT p50 s | TTFT p95 s | latency p50 s | latency p95 s | errors |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in counts:
        for mode in ("batched", "one at a time"):
            r = table[mode, c]
            lines.append(f"| {c} | {mode} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | "
                         f"{r['lat_p50']:.2f} | {r['lat_p95']:.2f} | {r['errors']} |")
    ratios = ", ".join(f"{c} clients {table['batched', c]['tok_s'] / table['one at a time', c]['tok_s']:.2f}x"
                       for c in counts)
    text = "\n".join(lines) + (f"\n\nModel: {args.model}. Total tokens/s, batched / one at a time: {ratios} "
                              "(target: >= 3x at 16).")
    if load:
        g = load["gauges"]
        text += (f"\n\nLoad test: {args.load_clients} streaming clients for up to {args.load_seconds:g} s "
                 f"(at most {args.load_requests} requests each, 32-token prompts, 16 new tokens): "
                 f"{load['requests']} requests in {load['wall']:.0f} s, {load['errors']} errors, {load['tokens']} "
                 f"tokens. Server RSS {load['rss_before']:.0f} MB before, {load['rss_peak']:.0f} MB at the end of "
                 f"the load, {load['rss_after']:.0f} MB after it; queue depth {g.get('lmstack_queue_depth')}, "
                 f"running sequences {g.get('lmstack_running_sequences')} after.")
    print(text)
    if not args.no_record:
        title = "Serving: continuous batching vs one request at a time"
        record(title if args.model == MODEL else f"{title} ({Path(args.model).name})", text,
               "python bench/serve_bench.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
