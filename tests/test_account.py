"""Account endpoints from real data (server/api/account.py, routes/account.py), in process: prices
and budgets come from the settings (default: no charge, no cap), spending and usage from the job
rows; a submit over the key's budget is refused with 402."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import API_KEY, KEY1, KEY2, MODEL, MODEL_URL, data_uri, png_bytes, wait_for

IMAGE = data_uri(png_bytes())
PRICED = {"prices": {MODEL: 0.5, "*": 0.25}, "budgets": {API_KEY: 1.0}}


def submit(client: Any, prompt: str = "an edit", headers: dict[str, str] = KEY1) -> Any:
    return client.post(MODEL_URL, json={"prompt": prompt, "image": IMAGE, "size": "256*256"}, headers=headers)


def data(r: Any) -> Any:
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_by_default_nothing_costs_and_nothing_is_capped(api: Any) -> None:
    assert data(api.get("/api/v3/balance", headers=KEY1)) == {
        "balance": 0.0,
        "currency": "USD",
        "limited": False,
        "budget": None,
        "spent": 0.0,
    }
    for path in ("/api/v3/model/price", "/api/v3/model/pricing"):
        quote = data(api.post(path, json={"model_id": MODEL, "inputs": {"prompt": "x"}}, headers=KEY1))
        assert quote["model_id"] == MODEL and quote["unit_price"] == quote["price"] == 0.0
    r = api.post("/api/v3/model/price", json={"model_id": "someone/else"}, headers=KEY1)
    assert r.status_code == 404


@pytest.mark.parametrize("app_settings", [PRICED], indirect=True)
def test_prices_and_a_budget_from_the_settings(api: Any) -> None:
    assert data(api.post("/api/v3/model/pricing", json={"model_id": MODEL}, headers=KEY1))["price"] == 0.5
    lora = data(api.post("/api/v3/model/price", json={"model_id": MODEL + "-lora"}, headers=KEY1))
    assert lora["price"] == 0.25
    assert [m["base_price"] for m in data(api.get("/api/v3/models", headers=KEY1))] == [0.5, 0.25]
    # Queued predictions hold their price: two fit the budget of 1.0, the third is refused.
    assert submit(api).status_code == 200 and submit(api).status_code == 200
    refused = submit(api)
    assert refused.status_code == 402 and "budget" in refused.json()["message"]
    assert submit(api, headers=KEY2).status_code == 200  # another key, no budget
    balance = data(api.get("/api/v3/balance", headers=KEY1))
    assert balance["limited"] and balance["budget"] == 1.0 and balance["balance"] == 1.0  # nothing completed yet


@pytest.mark.parametrize("app_settings", [PRICED | {"admin_keys": ["admin-key"]}], indirect=True)
def test_spending_billings_and_usage_from_the_job_rows(stack: Any) -> None:
    for prompt in ("an edit", "raise"):
        submit(stack, prompt)
    submit(stack, headers=KEY2)

    def finished() -> bool:
        items = data(stack.post("/api/v3/predictions", json={}, headers={"Authorization": "Bearer admin-key"}))
        return all(i["status"] in ("completed", "failed") for i in items["items"]) and len(items["items"]) == 3

    wait_for(finished, what="three finished predictions")
    balance = data(stack.get("/api/v3/balance", headers=KEY1))
    assert balance["spent"] == 0.5 and balance["balance"] == 0.5  # the failed one is not charged
    bills = data(stack.post("/api/v3/billings/search", json={"page": 1, "page_size": 20}, headers=KEY1))
    assert [(b["billing_type"], b["price"], b["prediction"]["model_uuid"]) for b in bills["items"]] == [
        ("deduct", 0.5, MODEL)
    ]
    assert data(stack.post("/api/v3/billings/search", json={"billing_type": "refund"}, headers=KEY1))["items"] == []
    usage = data(stack.post("/api/v3/user/usage_stats", json={}, headers=KEY1))
    assert usage["summary"]["total_requests"] == 2 and usage["summary"]["success_requests"] == 1
    assert usage["summary"]["total_cost"] == 0.5 and usage["summary"]["gpu_seconds"] > 0
    (day,) = usage["daily_usage"]
    assert day["count"] == 2 and day["amount"] == 0.5 and day["gpu_seconds"] > 0
    (model,) = usage["per_model_usage"]
    assert model["model_uuid"] == MODEL and model["total_count"] == 2 and model["unit_price"] == 0.5
    assert len(usage["per_key_usage"]) == 1
    everyone = data(stack.post("/api/v3/user/usage_stats", json={}, headers={"Authorization": "Bearer admin-key"}))
    assert everyone["summary"]["total_requests"] == 3 and len(everyone["per_key_usage"]) == 2
    window = {"start_time": "2020-01-01T00:00:00Z", "end_time": "2020-01-02T00:00:00Z"}
    assert data(stack.post("/api/v3/user/usage_stats", json=window, headers=KEY1))["summary"]["total_requests"] == 0
