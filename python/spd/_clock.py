"""Timing long phases honestly: wall time, CPU time, and the time the process was stopped."""
from __future__ import annotations

import os
import threading
import time


class PhaseClock:
    """Wall, CPU and paused seconds of the work inside ``with PhaseClock() as clock:``.

    Paused time is time this process did not run at all: stopped (SIGSTOP, Ctrl-Z) so that
    something else had the machine. A watcher thread wakes every ``tick`` seconds; a wake-up later
    than ``tick + slack`` means every thread was stopped, and the excess counts as paused. Being
    slowed by other work on the same CPU is not a pause, and is not counted.
    """

    def __init__(self, tick: float = 0.5, slack: float = 2.0):
        self.tick, self.slack = tick, slack
        self.paused_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="spd-phase-clock", daemon=True)

    def _watch(self) -> None:
        last = time.monotonic()
        while True:
            stopping = self._stop.wait(self.tick)
            t = time.monotonic()
            if t - last > self.tick + self.slack:
                self.paused_seconds += t - last - self.tick
            last = t
            if stopping:
                return

    def __enter__(self) -> "PhaseClock":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = time.process_time() - self._cpu

    def record(self) -> dict:
        """The manifest's fields: ``seconds`` (wall), ``cpu_seconds`` (all threads of this process),
        ``paused_seconds`` where the process was stopped for a while, and ``cpu_share``: CPU seconds
        per running second and usable core (near 1 for work that had the machine to itself, lower
        where other work took cores, or where the work itself waited or ran on one thread)."""
        out = {"seconds": round(self.seconds, 1), "cpu_seconds": round(self.cpu_seconds, 1)}
        if self.paused_seconds >= 0.1:
            out["paused_seconds"] = round(self.paused_seconds, 1)
        running = self.seconds - self.paused_seconds
        if running > 0:
            out["cpu_share"] = round(self.cpu_seconds / running / usable_cores(), 2)
        return out


def usable_cores() -> int:
    """The cores this process may run on (its affinity), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
