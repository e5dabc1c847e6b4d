"""Save-and-exit requests: SIGTERM / SIGUSR1 (SLURM preemption, time limits, scancel), Ctrl-C (SIGINT) or a
`.save_and_exit` file.

A request is only acted on at a step boundary, after every rank agreed on it (MAX all-reduce), so all
ranks save the same step and exit together. SIGTERM, SIGUSR1 and the stop file end the run normally (exit 0,
``preempted: saved step N``: the SLURM script requeues on that). Ctrl-C ends it with ``TrainingInterrupted``:
one line on the logging rank (``interrupted: saved step N to <folder>; run the same command to resume``) and
exit code 130, as a shell expects of an interrupted command. A second Ctrl-C aborts at once: one line, the
per-save writer processes killed, ``os._exit(130)``; nothing half-written is ever read back (a step folder is
published by an atomic rename of ``latest`` after every file is in place, megarank/checkpoint/run_folder.py).

How SIGTERM gets here: torchrun's agent forwards it with ``os.killpg`` to each worker's process group
(torch/distributed/elastic/multiprocessing/subprocess_handler/subprocess_handler.py:85) and waits
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30, torch/distributed/launcher/api.py:146-148) before
SIGKILL; SLURM sends it to every process of the job's steps and waits KillWait (default 30 s). Every process
in the group must survive it until the save is done: megatron's torch_dist writer therefore keeps no helper
process (megarank/checkpoint/writer.py), and the per-save writer processes it forks inherit this handler.
SIGUSR1 reaches the workers only when torchrun is told to forward it (``--signals-to-handle``); the SLURM
script uses the stop file instead.

How Ctrl-C gets here: in a terminal it reaches the foreground process group, i.e. a one-process trainer (and
its forked writer processes, which inherit this handler and ignore it). torchrun starts every worker in a
session of its own, so under torchrun only the agent gets it; the agent forwards SIGINT itself, the same way
as SIGTERM (torch/distributed/elastic/agent/server/api.py:752-756, ``SignalException``), and waits the same
grace period. A second Ctrl-C makes a plain torchrun agent send SIGTERM (its ``finally``: ``_shutdown()``),
which a worker that is already saving treats as the request it is already carrying out; ``megarank launch``
runs the agent itself and SIGKILLs the workers instead (megarank/cli/launch.py).

What a plain ``torchrun ... -m megarank train`` (not ``megarank launch``) still prints on Ctrl-C, from its own
agent process, which megarank does not run: two or more ``W... Received 2 death signal, shutting down workers`` /
``Sending process N closing signal SIGINT`` log lines, and after the workers' save and their one line the
agent's ``SignalException`` traceback (about 25 lines; two chained ones after a second Ctrl-C), exit code 1.

A torchrun worker whose agent died (SIGKILL) must not save at all: ``should_stop`` ends such a process
before any save can start (megarank/training/watchdog.py).
"""
import os
import signal
import sys
from pathlib import Path
from typing import Optional

from megarank.parallel.init import any_rank
from megarank.training.watchdog import kill_child_processes, start_agent_watchdog, stop_if_agent_gone

STOP_FILE = ".save_and_exit"
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C ended the run at a step boundary (after the save). ``message`` is the one line to print (None on
    ranks that do not report); ``megarank train`` prints it and exits ``exit_code``."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: Optional[str]):
        super().__init__(message or "")
        self.message = message
        self.stream = sys.stdout  # the last line of the training log, in order with it


def interrupted_message(step: int, saved: Optional[Path]) -> str:
    if saved is None:
        return f"interrupted at step {step}; nothing saved (checkpoint.dir is not set)"
    return f"interrupted: saved step {step} to {saved}; run the same command to resume"


class PreemptionWatcher:
    def __init__(self, run_dir: Optional[str], reports: bool = True):
        """``reports``: this rank prints the Ctrl-C lines (the logging rank)."""
        self.requested = False
        self.interrupts = 0  # Ctrl-Cs received by this process
        self.interrupted = False  # set by should_stop: some rank got Ctrl-C (all ranks agree)
        self.run_dir = run_dir
        self.reports = reports
        self.stop_file = Path(run_dir) / STOP_FILE if run_dir else None
        self._pid = os.getpid()  # forked writer processes inherit the handler; only this process acts on it
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handler)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        start_agent_watchdog()  # idempotent; the trainer may have started it earlier

    def _handler(self, signum, frame) -> None:
        # also a SIGTERM that a plain torchrun agent sends after a second Ctrl-C: the save it asks for is under way
        self.requested = True

    def _interrupt(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked writer process: the trainer decides (and kills it on abort)
            return
        self.interrupts += 1
        if self.interrupts == 1:
            self.requested = True
            return
        self._abort()

    def _abort(self) -> None:
        """Second Ctrl-C: stop now, without saving (os._exit: no clean-up that could wait on a peer or a disk)."""
        where = f" ({self.run_dir} keeps its last complete step)" if self.run_dir else ""
        if self.reports:
            line = f"megarank train: interrupted again: stopped at once, without saving{where}\n"
            try:  # os.write: a signal handler must not re-enter a buffered stream that the main thread was writing
                sys.stdout.flush()
            except Exception:  # noqa: BLE001
                pass
            try:
                os.write(2, line.encode())
            except OSError:
                pass
        kill_child_processes()  # the per-save writer processes, if a save is under way
        os._exit(EXIT_INTERRUPTED)

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank got a signal or the stop file exists (then ``interrupted``
        says, the same on every rank, whether any rank's request was a Ctrl-C).

        Called right before the step's saves: a worker whose torchrun agent is gone ends here instead."""
        stop = any_rank(self.requested or (self.stop_file is not None and self.stop_file.exists()))
        stop_if_agent_gone()
        if stop:
            self.interrupted = any_rank(self.interrupts > 0)
        return stop

    def interruption(self, step: int, saved: Optional[Path]) -> TrainingInterrupted:
        """The exception that ends a run stopped by Ctrl-C (raise it after the loop's clean-up); its line is
        printed by the reporting rank only."""
        return TrainingInterrupted(interrupted_message(step, saved) if self.reports else None)

    def clear(self) -> None:
        """Remove the stop file after the save it asked for (so the requeued job runs on)."""
        if self.stop_file is not None and self.stop_file.exists():
            self.stop_file.unlink(missing_ok=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
