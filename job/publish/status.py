"""Where a run stands, read from its store alone: no shell on the node, no cluster access needed.

Phases: `not-started` (nothing written yet), `training` (a live lease), `preempted-waiting`
(checkpoints or metrics but no live lease and no final output: a retry will resume),
`failed` (a non-retryable failure was recorded after the last lease heartbeat), `finished`.
Everything shown is redacted (URL credentials masked) and the failure message is cut: anyone who
can read the store can read `status`.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from typing import Any

from job.config.convert import load_yaml
from job.durability.checkpoints import checkpoint_prefix, stored_checkpoints
from job.durability.lease import LEASE_KEY, LeaseRecord, read_record
from job.durability.recorded_config import RESOLVED_CONFIG
from job.errors import InputNotFound
from job.logs import sanitize, shorten
from job.publish.export import FINAL_PREFIX
from job.publish.metrics import read_step_metrics
from job.storage import Store

FAILURE_KEY = "reports/failure.json"


def record_failure(store: Store, exit_code: int, error: str) -> None:
    """Leave a trace of a non-retryable failure for `status` (best effort: never masks the error)."""
    body = {"exit_code": exit_code, "error": shorten(error, 2000), "time": time.time()}
    with contextlib.suppress(Exception):  # the store may be the thing that failed
        store.write_bytes(FAILURE_KEY, json.dumps(body).encode())


def run_status(store: Store, now: float | None = None) -> dict[str, Any]:
    """The run's state as a dict; InputNotFound (66) when nothing was ever written for it."""
    now = time.time() if now is None else now
    config = _read_yaml(store, RESOLVED_CONFIG)
    lease = _read_lease(store)
    committed, _ = stored_checkpoints(store)
    final = store.read_manifest(FINAL_PREFIX)
    steps = read_step_metrics(store)
    failure = _read_json(store, FAILURE_KEY)
    if config is None and lease is None and not committed and not steps and final is None and failure is None:
        raise InputNotFound(f"no run at {store.uri}", hint="check run.output and run.name")

    checkpoints = []
    for step in committed:
        manifest = store.read_manifest(checkpoint_prefix(step))
        if manifest is not None:
            checkpoints.append({"step": step, "time": manifest.created, "bytes": manifest.total_bytes})
    # By the holder's clock against ours: a hint for people (the job itself never decides on wall clocks).
    live = lease is not None and not lease.is_released and lease.expires > now
    if final is not None:
        phase = "finished"
    elif live:
        phase = "training"
    elif failure is not None and (lease is None or failure["time"] >= lease.heartbeat):
        phase = "failed"
    elif checkpoints or steps:
        phase = "preempted-waiting"
    else:
        phase = "not-started"

    newest = checkpoints[0] if checkpoints else None
    # Redacted on the way out too: a config or failure recorded by an older version may hold credentials.
    return sanitize(
        {
            "uri": store.uri,
            "phase": phase,
            "config": _summary(config),
            "checkpoints": checkpoints,
            "newest_durable_step": newest["step"] if newest else None,
            "newest_durable_age_seconds": round(now - newest["time"], 1) if newest else None,
            "lease": {"holder": lease.holder, "live": live, "expires_in_seconds": round(lease.expires - now, 1)}
            if lease
            else None,
            "final": {"files": len(final.files), "bytes": final.total_bytes, "time": final.created} if final else None,
            "failure": failure,
            "last_metrics": _last_metrics(steps),
        },
        limit=2000,
    )


def _last_metrics(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not steps:
        return None
    last = steps[-1]
    recent = [s["seconds"] for s in steps[-50:] if s.get("seconds")]
    step_seconds = statistics.median(recent) if recent else None
    max_steps = last.get("max_steps")
    return {
        "step": last["step"],
        "max_steps": max_steps,
        "loss": last.get("loss"),
        "tokens_per_second": last.get("tokens_per_second"),
        "mfu": last.get("mfu"),
        "eta_seconds": round((max_steps - last["step"]) * step_seconds, 1) if max_steps and step_seconds else None,
    }


def _summary(config: dict[str, Any] | None) -> dict[str, Any] | None:
    if config is None:
        return None
    train = config.get("train", {})
    return {
        "model": config.get("model", {}).get("source"),
        "revision": config.get("model", {}).get("revision"),
        "data": config.get("data", {}).get("train"),
        "learning_rate": train.get("learning_rate"),
        "epochs": train.get("num_train_epochs"),
        "max_steps": train.get("max_steps"),
        "batch": f"{train.get('per_device_train_batch_size')} x {train.get('gradient_accumulation_steps')}",
        "optim": train.get("optim"),
    }


def _read_yaml(store: Store, key: str) -> Any:
    return load_yaml(store.read_bytes(key).decode(), f"{store.uri}/{key}") if store.exists(key) else None


def _read_json(store: Store, key: str) -> Any:
    return json.loads(store.read_bytes(key)) if store.exists(key) else None


def _read_lease(store: Store) -> LeaseRecord | None:
    """The lease record; a malformed one reads as released (a new start takes it after one watch)."""
    if not store.exists(LEASE_KEY):
        return None
    return read_record(store.read_bytes(LEASE_KEY)) or LeaseRecord("(malformed lease.json)", 0.0, 0.0, True)


def render_status(status: dict[str, Any]) -> str:
    """A few human lines; `--json` gives the full dict."""
    lines = [f"run:       {status['uri']}", f"phase:     {status['phase']}"]
    if status["config"]:
        c = status["config"]
        lines.append(
            f"config:    {c['model']} on {c['data']}, lr {c['learning_rate']}, batch {c['batch']}, {c['optim']}"
        )
    if status["newest_durable_step"] is not None:
        age = status["newest_durable_age_seconds"]
        lines.append(f"durable:   step {status['newest_durable_step']} ({age:.0f} s ago)")
    for ckpt in status["checkpoints"]:
        stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ckpt["time"]))
        lines.append(f"  checkpoint step {ckpt['step']:>7}  {stamp}  {ckpt['bytes'] / 2**30:.2f} GiB")
    if status["lease"]:
        lease = status["lease"]
        state = f"live, expires in {lease['expires_in_seconds']:.0f} s by its clock" if lease["live"] else "expired"
        lines.append(f"lease:     {lease['holder']} ({state})")
    if status["final"]:
        lines.append(f"final:     {status['final']['files']} files, {status['final']['bytes'] / 2**30:.2f} GiB")
    if status["failure"]:
        lines.append(f"failure:   exit {status['failure']['exit_code']}: {status['failure']['error']}")
    if status["last_metrics"]:
        m = status["last_metrics"]
        mfu = f"MFU {m['mfu']:.1%}" if m["mfu"] is not None else "MFU n/a (no GPU)"
        eta = f"ETA {m['eta_seconds']:.0f} s" if m["eta_seconds"] is not None else "ETA n/a"
        lines.append(
            f"last step: {m['step']}/{m['max_steps']} loss {m['loss']:.4f}, "
            f"{m['tokens_per_second']} tokens/s, {mfu}, {eta}"
        )
    return "\n".join(lines)
