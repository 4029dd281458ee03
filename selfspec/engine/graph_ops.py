"""How a compiled graph (`selfspec.compiled`) calls the fused forward's matrix products.

They call the eager kernel objects by handle through one custom op, so a graph holds no weights: oneDNN's packed
weights are opaque to tracing, and a graph without weight constants is one inductor can keep in its on-disk cache.
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
