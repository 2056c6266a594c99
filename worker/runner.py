"""The worker loop, the same in both modes: claim a job, run it in a child process, look after it.

While the child trains, the runner heartbeats the job's claim every `heartbeat_s`; a worker that
stops heartbeating (killed, frozen, cut off) loses the job to the next idle worker after the
store's lease. If the runner learns it lost the claim, it kills the child before it can publish.

SIGTERM (or Ctrl-C): the child is asked to stop (SIGTERM), its last epoch state stays on disk,
and the job is handed back to the queue, where the next free worker resumes it. A second
signal, or a child that does not stop within `grace_s`, is killed; the job is handed back all
the same. Nothing the runner does needs torch: the child imports it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

from jobs.errors import StoreUnavailable
from jobs.files import remove_job_files
from jobs.records import MAX_ATTEMPTS, Claim, JobRecord, worker_name
from jobs.retry import until_available
from jobs.store import JobStore
from worker.errors import EXIT_FINISHED, EXIT_HANDED_BACK, EXIT_PARENT_GONE, describe_exit

log = logging.getLogger(__name__)

T = TypeVar("T")


def default_threads() -> int:
    """Half the cores for training, so a same-machine API keeps the rest."""
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass
class RunnerConfig:
    threads: int = 0  # 0 = default_threads()
    nice: int = 10  # added to the training process's niceness
    heartbeat_s: float = 5.0  # well under the store's lease
    poll_s: float = 2.0  # how long one claim waits for a job
    grace_s: float = 30.0  # how long a stopping child may take before it is killed
    native: bool = True  # training through textgen's LSTM kernel when built (TEXTGEN_NATIVE)


class Runner:
    def __init__(
        self,
        store: JobStore,
        config: RunnerConfig | None = None,
        *,
        name: str | None = None,
        should_exit: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.config = config or RunnerConfig()
        self.name = name or worker_name()
        self.should_exit = should_exit  # e.g. "the API that started this local worker is gone"
        self.stopping = False
        self.signals = 0

    # -- signals

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if not self.stopping:
            log.info("worker %s: %s received; stopping after handing back the current job", self.name, signum)
        self.stopping = True

    def _check_exit(self) -> bool:
        if not self.stopping and self.should_exit is not None and self.should_exit():
            log.info("worker %s: exiting (its parent is gone)", self.name)
            self.stopping = True
        return self.stopping

    # -- the loop

    def run(self, burst: bool = False) -> int:
        """Take jobs until stopped (or, with `burst`, until the queue is empty)."""
        log.info("worker %s: waiting for jobs (%d training threads)", self.name, self.threads)
        while not self._check_exit():
            try:
                claim = until_available(
                    lambda: self.store.claim(self.name, self.config.poll_s), give_up=self._check_exit, who=self.who
                )
            except StoreUnavailable:
                break  # told to stop while the store was unreachable
            if claim is None:
                if burst:
                    break
                continue
            self.process(claim)
        self.store.release(self.name)
        log.info("worker %s: stopped", self.name)
        return 0

    @property
    def threads(self) -> int:
        return self.config.threads or default_threads()

    @property
    def who(self) -> str:
        return f"worker {self.name}"

    def process(self, claim: Claim) -> None:
        """Run one claimed job to its end, or hand it back."""
        record = self._until_stored(lambda: self.store.start(claim))
        if record is None:
            log.info("worker %s: job %s ended before it started", self.name, claim.job_id)
            return
        if self.stopping:
            self._hand_back(claim, "the worker was stopping")
            return
        if record.cancel_requested:
            self._finish(claim, "cancelled")
            return
        if record.attempts > MAX_ATTEMPTS:
            error = f"the job was started {MAX_ATTEMPTS} times and its worker died each time; {_DIED_ADVICE}"
            self._finish(claim, "failed", error=error)
            return
        log.info("worker %s: job %s (attempt %d)", self.name, claim.job_id, record.attempts)
        self._until_stored(lambda: self.store.append_event(claim.job_id, "started", self._started_data(record)))
        code = self.supervise(claim, self.spawn(claim))
        self.settle(claim, code)

    def _started_data(self, record: JobRecord) -> dict[str, Any]:
        return {"state": "running", "worker": self.name, "attempt": record.attempts}

    def spawn(self, claim: Claim) -> subprocess.Popen[bytes]:
        spec = {
            "claim": {"job_id": claim.job_id, "token": claim.token, "worker": claim.worker},
            "store": self.store.spec(),
            "parent_pid": os.getpid(),
            "threads": self.threads,
            "nice": self.config.nice,
            "native": self.config.native,
        }
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(self.threads)
        return subprocess.Popen(
            [sys.executable, "-m", "worker.job", json.dumps(spec)], env=env, stdin=subprocess.DEVNULL
        )

    def supervise(self, claim: Claim, proc: subprocess.Popen[bytes]) -> int | None:
        """Wait for the child while heartbeating; None when the claim was lost (the child is killed)."""
        next_beat = time.monotonic() + self.config.heartbeat_s
        asked_to_stop: float | None = None
        while True:
            try:
                return proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if self._check_exit() and asked_to_stop is None:
                proc.send_signal(signal.SIGTERM)
                asked_to_stop = now
            if asked_to_stop is not None and (self.signals > 1 or now - asked_to_stop > self.config.grace_s):
                log.warning("worker %s: job %s did not stop in time; killing it", self.name, claim.job_id)
                proc.kill()
            if now >= next_beat:
                next_beat = now + self.config.heartbeat_s
                if not self._heartbeat(claim):
                    return self._claim_lost(claim, proc)

    def _claim_lost(self, claim: Claim, proc: subprocess.Popen[bytes]) -> int | None:
        """The job ended (the child is exiting) or another worker took it over (kill the child)."""
        try:
            return proc.wait(timeout=2.0)  # the child recorded the outcome and is on its way out
        except subprocess.TimeoutExpired:
            log.warning("worker %s: another worker took job %s over; stopping it", self.name, claim.job_id)
            proc.kill()
            proc.wait()
            return None

    def _heartbeat(self, claim: Claim) -> bool:
        try:
            return self.store.heartbeat(claim)
        except StoreUnavailable as e:
            log.warning("worker %s: heartbeat of job %s failed: %s", self.name, claim.job_id, e)
            return True  # keep training; the claim is checked again when the store is back

    def settle(self, claim: Claim, code: int | None) -> None:
        """After the child ended: hand the job back, or record why it died."""
        if code is None or code == EXIT_FINISHED:
            return
        if code in (EXIT_HANDED_BACK, EXIT_PARENT_GONE) or (self.stopping and code < 0):
            self._hand_back(claim, "the worker was stopped; the job will resume")
            return
        self._finish(claim, "failed", error=describe_exit(code))

    def _hand_back(self, claim: Claim, reason: str) -> None:
        """Requeue the job, and log what the store did: it refuses a job that ended or that another worker holds."""
        if self._until_stored(lambda: self.store.hand_back(claim, reason)):
            log.info("worker %s: handed job %s back to the queue", self.name, claim.job_id)
        else:
            log.info("worker %s: job %s was not handed back: %s", self.name, claim.job_id, self._why_refused(claim))

    def _finish(self, claim: Claim, state: str, error: str | None = None) -> None:
        if self._until_stored(lambda: self.store.finish(claim, state, error=error)):
            remove_job_files(self.store.models_dir, claim.job_id)
            log.info("worker %s: job %s %s%s", self.name, claim.job_id, state, f": {error}" if error else "")
        else:
            log.info(
                "worker %s: job %s was not marked %s: %s", self.name, claim.job_id, state, self._why_refused(claim)
            )

    def _why_refused(self, claim: Claim) -> str:
        """Why the store refused to change a job: it had ended, or another worker took it over (a lost claim)."""
        record = self._until_stored(lambda: self.store.get(claim.job_id))
        return f"it had already {record.state}" if record.final else f"it is {record.state}, worker {record.worker}"

    def _until_stored(self, action: Callable[[], T]) -> T:
        """A store call that must happen (the job would be stuck otherwise): wait out an outage."""
        return until_available(action, who=self.who)


_DIED_ADVICE = "it may need more memory than the machine has; lower batch_size, hidden_dim or layers"
