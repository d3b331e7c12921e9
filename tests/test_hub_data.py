"""Hub datasets and sources without network: a real huggingface_hub cache layout read offline, and a local
HTTP stand-in for the Hub whose answers (data, 401, 403, gated, 404, 503) go through huggingface_hub's own
error handling, so the exit codes are checked against the library, not a mock of it."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from conftest import go_offline, write_cache
from job.config.schema import DataConfig, SourceConfig, StorageConfig
from job.data.hub import fetch_hub_dataset, parse_hub_uri
from job.data.read import list_data_files
from job.data.sources import fetch_source, fetch_sources
from job.errors import AccessDenied, ConfigError, InputNotFound, StorageUnavailable

FIXTURES = Path(__file__).parent / "fixtures" / "data"
MAIN = "1" * 40
V1 = "2" * 40
TOKEN = "hf_standin_secret_token"
TRAIN = (FIXTURES / "messages.jsonl").read_bytes()
FILES = {
    "README.md": b"---\nlicense: mit\n---\n# a dataset\n",
    ".gitattributes": b"*.parquet filter=lfs\n",
    "data/train.jsonl": TRAIN,
    "data/extra.jsonl": TRAIN[: TRAIN.index(b"\n") + 1],
    "other/notes.txt": b"not data\n",
}


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("uri", "repo", "revision", "pattern"),
    [
        ("hf://datasets/o/n", "o/n", None, None),
        ("hf://datasets/o/n/", "o/n", None, None),
        ("hf://datasets/tatsu-lab/alpaca@main", "tatsu-lab/alpaca", "main", None),
        ("hf://datasets/o/n.v2@refs%2Fconvert%2Fparquet/default/train/*.parquet", "o/n.v2", "refs/convert/parquet",
         "default/train/*.parquet"),
        (f"hf://datasets/o/n@{MAIN}/data/train.jsonl", "o/n", MAIN, "data/train.jsonl"),
    ],
)  # fmt: skip
def test_parse_hub_uri(uri, repo, revision, pattern) -> None:
    parsed = parse_hub_uri(uri)
    assert (parsed.repo, parsed.revision, parsed.pattern) == (repo, revision, pattern)
    assert parse_hub_uri(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("uri", "text"),
    [
        ("hf://o/n", "not a dataset"),
        ("hf://models/o/n", "a model repository"),
        ("hf://datasets/alpaca", "names no dataset"),
        ("hf://datasets/o/n@", "empty revision"),
        ("hf://datasets/o/bad name", "not a valid Hub name"),
        ("hf://datasets/o--x/n", "not a valid Hub name"),
        ("hf://datasets/o/n/../secrets/*", "inside the repository"),
    ],
)
def test_bad_hub_uris_say_what_and_show_the_syntax(uri, text) -> None:
    with pytest.raises(ConfigError, match=text) as info:
        parse_hub_uri(uri)
    assert info.value.exit_code == 64 and "hf://datasets/" in str(info.value)


def test_a_plain_path_selects_a_file_or_a_folder() -> None:
    assert parse_hub_uri("hf://datasets/o/n/data").allow_patterns == ["data", "data/*"]
    assert parse_hub_uri("hf://datasets/o/n/data/*.jsonl").allow_patterns == ["data/*.jsonl"]
    assert parse_hub_uri("hf://datasets/o/n").allow_patterns is None


# ---------------------------------------------------------------- environment


# ---------------------------------------------------------------- offline: a cache on disk


def test_offline_reads_the_cached_snapshot_and_its_commit(hub_env, monkeypatch) -> None:
    write_cache(hub_env / "hub", "o/n", {"main": MAIN, "v1": V1}, FILES)
    go_offline(monkeypatch)
    fetched = fetch_hub_dataset("hf://datasets/o/n", hub_env)
    assert (fetched.commit, fetched.repo, fetched.revision) == (MAIN, "o/n", None)
    assert fetched.root == hub_env / "hub" / "datasets--o--n" / "snapshots" / MAIN
    # README.md, .gitattributes and other suffixes are not data: the reader's suffix filter drops them.
    assert [p.relative_to(fetched.root).as_posix() for p in list_data_files(fetched.root)] == [
        "data/extra.jsonl",
        "data/train.jsonl",
    ]
    assert fetch_hub_dataset("hf://datasets/o/n@v1", hub_env).commit == V1


def test_offline_pattern_gives_a_root_with_only_the_matching_files(hub_env, monkeypatch) -> None:
    write_cache(hub_env / "hub", "o/n", {"main": MAIN}, FILES)
    go_offline(monkeypatch)
    fetched = fetch_hub_dataset("hf://datasets/o/n/data/train.*", hub_env)
    assert fetched.pattern == "data/train.*"
    files = [p.relative_to(fetched.root).as_posix() for p in sorted(fetched.root.rglob("*")) if p.is_file()]
    assert files == ["data/train.jsonl"]
    assert (fetched.root / "data/train.jsonl").read_bytes() == TRAIN
    with pytest.raises(InputNotFound, match=r"no file matching data/\*.parquet") as info:
        fetch_hub_dataset("hf://datasets/o/n/data/*.parquet", hub_env)
    assert info.value.exit_code == 66


@pytest.mark.parametrize("uri", ["hf://datasets/o/absent", "hf://datasets/o/n@no-such-tag"])
def test_offline_without_the_snapshot_is_input_not_found(hub_env, monkeypatch, uri) -> None:
    write_cache(hub_env / "hub", "o/n", {"main": MAIN}, FILES)
    go_offline(monkeypatch)
    with pytest.raises(InputNotFound, match="HF_HUB_OFFLINE") as info:
        fetch_hub_dataset(uri, hub_env)
    assert info.value.exit_code == 66


def test_offline_uses_hf_hub_cache_when_set(hub_env, monkeypatch, tmp_path) -> None:
    write_cache(tmp_path / "shared-cache", "o/n", {"main": MAIN}, FILES)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "shared-cache"))
    go_offline(monkeypatch)
    assert fetch_hub_dataset("hf://datasets/o/n", hub_env).commit == MAIN


# ---------------------------------------------------------------- online: a local stand-in for the Hub


@dataclass
class StandIn:
    """Answers the Hub's API and resolve endpoints for a few repositories, as the Hub does."""

    endpoint: str = ""
    requests: list[str] = field(default_factory=list)
    auth_seen: list[str] = field(default_factory=list)


