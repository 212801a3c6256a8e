"""Local fan-out: the Lambda handlers run in worker processes on this machine.

The driver runs the initializer in-process, then starts one worker process per rank
(``python -m cai_helpers.handlers.executor``), all at once because the world size is
already capped at max_concurrency, and each with ``threads`` CPU threads (cores //
world size, at least 1). A rank that exits non-zero, is killed, or finishes no
partition for ``rank_timeout_s`` seconds is retried up to ``max_retries`` times. The
timeout restarts at each finished partition, because a local rank may hold many more
partitions than one Lambda could process in its 900 s. A retried rank skips the
partitions it already wrote. Like a Distributed Map's ToleratedFailurePercentage, the
run fails only when more than ``tolerated_failure_percentage`` percent of partitions
end without predictions. The summarizer then runs in-process.

Unless ``RunParams.fmi`` is ``"off"`` or a configuration, the driver runs an FMI
rendezvous server for the duration of the run (:mod:`cai_helpers.local_fmi`), so the
ranks allreduce their run figures over the direct TCP channel. All ranks of a run share
one communicator name, derived from the run id and not from the attempt, because a
retried rank must meet the other ranks' first attempts. A dead attempt leaves nothing
behind for the new one to collide with: the direct channel keeps no messages outside
live connections, and the server replaces a rank's waiting request with its newer one.
An attempt started after another rank's process has ended skips the allreduce, since
the communicator can no longer form. After a rank has failed for good, the driver stops
the server, so ranks waiting to pair give up at once instead of at their timeout.

Ctrl-C (SIGINT) in the driver terminates the workers (SIGTERM, then SIGKILL after
``STOP_GRACE_S``); rerunning with the same run_id resumes. Worker logs go to
``runs/logs/<run_id>/rank-NNNNN.attempt-N.log``; the progress bar lives in the driver.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cai_helpers.errors import ToleratedFailureExceededError
from cai_helpers.handlers import initializer, summarizer
from cai_helpers.handlers.executor import PROGRESS_PREFIX
from cai_helpers.local_fmi import LocalRendezvous, uses_local_rendezvous
from cai_helpers.runconfig import RunParams, available_cores

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
STOP_GRACE_S = 5.0  # seconds between SIGTERM and SIGKILL when stopping a worker
LOG_TAIL_LINES = 15
LOG_ROOT = Path("runs") / "logs"
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def threads_per_worker(world_size: int, cores: int | None = None) -> int:
    """Return the CPU threads each of ``world_size`` workers gets: cores // world_size, at least 1."""
    return max(1, (cores or available_cores()) // max(1, world_size))


@dataclass
class _Worker:
    """One attempt of one rank, and the thread that forwards its progress lines."""

    rank: int
    attempt: int
    process: subprocess.Popen
    log_path: Path
    log_file: IO[str]
    last_progress: float = field(default_factory=time.monotonic)
    reader: threading.Thread | None = None


def _forward_progress(worker: _Worker, updates: "queue.Queue[dict[str, Any]]") -> None:
    assert worker.process.stdout is not None
    for line in worker.process.stdout:
        if line.startswith(PROGRESS_PREFIX):
            updates.put(json.loads(line[len(PROGRESS_PREFIX):]))


def _stop(worker: _Worker) -> None:
    """Terminate a worker's process group: SIGTERM, then SIGKILL after STOP_GRACE_S."""
    if worker.process.poll() is not None:
        return
    try:
        os.killpg(worker.process.pid, signal.SIGTERM)
        worker.process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
    except ProcessLookupError:
        pass


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-LOG_TAIL_LINES:])


