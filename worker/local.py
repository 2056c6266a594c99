"""The embedded mode's worker: `textgen serve` without Redis starts this process next to itself.

    python -m worker.local --models-dir models --parent-pid 1234 [--threads 2] [--no-native]

It takes jobs from the file store under models/jobs/ with the same runner, child processes,
states and events as a Redis worker, and exits (handing its job back) when the API that
started it goes away. Nothing here is Redis, or pretends to be. Its flags carry the API's
settings; they override the TEXTGEN_* environment it inherits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from jobs.settings import JobSettings
from jobs.store import open_backend
from worker.runner import Runner, RunnerConfig

log = logging.getLogger(__name__)


def run(
    settings: JobSettings,
    *,
    parent_pid: int | None = None,
    nice: int = 10,
    poll_s: float = 1.0,
    grace_s: float = 30.0,
) -> int:
    backend = open_backend(settings.models_dir, lease_s=settings.job_lease_s)  # embedded: always the files
    config = RunnerConfig(
        threads=settings.train_threads,
        nice=nice,
        heartbeat_s=max(0.2, settings.job_lease_s / 6),
        poll_s=poll_s,
        grace_s=grace_s,
        native=settings.native,
    )

    def parent_gone() -> bool:
        return parent_pid is not None and os.getppid() != parent_pid

    runner = Runner(backend.store, config, should_exit=parent_gone)
    runner.install_signal_handlers()
    return runner.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.local", description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, help="exit when this process is no longer our parent")
    parser.add_argument("--threads", type=int, help="torch threads per job (0 = half the cores)")
    parser.add_argument("--nice", type=int, default=10, help="niceness added to the training process")
    parser.add_argument("--lease", type=float, help="seconds before a silent job is resumed")
    parser.add_argument("--native", action=argparse.BooleanOptionalAction, help="textgen's training kernel")
    parser.add_argument("--log-level")
    args = parser.parse_args(argv)
    flags = {
        "models_dir": args.models_dir,
        "train_threads": args.threads,
        "job_lease_s": args.lease,
        "native": args.native,
        "log_level": args.log_level,
    }
    settings = JobSettings(**{k: v for k, v in flags.items() if v is not None})
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s worker %(name)s: %(message)s"
    )
    return run(settings, parent_pid=args.parent_pid, nice=args.nice)


if __name__ == "__main__":
    sys.exit(main())
