"""selfspec: lossless self-speculative decoding for Hugging Face causal LMs."""

from .paths import use_selfspec_inductor_cache

use_selfspec_inductor_cache()  # before the imports below bring in torch._dynamo, which fixes inductor's default

from .decode.loop import GenerationStats
from .errors import (
    DownloadError,
    GenerationInputError,
    ModelNotFoundError,
    ScheduleError,
    SelfspecError,
    UnsupportedModelError,
)
from .schedule import Schedule
from .wrap import SpeculativeModel, unwrap, wrap
from .zoo import list_models, load_model

__version__ = "0.1.0"

__all__ = [
    "DownloadError",
    "GenerationInputError",
    "GenerationStats",
    "ModelNotFoundError",
    "Schedule",
    "ScheduleError",
    "SelfspecError",
    "SpeculativeModel",
    "UnsupportedModelError",
    "list_models",
    "load_model",
    "unwrap",
    "wrap",
]
