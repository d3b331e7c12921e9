"""How long a checkpoint blocks training: background upload versus a synchronous save plus upload.

Runs the real job twice (`entrypoint.py train` as a subprocess) on a ~100M-parameter Mistral built
locally, against a moto S3 server in its own process, saving every `--every` steps:

- background: training is blocked only by the local save; the upload runs on a thread;
- synchronous: `checkpoint.background_upload=false`, training waits for the commit.

Prints the blocked seconds per checkpoint side by side, and the sha256 of every file of the
first checkpoint as the background path uploaded it and as the synchronous path did (they must
be equal: the upload reads complete files from disk, never live tensors).

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
        "--set", f"checkpoint.background_upload={mode == 'background'}",
    ]  # fmt: skip
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") in ("checkpoint_saved_locally", "checkpoint_committed")]


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
            results = {mode: run(mode, endpoint, work / "model", work, args.steps, args.every) for mode in
                       ("background", "synchronous")}  # fmt: skip
            first = args.every
            hashes = {mode: uploaded_hashes(endpoint, mode, first) for mode in results}
    finally:
        server.kill()

    def blocked(mode: str) -> list[float]:
        return [e["blocked_seconds"] for e in results[mode] if e["event"] == "checkpoint_saved_locally"]

    size = next(e["bytes"] for e in results["background"] if e["event"] == "checkpoint_committed")
    background, synchronous = statistics.median(blocked("background")), statistics.median(blocked("synchronous"))
    print(f"model: {params / 1e6:.0f}M parameters, checkpoint {size / 2**20:.0f} MiB, {args.steps} steps, "
          f"a checkpoint every {args.every}")  # fmt: skip
    print(f"{'path':<14}{'blocked per checkpoint (s)':>30}{'median':>10}")
    for mode in ("background", "synchronous"):
        print(f"{mode:<14}{', '.join(f'{b:.2f}' for b in blocked(mode)):>30}{statistics.median(blocked(mode)):>10.2f}")
    print(f"blocked / synchronous: {background / synchronous:.0%} (target <= 25%)")
    same = hashes["background"] == hashes["synchronous"]
    print(f"sha256 of checkpoint-{first} files, background vs synchronous upload: {'EQUAL' if same else 'DIFFERENT'}")
    for name in hashes["background"]:
        print(f"  {name:<22} {hashes['background'][name][:16]}  {hashes['synchronous'].get(name, '-')[:16]}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
