"""Schedules `selfspec tune` chose, kept in the selfspec cache per model, dtype and machine, so that `wrap(model)`
given no schedule runs what tune found here.

A record is JSON (never pickle): its key and the schedule. It is used only where its key is this process's own:
the same weights (fingerprint), dtype and device, and the same CPU, kernels, torch and thread count, since a
schedule that paid on one of those can lose on another. A damaged record is ignored with a warning.
"""

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from ..cpu import machine_key
from ..errors import ScheduleError
from ..files import write_json_atomic
from ..fingerprint import model_fingerprint
from ..paths import cache_root
from .spec import Schedule

RECORD_FORMAT = "selfspec.recorded-schedule/1"
# moves the records away from the cache (the test suite keeps its tune runs' records apart this way)
STORE_ENV = "SELFSPEC_SCHEDULES"


@dataclass(frozen=True)
class Recorded:
    schedule: Schedule
    path: Path
    model: str  # as tune was asked for it
    recorded: str  # when, UTC
    key: dict[str, Any]  # `key_of` the model and machine it was recorded for


def store() -> Path:
    return Path(os.environ.get(STORE_ENV) or cache_root() / "schedules")


def key_of(model: PreTrainedModel) -> dict[str, Any]:
    dtype = str(model.dtype).removeprefix("torch.")
    return {"fingerprint": model_fingerprint(model), "dtype": dtype, "device": model.device.type, **machine_key()}


def _path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return store() / f"{key['fingerprint']}-{key['dtype']}-{digest}.json"


def record(schedule: Schedule, model: PreTrainedModel, name: str) -> Path:
    """Keep `schedule` as what tune chose for `model` (asked for as `name`) on this machine; returns its file."""
    key = key_of(model)
    path = _path(key)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(path, {"format": RECORD_FORMAT, "model": name, "recorded": when, "key": key,
                             "schedule": schedule.to_dict()})  # fmt: skip
    return path


def lookup(model: PreTrainedModel) -> Recorded | None:
    """What tune recorded for this model, dtype and machine; None where it recorded nothing, or the record is
    damaged (a warning says so)."""
    key = key_of(model)
    path = _path(key)
    if not path.exists():
        return None
    try:
        return _read(path, key)
    except (OSError, ValueError, TypeError, KeyError, ScheduleError) as e:
        warnings.warn(
            f"ignoring the recorded schedule {path}: {e}; `selfspec tune` writes a new one",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _read(path: Path, key: dict[str, Any] | None = None) -> Recorded:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise ValueError(f"not a {RECORD_FORMAT} record")
    if key is not None and data["key"] != key:
        raise ValueError("its key is not this model's and machine's")
    schedule = Schedule.from_dict(data["schedule"])
    return Recorded(schedule, path, str(data["model"]), str(data["recorded"]), dict(data["key"]))


def recorded_here() -> list[Recorded]:
    """Every readable record made on this CPU with these kernels and torch (any thread count)."""
    here = machine_key()
    found = []
    for path in sorted(store().glob("*.json")):
        try:
            record = _read(path)
        except (OSError, ValueError, TypeError, KeyError, ScheduleError):
            continue  # `selfspec models` lists what is usable; lookup warns about a damaged record when it meets it
        if all(record.key.get(k) == here[k] for k in ("cpu", "kernels", "torch")):
            found.append(record)
    return found
