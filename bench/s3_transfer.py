"""Upload and download throughput: our S3 store versus `aws s3 cp --recursive`, same loopback endpoint.

    python bench/s3_transfer.py [--files 4 --size-mb 128 --runs 5] [--json out.json]

A moto S3 server runs in its own process (so it does not share our GIL); a directory of
several large random files goes up and comes back down, alternating ours and awscli's in
each run so that drift on a shared machine hits both alike. Ours is the job's real path:
`push_directory` (parallel multipart upload, sha256 manifest, ETag verification, manifest
last) and `pull` (parallel ranged downloads, skip record). Prints median and spread (min-max)
in MB/s (1 MB = 10^6 bytes) and the ratio ours/awscli of the medians.

awscli v1 pins botocore to one exact version, which would fight the job's boto3, so it is not
a dependency of the project: the script uses `aws` from PATH when that works, else installs
awscli into its own virtual environment under ~/.cache/sft-job-bench/ (PyPI needed once).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAUNCHER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
"""
MB = 1_000_000
BUCKET = "bench-bucket"


def find_awscli() -> list[str]:
    """A working `aws` command: from PATH, else from a private venv (awscli pins botocore exactly)."""
    on_path = shutil.which("aws")
    if on_path and subprocess.run([on_path, "--version"], capture_output=True).returncode == 0:
        return [on_path]
    home = Path.home() / ".cache" / "sft-job-bench" / "awscli"
    aws = home / "bin" / "aws"
    if not aws.exists():
        print(f"installing awscli into {home} ...", flush=True)
        venv.create(home, with_pip=True)
        subprocess.run([str(home / "bin" / "pip"), "install", "--quiet", "awscli"], check=True)
    return [str(aws)]


def start_server() -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-c", LAUNCHER]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(command, text=True, **pipes)
    port = process.stdout.readline().strip() if process.stdout else ""
    if not port.isdigit():
        process.kill()
        raise SystemExit("moto server did not start")
    return process, f"http://127.0.0.1:{port}"


def make_files(source: Path, files: int, size_mb: int) -> int:
    source.mkdir()
    chunk = os.urandom(MB)
    for index in range(files):
        with (source / f"model-{index:05d}.safetensors").open("wb") as handle:
            for _ in range(size_mb * 1024 * 1024 // MB):
                handle.write(os.urandom(16) + chunk[16:])  # no two blocks alike, cheap to make
    return sum(p.stat().st_size for p in source.iterdir())


class Contenders:
    """The two ways to move the directory; each call returns (wall seconds, client CPU s, server CPU s)."""

    def __init__(self, aws: list[str], server_pid: int, checksums: str) -> None:
        from job.config.schema import StorageConfig
        from job.storage.s3 import S3Store

        self.aws, self.server_pid = aws, server_pid
        self.store = S3Store(f"s3://{BUCKET}", StorageConfig(checksums=checksums))

    def cli(self, *words: str) -> None:
        subprocess.run([*self.aws, "s3", *words], check=True, stdout=subprocess.DEVNULL)

    def _server_cpu(self) -> float:
        fields = Path(f"/proc/{self.server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def _measure(self, action) -> tuple[float, float, float]:
        def cpu() -> float:
            me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime

        client, server, start = cpu(), self._server_cpu(), time.perf_counter()
        action()
        return time.perf_counter() - start, cpu() - client, self._server_cpu() - server

    def upload(self, who: str, source: Path, prefix: str) -> tuple[float, float, float]:
        if who == "ours":
            return self._measure(lambda: self.store.push_directory(source, prefix))
        destination = f"s3://{BUCKET}/{prefix}/"
        return self._measure(lambda: self.cli("cp", "--recursive", "--only-show-errors", str(source), destination))

    def download(self, who: str, prefix: str, target: Path) -> tuple[float, float, float]:
        if who == "ours":
            figures = self._measure(lambda: self.store.child(prefix).pull(target))
        else:
            source = f"s3://{BUCKET}/{prefix}/"
            figures = self._measure(lambda: self.cli("cp", "--recursive", "--only-show-errors", source, str(target)))
        shutil.rmtree(target)
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--size-mb", type=int, default=128, help="size of each file in MiB")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--checksums", default="when_required", help="our storage.checksums (the job's default)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    aws = find_awscli()
    server, endpoint = start_server()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    os.environ.pop("AWS_PROFILE", None)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # our lines: warnings only
    work = Path(tempfile.mkdtemp(prefix="s3bench-"))
    try:
        contenders = Contenders(aws, server.pid, args.checksums)
        contenders.cli("mb", f"s3://{BUCKET}")
        source = work / "src"
        total = make_files(source, args.files, args.size_mb)
        figures: dict[str, list[tuple[float, float, float]]] = {
            k: [] for k in ("ours_up", "aws_up", "ours_down", "aws_down")
        }
        print(f"{args.files} files, {total / MB:.0f} MB per transfer, {args.runs} runs, {endpoint}", flush=True)
        for run in range(args.runs):
            order = ("ours", "aws") if run % 2 == 0 else ("aws", "ours")  # alternate who goes first
            for who in order:
                figures[f"{who}_up"].append(contenders.upload(who, source, f"{who}-{run}"))
            for who in order:
                figures[f"{who}_down"].append(contenders.download(who, f"{who}-{run}", work / f"down-{who}"))
            for who in order:  # keep the server's memory flat
                contenders.cli("rm", "--recursive", "--only-show-errors", f"s3://{BUCKET}/{who}-{run}/")
            line = ", ".join(f"{key} {total / MB / values[-1][0]:.0f}" for key, values in figures.items())
            print(f"run {run + 1} MB/s: {line}", flush=True)
        report(figures, total, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if server.stdin:
            server.stdin.close()
        server.wait(timeout=30)


def report(figures: dict[str, list[tuple[float, float, float]]], total: int, args: argparse.Namespace) -> None:
    summary: dict[str, dict] = {}
    print(f"\n{'':<9}{'ours MB/s':>28}{'awscli MB/s':>28}{'ratio':>8}   CPU s/GB ours vs awscli (client+server)")
    print(f"{'':<9}{'median (min-max)':>28}{'median (min-max)':>28}")
    for direction in ("up", "down"):
        rates, cpu = {}, {}
        for who in ("ours", "aws"):
            runs = figures[f"{who}_{direction}"]
            rates[who] = [total / MB / wall for wall, _, _ in runs]
            cpu[who] = statistics.median((client + server) / (total / 1e9) for _, client, server in runs)
        ratio = statistics.median(rates["ours"]) / statistics.median(rates["aws"])
        summary[direction] = {"ours_mb_s": rates["ours"], "aws_mb_s": rates["aws"], "ratio": ratio, "cpu_s_per_gb": cpu}
        cells = [f"{statistics.median(r):.0f} ({min(r):.0f}-{max(r):.0f})" for r in (rates["ours"], rates["aws"])]
        name = "upload" if direction == "up" else "download"
        print(f"{name:<9}{cells[0]:>28}{cells[1]:>28}{ratio:>7.2f}x   {cpu['ours']:.1f} vs {cpu['aws']:.1f}")
    if args.json:
        meta = {"files": args.files, "size_mb": args.size_mb, "runs": args.runs, "checksums": args.checksums}
        args.json.write_text(json.dumps({**meta, **summary}, indent=1))


if __name__ == "__main__":
    main()
