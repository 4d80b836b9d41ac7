"""History (POST /api/v3/predictions) and deletion (POST /api/v3/predictions/delete), in process:
the caller's own predictions, newest first, by page, time range, model and status; admins see
every key's; deletion takes the files along and keeps what is still queued or running. The
queries are index range scans (ix_jobs_key_created), on SQLite and PostgreSQL alike."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from server.jobs.contract import Status
from server.jobs.history import HistoryQuery, Scope
from server.jobs.store import Admission, Budget, JobStore, OverBudget, Prices, new_id
from tests.support import KEY1, KEY2, MODEL_URL, data_uri, pg_available, png_bytes, wait_for

IMAGE = data_uri(png_bytes())
ADMIN = {"Authorization": "Bearer admin-key"}


def submit(client: Any, prompt: str, headers: dict[str, str] = KEY1) -> str:
    r = client.post(MODEL_URL, json={"prompt": prompt, "image": IMAGE, "size": "256*256"}, headers=headers)
    assert r.status_code == 200, r.text
    return str(r.json()["data"]["id"])


def history(client: Any, headers: dict[str, str] = KEY1, **body: Any) -> dict[str, Any]:
    r = client.post("/api/v3/predictions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["items"]]


@pytest.mark.parametrize("app_settings", [{"admin_keys": ["admin-key"]}], indirect=True)
def test_own_predictions_newest_first_by_page(api: Any) -> None:
    mine = [submit(api, f"edit {i}") for i in range(3)]
    theirs = submit(api, "another key's", KEY2)
    everything = history(api)
    assert ids(everything) == mine[::-1] and not everything["has_more"]
    first = everything["items"][0]
    assert first["input"]["prompt"] == "edit 2" and first["status"] == "created"
    assert first["urls"]["get"].endswith(f"/api/v3/predictions/{mine[2]}/result")
    one, two = history(api, page_size=2), history(api, page=2, page_size=2)
    assert ids(one) == mine[:0:-1] and one["has_more"] and ids(two) == [mine[0]] and not two["has_more"]
    assert "input" not in history(api, include_inputs=False)["items"][0]
    assert ids(history(api, KEY2)) == [theirs]
    assert ids(history(api, ADMIN)) == [theirs, *mine[::-1]]


def test_filters_as_the_clients_send_them(stack: Any) -> None:
    done = submit(stack, "an edit")
    wait_for(lambda: history(stack, status="completed")["items"], what="a completed prediction")
    failed = submit(stack, "raise")
    wait_for(lambda: history(stack, status="failed")["items"], what="a failed prediction")
    now = datetime.now(UTC)
    assert ids(history(stack, status="completed")) == [done]
    assert ids(history(stack, status="failed")) == [failed]
    assert ids(history(stack, status="cancelled")) == []  # a hosted status this server never gives
    day = {"created_after": (now - timedelta(days=1)).isoformat(), "created_before": now.isoformat()}
    assert ids(history(stack, **day)) == [failed, done]  # the CLI's default window
    assert ids(history(stack, created_after=(now + timedelta(minutes=1)).isoformat())) == []
    assert ids(history(stack, model="wavespeed-ai/qwen-image/edit-lora")) == []
    assert len(history(stack, model="wavespeed-ai/qwen-image/edit")["items"]) == 2


@pytest.mark.parametrize("body", [{"page_size": 101}, {"page": 0}, {"status": "sleeping"}, {"created_after": "soon"}])
def test_bad_queries_are_400(api: Any, body: dict[str, Any]) -> None:
    r = api.post("/api/v3/predictions", json=body, headers=KEY1)
    assert r.status_code == 400 and r.json()["code"] == 400, r.text


def test_delete_takes_the_files_and_keeps_what_is_in_flight(stack: Any, app_settings: Any, fake_runner: Any) -> None:
    done = submit(stack, "an edit")
    wait_for(lambda: history(stack, status="completed")["items"], what="completion")
    output = stack.get(f"/api/v3/predictions/{done}/result", headers=KEY1).json()["data"]["outputs"][0]
    assert stack.get(output.removeprefix("http://testserver")).status_code == 200
    running = submit(stack, "hang")
    r = stack.post("/api/v3/predictions/delete", json={"ids": [done, running, "nope"]}, headers=KEY2)
    assert r.json()["data"] == {"deleted": [], "in_flight": []}  # another key's are as unknown as none
    r = stack.post("/api/v3/predictions/delete", json={"ids": [done, running, "nope"]}, headers=KEY1)
    assert r.status_code == 200 and r.json()["data"] == {"deleted": [done], "in_flight": [running]}
    assert stack.get(f"/api/v3/predictions/{done}/result", headers=KEY1).status_code == 404
    assert stack.get(output.removeprefix("http://testserver")).status_code == 404
    assert not any(app_settings.resolved_storage_dir.glob(f"**/{done}/*"))
    assert ids(history(stack)) == [running]
    fake_runner.release.set()


def store_checks(store: JobStore) -> None:
    """The page, usage and delete queries on the store itself: days are UTC days, GPU time sums."""
    from tests.test_store import make_job

    day = 20_000  # days since the epoch
    jobs = [make_job(store, created_at=day * 86_400_000 + h * 3_600_000) for h in (1, 23, 25)]
    with store.db.write() as conn:
        conn.execute(text("UPDATE jobs SET api_key_id = 'k', inference_ms = 1500, status = 'completed'"))
    page = store.history.page(Scope("k"), HistoryQuery(page_size=2))
    assert [j.id for j in page.jobs] == [jobs[2].id, jobs[1].id] and page.has_more
    usage = store.history.usage(Scope("k"), 0, 10**13)
    assert [(u.day, u.key_id, u.requests, u.completed, u.gpu_ms) for u in usage] == [
        (day, "k", 2, 2, 3000),
        (day + 1, "k", 1, 1, 1500),
    ]
    assert store.history.usage(Scope("other"), 0, 10**13) == []
    assert store.history.count_by_model(Scope(None, all_keys=True), [Status.COMPLETED]) == {jobs[0].model: 3}
    gone = store.history.delete(Scope("k"), [jobs[0].id])
    assert [j.id for j in gone.deleted] == [jobs[0].id] and store.get(jobs[0].id) is None
    # The store's admission counts what the key spent (2 completed here) against its budget.
    over = dataclasses.replace(jobs[0], id=new_id(), api_key_id="k", status=Status.CREATED)
    with pytest.raises(OverBudget, match="1 of 1 spent"):
        store.create(over, Admission(budget=Budget(cap=1.0, prices=Prices({"*": 0.5}))))
    store.create(over, Admission(budget=Budget(cap=1.5, prices=Prices({"*": 0.5}))))


def test_a_page_is_an_index_range_scan(tmp_path: Any) -> None:
    """However many jobs are stored, a page reads its rows off the index, already in order."""
    from tests.support import settings_for

    store = JobStore.open(settings_for(tmp_path))
    store.migrate()
    try:
        store_checks(store)
        with store.db.read() as conn:
            plan = " ".join(
                str(row[-1])
                for row in conn.execute(
                    text(
                        "EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE api_key_id = 'k' "
                        "AND created_at >= 0 ORDER BY created_at DESC, id DESC LIMIT 21"
                    )
                )
            )
        assert "ix_jobs_key_created" in plan and "TEMP B-TREE" not in plan, plan  # no sort: rows come in order
    finally:
        store.close()


@pytest.mark.skipif(not pg_available(), reason="PostgreSQL not reachable")
def test_history_and_usage_on_postgresql(pg_url: str) -> None:
    store = JobStore.at(pg_url)
    store.migrate()
    try:
        store_checks(store)
    finally:
        store.close()


def test_the_history_benchmark_runs(tmp_path: Any) -> None:
    """benchmarks/history.py in its smallest form, so that it cannot rot (numbers only checked present)."""
    import json

    from benchmarks import history as bench

    assert bench.main(["--jobs", "300", "--keys", "3", "--repeat", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "history.json").read_text())
    assert result["jobs"] == 300 and set(result["with"]) == set(result["without"])
    assert all(ms > 0 for ms in [*result["with"].values(), *result["without"].values()])
