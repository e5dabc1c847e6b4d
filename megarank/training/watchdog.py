"""Stop a torchrun worker whose agent is gone, without saving anything.

torchrun starts every worker in a session of its own (``start_new_session=True``,
torch/distributed/elastic/multiprocessing/subprocess_handler/subprocess_handler.py:66), so a SIGKILL of
the agent, or of the launcher's process group, does not reach the workers: they would train on as
orphans, write ``latest`` and race the restarted job for the same checkpoint folder.

A daemon thread polls ``os.getppid()`` against the agent's pid (``agent_pid()``: exported by ``megarank launch``,
else the parent recorded when megarank was first imported). When the kernel
re-parents the worker (to init or a subreaper) the agent is gone: the thread kills this worker's own
child processes (the per-save writer processes of megatron's torch_dist writer, which would otherwise
finish their files) and ends the process with ``os._exit`` -- no save, no ``latest``, no Python clean-up
that could write. ``check()`` makes the same test synchronously right before a save, so a save is not
started in the polling gap.

Why polling and not ``prctl(PR_SET_PDEATHSIG)``: the death signal fires when the parent *thread* that
forked us exits (prctl(2)), not the agent process; it is also only delivered as a signal, and a Python
handler runs in the main thread between bytecodes -- never while that thread waits in a collective or a
long kernel, which is exactly where a rank sits when its peers stop. A SIGKILL death signal would end the
worker at once but leave its writer processes running. The thread acts whatever the main thread is doing,
and one ``getppid`` every 0.1 s costs nothing.

Only torchrun workers are watched (``TORCHELASTIC_RUN_ID`` in the environment, set by the agent for its
workers): a single process started from a shell may legitimately outlive that shell (``nohup``). The
parent must be the agent itself: a wrapper between them (``torchrun --no-python sh wrapper.sh`` that does
not ``exec``) hides the agent's death. Ranks on other nodes, whose agents live on, see only peers that
stopped: they wait in their next collective until the process-group timeout (parallel/init.py).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Optional

POLL_SECONDS = 0.1
EXIT_CODE = 1


class AgentWatchdog:
    """Watches the parent (torchrun agent) of this worker; ends the process when it disappears."""

    def __init__(self, agent_pid: int, rank: str, poll_seconds: float = POLL_SECONDS):
        self.agent_pid = agent_pid
        self.rank = rank
        self.poll_seconds = poll_seconds
        self._thread = threading.Thread(target=self._watch, name="megarank-agent-watchdog", daemon=True)
        self._stopping = threading.Lock()  # the thread and check() may both see it: one of them ends the process

    def agent_gone(self) -> bool:
        return os.getppid() != self.agent_pid

    def check(self) -> None:
        """Stop here, without saving, if the agent is gone (call right before writing a checkpoint)."""
        if self.agent_gone():
            self._stop_now()

    def _watch(self) -> None:
        while True:
            if self.agent_gone():
                self._stop_now()
            time.sleep(self.poll_seconds)

    def _stop_now(self) -> None:
        self._stopping.acquire()  # a second caller waits here until the first one's os._exit
        try:
            # One write with its newline: every rank prints this at once to the same stream (see cli/main.py).
            print(f"megarank train: rank {self.rank}: the torchrun agent (pid {self.agent_pid}) is gone; stopping "
                  "without saving (the checkpoint folder keeps its last complete step)\n", end="", file=sys.stderr,
                  flush=True)
        except Exception:  # noqa: BLE001 -- the console may have gone with the agent; stopping matters more
            pass
        kill_child_processes()
        os._exit(EXIT_CODE)


_watchdog: Optional[AgentWatchdog] = None
AGENT_PID_ENV = "MEGARANK_AGENT_PID"  # set by `megarank launch` (cli/launch.py run_agent) for its workers


def agent_pid() -> int:
    """The torchrun agent's pid: what `megarank launch` exported (its own pid: it runs the agent in-process), else
    this process's parent when megarank was first imported (megarank/__init__.py, before torch and megatron-core:
    recording it here, after those imports, would miss an agent killed during the ~15 s they take -- the worker
    would already be re-parented, and its new parent taken for the agent).

    What no worker can see under plain torchrun: an agent killed in the ~0.1 s between forking a worker and that
    worker's interpreter reaching ``import megarank``. torchrun exports nothing naming the agent, and the kernel keeps
    no record of the original parent, so such a worker takes its new parent for the agent and trains on as an orphan.
    ``megarank launch`` has no such window (it exports its own pid before it forks)."""
    import megarank

    value = os.environ.get(AGENT_PID_ENV, "")
    return int(value) if value.isdigit() else megarank._PARENT_PID_AT_START


def start_agent_watchdog() -> Optional[AgentWatchdog]:
    """Start the process-wide watchdog if this process is a torchrun worker (idempotent); None otherwise. An agent
    that died before this call is noticed by the thread's first poll."""
    global _watchdog
    if _watchdog is None and "TORCHELASTIC_RUN_ID" in os.environ:
        _watchdog = AgentWatchdog(agent_pid(), os.environ.get("RANK", "?"))
        _watchdog._thread.start()
    return _watchdog


def stop_if_agent_gone() -> None:
    """If this torchrun worker's agent is gone, end the process now, without saving."""
    if _watchdog is not None:
        _watchdog.check()


def kill_child_processes() -> None:
    """SIGKILL this process's multiprocessing children (the per-save checkpoint writers, if a save is under way)
    before an ``os._exit``, so none outlives the worker."""
    try:
        children = multiprocessing.active_children()
    except Exception:  # noqa: BLE001 -- the main thread may be changing that set right now
        children = []
    for child in children:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass
