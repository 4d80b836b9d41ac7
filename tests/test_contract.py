"""The typed job contract: what the API writes is what the worker reads, old rows included."""

from __future__ import annotations

import pytest

from server.jobs.contract import IN_FLIGHT, TERMINAL, ImageRef, JobParams, LoraRef, Status


def test_params_round_trip_through_json() -> None:
    params = JobParams(
        prompt="make it blue",
        images=(ImageRef(key="inputs/abc/0.png"), ImageRef(url="https://example.com/a.png")),
        seed=42,
        num_inference_steps=30,
        true_cfg_scale=4.0,
        negative_prompt=" ",
        width=1024,
        height=768,
        loras=(LoraRef("owner/repo/x.safetensors", 0.8),),
    )
    stored = params.to_json()
    assert stored["images"] == [{"key": "inputs/abc/0.png"}, {"url": "https://example.com/a.png"}]
    assert stored["loras"] == [{"path": "owner/repo/x.safetensors", "scale": 0.8}]
    assert JobParams.from_json(stored) == params
    assert params.stored_keys() == {"inputs/abc/0.png"}


def test_rows_written_by_earlier_releases_still_read() -> None:
    # The first releases wrote plain dicts; keys added later (loras) may be absent.
    old = {
        "prompt": "x",
        "images": [{"key": "uploads/k/a.png"}],
        "width": None,
        "height": None,
        "seed": 7,
        "num_inference_steps": 2,
        "true_cfg_scale": 4.0,
        "negative_prompt": " ",
    }
    params = JobParams.from_json(old)
    assert params.images == (ImageRef(key="uploads/k/a.png"),) and params.loras == () and params.seed == 7


def test_an_image_ref_is_a_key_or_a_url() -> None:
    with pytest.raises(ValueError):
        ImageRef()
    with pytest.raises(ValueError):
        ImageRef(key="a", url="http://b")


def test_status_sets() -> None:
    assert {Status.COMPLETED, Status.FAILED} == TERMINAL and {Status.CREATED, Status.PROCESSING} == IN_FLIGHT
    assert Status.FAILED.terminal and not Status.PROCESSING.terminal
