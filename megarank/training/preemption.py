"""Save-and-exit requests: SIGTERM / SIGUSR1 (SLURM preemption, time limits) or a `.save_and_exit` file.

A request is only acted on at a step boundary, after every rank agreed on it (MAX all-reduce), so all
ranks save the same step and exit together.
"""
import signal
from pathlib import Path
from typing import Optional

from megarank.parallel.init import any_rank

STOP_FILE = ".save_and_exit"


class PreemptionWatcher:
    def __init__(self, run_dir: Optional[str]):
        self.requested = False
        self.stop_file = Path(run_dir) / STOP_FILE if run_dir else None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank got a signal or the stop file exists."""
        return any_rank(self.requested or (self.stop_file is not None and self.stop_file.exists()))

    def clear(self) -> None:
        """Remove the stop file after the save it asked for (so the requeued job runs on)."""
        if self.stop_file is not None and self.stop_file.exists():
            self.stop_file.unlink(missing_ok=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
