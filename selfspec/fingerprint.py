"""A short, stable identity for a model: its architecture config plus a sample of its weights.

Schedules record it so a schedule tuned for one model is refused on another.
"""

import hashlib
import json

import torch
from transformers import PreTrainedModel

_CONFIG_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size")  # fmt: skip


def model_fingerprint(model: PreTrainedModel) -> str:
    """sha256 over the shape-defining config and the first values of a few weight tensors (dtype-independent)."""
    digest = hashlib.sha256()
    config = {k: getattr(model.config, k, None) for k in _CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True).encode())
    params = dict(model.named_parameters())
    for name in sorted(params)[:: max(1, len(params) // 8)]:
        sample = params[name].detach().flatten()[:64].to(torch.float32)
        # Rounded so the fingerprint is the same in float32 and bfloat16.
        digest.update(name.encode())
        digest.update(sample.to(torch.bfloat16).to(torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_identity(model: PreTrainedModel, name: str | None = None) -> dict:
    return {
        "name": name or getattr(model, "name_or_path", None) or model.config.model_type,
        "num_layers": model.config.num_hidden_layers,
        "fingerprint": model_fingerprint(model),
    }
