"""What every bench shares: the timers, the JSON writer, and the Bench record through which the CLI
finds a bench's arguments and run function.

Machines here are noisy (±30% across processes), so only ratios between rows of the same run mean
anything; absolute milliseconds are printed for context.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Bench:
    """One `scan-export bench NAME`. add_arguments(parser, kinds) declares its flags (kinds: the CLI's
    bounded argument types by name, passed in so that no bench imports the CLI); run(args) -> results
    (a JSON-able dict); format(results) -> the text printed."""

    name: str
    help: str
    add_arguments: Callable
    run: Callable
    format: Callable
    old_flag: str | None = None  # how it was chosen before subcommands (`bench --ssd`); kept as an alias


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def interleaved_ms(fns: dict, repeats: int) -> dict:
    """Median ms of each function, run in turn (a, b, c, a, b, c, ...) after one warm-up each, so
    that a slow spell of the machine hits every contender alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def write_json(results: dict, path) -> None:
    Path(path).write_text(json.dumps(results, indent=2))
