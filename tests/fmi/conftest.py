"""Fixtures of the FMI tests: a real redis-server, a rendezvous server and channel configs."""

from __future__ import annotations

import uuid

import pytest

from cai_helpers.fmi.rendezvous import RendezvousServer
from fault_fixtures import free_port
from fault_fixtures import redis_server as start_redis_server


@pytest.fixture(scope="session")
def redis_server():
    """(host, port) of a redis-server started for this session on a free loopback port."""
    with start_redis_server() as (_process, port):
        yield "127.0.0.1", port


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
