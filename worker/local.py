"""The embedded mode's worker: `textgen serve` without Redis starts this process next to itself.

    python -m worker.local --models-dir models --parent-pid 1234 [--threads 2]

It takes jobs from the file store under models/jobs/ with the same runner, child processes,
states and events as a Redis worker, and exits (handing its job back) when the API that
started it goes away. Nothing here is Redis, or pretends to be.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lm.job_files import FileStore
from lm.jobs import DEFAULT_LEASE_S
from worker.runner import Runner, RunnerConfig

log = logging.getLogger(__name__)


def run(
    models_dir: Path | str,
    *,
    parent_pid: int | None = None,
    threads: int = 0,
    nice: int = 10,
    lease_s: float = DEFAULT_LEASE_S,
    poll_s: float = 1.0,
    grace_s: float = 30.0,
) -> int:
    store = FileStore(Path(models_dir), lease_s=lease_s)
    config = RunnerConfig(threads=threads, nice=nice, heartbeat_s=max(0.2, lease_s / 6), poll_s=poll_s, grace_s=grace_s)
    parent = parent_pid

    def parent_gone() -> bool:
        return parent is not None and os.getppid() != parent

    runner = Runner(store, config, should_exit=parent_gone)
    runner.install_signal_handlers()
    return runner.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.local", description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, help="exit when this process is no longer our parent")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per job (0 = half the cores)")
    parser.add_argument("--nice", type=int, default=10, help="niceness added to the training process")
    parser.add_argument("--lease", type=float, default=DEFAULT_LEASE_S, help="seconds before a silent job is resumed")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s worker %(name)s: %(message)s")
    return run(args.models_dir, parent_pid=args.parent_pid, threads=args.threads, nice=args.nice, lease_s=args.lease)


if __name__ == "__main__":
    sys.exit(main())
