"""The local backend's own FMI rendezvous server, started for the duration of one run.

When a local run's ``RunParams.fmi`` is None, the driver starts a
:class:`~cai_helpers.fmi.rendezvous.RendezvousServer` on 127.0.0.1 (a free port) that
requires a random token, and every executor's event carries a direct-channel
configuration without the token. The token reaches the workers only through their
environment (``CAI_FMI_TOKEN``), never through the event (a command-line argument that
other local users can read), the plan, the rank records, the summary or the logs.

Only the direct channel is configured. A communicator picks one channel per operation
and does not fall back to another channel when that one fails, so an object-store
channel beside it would change which channel the policy picks, not add a fallback.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from cai_helpers.handlers.figures import TOKEN_ENV, comm_name
from cai_helpers.runconfig import RunParams

log = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
TOKEN_BYTES = 32


def uses_local_rendezvous(params: RunParams) -> bool:
    """Return True when a run gets the local backend's own rendezvous server (the default)."""
    return params.backend == "local" and params.fmi is None


class LocalRendezvous:
    """A rendezvous server on loopback with a per-run token, and what the ranks need to use it."""

    def __init__(self, run_id: str) -> None:
        from cai_helpers.fmi.rendezvous import RendezvousServer

        self.run_id = run_id
        self._token = secrets.token_urlsafe(TOKEN_BYTES)
        self._server = RendezvousServer(LOOPBACK_HOST, 0, self._token)
        self.port: int | None = None
        self.running = False

    def start(self) -> None:
        """Start serving on a daemon thread, on a free port that the OS chooses."""
        self.port = self._server.start_in_thread()
        self.running = True
        log.info("run %s: FMI rendezvous server on %s:%d for communicator %s",
                 self.run_id, LOOPBACK_HOST, self.port, comm_name(self.run_id))

    def stop(self) -> None:
        """Stop the server. Ranks still pairing get a rejection at once instead of waiting."""
        if not self.running:
            return
        self._server.stop_thread()
        self.running = False
        log.info("run %s: FMI rendezvous server stopped after %d pairs", self.run_id, self._server.pairs)

    def event_config(self) -> dict[str, Any]:
        """Return the FMI configuration for the executors' events, without the token."""
        if self.port is None:
            raise RuntimeError(f"the rendezvous server of run {self.run_id} was never started; call start() first")
        return {"channels": {"direct": {"host": LOOPBACK_HOST, "port": self.port}}, "pin": "direct"}

    def worker_env(self) -> dict[str, str]:
        """Return the environment variables that give a worker the token."""
        return {TOKEN_ENV: self._token}

    def __repr__(self) -> str:  # never show the token
        return f"LocalRendezvous(run_id={self.run_id!r}, port={self.port})"
