"""Progress lines (tensors and bytes done) on stderr during a conversion, and the final summary line."""
from __future__ import annotations

import resource
import sys
import time


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """Counts tensors/bytes; prints at most every ``interval`` seconds (and the last one), then a summary."""

    def __init__(self, label: str, total_tensors: int, total_bytes: int, stream=None, interval: float = 2.0, quiet=False):
        self.label, self.total_tensors, self.total_bytes = label, total_tensors, total_bytes
        self.stream = stream if stream is not None else sys.stderr
        self.interval, self.quiet = interval, quiet
        self.tensors = self.bytes = 0
        self.start = self._last = time.perf_counter()

    def update(self, name: str, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if not self.quiet and (now - self._last >= self.interval or self.tensors == self.total_tensors):
            self._last = now
            pct = 100.0 * self.bytes / self.total_bytes if self.total_bytes else 100.0
            print(
                f"[{self.label}] {self.tensors}/{self.total_tensors} tensors, "
                f"{fmt_bytes(self.bytes)}/{fmt_bytes(self.total_bytes)} ({pct:.0f}%) {name}",
                file=self.stream,
                flush=True,
            )

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.start
        return (
            f"{self.label}: {self.tensors} tensors, {fmt_bytes(self.bytes)} in {elapsed:.1f} s, "
            f"peak RSS {fmt_bytes(peak_rss_bytes())}"
        )
