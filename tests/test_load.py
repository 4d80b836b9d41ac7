"""A bounded load test (benchmarks/load_test.py, 10 s) on loopback against a real server with a
small queue cap: 429s appear at the cap, nothing accepted is lost, result polls keep answering,
and what the test left unfinished is cancelled at its end.
The poll p99 is printed, not asserted (no timing thresholds in tests)."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.load_test import report, run
from tests.support import API_KEY

pytestmark = pytest.mark.e2e


def test_load_queue_cap_and_polls(make_server: object) -> None:
    srv = make_server(QWEN_EDIT_QUEUE_CAP="4")  # type: ignore[operator]
    tally, missing = asyncio.run(run(srv.url, API_KEY, seconds=10, submitters=6, pollers=3))
    print("\nload test:", report(tally, missing))
    assert tally.accepted, "nothing accepted"
    assert tally.limited > 0, "the queue cap never answered 429"
    assert tally.retry_after_missing == 0
    assert not tally.other, tally.other
    assert missing == []
    assert tally.poll_ms  # polls answered while the worker was busy
    assert tally.cancelled > 0, "the queue was full at the end: something was left to cancel"
    ends = [srv.wait(pid, timeout=300) for pid in tally.accepted]  # every accepted job ends
    cancelled = [d for d in ends if d["status"] == "failed"]
    assert all(d["status"] == "completed" for d in ends if d not in cancelled)
    assert all("Cancelled by the client" in d["error"] for d in cancelled), cancelled
    assert 1 <= len(cancelled) <= tally.cancelled  # a running one may still finish before its next step
