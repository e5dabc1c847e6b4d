"""Save-and-exit requests: SIGTERM / SIGUSR1 (SLURM preemption, time limits, scancel) or a `.save_and_exit` file.

A request is only acted on at a step boundary, after every rank agreed on it (MAX all-reduce), so all
ranks save the same step and exit together.

How SIGTERM gets here: torchrun's agent forwards it with ``os.killpg`` to each worker's process group
(torch/distributed/elastic/multiprocessing/subprocess_handler/subprocess_handler.py:85) and waits
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30, torch/distributed/launcher/api.py:146-148) before
SIGKILL; SLURM sends it to every process of the job's steps and waits KillWait (default 30 s). Every process
in the group must survive it until the save is done: megatron's torch_dist writer therefore keeps no helper
process (megarank/checkpoint/writer.py), and the per-save writer processes it forks inherit this handler.
SIGUSR1 reaches the workers only when torchrun is told to forward it (``--signals-to-handle``); the SLURM
script uses the stop file instead.

A torchrun worker whose agent died (SIGKILL) must not save at all: ``should_stop`` ends such a process
before any save can start (megarank/training/watchdog.py).
"""
import signal
from pathlib import Path
from typing import Optional

from megarank.parallel.init import any_rank
from megarank.training.watchdog import start_agent_watchdog, stop_if_agent_gone

STOP_FILE = ".save_and_exit"


class PreemptionWatcher:
    def __init__(self, run_dir: Optional[str]):
        self.requested = False
        self.stop_file = Path(run_dir) / STOP_FILE if run_dir else None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handler)
        start_agent_watchdog()  # idempotent; the trainer may have started it earlier

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank got a signal or the stop file exists.

        Called right before the step's saves: a worker whose torchrun agent is gone ends here instead."""
        stop = any_rank(self.requested or (self.stop_file is not None and self.stop_file.exists()))
        stop_if_agent_gone()
        return stop

    def clear(self) -> None:
        """Remove the stop file after the save it asked for (so the requeued job runs on)."""
        if self.stop_file is not None and self.stop_file.exists():
            self.stop_file.unlink(missing_ok=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
