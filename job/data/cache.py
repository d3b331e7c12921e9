"""The tokenization cache: tokenize once per data, tokenizer and settings, across restarts and nodes.

Two kinds of entries, both in scratch (`<scratch>/cache/`) and in the run's
store (`cache/`), so a restart on another node finds them:

- `validated/<data key>.json`: a record that these exact data files (by
  sha256) passed validation, with their counts and skipped records. A restart
  does not parse the data again before pulling the model.
- `<fingerprint>/`: the tokenized (and packed) splits saved by `datasets`
  (Arrow, memory-mapped on load) with `summary.json`, committed by
  `MANIFEST.json` written last. The fingerprint covers the data key, the
  tokenizer (its serialized form and special tokens), the chat template, the
  masks, the length and truncation settings and packing.

A pulled entry is verified (sizes and sha256) before use. Failing to write
the cache never fails the run; it only costs the next start a tokenization.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from job.errors import JobError
from job.logs import get_logger
from job.storage import AlreadyCommitted, AlreadyExists, Store, join_key
from job.storage.manifest import MANIFEST_NAME, build_manifest, verify_directory

log = get_logger(__name__)

CACHE_VERSION = 3
"""Bump when the tokenized or packed layout or the masking rules change: old entries then miss.

2: packing by TRL's `pack_dataset` (rows of equal room are filled in another order).
3: `text` documents as blocks (`data.text_mode`); token counts before and after, special strings and
   the first sources in the statistics.
"""
STORE_PREFIX = "cache"
SUMMARY = "summary.json"


def fingerprint(parts: dict[str, Any]) -> str:
    """A stable hex digest of JSON-serialisable `parts`."""
    body = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def tokenizer_digest(tokenizer: Any) -> str:
    """What decides token ids: the serialized tokenizer (vocab, merges, normalizer, added tokens) and its
    special tokens, wherever it was loaded from."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None or backend.padding is not None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())  # call-time state, not the tokenizer: hash without it
            backend.no_truncation()
            backend.no_padding()
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()


class TokenizeCache:
    """Lookup and save of cache entries in `root` (scratch) and, when given, the run's store."""

    def __init__(self, root: Path, store: Store | None) -> None:
        self.root = root
        self.store = store

    # ---- validation records

    def read_validation(self, key: str) -> dict[str, Any] | None:
        local = self.root / "validated" / f"{key}.json"
        if local.is_file():
            return json.loads(local.read_text())
        if self.store is None:
            return None
        try:
            remote = join_key(STORE_PREFIX, "validated", f"{key}.json")
            if not self.store.exists(remote):
                return None
            record = json.loads(self.store.read_bytes(remote))
        except (JobError, ValueError) as exc:
            log.warning("validation_record_unreadable", key=key, error=str(exc))
            return None
        _write_atomically(local, json.dumps(record).encode())
        return record

    def write_validation(self, key: str, record: dict[str, Any]) -> None:
        data = json.dumps(record, sort_keys=True).encode()
        _write_atomically(self.root / "validated" / f"{key}.json", data)
        if self.store is not None:
            try:
                self.store.write_bytes(join_key(STORE_PREFIX, "validated", f"{key}.json"), data, if_absent=True)
            except AlreadyExists:
                pass  # the same files were validated before: same record
            except JobError as exc:
                log.warning("validation_record_not_stored", key=key, error=str(exc))

    # ---- tokenized datasets

    def load(self, key: str) -> tuple[dict[str, Any], dict[str, Any], str] | None:
        """(splits, summary, where) of a complete entry, pulling it from the store if needed; else None."""
        local = self.root / key
        where = "scratch"
        if not (local / MANIFEST_NAME).is_file():
            if self.store is None or not self._pull(key, local):
                return None
            where = "store"
        import datasets

        try:
            summary = json.loads((local / SUMMARY).read_text())
            splits = {name: datasets.load_from_disk(str(local / name)) for name in summary["splits"]}
        except (OSError, ValueError, KeyError) as exc:  # damaged scratch: tokenize again
            log.warning("tokenize_cache_damaged", fingerprint=key, where=where, error=str(exc))
            shutil.rmtree(local, ignore_errors=True)
            return None
        return splits, summary, where

    def _pull(self, key: str, local: Path) -> bool:
        prefix = join_key(STORE_PREFIX, key)
        try:
            manifest = self.store.read_manifest(prefix) if self.store else None
            if manifest is None:
                return False
            partial = self.root / f".{key}.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            self.store.pull(partial, prefix)  # type: ignore[union-attr]
            problems = verify_directory(partial, manifest)
        except JobError as exc:
            problems = [str(exc)]
        if problems:
            log.warning("tokenize_cache_damaged", fingerprint=key, problems=problems[:5])
            shutil.rmtree(self.root / f".{key}.partial-{os.getpid()}", ignore_errors=True)
            return False
        (partial / MANIFEST_NAME).write_bytes(manifest.to_json())
        _rename_into_place(partial, local)
        return True

    def save(self, key: str, splits: dict[str, Any], summary: dict[str, Any]) -> Path:
        """Write the entry to scratch (manifest last, then one rename); returns its directory."""
        local = self.root / key
        partial = self.root / f".{key}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name, dataset in splits.items():
            dataset.save_to_disk(str(partial / name))
        (partial / SUMMARY).write_text(json.dumps({**summary, "splits": sorted(splits)}, indent=1, sort_keys=True))
        manifest = build_manifest(partial, {"fingerprint": key, "created": time.time()})
        (partial / MANIFEST_NAME).write_bytes(manifest.to_json())
        _rename_into_place(partial, local)
        return local

    def publish(self, key: str, local: Path) -> None:
        """Push the entry to the run's store (manifest last); a failure is logged, never raised."""
        if self.store is None:
            return
        prefix = join_key(STORE_PREFIX, key)
        started = time.monotonic()
        try:
            if self.store.is_committed(prefix):
                return
            manifest = self.store.push_directory(local, prefix, {"fingerprint": key})
        except AlreadyCommitted:
            return  # another writer committed the same entry first
        except JobError as exc:
            log.warning("tokenize_cache_not_stored", fingerprint=key, error=str(exc))
            return
        log.info(
            "tokenize_cache_stored",
            uri=f"{self.store.uri}/{prefix}",
            bytes=manifest.total_bytes,
            seconds=round(time.monotonic() - started, 2),
        )


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _rename_into_place(partial: Path, final: Path) -> None:
    """Make `partial` the entry; if another process finished the same entry first, keep theirs."""
    if final.exists() and not (final / MANIFEST_NAME).is_file():
        shutil.rmtree(final)  # not an entry: a manifest-less directory is never read
    try:
        partial.rename(final)
    except OSError:
        if not (final / MANIFEST_NAME).is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)
