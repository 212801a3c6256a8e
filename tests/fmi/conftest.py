"""Fixtures of the FMI tests: a real redis-server, a rendezvous server and channel configs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid

import pytest

from cai_helpers.fmi.rendezvous import RendezvousServer

REDIS_START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server():
    """(host, port) of a redis-server started for this session on a free loopback port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed; install the Debian package redis-server")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    yield "127.0.0.1", port
    client.close()
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def rendezvous():
    """A rendezvous server on a free loopback port, served from a thread; yields it."""
    server = RendezvousServer("127.0.0.1", 0)
    server.start_in_thread()
    yield server
    server.stop_thread()


@pytest.fixture
def comm_name():
    """A fresh communicator name, unique per test."""
    return f"test-{uuid.uuid4().hex[:12]}"


TIMEOUTS = {"pairing_s": 20.0, "io_s": 20.0}


@pytest.fixture
def make_config(request, tmp_path):
    """Build a config for 'direct', 'direct-listen', 'redis', 'objectstore' (local folder), 's3' or 'mixed'."""

    def build(channel: str, timeouts: dict | None = None) -> dict:
        timeouts = timeouts or TIMEOUTS
        if channel == "direct":
            server = request.getfixturevalue("rendezvous")
            settings = {"host": "127.0.0.1", "port": server.port, "punch_window_s": 0.05}
            return {"channels": {"direct": settings}, "timeouts": timeouts}
        if channel == "direct-listen":
            # no simultaneous open at all: the lower rank listens, the higher connects
            server = request.getfixturevalue("rendezvous")
            settings = {"host": "127.0.0.1", "port": server.port, "punch_window_s": 0.0}
            return {"channels": {"direct": settings}, "timeouts": timeouts}
        if channel == "mixed":
            # fast picks redis, cheap picks the object store (Redis priced high)
            host, port = request.getfixturevalue("redis_server")
            return {
                "channels": {
                    "redis": {"host": host, "port": port, "prefix": "fmitest"},
                    "objectstore": {"location": str(tmp_path / "store"), "prefix": "fmitest",
                                    "poll_interval_s": 0.005},
                },
                "policy": {"redis_server_hour_usd": 1000.0},
                "timeouts": timeouts,
            }
        if channel == "redis":
            host, port = request.getfixturevalue("redis_server")
            return {"channels": {"redis": {"host": host, "port": port, "prefix": "fmitest"}}, "timeouts": timeouts}
        if channel == "objectstore":
            settings = {"location": str(tmp_path / "store"), "prefix": "fmitest", "poll_interval_s": 0.005}
            return {"channels": {"objectstore": settings}, "timeouts": timeouts}
        if channel == "s3":
            endpoint = request.getfixturevalue("s3_endpoint")
            bucket = request.getfixturevalue("s3_bucket")
            settings = {"location": f"s3://{bucket}/fmi", "endpoint_url": endpoint, "prefix": "fmitest",
                        "poll_interval_s": 0.01}
            return {"channels": {"objectstore": settings}, "timeouts": timeouts}
        raise ValueError(channel)

    return build
