#!/usr/bin/env python3
"""The image's dependency layers: which locked packages go where, and what each costs to pull.

One definition serves the build and the estimate. `split` runs inside the Dockerfile's builder
stage and moves the files of the CUDA group (torch, triton, nvidia-*, cuda-*) out of the venv into
a tree of their own, so the runtime stage copies them as a layer that changes only when torch does.
`estimate` (the default) reads uv.lock, walks the packages the image installs for its extras and
prints each layer's compressed size: the sum of the locked wheels' `size` (a wheel is a zip, a
layer a gzip tar of the same files, so the two are close; the bytecode uv compiles in the build comes on
top). The project layer is measured by gzipping the files the Dockerfile copies; the apt layer is the
figure measured on the image `make image-check` builds.

    python scripts/layer_sizes.py [--python 3.12] [--extra liger ...]
    python scripts/layer_sizes.py split /opt/venv /layers/cuda     # in the builder stage
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_EXTRAS = ("liger", "tensorboard", "mlflow", "wandb")  # the Dockerfile's `uv sync --extra ...`
PROJECT_FILES = ("job", "entrypoint.py", "examples")  # the runtime stage's COPYs from the context
# Runtime-stage apt layer (python3, python3-dev, gcc, libc6-dev, tini, ca-certificates): not in uv.lock.
# Measured on the image `make image-check` builds (Debian bookworm stand-in base): 441 MB, 205 MB as
# gzip -6 of the layer's files. Ubuntu 24.04's packages are of the same size class (not measured here).
APT_LAYER_MB = 205.0


def in_cuda_group(name: str) -> bool:
    """torch and the wheels that change with it: the biggest part of the image."""
    return name in ("torch", "triton") or name.startswith(("nvidia-", "cuda-"))


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


# ------------------------------------------------------------------ split (in the builder)


def split(venv: Path, target: Path) -> int:
    """Move every file of the CUDA group's distributions (by their RECORD, plus the bytecode uv
    compiled next to them) from `venv` to the same relative path under `target`. Returns a count."""
    (site,) = venv.glob("lib/python3*/site-packages")
    moved = 0
    for dist_info in sorted(site.glob("*.dist-info")):
        name = normalize(dist_info.name.split("-", 1)[0])  # NAME-VERSION.dist-info, NAME with underscores
        if not in_cuda_group(name):
            continue
        with (dist_info / "RECORD").open(newline="") as handle:
            paths = [row[0] for row in csv.reader(handle) if row]
        for relative in paths:
            source = (site / relative).resolve()
            candidates = [source]
            if source.suffix == ".py":  # uv's compiled bytecode is not in RECORD
                candidates += source.parent.joinpath("__pycache__").glob(source.stem + ".*.pyc")
            for path in candidates:
                if not path.is_file() or not path.is_relative_to(venv):
                    continue
                destination = target / path.relative_to(venv)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, destination)
                moved += 1
    return moved


# ------------------------------------------------------------------ estimate (from uv.lock)


def supported_tags(python: tuple[int, int]) -> list:
    from packaging import tags

    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    return [*tags.cpython_tags(python, platforms=platforms), *tags.compatible_tags(python, platforms=platforms)]


def pick_wheel(package: dict, ranked: list) -> dict | None:
    from packaging.utils import parse_wheel_filename

    rank = {tag: index for index, tag in enumerate(ranked)}
    best = None
    for wheel in package.get("wheels", []):
        _, _, _, wheel_tags = parse_wheel_filename(wheel["url"].rsplit("/", 1)[1])
        score = min((rank[t] for t in wheel_tags if t in rank), default=None)
        if score is not None and (best is None or score < best[0]):
            best = (score, wheel)
    return best[1] if best else None


def installed_packages(lock: dict, python: tuple[int, int], extras: tuple[str, ...]) -> dict[str, dict]:
    """The locked packages `uv sync --no-dev --extra ...` installs for this interpreter, by name."""
    from packaging.markers import Marker

    environment = {
        "python_full_version": f"{python[0]}.{python[1]}.0",
        "python_version": f"{python[0]}.{python[1]}",
        "sys_platform": "linux",
        "platform_machine": "x86_64",
        "platform_system": "Linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    by_name: dict[str, list[dict]] = {}
    for package in lock["package"]:
        by_name.setdefault(package["name"], []).append(package)

    def applies(dependency: dict, extra: str = "") -> bool:
        marker = dependency.get("marker")
        return marker is None or Marker(marker).evaluate({**environment, "extra": extra})

    def resolve(dependency: dict) -> dict:
        candidates = by_name[dependency["name"]]
        if "version" in dependency:
            candidates = [p for p in candidates if p["version"] == dependency["version"]]
        return candidates[0]

    (project,) = [
        p
        for p in lock["package"]
        if p.get("source", {}).get("editable") == "." or p.get("source", {}).get("virtual") == "."
    ]
    wanted = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in project.get("optional-dependencies", {}):
            raise SystemExit(f"uv.lock has no extra {extra!r} for {project['name']}: run `uv lock` after adding it")
        wanted += project["optional-dependencies"][extra]
    seen: dict[str, dict] = {}
    while wanted:
        dependency = wanted.pop()
        if not applies(dependency):
            continue
        package = resolve(dependency)
        key = f"{package['name']}=={package['version']}"
        fresh = key not in seen
        seen[key] = package
        for extra in dependency.get("extra", []):
            wanted += [d for d in package.get("optional-dependencies", {}).get(extra, []) if applies(d, extra)]
        if fresh:
            wanted += package.get("dependencies", [])
    return {package["name"]: package for package in seen.values()}


def project_layer_bytes(root: Path) -> int:
    """gzip'd tar of what the runtime stage copies from the context (caches left out, as .dockerignore does)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped, tarfile.open(fileobj=zipped, mode="w") as tar:
        for name in PROJECT_FILES:
            tar.add(root / name, arcname=name, filter=lambda info: None if "__pycache__" in info.name else info)
    return len(buffer.getvalue())


