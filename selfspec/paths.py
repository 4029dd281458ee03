"""Where selfspec keeps what it builds (zoo models, low-bit weights, step records, inductor's compiled graphs).

No torch here: the package points inductor's caches at the selfspec cache before anything imports torch._dynamo,
whose import sets TORCHINDUCTOR_CACHE_DIR to inductor's own default under /tmp.
"""

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SELFSPEC_CACHE") or "~/.cache/selfspec").expanduser()


def use_selfspec_inductor_cache() -> None:
    """Inductor's FX-graph and AOT caches under the selfspec cache, unless the user chose a place; one for each
    ATEN_CPU_CAPABILITY, which inductor's generated CPU code follows but its cache keys do not: a graph compiled at
    AVX-512 and loaded by a process at AVX2 multiplied only part of its output (a [1, 1, 37] product times 2)."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    name = f"inductor-{capability}" if capability else "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / name))
