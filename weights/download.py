"""Download a model folder from the Hugging Face Hub, resumably, and say plainly why when that
cannot be done.

Only what the pipeline needs is fetched (``manifest.ALLOW_PATTERNS``), every file from the one commit
the revision names. Each file arrives as ``<name>.part`` and is renamed once its size and (for the
weights) sha256 match the Hub's: an interrupted run leaves its ``.part`` files, and the next run
asks the Hub only for the rest (an HTTP ``Range``). huggingface_hub does the transfer itself
(``http_get``: its session, token, proxy, redirects and retries); since 1.x it no longer keeps a
partial file between runs, which is why the ``.part`` file is ours. What this module adds is the
outcome: one line naming the cause and the way out instead of a traceback (no network, a refused
or gated repository, an unknown revision, a Hub error, an interrupted transfer), no empty folder
left behind by a download that fetched nothing, and the manifest that lets ``verify`` work offline.
The Hub's address is huggingface_hub's own setting (``HF_ENDPOINT``: a mirror, or a test's fake Hub).
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from weights.hub import hub_listing
from weights.manifest import FileEntry, sha256_of, write_manifest

AIR_GAPPED = "or download on a connected machine and copy the folder here (README: Air-gapped machines)"
PART = ".part"


class DownloadError(Exception):
    """A download that did not complete; ``str()`` is one line: the cause and what to do."""


def download(
    repo_id: str,
    folder: Path,
    revision: str | None = None,
    max_workers: int = 8,
    endpoint: str | None = None,
) -> Path:
    """Fetch what the pipeline needs into ``folder``, then write the manifest that lets ``verify``
    work offline. Raises ``DownloadError``; what was already fetched stays, for the next run to resume."""
    existed = folder.exists()
    try:
        commit, expected = hub_listing(repo_id, revision, endpoint)  # fails before anything is written
        folder.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
            futures = [
                pool.submit(fetch_file, repo_id, commit, name, entry, folder, endpoint)
                for name, entry in sorted(expected.items())
            ]
            for future in futures:  # every file gets its chance; the first failure is reported
                future.exception()
            for future in futures:
                future.result()
    except BaseException as exc:
        kept = _has_progress(folder)
        if not existed and not kept:
            shutil.rmtree(folder, ignore_errors=True)  # nothing fetched: leave no empty folder behind
        if isinstance(exc, KeyboardInterrupt):
            raise
        explained = str(exc) if isinstance(exc, DownloadError) else explain(exc, repo_id, revision, endpoint)
        if explained is None:
            raise
        if kept:
            explained += f"; what was fetched stays in {folder}: run the same command again to resume"
        raise DownloadError(explained) from exc
    write_manifest(folder, expected, source=f"{repo_id}@{revision or 'main'}")
    return folder


def fetch_file(repo_id: str, commit: str, name: str, entry: FileEntry, folder: Path, endpoint: str | None) -> None:
    """One file into ``folder/name`` by way of ``name.part``, resuming a part left by an earlier run."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    dest = folder / name
    if dest.is_file() and dest.stat().st_size == entry.size:
        return  # fetched by an earlier run (verify checks its hash)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART)
    with part.open("r+b" if part.exists() else "wb") as fh:
        done = fh.seek(0, 2)
        if done > entry.size:  # not a part of this file (another revision's): start over
            fh.truncate(0)
            done = fh.seek(0)
        if done < entry.size:
            url = hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint)
            http_get(
                url, fh, resume_size=done, headers=build_hf_headers(), expected_size=entry.size, displayed_filename=name
            )
    if entry.sha256 and sha256_of(part) != entry.sha256:
        part.unlink()
        raise DownloadError(f"{name} arrived corrupt (its sha256 differs from the Hub's); it was removed")
    part.replace(dest)


def _has_progress(folder: Path) -> bool:
    """Whether ``folder`` holds anything fetched: a file, or the partial bytes of one."""
    if not folder.is_dir():
        return False
    return any(path.is_file() and path.stat().st_size > 0 for path in folder.rglob("*"))


def explain(exc: BaseException, repo_id: str, revision: str | None, endpoint: str | None) -> str | None:
    """One line for a failure of the Hub or of the way to it; ``None`` for anything else (a bug: re-raised)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = endpoint or constants.ENDPOINT
    page = f"{hub}/{repo_id}"
    # snapshot_download reports "no network" as "not in the local cache", the network error as its cause.
    cause: BaseException = exc
    while isinstance(cause, LocalEntryNotFoundError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, OfflineModeIsEnabled) or constants.HF_HUB_OFFLINE:
        return f"cannot download {repo_id}: HF_HUB_OFFLINE is set (unset it on a machine with network, {AIR_GAPPED})"
    if isinstance(cause, httpx2.ProxyError):
        return f"cannot download {repo_id}: the proxy refused the connection to {hub} ({cause}); check HTTPS_PROXY"
    if isinstance(cause, httpx2.TransportError | ConnectionError | TimeoutError):
        reason = str(cause) or type(cause).__name__
        return (
            f"cannot reach the Hugging Face Hub at {hub} ({reason}): check the network or proxy (HTTPS_PROXY), "
            f"set HF_ENDPOINT to a mirror, {AIR_GAPPED}"
        )
    if isinstance(cause, GatedRepoError):
        return (
            f"the Hub refused {repo_id}: it is gated; accept its terms at {page} with your account, then log in "
            "here (`.venv/bin/hf auth login`, or set HF_TOKEN)"
        )
    if isinstance(cause, RepositoryNotFoundError):
        return (
            f"the Hub has no repository {repo_id!r} that this login can see (HTTP {_status(cause)}): check the "
            "name (variants: edit, edit-plus, edit-2511), or log in if it is private (`.venv/bin/hf auth login`, "
            "or HF_TOKEN)"
        )
    if isinstance(cause, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r} on the Hub: see {page}/tree/main for its branches"
    if isinstance(cause, HfHubHTTPError):
        status = _status(cause)
        if status in (401, 403):
            return f"the Hub refused {repo_id} (HTTP {status}): log in with `.venv/bin/hf auth login` or set HF_TOKEN"
        return f"the Hub at {hub} answered HTTP {status} for {repo_id}: try again later ({_first_line(cause)})"
    if type(cause).__module__.startswith(("huggingface_hub", "httpx2")):
        return f"cannot download {repo_id}: {_first_line(cause)}"
    if isinstance(cause, OSError):
        return f"cannot write the model folder: {cause}"
    return None


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
