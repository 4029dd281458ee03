"""Our C++ kernels (`csrc/`): compiled for this CPU (-march=native, lowered to what torch's kernels use) on first
use and kept under the selfspec cache, keyed by the source, the CPU's flags and torch's version, so another machine
or torch never loads a build it cannot run."""

import functools
import hashlib
from pathlib import Path

import torch

from .cpu import cpu_flags
from .paths import cache_root
from .zoo import first_line

SOURCES = Path(__file__).parent / "csrc"


@functools.cache
def built(name: str) -> str:
    """Build (once per source, CPU and torch; once a process) and load csrc/<name>.cpp: '' or what went wrong."""
    from torch.utils import cpp_extension  # imports setuptools: only when a kernel is wanted

    source = SOURCES / f"{name}.cpp"
    lowered = _lowered_isa()
    setting = f"{source.read_text()}|{cpu_flags()}|{torch.__version__}" + "".join(f"|{flag}" for flag in lowered)
    key = hashlib.sha256(setting.encode()).hexdigest()[:12]
    build = cache_root() / "kernels" / f"{name}-{key}"
    try:
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            f"selfspec_{name}_{key}",
            [str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", *lowered],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            is_python_module=False,
        )
    except (OSError, RuntimeError) as error:  # no compiler or ninja here: the other kernels still run
        return first_line(error)
    return ""


def _lowered_isa() -> list[str]:
    """Compiler flags that keep a build to the instruction sets torch runs at: ATEN_CPU_CAPABILITY=avx2 on a CPU
    with AVX-512 then runs our kernels' AVX2 code as well, as a CPU without AVX-512 would."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return []
    return ["-mno-avx512f"] if capability == "AVX2" else ["-mno-avx2"]
