"""Draft schedules: their fields and JSON (`spec`), one-line descriptions, the named ones (`presets`), and the ones
`selfspec tune` recorded on this machine (`recorded`), which `wrap(model)` runs when given none (`default`)."""

from .default import DefaultSchedule, default_for
from .describe import describe
from .presets import NAMED
from .recorded import record, recorded_here
from .spec import FORMAT, LOWBIT_FIELDS, MAX_NGRAM, PRECISIONS, READABLE_FORMATS, Schedule

__all__ = [
    "FORMAT",
    "LOWBIT_FIELDS",
    "MAX_NGRAM",
    "NAMED",
    "PRECISIONS",
    "READABLE_FORMATS",
    "DefaultSchedule",
    "Schedule",
    "default_for",
    "describe",
    "record",
    "recorded_here",
]
