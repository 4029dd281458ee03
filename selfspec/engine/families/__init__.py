"""Each architecture family's layer, one module a family: what its layer computes differently from llama's, and
nothing else (the engine's forward, reference and fused, calls only `Llama`'s interface)."""

from transformers import PretrainedConfig

from ...errors import UnsupportedModelError
from .gemma import Gemma, Gemma3
from .llama import Llama, Mistral
from .qwen3 import Qwen3

FAMILIES: dict[str, type[Llama]] = {t: family for family in (Llama, Mistral, Qwen3, Gemma, Gemma3)
                                    for t in family.model_types}  # fmt: skip


def family_of(config: PretrainedConfig) -> Llama:
    """The family of `config`'s model type, for that config, or a clear error naming the supported ones."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise UnsupportedModelError(
            f"architecture {config.model_type!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    return family(config)
