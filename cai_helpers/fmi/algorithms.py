"""Collective algorithms over point-to-point messages (used by the direct channel).

Trees are binomial trees over ranks rotated so that the root is rank 0: a peer's
relative rank is ``(rank - root) mod world_size``. In such a tree the peer with
relative rank r and lowest set bit m (m = 2**k >= world_size for the root) receives
from r - m and is the parent of r + 1, r + 2, r + 4, ... below r + m, so its subtree
covers the relative ranks [r, r + m).

Ops that are not both commutative and associative are never regrouped: reduce and
allreduce gather every value and fold ``x0 op x1 op ... op x(n-1)`` in rank order,
and scan runs a chain. Values travel encoded by :mod:`cai_helpers.fmi.codec`.
"""

from __future__ import annotations

from typing import Any

from cai_helpers.fmi import codec
from cai_helpers.fmi.channels.base import Channel
from cai_helpers.fmi.ops import UserOp, fold_in_rank_order

# Message tags. Each operation has its own sequence number, so tags only separate
# the phases of one operation between the same two peers.
TAG_BCAST = 1
TAG_GATHER = 2
TAG_SCATTER = 3
TAG_REDUCE = 4
TAG_FOLD_IN = 5
TAG_FOLD_OUT = 6
TAG_EXCHANGE = 7
TAG_SCAN_UP = 8
TAG_SCAN_DOWN = 9
TAG_SCAN_CHAIN = 10
TAG_P2P = 100


class Link:
    """One operation's view of a channel: its sequence number and name for errors."""

    def __init__(self, channel: Channel, seq: int, op: str) -> None:
        self.channel = channel
        self.seq = seq
        self.op = op
        self.rank = channel.rank
        self.world_size = channel.world_size

    def send(self, dst: int, tag: int, data: bytes) -> None:
        self.channel.send(dst, self.seq, tag, data, self.op)

    def recv(self, src: int, tag: int) -> bytes:
        return self.channel.recv(src, self.seq, tag, self.op)

    def send_value(self, dst: int, tag: int, value: Any) -> None:
        self.send(dst, tag, codec.encode(value))

    def recv_value(self, src: int, tag: int) -> Any:
        return codec.decode(self.recv(src, tag))


def _lowest_bit(relative_rank: int, world_size: int) -> int:
    """Return the subtree span of a relative rank: its lowest set bit, or 2**k >= n for the root."""
    if relative_rank:
        return relative_rank & -relative_rank
    span = 1
    while span < world_size:
        span <<= 1
    return span


def bcast(link: Link, data: bytes | None, root: int) -> bytes:
    """Broadcast ``data`` (bytes, given at the root only) down a binomial tree."""
    n = link.world_size
    relative = (link.rank - root) % n
    span = _lowest_bit(relative, n)
    if relative:
        data = link.recv((relative - span + root) % n, TAG_BCAST)

    child_offset = span >> 1
    while child_offset:
        if relative + child_offset < n:
            link.send((relative + child_offset + root) % n, TAG_BCAST, data)
        child_offset >>= 1
    return data


def gather(link: Link, data: bytes, root: int) -> list[bytes] | None:
    """Collect every peer's ``data`` at the root in rank order, and return None elsewhere."""
    n = link.world_size
    relative = (link.rank - root) % n
    span = _lowest_bit(relative, n)

    # collected maps absolute rank -> data for this peer's subtree
    collected: dict[int, bytes] = {link.rank: data}
    child_offset = 1
    while child_offset < span:
        if relative + child_offset < n:
            child = (relative + child_offset + root) % n
            flat = link.recv_value(child, TAG_GATHER)
            collected.update(zip(flat[0::2], flat[1::2]))
        child_offset <<= 1

    if relative:
        flat = [item for rank, blob in collected.items() for item in (rank, blob)]
        link.send_value((relative - span + root) % n, TAG_GATHER, flat)
        return None
    return [collected[rank] for rank in range(n)]


def scatter(link: Link, blobs: list[bytes] | None, root: int) -> bytes:
    """Send ``blobs[i]`` (given at the root) to peer i along a binomial tree."""
    n = link.world_size
    relative = (link.rank - root) % n
    span = _lowest_bit(relative, n)

    # subtree maps relative rank -> data for this peer's subtree
    if relative:
        flat = link.recv_value((relative - span + root) % n, TAG_SCATTER)
        subtree = dict(zip(flat[0::2], flat[1::2]))
    else:
        subtree = {(rank - root) % n: blob for rank, blob in enumerate(blobs)}

    child_offset = span >> 1
    while child_offset:
        child = relative + child_offset
        if child < n:
            part = [item for r in range(child, min(child + child_offset, n)) for item in (r, subtree[r])]
            link.send_value((child + root) % n, TAG_SCATTER, part)
        child_offset >>= 1
    return subtree[relative]


