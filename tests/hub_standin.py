"""A local HTTP stand-in for the Hugging Face Hub's write API, for tests that push through huggingface_hub itself.

Enough of the Hub for `HfApi.create_repo` (409 when the repo exists) and `HfApi.upload_folder`: repo info,
README metadata validation, preupload, the git-LFS batch API with basic PUT uploads, and the NDJSON commit
endpoint. It does not speak Xet: with `upload_mode="regular"` every file travels base64 inside the commit
(the streamed multi-commit pipeline huggingface_hub uses when hf_xet is installed); with `upload_mode="lfs"`
(and Xet disabled in the client) files go through the LFS batch and PUT endpoints. Tokens have a role and the
namespaces they may write; `fail` answers a chosen status on a route (`create`, `info`, `validate`,
`preupload`, `lfs-batch`, `lfs-upload`, `commit`, or `*` for all).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_hash(data: bytes) -> str:
    """git's blob id: the oid the Hub reports for a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Token:
    role: str
    """`read` or `write`, as the Hub's user access tokens."""
    namespaces: frozenset[str]
    """Users and organisations this token's owner may create repos in and write to."""


@dataclass
class Repo:
    owner: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)
    """Paths committed as LFS pointers (their oid is the content's sha256)."""
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


@dataclass
class HubStandIn:
    endpoint: str = ""
    tokens: dict[str, Token] = field(default_factory=dict)
    repos: dict[str, Repo] = field(default_factory=dict)
    upload_mode: str = "regular"
    fail: dict[str, int] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    """`METHOD path route` of every request, in order."""
    auth_seen: list[str] = field(default_factory=list)
    created: list[dict] = field(default_factory=list)
    """The JSON body of every create-repo request."""
    validated: list[str] = field(default_factory=list)
    """README.md texts sent to validate-yaml."""
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def commit_count(self, repo: str) -> int:
        return len(self.repos[repo].commits) if repo in self.repos else 0


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def make_handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        # ---------------------------------------------------------------- plumbing

        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def answer(self, status: int, payload: object = None, **headers: str) -> None:
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key.replace("_", "-"), value)
            if payload is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def token(self) -> Token | None:
            header = self.headers.get("Authorization", "")
            return hub.tokens.get(header.removeprefix("Bearer ")) if header.startswith("Bearer ") else None

        def writer(self, repo: str) -> None:
            """Refuse unless the caller's token may write `repo` (401 bad token, 403 read-only or not its own)."""
            token = self.token()
            if token is None:
                raise _Refused(401, "Invalid credentials in Authorization header")
            if token.role != "write" or repo.split("/")[0] not in token.namespaces:
                raise _Refused(403, f"You don't have the rights to write to {repo}")

        def existing(self, repo: str) -> Repo:
            found = hub.repos.get(repo)
            token = self.token()
            visible = found is not None and (
                not found.private or (token is not None and found.owner in token.namespaces)
            )
            if not visible:  # the Hub answers a repo it will not show as it answers a missing one
                raise _Refused(401 if token is None else 404, "Repository not found", "RepoNotFound")
            return found

        # ---------------------------------------------------------------- routing

        def do_GET(self) -> None:
            self.route("GET", b"")

        def do_POST(self) -> None:
            self.route("POST", self.body())

        def do_PUT(self) -> None:
            self.route("PUT", self.body())

        def route(self, method: str, body: bytes) -> None:
            path = unquote(urlsplit(self.path).path)
            name, handler, args = self.match(method, path)
            with hub.lock:
                hub.requests.append(f"{method} {path} {name}")
                hub.auth_seen.append(self.headers.get("Authorization", ""))
            status = hub.fail.get(name, hub.fail.get("*"))
            if status is not None:
                return self.answer(status, {"error": f"stand-in answers {status}"})
            try:
                with hub.lock:
                    status, payload = handler(body, *args)
            except _Refused as refused:
                headers = {"X_Error_Code": refused.code} if refused.code else {}
                return self.answer(
                    refused.status, {"error": refused.message}, X_Error_Message=refused.message, **headers
                )
            self.answer(status, payload)

        def match(self, method: str, path: str) -> tuple[str, object, tuple]:
            parts = path.strip("/").split("/")
            if method == "POST" and path == "/api/repos/create":
                return "create", self.create, ()
            if method == "POST" and path == "/api/validate-yaml":
                return "validate", self.validate, ()
            if method == "POST" and len(parts) == 3 and parts[2] == "lfs-verify":
                return "lfs-verify", lambda body, *a: (200, {}), ()
            if method == "PUT" and parts[0] == "lfs-upload":
                return "lfs-upload", self.lfs_upload, (parts[1],)
            if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                return "lfs-batch", self.lfs_batch, ("/".join(parts[:2]).removesuffix(".git"),)
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo = "/".join(parts[2:4])
                if method == "GET" and (len(parts) == 4 or parts[4] == "revision"):
                    return "info", self.info, (repo,)
                if method == "POST" and len(parts) >= 5 and parts[4] == "preupload":
                    return "preupload", self.preupload, (repo,)
                if method == "POST" and len(parts) >= 5 and parts[4] == "commit":
                    return "commit", self.commit, (repo,)
            return "unknown", lambda body, *a: (404, {"error": f"no route {method} {path}"}), ()

        # ---------------------------------------------------------------- endpoints

        def create(self, body: bytes) -> tuple[int, object]:
            request = json.loads(body)
            hub.created.append(request)
            repo = f"{request['organization']}/{request['name']}"
            token = self.token()
            if token is None:
                raise _Refused(401, "Invalid credentials in Authorization header")
            if repo in hub.repos:
                return 409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo}"}
            if token.role != "write" or request["organization"] not in token.namespaces:
                raise _Refused(403, f"You don't have the rights to create a model under the namespace {repo}")
            hub.repos[repo] = Repo(request["organization"], request.get("visibility") == "private")
            return 200, {"url": f"{hub.endpoint}/{repo}", "name": repo}

        def info(self, body: bytes, repo: str) -> tuple[int, object]:
            found = self.existing(repo)
            siblings = [{"rfilename": name} for name in sorted(found.files)]
            return 200, {"id": repo, "modelId": repo, "sha": found.sha, "private": found.private, "siblings": siblings}

        def validate(self, body: bytes) -> tuple[int, object]:
            hub.validated.append(json.loads(body)["content"])
            return 200, {"errors": [], "warnings": []}

        def preupload(self, body: bytes, repo: str) -> tuple[int, object]:
            found = self.existing(repo)
            self.writer(repo)
            answers = []
            for file in json.loads(body)["files"]:
                mode = "regular" if file["size"] == 0 else hub.upload_mode
                content = found.files.get(file["path"])
                oid = None
                if content is not None:
                    oid = hashlib.sha256(content).hexdigest() if file["path"] in found.lfs else git_hash(content)
                answers.append({"path": file["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            return 200, {"files": answers, "commitOid": found.sha}

        def lfs_batch(self, body: bytes, repo: str) -> tuple[int, object]:
            self.existing(repo)
            self.writer(repo)
            objects = []
            for item in json.loads(body)["objects"]:
                entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
                if item["oid"] not in hub.lfs_objects:  # no actions: the Hub has the content already
                    entry["actions"] = {
                        "upload": {"href": f"{hub.endpoint}/lfs-upload/{item['oid']}"},
                        "verify": {"href": f"{hub.endpoint}/{repo}.git/lfs-verify"},
                    }
                objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects}

        def lfs_upload(self, body: bytes, oid: str) -> tuple[int, object]:
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, {"error": "content does not match its oid"}
            hub.lfs_objects[oid] = body
            return 200, None

        def commit(self, body: bytes, repo: str) -> tuple[int, object]:
            found = self.existing(repo)
            self.writer(repo)
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            changes: dict[str, tuple[bytes, bool]] = {}
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    changes[value["path"]] = (base64.b64decode(value["content"]), False)
                elif line["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs_objects:
                        return 422, {"error": f"LFS object {value['oid']} was never uploaded"}
                    changes[value["path"]] = (hub.lfs_objects[value["oid"]], True)
            for path, (content, lfs) in changes.items():
                found.files[path] = content
                (found.lfs.add if lfs else found.lfs.discard)(path)
            sha = hashlib.sha1(f"{found.sha}{sorted(changes)}{lines[0]}".encode(), usedforsecurity=False).hexdigest()
            found.commits.append(sha)
            return 200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{sha}", "commitOid": sha, "success": True}

    return Handler


@contextmanager
def serve_hub(hub: HubStandIn | None = None) -> Iterator[HubStandIn]:
    """Run the stand-in on a free loopback port for the duration of the block; `hub.endpoint` is its URL."""
    hub = hub or HubStandIn()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    hub.endpoint = f"http://127.0.0.1:{server.server_port}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
