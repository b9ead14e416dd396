"""Progress of long steps (an export's loading, tracing, lowering, optimizing, weight writing).

Code that takes long calls `progress(stage, done, total)`: total None means "unknown, just
started", done == total means "finished". The default, `silent`, does nothing; `terminal` draws one
tqdm bar per stage on stderr, and only when stderr is a terminal (a pipe or a log file gets nothing).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable, Optional

Progress = Callable[[str, float, Optional[float]], None]

# Stages counted in bytes show sizes (MB/s) rather than plain counts.
BYTE_STAGES = ("writing weights", "writing model file", "compacting weights")


def silent(stage: str, done: float, total: float | None) -> None:
    """The default: no output."""


@contextlib.contextmanager
def terminal(stream=None, enabled: bool | None = None):
    """Yield a Progress that draws tqdm bars on stream (default stderr) when it is a terminal, or
    `silent` when it is not or enabled is False. Bars are closed on exit, also on errors."""
    stream = stream if stream is not None else sys.stderr
    if enabled is None:
        enabled = bool(getattr(stream, "isatty", lambda: False)())
    if not enabled:
        yield silent
        return
    from tqdm import tqdm

    current = {"stage": None, "bar": None}
    lock, stop = threading.Lock(), threading.Event()

    def tick():  # stages of unknown length get no calls while they run: keep their elapsed time moving
        while not stop.wait(0.5):
            with lock:
                if current["bar"] is not None and current["bar"].total is None:
                    current["bar"].refresh()

    def progress(stage: str, done: float, total: float | None) -> None:
        with lock:
            bar = current["bar"]
            if stage != current["stage"]:  # a new stage: the previous one is over
                if bar is not None:
                    bar.close()
                in_bytes = stage in BYTE_STAGES
                bar = current["bar"] = tqdm(desc=stage, total=total, file=stream, dynamic_ncols=True,
                                            unit="B" if in_bytes else " step", unit_scale=in_bytes,
                                            bar_format=None if total is not None else "{desc}: {elapsed}")
                current["stage"] = stage
            if total is not None and bar.total != total:
                bar.total, bar.bar_format = total, None
            bar.n = done
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield progress
    finally:
        stop.set()
        ticker.join()
        if current["bar"] is not None:
            current["bar"].close()