def reduce(link: Link, value: Any, op: UserOp, root: int) -> Any:
    """Reduce every peer's value at the root, and return None elsewhere."""
    n = link.world_size
    if not op.reorderable:
        blobs = gather(link, codec.encode(value), root)
        if blobs is None:
            return None
        return fold_in_rank_order(op, [codec.decode(blob) for blob in blobs])

    relative = (link.rank - root) % n
    span = _lowest_bit(relative, n)
    result = value
    child_offset = 1
    while child_offset < span:
        if relative + child_offset < n:
            child_value = link.recv_value((relative + child_offset + root) % n, TAG_REDUCE)
            result = op(result, child_value)
        child_offset <<= 1
    if relative:
        link.send_value((relative - span + root) % n, TAG_REDUCE, result)
        return None
    return result


def allreduce(link: Link, value: Any, op: UserOp) -> Any:
    """Combine every peer's value and return the result on every peer.

    Reorderable ops use recursive doubling over the largest power of two p <= n:
    each rank r >= p first hands its value to r - p and gets the result back at the
    end. Both partners put the lower rank's operand on the left, so every peer
    computes a bit-identical result. Other ops reduce in rank order, then broadcast.
    """
    n = link.world_size
    if not op.reorderable:
        result = reduce(link, value, op, 0)
        blob = bcast(link, codec.encode(result) if link.rank == 0 else None, 0)
        return result if link.rank == 0 else codec.decode(blob)

    power = 1 << (n.bit_length() - 1)
    rank = link.rank
    if rank >= power:
        link.send_value(rank - power, TAG_FOLD_IN, value)
        return link.recv_value(rank - power, TAG_FOLD_OUT)

    result = value
    if rank + power < n:
        result = op(result, link.recv_value(rank + power, TAG_FOLD_IN))
    distance = 1
    while distance < power:
        partner = rank ^ distance
        link.send_value(partner, TAG_EXCHANGE, result)
        other = link.recv_value(partner, TAG_EXCHANGE)
        result = op(result, other) if rank < partner else op(other, result)
        distance <<= 1
    if rank + power < n:
        link.send_value(rank + power, TAG_FOLD_OUT, result)
    return result


def barrier(link: Link) -> None:
    """Return once every peer has entered: an allreduce of an empty value."""
    allreduce(link, None, UserOp(lambda left, right: None, commutative=True, associative=True))


def scan(link: Link, value: Any, op: UserOp) -> Any:
    """Return ``x0 op ... op x(rank)`` on every peer (inclusive prefix)."""
    if not op.reorderable:
        return _scan_chain(link, value, op)
    return _scan_tree(link, value, op)


def _scan_chain(link: Link, value: Any, op: UserOp) -> Any:
    rank = link.rank
    result = value if rank == 0 else op(link.recv_value(rank - 1, TAG_SCAN_CHAIN), value)
    if rank + 1 < link.world_size:
        link.send_value(rank + 1, TAG_SCAN_CHAIN, result)
    return result


def _scan_tree(link: Link, value: Any, op: UserOp) -> Any:
    """Up-sweep subtree totals to rank 0, then down-sweep the prefixes before each subtree."""
    n = link.world_size
    rank = link.rank
    span = _lowest_bit(rank, n)
    children = []
    offset = 1
    while offset < span and rank + offset < n:
        children.append(rank + offset)
        offset <<= 1

    # up-sweep: total of [rank, rank + span), children in increasing rank order
    child_totals = [link.recv_value(child, TAG_SCAN_UP) for child in children]
    if rank:
        total = value
        for child_total in child_totals:
            total = op(total, child_total)
        link.send_value(rank - span, TAG_SCAN_UP, total)

    # down-sweep: the parent sends the fold of [0, rank)
    result = value if rank == 0 else op(link.recv_value(rank - span, TAG_SCAN_DOWN), value)
    running = result
    for child, child_total in zip(children, child_totals):
        link.send_value(child, TAG_SCAN_DOWN, running)
        running = op(running, child_total)
    return result
