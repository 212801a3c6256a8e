"""The Communicator: MPI-style point-to-point and collective operations for serverless peers.

Every peer of a job creates ``Communicator(peer_id, num_peers, config, comm_name)``
with the same config and comm_name, then calls the same collectives in the same
order. Each collective gets the next operation sequence number, identical on every
peer, which addresses its messages on whichever channel the policy picks.

Inputs are never mutated: values are serialized before they leave the caller, and
reductions work on decoded copies.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict, deque
from typing import Any, Callable, Mapping

from cai_helpers.errors import InvalidParameterError
from cai_helpers.fmi import algorithms, codec, kv_algorithms
from cai_helpers.fmi.algorithms import TAG_P2P, Link
from cai_helpers.fmi.channels.base import Channel, check_rank, validate_comm_name
from cai_helpers.fmi.config import OBJECTIVES, FMIConfig, load_config
from cai_helpers.fmi.ops import UserOp, resolve_op
from cai_helpers.fmi.policy import choose_channel

log = logging.getLogger(__name__)


def _open_channel(name: str, rank: int, world_size: int, comm_name: str, config: FMIConfig) -> Channel:
    # imported on demand so that a job without Redis needs no redis client, and so on
    io_s = config.timeouts.io_s
    if name == "direct":
        from cai_helpers.fmi.channels.direct import DirectChannel

        return DirectChannel(rank, world_size, comm_name, io_s, config.timeouts.pairing_s, config.direct)
    if name == "redis":
        from cai_helpers.fmi.channels.redis import RedisChannel

        return RedisChannel(rank, world_size, comm_name, io_s, config.redis)
    from cai_helpers.fmi.channels.objectstore import ObjectStoreChannel

    return ObjectStoreChannel(rank, world_size, comm_name, io_s, config.objectstore)


class Communicator:
    """A peer's handle on a job's communicator, to be used as a context manager.

    ``config`` is a dict, a JSON file path or an :class:`FMIConfig` (see
    :mod:`cai_helpers.fmi.config`). Closing releases connections and, once every
    peer has closed, removes the job's keys and objects.
    """

    def __init__(
        self, peer_id: int, num_peers: int, config: Mapping[str, Any] | str | os.PathLike | FMIConfig,
        comm_name: str,
    ) -> None:
        if not isinstance(num_peers, int) or num_peers < 1:
            raise InvalidParameterError(f"num_peers must be a positive integer, got {num_peers!r}")
        self.rank = check_rank(peer_id, num_peers, "peer_id")
        self.world_size = num_peers
        self.comm_name = validate_comm_name(comm_name)
        self.config = load_config(config)
        self.objective = self.config.objective
        self._channels: dict[str, Channel] = {}
        self._op_seq = 0
        self._sent: dict[int, int] = defaultdict(int)
        self._received: dict[int, int] = defaultdict(int)
        self._to_self: deque[bytes] = deque()
        self._closed = False
        log.info("rank %d of %d joined communicator %r (channels %s, objective %s)", self.rank,
                 self.world_size, comm_name, ",".join(self.config.enabled_channels), self.objective)

    # context manager and lifecycle

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close every opened channel. Each removes the job's keys once all peers have closed."""
        if self._closed:
            return
        self._closed = True
        for name, channel in self._channels.items():
            try:
                channel.close()
            except Exception:  # noqa: BLE001 - closing must reach every channel
                log.exception("rank %d failed to close the %s channel of %r", self.rank, name, self.comm_name)

    def hint(self, objective: str) -> None:
        """Set the channel policy's objective: ``"fast"`` or ``"cheap"`` (the default)."""
        if objective not in OBJECTIVES:
            raise InvalidParameterError(f"hint must be 'fast' or 'cheap', got {objective!r}")
        self.objective = objective

    def channel_for(self, op: str) -> str:
        """Return the channel name that operation ``op`` would use now."""
        return choose_channel(op, self.world_size, self.config, self.objective)

    def _channel(self, name: str) -> Channel:
        if self._closed:
            raise InvalidParameterError(f"communicator {self.comm_name!r} is closed")
        if name not in self._channels:
            self._channels[name] = _open_channel(name, self.rank, self.world_size, self.comm_name, self.config)
        return self._channels[name]

    def _link(self, op: str) -> tuple[Link, Any]:
        """Return a link for the next collective and the algorithm module for its channel."""
        channel = self._channel(self.channel_for(op))
        self._op_seq += 1
        module = kv_algorithms if channel.key_value else algorithms
        return Link(channel, self._op_seq, op), module

    # point to point

    def send(self, obj: Any, dst: int) -> None:
        """Send ``obj`` to peer ``dst``. Messages between two peers arrive in the order sent."""
        check_rank(dst, self.world_size, "dst")
        if dst == self.rank:
            self._to_self.append(codec.encode(obj))
            return
        channel = self._channel(self.channel_for("send"))
        self._sent[dst] += 1
        channel.send(dst, self._sent[dst], TAG_P2P, codec.encode(obj), "send")

    def recv(self, src: int) -> Any:
        """Wait for the next object that peer ``src`` sent to this peer."""
        check_rank(src, self.world_size, "src")
        if src == self.rank:
            if not self._to_self:
                raise InvalidParameterError(
                    f"rank {self.rank} called recv from itself with no message sent to itself; "
                    "it would wait forever"
                )
            return codec.decode(self._to_self.popleft())
        channel = self._channel(self.channel_for("send"))
        self._received[src] += 1
        return codec.decode(channel.recv(src, self._received[src], TAG_P2P, "recv"))

    # collectives

    def barrier(self) -> None:
        """Return once every peer has called barrier."""
        link, module = self._link("barrier")
        if self.world_size > 1:
            module.barrier(link)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Return the root's ``obj`` on every peer (other peers' ``obj`` is ignored)."""
        check_rank(root, self.world_size, "root")
        link, module = self._link("bcast")
        if self.world_size == 1:
            return obj
        data = codec.encode(obj) if self.rank == root else None
        blob = module.bcast(link, data, root)
        return obj if self.rank == root else codec.decode(blob)

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        """Return every peer's ``obj`` in rank order at the root, None elsewhere."""
        check_rank(root, self.world_size, "root")
        link, module = self._link("gather")
        blobs = module.gather(link, codec.encode(obj), root) if self.world_size > 1 else [codec.encode(obj)]
        return None if blobs is None else [codec.decode(blob) for blob in blobs]

    def scatter(self, objs: list[Any] | None, root: int = 0) -> Any:
        """Return ``objs[rank]`` of the root's list on every peer."""
        check_rank(root, self.world_size, "root")
        blobs = None
        if self.rank == root:
            if objs is None or len(objs) != self.world_size:
                raise InvalidParameterError(
                    f"scatter at root {root} needs a list of {self.world_size} objects, one per peer, "
                    f"got {None if objs is None else len(objs)}"
                )
            blobs = [codec.encode(obj) for obj in objs]
        link, module = self._link("scatter")
        blob = module.scatter(link, blobs, root) if self.world_size > 1 else blobs[0]
        return codec.decode(blob)

    def reduce(self, obj: Any, op: str | UserOp | Callable[[Any, Any], Any], root: int = 0) -> Any:
        """Return ``x0 op x1 op ... op x(n-1)`` at the root, None elsewhere."""
        check_rank(root, self.world_size, "root")
        reduction = resolve_op(op)
        value = codec.decode(codec.encode(obj))
        link, module = self._link("reduce")
        return module.reduce(link, value, reduction, root) if self.world_size > 1 else value

    def allreduce(self, obj: Any, op: str | UserOp | Callable[[Any, Any], Any]) -> Any:
        """Return ``x0 op x1 op ... op x(n-1)`` on every peer."""
        reduction = resolve_op(op)
        value = codec.decode(codec.encode(obj))
        link, module = self._link("allreduce")
        return module.allreduce(link, value, reduction) if self.world_size > 1 else value

    def scan(self, obj: Any, op: str | UserOp | Callable[[Any, Any], Any]) -> Any:
        """Return the inclusive prefix ``x0 op ... op x(rank)`` on every peer."""
        reduction = resolve_op(op)
        value = codec.decode(codec.encode(obj))
        link, module = self._link("scan")
        return module.scan(link, value, reduction) if self.world_size > 1 else value
