"""Examples for the OpenAPI docs at /docs, matching docs/API.md (docs only: nothing here is served)."""

from __future__ import annotations

from typing import Any

_BASE = "http://127.0.0.1:8000"
_ID = "b1c2d3e4f5a6478899aabbccddeeff00"

PREDICTION_CREATED: dict[str, Any] = {
    "code": 200,
    "message": "success",
    "data": {
        "id": _ID,
        "model": "wavespeed-ai/qwen-image/edit",
        "outputs": [],
        "urls": {"get": f"{_BASE}/api/v3/predictions/{_ID}/result"},
        "has_nsfw_contents": [],
        "status": "created",
        "created_at": "2026-11-24T12:34:56.789Z",
        "error": "",
        "timings": {"inference": 0},
    },
}

PREDICTION_RUNNING: dict[str, Any] = {
    "code": 200,
    "message": "success",
    "data": {**PREDICTION_CREATED["data"], "status": "processing", "progress": {"step": 12, "total": 50}},
}

PREDICTION_COMPLETED: dict[str, Any] = {
    "code": 200,
    "message": "success",
    "data": {
        **PREDICTION_CREATED["data"],
        "outputs": [f"{_BASE}/files/outputs/{_ID}/0.jpeg"],
        "has_nsfw_contents": [False],
        "status": "completed",
        "timings": {"inference": 8421},
        "progress": {"step": 50, "total": 50},
    },
}

UPLOAD_TICKET: dict[str, Any] = {
    "code": 200,
    "message": "success",
    "data": {
        "type": "image",
        "download_url": f"{_BASE}/files/uploads/3f2a/photo.jpg",
        "filename": "photo.jpg",
        "size": 123456,
        "upload": {
            "method": "PUT",
            "url": f"{_BASE}/api/v3/media/uploads/uploads/3f2a/photo.jpg?size=123456&expires=1764000000&signature=…",
            "headers": {"Content-Type": "image/jpeg"},
        },
    },
}


def error_example(status: int, message: str) -> dict[str, Any]:
    return {"code": status, "message": message, "data": {"error": message}, "error": message}
