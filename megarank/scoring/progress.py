"""Progress of a long scoring job: pairs done, pairs/s and ETA, logged on one rank every few seconds."""
from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator

log = logging.getLogger("megarank.scoring")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class ScoringProgress:
    """Counts the pairs of ``(pairs, batch)`` items as they go by and logs ``scored N/T pairs (x%) | r pairs/s | ETA``
    every ``interval`` seconds when ``enabled`` (the rank that reports). ``total`` is every pair of the job, ``done``
    those finished before this process started (a resumed job), which count toward the total but not the rate."""

    def __init__(self, total: int, *, done: int = 0, enabled: bool = True, interval: float = 10.0, what: str = "pairs"):
        self.total, self.done, self.enabled, self.interval, self.what = total, done, enabled, interval, what
        self.start = self.last = time.monotonic()
        self.scored = 0  # by this process

    def track(self, items: Iterable) -> Iterator:
        """Yield ``items`` unchanged, counting ``len(item[0])`` pairs each and reporting as time passes."""
        for item in items:
            yield item
            self.add(len(item[0]))

    def add(self, pairs: int) -> None:
        self.scored += pairs
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            log.info("%s", self.line())

    @property
    def rate(self) -> float:
        return self.scored / max(time.monotonic() - self.start, 1e-9)

    def line(self) -> str:
        finished = self.done + self.scored
        percent = 100.0 * finished / self.total if self.total else 100.0
        rate = self.rate
        eta = _duration((self.total - finished) / rate) if rate > 0 else "?"
        return f"scored {finished:,}/{self.total:,} {self.what} ({percent:.1f}%) | {rate:,.1f} {self.what}/s | ETA {eta}"

    def finish(self) -> None:
        """Log the final count and rate (always, when enabled)."""
        if self.enabled:
            elapsed = time.monotonic() - self.start
            log.info("scored %s %s in %s (%.1f %s/s)%s", f"{self.scored:,}", self.what, _duration(elapsed), self.rate,
                     self.what, f"; {self.done:,} were already scored" if self.done else "")
