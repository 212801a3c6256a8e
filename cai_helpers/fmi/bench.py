"""Latency benchmark of barrier, bcast and allreduce on each channel, ranks as processes.

``python -m cai_helpers.fmi.bench [--channels direct,redis,store,s3] [--ranks 2,4,8,16]
[--sizes 8,1024,65536,1048576] [--repeats N] [--json runs/bench/fmi.json]``

The benchmark starts its own services on 127.0.0.1: a rendezvous server (thread), a
redis-server (when the binary is installed), a local-folder store in a temporary
folder and, for the ``s3`` channel, moto's S3 server. Each rank is a separate
process. Every measurement starts after a barrier on the same channel and the
latency of a repetition is the slowest rank's. A raw TCP ping-pong on loopback,
measured in the same run, gives the lower bound for one message (half the round trip).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from cai_helpers.fmi.communicator import Communicator
from cai_helpers.fmi.rendezvous import RendezvousServer

log = logging.getLogger(__name__)

WARMUP_REPEATS = 2
SERVICE_START_TIMEOUT_S = 10.0
RUN_TIMEOUT_S = 600.0
BENCH_TIMEOUTS = {"pairing_s": 60.0, "io_s": 60.0}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _time_ops(comm: Communicator, sizes: list[int], repeats: int) -> dict[str, list[float]]:
    """Return this rank's seconds per repetition, keyed ``op/bytes``."""
    cases: list[tuple[str, int, Any]] = [("barrier", 0, None)]
    for size in sizes:
        cases.append(("bcast", size, np.zeros(size, dtype=np.uint8)))
        cases.append(("allreduce", size, np.zeros(max(1, size // 8), dtype=np.float64)))

    timings: dict[str, list[float]] = {}
    for op, size, payload in cases:
        samples = []
        for repeat in range(WARMUP_REPEATS + repeats):
            comm.barrier()
            start = time.perf_counter()
            if op == "barrier":
                comm.barrier()
            elif op == "bcast":
                comm.bcast(payload if comm.rank == 0 else None, 0)
            else:
                comm.allreduce(payload, "sum")
            if repeat >= WARMUP_REPEATS:
                samples.append(time.perf_counter() - start)
        timings[f"{op}/{size}"] = samples
    return timings


def _rank_main(rank: int, world_size: int, config: dict, comm_name: str, sizes: list[int], repeats: int,
               results: Any) -> None:
    try:
        with Communicator(rank, world_size, config, comm_name) as comm:
            results.put(json.dumps({"rank": rank, "timings": _time_ops(comm, sizes, repeats)}))
    except Exception as exc:  # noqa: BLE001 - reported to the driver
        results.put(json.dumps({"rank": rank, "error": f"{type(exc).__name__}: {exc}"}))


def _run_ranks(config: dict, world_size: int, sizes: list[int], repeats: int) -> dict[str, list[float]]:
    """Run one process group and return the slowest rank's seconds per repetition."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    comm_name = f"bench-{uuid.uuid4().hex[:10]}"
    processes = [
        context.Process(target=_rank_main, args=(rank, world_size, config, comm_name, sizes, repeats, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    reports = [json.loads(results.get(timeout=RUN_TIMEOUT_S)) for _ in processes]
    for process in processes:
        process.join(SERVICE_START_TIMEOUT_S)
    errors = [report["error"] for report in reports if "error" in report]
    if errors:
        raise RuntimeError(f"benchmark ranks failed: {errors}")
    keys = reports[0]["timings"].keys()
    return {key: [max(samples) for samples in zip(*(r["timings"][key] for r in reports))] for key in keys}


def _echo(port_queue: Any) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port_queue.put(listener.getsockname()[1])
        connection, _ = listener.accept()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with connection:
            while data := connection.recv(1 << 20):
                connection.sendall(data)


def ping_pong(sizes: list[int], repeats: int) -> dict[str, list[float]]:
    """Return half the round-trip seconds of raw TCP echoes on loopback, keyed ``pingpong/bytes``."""
    context = multiprocessing.get_context("spawn")
    port_queue = context.Queue()
    echo = context.Process(target=_echo, args=(port_queue,), daemon=True)
    echo.start()
    timings: dict[str, list[float]] = {}
    with socket.create_connection(("127.0.0.1", port_queue.get(timeout=SERVICE_START_TIMEOUT_S))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for size in sizes:
            payload = b"\x00" * max(size, 1)
            samples = []
            for repeat in range(WARMUP_REPEATS + repeats):
                start = time.perf_counter()
                sock.sendall(payload)
                received = 0
                while received < len(payload):
                    received += len(sock.recv(len(payload) - received))
                if repeat >= WARMUP_REPEATS:
                    samples.append((time.perf_counter() - start) / 2)
            timings[f"pingpong/{size}"] = samples
    echo.join(SERVICE_START_TIMEOUT_S)
    return timings


def _start_redis(stack: ExitStack) -> tuple[str, int] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        log.warning("redis-server is not installed; skipping the redis channel")
        return None
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    stack.callback(process.wait, SERVICE_START_TIMEOUT_S)
    stack.callback(process.terminate)
    deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return "127.0.0.1", port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not start on port {port}")


def _start_s3(stack: ExitStack) -> tuple[str, str]:
    from moto.server import ThreadedMotoServer
    import boto3

    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    stack.callback(server.stop)
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="fmi-bench")
    return endpoint, "s3://fmi-bench/fmi"


def channel_configs(channels: list[str], stack: ExitStack, poll_interval_s: float) -> dict[str, dict]:
    """Start the services the channels need and return a pinned config per channel."""
    configs: dict[str, dict] = {}
    for channel in channels:
        if channel == "direct":
            server = RendezvousServer("127.0.0.1", 0)
            server.start_in_thread()
            stack.callback(server.stop_thread)
            settings = {"host": "127.0.0.1", "port": server.port, "punch_window_s": 0.05}
            configs[channel] = {"channels": {"direct": settings}}
        elif channel == "redis":
            address = _start_redis(stack)
            if address is not None:
                configs[channel] = {"channels": {"redis": {"host": address[0], "port": address[1]}}}
        elif channel == "store":
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="fmi-bench-"))
            settings = {"location": folder, "poll_interval_s": poll_interval_s}
            configs[channel] = {"channels": {"objectstore": settings}}
        elif channel == "s3":
            endpoint, location = _start_s3(stack)
            settings = {"location": location, "endpoint_url": endpoint, "poll_interval_s": poll_interval_s}
            configs[channel] = {"channels": {"objectstore": settings}}
        else:
            raise SystemExit(f"unknown channel {channel!r}; use direct, redis, store or s3")
    for config in configs.values():
        config["timeouts"] = dict(BENCH_TIMEOUTS)
    return configs


def summarize(samples: list[float]) -> dict[str, float]:
    """Return the median and 90th percentile in microseconds."""
    return {"median_us": statistics.median(samples) * 1e6, "p90_us": float(np.percentile(samples, 90)) * 1e6}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Latency of FMI collectives per channel, ranks as processes.")
    parser.add_argument("--channels", default="direct,redis,store", help="comma list of direct, redis, store, s3")
    parser.add_argument("--ranks", default="2,4,8,16", help="comma list of world sizes")
    parser.add_argument("--sizes", default="8,1024,65536,1048576", help="comma list of message sizes in bytes")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per case, after 2 warm-ups")
    parser.add_argument("--poll-interval", type=float, default=0.005, help="object-store polling interval (s)")
    parser.add_argument("--json", default="runs/bench/fmi.json", help="where to write the results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    channels = [name for name in args.channels.split(",") if name]
    ranks = [int(value) for value in args.ranks.split(",") if value]
    sizes = [int(value) for value in args.sizes.split(",") if value]
    rows: list[dict[str, Any]] = []

    # measure the bound first, in the same run and on the same machine as the channels
    for key, samples in ping_pong(sizes, args.repeats).items():
        op, size = key.split("/")
        rows.append({"channel": "tcp", "ranks": 2, "op": op, "bytes": int(size), **summarize(samples)})

    with ExitStack() as stack:
        for channel, config in channel_configs(channels, stack, args.poll_interval).items():
            for world_size in ranks:
                timings = _run_ranks(config, world_size, sizes, args.repeats)
                for key, samples in timings.items():
                    op, size = key.split("/")
                    rows.append({"channel": channel, "ranks": world_size, "op": op, "bytes": int(size),
                                 **summarize(samples)})

    print(f"{'channel':<8} {'ranks':>5} {'op':<10} {'bytes':>9} {'median_us':>11} {'p90_us':>11}")
    for row in rows:
        print(f"{row['channel']:<8} {row['ranks']:>5} {row['op']:<10} {row['bytes']:>9} "
              f"{row['median_us']:>11.1f} {row['p90_us']:>11.1f}")

    report = {
        "command": " ".join([Path(sys.executable).name, "-m", "cai_helpers.fmi.bench", *(argv or sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "repeats": args.repeats,
        "latency": "slowest rank per repetition, after a barrier; pingpong is half the round trip",
        "rows": rows,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
