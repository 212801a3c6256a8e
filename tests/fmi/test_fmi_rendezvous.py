"""The rendezvous server pairs peers and enforces its limits, TTL and token."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from cai_helpers.fmi.pairing import LENGTH, encode_message
from cai_helpers.fmi.rendezvous import RendezvousLimits, RendezvousServer

SECRET = "s3cret-token-value"
# rounds of four connections per flooding thread; stays well under the open-file limit
FLOOD_ROUNDS = 100


@pytest.fixture
def start_server():
    servers = []

    def start(token=None, **limits) -> RendezvousServer:
        server = RendezvousServer("127.0.0.1", 0, token, RendezvousLimits(**limits))
        server.start_in_thread()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop_thread()


def exchange(port: int, payload: bytes, timeout_s: float = 10.0) -> tuple[dict, tuple[str, int]]:
    """Send raw request bytes; return the server's reply and this client's address."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        address = sock.getsockname()
        sock.sendall(payload)
        header = sock.recv(LENGTH.size, socket.MSG_WAITALL)
        (length,) = LENGTH.unpack(header)
        return json.loads(sock.recv(length, socket.MSG_WAITALL)), address


def request(comm="job", rank=0, peer=1, **extra) -> bytes:
    return encode_message({"comm": comm, "rank": rank, "peer": peer, **extra})


def pair_concurrently(port: int, first: bytes, second: bytes) -> list:
    replies: list = [None, None]

    def run(index: int, payload: bytes) -> None:
        replies[index] = exchange(port, payload)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate((first, second))]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(15)
    return replies


def test_pair_gets_each_others_address(start_server):
    server = start_server()
    (reply_a, address_a), (reply_b, address_b) = pair_concurrently(
        server.port, request(rank=0, peer=1), request(rank=1, peer=0)
    )
    assert reply_a == {"status": "paired", "peer_host": address_b[0], "peer_port": address_b[1]}
    assert reply_b == {"status": "paired", "peer_host": address_a[0], "peer_port": address_a[1]}
    assert server.pending == {}


def test_different_comms_not_paired(start_server):
    server = start_server(ttl_s=0.5)
    (reply_a, _), (reply_b, _) = pair_concurrently(
        server.port, request(comm="job-a", rank=0, peer=1), request(comm="job-b", rank=1, peer=0)
    )
    assert reply_a["status"] == "expired"
    assert reply_b["status"] == "expired"


def test_waiting_peer_expires_after_ttl(start_server):
    server = start_server(ttl_s=0.3)
    start = time.monotonic()
    reply, _ = exchange(server.port, request())
    assert reply["status"] == "expired"
    assert time.monotonic() - start < 5.0
    assert server.pending == {}


@pytest.mark.parametrize(
    "payload,reason",
    [
        (LENGTH.pack(10_000) + b"x" * 16, "exceeds the limit"),
        (LENGTH.pack(5) + b"nope!", "not valid JSON"),
        (encode_message([1, 2]), "not a JSON object"),
        (request(comm="bad:name"), "comm must be"),
        (request(comm="x" * 129), "comm must be"),
        (request(rank=-1), "rank and peer must be integers"),
        (request(rank=3, peer=3), "must differ"),
    ],
)
def test_bad_request_rejected(start_server, payload, reason):
    server = start_server()
    reply, _ = exchange(server.port, payload)
    assert reply["status"] == "rejected"
    assert reason in reply["reason"]


def test_silent_client_rejected_after_time_limit(start_server):
    server = start_server(request_timeout_s=0.3)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(LENGTH.pack(40))  # promises a body that never comes
        (length,) = LENGTH.unpack(sock.recv(LENGTH.size, socket.MSG_WAITALL))
        reply = json.loads(sock.recv(length, socket.MSG_WAITALL))
    assert reply == {"status": "rejected", "reason": "request not received within the time limit"}


