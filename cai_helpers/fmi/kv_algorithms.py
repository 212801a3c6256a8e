"""Collective algorithms for key-value channels (Redis, object storage).

A key-value service lets one write be read by many peers, and lets a peer wait for
whichever of several messages comes first, so these algorithms are linear:

- bcast: the root publishes once and every peer reads it,
- gather and scatter: one message per peer to or from the root,
- reduce: the root folds a reorderable op as values arrive. It folds any other op
  in rank order, ``x0 op x1 op ... op x(n-1)``, whatever the root,
- allreduce: reduce at rank 0, then bcast,
- scan: every peer publishes its value, and peer i folds values 0..i in rank order,
- barrier: the channel's own counter or markers.
"""

from __future__ import annotations

from typing import Any

from cai_helpers.fmi import codec
from cai_helpers.fmi.algorithms import (
    TAG_BCAST,
    TAG_GATHER,
    TAG_REDUCE,
    TAG_SCAN_UP,
    TAG_SCATTER,
    Link,
)
from cai_helpers.fmi.channels.base import KeyValueChannel
from cai_helpers.fmi.ops import UserOp, fold_in_rank_order


def _channel(link: Link) -> KeyValueChannel:
    channel = link.channel
    assert isinstance(channel, KeyValueChannel)
    return channel


def bcast(link: Link, data: bytes | None, root: int) -> bytes:
    """Publish ``data`` once at the root, and read it on every other peer."""
    channel = _channel(link)
    if link.rank == root:
        channel.publish(link.seq, TAG_BCAST, data, link.op)
        return data
    return channel.read_published(root, link.seq, TAG_BCAST, link.op)


def gather(link: Link, data: bytes, root: int) -> list[bytes] | None:
    """Collect every peer's ``data`` at the root in rank order, and return None elsewhere."""
    channel = _channel(link)
    if link.rank != root:
        link.send(root, TAG_GATHER, data)
        return None
    blobs: list[bytes | None] = [None] * link.world_size
    blobs[root] = data
    pending = [rank for rank in range(link.world_size) if rank != root]
    while pending:
        source, blob = channel.recv_any(pending, link.seq, TAG_GATHER, link.op)
        blobs[source] = blob
        pending.remove(source)
    return blobs


def scatter(link: Link, blobs: list[bytes] | None, root: int) -> bytes:
    """Send ``blobs[i]`` from the root to peer i."""
    if link.rank != root:
        return link.recv(root, TAG_SCATTER)
    for rank, blob in enumerate(blobs):
        if rank != root:
            link.send(rank, TAG_SCATTER, blob)
    return blobs[root]


def reduce(link: Link, value: Any, op: UserOp, root: int) -> Any:
    """Reduce every peer's value at the root, and return None elsewhere."""
    channel = _channel(link)
    if link.rank != root:
        link.send_value(root, TAG_REDUCE, value)
        return None

    pending = [rank for rank in range(link.world_size) if rank != root]
    if op.reorderable:
        result = value
        while pending:
            source, blob = channel.recv_any(pending, link.seq, TAG_REDUCE, link.op)
            result = op(result, codec.decode(blob))
            pending.remove(source)
        return result

    values: list[Any] = [None] * link.world_size
    values[root] = value
    while pending:
        source, blob = channel.recv_any(pending, link.seq, TAG_REDUCE, link.op)
        values[source] = codec.decode(blob)
        pending.remove(source)
    return fold_in_rank_order(op, values)


def allreduce(link: Link, value: Any, op: UserOp) -> Any:
    """Reduce at rank 0, then publish the result to every peer."""
    result = reduce(link, value, op, 0)
    blob = bcast(link, codec.encode(result) if link.rank == 0 else None, 0)
    return result if link.rank == 0 else codec.decode(blob)


def barrier(link: Link) -> None:
    """Return once every peer has entered."""
    _channel(link).barrier(link.seq, link.op)


def scan(link: Link, value: Any, op: UserOp) -> Any:
    """Publish this peer's value, then fold the values of ranks 0..rank in rank order."""
    channel = _channel(link)
    channel.publish(link.seq, TAG_SCAN_UP, codec.encode(value), link.op)
    values = [codec.decode(channel.read_published(rank, link.seq, TAG_SCAN_UP, link.op)) for rank in range(link.rank)]
    return fold_in_rank_order(op, values + [value])
