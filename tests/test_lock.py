"""uv.lock, the image's lock file: static checks that need no network.

(`uv lock --check` in .ci/deploy-checks.sh is the authoritative "lock matches pyproject" check;
it needs PyPI.) Here: torch is the CUDA >= 12.8 build and the same release CI tests on CPU,
every locked package installs on the image's Python and platform, and the lock's view of the
project's dependencies matches pyproject.toml.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = tomllib.loads((ROOT / "uv.lock").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = {p["name"]: p for p in LOCK["package"]}

# Ubuntu release of the image's base -> its python3.
UBUNTU_PYTHON = {"22.04": (3, 10), "24.04": (3, 12), "26.04": (3, 14)}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0))


def image_python() -> tuple[int, int]:
    text = (ROOT / "Dockerfile").read_text()
    ubuntu = re.search(r"^ARG UBUNTU_VERSION=([\d.]+)$", text, re.M).group(1)
    return UBUNTU_PYTHON[ubuntu]


def wheel_fits(filename: str, python: tuple[int, int]) -> bool:
    """Does a wheel install on CPython `python`, manylinux x86_64?"""
    stem = filename.removesuffix(".whl")
    python_tags, abi_tags, platform_tags = stem.split("-")[-3:]
    cp = f"cp{python[0]}{python[1]}"
    platform_ok = any(t == "any" or (t.endswith("_x86_64") and "linux" in t) for t in platform_tags.split("."))
    for py in python_tags.split("."):
        for abi in abi_tags.split("."):
            if py in {"py3", f"py{python[0]}{python[1]}"} and abi == "none":
                return platform_ok
            if py == cp and abi in {cp, "none"}:
                return platform_ok
            if abi == "abi3" and py.startswith("cp3") and int(py[3:]) <= python[1]:
                return platform_ok
    return False


def test_wheel_fits():
    assert wheel_fits("torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl", (3, 12))
    assert not wheel_fits("torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl", (3, 12))
    assert not wheel_fits("torch-2.13.0-cp312-cp312-manylinux_2_28_aarch64.whl", (3, 12))
    assert wheel_fits("six-1.17.0-py2.py3-none-any.whl", (3, 12))
    assert wheel_fits("cryptography-45-cp311-abi3-manylinux_2_34_x86_64.whl", (3, 12))


def test_torch_is_a_cuda_12_8_or_newer_build():
    torch = PACKAGES["torch"]
    deps = {d["name"] for d in torch["dependencies"]}
    if "cuda-toolkit" in deps:  # CUDA 13 wheels depend on the cuda-toolkit meta package
        version = PACKAGES["cuda-toolkit"]["version"]
    else:
        assert "nvidia-cuda-runtime-cu12" in deps, "torch without CUDA runtime dependencies is a CPU build"
        version = PACKAGES["nvidia-cuda-runtime-cu12"]["version"]
    major, minor = (int(x) for x in version.split(".")[:2])
    assert (major, minor) >= (12, 8), f"torch's CUDA {version} cannot run Blackwell (sm_120)"
    assert "+cpu" not in torch["version"]
    assert torch["source"] == {"registry": "https://pypi.org/simple"}


def test_torch_is_the_release_ci_tests():
    constraints = PYPROJECT["tool"]["uv"]["constraint-dependencies"]
    (pin,) = [c for c in constraints if requirement_name(c) == "torch"]
    assert pin == f"torch=={PACKAGES['torch']['version']}"
    # .ci/run calls `make test`, whose set-up (the Makefile) installs the CPU torch CI tests with.
    setup = (ROOT / "Makefile").read_text()
    tested = re.search(r"torch==([\w.+]+)", setup)
    assert tested is not None, "the Makefile must pin the torch release CI tests"
    assert tested.group(1).split("+")[0] == PACKAGES["torch"]["version"], "the image must run the torch CI tests"


def test_lock_is_resolved_for_the_image_platform_only():
    assert PYPROJECT["tool"]["uv"]["environments"] == ["sys_platform == 'linux' and platform_machine == 'x86_64'"]
    assert LOCK["requires-python"] == PYPROJECT["project"]["requires-python"]


def test_image_python_satisfies_requires_python():
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert image_python() >= (int(minimum.group(1)), int(minimum.group(2)))


IMAGE_EXTRAS = ("liger", "tensorboard", "mlflow", "wandb")
"""Extras the Dockerfile's `uv sync --extra` installs (tests/test_dockerfile.py checks the flag)."""


def test_every_runtime_package_installs_on_the_image_python():
    python = image_python()
    project = PACKAGES["sft-job"]
    wanted = [requirement_name(d["name"]) for d in project["dependencies"]]
    wanted += [norm(d["name"]) for extra in IMAGE_EXTRAS for d in project["optional-dependencies"][extra]]
    seen: set[str] = set()
    while wanted:  # the runtime closure (the `dev` extra is not in the image)
        name = wanted.pop()
        if name in seen:
            continue
        seen.add(name)
        package = PACKAGES[name]
        for dep in package.get("dependencies", []):
            wanted.append(norm(dep["name"]))
        for extra in {e for d in project["dependencies"] if d["name"] == name for e in d.get("extra", [])}:
            wanted += [norm(d["name"]) for d in package["optional-dependencies"][extra]]
        wheels = [w["url"].rsplit("/", 1)[-1] for w in package.get("wheels", [])]
        assert any(wheel_fits(w, python) for w in wheels) or "sdist" in package, f"{name}: nothing for {python}"
        assert all("hash" in w for w in package.get("wheels", [])), f"{name}: wheel without a hash"
    assert {"torch", "transformers", "trl", "boto3", "cuda-toolkit", "liger-kernel", "triton"} <= seen


def test_lock_lists_the_projects_dependencies():
    project = PACKAGES["sft-job"]
    locked = {norm(d["name"]) for d in project["dependencies"]}
    declared = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert locked == declared, "uv.lock is stale: run `uv lock`"
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        locked_extra = {norm(d["name"]) for d in project.get("optional-dependencies", {}).get(extra, [])}
        assert locked_extra == {requirement_name(r) for r in requirements}, f"uv.lock is stale ({extra}): `uv lock`"
    specifiers = {norm(r["name"]): r.get("specifier", "") for r in project["metadata"]["requires-dist"]}
    for requirement in PYPROJECT["project"]["dependencies"]:
        name = requirement_name(requirement)
        wanted = re.sub(r"\s+", "", requirement[len(re.match(r"[A-Za-z0-9._-]+", requirement).group(0)) :])
        assert sorted(specifiers[name].split(",")) == sorted(wanted.split(",")), f"{name}: lock says {specifiers[name]}"