def test_pending_limit_rejects_extra_waiters(start_server):
    server = start_server(max_pending=2, ttl_s=2.0)
    holders = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    try:
        for index, sock in enumerate(holders):
            sock.sendall(request(comm=f"wait-{index}"))
        deadline = time.monotonic() + 5
        while len(server.pending) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        reply, _ = exchange(server.port, request(comm="one-too-many"))
        assert reply["status"] == "rejected"
        assert "too many waiting peers" in reply["reason"]
    finally:
        for sock in holders:
            sock.close()


def test_repeated_rank_supersedes_old_request(start_server):
    server = start_server(ttl_s=5.0)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as old:
        old.sendall(request())
        time.sleep(0.1)
        replies: list = []
        waiter = threading.Thread(target=lambda: replies.append(exchange(server.port, request())))
        waiter.start()
        (length,) = LENGTH.unpack(old.recv(LENGTH.size, socket.MSG_WAITALL))
        old_reply = json.loads(old.recv(length, socket.MSG_WAITALL))
    partner, _ = exchange(server.port, request(rank=1, peer=0))
    waiter.join(10)
    assert old_reply["status"] == "rejected"
    assert "superseded" in old_reply["reason"]
    assert partner["status"] == "paired"
    assert replies[0][0]["status"] == "paired"


def test_hung_up_waiter_removed(start_server):
    server = start_server(ttl_s=30.0)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request())
        deadline = time.monotonic() + 5
        while not server.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(server.pending) == 1
    deadline = time.monotonic() + 5
    while server.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.pending == {}


def test_token_checked_and_never_logged(start_server, caplog):
    caplog.set_level(logging.DEBUG, logger="cai_helpers.fmi.rendezvous")
    server = start_server(token=SECRET)

    reply, _ = exchange(server.port, request(token="wrong"))
    assert reply == {"status": "rejected", "reason": "invalid or missing token"}
    reply, _ = exchange(server.port, request())
    assert reply == {"status": "rejected", "reason": "invalid or missing token"}
    (good_a, _), (good_b, _) = pair_concurrently(
        server.port, request(rank=0, peer=1, token=SECRET), request(rank=1, peer=0, token=SECRET)
    )
    assert good_a["status"] == good_b["status"] == "paired"
    assert SECRET not in caplog.text


def test_flood_of_bad_requests_still_serves_good(start_server):
    server = start_server(request_timeout_s=1.0)
    flood_sockets = []
    stop = threading.Event()

    def flood() -> None:
        for _ in range(FLOOD_ROUNDS):
            if stop.is_set():
                return
            for payload in (LENGTH.pack(1 << 30), b"\x00\x00\x00\x05garbage", request(comm="bad comm")):
                try:
                    sock = socket.create_connection(("127.0.0.1", server.port), timeout=2)
                    sock.sendall(payload)
                    flood_sockets.append(sock)
                except OSError:
                    pass
            # idle connections that never finish their request
            flood_sockets.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))

    threads = [threading.Thread(target=flood) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        (reply_a, _), (reply_b, _) = pair_concurrently(
            server.port, request(comm="good", rank=0, peer=1), request(comm="good", rank=1, peer=0)
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for sock in flood_sockets:
            sock.close()
    assert reply_a["status"] == reply_b["status"] == "paired"
    assert sum(server.rejections.values()) > 10


def test_cli_stops_on_sigterm(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(SECRET)
    process = subprocess.Popen(
        [sys.executable, "-m", "cai_helpers.fmi.rendezvous", "--host", "127.0.0.1", "--port", "0",
         "--token-file", str(token_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        reply, _ = exchange(port, request(token="wrong"))
        assert reply["status"] == "rejected"
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert SECRET not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_shutdown_rejects_waiting_peers():
    server = RendezvousServer("127.0.0.1", 0, limits=RendezvousLimits(ttl_s=30.0))
    server.start_in_thread()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request())
        deadline = time.monotonic() + 5
        while not server.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        server.stop_thread()
        (length,) = LENGTH.unpack(sock.recv(LENGTH.size, socket.MSG_WAITALL))
        reply = json.loads(sock.recv(length, socket.MSG_WAITALL))
    assert reply == {"status": "rejected", "reason": "server shutting down"}
