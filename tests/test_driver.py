"""job/host/driver.py: the node's NVIDIA driver against torch's CUDA runtime.

Real shared libraries stand in for the driver: each fake `libcuda.so.1` is compiled here with gcc and
exports `cuDriverGetVersion` and `cuInit` answering chosen values; the check loads them by path with
ctypes as it loads the real one. One end-to-end run shows `train` exiting 71 before it pulls anything.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from conftest import REPO, run_job
from job.errors import DriverIncompatible
from job.host.driver import (
    DriverInfo,
    check_driver,
    cuda_from_int,
    driver_supports,
    incompatible,
    parse_cuda,
    read_driver_version,
)

FAKE_LIBCUDA = """
int cuDriverGetVersion(int *version) { *version = VERSION; return 0; }
int cuInit(unsigned int flags) { return flags == 0 ? INIT : 1; }
"""
PROC_570 = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.20  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Tue Mar 25 00:00:00 UTC 2025\nGCC version:  gcc version 12.2.0\n"
)
PROC_580 = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Tue Sep 23 09:00:00 UTC 2025\n"


def build_fake_libcuda(directory: Path, version: int, init: int) -> Path:
    """A shared library named libcuda.so.1 in `directory` whose driver supports CUDA `version` and whose
    cuInit returns `init`."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the fake libcuda.so.1")
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "fake_libcuda.c"
    source.write_text(FAKE_LIBCUDA)
    library = directory / "libcuda.so.1"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f"-DVERSION={version}", f"-DINIT={init}", "-o", str(library), str(source)],
        check=True,
        capture_output=True,
    )
    return library


# ---------------------------------------------------------------- the rule, as pure functions


def test_versions_parse_and_convert() -> None:
    assert parse_cuda("13.0") == (13, 0) and parse_cuda("12.8.1") == (12, 8)
    assert parse_cuda(None) is None and parse_cuda("cpu") is None
    assert cuda_from_int(12080) == (12, 8) and cuda_from_int(13000) == (13, 0) and cuda_from_int(12020) == (12, 2)


@pytest.mark.parametrize(
    ("driver", "runtime", "runs"),
    [
        ((13, 0), (13, 0), True),
        ((13, 0), (13, 2), True),  # minor version compatibility within CUDA 13
        ((12, 2), (12, 8), True),
        ((13, 0), (12, 6), True),  # a newer driver runs older runtimes
        ((12, 8), (13, 0), False),  # a 570 driver and the image's CUDA 13.0 torch
        ((12, 9), (13, 0), False),
        ((11, 8), (12, 0), False),
    ],
)
def test_a_driver_runs_runtimes_of_its_major_and_older(driver, runtime, runs) -> None:
    assert driver_supports(driver, runtime) is runs


def test_driver_version_read_from_proc(tmp_path: Path) -> None:
    (tmp_path / "open").write_text(PROC_570)
    (tmp_path / "closed").write_text(PROC_580)
    assert read_driver_version(tmp_path / "open") == "570.133.20"
    assert read_driver_version(tmp_path / "closed") == "580.95.05"
    assert read_driver_version(tmp_path / "missing") is None


def test_the_message_names_driver_cuda_versions_and_the_fix() -> None:
    error = incompatible(DriverInfo("570.133.20", (12, 8), (13, 0)), "13.0", "too old")
    assert isinstance(error, DriverIncompatible) and error.exit_code == 71 and not error.retryable
    assert "driver 570.133.20 supports CUDA 12.8" in error.message and "built for CUDA 13.0" in error.message
    assert "NVIDIA driver >= 580.65.06" in error.hint and 'docs/deployment.md "GPU drivers"' in error.hint


# ---------------------------------------------------------------- real libraries, loaded by path


CASES = {  # name: (cuDriverGetVersion, cuInit)
    "r580": (13000, 0),
    "r590": (13010, 0),
    "r570": (12080, 0),
    "r535": (12020, 0),
    "compat-unsupported": (13000, 804),
    "compat-mismatch": (13000, 803),
    "no-device": (13000, 100),
    "broken": (13000, 999),
}


@pytest.fixture(scope="module")
def fake_drivers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("libcuda")
    return {name: build_fake_libcuda(root / name, *answers) for name, answers in CASES.items()}


