"""How long a checkpoint blocks training: async save versus background upload alone versus synchronous.

Runs the real job three times (`entrypoint.py train` as a subprocess) on a ~100M-parameter Mistral built
locally, against a moto S3 server in its own process, saving every `--every` steps:

- async: the default (`checkpoint.async_save`): training is blocked only while the state is copied to
  host memory; the write to scratch and the upload run on threads;
- background: `checkpoint.async_save=false`: blocked by the local save; the upload runs on a thread;
- synchronous: `async_save=false`, `background_upload=false`: training waits for the save and the commit.

Prints the blocked seconds per checkpoint side by side and each path's median as a fraction of the
synchronous one, and the sha256 of every file of the first checkpoint as each path uploaded it (they
must be equal: what is committed is that step's state byte for byte, however it was written).

    python bench/checkpoint_stall.py [--steps 6 --every 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from s3_transfer import start_server

REPO = Path(__file__).resolve().parents[1]


def build_model(directory: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from job.model.tiny import write_tokenizer

    config = MistralConfig(
        vocab_size=32768,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return sum(p.numel() for p in model.parameters())


def run(mode: str, endpoint: str, model: Path, work: Path, steps: int, every: int) -> list[dict]:
    env = {
        **os.environ,
        "SFT_LOG_FORMAT": "json",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    args = [
        sys.executable, str(REPO / "entrypoint.py"), "train",
        "--config", str(REPO / "examples" / "cpu-demo.yaml"),
        "--set", f"run.name={mode}",
        "--set", "run.output=s3://bench/runs",
        "--set", f"run.scratch={work / mode}",
        "--set", f"model.source={model}",
        "--set", f"train.max_steps={steps}",
        "--set", "train.per_device_train_batch_size=4",
        "--set", f"checkpoint.every_steps={every}",
        "--set", "checkpoint.keep=10",
        "--set", "checkpoint.delete_after_final=false",
        "--set", f"checkpoint.async_save={mode == 'async'}",
        "--set", f"checkpoint.background_upload={mode != 'synchronous'}",
    ]  # fmt: skip
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    wanted = ("checkpoint_saved_locally", "checkpoint_committed", "checkpoint_written", "checkpoint_staging")
    return [line for line in lines if line.get("event") in wanted]


def uploaded_hashes(endpoint: str, run: str, step: int) -> dict[str, str]:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
    )
    prefix = f"runs/{run}/checkpoints/checkpoint-{step:08d}/"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="bench", Prefix=prefix)["Contents"]]
    return {
        key.removeprefix(prefix): hashlib.sha256(client.get_object(Bucket="bench", Key=key)["Body"].read()).hexdigest()
        for key in sorted(keys)
        if not key.endswith("MANIFEST.json")
    }


MODES = ("async", "background", "synchronous")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=3)
    args = parser.parse_args()
    server, endpoint = start_server()
    try:
        import boto3

        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="b", aws_secret_access_key="b", region_name="us-east-1"
        ).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            params = build_model(work / "model")
            results = {mode: run(mode, endpoint, work / "model", work, args.steps, args.every) for mode in MODES}
            first = args.every
            hashes = {mode: uploaded_hashes(endpoint, mode, first) for mode in results}
    finally:
        server.kill()

    def events(mode: str, name: str) -> list[dict]:
        return [e for e in results[mode] if e["event"] == name]

    def blocked(mode: str) -> list[float]:
        return [e["blocked_seconds"] for e in events(mode, "checkpoint_saved_locally")]

    size = events("async", "checkpoint_committed")[0]["bytes"]
    staging = events("async", "checkpoint_staging")
    synchronous = statistics.median(blocked("synchronous"))
    print(f"model: {params / 1e6:.0f}M parameters, checkpoint {size / 2**20:.0f} MiB, {args.steps} steps, "
          f"a checkpoint every {args.every}")  # fmt: skip
    if staging:
        print(f"async staging: {staging[0]['mode']} ({staging[0]['reason']})")
    print(f"{'path':<14}{'blocked per checkpoint (s)':>30}{'median':>10}{'/ synchronous':>16}")
    for mode in MODES:
        median = statistics.median(blocked(mode))
        per = ", ".join(f"{b:.2f}" for b in blocked(mode))
        print(f"{mode:<14}{per:>30}{median:>10.2f}{median / synchronous:>16.1%}")
    written = [e["seconds"] for e in events("async", "checkpoint_written")]
    waited = [e["waited_for_previous_write_seconds"] for e in events("async", "checkpoint_saved_locally")]
    print(f"async background write per checkpoint (s): {', '.join(f'{w:.2f}' for w in written)}")
    print(f"async blocked time spent waiting for the previous write (s): {', '.join(f'{w:.2f}' for w in waited)}")
    fraction = statistics.median(blocked("async")) / synchronous
    print(f"blocked / synchronous, async save: {fraction:.1%} (target <= 5%)")
    same = all(hashes[mode] == hashes["synchronous"] for mode in MODES)
    print(f"sha256 of checkpoint-{first} files as each path uploaded them: {'EQUAL' if same else 'DIFFERENT'}")
    for name in hashes["synchronous"]:
        print(f"  {name:<24}" + "  ".join(f"{hashes[mode].get(name, '-')[:16]:<16}" for mode in MODES))
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
