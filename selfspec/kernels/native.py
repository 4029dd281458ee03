"""Our C++ kernels (`csrc/`): compiled for this CPU (-march=native, lowered to what torch's kernels use) on first
use and kept under the selfspec cache, keyed by the source, the CPU's flags and torch's version, so another machine
or torch never loads a build it cannot run."""

import functools
import hashlib
from pathlib import Path

import torch

from ..cpu import cpu_flags
from ..files import exclusive_lock
from ..paths import cache_root
from ..zoo import first_line

SOURCES = Path(__file__).parent / "csrc"


@functools.cache
def built(name: str) -> str:
    """Build (once per source, CPU and torch; once a process) and load csrc/<name>.cpp: '' or what went wrong."""
    from torch.utils import cpp_extension  # imports setuptools: only when a kernel is wanted

    source, lowered, build = SOURCES / f"{name}.cpp", _lowered_isa(), build_directory(name)
    try:
        build.mkdir(parents=True, exist_ok=True)
        # torch's own baton is a file that a process killed while holding it never removes, and every later process
        # then waits on it for good; under our lock, which the system releases with a dead process, a baton left
        # there is such a leftover.
        with exclusive_lock(build.with_name(f"{build.name}.lock")):
            (build / "lock").unlink(missing_ok=True)
            cpp_extension.load(
                f"selfspec_{build.name.replace('-', '_')}",
                [str(source)],
                extra_cflags=["-O3", "-march=native", "-fopenmp", *lowered],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                is_python_module=False,
            )
    except (OSError, RuntimeError) as error:  # no compiler or ninja here: the other kernels still run
        return first_line(error)
    return ""


def build_directory(name: str) -> Path:
    """Where csrc/<name>.cpp is built for this source, CPU, torch and lowered instruction sets."""
    lowered = _lowered_isa()
    source = (SOURCES / f"{name}.cpp").read_text()
    setting = f"{source}|{cpu_flags()}|{torch.__version__}" + "".join(f"|{flag}" for flag in lowered)
    return cache_root() / "kernels" / f"{name}-{hashlib.sha256(setting.encode()).hexdigest()[:12]}"


def _lowered_isa() -> list[str]:
    """Compiler flags that keep a build to the instruction sets torch runs at: ATEN_CPU_CAPABILITY=avx2 on a CPU
    with AVX-512 then runs our kernels' AVX2 code as well, as a CPU without AVX-512 would."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return []
    return ["-mno-avx512f"] if capability == "AVX2" else ["-mno-avx2"]
