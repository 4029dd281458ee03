"""What the fused forward runs differently inside a compiled graph (`selfspec.compiled`).

Matrix products call the eager kernel objects by handle through one custom op, so a graph holds no weights:
oneDNN's packed weights are opaque to tracing, and a graph without weight constants is one inductor can keep in
its on-disk cache. One-query attention is written as two reductions that inductor fuses.
"""

import weakref

import torch

_kernels: list[weakref.ref] = []
_handles: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # kernel object -> its index in _kernels


def kernel_handle(kernel) -> int:
    """A process-wide number for a matrix kernel object (callable x -> x @ W^T + b), by which graphs call it.
    Taken when the object is made: tracing must only read it."""
    if kernel not in _handles:
        _handles[kernel] = len(_kernels)
        _kernels.append(weakref.ref(kernel))
    return _handles[kernel]


# Defined on the dispatcher directly (not `torch.library.custom_op`): a step calls it ~100 times, and the
# higher-level wrapper adds microseconds to each call.
_library = torch.library.Library("selfspec", "DEF")
_library.define("linear(Tensor x, int handle, int out_features) -> Tensor")


def _linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return _kernels[handle]()(x)


def _linear_shape(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


for _device in ("CPU", "CUDA"):
    _library.impl("linear", _linear, _device)
torch.library.register_fake("selfspec::linear", _linear_shape, lib=_library)


def registered_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """The registered kernel's product: x [..., K] -> [..., out_features]."""
    return torch.ops.selfspec.linear(x, handle, out_features)


def attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query over every key given: q [1, H, 1, hd]; keys, values [1, H_kv, S, hd] -> [1, H, 1, hd].

    Inductor lowers SDPA over a key length that changes from call to call to a path that slows as S grows; this
    form stays at the speed of reading K/V once.
    """
    batch, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    q = q.view(batch, kv_heads, heads // kv_heads, 1, dim).float()  # the heads of a group share their K/V
    scores = (q * keys[:, :, None].float()).sum(-1) * scale  # [1, H_kv, G, S]
    weights = scores.softmax(-1)
    out = (weights[..., None] * values[:, :, None].float()).sum(-2)  # [1, H_kv, G, hd]
    return out.to(values.dtype).view(batch, heads, 1, dim)
