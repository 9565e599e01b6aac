"""A Hub-compatible HTTP server on loopback, for the download tests.

It answers what ``huggingface_hub.hf_hub_download`` asks of the Hub for a plain (non-xet)
file: ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` with ``X-Repo-Commit``,
``ETag`` (the sha256 of the bytes, as the Hub sends for LFS files), ``Content-Length`` and
``Accept-Ranges``; ``Range`` requests for resumed transfers; 404 with
``X-Error-Code: EntryNotFound`` for a missing file; 401 ``RepoNotFound`` for an unknown repo or
a private one without the right bearer token. The real client is pointed at it with
``HF_ENDPOINT``.

Per file, ``mode`` says how it is served: ``"ok"``; ``"corrupt"`` (the ETag of the real bytes,
one byte changed on the wire); ``"cut"`` (the full Content-Length announced, the connection
closed after half the body, and every later request for it answered 500); ``"cut_once"`` (the
same first cut, later ``Range`` requests served normally, so the client can resume); ``"hold"``
(the first half sent, then the rest only once ``release`` is set: a client can be killed while
it waits mid-file). A ``Range`` that starts at or past the end is answered 416, as the Hub does.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class HubRepo:
    commits: dict[str, str]  # branch or tag -> commit hash (40 hex)
    files: dict[str, bytes]  # filename -> bytes (the same at every commit)
    modes: dict[str, str] = field(default_factory=dict)
    token: str | None = None  # private repo: requests need "Authorization: Bearer <token>"


class LoopbackHub:
    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self._cut_done: set[str] = set()
        self.release = threading.Event()  # "hold" mode: set it to send the rest of the file
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LoopbackHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, files: dict[str, bytes], *, commits: dict[str, str] | None = None,
            modes: dict[str, str] | None = None, token: str | None = None) -> HubRepo:
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        repo = HubRepo(commits=commits or {"main": commit}, files=dict(files), modes=dict(modes or {}), token=token)
        self.repos[repo_id] = repo
        return repo

    def gets(self, filename: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == "GET" and p.endswith("/" + filename))

    def ranges(self, filename: str) -> list[str | None]:
        """The ``Range`` header of each GET of ``filename`` (None: the whole file), in order."""
        return [hd.get("Range") for m, p, hd in self.requests if m == "GET" and p.endswith("/" + filename)]

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((h.command, h.path, dict(h.headers)))
        parts = h.path.split("?")[0].lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, "RepoNotFound")
        repo_id, rev, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = self.repos.get(repo_id)
        if repo is None or (repo.token and h.headers.get("Authorization") != f"Bearer {repo.token}"):
            return self._error(h, 401, "RepoNotFound")
        commit = repo.commits.get(rev) or (rev if rev in repo.commits.values() else None)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound")
        data = repo.files.get(filename)
        if data is None:
            return self._error(h, 404, "EntryNotFound", commit)
        mode = repo.modes.get(filename, "ok")
        key = f"{repo_id}/{filename}"
        if mode == "cut" and body and key in self._cut_done:
            return self._error(h, 500, "", commit)
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0] or 0)
        if start and start >= len(data):
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{len(data)}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        payload = data
        if mode == "corrupt":
            payload = data[:-1] + bytes([data[-1] ^ 0xFF])
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(payload) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        h.end_headers()
        if not body:
            return
        if mode in ("cut", "cut_once") and key not in self._cut_done:
            self._cut_done.add(key)
            h.wfile.write(payload[start:start + (len(payload) - start) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        if mode == "hold" and key not in self._cut_done:
            self._cut_done.add(key)
            half = (len(payload) - start) // 2
            h.wfile.write(payload[start:start + half])
            h.wfile.flush()
            self.release.wait(60)
            start += half
        h.wfile.write(payload[start:])

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, commit: str | None = None) -> None:
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Length", "0")
        h.end_headers()