@pytest.fixture
def proc_570(tmp_path: Path) -> Path:
    path = tmp_path / "version"
    path.write_text(PROC_570)
    return path


def test_a_new_enough_driver_passes_and_logs_one_line(fake_drivers, proc_570) -> None:
    with capture_logs() as logs:
        info = check_driver("13.0", library=str(fake_drivers["r590"]), proc_version=proc_570)
    assert info == DriverInfo("570.133.20", (13, 1), (13, 0))
    line = next(entry for entry in logs if entry["event"] == "gpu_driver")
    assert line["driver_cuda"] == "13.1" and line["runtime_cuda"] == "13.0" and line["driver_version"] == "570.133.20"
    assert line["minor_version_compatibility"] is False
    assert check_driver("12.6", library=str(fake_drivers["r580"]), proc_version=proc_570).driver_cuda == (13, 0)
    with capture_logs() as logs:
        assert check_driver("12.8", library=str(fake_drivers["r535"]), proc_version=proc_570) is not None
    assert next(e for e in logs if e["event"] == "gpu_driver")["minor_version_compatibility"] is True


def test_an_older_major_raises_71_naming_both_versions(fake_drivers, proc_570) -> None:
    with pytest.raises(DriverIncompatible) as raised:
        check_driver("13.0", library=str(fake_drivers["r570"]), proc_version=proc_570)
    assert "driver 570.133.20 supports CUDA 12.8" in raised.value.message and "CUDA 13.0" in raised.value.message
    assert "580.65.06" in raised.value.hint


@pytest.mark.parametrize("name", ["compat-unsupported", "compat-mismatch"])
def test_cuinit_refusing_the_driver_raises_71_whatever_torch_was_built_for(fake_drivers, proc_570, name) -> None:
    code = CASES[name][1]
    for runtime in ("13.0", None):  # a CPU-only torch too: the node's GPU is unusable
        with pytest.raises(DriverIncompatible, match=f"cuInit returned CUDA_ERROR_[A-Z_]+ \\({code}\\)"):
            check_driver(runtime, library=str(fake_drivers[name]), proc_version=proc_570)


def test_no_driver_no_device_or_a_cpu_torch_build_skip(fake_drivers, proc_570, tmp_path: Path) -> None:
    assert check_driver("13.0", library=str(tmp_path / "libcuda.so.1"), proc_version=proc_570) is None
    assert check_driver("13.0", library=str(fake_drivers["no-device"]), proc_version=proc_570) is None
    with capture_logs() as logs:
        assert check_driver("13.0", library=str(fake_drivers["broken"]), proc_version=proc_570) is None
    assert [e["cuinit"] for e in logs if e["event"] == "gpu_driver_init_failed"] == [999]
    # CPU-only torch: nothing to compare the driver with, even an old one.
    assert check_driver(None, library=str(fake_drivers["r570"]), proc_version=proc_570).runtime_cuda is None


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_exits_71_before_pulling_anything(tmp_path: Path) -> None:
    """`train` on a node whose libcuda.so.1 refuses to initialise (a forward-compatibility driver on an
    unsupported GPU, cuInit 804): exit 71, the reason in the log and in the run's failure record."""
    fake = build_fake_libcuda(tmp_path / "driver", 13000, 804)
    result = run_job(
        "train",
        "--config", str(REPO / "examples" / "cpu-demo.yaml"),
        "--set", f"run.output={tmp_path / 'outputs'}",
        "--set", f"run.scratch={tmp_path / 'scratch'}",
        env={"LD_LIBRARY_PATH": str(fake.parent)},
    )  # fmt: skip
    assert result.returncode == 71, result.stderr[-3000:]
    failed = result.events("job_failed")[0]
    assert failed["error_type"] == "DriverIncompatible" and failed["retryable"] is False
    assert "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE (804), a CUDA forward-compatibility" in failed["error"]
    assert "supports CUDA 13.0" in failed["error"] and 'docs/deployment.md "GPU drivers"' in failed["hint"]
    assert not result.events("prepare") and not (tmp_path / "scratch").exists()  # nothing pulled or written
    record = json.loads((tmp_path / "outputs" / "cpu-demo" / "reports" / "failure.json").read_text())
    assert record["exit_code"] == 71
    print(json.dumps({k: failed[k] for k in ("exit_code", "error_type", "error", "hint")}, indent=1))
