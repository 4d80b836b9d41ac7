"""One OpenAI SDK call, one job: answers about an accepted job tell the SDK not to retry, and name
the prediction so it can still be polled through v3 (server/api/routes/openai.py). The real
``openai`` SDK with its default two retries, on the in-process app with a fake worker."""

from __future__ import annotations

import io
from typing import Any

import openai
import pytest

from server.jobs.store import JobStore
from tests.support import API_KEY, png_bytes


def sdk(stack: Any) -> openai.OpenAI:
    # TestClient is an httpx.Client: the SDK's requests go to the app in this process.
    return openai.OpenAI(api_key=API_KEY, base_url="http://testserver/v1", http_client=stack, max_retries=2)


def jobs_made(settings: Any) -> int:
    store = JobStore.open(settings)
    try:
        return sum(store.count_by_status().values())
    finally:
        store.close()


def edit(stack: Any, prompt: str) -> Any:
    return sdk(stack).images.edit(image=("in.png", io.BytesIO(png_bytes()), "image/png"), prompt=prompt)


@pytest.mark.parametrize(
    ("prompt", "error", "status"),
    [
        ("raise", openai.InternalServerError, 500),  # a bug in the model code
        ("oom", openai.InternalServerError, 500),  # CUDA out of memory
        ("invalid", openai.BadRequestError, 400),  # the pipeline's own input check
    ],
)
def test_a_failed_job_is_one_job_and_the_error_names_it(
    stack: Any, app_settings: Any, prompt: str, error: type[Exception], status: int
) -> None:
    with pytest.raises(error) as caught:
        edit(stack, prompt)
    exc: Any = caught.value
    assert exc.status_code == status
    assert exc.response.headers["x-should-retry"] == "false"
    assert jobs_made(app_settings) == 1
    assert "Prediction " in str(exc) and " failed" in str(exc)
    pid = str(exc).split("Prediction ", 1)[1].split()[0]
    got = stack.get(f"/api/v3/predictions/{pid}/result", headers={"Authorization": f"Bearer {API_KEY}"})
    assert got.status_code == 200 and got.json()["data"]["status"] == "failed"


@pytest.mark.parametrize("app_settings", [{"sync_timeout_s": 0.5}], indirect=True)
def test_a_sync_timeout_is_one_job_that_goes_on(stack: Any, app_settings: Any, fake_runner: Any) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        edit(stack, "hang")
    exc: Any = caught.value
    assert exc.status_code == 504 and exc.response.headers["x-should-retry"] == "false"
    assert jobs_made(app_settings) == 1
    pid = str(exc).split("prediction ", 1)[1].split()[0]
    fake_runner.release.set()
    got = stack.get(f"/api/v3/predictions/{pid}/result", headers={"Authorization": f"Bearer {API_KEY}"})
    assert got.status_code == 200 and got.json()["data"]["id"] == pid


def test_an_answer_before_any_job_exists_may_be_retried(stack: Any, app_settings: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(stack).images.edit(image=("in.png", io.BytesIO(b"not an image"), "image/png"), prompt="x")
    assert "x-should-retry" not in caught.value.response.headers
    assert jobs_made(app_settings) == 0
