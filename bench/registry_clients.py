"""Benchmark: the etcd client libraries fleetpy could use, on one etcd, in one run.

python-etcd (etcd's v2 API), etcd3gw (v3 through etcd's JSON gateway) and aetcd (v3 over
gRPC, asyncio) each write N keys one at a time and with 8 writes in flight, and report the
median latency of a watch: from the start of a write to the watcher holding the event. aetcd
also writes in 128-op transactions, the registry's batches. All run against the same etcd
3.4 (v2 switched on so python-etcd can take part); the baseline is the sequential write
of the library fleetpy used before (python-etcd).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import aetcd
import etcd
import etcd3gw

from fleetpy.lab.etcd import start_cluster

IN_FLIGHT = 8


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def threaded_writes(write, count: int) -> dict[str, float]:
    started = time.perf_counter()
    for i in range(count):
        write(i)
    sequential = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        list(pool.map(write, range(count)))
    return {
        "sequential_writes_per_s": rate(count, sequential),
        "concurrent_writes_per_s": rate(count, time.perf_counter() - started),
    }


def python_etcd(host: str, port: int, count: int, rounds: int) -> dict:
    clients = threading.local()

    def client() -> etcd.Client:
        if not hasattr(clients, "c"):
            clients.c = etcd.Client(host=host, port=port)
        return clients.c

    result = threaded_writes(lambda i: client().write(f"/bench/v2/k{i}", str(i)), count)
    events: queue.Queue = queue.Queue()
    watcher = etcd.Client(host=host, port=port)
    index = watcher.read("/").etcd_index

    def watch() -> None:
        nonlocal index
        for _ in range(rounds):
            found = watcher.read("/bench/v2w", wait=True, waitIndex=index + 1, recursive=True)
            index = found.modifiedIndex
            events.put(time.perf_counter())

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    samples = []
    writer = etcd.Client(host=host, port=port)
    for i in range(rounds):
        time.sleep(0.01)  # the long poll is back in place
        started = time.perf_counter()
        writer.write("/bench/v2w/key", str(i))
        samples.append(events.get(timeout=5) - started)
    result["watch_p50_ms"] = round(statistics.median(samples) * 1000, 2)
    return result


def gateway(host: str, port: int, count: int, rounds: int) -> dict:
    client = etcd3gw.Etcd3Client(host=host, port=port)
    result = threaded_writes(lambda i: client.put(f"/bench/gw/k{i}", str(i)), count)
    events, cancel = client.watch_prefix("/bench/gww/")
    arrivals: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [arrivals.put(time.perf_counter()) for _ in events], daemon=True).start()
    time.sleep(0.2)  # the watch is established
    samples = []
    for i in range(rounds):
        time.sleep(0.01)
        started = time.perf_counter()
        client.put("/bench/gww/key", str(i))
        samples.append(arrivals.get(timeout=5) - started)
    cancel()
    result["watch_p50_ms"] = round(statistics.median(samples) * 1000, 2)
    return result


async def grpc_client(host: str, port: int, count: int, rounds: int) -> dict:
    async with aetcd.Client(host=host, port=port) as client:
        started = time.perf_counter()
        for i in range(count):
            await client.put(f"/bench/grpc/k{i}".encode(), str(i).encode())
        sequential = time.perf_counter() - started
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def put(i: int) -> None:
            async with gate:
                await client.put(f"/bench/grpc/k{i}".encode(), str(i).encode())

        started = time.perf_counter()
        await asyncio.gather(*(put(i) for i in range(count)))
        concurrent = time.perf_counter() - started
        started = time.perf_counter()
        for start in range(0, count, 128):
            ops = [
                client.transactions.put(f"/bench/txn/k{i}".encode(), str(i).encode())
                for i in range(start, min(count, start + 128))
            ]
            await client.transaction(compare=[], success=ops, failure=[])
        batched = time.perf_counter() - started
        watch = await client.watch_prefix(b"/bench/grpcw/")
        arrivals: asyncio.Queue = asyncio.Queue()

        async def consume() -> None:
            async for _ in watch:
                arrivals.put_nowait(time.perf_counter())

        consumer = asyncio.create_task(consume())
        samples = []
        for i in range(rounds):
            await asyncio.sleep(0.01)
            started = time.perf_counter()
            await client.put(b"/bench/grpcw/key", str(i).encode())
            samples.append(await asyncio.wait_for(arrivals.get(), 5) - started)
        await watch.cancel()
        consumer.cancel()
    return {
        "sequential_writes_per_s": rate(count, sequential),
        "concurrent_writes_per_s": rate(count, concurrent),
        "txn_128_keys_per_s": rate(count, batched),
        "watch_p50_ms": round(statistics.median(samples) * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=100, help="watch latency samples")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="fleetpy-bench-") as base:
        members = start_cluster(Path(base), enable_v2=True)
        try:
            url = urlsplit(members[0].client_url)
            host, port = url.hostname, url.port
            result = {
                "etcd": "3.4 (Debian), v2 on, data on tmpfs",
                "writes": args.writes,
                "in_flight": IN_FLIGHT,
                "python-etcd (v2)": python_etcd(host, port, args.writes, args.rounds),
                "etcd3gw (v3 JSON gateway)": gateway(host, port, args.writes, args.rounds),
                "aetcd (v3 gRPC, asyncio)": asyncio.run(grpc_client(host, port, args.writes, args.rounds)),
            }
        finally:
            for member in members:
                member.stop()
    baseline = result["python-etcd (v2)"]["sequential_writes_per_s"]
    for name in ("etcd3gw (v3 JSON gateway)", "aetcd (v3 gRPC, asyncio)"):
        result[name]["sequential_vs_python_etcd"] = round(
            result[name]["sequential_writes_per_s"] / baseline, 2
        )
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
