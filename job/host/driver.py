"""The node's NVIDIA driver against the image's CUDA runtime, checked before anything touches the GPU.

With a driver too old for its CUDA runtime, PyTorch does not stop: `torch.cuda.is_available()` warns and
answers False, and the job would plan and train on the CPU, or fail deep inside CUDA initialisation. So
before torch initialises CUDA, `check_driver` loads the driver's own library (`libcuda.so.1`, mounted from
the node by the container runtime or GKE's device plugin), asks which CUDA version it supports
(`cuDriverGetVersion`), initialises it (`cuInit`), and compares with the runtime torch was built for
(`torch.version.cuda`).

The rule (NVIDIA's CUDA Compatibility guide, minor version compatibility): from CUDA 11 on, a runtime runs on
any driver of its own major release from that major's minimum driver on (12.x: >= 525.60.13, 13.x: >= 580),
and on every newer driver. So a driver whose CUDA version has the runtime's major, or a newer one, passes;
an older major raises DriverIncompatible (71). A CUDA forward-compatibility package (`cuda-compat-13-0`)
replaces libcuda.so.1 itself: its version is the one read here, and `cuInit` answers 803/804 where it
cannot work (a kernel module it does not match, a GPU it does not support).
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

from job.errors import DriverIncompatible
from job.logs import get_logger

log = get_logger(__name__)

LIBCUDA = "libcuda.so.1"
PROC_VERSION = Path("/proc/driver/nvidia/version")
DOCS = 'docs/deployment.md "GPU drivers"'

CUDA_SUCCESS = 0
CUDA_ERROR_STUB_LIBRARY = 34
"""The toolkit's link-time stub, not a driver: no GPU here."""
CUDA_ERROR_NO_DEVICE = 100
INCOMPATIBLE: dict[int, str] = {
    35: "CUDA_ERROR_INSUFFICIENT_DRIVER: the driver is older than the CUDA runtime",  # the runtime's code
    803: "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH: the user-space driver (libcuda) does not match the kernel module",
    804: "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE: a CUDA forward-compatibility driver this GPU does not support",
}
"""cuInit answers that mean the driver cannot run CUDA here at all."""

MINIMUM_DRIVER: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
"""The oldest driver of each CUDA major (CUDA Toolkit release notes, minor version compatibility)."""


@dataclass(frozen=True)
class DriverInfo:
    driver_version: str | None
    """The kernel module's version (`/proc/driver/nvidia/version`), e.g. 580.95.05; None where unreadable."""
    driver_cuda: tuple[int, int] | None
    """The newest CUDA version the loaded libcuda supports, e.g. (12, 8) for a 570 driver."""
    runtime_cuda: tuple[int, int] | None
    """The CUDA runtime torch was built for; None for a CPU-only build."""


def parse_cuda(text: str | None) -> tuple[int, int] | None:
    """`"13.0"` -> (13, 0); None for None or text that is not MAJOR.MINOR."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?", (text or "").strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_from_int(version: int) -> tuple[int, int]:
    """`cuDriverGetVersion`'s integer -> (major, minor): 12080 -> (12, 8), 13000 -> (13, 0)."""
    return version // 1000, (version % 1000) // 10


def driver_supports(driver_cuda: tuple[int, int], runtime_cuda: tuple[int, int]) -> bool:
    """Whether a driver supporting `driver_cuda` runs a `runtime_cuda` runtime: same major or newer
    (minor version compatibility within a major; backward compatibility across)."""
    return driver_cuda[0] >= runtime_cuda[0]


def read_driver_version(path: Path = PROC_VERSION) -> str | None:
    """The kernel module's version from `/proc/driver/nvidia/version` ("... Kernel Module  570.133.20 ...")."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def check_driver(
    runtime: str | None, *, library: str = LIBCUDA, proc_version: Path = PROC_VERSION
) -> DriverInfo | None:
    """Check the node's driver against a CUDA `runtime` ("13.0"; None: a CPU-only torch build).

    None where there is no driver to use (no libcuda, a stub, no device visible): a CPU run. Raises
    DriverIncompatible (71) where cuInit says the driver cannot run CUDA here (whatever torch's build:
    the GPU is unusable), or where its CUDA major is older than the runtime's."""
    try:
        cuda = ctypes.CDLL(library)
        get_version, init = cuda.cuDriverGetVersion, cuda.cuInit
    except (OSError, AttributeError):  # no driver here, or a library that is not one
        log.debug("gpu_driver_absent", library=library)
        return None
    version = ctypes.c_int(0)
    driver_cuda = cuda_from_int(version.value) if get_version(ctypes.byref(version)) == 0 else None
    info = DriverInfo(read_driver_version(proc_version), driver_cuda, parse_cuda(runtime))
    status = init(0)
    if status in (CUDA_ERROR_STUB_LIBRARY, CUDA_ERROR_NO_DEVICE):
        log.info("gpu_none_visible", library=library, cuinit=status)
        return None
    if status in INCOMPATIBLE:
        name, meaning = INCOMPATIBLE[status].split(": ", 1)
        raise incompatible(info, runtime, f"cuInit returned {name} ({status}), {meaning}")
    if status != CUDA_SUCCESS:  # not a version problem: torch reports the device's state itself
        log.warning("gpu_driver_init_failed", library=library, cuinit=status, driver_version=info.driver_version)
        return None
    known = info.runtime_cuda is not None and info.driver_cuda is not None
    if known and not driver_supports(info.driver_cuda, info.runtime_cuda):
        raise incompatible(info, runtime, "the driver's CUDA major is older than the runtime's")
    log.info(
        "gpu_driver",
        driver_version=info.driver_version,
        driver_cuda=_text(info.driver_cuda),
        runtime_cuda=runtime,
        minor_version_compatibility=bool(
            info.runtime_cuda and info.driver_cuda and info.driver_cuda < info.runtime_cuda
        ),
    )
    return info


def incompatible(info: DriverInfo, runtime: str | None, why: str) -> DriverIncompatible:
    """The error naming the driver, the CUDA it supports, the image's runtime and the fix."""
    major = info.runtime_cuda[0] if info.runtime_cuda else None
    needed = f"NVIDIA driver >= {MINIMUM_DRIVER[major]}" if major in MINIMUM_DRIVER else "a newer NVIDIA driver"
    runtime_text = f"CUDA {runtime}" if runtime else "a CUDA runtime (CPU-only torch build here)"
    return DriverIncompatible(
        f"the node's NVIDIA driver {info.driver_version or '(version unknown)'} supports CUDA "
        f"{_text(info.driver_cuda) or '(unknown)'}; this image's PyTorch is built for {runtime_text}: {why}",
        hint=f"run on a node pool with {needed} (the cloud's GPU driver setting, e.g. GKE "
        f"gpu-driver-version=latest); see {DOCS}",
    )


def _text(version: tuple[int, int] | None) -> str | None:
    return f"{version[0]}.{version[1]}" if version else None
