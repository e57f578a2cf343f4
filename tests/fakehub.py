"""A small fake Hugging Face hub on 127.0.0.1, for testing downloads without the network.

It serves folders of files as model repos, with the endpoints huggingface_hub 2.x's
`snapshot_download` / `hf_hub_download` call (read from its source):

    GET  /api/models/{repo}/revision/{rev}          repo info: sha + siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing (size, oid, lfs)
    HEAD /{repo}/resolve/{rev}/{file}               X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{file}               the bytes (Range supported)

Errors carry the `X-Error-Code` header huggingface_hub maps to its exceptions
(RepoNotFound, RevisionNotFound, EntryNotFound). Point huggingface_hub at it with
`HF_ENDPOINT=hub.url` (pocketlm reads it at call time). Every request is logged in
`hub.requests` so a test can prove it made none. `make_tiny_gpt2` builds a repo folder.
"""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
from safetensors.numpy import save_file

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")  # stored in git-lfs on the real hub
GPT2_DATA = Path(__file__).parents[1] / "src" / "pocketlm" / "data" / "gpt2"


class FakeHub:
    """Serve `{repo_id: folder}` over HTTP; use as a context manager."""

    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, folder: Path) -> None:
        self.repos[repo_id] = Path(folder)

    def commit(self, repo_id: str) -> str:
        """A stable 40-hex commit id derived from the repo's contents."""
        digest = hashlib.sha1(repo_id.encode())
        for name, info in sorted(self.files(repo_id).items()):
            digest.update(f"{name}:{info['oid']}".encode())
        return digest.hexdigest()

    def files(self, repo_id: str) -> dict[str, dict]:
        """path -> {size, oid (git blob sha1), sha256, lfs}."""
        folder = self.repos[repo_id]
        result = {}
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = file.read_bytes()
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            result[file.relative_to(folder).as_posix()] = {
                "size": len(data),
                "oid": blob,
                "sha256": hashlib.sha256(data).hexdigest(),
                "lfs": file.suffix in LFS_SUFFIXES,
            }
        return result

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def do_GET(self) -> None:
        self._route(send_body=True)

    def end_headers(self) -> None:
        # One request per connection: a kept-alive connection would outlive `stop()` and
        # let a test's "hub is down now" request still reach the old handler thread.
        self.send_header("Connection", "close")
        self.close_connection = True
        super().end_headers()

    def _route(self, *, send_body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, kind, revision = "/".join(parts[2:4]), parts[4], parts[5]
            if kind == "revision":
                return self._repo_info(repo_id, revision)
            if kind == "tree":
                return self._tree(repo_id, revision, "/".join(parts[6:]))
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            return self._resolve(repo_id, revision, file, send_body=send_body)
        self._error(404, "RepoNotFound")

    def _check(self, repo_id: str, revision: str) -> str | None:
        """The commit for (repo, revision), or None after sending the error."""
        if repo_id not in self.hub.repos:
            self._error(404, "RepoNotFound")
            return None
        commit = self.hub.commit(repo_id)
        if revision not in ("main", commit):
            self._error(404, "RevisionNotFound")
            return None
        return commit

    def _repo_info(self, repo_id: str, revision: str) -> None:
        if (commit := self._check(repo_id, revision)) is None:
            return
        siblings = [{"rfilename": name} for name in self.hub.files(repo_id)]
        info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False}
        self._json({**info, "siblings": siblings})

    def _tree(self, repo_id: str, revision: str, prefix: str) -> None:
        if self._check(repo_id, revision) is None:
            return
        entries = []
        for name, info in self.hub.files(repo_id).items():
            if prefix and not name.startswith(prefix.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "path": name, "size": info["size"], "oid": info["oid"]}
            if info["lfs"]:
                entry["lfs"] = {"oid": info["sha256"], "size": info["size"], "pointerSize": 134}
            entries.append(entry)
        self._json(entries)

    def _resolve(self, repo_id: str, revision: str, file: str, *, send_body: bool) -> None:
        if (commit := self._check(repo_id, revision)) is None:
            return
        info = self.hub.files(repo_id).get(file)
        if info is None:
            return self._error(404, "EntryNotFound", commit=commit)
        data = (self.hub.repos[repo_id] / file).read_bytes()
        start = _range_start(self.headers.get("Range"))
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", commit)
        etag = info["sha256"] if info["lfs"] else info["oid"]
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _json(self, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, *, commit: str | None = None) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _range_start(header: str | None) -> int:
    """The start of a `Range: bytes=N-` header (the only form huggingface_hub sends)."""
    if not header or not header.startswith("bytes="):
        return 0
    return int(header.removeprefix("bytes=").split("-")[0] or 0)


def make_tiny_gpt2(folder: Path) -> Path:
    """A hub-style GPT-2 repo folder: config for 2 layers x 16 wide, the embedding tensors
    (enough for sources and cards, not for loading), the tokenizer files, and files that a
    download must skip (a pickle, a README, a copy in a sub-folder)."""
    folder.mkdir(parents=True)
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 16,
              "n_layer": 2, "n_head": 2, "n_positions": 32, "vocab_size": 50257}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    tensors = {"wte.weight": rng.standard_normal((50257, 16), dtype=np.float32),
               "wpe.weight": rng.standard_normal((32, 16), dtype=np.float32)}  # fmt: skip
    save_file(tensors, str(folder / "model.safetensors"))
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((GPT2_DATA / name).read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    (folder / "README.md").write_text("# tiny")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.safetensors").write_bytes(b"onnx copy")
    return folder
