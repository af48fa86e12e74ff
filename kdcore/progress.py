"""A small progress line (rows/s, ETA) for long steps; quiet when not on a terminal unless asked."""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "epoch 1") as p: p.update(n)``; prints to stderr."""

    def __init__(self, total: int, desc: str, unit: str = "rows", enabled: bool = True, every_s: float = 0.5):
        self.total, self.desc, self.unit = max(int(total), 0), desc, unit
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.every_s = every_s if self.tty else max(every_s, 10.0)
        self.done = 0
        self.t0 = time.perf_counter()
        self._last = 0.0
        self.postfix = ""

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.done / dt if dt > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 and self.total else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta_s = f"{eta:5.1f}s" if eta == eta else "  ?  "
        return (f"{self.desc}: {pct:5.1f}% {self.done}/{self.total} {self.unit} "
                f"[{rate:,.0f} {self.unit}/s, ETA {eta_s}]{' ' + self.postfix if self.postfix else ''}")

    def update(self, n: int, postfix: str = "") -> None:
        self.done += n
        if postfix:
            self.postfix = postfix
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.every_s:
            self._last = now
            print(("\r" if self.tty else "") + self.line(), end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(("\r" if self.tty else "") + self.line(), file=sys.stderr, flush=True)
            self.enabled = False