def make_handler(stand_in: StandIn) -> type[BaseHTTPRequestHandler]:
    refs = {"main": MAIN, "v1": V1}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def answer(self, status: int, body: bytes = b"", **headers: str) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key.replace("_", "-"), value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = unquote(urlsplit(self.path).path)
            stand_in.requests.append(f"{self.command} {path}")
            stand_in.auth_seen.append(self.headers.get("Authorization", ""))
            api = path.startswith("/api/datasets/")
            parts = path.removeprefix("/api/datasets/" if api else "/datasets/").split("/")
            repo, action, rest = "/".join(parts[:2]), parts[2] if len(parts) > 2 else "", parts[3:]
            authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
            if repo == "o/down":
                return self.answer(503, b"upstream unavailable")
            if repo == "o/badtoken":
                return self.answer(401, X_Error_Message="Invalid credentials in Authorization header")
            if repo == "o/forbidden":
                return self.answer(403, X_Error_Message="This token lacks read access")
            if repo not in ("o/n", "o/private", "o/gated") or (repo == "o/private" and not authorized):
                # The Hub answers 401 for a missing repository as for a private one.
                return self.answer(401 if not authorized else 404, X_Error_Code="RepoNotFound")
            revision = rest[0] if rest else "main"
            commit = refs.get(revision, revision if revision in refs.values() else None)
            if commit is None:
                return self.answer(404, X_Error_Code="RevisionNotFound")
            if api and action in ("revision", ""):  # no revision: the default branch
                info = {"id": repo, "sha": commit, "private": repo == "o/private"}
                return self.answer(200, json.dumps(info).encode(), Content_Type="application/json")
            if api and action == "tree":
                tree = [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in FILES.items()
                ]
                return self.answer(200, json.dumps(tree).encode(), Content_Type="application/json")
            if not api and action == "resolve":
                if repo == "o/gated" and not authorized:
                    return self.answer(403, X_Error_Code="GatedRepo", X_Error_Message="Access to this dataset is gated")
                data = FILES.get("/".join(rest[1:]))
                if data is None:
                    return self.answer(404, X_Error_Code="EntryNotFound")
                etag = '"' + hashlib.sha1(data).hexdigest() + '"'
                return self.answer(200, data, X_Repo_Commit=commit, ETag=etag)
            return self.answer(404)

    return Handler


@pytest.fixture
def stand_in(hub_env, monkeypatch) -> Iterator[StandIn]:
    state = StandIn()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("HF_ENDPOINT", state.endpoint)
    yield state
    server.shutdown()
    server.server_close()


def test_fetch_resolves_the_revision_to_a_commit_and_downloads_only_the_pattern(stand_in, hub_env) -> None:
    fetched = fetch_hub_dataset("hf://datasets/o/n@v1/data/*.jsonl", hub_env)
    assert fetched.commit == V1
    assert sorted(p.relative_to(fetched.root).as_posix() for p in fetched.root.rglob("*.jsonl")) == [
        "data/extra.jsonl",
        "data/train.jsonl",
    ]
    # Resolved once: the download cannot see a branch that moved after the commit was recorded.
    assert stand_in.requests.count("GET /api/datasets/o/n/revision/v1") == 1
    downloads = {r.split(" ", 1)[1] for r in stand_in.requests if "/resolve/" in r}
    # Downloaded at the commit, never at the moving branch name, and nothing outside the pattern.
    assert downloads == {f"/datasets/o/n/resolve/{V1}/data/train.jsonl", f"/datasets/o/n/resolve/{V1}/data/extra.jsonl"}


