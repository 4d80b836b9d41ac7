"""The typed job contract: what the API writes is what the worker reads, old rows included."""

from __future__ import annotations

import pytest

from server.jobs.contract import (
    IN_FLIGHT,
    MAX_MESSAGE_BYTES,
    TERMINAL,
    Done,
    Ending,
    ImageRef,
    JobParams,
    LoraRef,
    Status,
)


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


def ending(**changes: object) -> Ending:
    values: dict[str, object] = {
        "status": Status.COMPLETED,
        "outputs": ["outputs/j/0.png"],
        "error": "",
        "error_code": None,
        "inference_ms": 1234,
        "nsfw": [False],
        "attempts": 1,
        "progress_step": 4,
        "progress_total": 4,
        "started_at": 1000,
        "finished_at": 2300,
        "updated_at": 2300,
        "lease_token": None,
        "lease_owner": "host/0",
        "lease_expires_at": None,
        "cancel_requested": False,
    }
    values.update(changes)
    return Ending(**values)  # type: ignore[arg-type]


def test_a_done_message_carries_the_ending_within_the_notifiers_limit() -> None:
    done = Done("j", webhook=True, ending=ending())
    assert Done.parse(done.message()) == done
    # An ending that does not fit (a long error message) is left out; the id and the webhook stay.
    long = Done("j", webhook=True, ending=ending(status=Status.FAILED, error="x" * MAX_MESSAGE_BYTES))
    assert len(long.message().encode()) <= MAX_MESSAGE_BYTES
    assert Done.parse(long.message()) == Done("j", webhook=True)


def test_done_messages_of_earlier_releases_and_strays_still_parse() -> None:
    assert Done.parse("abc") == Done("abc")
    assert Done.parse("abc webhook") == Done("abc", webhook=True)
    assert Done.parse("") is None  # a bare wake-up
    assert Done.parse("{not json") is None
    assert Done.parse('{"webhook": true}') is None  # no id
    # An ending that is not one (a job that did not end, a missing field) is dropped, the news kept.
    bad = Done("j", ending=ending(status=Status.PROCESSING)).message()
    assert Done.parse(bad) == Done("j")
    assert Done.parse('{"id": "j", "ending": {"status": "completed"}}') == Done("j")
