"""The schedule `wrap(model)` runs when given none: what `selfspec tune` recorded for this model, dtype and machine,
or else the built-in default, which never drafts where drafting measured slower than the plain loop."""

from dataclasses import dataclass

from transformers import PreTrainedModel

from .presets import builtin_default
from .recorded import lookup
from .spec import Schedule


@dataclass(frozen=True)
class DefaultSchedule:
    schedule: Schedule
    source: str  # where it came from, in words


def default_for(model: PreTrainedModel, num_layers: int) -> DefaultSchedule:
    found = lookup(model)
    if found is not None:
        return DefaultSchedule(
            found.schedule,
            f"recorded by `selfspec tune {found.model}` on this machine, {found.recorded} ({found.path})",
        )
    return DefaultSchedule(
        builtin_default(num_layers),
        "built-in default (`selfspec tune` has recorded no schedule for this model, dtype and machine)",
    )
