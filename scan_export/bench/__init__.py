"""`scan-export bench NAME`: side-by-side timings measured in one run, reported as medians and ratios,
one module per bench. A new bench is one module defining BENCH (common.Bench) and one entry below."""

from __future__ import annotations

from . import export_memory, model, scan, ssd

BENCHES = {b.name: b for b in (scan.BENCH, ssd.BENCH, model.BENCH, export_memory.BENCH)}
DEFAULT = "scan"  # what a plain `scan-export bench` runs, as it did before there were subcommands
