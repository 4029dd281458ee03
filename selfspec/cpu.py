"""What CPU this is: its name and the instruction sets that decide which kernels are fast on it."""

import functools
import os
import platform
from pathlib import Path

import torch

# Set to 0 to keep bfloat16 matrices off oneDNN's packed kernels (how a CPU without them runs).
PACKED_ENV = "SELFSPEC_PACKED_BF16"


def cpu_name() -> str:
    """The marketing name and, where it tells, the family and model: a virtual machine's name can be the same for
    two generations ("AMD EPYC" for Zen 4, family 25 model 17, and Zen 5, family 26 model 2), whose kernels time
    differently."""
    # platform.processor() is often empty on Linux; /proc/cpuinfo has the marketing name
    try:
        fields = dict(_cpuinfo_fields())
    except OSError:
        fields = {}
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']} model {fields['model']})"
    return name


def _cpuinfo_fields():
    """(key, value) of /proc/cpuinfo's first processor."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if not line.strip():
            return
        key, _, value = line.partition(":")
        yield key.strip(), value.strip()


@functools.cache  # a kernel builder asks once per matrix; the CPU does not change in a process
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


def packed_bf16() -> bool:
    """Whether oneDNN's packed bfloat16 kernels run here: the CPU has them (avx512bw/vl/dq or avx_ne_convert, as
    oneDNN and ONEDNN_MAX_CPU_ISA allow) and SELFSPEC_PACKED_BF16 is not 0."""
    return (
        os.environ.get(PACKED_ENV, "1") != "0"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def kernel_setting() -> str:
    """The CPU flags and the kernels torch takes on them (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA can lower
    both, which is how a machine with AVX-512 runs the code paths of one without)."""
    packed = "on" if packed_bf16() else "off"
    # a cap that leaves bf16 on still changes oneDNN's kernels (AMX off: wide products cost up to 2x more here)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    capped = f", oneDNN ISA up to {cap}" if cap else ""
    return f"{cpu_flags()}; torch kernels {torch.backends.cpu.get_cpu_capability()}, packed bf16 {packed}{capped}"


def machine_key() -> dict[str, str | int]:
    """What a measured speed on this machine depends on: the CPU, the kernels torch takes on it, torch's version
    and its thread count. Step timings and recorded schedules are kept per key."""
    return {
        "cpu": cpu_name(),
        "kernels": kernel_setting(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