def estimate(lock_path: Path, python: tuple[int, int], extras: tuple[str, ...]) -> list[tuple[str, float, str]]:
    lock = tomllib.loads(lock_path.read_text())
    ranked = supported_tags(python)
    groups: dict[str, list[tuple[str, int]]] = {"cuda": [], "deps": []}
    for name, package in sorted(installed_packages(lock, python, extras).items()):
        wheel = pick_wheel(package, ranked)
        if wheel is None:
            raise SystemExit(f"no wheel of {name} {package['version']} for CPython {python[0]}.{python[1]} x86_64")
        groups["cuda" if in_cuda_group(name) else "deps"].append((name, wheel["size"]))

    def describe(members: list[tuple[str, int]]) -> str:
        top = sorted(members, key=lambda m: -m[1])[:3]
        return f"{len(members)} wheels; largest " + ", ".join(f"{n} {s / 1e6:.0f}" for n, s in top)

    return [
        ("apt (tini, python3, gcc)", APT_LAYER_MB, "measured: gzip of the layer built by make image-check"),
        ("deps: torch + CUDA wheels", sum(s for _, s in groups["cuda"]) / 1e6, describe(groups["cuda"])),
        ("deps: everything else", sum(s for _, s in groups["deps"]) / 1e6, describe(groups["deps"])),
        ("project (job/, entrypoint, examples)", project_layer_bytes(lock_path.parent) / 1e6, "gzip of the files"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    split_cmd = sub.add_parser("split", help="move the CUDA group's files from VENV to TARGET (builder stage)")
    split_cmd.add_argument("venv", type=Path)
    split_cmd.add_argument("target", type=Path)
    parser.add_argument("--lock", type=Path, default=ROOT / "uv.lock")
    parser.add_argument("--python", default="3.12", help="the image's interpreter (Ubuntu 24.04: 3.12)")
    parser.add_argument("--extra", action="append", help=f"extras installed (default: {' '.join(IMAGE_EXTRAS)})")
    args = parser.parse_args(argv)
    if args.command == "split":
        count = split(args.venv, args.target)
        print(f"moved {count} files of torch, triton, nvidia-*, cuda-* to {args.target}")
        return 0 if count else 1
    python = tuple(int(part) for part in args.python.split(".")[:2])
    rows = estimate(args.lock, python, tuple(args.extra or IMAGE_EXTRAS))
    print(f"| layer (CPython {args.python}, linux x86_64) | compressed MB (wheels) | basis |")
    print("|---|---:|---|")
    for name, size, basis in rows:
        print(f"| {name} | {size:,.{0 if size >= 10 else 1}f} | {basis} |")
    print(f"| total (without the CUDA base image, without bytecode) | {sum(r[1] for r in rows):,.0f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