class LocalFanOut:
    """Runs the rank items of one initialized run in worker processes."""

    def __init__(
        self, params: RunParams, init: dict[str, Any], *, progress: bool = True,
        rendezvous: LocalRendezvous | None = None,
    ) -> None:
        self.params = params
        self.rendezvous = rendezvous
        # ranks whose last process ended for good (finished, or failed after its retries)
        self.ended: set[int] = set()
        self.init = init
        self.run_id = init["run_id"]
        self.threads = params.threads_per_worker or threads_per_worker(init["world_size"])
        self.log_dir = LOG_ROOT / self.run_id
        self.updates: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self.attempts = {item["rank"]: 0 for item in init["items"]}
        self.finished: set[str] = set()
        self.failed_ranks: dict[int, str] = {}
        self.progress = progress

    def _start(self, item: dict[str, Any]) -> _Worker:
        rank = item["rank"]
        attempt = self.attempts[rank]
        event = {**item, "threads": self.threads, "attempt": attempt}
        env = {**os.environ, **{name: str(self.threads) for name in THREAD_ENV_VARS}}
        self._add_fmi(event, env)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"rank-{rank:05d}.attempt-{attempt}.log"
        log_file = open(log_path, "w", encoding="utf-8")
        process = subprocess.Popen(
            [sys.executable, "-m", "cai_helpers.handlers.executor", json.dumps(event)],
            stdout=subprocess.PIPE, stderr=log_file, text=True, env=env,
            start_new_session=True,  # Ctrl-C reaches the driver only; it stops the workers
        )
        worker = _Worker(rank, attempt, process, log_path, log_file)
        worker.reader = threading.Thread(target=_forward_progress, args=(worker, self.updates), daemon=True)
        worker.reader.start()
        return worker

    def _add_fmi(self, event: dict[str, Any], env: dict[str, str]) -> None:
        """Give a rank attempt its FMI settings: the local server's address and token, or a reason to skip."""
        uses_fmi = self.rendezvous is not None or isinstance(self.params.fmi, dict)
        if not uses_fmi:
            return
        if self.ended:
            event["fmi"] = "off"
            event["fmi_skip_reason"] = (
                f"rank(s) {sorted(self.ended)} had ended before attempt {event['attempt']} of rank "
                f"{event['rank']} started, so the communicator could not form")
            return
        if self.rendezvous is not None:
            event["fmi"] = self.rendezvous.event_config()
            env.update(self.rendezvous.worker_env())

    def _drain(self, bar: Any, running: dict[int, tuple[_Worker, dict[str, Any]]]) -> None:
        while True:
            try:
                update = self.updates.get_nowait()
            except queue.Empty:
                return
            if update.get("rank") in running:
                running[update["rank"]][0].last_progress = time.monotonic()
            if update.get("status") in ("done", "skipped") and update["partition"] not in self.finished:
                self.finished.add(update["partition"])
                bar.update(1)

    def _finish(self, worker: _Worker, reason: str | None, pending: list[dict[str, Any]], item: dict[str, Any]) -> None:
        if worker.reader is not None:
            worker.reader.join(timeout=STOP_GRACE_S)
        worker.log_file.close()
        if reason is None:
            self.ended.add(worker.rank)
            return
        self.attempts[worker.rank] += 1
        if self.attempts[worker.rank] <= self.params.max_retries:
            log.warning("run %s rank %d attempt %d %s; retrying (%d of %d). Log tail:\n%s",
                        self.run_id, worker.rank, worker.attempt, reason, self.attempts[worker.rank],
                        self.params.max_retries, _log_tail(worker.log_path))
            pending.append(item)
        else:
            log.error("run %s rank %d %s after %d attempts; its unwritten partitions count as failed. "
                      "Log %s ends:\n%s", self.run_id, worker.rank, reason, worker.attempt + 1,
                      worker.log_path, _log_tail(worker.log_path))
            self.failed_ranks[worker.rank] = reason
            self.ended.add(worker.rank)
            if self.rendezvous is not None:
                # the allreduce cannot complete now, so let waiting ranks fail at once
                self.rendezvous.stop()

    def run(self) -> None:
        """Run every rank to success or until its retries are spent."""
        from tqdm.auto import tqdm

        pending = list(self.init["items"])
        running: dict[int, tuple[_Worker, dict[str, Any]]] = {}
        bar = tqdm(total=self.init["n_partitions"], desc=f"run {self.run_id}", unit="partition",
                   disable=not self.progress)
        try:
            while pending or running:
                while pending:
                    item = pending.pop(0)
                    running[item["rank"]] = (self._start(item), item)
                time.sleep(POLL_INTERVAL_S)
                self._drain(bar, running)
                for rank, (worker, item) in list(running.items()):
                    code = worker.process.poll()
                    timed_out = code is None and time.monotonic() - worker.last_progress > self.params.rank_timeout_s
                    if code is None and not timed_out:
                        continue
                    if timed_out:
                        _stop(worker)
                        reason = f"timed out: no partition finished within {self.params.rank_timeout_s} s"
                    else:
                        reason = None if code == 0 else f"exited with code {code}"
                    del running[rank]
                    self._finish(worker, reason, pending, item)
            self._drain(bar, running)
        except KeyboardInterrupt:
            log.warning("run %s interrupted; stopping %d worker(s). Rerun with run_id=%r to resume.",
                        self.run_id, len(running), self.run_id)
            for worker, _ in running.values():
                _stop(worker)
                worker.log_file.close()
            raise
        finally:
            bar.close()


def run_local(params: RunParams, *, progress: bool = True) -> dict[str, Any]:
    """Run ``params`` on local worker processes; return the run summary.

    Raises ToleratedFailureExceededError (after writing the summary) when more
    partitions failed than ``params.tolerated_failure_percentage`` allows.
    """
    params.validate()
    run_started = time.time()
    init = initializer.initialize(params)
    rendezvous = LocalRendezvous(init["run_id"]) if uses_local_rendezvous(params) else None
    fan_out = LocalFanOut(params, init, progress=progress, rendezvous=rendezvous)
    log.info("run %s: %d partitions, %d worker process(es) with %d thread(s) each",
             init["run_id"], init["n_partitions"], init["world_size"], fan_out.threads)

    map_started = time.time()
    if rendezvous is not None:
        rendezvous.start()
    try:
        fan_out.run()
    finally:
        if rendezvous is not None:
            rendezvous.stop()
    map_finished = time.time()

    summary = summarizer.summarize({
        "run_id": init["run_id"], "store": params.store, "endpoint_url": params.endpoint_url,
        "backend": "local", "map_started_at": map_started, "map_finished_at": map_finished,
        "attempts": sum(fan_out.attempts.values()) + len(fan_out.attempts) - len(fan_out.failed_ranks),
        "run_started_at": run_started,
    })
    if summary["status"] != "succeeded":
        error = ToleratedFailureExceededError(
            f"run {init['run_id']}: {len(summary['failed_partitions'])} of {summary['n_partitions']} partitions "
            f"failed ({summary['failed_percentage']:.1f}% > tolerated {params.tolerated_failure_percentage}%); "
            f"see failed_partitions in {summary['summary_key']} and the logs in {fan_out.log_dir}, "
            f"then rerun with run_id={init['run_id']!r} to retry only the failed partitions"
        )
        error.summary = summary  # type: ignore[attr-defined]
        raise error
    return summary
