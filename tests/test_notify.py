"""Wake-ups on one machine (LocalNotifier): a queued job wakes ONE idle worker of its variant, not
all of them (issue 17); with none idle, the busy ones find it when they next wait; ``done`` and
topic-less messages still reach everyone."""

from __future__ import annotations

import threading
from pathlib import Path

from server.jobs.notify import LocalNotifier, Subscription
from tests.support import wait_for


def waiting(notifier: LocalNotifier, subs: list[Subscription], timeout: float) -> list[list[str]]:
    """Each subscription waits once, on its own thread, once all are idle; returns what each got."""
    got: list[list[str]] = [[] for _ in subs]

    def run(i: int) -> None:
        got[i] = subs[i].wait(timeout)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(subs))]
    for t in threads:
        t.start()
    folder = notifier.root / "jobs"
    wait_for(lambda: len(list(folder.glob("idle.*"))) == len(subs), timeout=10, what="every subscriber waiting")
    return got


def test_a_queued_job_wakes_one_idle_worker_of_its_variant(tmp_path: Path) -> None:
    notifier = LocalNotifier(tmp_path / "run")
    edit = [notifier.subscribe("jobs", "edit") for _ in range(4)]
    plus = notifier.subscribe("jobs", "edit-plus")
    subs = [*edit, plus]
    got = waiting(notifier, subs, timeout=3)
    notifier.publish("jobs", "edit")
    wait_for(lambda: any(got), timeout=10, what="a wake-up")
    wait_for(lambda: not list((notifier.root / "jobs").glob("idle.*")), timeout=10, what="the waits to end")
    assert sum(1 for g in got[:4] if g == ["edit"]) == 1 and got[4] == [], got
    for sub in subs:
        sub.close()


def test_with_no_one_idle_every_busy_worker_finds_it_at_its_next_wait(tmp_path: Path) -> None:
    notifier = LocalNotifier(tmp_path / "run")
    busy = [notifier.subscribe("jobs", "edit") for _ in range(2)]  # between a claim and a wait
    notifier.publish("jobs", "edit")
    assert [sub.wait(5) for sub in busy] == [["edit"], ["edit"]]
    for sub in busy:
        sub.close()


def test_done_and_topicless_messages_reach_everyone(tmp_path: Path) -> None:
    notifier = LocalNotifier(tmp_path / "run")
    subs = [notifier.subscribe("jobs", "edit") for _ in range(3)]
    got = waiting(notifier, subs, timeout=10)
    notifier.publish("jobs")  # a reaped or released job: any worker may want it
    wait_for(lambda: all(got), timeout=10, what="every wake-up")
    done = [notifier.subscribe("done") for _ in range(2)]
    notifier.publish("done", "abc")
    assert [sub.wait(5) for sub in done] == [["abc"], ["abc"]]
    for sub in [*subs, *done]:
        sub.close()


def test_only_wake_one_subscribers_say_they_are_idle(tmp_path: Path) -> None:
    """The idle/busy rename is read by the wake-one publisher only: a ``done`` listener waits under
    one name (two renames a wait would sit between a message's arrival and its delivery)."""
    notifier = LocalNotifier(tmp_path / "run")
    subs = [notifier.subscribe("jobs", "edit"), notifier.subscribe("done")]
    got: list[list[str]] = [[], []]
    started = [threading.Event(), threading.Event()]

    def run(i: int) -> None:
        started[i].set()
        got[i] = subs[i].wait(10)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: len(list((notifier.root / "jobs").glob("idle.*"))) == 1, 10, "the worker idle")
    assert started[1].wait(10)
    assert [p.name.split(".")[0] for p in (notifier.root / "done").iterdir()] == ["busy"]
    notifier.publish("done", "abc")
    notifier.publish("jobs", "edit")
    for t in threads:
        t.join(10)
    assert got == [["edit"], ["abc"]]
    for sub in subs:
        sub.close()


def test_a_subscriber_that_died_is_forgotten(tmp_path: Path) -> None:
    notifier = LocalNotifier(tmp_path / "run")
    gone = notifier.subscribe("jobs", "edit")
    gone.sock.close()  # type: ignore[attr-defined]  # its process died: the file stays behind
    alive = notifier.subscribe("jobs", "edit")
    notifier.publish("jobs", "edit")
    assert alive.wait(5) == ["edit"]
    assert len(list((notifier.root / "jobs").iterdir())) == 1
    alive.close()
