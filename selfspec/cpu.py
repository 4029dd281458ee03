"""What CPU this is: its name and the instruction sets that decide which kernels are fast on it."""

import platform
from pathlib import Path


def cpu_name() -> str:
    # platform.processor() is often empty on Linux; /proc/cpuinfo has the marketing name
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The instruction sets that decide which kernels are fast here (speed figures differ between them)."""
    try:
        flags = set(
            next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
        )
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx_vnni")
    return " ".join(flag for flag in wanted if flag in flags) or "none of " + " ".join(wanted)
