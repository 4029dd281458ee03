"""Our C++ kernels (`csrc/`): compiled for this CPU (-march=native) on first use and kept under the selfspec cache,
keyed by the source, the CPU's flags and torch's version, so another machine or torch never loads a build it
cannot run."""

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
    key = hashlib.sha256(f"{source.read_text()}|{cpu_flags()}|{torch.__version__}".encode()).hexdigest()[:12]
    build = cache_root() / "kernels" / f"{name}-{key}"
    try:
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            f"selfspec_{name}_{key}",
            [str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            is_python_module=False,
        )
    except (OSError, RuntimeError) as error:  # no compiler or ninja here: the other kernels still run
        return first_line(error)
    return ""
