"""Redis channel: messages are Redis lists read with blocking pops.

Every key of a job is ``<prefix>:<comm_name>:<kind>:...`` with ':' separators, and
comm names cannot contain ':', so two jobs never share a key:

- ``msg:<seq>:<tag>:<src>:<dst>``: a point-to-point message, popped by BLPOP,
- ``pub:<seq>:<tag>:<src>``: a value pushed once; readers rotate the one-element
  list with BLMOVE, which blocks until it exists and leaves it in place,
- ``barrier:<seq>:count`` (INCR), ``barrier:<seq>:arrived`` (set of ranks) and
  ``barrier:<seq>:release`` (list): the peer that counts to world_size pushes one
  release token per waiting peer,
- ``closed``: a counter; the peer that counts to world_size deletes the job's keys.

Every key expires after ``key_ttl_s`` so that a crashed job leaves nothing behind.
"""

from __future__ import annotations

import logging

import redis

from cai_helpers.errors import FMIError
from cai_helpers.fmi.channels.base import COMM_NAME_PATTERN, Deadline, KeyValueChannel
from cai_helpers.fmi.config import RedisSettings

log = logging.getLogger(__name__)

# the client's socket timeout exceeds the longest blocking pop by this margin (s)
SOCKET_TIMEOUT_MARGIN_S = 10.0
# smallest blocking timeout passed to Redis, because 0 would block forever (s)
MIN_BLOCK_S = 0.01
SCAN_BATCH = 1000


class RedisChannel(KeyValueChannel):
    """Messages as Redis lists, with a counter barrier."""

    name = "redis"

    def __init__(self, rank: int, world_size: int, comm_name: str, io_timeout_s: float, settings: RedisSettings) -> None:
        super().__init__(rank, world_size, comm_name, io_timeout_s)
        if not COMM_NAME_PATTERN.fullmatch(settings.prefix):
            raise FMIError(f"Redis key prefix {settings.prefix!r} is invalid; use letters, digits, '.', '_' or '-'")
        self.server = f"{settings.host}:{settings.port}"
        self.base = f"{settings.prefix}:{comm_name}:"
        self.key_ttl_s = settings.key_ttl_s
        self.client = redis.Redis(
            host=settings.host,
            port=settings.port,
            db=settings.db,
            password=settings.password,
            socket_timeout=io_timeout_s + SOCKET_TIMEOUT_MARGIN_S,
            socket_connect_timeout=io_timeout_s,
        )

    def _call(self, what: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except redis.RedisError as exc:
            raise FMIError(
                f"Redis {what} for communicator {self.comm_name!r} (rank {self.rank}) on "
                f"{self.server} failed: {exc}; check that the Redis server is running"
            ) from exc

    def _push(self, key: str, values: list[bytes]) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.rpush(key, *values)
        pipe.expire(key, self.key_ttl_s)
        self._call("RPUSH", pipe.execute)

    def send(self, dst: int, seq: int, tag: int, data: bytes, op: str) -> None:
        self._push(f"{self.base}msg:{seq}:{tag}:{self.rank}:{dst}", [data])

    def recv(self, src: int, seq: int, tag: int, op: str) -> bytes:
        return self.recv_any([src], seq, tag, op)[1]

    def recv_any(self, srcs: list[int], seq: int, tag: int, op: str) -> tuple[int, bytes]:
        keys = {f"{self.base}msg:{seq}:{tag}:{src}:{self.rank}".encode(): src for src in srcs}
        deadline = Deadline(self.io_timeout_s)
        reply = self._call("BLPOP", self.client.blpop, list(keys), timeout=max(deadline.remaining(), MIN_BLOCK_S))
        if reply is None:
            raise self.timeout_error(op, sorted(srcs), deadline.seconds, f"Redis {self.server}")
        key, data = reply
        return keys[key], data

    def publish(self, seq: int, tag: int, data: bytes, op: str) -> None:
        self._push(f"{self.base}pub:{seq}:{tag}:{self.rank}", [data])

    def read_published(self, src: int, seq: int, tag: int, op: str) -> bytes:
        key = f"{self.base}pub:{seq}:{tag}:{src}"
        deadline = Deadline(self.io_timeout_s)
        data = self._call(
            "BLMOVE", self.client.blmove, key, key, max(deadline.remaining(), MIN_BLOCK_S), "LEFT", "RIGHT"
        )
        if data is None:
            raise self.timeout_error(op, src, deadline.seconds, f"Redis {self.server}")
        return data

    def barrier(self, seq: int, op: str) -> None:
        base = f"{self.base}barrier:{seq}:"
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(base + "count")
        pipe.sadd(base + "arrived", self.rank)
        for suffix in ("count", "arrived"):
            pipe.expire(base + suffix, self.key_ttl_s)
        count = self._call("barrier INCR", pipe.execute)[0]

        if count >= self.world_size:
            if self.world_size > 1:
                self._push(base + "release", [b"1"] * (self.world_size - 1))
            return
        deadline = Deadline(self.io_timeout_s)
        reply = self._call("BLPOP", self.client.blpop, [base + "release"], timeout=max(deadline.remaining(), MIN_BLOCK_S))
        if reply is None:
            arrived = {int(member) for member in self._call("SMEMBERS", self.client.smembers, base + "arrived")}
            missing = sorted(set(range(self.world_size)) - arrived)
            raise self.timeout_error(op, missing, deadline.seconds, f"{len(arrived)} of {self.world_size} arrived")

    def close(self) -> None:
        """Count this peer closed. The peer that counts to world_size deletes the job's keys."""
        try:
            key = f"{self.base}closed"
            pipe = self.client.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, self.key_ttl_s)
            closed = self._call("close INCR", pipe.execute)[0]
            if closed >= self.world_size:
                keys = list(self.client.scan_iter(match=f"{self.base}*", count=SCAN_BATCH))
                if keys:
                    self._call("DEL", self.client.delete, *keys)
                log.info("removed %d Redis keys of communicator %r on %s", len(keys), self.comm_name, self.server)
        finally:
            self.client.close()
