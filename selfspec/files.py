"""Output files: checked writable before long work starts, and written atomically so a crash or a full disk
never leaves half a file where a good one was."""

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: `exclusive_lock` then serialises nothing between processes
    fcntl = None  # type: ignore[assignment]

from .errors import SelfspecError


def ensure_writable(path: Path, hint: str = "choose another --out") -> None:
    """Raise SelfspecError unless a file can be created at `path` (its folder is made if missing)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder")
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SelfspecError(f"cannot write {path}: {e.strerror or e}; {hint}") from None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temp file and a rename, so a crash never leaves a half-written file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise SelfspecError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) while the block runs. The system releases it when its
    process dies, so a killed holder never leaves it taken."""
    with path.open("a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
