"""The hardware floor of batch-1 decoding: every weight a step reads, streamed once at the machine's read bandwidth.

At batch 1 a decode step reads each layer weight and the LM head once and does little arithmetic per byte, so
no kernel can make a step faster than (bytes read) / (read bandwidth). The embedding is not counted: a step
reads one row of it (unless it is tied to the head, which is counted as the head).
"""

import time

import torch
from transformers import PreTrainedModel

from selfspec.drafts.lowbit import GROUP_SIZE
from selfspec.engine.fused import layer_linears
from selfspec.schedule import Schedule

BANDWIDTH_BYTES = 1 << 30  # large enough to stream from memory, not from any cache level


def step_weight_bytes(model: PreTrainedModel) -> int:
    """Bytes of the weights one full-depth decode step reads: the decoder layers, final norm and LM head."""
    inner = model.model
    parts = [inner.layers, inner.norm]
    counted = sum(p.numel() * p.element_size() for part in parts for p in part.parameters())
    head = model.lm_head.weight
    return counted + head.numel() * head.element_size()


def matrix_bytes(rows: int, width: int, form: str, element_size: int) -> int:
    """Bytes a [rows, width] matrix streams as `form`: exact values, or low-bit codes with their scales."""
    if form == "int8":
        return rows * width + rows * element_size
    if form == "int4":
        return rows * width // 2 + 2 * rows * (width // GROUP_SIZE) * element_size
    return rows * width * element_size


def draft_weight_bytes(model: PreTrainedModel, schedule: Schedule) -> int:
    """Bytes of the matrices one layer-draft token reads at its deepest exit: kept sublayers in their forms, and
    the draft head's rows."""
    size = model.lm_head.weight.element_size()
    exit_layer = schedule.exits(model.config.num_hidden_layers)[-1]
    total = 0
    for i, layer in enumerate(model.model.layers[:exit_layer]):
        for name, group in layer_linears(layer).items():
            form = schedule.sublayer_form("attn" if name in ("qkv", "o") else "mlp", i)
            if form != "skip":
                total += sum(matrix_bytes(*g.weight.shape, form, size) for g in group)
    vocab, width = model.lm_head.weight.shape
    rows = min(vocab, schedule.head_vocab or vocab)
    return total + matrix_bytes(rows, width, schedule.head_precision, size)


def read_bandwidth(repeats: int = 5, nbytes: int = BANDWIDTH_BYTES) -> float:
    """Bytes per second that torch's threads read from memory, best of `repeats` full passes over a buffer."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    buffer.sum()  # first touch: page faults are not part of reading
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return nbytes / best


def floor_seconds_per_token(model: PreTrainedModel, bandwidth: float) -> float:
    return step_weight_bytes(model) / bandwidth
