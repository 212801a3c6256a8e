"""Client side of the rendezvous protocol, and TCP hole punching between two peers.

Protocol: the client sends one request, a 4-byte big-endian length followed by that
many bytes of JSON ``{"comm": ..., "rank": i, "peer": j, "token": ...}``. The server
keeps the request waiting until peer j of the same comm sends the mirror request, then replies to
both, in the same framing, ``{"status": "paired", "peer_host": ..., "peer_port": ...}``
with the address it observed for the other side. Any other status (``rejected``,
``expired``) comes with a ``reason``. The token travels in plain text, so the
rendezvous port belongs on a private network or behind TLS termination.

After pairing, both peers bind the local port they used for the rendezvous
(SO_REUSEADDR and SO_REUSEPORT) and connect to each other's observed address at the
same time. This TCP simultaneous open can pass NATs that keep a port's mapping.
NOTE: the tests run on loopback only, so NAT traversal is untested. If that has not worked
within ``punch_window_s``, the lower rank listens on that port and the higher rank
keeps connecting, until the pairing timeout.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import struct
import time
from typing import Any

from cai_helpers.errors import FMIError, FMITimeoutError
from cai_helpers.fmi.channels.base import Deadline
from cai_helpers.fmi.config import DirectSettings

log = logging.getLogger(__name__)

LENGTH = struct.Struct("!I")
# a reply contains a status, a reason and an address, so anything longer is not a reply
MAX_REPLY_BYTES = 4096
# one connect attempt during hole punching (s)
CONNECT_ATTEMPT_S = 0.5
_RETRYABLE_CONNECT_ERRORS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EADDRNOTAVAIL,
    errno.EADDRINUSE,
    errno.ECONNABORTED,
}


def encode_message(message: dict[str, Any]) -> bytes:
    """Frame a JSON object as a length-prefixed rendezvous message."""
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return LENGTH.pack(len(body)) + body


def _reusable_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", port))
    return sock


def _recv_exactly(sock: socket.socket, count: int, deadline: Deadline) -> bytes:
    chunks = bytearray()
    while len(chunks) < count:
        sock.settimeout(max(deadline.remaining(), 0.001))
        chunk = sock.recv(count - len(chunks))
        if not chunk:
            raise ConnectionResetError("connection closed before the whole message arrived")
        chunks += chunk
    return bytes(chunks)


def request_pairing(
    settings: DirectSettings, comm_name: str, rank: int, peer: int, deadline: Deadline, op: str = "pairing"
) -> tuple[int, tuple[str, int]]:
    """Register with the rendezvous server and return (local port, peer's observed address)."""
    server = f"{settings.host}:{settings.port}"
    request = {"comm": comm_name, "rank": rank, "peer": peer}
    token = settings.resolved_token()
    if token is not None:
        request["token"] = token

    sock = _reusable_socket()
    try:
        sock.settimeout(max(deadline.remaining(), 0.001))
        sock.connect((settings.host, settings.port))
        local_port = sock.getsockname()[1]
        sock.sendall(encode_message(request))
        (length,) = LENGTH.unpack(_recv_exactly(sock, LENGTH.size, deadline))
        if length > MAX_REPLY_BYTES:
            raise FMIError(f"rendezvous server {server} sent a {length}-byte reply; it is not an FMI rendezvous server")
        reply = json.loads(_recv_exactly(sock, length, deadline))
    except (socket.timeout, TimeoutError):
        raise FMITimeoutError(
            f"FMI {op} on communicator {comm_name!r}: pairing rank {rank} with peer {peer} timed out "
            f"after {deadline.seconds:.1f} s at rendezvous server {server} over the direct "
            "channel; check that the peer is running and uses the same comm_name"
        ) from None
    except (OSError, ValueError) as exc:
        raise FMIError(
            f"FMI {op} on communicator {comm_name!r}: pairing rank {rank} with peer {peer} failed at "
            f"rendezvous server {server}: {exc}; check the server's host, port and logs"
        ) from exc
    finally:
        sock.close()

    if reply.get("status") != "paired":
        raise FMIError(
            f"rendezvous server {server} rejected pairing rank {rank} with peer {peer} on "
            f"communicator {comm_name!r}: {reply.get('status')}: {reply.get('reason', 'no reason given')}"
        )
    return local_port, (reply["peer_host"], int(reply["peer_port"]))


def _try_connect(local_port: int, address: tuple[str, int], deadline: Deadline) -> socket.socket | None:
    sock = _reusable_socket(local_port)
    sock.settimeout(min(CONNECT_ATTEMPT_S, max(deadline.remaining(), 0.001)))
    try:
        sock.connect(address)
        return sock
    except OSError as exc:
        sock.close()
        if isinstance(exc, (socket.timeout, TimeoutError)) or exc.errno in _RETRYABLE_CONNECT_ERRORS:
            return None
        raise


def _try_accept(listener: socket.socket, address: tuple[str, int], wait_s: float) -> socket.socket | None:
    listener.settimeout(wait_s)
    try:
        sock, origin = listener.accept()
    except (socket.timeout, TimeoutError):
        return None
    if origin[1] != address[1]:
        # the peer always connects from its registered port, so any other port is a stranger
        log.warning("rejected a connection from %s:%d while waiting for %s:%d", *origin, *address)
        sock.close()
        return None
    return sock


def connect_pair(
    settings: DirectSettings, rank: int, peer: int, local_port: int, address: tuple[str, int], deadline: Deadline,
    op: str = "pairing",
) -> tuple[socket.socket, str]:
    """Open the TCP connection to ``peer`` and return it with the method that worked."""
    punch_until = time.monotonic() + settings.punch_window_s

    # simultaneous open: both sides connect from their registered port
    while time.monotonic() < punch_until and not deadline.expired():
        sock = _try_connect(local_port, address, deadline)
        if sock is not None:
            return sock, "simultaneous open"
        time.sleep(settings.retry_interval_s)

    # fallback: the lower rank listens on its registered port, the higher keeps connecting
    if rank < peer:
        listener = _reusable_socket(local_port)
        try:
            listener.listen(1)
            while not deadline.expired():
                sock = _try_accept(listener, address, max(deadline.remaining(), 0.001))
                if sock is not None:
                    return sock, "listen"
        finally:
            listener.close()
    else:
        while not deadline.expired():
            sock = _try_connect(local_port, address, deadline)
            if sock is not None:
                return sock, "connect"
            time.sleep(settings.retry_interval_s)
    raise FMITimeoutError(
        f"FMI {op}: rank {rank} could not open a TCP connection to peer {peer} at {address[0]}:{address[1]} "
        f"within the pairing timeout of {deadline.seconds:.1f} s over the direct channel; check "
        "that the peers can reach each other"
    )
