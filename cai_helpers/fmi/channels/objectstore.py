"""Object-storage channel: messages are objects under a per-job prefix, receivers poll.

Works with any :class:`cai_helpers.store.Store`, a local folder or S3. Every key of a
job sits under ``<prefix>/<comm_name>/``:

- ``msg/<seq>/<tag>/<src>-<dst>``: a point-to-point message, deleted once read,
- ``pub/<seq>/<tag>/<src>``: a value published once for every peer to read,
- ``barrier/<seq>/<rank>``: a marker per peer that entered a barrier,
- ``closed/<rank>``: a marker per peer that closed; the last one deletes the prefix.

Receivers poll with the configured interval. Listing is scoped to one operation's
folder and paginated by the store, so it never scans other jobs or hits a page limit.
"""

from __future__ import annotations

import logging
import time

from cai_helpers.errors import ObjectNotFoundError
from cai_helpers.fmi.channels.base import Deadline, KeyValueChannel
from cai_helpers.fmi.config import ObjectStoreSettings
from cai_helpers.store import Store, open_store, validate_key

log = logging.getLogger(__name__)


class ObjectStoreChannel(KeyValueChannel):
    """Messages as objects in a :class:`~cai_helpers.store.Store`, found by polling."""

    name = "objectstore"

    def __init__(
        self,
        rank: int,
        world_size: int,
        comm_name: str,
        io_timeout_s: float,
        settings: ObjectStoreSettings,
        store: Store | None = None,
    ) -> None:
        super().__init__(rank, world_size, comm_name, io_timeout_s)
        self.store = store or open_store(settings.location, endpoint_url=settings.endpoint_url)
        self.poll_interval_s = settings.poll_interval_s
        prefix = settings.prefix.strip("/")
        self.base = validate_key(f"{prefix}/{comm_name}" if prefix else comm_name) + "/"

    def _wait(self, deadline: Deadline) -> None:
        time.sleep(min(self.poll_interval_s, deadline.remaining()))

    def _poll_get(self, key: str, src: int, op: str) -> bytes:
        deadline = Deadline(self.io_timeout_s)
        while True:
            try:
                return self.store.get(key)
            except ObjectNotFoundError:
                if deadline.expired():
                    raise self.timeout_error(op, src, deadline.seconds, f"object {self.store.uri}/{key}") from None
                self._wait(deadline)

    def send(self, dst: int, seq: int, tag: int, data: bytes, op: str) -> None:
        self.store.put(f"{self.base}msg/{seq}/{tag}/{self.rank}-{dst}", data)

    def recv(self, src: int, seq: int, tag: int, op: str) -> bytes:
        key = f"{self.base}msg/{seq}/{tag}/{src}-{self.rank}"
        data = self._poll_get(key, src, op)
        self.store.delete(key)
        return data

    def recv_any(self, srcs: list[int], seq: int, tag: int, op: str) -> tuple[int, bytes]:
        folder = f"{self.base}msg/{seq}/{tag}/"
        wanted = {f"{folder}{src}-{self.rank}": src for src in srcs}
        deadline = Deadline(self.io_timeout_s)
        while True:
            ready = [key for key in self.store.list(folder) if key in wanted]
            if ready:
                key = min(ready, key=wanted.__getitem__)
                data = self.store.get(key)
                self.store.delete(key)
                return wanted[key], data
            if deadline.expired():
                raise self.timeout_error(op, sorted(srcs), deadline.seconds, f"objects under {self.store.uri}/{folder}")
            self._wait(deadline)

    def publish(self, seq: int, tag: int, data: bytes, op: str) -> None:
        self.store.put(f"{self.base}pub/{seq}/{tag}/{self.rank}", data)

    def read_published(self, src: int, seq: int, tag: int, op: str) -> bytes:
        return self._poll_get(f"{self.base}pub/{seq}/{tag}/{src}", src, op)

    def barrier(self, seq: int, op: str) -> None:
        folder = f"{self.base}barrier/{seq}/"
        self.store.put(f"{folder}{self.rank}", b"")
        deadline = Deadline(self.io_timeout_s)
        while True:
            arrived = {int(key.rsplit("/", 1)[1]) for key in self.store.list(folder)}
            if len(arrived) >= self.world_size:
                return
            if deadline.expired():
                missing = sorted(set(range(self.world_size)) - arrived)
                raise self.timeout_error(op, missing, deadline.seconds, f"{len(arrived)} of {self.world_size} arrived")
            self._wait(deadline)

    def close(self) -> None:
        """Mark this peer closed. The peer that finds every marker deletes the job's prefix.

        NOTE: a job whose peer died never collects every marker, so its objects stay
        under the prefix until removed by hand or by a bucket lifecycle rule.
        """
        self.store.put(f"{self.base}closed/{self.rank}", b"")
        closed = self.store.list(f"{self.base}closed/")
        if len(closed) >= self.world_size:
            removed = self.store.delete_prefix(self.base)
            log.info("removed %d objects of communicator %r under %s/%s", removed, self.comm_name, self.store.uri, self.base)
