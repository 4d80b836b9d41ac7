"""The latency benchmark client behind ``qwen-edit bench``: one module per concern.

schedule (arrivals: closed loop, open loop Poisson/gamma), inputs (dataset or built-in set),
backends (v3 async with progress-aware polling, v3 sync, OpenAI images/edits), runner (several
endpoints on one schedule, Ctrl-C), metrics (per request, summary, goodput, capacity), report
(table, JSON, CSV, figure), compare (runs side by side with bootstrap intervals), cli.
"""

from __future__ import annotations

from benchmarks.client.cli import main

__all__ = ["main"]
