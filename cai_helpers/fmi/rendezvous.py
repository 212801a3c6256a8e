"""Rendezvous server of the direct channel: it pairs peers and sends each the other's address.

Run it with ``python -m cai_helpers.fmi.rendezvous --host 127.0.0.1 --port 10000
[--token-file F]``. The protocol is described in :mod:`cai_helpers.fmi.pairing`.

The server is one asyncio loop, so it holds many waiting pairs at once. It enforces:

- a size limit on requests (checked on the length prefix, before reading the body),
- a length and character limit on comm names, and a limit on waiting peers,
- a time limit for a client to send its whole request, and a TTL for waiting peers,
- an optional shared-secret token, compared with ``hmac.compare_digest`` and never logged.

Every request gets an explicit status reply: ``paired``, ``rejected`` or ``expired``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import signal
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_helpers.fmi.channels.base import COMM_NAME_PATTERN
from cai_helpers.fmi.pairing import LENGTH, encode_message

log = logging.getLogger(__name__)

# rejections of one reason are logged individually this many times, then every Nth
REJECTION_LOG_FIRST = 10
REJECTION_LOG_EVERY = 1000
MAX_RANK = 1 << 20
# seconds that open requests get to receive their final reply at shutdown
SHUTDOWN_GRACE_S = 1.0


@dataclass
class RendezvousLimits:
    """Limits that keep one misbehaving client from exhausting the server."""

    max_request_bytes: int = 1024
    max_pending: int = 10000
    max_connections: int = 20000
    request_timeout_s: float = 5.0  # time to send one whole request
    ttl_s: float = 300.0  # how long a peer waits for its partner


@dataclass
class _Waiter:
    rank: int
    address: tuple[str, int]
    partner: asyncio.Future


class RequestRejected(Exception):
    """A request broke a rule. The message is the reason sent back to the client."""


class RendezvousServer:
    """The asyncio server, run by :meth:`serve` in a loop or :meth:`start_in_thread` in tests."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 10000, token: str | None = None,
        limits: RendezvousLimits | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._token = token.encode("utf-8") if token is not None else None
        self.limits = limits or RendezvousLimits()
        self.pending: dict[tuple[str, int, int], _Waiter] = {}
        self.connections = 0
        self.pairs = 0
        self.rejections: Counter[str] = Counter()
        self._handlers: set[asyncio.Task] = set()
        self._server: asyncio.AbstractServer | None = None
        self._stopped: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # request handling

    def _reject(self, reason: str, client: Any) -> dict[str, str]:
        self.rejections[reason] += 1
        count = self.rejections[reason]
        if count <= REJECTION_LOG_FIRST or count % REJECTION_LOG_EVERY == 0:
            log.warning("rejected request from %s: %s (%d so far)", client, reason, count)
        return {"status": "rejected", "reason": reason}

    async def _read_request(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
        if length > self.limits.max_request_bytes:
            raise RequestRejected(f"request of {length} bytes exceeds the limit of {self.limits.max_request_bytes}")
        try:
            request = json.loads(await reader.readexactly(length))
        except ValueError:
            raise RequestRejected("request is not valid JSON") from None
        if not isinstance(request, dict):
            raise RequestRejected("request is not a JSON object")
        return request

    def _validate(self, request: dict[str, Any]) -> tuple[str, int, int]:
        if self._token is not None:
            given = request.get("token")
            given_bytes = given.encode("utf-8") if isinstance(given, str) else b""
            if not hmac.compare_digest(given_bytes, self._token):
                raise RequestRejected("invalid or missing token")
        comm, rank, peer = request.get("comm"), request.get("rank"), request.get("peer")
        if not isinstance(comm, str) or not COMM_NAME_PATTERN.fullmatch(comm):
            raise RequestRejected("comm must be 1-128 letters, digits, '.', '_' or '-'")
        for value in (rank, peer):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_RANK:
                raise RequestRejected(f"rank and peer must be integers in 0..{MAX_RANK - 1}")
        if rank == peer:
            raise RequestRejected("rank and peer must differ")
        return comm, rank, peer

    async def _pair(self, key: tuple[str, int, int], rank: int, address: tuple[str, int],
                    reader: asyncio.StreamReader) -> dict[str, Any]:
        waiter = self.pending.get(key)
        if waiter is not None and waiter.rank != rank:
            del self.pending[key]
            waiter.partner.set_result(address)
            self.pairs += 1
            log.info("paired %s ranks %d (%s:%d) and %d (%s:%d)", key[0], waiter.rank, *waiter.address, rank, *address)
            return {"status": "paired", "peer_host": waiter.address[0], "peer_port": waiter.address[1]}

        if waiter is not None:  # the same rank asked again, e.g. a retried function
            waiter.partner.set_exception(RequestRejected("superseded by a newer request from the same rank"))
        elif len(self.pending) >= self.limits.max_pending:
            raise RequestRejected(f"too many waiting peers ({self.limits.max_pending}); retry later")
        partner = asyncio.get_running_loop().create_future()
        self.pending[key] = _Waiter(rank, address, partner)

        # wait for the partner, the TTL, or the client hanging up
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            done, _ = await asyncio.wait({partner, hangup}, timeout=self.limits.ttl_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
        if partner in done:
            peer_host, peer_port = partner.result()  # raises RequestRejected if superseded
            return {"status": "paired", "peer_host": peer_host, "peer_port": peer_port}
        if self.pending.get(key) is not None and self.pending[key].partner is partner:
            del self.pending[key]
        if hangup in done:
            raise ConnectionResetError("client hung up while waiting")
        log.info("expired %s rank %d waiting for its peer after %.0f s", key[0], rank, self.limits.ttl_s)
        return {"status": "expired", "reason": f"no partner within {self.limits.ttl_s:.0f} s"}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")
        self.connections += 1
        self._handlers.add(asyncio.current_task())
        try:
            if self.connections > self.limits.max_connections:
                reply = self._reject("server busy: too many connections", client)
            else:
                try:
                    request = await asyncio.wait_for(self._read_request(reader), self.limits.request_timeout_s)
                    comm, rank, peer = self._validate(request)
                    key = (comm, min(rank, peer), max(rank, peer))
                    reply = await self._pair(key, rank, (client[0], client[1]), reader)
                except RequestRejected as exc:
                    reply = self._reject(str(exc), client)
                except asyncio.TimeoutError:
                    reply = self._reject("request not received within the time limit", client)
            writer.write(encode_message(reply))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            log.debug("client %s disconnected", client)
        finally:
            self.connections -= 1
            self._handlers.discard(asyncio.current_task())
            writer.close()

    # lifecycle

    async def start(self) -> int:
        """Start listening and return the bound port (useful with port 0)."""
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("rendezvous server listening on %s:%d (token %s)", self.host, self.port,
                 "required" if self._token is not None else "not required")
        return self.port

    async def serve(self) -> None:
        """Start, then run until :meth:`request_stop` is called."""
        if self._server is None:
            await self.start()
        await self._stopped.wait()
        self._server.close()

        # waiting peers get an explicit rejection, then unfinished requests are cancelled
        for waiter in self.pending.values():
            if not waiter.partner.done():
                waiter.partner.set_exception(RequestRejected("server shutting down"))
        if self._handlers:
            _, unfinished = await asyncio.wait(set(self._handlers), timeout=SHUTDOWN_GRACE_S)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        await self._server.wait_closed()
        log.info("rendezvous server stopped after %d pairs, %d rejections", self.pairs, sum(self.rejections.values()))

    def request_stop(self) -> None:
        """Ask a running :meth:`serve` to stop. Safe to call from signal handlers and other threads."""
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)

    def start_in_thread(self) -> int:
        """Serve on a daemon thread with its own loop and return the bound port."""
        started = threading.Event()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            await self.start()
            started.set()
            await self.serve()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name="fmi-rendezvous", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("rendezvous server did not start within 10 s")
        return self.port

    def stop_thread(self) -> None:
        """Stop a server started by :meth:`start_in_thread` and wait for its thread."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FMI rendezvous server for the direct TCP channel.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=10000, help="TCP port to listen on (0 picks a free one)")
    parser.add_argument("--token-file", help="file holding the shared secret that clients must send")
    parser.add_argument("--ttl", type=float, default=RendezvousLimits.ttl_s, help="seconds a peer waits for its partner")
    parser.add_argument("--max-pending", type=int, default=RendezvousLimits.max_pending, help="maximum waiting peers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    token = Path(args.token_file).read_text(encoding="utf-8").strip() if args.token_file else None
    limits = RendezvousLimits(ttl_s=args.ttl, max_pending=args.max_pending)
    server = RendezvousServer(args.host, args.port, token, limits)

    async def run() -> None:
        server._loop = asyncio.get_running_loop()
        await server.start()
        print(f"listening on {server.host}:{server.port}", flush=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            server._loop.add_signal_handler(signum, server.request_stop)
        await server.serve()

    asyncio.run(run())


if __name__ == "__main__":
    main()
