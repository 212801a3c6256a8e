"""Direct TCP channel: one framed connection per pair of peers, paired on first use.

Every frame starts with a 32-byte header: magic ``FMIf``, an 8-byte digest of the
communicator name, the operation sequence (u64), the tag (u32) and the payload
length (u64), all big-endian. The first frame on a connection is a hello carrying
the sender's rank, so a connection from another job or rank is rejected.

Pairing runs on background threads, one per partner, and a send to a partner that
is still pairing is queued. So a send never waits for its receiver to arrive, and
patterns such as a ring (everyone sends to the next, then receives from the
previous) cannot deadlock on pairing order.

Sockets are non-blocking. While a peer writes a frame it also reads every other
connection into per-connection queues, so two peers that send large messages to
each other at the same time never block on full socket buffers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import selectors
import socket
import struct
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future

from cai_helpers.errors import FMIError, FMIPeerLostError
from cai_helpers.fmi.channels.base import Channel, Deadline
from cai_helpers.fmi.config import DirectSettings
from cai_helpers.fmi.pairing import connect_pair, request_pairing

log = logging.getLogger(__name__)

HEADER = struct.Struct("!4s8sQIQ")
MAGIC = b"FMIf"
TAG_HELLO = 0xFFFFFFFF
# a frame larger than this is corruption, not a message (bytes)
MAX_FRAME_BYTES = 1 << 36
MAX_HELLO_BYTES = 4096
READ_CHUNK_BYTES = 1 << 20
# how often a waiting peer checks its pairing threads (s)
PAIRING_POLL_S = 0.01


def comm_digest(comm_name: str) -> bytes:
    """Return the 8-byte communicator id carried in every frame header."""
    return hashlib.blake2b(comm_name.encode("utf-8"), digest_size=8).digest()


class FramedConnection:
    """One TCP connection to a peer: an inbound byte buffer and frames by (seq, tag)."""

    def __init__(self, sock: socket.socket, peer: int, comm_id: bytes) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.peer = peer
        self.comm_id = comm_id
        self.inbound = bytearray()
        self.frames: dict[tuple[int, int], deque[bytes]] = defaultdict(deque)
        self.closed = False

    def read_available(self) -> None:
        """Read what the socket has buffered and split it into frames. EOF marks the connection closed."""
        try:
            chunk = self.sock.recv(READ_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.closed = True
            return
        if not chunk:
            self.closed = True
            return
        self.inbound += chunk
        self._parse()

    def _parse(self) -> None:
        while len(self.inbound) >= HEADER.size:
            magic, comm_id, seq, tag, length = HEADER.unpack_from(self.inbound)
            if magic != MAGIC or comm_id != self.comm_id or length > MAX_FRAME_BYTES:
                raise FMIError(
                    f"peer {self.peer} sent a frame with a bad header (magic {magic!r}, length "
                    f"{length}); the connection belongs to another job or is corrupt"
                )
            end = HEADER.size + length
            if len(self.inbound) < end:
                return
            self.frames[(seq, tag)].append(bytes(self.inbound[HEADER.size:end]))
            del self.inbound[:end]

    def pop(self, seq: int, tag: int) -> bytes | None:
        queue = self.frames.get((seq, tag))
        if not queue:
            return None
        data = queue.popleft()
        if not queue:
            del self.frames[(seq, tag)]
        return data


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionResetError("connection closed during the hello")
        data += chunk
    return bytes(data)


class DirectChannel(Channel):
    """Framed TCP connections between peers, paired through a rendezvous server."""

    name = "direct"

    def __init__(
        self, rank: int, world_size: int, comm_name: str, io_timeout_s: float, pairing_timeout_s: float,
        settings: DirectSettings,
    ) -> None:
        super().__init__(rank, world_size, comm_name, io_timeout_s)
        self.settings = settings
        self.pairing_timeout_s = pairing_timeout_s
        self.comm_id = comm_digest(comm_name)
        self.connections: dict[int, FramedConnection] = {}
        self.pairing: dict[int, Future] = {}
        self.failed: dict[int, BaseException] = {}
        self.outbound: dict[int, list[tuple[int, int, bytes, str]]] = defaultdict(list)
        self.selector = selectors.DefaultSelector()

    # pairing

    def _pair(self, peer: int, op: str) -> socket.socket:
        """Pair with ``peer`` and exchange hellos on a blocking socket (runs on a pairing thread)."""
        deadline = Deadline(self.pairing_timeout_s)
        local_port, address = request_pairing(self.settings, self.comm_name, self.rank, peer, deadline, op)
        sock, method = connect_pair(self.settings, self.rank, peer, local_port, address, deadline, op)
        try:
            sock.settimeout(max(deadline.remaining(), 0.001))
            hello = json.dumps({"comm": self.comm_name, "rank": self.rank}).encode()
            sock.sendall(HEADER.pack(MAGIC, self.comm_id, 0, TAG_HELLO, len(hello)) + hello)
            magic, comm_id, _seq, tag, length = HEADER.unpack(_recv_exactly(sock, HEADER.size))
            if magic != MAGIC or comm_id != self.comm_id or tag != TAG_HELLO or length > MAX_HELLO_BYTES:
                raise FMIError(f"peer {peer} at {address[0]}:{address[1]} sent no valid FMI hello")
            reply = json.loads(_recv_exactly(sock, length))
            if reply.get("rank") != peer or reply.get("comm") != self.comm_name:
                raise FMIError(
                    f"rank {self.rank} of communicator {self.comm_name!r} expected peer {peer} but the "
                    f"connection greeted as {reply}; check that comm names are unique per job"
                )
        except (OSError, ValueError) as exc:
            sock.close()
            if isinstance(exc, (socket.timeout, TimeoutError)):
                raise self.timeout_error(op, peer, deadline.seconds, "hello after pairing") from None
            raise FMIError(f"hello with peer {peer} of communicator {self.comm_name!r} failed: {exc}") from exc
        except FMIError:
            sock.close()
            raise
        log.debug("rank %d of %r connected to peer %d at %s:%d by %s", self.rank, self.comm_name, peer, *address, method)
        return sock

    def _start_pairing(self, peer: int, op: str) -> None:
        if peer in self.failed:
            raise self.failed[peer]  # pairing is not retried within one communicator
        if peer in self.connections or peer in self.pairing:
            return
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(self._pair(peer, op))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                future.set_exception(exc)

        # daemon threads, so that a process whose partner never came can still exit
        threading.Thread(target=run, name=f"fmi-pair-{self.rank}-{peer}", daemon=True).start()
        self.pairing[peer] = future

    def _progress(self, op: str) -> None:
        """Adopt finished pairings and flush the sends queued for them."""
        for peer, future in list(self.pairing.items()):
            if not future.done():
                continue
            del self.pairing[peer]
            if future.exception() is not None:
                self.failed[peer] = future.exception()
                dropped = self.outbound.pop(peer, [])
                if dropped:
                    log.warning("rank %d of %r dropped %d queued messages to peer %d because pairing failed",
                                self.rank, self.comm_name, len(dropped), peer)
                raise future.exception()
            connection = FramedConnection(future.result(), peer, self.comm_id)
            self.connections[peer] = connection
            self.selector.register(connection.sock, selectors.EVENT_READ, connection)
            for seq, tag, data, queued_op in self.outbound.pop(peer, []):
                self._write(connection, seq, tag, data, queued_op, Deadline(self.io_timeout_s))

    def _wait_for_pairing(self, peer: int, op: str) -> FramedConnection:
        self._start_pairing(peer, op)
        while peer not in self.connections:
            self._progress(op)
            if peer in self.connections:
                break
            # keep reading established connections while the pairing threads work
            self._pump(PAIRING_POLL_S)
        return self.connections[peer]

    def _drop(self, peer: int) -> None:
        connection = self.connections.pop(peer, None)
        if connection is not None:
            try:
                self.selector.unregister(connection.sock)
            except (KeyError, ValueError):
                pass  # already unregistered when its EOF was read
            connection.sock.close()

    # the I/O loop

    def _pump(self, timeout_s: float) -> None:
        """Read every connection that has data within ``timeout_s`` seconds."""
        if not self.selector.get_map():
            time.sleep(timeout_s)  # no connection yet: only the pairing threads can progress
            return
        for key, _events in self.selector.select(timeout_s):
            connection: FramedConnection = key.data
            if not connection.closed:
                connection.read_available()
                if connection.closed:
                    self.selector.unregister(connection.sock)

    def _lost(self, connection: FramedConnection, op: str) -> FMIPeerLostError:
        return FMIPeerLostError(
            f"FMI {op} on communicator {self.comm_name!r} (rank {self.rank} of {self.world_size}) "
            f"lost peer {connection.peer}: its connection closed over the direct channel; the peer "
            "died or closed its communicator early"
        )

    def _write(self, connection: FramedConnection, seq: int, tag: int, data: bytes, op: str, deadline: Deadline) -> None:
        header = HEADER.pack(MAGIC, self.comm_id, seq, tag, len(data))
        # small frames go out in one send, and large ones skip the copy of the payload
        parts = [memoryview(header + data)] if len(data) < 65536 else [memoryview(header), memoryview(data)]
        for part in parts:
            while part:
                if connection.closed:
                    raise self._lost(connection, op)
                try:
                    sent = connection.sock.send(part)
                    part = part[sent:]
                    continue
                except (BlockingIOError, InterruptedError):
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    connection.closed = True
                    raise self._lost(connection, op) from None
                if deadline.expired():
                    raise self.timeout_error(op, connection.peer, deadline.seconds, "peer not reading")
                # the socket buffer is full: drain inbound data while waiting for space
                self._wait_writable(connection, min(deadline.remaining(), 0.05))

    def _wait_writable(self, connection: FramedConnection, timeout_s: float) -> None:
        self.selector.modify(connection.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, connection)
        try:
            self._pump(timeout_s)
        finally:
            if not connection.closed:
                self.selector.modify(connection.sock, selectors.EVENT_READ, connection)

    # Channel interface

    def send(self, dst: int, seq: int, tag: int, data: bytes, op: str) -> None:
        self._start_pairing(dst, op)
        self._progress(op)
        connection = self.connections.get(dst)
        if connection is None:
            self.outbound[dst].append((seq, tag, bytes(data), op))
            return
        self._write(connection, seq, tag, data, op, Deadline(self.io_timeout_s))

    def recv(self, src: int, seq: int, tag: int, op: str) -> bytes:
        connection = self._wait_for_pairing(src, op)
        deadline = Deadline(self.io_timeout_s)
        while True:
            data = connection.pop(seq, tag)
            if data is not None:
                return data
            if connection.closed:
                raise self._lost(connection, op)
            if deadline.expired():
                raise self.timeout_error(op, src, deadline.seconds)
            # with pairings pending, wake up often enough to flush their queued sends
            self._pump(min(deadline.remaining(), PAIRING_POLL_S) if self.pairing else deadline.remaining())
            self._progress(op)

    def close(self) -> None:
        """Deliver queued sends, then shut every connection down."""
        try:
            for peer in list(self.outbound):
                if not self.outbound.get(peer):
                    continue
                try:
                    self._wait_for_pairing(peer, "close")
                except FMIError as exc:
                    log.warning("rank %d of %r closed without delivering to peer %d: %s",
                                self.rank, self.comm_name, peer, exc)
        finally:
            for peer in list(self.connections):
                try:
                    self.connections[peer].sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                self._drop(peer)
            self.selector.close()
