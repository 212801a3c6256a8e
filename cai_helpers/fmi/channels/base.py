"""Channel interfaces shared by the direct, Redis and object-store channels.

A channel moves opaque byte messages between the peers of one communicator. A
message is addressed by (source rank, destination rank, operation sequence, tag):
the communicator numbers its operations identically on every peer, so two
operations never share an address and a late message is never taken for a new one.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod

from cai_helpers.errors import FMITimeoutError, InvalidParameterError

COMM_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")


def validate_comm_name(comm_name: str) -> str:
    """Raise InvalidParameterError unless ``comm_name`` is safe in keys, object paths and frames."""
    if not isinstance(comm_name, str) or not COMM_NAME_PATTERN.fullmatch(comm_name):
        raise InvalidParameterError(
            f"communicator name {comm_name!r} is invalid; use 1-128 letters, digits, "
            "'.', '_' or '-', unique per job"
        )
    return comm_name


class Deadline:
    """A point in monotonic time after which a wait raises FMITimeoutError."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires_at = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left, never below zero."""
        return max(0.0, self.expires_at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.expires_at


class Channel(ABC):
    """Point-to-point byte messages between the peers of one communicator."""

    name = "channel"
    # key-value channels also implement KeyValueChannel's methods
    key_value = False

    def __init__(self, rank: int, world_size: int, comm_name: str, io_timeout_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.comm_name = validate_comm_name(comm_name)
        self.io_timeout_s = io_timeout_s

    @abstractmethod
    def send(self, dst: int, seq: int, tag: int, data: bytes, op: str) -> None:
        """Deliver ``data`` to peer ``dst``. ``op`` names the operation in errors."""

    @abstractmethod
    def recv(self, src: int, seq: int, tag: int, op: str) -> bytes:
        """Wait up to the I/O timeout for the message from ``src``."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and remove the job's keys or objects once every peer closed."""

    def timeout_error(self, op: str, peers: list[int] | int, waited_s: float, detail: str = "") -> FMITimeoutError:
        """Build the error for a wait on ``peers`` that ran out of time."""
        if isinstance(peers, int):
            peers = [peers]
        who = "peer " + ", ".join(str(peer) for peer in peers) if len(peers) == 1 else f"peers {peers}"
        message = (
            f"FMI {op} on communicator {self.comm_name!r} (rank {self.rank} of "
            f"{self.world_size}) timed out after {waited_s:.1f} s waiting for {who} over "
            f"the {self.name} channel"
        )
        if detail:
            message += f" ({detail})"
        return FMITimeoutError(message + "; check that the peer is running and uses the same comm_name")


class KeyValueChannel(Channel):
    """A channel over a shared key-value service, with its collective shortcuts."""

    key_value = True

    @abstractmethod
    def publish(self, seq: int, tag: int, data: bytes, op: str) -> None:
        """Write this peer's value once so that every peer can read it."""

    @abstractmethod
    def read_published(self, src: int, seq: int, tag: int, op: str) -> bytes:
        """Wait for and read, without consuming, the value ``src`` published."""

    @abstractmethod
    def recv_any(self, srcs: list[int], seq: int, tag: int, op: str) -> tuple[int, bytes]:
        """Wait for the first message from any of ``srcs`` and return (source, data)."""

    @abstractmethod
    def barrier(self, seq: int, op: str) -> None:
        """Return once every peer has entered barrier ``seq``."""


def check_rank(rank: int, world_size: int, what: str) -> int:
    """Raise InvalidParameterError unless ``rank`` is a valid rank in ``world_size``."""
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise InvalidParameterError(
            f"{what} {rank!r} is not a rank of this communicator; use 0..{world_size - 1}"
        )
    return rank
