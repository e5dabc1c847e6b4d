"""Step N+1's groups and micro-batches built on a worker thread while step N trains.

Reading, parsing and tokenizing a step's groups and building its micro-batches (megarank/data/batcher.py) is CPU
work the step would otherwise wait for. `BatchPrefetcher` does it one step ahead on one background thread (the
fast tokenizers and torch release the GIL for their heavy parts; groups files read through an index only
``pread`` and parse the drawn records) and the loop takes the result, measuring how long it waited (``data_wait``
in the step log line and TensorBoard).

It changes nothing the run computes: the worker draws from its own copy of the sampler, which is the run's sampler
(restored from a checkpoint, if any) one step ahead, and the run's sampler is moved to the position after a step
only when that step is handed to the loop, so a checkpoint saves the position of the last step trained, not of the
one prefetched (the epoch's shuffle is computed on the worker, not in the step). An error in the worker (a bad record found when it
is parsed) is raised in the main thread by `next`, unchanged. `pause` waits for the worker to be idle (evaluation
tokenizes with the same tokenizer); `close` (always called, also on SIGTERM / Ctrl-C ending the loop) drops the
prefetched step and stops the thread.
"""
from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional


class BatchPrefetcher:
    """``next() -> (groups, micro_batches, seconds waited)`` for each step, built one step ahead.

    ``source.get(index, epoch)`` gives a group, ``sampler`` (a `GroupSampler`, already restored) gives each step's
    ``[(index, epoch), ...]`` and is advanced here once per ``next``; ``micro_batches(groups)`` builds the step's
    micro-batches; ``steps_left``: how many steps will be taken (nothing is prefetched past the last one).
    ``enabled=False`` builds each step when it is asked for (the synchronous path)."""

    def __init__(self, source, sampler, micro_batches: Callable[[list], list], steps_left: int, enabled: bool = True):
        self.source = source
        self.sampler = sampler
        self.micro_batches = micro_batches
        self.steps_left = steps_left
        self.ahead = copy.copy(sampler)  # the worker's sampler: the same position, drawn one step early
        self.executor: Optional[ThreadPoolExecutor] = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="megarank-batches") if enabled else None)
        self.pending: Optional[Future] = None
        if self.executor is not None and steps_left > 0:
            self.pending = self.executor.submit(self._build)

    def _build(self) -> tuple[dict, list, list]:
        batch = next(self.ahead)
        position = self.ahead.state_dict()  # where the run's sampler is once this step is handed out
        groups = [self.source.get(i, epoch) for i, epoch in batch]
        return position, groups, self.micro_batches(groups)

    def next(self) -> tuple[list, list, float]:
        """This step's groups and micro-batches, and the seconds this call waited for them."""
        tic = time.perf_counter()
        if self.pending is None:
            position, groups, micro = self._build()
        else:
            pending, self.pending = self.pending, None
            position, groups, micro = pending.result()  # the worker's exception, if any, is raised here
        waited = time.perf_counter() - tic
        self.sampler.load_state_dict(position)  # the run's sampler moves one step (not re-shuffled here)
        self.steps_left -= 1
        if self.executor is not None and self.steps_left > 0:
            self.pending = self.executor.submit(self._build)
        return groups, micro, waited

    def pause(self) -> None:
        """Wait until the worker is idle (its step stays prefetched); errors wait for `next`."""
        if self.pending is not None:
            self.pending.exception()

    def close(self) -> None:
        """Stop the worker; a step it was building is waited for and dropped."""
        if self.executor is not None:
            if self.pending is not None:
                self.pending.cancel()
                self.pending = None
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