def test_an_online_fetch_then_works_offline_from_the_same_cache(stand_in, hub_env, monkeypatch) -> None:
    online = fetch_hub_dataset("hf://datasets/o/n/data", hub_env)
    go_offline(monkeypatch)
    before = len(stand_in.requests)
    offline = fetch_hub_dataset("hf://datasets/o/n/data", hub_env)
    assert offline.commit == online.commit == MAIN
    assert len(stand_in.requests) == before
    assert (offline.root / "data/train.jsonl").read_bytes() == TRAIN


def test_hf_token_is_sent_and_never_shown(stand_in, hub_env, monkeypatch, capsys) -> None:
    with pytest.raises(InputNotFound, match="HF_TOKEN is not set"):
        fetch_hub_dataset("hf://datasets/o/private", hub_env)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert fetch_hub_dataset("hf://datasets/o/private", hub_env).commit == MAIN
    assert f"Bearer {TOKEN}" in stand_in.auth_seen
    with pytest.raises(AccessDenied) as info:
        fetch_hub_dataset("hf://datasets/o/forbidden", hub_env)
    captured = capsys.readouterr()
    assert TOKEN not in str(info.value) + captured.out + captured.err


@pytest.mark.parametrize(
    ("uri", "error", "code", "text"),
    [
        ("hf://datasets/o/badtoken", AccessDenied, 77, "HTTP 401"),
        ("hf://datasets/o/forbidden", AccessDenied, 77, "HTTP 403"),
        ("hf://datasets/o/gated", AccessDenied, 77, "accept its terms"),
        ("hf://datasets/o/missing", InputNotFound, 66, "not found"),
        ("hf://datasets/o/n@no-such-branch", InputNotFound, 66, "no revision 'no-such-branch'"),
        ("hf://datasets/o/n/data/*.parquet", InputNotFound, 66, "no file matching"),
        ("hf://datasets/o/down", StorageUnavailable, 69, "HTTP 503"),
    ],
)
def test_hub_answers_map_to_exit_codes(stand_in, hub_env, uri, error, code, text) -> None:
    with pytest.raises(error, match=text) as info:
        fetch_hub_dataset(uri, hub_env)
    assert info.value.exit_code == code


def test_an_unreachable_hub_is_retryable(hub_env, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(StorageUnavailable, match="cannot reach the Hub") as info:
        fetch_hub_dataset("hf://datasets/o/n", hub_env)
    assert info.value.retryable


# ---------------------------------------------------------------- sources


def test_fetch_sources_local_and_hub_in_order(stand_in, hub_env) -> None:
    data = DataConfig(
        train=[str(FIXTURES / "messages.jsonl"), {"path": "hf://datasets/o/n@v1/data/train.jsonl", "weight": 2}]
    )
    local, hub = fetch_sources(data, hub_env, StorageConfig())
    assert (local.index, local.name, local.root, local.revision) == (
        0,
        str(FIXTURES / "messages.jsonl"),
        FIXTURES / "messages.jsonl",
        None,
    )
    assert (hub.index, hub.name, hub.revision, hub.config.weight) == (
        1,
        "hf://datasets/o/n@v1/data/train.jsonl",
        V1,
        2.0,
    )
    assert (hub.root / "data/train.jsonl").read_bytes() == TRAIN


def test_source_names_mask_credentials(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not supported") as info:
        fetch_source(SourceConfig("https://user:hunter2@example.com/d.jsonl"), 0, tmp_path, StorageConfig())
    assert "hunter2" not in str(info.value)


def test_a_hub_id_given_as_a_path_gets_the_hub_syntax_as_hint(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputNotFound, match="hf://datasets/tatsu-lab/alpaca"):
        fetch_source(SourceConfig("tatsu-lab/alpaca"), 0, tmp_path, StorageConfig())
    with pytest.raises(InputNotFound, match="does not exist"):
        fetch_source(SourceConfig("./missing.jsonl"), 0, tmp_path, StorageConfig())


def test_an_s3_source_is_pulled_into_scratch(s3_bucket, s3_settings, tmp_path) -> None:
    s3_bucket.put("sets/chat/train.jsonl", TRAIN)
    fetched = fetch_source(SourceConfig(f"{s3_bucket.uri}/sets/chat/"), 3, tmp_path, s3_settings)
    assert (fetched.index, fetched.revision) == (3, None)
    assert [p.read_bytes() for p in list_data_files(fetched.root)] == [TRAIN]
