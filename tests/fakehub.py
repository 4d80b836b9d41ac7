"""A fake Hugging Face Hub on loopback, for the download tests: the few routes huggingface_hub's
``model_info``, ``snapshot_download`` and ``hf_hub_download`` use, over real HTTP, so the library
runs its own code (metadata, ``Range`` resumption, errors) against it, reached through its own
endpoint setting (``HF_ENDPOINT``, or the ``endpoint`` argument).

    with FakeHub({"org/model": {"model_index.json": b"{}", "transformer/x.safetensors": b"..."}}) as hub:
        hub.refuse = 401          # every request of the repository answers that (gated, private, ...)
        hub.cut = {"transformer/x.safetensors"}   # a download of it drops after half its bytes
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Seen:
    method: str
    path: str
    range: str | None


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]]
    refuse: int | None = None  # answer every repository request with this status
    cut: set[str] = field(default_factory=set)  # files whose download drops after half their bytes
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, head=True)

            def do_GET(self) -> None:
                hub._answer(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- routes ------------------------------------------------------------------------------

    def _answer(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        self.seen.append(Seen(req.command, path, req.headers.get("Range")))
        repo, route, rest = self._route(path)
        if repo is None:
            return self._send(req, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        if self.refuse:
            code = "GatedRepo" if self.refuse == 403 else "RepoNotFound"
            body = json.dumps({"error": f"Access to model {repo} is restricted."}).encode()
            return self._send(req, self.refuse, body, {"X-Error-Code": code, "X-Error-Message": "restricted"})
        files = self.repos[repo]
        if route == "info":
            siblings = [{"rfilename": name, **self._meta(data, sibling=True)} for name, data in files.items()]
            return self._json(req, {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings})
        if route == "tree":
            tree = [{"type": "file", "path": name, **self._meta(data, sibling=False)} for name, data in files.items()]
            return self._json(req, tree)
        if rest not in files:
            return self._send(req, 404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
        return self._file(req, rest, files[rest], head)

    def _route(self, path: str) -> tuple[str | None, str, str]:
        for repo in self.repos:
            if path == f"/api/models/{repo}" or path.startswith(f"/api/models/{repo}/revision/"):
                return repo, "info", ""
            if path.startswith(f"/api/models/{repo}/tree/"):
                return repo, "tree", ""
            prefix = f"/{repo}/resolve/"
            if path.startswith(prefix):
                _revision, _, name = path[len(prefix) :].partition("/")
                return repo, "file", name
        return None, "", ""

    @staticmethod
    def _meta(data: bytes, sibling: bool) -> dict[str, object]:
        """Every file is an LFS file here: its sha256 is known to the Hub, as for real weights."""
        sha = hashlib.sha256(data).hexdigest()
        lfs = {"size": len(data), "pointerSize": 130}
        lfs |= {"sha256": sha} if sibling else {"oid": sha}
        meta: dict[str, object] = {"size": len(data), "lfs": lfs}
        meta |= {"blobId": sha[:40]} if sibling else {"oid": sha[:40]}
        return meta

    def _file(self, req: BaseHTTPRequestHandler, name: str, data: bytes, head: bool) -> None:
        sha = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
        if head:
            return self._send(req, 200, b"", headers | {"Content-Length": str(len(data))}, body_ok=False)
        start = _range_start(req.headers.get("Range"))
        if name in self.cut:
            if start:  # the rest of a cut file: the Hub is still failing
                return self._send(req, 500, b'{"error": "Internal Error"}', {})
            req.send_response(200)
            for key, value in (headers | {"Content-Length": str(len(data))}).items():
                req.send_header(key, value)
            req.end_headers()
            req.wfile.write(data[: len(data) // 2])
            req.wfile.flush()
            req.close_connection = True
            return None
        if start:
            part = data[start:]
            extra = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            return self._send(req, 206, part, headers | extra)
        return self._send(req, 200, data, headers)

    @staticmethod
    def _json(req: BaseHTTPRequestHandler, value: object) -> None:
        FakeHub._send(req, 200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    @staticmethod
    def _send(
        req: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], body_ok: bool = True
    ) -> None:
        req.send_response(status)
        headers = {"Content-Length": str(len(body)), **headers}
        for key, value in headers.items():
            req.send_header(key, value)
        req.end_headers()
        if body_ok and req.command != "HEAD":
            req.wfile.write(body)


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header[len("bytes=") :].split("-", 1)[0] or 0)
